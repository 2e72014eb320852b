"""The ``embed`` stage: one vector per row (docs/embedding.md).

Two rules, chosen by the model (:mod:`deita_ray.models.embedding_spec`) and ``embed.*``:

- a causal LM (the paper): the final hidden state (after the final norm) at the last token of
  the row's vicuna_v1.1 rendering, truncated to ``embed.max_length`` tokens keeping the
  beginning, not normalised;
- a sentence embedder (``embedded:minilm``): its own pooling (mean over tokens) and L2
  normalisation over the row's plain text, truncated to its ``max_seq_length`` as its
  tokenizer truncates (the end-of-text token kept).

:class:`Embedder` is a callable class for ``Dataset.map_batches`` (``batch_format="pyarrow"``);
:func:`run_embed` reads ``<out_dir>/score`` (or ``<out_dir>/ingest`` when score did not run)
and writes ``<out_dir>/embed`` with only the columns the selector needs (no text).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deita_ray.accounting import StageResult
from deita_ray.config import ModelConfig, PipelineConfig
from deita_ray.data.rejects import RejectMarks, row_raw
from deita_ray.data.sink import (
    in_parts,
    parquet_files,
    skip_finished,
    stage_dir,
    write_with_rejects,
)
from deita_ray.models.embedding_spec import EmbeddingSpec
from deita_ray.progress import count_rows, current_counter
from deita_ray.stages.base import ModelToLoad, Stage
from deita_ray.templates import render_plain, render_vicuna

RENDERERS = {"vicuna": render_vicuna, "plain": render_plain}

EMBEDDING = "embedding"
EMBED_TRUNCATED = "embed_truncated"
OUTPUT_COLUMNS = ("id", "seq", "evol_score", EMBEDDING, EMBED_TRUNCATED)
"""Columns of ``<out_dir>/embed`` (besides the reject marks on their way to the sink)."""

ARROW_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


def embedding_type(dim: int, dtype: str = "float32") -> pa.DataType:
    """Arrow type of the embedding column: ``fixed_size_list<float32|float16>[dim]``."""
    return pa.list_(ARROW_DTYPES[dtype], dim)


def embed_table(
    table: pa.Table,
    backend: Any,
    max_length: int,
    dtype: str = "float32",
    carry: Sequence[str] = (),
    spec: EmbeddingSpec | None = None,
) -> pa.Table:
    """Embed every row of ``table`` with one backend call (pure apart from the engine).

    Args:
        table: rows with ``id``, ``messages`` and optionally ``seq`` / ``evol_score``.
        backend: a :class:`deita_ray.models.backend.Backend` loaded for ``"embed"`` with the
            spec's pooling.
        max_length: tokens kept from the start of each text (also capped by the model's
            context and the spec's ``model_max_tokens``).
        dtype: "float32" or "float16" storage of the embedding.
        carry: further row columns of ``table`` copied to the output unchanged (the scorers'
            row columns, so that any ``select.score`` reaches the selector as evol_score does).
        spec: the embedding rule; None is the paper's (vicuna rendering, last token, raw).

    Returns:
        A table with :data:`OUTPUT_COLUMNS`, the ``carry`` columns and the reject marks. Rows
        that cannot be rendered, that the engine fails on, or whose vector cannot be compared
        are marked (reasons ``missing_messages``, ``render_error``, ``empty_text``,
        ``engine_error``, ``non_finite_embedding``, ``zero_embedding``) with a null embedding.
    """
    spec = spec or EmbeddingSpec()
    render = RENDERERS[spec.text]
    n = table.num_rows
    names = table.column_names
    messages = table["messages"].to_pylist() if "messages" in names else [None] * n
    marks = RejectMarks(n)

    def reject(i: int, reason: str, detail: str) -> None:
        marks.reject(i, reason, detail, row_raw(table, i))

    texts: list[str] = []
    rows: list[int] = []
    for i in range(n):
        if messages[i] is None:
            reject(i, "missing_messages", "row has no messages")
            continue
        try:
            text = render(messages[i])
        except (KeyError, TypeError, ValueError) as e:
            reject(i, "render_error", f"{type(e).__name__}: {e}")
            continue
        if not text.strip():
            reject(i, "empty_text", f"the {spec.text} text of the row is empty")
            continue
        texts.append(text)
        rows.append(i)

    limit = min(max_length, backend.max_prompt_tokens, spec.model_max_tokens or max_length)
    prompts, truncated = _tokenize(backend.tokenizer, texts, limit, spec.text == "plain")
    values, errors = backend.embed(prompts)

    dim = backend.hidden_size
    flat = np.zeros((n, dim), dtype=np.float32)
    cut = [False] * n
    for pos, i in enumerate(rows):
        cut[i] = truncated[pos]
        vec = values[pos]
        if errors[pos] is not None:
            reject(i, "engine_error", errors[pos])
        elif not np.all(np.isfinite(vec)):
            reject(i, "non_finite_embedding", "embedding has NaN or inf")
        elif not np.any(vec):
            # cosine 0 to everything: such a row would pass every similarity check unseen
            reject(i, "zero_embedding", "embedding is all zeros")
        elif spec.normalize:
            flat[i] = vec / np.sqrt(np.dot(vec, vec))  # float64 norm: no overflow
        else:
            flat[i] = vec
    np_dtype = np.float16 if dtype == "float16" else np.float32
    valid = np.array([r is None for r in marks.reasons], dtype=bool)
    values_arr = pa.array(flat.astype(np_dtype).reshape(-1), ARROW_DTYPES[dtype])
    emb = pa.FixedSizeListArray.from_arrays(values_arr, dim, mask=pa.array(~valid))

    def col(name: str, typ: pa.DataType) -> pa.Array:
        return table[name].cast(typ) if name in names else pa.nulls(n, typ)

    out = pa.table(
        {
            "id": col("id", pa.string()),
            "seq": col("seq", pa.int64()),
            "evol_score": col("evol_score", pa.float64()),
            EMBEDDING: emb,
            EMBED_TRUNCATED: pa.array(cut, pa.bool_()),
            **{c: table[c] for c in carry},
        }
    )
    return marks.attach(out)


def _tokenize(
    tokenizer: Any, texts: list[str], limit: int, as_tokenizer_truncates: bool
) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each text (special tokens added) cut to ``limit``, and whether it was cut.

    ``as_tokenizer_truncates``: a long text is re-encoded with the tokenizer's own truncation,
    which keeps the closing special token (BERT's ``[SEP]``), as sentence-transformers encodes;
    otherwise the ids are cut keeping the beginning (the paper's rule for causal LMs).
    """
    if not texts:
        return [], []
    # verbose=False: a text longer than the model is expected here (it is cut below)
    ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    truncated = [len(p) > limit for p in ids]
    if not as_tokenizer_truncates:
        return [p[:limit] for p in ids], truncated
    long = [k for k, cut in enumerate(truncated) if cut]
    if long:
        enc = tokenizer(
            [texts[k] for k in long], add_special_tokens=True, truncation=True, max_length=limit
        )["input_ids"]
        for k, p in zip(long, enc, strict=True):
            ids[k] = p
    return ids, truncated


class Embedder:
    """Ray Data callable: one vector per row, as ``spec`` says (:func:`embed_table`).

    Input columns: ``id``, ``messages`` (list<struct<role, content>>), optionally ``seq``,
    ``evol_score`` and the ``carry`` columns (others are dropped).

    Output columns: ``id``, ``seq`` (int64, null if absent), ``evol_score`` (double, null if
    absent), ``embedding`` (fixed_size_list<float32 or float16>[hidden_size]),
    ``embed_truncated`` (bool: the rendering was longer than ``max_length`` tokens), the
    ``carry`` columns and the reject marks ``_reject_reason`` / ``_reject_detail`` / ``_raw``.

    Args:
        model_cfg: the embedding model's config.
        model_path: resolved local model folder.
        max_length: tokens kept from the start of the rendering.
        dtype: "float32" or "float16" storage of the embedding.
        carry: row score columns to pass through to the selector.
        spec: the embedding rule resolved on the driver; None is the paper's.
        progress: the stage's progress counter (:mod:`deita_ray.progress`), told the rows of
            each finished batch, or None.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        model_path: str,
        max_length: int,
        dtype: str = "float32",
        carry: Sequence[str] = (),
        spec: EmbeddingSpec | None = None,
        progress: Any = None,
    ):
        from deita_ray.models.backend import load_backend  # noqa: PLC0415

        if dtype not in ARROW_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(ARROW_DTYPES)}, got {dtype!r}")
        self.spec = spec or EmbeddingSpec()
        limit = self.spec.model_max_tokens
        if limit and limit < model_cfg.max_model_len:
            # A sentence embedder reads at most its max_seq_length (vLLM refuses a longer context).
            model_cfg = dataclasses.replace(model_cfg, max_model_len=limit)
        self.backend = load_backend(model_cfg, model_path, "embed", self.spec.pooling)
        self.max_length = max_length
        self.dtype = dtype
        self.carry = tuple(carry)
        self.progress = progress

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = embed_table(batch, self.backend, self.max_length, self.dtype, self.carry, self.spec)
        count_rows(self.progress, batch.num_rows)
        return out


def score_carry_columns(cfg: PipelineConfig) -> list[str]:
    """The scorers' row columns besides ``evol_score`` (they travel with the embeddings)."""
    from deita_ray.scorers import EVOL, resolve_scorers, row_columns  # noqa: PLC0415

    return [c for c in row_columns(resolve_scorers(cfg)) if c != EVOL]


def embed_source(out_dir: str) -> str:
    """The folder the embed stage reads: ``score`` when it ran, else ``ingest``."""
    score = stage_dir(out_dir, "score")
    return score if parquet_files(score) else stage_dir(out_dir, "ingest")


def deferred_result() -> StageResult:
    """Under ``select.lazy_embed``: nothing read, nothing written; the select stage embeds the
    rows its greedy reads, in score order, into ``<out_dir>/embed``
    (:mod:`deita_ray.stages.lazy_embed`)."""
    from deita_ray.accounting import StageCounts  # noqa: PLC0415

    note = (
        "select.lazy_embed: the select stage embeds the rows its greedy reads, in score order, "
        "into <output.dir>/embed (see the select stage's metrics.lazy_embed)"
    )
    return StageResult(
        counts=StageCounts(rows_in=0, rows_out=0),
        metrics={"deferred_to": "select", "note": note},
    )


def run_embed(cfg: PipelineConfig, out_dir: str) -> StageResult:
    """Embed ``<out_dir>/score`` (or ``ingest``) into ``<out_dir>/embed`` (Ray initialised)."""
    import pyarrow.dataset as pds  # noqa: PLC0415
    import ray  # noqa: PLC0415

    from deita_ray.models.embedding_spec import resolve_embedding_spec  # noqa: PLC0415
    from deita_ray.models.registry import resolve_model_path  # noqa: PLC0415
    from deita_ray.runtime import map_batches_kwargs  # noqa: PLC0415

    if cfg.select.lazy_embed:
        return deferred_result()
    t0 = time.time()
    src = embed_source(out_dir)
    source = pds.dataset(src, format="parquet")
    rows_in = source.count_rows()
    columns = [c for c in ("id", "seq", "messages", "evol_score") if c in source.schema.names]
    carry = [c for c in score_carry_columns(cfg) if c in source.schema.names]
    model_cfg = cfg.embed.model
    path = resolve_model_path(model_cfg.path, cfg.cache_dir)
    spec = resolve_embedding_spec(cfg.embed, path)
    ds = skip_finished(ray.data.read_parquet(src).select_columns(columns + carry), out_dir, "embed")
    ds = in_parts(ds, cfg.output.rows_per_part)
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "model_cfg": model_cfg,
            "model_path": path,
            "max_length": cfg.embed.max_length,
            "dtype": cfg.output.embedding_dtype,
            "carry": carry,
            "spec": spec,
            "progress": current_counter(),  # live progress (deita_ray/progress.py)
        },
        batch_format="pyarrow",
        **map_batches_kwargs(cfg.embed.resources, model_cfg),
    )
    counts = write_with_rejects(ds, "embed", out_dir, rows_in=rows_in)
    counts.check("embed")
    seconds = time.time() - t0
    out = stage_dir(out_dir, "embed")
    metrics: dict = {
        "source": os.path.basename(src),
        "model": path,
        "backend": model_cfg.backend,
        "pooling": spec.pooling,
        "normalize": spec.normalize,
        "text": spec.text,
        "dtype": cfg.output.embedding_dtype,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows_in / seconds, 3) if seconds > 0 else None,
    }
    metrics.update(written_metrics(out))
    return StageResult(counts=counts, metrics=metrics)


def written_metrics(folder: str) -> dict[str, int]:
    """``dim`` and ``truncated_rows`` of an embed output folder, from the schema and the flag
    column alone: the driver never holds the vectors (4.9 GB of float32 at 300K rows of 4096)."""
    import pyarrow.dataset as pds  # noqa: PLC0415

    if not parquet_files(folder):
        return {}
    written = pds.dataset(folder, format="parquet")
    out = {"dim": written.schema.field(EMBEDDING).type.list_size}
    if EMBED_TRUNCATED in written.schema.names:  # outputs of earlier versions lack it
        flags = written.to_table(columns=[EMBED_TRUNCATED])[EMBED_TRUNCATED]
        out["truncated_rows"] = int(pc.sum(flags).as_py() or 0)
    return out


def _models(cfg: PipelineConfig) -> list[ModelToLoad]:
    m = cfg.embed.model
    return [ModelToLoad("embed.model.path", m.path, m.trust_remote_code)]


def _gpu_uses(cfg: PipelineConfig, out_dir: str) -> list:
    """The embedder's engine, when its actors take GPUs."""
    from deita_ray.training.memory import GpuUse  # noqa: PLC0415

    if cfg.embed.resources.num_gpus <= 0:
        return []
    return [GpuUse("embed.model.path", cfg.embed.model.path, "embedder", cfg.embed.model)]


def _lazy_hash(cfg: PipelineConfig) -> dict | None:
    # Toggling select.lazy_embed changes what this stage writes (all rows, or none); off adds
    # nothing to the hash, so outputs written before the switch existed stay valid.
    return {"lazy_embed": True} if cfg.select.lazy_embed else None


STAGE = Stage(
    name="embed",
    run=run_embed,
    config_keys=("embed", "output.embedding_dtype"),
    extra_hash=_lazy_hash,
    hash_ignore=("resources",),
    reads=("score", "ingest"),
    input_columns=("id", "seq", "messages"),
    output_columns=OUTPUT_COLUMNS,
    resumes_by_shard=True,
    writes_parts=True,
    counts_batches=True,
    models=_models,
    gpu_uses=_gpu_uses,
    doc="one vector per row: last token of the vicuna rendering, or a sentence embedder's pooling",
)

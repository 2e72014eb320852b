"""Full-parameter SFT on the selection (SPEC section 5) with Ray Train + DeepSpeed ZeRO.

Flow of :func:`run_sft`:

1. ``<out_dir>/select/*.parquet`` is read with Ray Data and tokenised by
   :class:`~deita_ray.training.common.TokenizeSFT` (exact assistant-only label masks); rows with
   nothing to train on go to ``<out_dir>/rejects/sft/``, the rest to
   ``<out_dir>/sft/part-*.parquet`` (columns of ``TokenizeSFT``).
2. A ``TorchTrainer`` runs :func:`~deita_ray.training.common.train_worker` on
   ``cfg.sft.num_workers`` workers, each reading its shard through ``get_dataset_shard`` and
   training under ``deepspeed.initialize``. Resumable checkpoints (HF folder + DeepSpeed state)
   go to ``<out_dir>/sft/checkpoints/``; a lost worker restarts the group from the last one.
3. The final model is written to ``<out_dir>/sft/final`` (safetensors + tokenizer), loadable by
   transformers and vLLM.
"""

from __future__ import annotations

import os
from typing import Any

from deita_ray.accounting import StageCounts, StageResult
from deita_ray.config import PipelineConfig
from deita_ray.data.sink import parquet_files, stage_dir, write_with_rejects
from deita_ray.preflight import ModelToLoad
from deita_ray.stages.base import Stage
from deita_ray.training.common import (
    TokenizeSFT,
    check_template,
    collate,
    fit,
    map_tokenize,
    summarize_history,
)

NAME = "sft"


def sft_step(engine: Any, batch: dict, device: Any, config: dict) -> tuple[Any, int, dict]:
    """One SFT micro-batch on a worker: mean cross-entropy over the assistant tokens.

    Returns:
        (loss tensor, number of real tokens in the batch, extra metrics to average).
    """
    import torch

    from deita_ray.training.common import _to_torch

    pad_id = config["pad_id"]
    t = _to_torch(collate(list(batch["input_ids"]), list(batch["labels"]), pad_id), device)
    out = engine(input_ids=t["input_ids"], attention_mask=t["attention_mask"], labels=t["labels"])
    n_tokens = int(torch.count_nonzero(t["attention_mask"]))
    return out.loss, n_tokens, {}


def sft_model_path(cfg: PipelineConfig) -> str:
    """The starting weights: ``sft.model``, else the embedder's model, as a loadable path."""
    from deita_ray.models.registry import resolve_model_path

    return resolve_model_path(cfg.sft.model or cfg.embed.model.path, cfg.cache_dir)


def tokenize_to_parquet(
    ds: Any, model_path: str, cfg: PipelineConfig, out_dir: str, rows_in: int
) -> StageCounts:
    """Tokenise ``ds`` into ``<out_dir>/sft/part-*.parquet``, its rejects into ``rejects/sft``;
    ``rows_in``: the rows of ``ds``, counted from the input."""
    tokenized = map_tokenize(ds, TokenizeSFT, model_path, cfg.sft, batch_size=256)
    return write_with_rejects(tokenized, NAME, out_dir, rows_in=rows_in)


def run_sft(cfg: PipelineConfig, out_dir: str) -> StageResult:
    """Fine-tune the model on ``<out_dir>/select`` and write ``<out_dir>/sft/final``.

    Assumes Ray is initialised. Counts: rows_in = selected rows, rows_out = rows trained on,
    rejects for rows with no assistant token (after truncation) or unrenderable messages.
    Metrics: per-step loss and lr, tokens/s, steps, examples, the step plan.
    """
    import pyarrow.parquet as pq
    import ray

    model_path = sft_model_path(cfg)
    check_template(cfg.sft, model_path, NAME)
    sft_dir = stage_dir(out_dir, NAME)
    select_dir = stage_dir(out_dir, "select")
    # rows in from the selection's footers, apart from what the tokeniser writes
    rows_in = sum(pq.ParquetFile(p).metadata.num_rows for p in parquet_files(select_dir))
    selected = ray.data.read_parquet(select_dir)
    counts = tokenize_to_parquet(selected, model_path, cfg, out_dir, rows_in)
    counts.check(NAME)
    if counts.rows_out == 0:
        raise RuntimeError(f"sft: no trainable rows ({counts.to_dict()})")
    train_ds = (
        ray.data.read_parquet(parquet_files(sft_dir))
        .select_columns(["input_ids", "labels"])
        .materialize()
    )
    from deita_ray.training.common import load_tokenizer

    pad_id = load_tokenizer(model_path, cfg.sft.trust_remote_code).pad_token_id
    state, plan = fit(
        NAME,
        sft_step,
        cfg.sft,
        model_path,
        train_ds,
        counts.rows_out,
        sft_dir,
        extra_config={"pad_id": int(pad_id)},
    )
    metrics = {
        "model": model_path,
        "final_model": os.path.join(sft_dir, "final"),
        "steps": state["step"],
        "optimizer_steps": state.get("optimizer_steps"),
        "examples": state["examples"],
        "tokens": state["tokens"],
        "restarts": state["restarts"],
        "resumed_from_step": state["resumed_from_step"],
        "plan": plan.to_dict(),
        **summarize_history(state["history"]),
    }
    return StageResult(counts=counts, metrics=metrics)


def _sft_base(cfg: PipelineConfig) -> str:
    # sft.model empty means "the embedder's model": a change there changes what SFT trains.
    return "" if cfg.sft.model else cfg.embed.model.path


def _models(cfg: PipelineConfig) -> list[ModelToLoad]:
    """The base model (:func:`sft_model_path`: ``sft.model``, else the embedder's)."""
    key = "sft.model" if cfg.sft.model else "sft.model (empty: embed.model.path)"
    return [ModelToLoad(key, cfg.sft.model or cfg.embed.model.path, cfg.sft.trust_remote_code)]


STAGE = Stage(
    name=NAME,
    run=run_sft,
    config_keys=("sft",),
    extra_hash=_sft_base,
    reads=("select",),
    input_columns=("id", "messages"),
    output_columns=("id", "input_ids", "labels"),
    trains=True,
    models=_models,
    doc="full fine-tuning on the selection (Ray Train + DeepSpeed); the model in sft/final",
)

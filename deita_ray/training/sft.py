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
from deita_ray.data.sink import parquet_files, rejects_dir, stage_dir, write_with_rejects
from deita_ray.training.common import (
    TokenizeSFT,
    clean_dirs,
    collate,
    fit,
    map_tokenize,
    summarize_history,
)

STAGE = "sft"


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


def tokenize_to_parquet(ds: Any, model_path: str, cfg: PipelineConfig, out_dir: str) -> StageCounts:
    """Tokenise ``ds`` into ``<out_dir>/sft/part-*.parquet``, its rejects into ``rejects/sft``."""
    tokenized = map_tokenize(ds, TokenizeSFT, model_path, cfg.sft, batch_size=256)
    return write_with_rejects(tokenized, STAGE, out_dir)


def clean_stage(out_dir: str, stage: str) -> None:
    """Remove a training stage's earlier outputs (a rerun rewrites them whole)."""
    folder = stage_dir(out_dir, stage)
    for p in parquet_files(folder):
        os.remove(p)
    clean_dirs(
        rejects_dir(out_dir, stage),
        os.path.join(folder, "final"),
        os.path.join(folder, "checkpoints"),
    )


def check_template(t: Any, model_path: str, stage: str) -> None:
    """Fail at start (not row by row) when ``template: chat_template`` has no template."""
    if t.template == "chat_template":
        from deita_ray.training.common import load_tokenizer

        if not load_tokenizer(model_path, t.trust_remote_code).chat_template:
            raise ValueError(
                f"{stage}.template: 'chat_template' but the tokenizer of {model_path} has none "
                "(use vicuna_v1.1)"
            )


def run_sft(cfg: PipelineConfig, out_dir: str) -> StageResult:
    """Fine-tune the model on ``<out_dir>/select`` and write ``<out_dir>/sft/final``.

    Assumes Ray is initialised. Counts: rows_in = selected rows, rows_out = rows trained on,
    rejects for rows with no assistant token (after truncation) or unrenderable messages.
    Metrics: per-step loss and lr, tokens/s, steps, examples, the step plan.
    """
    import ray

    model_path = sft_model_path(cfg)
    check_template(cfg.sft, model_path, "sft")
    sft_dir = stage_dir(out_dir, STAGE)
    clean_stage(out_dir, STAGE)
    selected = ray.data.read_parquet(stage_dir(out_dir, "select"))
    counts = tokenize_to_parquet(selected, model_path, cfg, out_dir)
    counts.check(STAGE)
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
        STAGE,
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

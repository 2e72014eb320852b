"""Full-parameter SFT on the selection with Ray Train + DeepSpeed ZeRO (docs/training.md).

Flow of :func:`run_sft`:

1. The selection (``<out_dir>/select``, in rank order) is put in the order of a seeded
   permutation and its first ``sft.train_fraction`` share is kept (:func:`training_order`, the
   DEITA script's 98 % split); the rest is held out and listed in the metrics.
2. :class:`TokenizeSFT` renders and tokenises the kept rows in a Ray Data actor (exact
   assistant-only label masks); rows with nothing to train on go to ``<out_dir>/rejects/sft/``,
   the rest to ``<out_dir>/sft/part-*.parquet``.
3. :func:`~deita_ray.training.loop.fit` runs :func:`sft_step` on ``cfg.sft.num_workers`` Ray
   Train workers under ``deepspeed.initialize``. Resumable checkpoints (DeepSpeed state) go to
   ``<out_dir>/checkpoints/sft/`` (or ``sft.checkpoint_dir``); a lost worker restarts the group
   from the last one, and a re-run of the job with the same settings (a killed driver, a
   retried RayJob) resumes from it. The final model is written to ``<out_dir>/sft/final``
   (safetensors + tokenizer), loadable by transformers and vLLM; the checkpoints are then
   deleted.

:func:`sft_step` imports neither Ray nor DeepSpeed (nor does this module at import time), so a
GPU check can run it on a plain DeepSpeed engine.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from deita_ray.accounting import StageCounts, StageResult
from deita_ray.config import PipelineConfig
from deita_ray.data.formats import Reject, parse_messages, validate_messages
from deita_ray.data.rejects import RejectMarks
from deita_ray.stages.base import TRAINING_HASH_IGNORE, ModelToLoad, Stage, running_stage_hash
from deita_ray.training.render import (
    Encoded,
    TemplateError,
    TokenizingStage,
    collate,
    encode_segments,
    render_segments,
)
from deita_ray.training.tensors import shifted_token_logps, to_torch

NAME = "sft"

ORDER = "order"
"""Column of a row's place in the training order (the tokenised parts are read back by it)."""


# ---------------------------------------------------------------------------------------------
# The step (runs on the workers)


def sequence_weighted_loss(logits: Any, labels: Any) -> Any:
    """Mean over sequences of each sequence's mean token cross-entropy.

    Every conversation of the micro-batch weighs the same, whatever its length: the loss a
    micro-batch of one gives, averaged (as gradient accumulation does) over the batch.
    """
    logp, mask = shifted_token_logps(logits, labels)
    per_sequence = -(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_sequence.mean()


def sft_step(engine: Any, batch: dict, device: Any, config: dict) -> tuple[Any, int, dict]:
    """One SFT micro-batch on a worker: cross-entropy over the assistant tokens.

    Args:
        engine: the DeepSpeed engine (or any module called as an HF causal LM).
        batch: ``{"input_ids": [...], "labels": [...]}``, one sequence per row (Ray Data's
            numpy batch of the tokenised parts).
        device: where the tensors go.
        config: the worker config; ``pad_id``, and ``loss_weighting`` ('token', the default:
            mean over the batch's target tokens; 'sequence': mean per conversation, then over
            conversations).

    Returns:
        (loss tensor, number of real tokens in the batch, extra metrics to average).
    """
    import torch

    t = to_torch(collate(list(batch["input_ids"]), list(batch["labels"]), config["pad_id"]), device)
    if config.get("loss_weighting", "token") == "sequence":
        logits = engine(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        loss = sequence_weighted_loss(logits, t["labels"])
    else:
        out = engine(
            input_ids=t["input_ids"], attention_mask=t["attention_mask"], labels=t["labels"]
        )
        loss = out.loss
    n_tokens = int(torch.count_nonzero(t["attention_mask"]))
    return loss, n_tokens, {}


# ---------------------------------------------------------------------------------------------
# Tokenising


class TokenizeSFT(TokenizingStage):
    """Ray Data stage: render and tokenise selected conversations with exact label masks.

    Input columns: ``id``, ``messages`` (list<struct<role, content>> or its JSON text),
    optionally ``order`` (kept), anything else (kept only in the ``_raw`` text of rejects).
    Output columns: ``id``, ``order``, ``input_ids`` (list<int32>), ``labels`` (list<int32>,
    -100 where there is no loss), ``num_tokens``, ``num_targets``, ``truncated`` and the reject
    mark columns (reasons: those of :func:`deita_ray.data.formats.parse_messages` and
    :func:`~deita_ray.data.formats.validate_messages`, ``template_error``,
    ``no_assistant_message``, ``no_target_tokens`` when truncation left no assistant token).
    """

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        segs_ok, idx_ok = [], []
        marks = RejectMarks(len(rows))

        def reject(i: int, reason: str, detail: str) -> None:
            marks.reject(i, reason, detail, {k: v for k, v in rows[i].items() if k != ORDER})

        for i, row in enumerate(rows):
            messages = parse_messages(row.get("messages"))
            bad = messages if isinstance(messages, Reject) else validate_messages(messages)
            if bad is not None:
                reject(i, bad.reason, bad.detail[:500])
                continue
            try:
                segs = render_segments(messages, self.template, self.tokenizer)
            except (TemplateError, ValueError) as e:
                reject(i, "template_error", f"{type(e).__name__}: {e}"[:500])
                continue
            if not any(t for _, t in segs):
                reject(i, "no_assistant_message", "nothing to train on")
                continue
            segs_ok.append(segs)
            idx_ok.append(i)
        encoded: list[Encoded | None] = [None] * len(rows)
        for i, enc in zip(
            idx_ok,
            encode_segments(segs_ok, self.tokenizer, self.max_length, self.template),
            strict=True,
        ):
            if enc.num_targets == 0:
                detail = f"no assistant token left within max_length={self.max_length}"
                reject(i, "no_target_tokens", detail)
            else:
                encoded[i] = enc
        out = pa.table(
            {
                "id": pa.array([str(r.get("id")) for r in rows], pa.string()),
                ORDER: pa.array([r.get(ORDER) for r in rows], pa.int64()),
                "input_ids": pa.array(
                    [e.input_ids if e else [] for e in encoded], pa.list_(pa.int32())
                ),
                "labels": pa.array([e.labels if e else [] for e in encoded], pa.list_(pa.int32())),
                "num_tokens": pa.array([len(e.input_ids) if e else 0 for e in encoded], pa.int32()),
                "num_targets": pa.array([e.num_targets if e else 0 for e in encoded], pa.int32()),
                "truncated": pa.array([bool(e and e.truncated) for e in encoded], pa.bool_()),
            }
        )
        return marks.attach(out)


# ---------------------------------------------------------------------------------------------
# Stage entry point


def training_order(rows: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """DEITA's train split of ``rows`` rows (hkust-nlp/deita, src/deita/alignment/train.py):
    ``np.random.seed(seed); perm = np.random.permutation(rows)``, the first
    ``int(rows x train_fraction)`` positions train, in that order, the rest is held out.

    Returns:
        (positions trained on, in training order; held-out positions).
    """
    perm = np.random.RandomState(seed).permutation(rows)
    kept = int(rows * train_fraction)
    return perm[:kept], perm[kept:]


def read_selection(out_dir: str) -> pa.Table:
    """The selection in rank order (the select stage's single, small output)."""
    import pyarrow.parquet as pq

    from deita_ray.data.sink import parquet_files, stage_dir

    files = parquet_files(stage_dir(out_dir, "select"))
    if not files:
        raise RuntimeError(f"sft: no selection in {stage_dir(out_dir, 'select')}")
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    return table.sort_by("rank") if "rank" in table.column_names else table


def training_dataset(parts: list[str], block_rows: int = 1024) -> Any:
    """The tokenised rows in training order, as a materialised Ray Dataset.

    The parts are small (token ids of the selection) and are sorted here with Arrow: a Ray
    Data ``sort`` would shuffle through hundreds of partitions for a few thousand rows.
    """
    import pyarrow.parquet as pq
    import ray

    columns = [ORDER, "input_ids", "labels"]
    table = pa.concat_tables([pq.read_table(p, columns=columns) for p in parts])
    table = table.sort_by(ORDER).drop_columns([ORDER])
    blocks = [table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)]
    return ray.data.from_arrow(blocks)


def sft_model_path(cfg: PipelineConfig) -> str:
    """The starting weights: ``sft.model``, else the embedder's model, as a loadable path."""
    from deita_ray.models.registry import resolve_model_path

    return resolve_model_path(cfg.sft.model or cfg.embed.model.path, cfg.cache_dir)


def tokenize_to_parquet(
    ds: Any, model_path: str, cfg: PipelineConfig, out_dir: str, rows_in: int
) -> StageCounts:
    """Tokenise ``ds`` into ``<out_dir>/sft/part-*.parquet``, its rejects into ``rejects/sft``;
    ``rows_in``: the rows of ``ds``, counted from the input."""
    from deita_ray.data.sink import write_with_rejects
    from deita_ray.training.render import map_tokenize

    tokenized = map_tokenize(ds, TokenizeSFT, model_path, cfg.sft, batch_size=256)
    return write_with_rejects(tokenized, NAME, out_dir, rows_in=rows_in)


def run_sft(cfg: PipelineConfig, out_dir: str) -> StageResult:
    """Fine-tune the model on ``<out_dir>/select`` and write ``<out_dir>/sft/final``.

    Assumes Ray is initialised. Counts: rows_in = selected rows kept for training (the
    held-out share is listed in the metrics, not counted), rows_out = rows trained on,
    rejects for rows with no assistant token (after truncation) or unrenderable messages.
    Metrics: per-step loss and lr, tokens/s, steps, examples, the step plan, the split.
    """
    import ray

    from deita_ray.data.sink import parquet_files, stage_dir
    from deita_ray.models.backend import load_tokenizer
    from deita_ray.training.loop import fit, summarize_history
    from deita_ray.training.render import check_template

    t = cfg.sft
    model_path = sft_model_path(cfg)
    check_template(t, model_path, NAME)
    sft_dir = stage_dir(out_dir, NAME)
    selection = read_selection(out_dir)
    train_pos, held_pos = training_order(selection.num_rows, t.train_fraction, t.split_seed)
    ordered = selection.take(pa.array(train_pos, pa.int64()))
    ordered = ordered.append_column(ORDER, pa.array(np.arange(len(train_pos)), pa.int64()))
    # rows in: the rows handed to the tokeniser, counted apart from what it writes
    counts = tokenize_to_parquet(
        ray.data.from_arrow(ordered), model_path, cfg, out_dir, rows_in=ordered.num_rows
    )
    counts.check(NAME)
    if counts.rows_out == 0:
        raise RuntimeError(f"sft: no trainable rows ({counts.to_dict()})")
    train_ds = training_dataset(parquet_files(sft_dir))
    pad_id = load_tokenizer(model_path, t.trust_remote_code).pad_token_id
    state, plan = fit(
        NAME,
        sft_step,
        t,
        model_path,
        train_ds,
        counts.rows_out,
        sft_dir,
        extra_config={"pad_id": int(pad_id), "loss_weighting": t.loss_weighting},
        out_dir=out_dir,
        resume_key=running_stage_hash(out_dir, NAME),
    )
    metrics = {
        "model": model_path,
        "final_model": os.path.join(sft_dir, "final"),
        "loss_weighting": t.loss_weighting,
        "train_fraction": t.train_fraction,
        "selected": selection.num_rows,
        "held_out": len(held_pos),
        "held_out_ids": selection["id"].take(pa.array(held_pos, pa.int64())).to_pylist(),
        "steps": state["step"],
        "optimizer_steps": state.get("optimizer_steps"),
        "examples": state["examples"],
        "tokens": state["tokens"],
        "restarts": state["restarts"],
        "resumed_from_step": state["resumed_from_step"],
        "steps_run": state.get("steps_run"),
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


def _gpu_uses(cfg: PipelineConfig, out_dir: str) -> list:
    """The base model under DeepSpeed on the training GPUs."""
    from deita_ray.training.memory import GpuUse  # noqa: PLC0415

    if not cfg.sft.use_gpu:
        return []
    return [GpuUse("sft.model", cfg.sft.model or cfg.embed.model.path, "sft", cfg.sft)]


STAGE = Stage(
    name=NAME,
    run=run_sft,
    config_keys=("sft",),
    # Where the workers run and where checkpoints are kept, not what they compute.
    hash_ignore=TRAINING_HASH_IGNORE,
    extra_hash=_sft_base,
    reads=("select",),
    input_columns=("id", "rank", "messages"),
    output_columns=("id", ORDER, "input_ids", "labels"),
    trains=True,
    models=_models,
    gpu_uses=_gpu_uses,
    doc="full fine-tuning on the selection (Ray Train + DeepSpeed); the model in sft/final",
)

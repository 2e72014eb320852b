"""How a training run is laid out: optimizer steps, the learning-rate schedule, precision and
the DeepSpeed config. Pure functions of the config and the row count (no torch, no Ray).

See docs/training.md for how these settings compare with the DEITA reference scripts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deita_ray.config import TrainingConfig


@dataclass
class StepPlan:
    """How many optimizer steps a run makes and how its batches are built.

    Attributes:
        rows: training rows.
        num_workers: Ray Train workers; each gets ``rows // num_workers`` rows per epoch.
        micro_batch_size: examples per worker per forward pass.
        grad_accum: micro-batches per worker per optimizer step.
        steps_per_epoch: whole optimizer steps one epoch's micro-batches make.
        total_steps: optimizer steps of the run.
        warmup_steps: steps of linear warmup.
        micro_per_epoch: micro-batches each worker feeds per epoch (``drop``: exactly
            ``steps_per_epoch x grad_accum``; ``carry``: all its whole micro-batches).
        epoch_remainder: ``drop`` or ``carry`` (:class:`~deita_ray.config.TrainingConfig`).
    """

    rows: int
    num_workers: int
    micro_batch_size: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    micro_per_epoch: int = 0
    epoch_remainder: str = "drop"

    def __post_init__(self) -> None:
        if not self.micro_per_epoch:
            self.micro_per_epoch = self.steps_per_epoch * self.grad_accum

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def plan_steps(rows: int, t: TrainingConfig) -> StepPlan:
    """Derive gradient accumulation and step counts from the config and the data size.

    Every worker receives ``rows // num_workers`` rows per epoch (Ray's equal split), cut into
    whole micro-batches. ``steps_per_epoch = micro-batches // grad_accum`` and
    ``total_steps = ceil(epochs x steps_per_epoch)`` (transformers' Trainer counts the same
    way). With ``epoch_remainder: drop`` each epoch feeds exactly its whole steps and skips the
    rest, like ``drop_last``; with ``carry`` the micro-batches of all epochs form one stream, so
    an epoch's leftover micro-batches start the next epoch's first step (transformers 4.36's
    Trainer accumulates across epoch ends this way), and the run stops after ``total_steps``.

    Raises:
        ValueError: the data cannot fill one optimizer step.
    """
    per_step = t.micro_batch_size * t.num_workers
    if t.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {t.global_batch_size} is not a multiple of "
            f"micro_batch_size x num_workers = {per_step}"
        )
    accum = t.global_batch_size // per_step
    micro_per_worker = (rows // t.num_workers) // t.micro_batch_size
    spe = micro_per_worker // accum
    if spe == 0:
        raise ValueError(
            f"{rows} training rows cannot fill one optimizer step of "
            f"global_batch_size={t.global_batch_size}"
        )
    total = max(1, math.ceil(t.epochs * spe))
    if t.max_steps:
        total = min(total, t.max_steps)
    return StepPlan(
        rows=rows,
        num_workers=t.num_workers,
        micro_batch_size=t.micro_batch_size,
        grad_accum=accum,
        steps_per_epoch=spe,
        total_steps=total,
        warmup_steps=int(math.ceil(t.warmup_ratio * total)),
        micro_per_epoch=spe * accum if t.epoch_remainder == "drop" else micro_per_worker,
        epoch_remainder=t.epoch_remainder,
    )


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate before optimizer step ``step`` (0-based).

    Linear warmup from 0 over ``warmup`` steps, then cosine / linear decay to 0 at ``total``
    or constant (the schedules of transformers' ``get_*_schedule_with_warmup``).
    """
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr_scheduler {kind!r}")


def use_bf16(t: TrainingConfig) -> bool:
    """bf16 on GPU under 'auto', fp32 on CPU (bf16 is slower and less exact on CPU)."""
    return t.precision == "bf16" or (t.precision == "auto" and t.use_gpu)


def resolve_threads(t: TrainingConfig) -> int:
    """Torch threads per CPU worker: its CPU reservation (at least 1)."""
    return max(1, int(t.cpus_per_worker))


def deepspeed_config(t: TrainingConfig, plan: StepPlan) -> dict:
    """The DeepSpeed config of a run (ZeRO stage, precision, batch sizes, AdamW)."""
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        # HF export needs the full weights gathered on rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(t)},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.learning_rate,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                # torch's AdamW runs on CPU and GPU alike, with no DeepSpeed op to JIT-build
                # (ZeRO hands it flat fp32 partitions, so the update is a few big kernels).
                "torch_adam": True,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }

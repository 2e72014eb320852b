"""The Ray Train side of training: the worker loop (DeepSpeed engine, resumable checkpoints,
HF export, fault injection for tests) and :func:`fit`, which runs it for one method.

The method is passed in as its step function ``step_fn(engine, batch, device, config) ->
(loss, tokens, metrics)``; nothing here knows SFT from DPO. Everything heavy (torch,
transformers, deepspeed, ray.train) is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from deita_ray.config import TrainingConfig
from deita_ray.models.backend import load_tokenizer
from deita_ray.training.plan import (
    StepPlan,
    deepspeed_config,
    lr_factor,
    plan_steps,
    resolve_threads,
)

TRAINER_STATE = "trainer_state.json"
"""File in every checkpoint: step counters and the metric history so far."""

DS_STATE_DIR = "deepspeed"
"""Sub-folder of a resumable checkpoint that holds DeepSpeed's engine/optimizer/scheduler state."""

DS_TAG = "state"

CHECKPOINT_PREFIX = "checkpoint_step"
"""Name of a resumable checkpoint folder: ``checkpoint_stepNNNNNN`` (the optimizer step)."""

UPLOADED_MARK = ".uploaded-rank"
"""Marker ``<checkpoint>/.uploaded-rank<r>``: worker ``r`` finished uploading its part of that
checkpoint. A checkpoint with the marks of all its ranks and its trainer state is complete."""

FAIL_AT_STEP_ENV = "DEITA_TRAIN_FAIL_AT_STEP"
FAIL_FLAG_ENV = "DEITA_TRAIN_FAIL_FLAG"
"""Fault injection for tests: the last worker exits hard right after optimizer step
``$DEITA_TRAIN_FAIL_AT_STEP``, once (the flag file ``$DEITA_TRAIN_FAIL_FLAG`` records that it
happened). Read on the driver and passed to the workers in the loop config."""

StepFn = Callable[[Any, dict, Any, dict], tuple[Any, int, dict]]
"""``step_fn(engine, batch, device, config) -> (loss, tokens, metrics)`` of a method."""


def _save_hf(engine: Any, tokenizer: Any, out: str, rank: int, zero_stage: int) -> None:
    """Write the model as an HF folder (safetensors + config + tokenizer) on rank 0."""
    model = engine.module
    # ZeRO-3 gathering is collective: every rank calls it, rank 0 gets the full state.
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank == 0:
        if state is None:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        else:
            state = {k: v.detach().cpu() for k, v in state.items()}
        state = {k: v.contiguous() for k, v in state.items()}
        was_gc = getattr(model, "is_gradient_checkpointing", False)
        model.config.use_cache = True
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        model.config.use_cache = not was_gc
        tokenizer.save_pretrained(out)


def _fail_once(config: dict, step: int, rank: int, world: int) -> None:
    """Fault injection (tests): the last worker dies right after step ``fail_at_step``, once."""
    at, flag = config.get("fail_at_step"), config.get("fail_flag")
    if at and flag and step == int(at) and rank == world - 1 and not os.path.exists(flag):
        with open(flag, "w") as f:
            f.write(json.dumps({"step": step, "rank": rank, "time": time.time()}))
        # No grace period: the restarted group finds the last checkpoint on storage even when
        # Ray Train's controller has not registered it yet (newest_complete_checkpoint).
        time.sleep(float(config.get("fail_delay_s", 0.0)))
        os._exit(1)


def newest_complete_checkpoint(root: str) -> tuple[int, str] | None:
    """The newest resumable checkpoint under ``root`` that every worker finished uploading.

    Ray Train hands a restarted worker group the last checkpoint its controller *registered*,
    and the controller registers reports only when it polls the workers (every few seconds):
    a node lost right after a checkpoint was written would restart from an older one, or from
    step 0. The checkpoint folders on storage say what was really saved.

    Returns:
        ``(step, folder)``, or None when no checkpoint under ``root`` is complete.
    """
    import glob

    best: tuple[int, str] | None = None
    for folder in glob.glob(os.path.join(root, f"{CHECKPOINT_PREFIX}*")):
        try:
            with open(os.path.join(folder, TRAINER_STATE)) as f:
                saved = json.load(f)
            step, world = int(saved["step"]), int(saved["world_size"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not written to the end (or by an older version): not resumable
        marks = (os.path.join(folder, f"{UPLOADED_MARK}{r}") for r in range(world))
        if all(os.path.exists(m) for m in marks) and (best is None or step > best[0]):
            best = (step, folder)
    return best


def _saved_step(folder: str) -> int:
    with open(os.path.join(folder, TRAINER_STATE)) as f:
        return int(json.load(f)["step"])


def _resume_folder(handed: str | None, root: str | None, rank: int, world: int) -> str | None:
    """The checkpoint folder a (re)started worker group resumes from: the newer of the one Ray
    Train hands back and the newest complete one on storage; rank 0 decides for all ranks."""
    import torch.distributed as dist

    choice = handed
    if rank == 0 and root:
        found = newest_complete_checkpoint(root)
        if found is not None and (handed is None or found[0] > _saved_step(handed)):
            choice = found[1]
    if world > 1 and dist.is_initialized():
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    return choice


def train_worker(config: dict) -> None:
    """Ray Train loop of one worker; the method's per-batch ``config["step_fn"]`` is passed in.

    Builds the DeepSpeed engine, restores the last checkpoint if Ray Train hands one back after
    a failure, runs the planned optimizer steps over its dataset shard, checkpoints every
    ``checkpoint_every_steps`` (or each epoch), and reports a final HF-format checkpoint.
    """
    t0 = time.time()
    step_fn = config["step_fn"]
    if not config["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import functools

    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not config["use_gpu"]:
        torch.set_num_threads(max(1, int(config["threads"])))
    torch.manual_seed(config["seed"])
    plan = StepPlan(**config["plan"])
    ds_cfg = config["ds_config"]
    bf16 = ds_cfg["bf16"]["enabled"]
    tokenizer = load_tokenizer(config["model_path"], config["trust_remote_code"])

    dschf = None
    if ds_cfg["zero_optimization"]["stage"] == 3:
        # Partition weights while loading (zero.Init) so a big model never sits whole per rank.
        # transformers needs `accelerate` for this; without it the model is loaded whole and
        # partitioned by deepspeed.initialize (fine for small models).
        try:
            from transformers.integrations import HfDeepSpeedConfig

            dschf = HfDeepSpeedConfig(ds_cfg)  # must stay alive during from_pretrained
        except Exception:  # noqa: BLE001 - accelerate missing: plain loading works too
            dschf = None
    model = AutoModelForCausalLM.from_pretrained(
        config["model_path"],
        dtype=torch.bfloat16 if bf16 else torch.float32,
        trust_remote_code=config["trust_remote_code"],
    )
    if config["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    del dschf
    sched = functools.partial(
        _make_scheduler,
        total=plan.total_steps,
        warmup=plan.warmup_steps,
        kind=config["lr_scheduler"],
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_cfg,
        lr_scheduler=sched,
        dist_init_required=False,
    )
    device = engine.device
    timings = {"engine_ready_s": time.time() - t0}

    state = {
        "step": 0,
        "history": [],
        "restarts": 0,
        "resumed_from_step": None,
        "examples": 0,
        "tokens": 0,
        "timings": {},
    }
    ckpt = ray.train.get_checkpoint()
    root = config.get("checkpoint_root")
    with contextlib.ExitStack() as stack:
        handed = stack.enter_context(ckpt.as_directory()) if ckpt is not None else None
        resume = _resume_folder(handed, root, rank, world)
        if resume is not None:
            engine.load_checkpoint(
                os.path.join(resume, DS_STATE_DIR),
                tag=DS_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            with open(os.path.join(resume, TRAINER_STATE)) as f:
                state.update(json.load(f))
            state["restarts"] += 1
            state["resumed_from_step"] = state["step"]

    def checkpoint(final: bool, metrics: dict) -> None:
        tmp = tempfile.mkdtemp(prefix="deita_ckpt_")
        name = "final" if final else f"{CHECKPOINT_PREFIX}{state['step']:06d}"
        # A restarted group re-writes the folders of the steps it redoes: this rank's mark of
        # the earlier attempt goes first (report() starts with a barrier of all ranks), so a
        # half-rewritten checkpoint is never taken for a complete one.
        mark = os.path.join(root, name, f"{UPLOADED_MARK}{rank}") if root else None
        if mark and os.path.exists(mark):
            os.remove(mark)
        try:
            _save_hf(engine, tokenizer, tmp, rank, ds_cfg["zero_optimization"]["stage"])
            if not final:
                engine.save_checkpoint(os.path.join(tmp, DS_STATE_DIR), tag=DS_TAG)
            if rank == 0:
                with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                    json.dump({**state, "final": final, "world_size": world}, f)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if mark and not final and os.path.isdir(os.path.dirname(mark)):
            # report() returns once this rank's files are on storage.
            with open(mark, "w"):
                pass

    shard = ray.train.get_dataset_shard("train")
    every = config["checkpoint_every_steps"]
    acc = {"loss": 0.0, "tokens": 0, "examples": 0, "extra": {}}
    t_step = time.perf_counter()
    # Micro-batches fed so far, counted over one stream of plan.micro_per_epoch per epoch: an
    # optimizer step closes every grad_accum of them (with epoch_remainder 'carry' a step may
    # span an epoch's end). Steps and checkpoints fall on these boundaries, so a restart
    # resumes exactly at one.
    fed = state["step"] * plan.grad_accum
    while state["step"] < plan.total_steps:
        epoch, skip = divmod(fed, plan.micro_per_epoch)
        batches = shard.iter_batches(
            batch_size=plan.micro_batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=config["shuffle_buffer"] or None,
            local_shuffle_seed=config["seed"] + epoch,
        )
        for i, batch in enumerate(batches):
            # Every worker walks its whole shard so that all splits finish the epoch together.
            if i < skip or i >= plan.micro_per_epoch or state["step"] >= plan.total_steps:
                continue
            loss, n_tokens, extra = step_fn(engine, batch, device, config)
            engine.backward(loss)
            lr = float(scheduler.get_last_lr()[0]) if scheduler else None  # lr of this step
            engine.step()
            fed += 1
            acc["loss"] += float(loss.detach())
            acc["tokens"] += n_tokens
            acc["examples"] += len(next(iter(batch.values())))
            for k, v in extra.items():
                acc["extra"][k] = acc["extra"].get(k, 0.0) + v
            if fed % plan.grad_accum:
                continue
            # One optimizer step done: aggregate the step's numbers over workers.
            keys = sorted(acc["extra"])
            vec = torch.tensor(
                [acc["loss"], acc["tokens"], acc["examples"], *[acc["extra"][k] for k in keys]],
                dtype=torch.float64,
            )
            if dist.is_initialized():
                vec = vec.to(device) if config["use_gpu"] else vec
                dist.all_reduce(vec)
                vec = vec.cpu()
            dt = time.perf_counter() - t_step
            n_micro = plan.grad_accum * world
            state["step"] += 1
            state["tokens"] += int(vec[1])
            state["examples"] += int(vec[2])
            rec = {
                "step": state["step"],
                "loss": float(vec[0]) / n_micro,
                "lr": lr,
                "tokens": int(vec[1]),
                "seconds": dt,
                "tokens_per_s": float(vec[1]) / dt,
            }
            rec.update({k: float(vec[3 + j]) / n_micro for j, k in enumerate(keys)})
            state["history"].append(rec)
            acc = {"loss": 0.0, "tokens": 0, "examples": 0, "extra": {}}
            due = (every and state["step"] % every == 0) or (
                not every and state["step"] % plan.steps_per_epoch == 0
            )
            if due and state["step"] < plan.total_steps:
                checkpoint(False, {"step": state["step"], "loss": rec["loss"]})
            _fail_once(config, state["step"], rank, world)
            t_step = time.perf_counter()
    timings["train_loop_s"] = time.time() - t0 - timings["engine_ready_s"]
    state["timings"] = timings  # of the last (re)start of the worker group
    state["optimizer_steps"] = int(engine.global_steps)
    checkpoint(
        True, {"step": state["step"], "optimizer_steps": state["optimizer_steps"], "final": True}
    )


def _make_scheduler(optimizer: Any, total: int, warmup: int, kind: str) -> Any:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, kind))


# ---------------------------------------------------------------------------------------------
# Driver side


def fault_injection_from_env() -> dict:
    """The test-only fault-injection settings from the driver's environment."""
    at = os.environ.get(FAIL_AT_STEP_ENV)
    return {"fail_at_step": int(at) if at else None, "fail_flag": os.environ.get(FAIL_FLAG_ENV)}


def fit(
    name: str,
    step_fn: StepFn,
    t: TrainingConfig,
    model_path: str,
    train_ds: Any,
    rows: int,
    stage_out: str,
    extra_config: dict | None = None,
) -> tuple[dict, StepPlan]:
    """Run one training job under Ray Train and export its final model.

    Args:
        name: the stage's name (for messages).
        step_fn: the method's ``step_fn(engine, batch, device, config) -> (loss, tokens,
            metrics)`` run on each micro-batch by the workers (the library never imports a
            method).
        t: the stage's training config.
        model_path: local HF folder of the starting weights.
        train_ds: Ray Dataset of tokenised examples (materialised).
        rows: its row count.
        stage_out: ``<out_dir>/<stage>``; checkpoints go to ``<stage_out>/checkpoints`` and the
            final model to ``<stage_out>/final``.
        extra_config: more keys for the worker config (e.g. DPO's beta).

    Returns:
        (the final trainer state: history, step counters, ...; the step plan).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    plan = plan_steps(rows, t)
    stage_out = os.path.abspath(stage_out)
    config = {
        "step_fn": step_fn,
        "model_path": model_path,
        "plan": plan.to_dict(),
        "ds_config": deepspeed_config(t, plan),
        "lr_scheduler": t.lr_scheduler,
        "gradient_checkpointing": t.gradient_checkpointing,
        "use_gpu": t.use_gpu,
        "threads": resolve_threads(t),
        "seed": t.seed,
        "trust_remote_code": t.trust_remote_code,
        "checkpoint_every_steps": t.checkpoint_every_steps,
        # Where Ray Train stores this run's checkpoints (RunConfig below): a restarted worker
        # group looks there for checkpoints its controller had not registered yet.
        "checkpoint_root": os.path.join(stage_out, "checkpoints"),
        "shuffle_buffer": 4 * t.micro_batch_size,
        **fault_injection_from_env(),
        **(extra_config or {}),
    }
    # Checkpoints under this folder belong to this run only (a restarted worker group resumes
    # from the newest complete one there).
    shutil.rmtree(config["checkpoint_root"], ignore_errors=True)
    resources = {"CPU": t.cpus_per_worker, **t.custom_resources}
    if t.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=stage_out,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train_ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint")
    final = os.path.join(stage_out, "final")
    shutil.rmtree(final, ignore_errors=True)
    import pyarrow.fs

    if isinstance(result.checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        shutil.move(result.checkpoint.path, final)  # no second copy of a big model
    else:
        result.checkpoint.to_directory(final)
    with open(os.path.join(final, TRAINER_STATE)) as f:
        state = json.load(f)
    return state, plan


def summarize_history(history: list[dict], keys: tuple[str, ...] = ()) -> dict:
    """Report metrics from the per-step history (first/last loss, mean tokens/s, ...)."""
    if not history:
        return {}
    out = {
        "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"],
        "tokens_per_s": float(np.mean([h["tokens_per_s"] for h in history[1:] or history])),
        "loss": [h["loss"] for h in history],
        "lr": [h["lr"] for h in history],
    }
    for k in keys:
        out[k] = [h.get(k) for h in history]
    return out

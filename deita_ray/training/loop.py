"""The training loop: the DeepSpeed engine (:func:`build_engine`, usable without Ray), the Ray
Train worker loop (resumable checkpoints, HF export, fault injection for tests) and
:func:`fit`, which runs it for one method.

The method is passed in as its step function ``step_fn(engine, batch, device, config) ->
(loss, tokens, metrics)``; nothing here knows SFT from DPO. Everything heavy (torch,
transformers, deepspeed, ray.train) is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from deita_ray.config import TrainingConfig
from deita_ray.models.backend import load_tokenizer
from deita_ray.progress import current_counter
from deita_ray.templates import CHAT_TEMPLATES
from deita_ray.training.plan import (
    StepPlan,
    deepspeed_config,
    lr_factor,
    plan_steps,
    resolve_threads,
)

log = logging.getLogger("deita_ray")

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

RUN_KEY = "deita_run.json"
"""File in a checkpoint root: what the checkpoints there were trained with (the stage's config
hash, the output folder, the step plan). A run with the same key resumes from them."""

FAIL_AT_STEP_ENV = "DEITA_TRAIN_FAIL_AT_STEP"
FAIL_FLAG_ENV = "DEITA_TRAIN_FAIL_FLAG"
"""Fault injection for tests: the last worker exits hard right after optimizer step
``$DEITA_TRAIN_FAIL_AT_STEP``, once (the flag file ``$DEITA_TRAIN_FAIL_FLAG`` records that it
happened). Read on the driver and passed to the workers in the loop config."""

STEP_DELAY_ENV = "DEITA_TRAIN_STEP_DELAY_S"
"""Fault injection for tests: every worker sleeps this long after each optimizer step, so that a
test can kill the driver between two checkpoints of a tiny model's run."""

ACCELERATOR_ENV = "DS_ACCELERATOR"
"""DeepSpeed's accelerator override; each training worker sets it (:func:`select_accelerator`)."""

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


# ---------------------------------------------------------------------------------------------
# The accelerator and the engine (no Ray needed)


def accelerator_for(use_gpu: bool) -> str:
    """DeepSpeed's accelerator name for a training config's ``use_gpu``."""
    return "cuda" if use_gpu else "cpu"


def select_accelerator(use_gpu: bool) -> str:
    """Make this process's DeepSpeed use the accelerator its own ``use_gpu`` asks for.

    Called in each training worker (and by :func:`build_engine`), never decided on the driver:
    on KubeRay the driver runs on a CPU-only head while the workers hold the GPUs. Overrides a
    ``DS_ACCELERATOR`` inherited from the job's environment, and re-points DeepSpeed if it was
    imported with another accelerator already.

    Raises:
        RuntimeError: ``use_gpu`` is true but this process sees no CUDA GPU.
    """
    import torch

    name = accelerator_for(use_gpu)
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError(
            "training config says use_gpu: true, but this training worker sees no CUDA GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}, torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'})"
        )
    os.environ[ACCELERATOR_ENV] = name
    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import get_accelerator, set_accelerator

        if get_accelerator().device_name() != name:
            if use_gpu:
                from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accel
            else:
                from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accel
            set_accelerator(Accel())
    return name


def worker_runtime_env(use_gpu: bool) -> dict:
    """The runtime env of a trainer's workers: their DeepSpeed accelerator, from ``use_gpu``.

    Merged by Ray over the job's runtime env (:func:`deita_ray.runtime.worker_env`), so a job
    whose driver sees no GPU still gives GPU workers ``DS_ACCELERATOR=cuda``.
    """
    return {"env_vars": {ACCELERATOR_ENV: accelerator_for(use_gpu)}}


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A torch.distributed group of one process (nccl on CUDA, else gloo), for building the
    engine outside Ray Train (benchmarks/gpu_check.py, tests). Does nothing when a group exists.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0"}
    env.update({"WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_engine(config: dict) -> tuple[Any, Any, Any]:
    """The DeepSpeed engine of a train loop config (:func:`train_loop_config`).

    Chooses the accelerator from ``config["use_gpu"]`` (:func:`select_accelerator`), sets the
    torch threads on CPU and the seed, loads the model in the training dtype (partitioned while
    loading under ZeRO-3 when ``accelerate`` is installed), turns on gradient checkpointing, and
    calls ``deepspeed.initialize`` with the config's DeepSpeed settings and LR schedule.

    Needs no Ray: torch.distributed must be initialised (Ray Train does it in its workers,
    :func:`single_process_group` elsewhere).

    Returns:
        (engine, LR scheduler, tokenizer).
    """
    import functools

    select_accelerator(config["use_gpu"])
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    if not config["use_gpu"]:
        torch.set_num_threads(max(1, int(config["threads"])))
    torch.manual_seed(config["seed"])
    plan = StepPlan(**config["plan"])
    ds_cfg = config["ds_config"]
    bf16 = ds_cfg["bf16"]["enabled"]
    tokenizer = load_tokenizer(config["model_path"], config["trust_remote_code"])
    if config.get("chat_template"):
        # The saved model ships the rendering it was trained on, not its base model's template.
        tokenizer.chat_template = config["chat_template"]

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
    return engine, scheduler, tokenizer


# ---------------------------------------------------------------------------------------------
# Resume points


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
    if handed is not None and not os.path.exists(os.path.join(handed, TRAINER_STATE)):
        choice = None  # deleted since Ray Train registered it (kept checkpoints rotate)
    if rank == 0 and root:
        found = newest_complete_checkpoint(root)
        if found is not None and (choice is None or found[0] > _saved_step(choice)):
            choice = found[1]
    if world > 1 and dist.is_initialized():
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    return choice


def _write_json_atomic(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The Ray Train worker


def train_worker(config: dict) -> None:
    """Ray Train loop of one worker; the method's per-batch ``config["step_fn"]`` is passed in.

    Builds the DeepSpeed engine (:func:`build_engine`, on the accelerator of the worker's own
    ``use_gpu``), resumes from the newest complete checkpoint (the one Ray Train hands back
    after a failure, or one an earlier run of the same settings left on storage), runs the
    planned optimizer steps over its dataset shard, checkpoints every ``checkpoint_every_steps``
    (or each epoch), and reports a final HF-format checkpoint.

    Checkpoints are written in place under ``config["checkpoint_root"]`` (Ray Train's run
    folder, on the job's storage) and reported without a copy: no rank stages them in /tmp.
    """
    t0 = time.time()
    step_fn = config["step_fn"]
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import CheckpointUploadMode

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    engine, scheduler, tokenizer = build_engine(config)
    plan = StepPlan(**config["plan"])
    zero_stage = config["ds_config"]["zero_optimization"]["stage"]
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
    root = config["checkpoint_root"]
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
    start_step = state["step"]

    def checkpoint(final: bool, metrics: dict) -> None:
        name = "final" if final else f"{CHECKPOINT_PREFIX}{state['step']:06d}"
        folder = os.path.join(root, name)
        # A restarted group re-writes the folders of the steps it redoes: this rank's mark of
        # the earlier attempt goes first (report() starts with a barrier of all ranks), so a
        # half-rewritten checkpoint is never taken for a complete one.
        mark = os.path.join(folder, f"{UPLOADED_MARK}{rank}")
        if os.path.exists(mark):
            os.remove(mark)
        os.makedirs(folder, exist_ok=True)
        if final:  # the model to keep: an HF folder (ZeRO-3 gathers it on every rank)
            _save_hf(engine, tokenizer, folder, rank, zero_stage)
        else:  # a resume point: DeepSpeed's state only, no HF copy
            engine.save_checkpoint(os.path.join(folder, DS_STATE_DIR), tag=DS_TAG)
        if rank == 0:
            state_now = {**state, "final": final, "world_size": world}
            _write_json_atomic(os.path.join(folder, TRAINER_STATE), state_now)
        # Written where Ray Train keeps the run's checkpoints: reported in place, no upload.
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
        )
        if not final and os.path.isdir(folder):
            # report() returns once every rank has reached it: this rank's files are written.
            with open(mark, "w"):
                pass

    shard = ray.train.get_dataset_shard("train")
    every = config["checkpoint_every_steps"]
    delay = float(config.get("step_delay_s") or 0.0)
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
            if rank == 0 and config.get("progress") is not None:  # the driver's step lines
                config["progress"].step.remote(rec, plan.total_steps)
            acc = {"loss": 0.0, "tokens": 0, "examples": 0, "extra": {}}
            if delay:
                time.sleep(delay)
            due = (every and state["step"] % every == 0) or (
                not every and state["step"] % plan.steps_per_epoch == 0
            )
            if due and state["step"] < plan.total_steps:
                checkpoint(False, {"step": state["step"], "loss": rec["loss"]})
            _fail_once(config, state["step"], rank, world)
            t_step = time.perf_counter()
    timings["train_loop_s"] = time.time() - t0 - timings["engine_ready_s"]
    state["timings"] = timings  # of the last (re)start of the worker group
    state["steps_run"] = state["step"] - start_step  # by the last (re)started group
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
    delay = os.environ.get(STEP_DELAY_ENV)
    return {
        "fail_at_step": int(at) if at else None,
        "fail_flag": os.environ.get(FAIL_FLAG_ENV),
        "step_delay_s": float(delay) if delay else 0.0,
    }


def checkpoint_root(t: TrainingConfig, out_dir: str, stage: str) -> str:
    """Where a stage's resumable checkpoints go: ``<t.checkpoint_dir>/<stage>``, else
    ``<out_dir>/checkpoints/<stage>`` (beside the stage's folder, which the pipeline clears
    before the stage runs; this one it leaves alone)."""
    base = t.checkpoint_dir or os.path.join(out_dir, "checkpoints")
    return os.path.join(os.path.abspath(os.path.expanduser(base)), stage)


def prepare_checkpoint_root(root: str, key: dict | None) -> tuple[int, str] | None:
    """Keep the checkpoints under ``root`` when an earlier run wrote them with the same ``key``
    (the stage's config hash, output folder and step plan); otherwise delete them and record
    ``key``. ``key`` None (a stage run outside the pipeline) always starts afresh.

    Returns:
        the newest complete checkpoint kept, ``(step, folder)``, or None.

    Raises:
        RuntimeError: the folder holds the checkpoints of another output folder (two jobs
            given one ``checkpoint_dir``): they are not deleted.
    """
    path = os.path.join(root, RUN_KEY)
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if key is not None and old == key:
        return newest_complete_checkpoint(root)
    if (
        key is not None
        and isinstance(old, dict)
        and old.get("output_dir")
        and old["output_dir"] != key.get("output_dir")
    ):
        raise RuntimeError(
            f"{root} holds the checkpoints of the job writing to {old['output_dir']}, not of "
            f"this one ({key.get('output_dir')}): give each job its own checkpoint_dir"
        )
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    if key is not None:
        _write_json_atomic(path, key)
    return None


def train_loop_config(
    step_fn: StepFn,
    t: TrainingConfig,
    model_path: str,
    plan: StepPlan,
    root: str,
    extra_config: dict | None = None,
) -> dict:
    """The config every training worker receives (and :func:`build_engine` reads)."""
    return {
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
        # None for template 'chat_template': the model keeps the template it was trained with.
        "chat_template": CHAT_TEMPLATES.get(t.template),
        "checkpoint_every_steps": t.checkpoint_every_steps,
        # Where Ray Train stores this run's checkpoints (RunConfig below): the workers write
        # them there, and a restarted group looks there for ones its controller had not
        # registered yet.
        "checkpoint_root": root,
        "shuffle_buffer": 4 * t.micro_batch_size,
        # The running stage's progress counter (deita_ray/progress.py), or None.
        "progress": current_counter(),
        **fault_injection_from_env(),
        **(extra_config or {}),
    }


def build_trainer(
    step_fn: StepFn,
    t: TrainingConfig,
    model_path: str,
    train_ds: Any,
    plan: StepPlan,
    root: str,
    extra_config: dict | None = None,
) -> Any:
    """The ``TorchTrainer`` of one training run (not started): workers with the resources of
    ``t``, their accelerator in their own runtime env (:func:`worker_runtime_env`), checkpoints
    under ``root`` (Ray Train's run folder: ``RunConfig(storage_path=dirname(root),
    name=basename(root))``), the newest ``t.keep_checkpoints`` kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": t.cpus_per_worker, **t.custom_resources}
    if t.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_worker,
        train_loop_config=train_loop_config(step_fn, t, model_path, plan, root, extra_config),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=os.path.basename(root),
            storage_path=os.path.dirname(root),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env=worker_runtime_env(t.use_gpu),
        ),
        datasets={"train": train_ds},
    )


def fit(
    name: str,
    step_fn: StepFn,
    t: TrainingConfig,
    model_path: str,
    train_ds: Any,
    rows: int,
    stage_out: str,
    extra_config: dict | None = None,
    *,
    out_dir: str | None = None,
    resume_key: str | None = None,
) -> tuple[dict, StepPlan]:
    """Run one training job under Ray Train and export its final model.

    Args:
        name: the stage's name (for messages and the checkpoint folder).
        step_fn: the method's ``step_fn(engine, batch, device, config) -> (loss, tokens,
            metrics)`` run on each micro-batch by the workers (the library never imports a
            method).
        t: the stage's training config.
        model_path: local HF folder of the starting weights.
        train_ds: Ray Dataset of tokenised examples (materialised).
        rows: its row count.
        stage_out: ``<out_dir>/<stage>``; the final model goes to ``<stage_out>/final``.
        extra_config: more keys for the worker config (e.g. DPO's beta).
        out_dir: the job's output folder (default: the parent of ``stage_out``); checkpoints go
            to :func:`checkpoint_root`.
        resume_key: the stage's config hash in this run (the pipeline's manifest,
            :func:`deita_ray.stages.base.running_stage_hash`): checkpoints an earlier run left
            with the same hash, output folder and step plan are resumed from; any others are
            deleted. None: start afresh.

    Returns:
        (the final trainer state: history, step counters, ...; the step plan).
    """
    plan = plan_steps(rows, t)
    stage_out = os.path.abspath(stage_out)
    out_dir = os.path.abspath(out_dir) if out_dir else os.path.dirname(stage_out)
    root = checkpoint_root(t, out_dir, name)
    key = None
    if resume_key is not None:
        key = {
            "stage": name,
            "stage_hash": resume_key,
            "output_dir": out_dir,
            "model_path": model_path,
            "plan": plan.to_dict(),
        }
    kept = prepare_checkpoint_root(root, key)
    if kept is not None:
        log.info("%s: resuming training from the checkpoint of step %d (%s)", name, *kept)
    trainer = build_trainer(step_fn, t, model_path, train_ds, plan, root, extra_config)
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
    for mark in os.listdir(final):
        if mark.startswith(UPLOADED_MARK):
            os.remove(os.path.join(final, mark))
    with open(os.path.join(final, TRAINER_STATE)) as f:
        state = json.load(f)
    # The final model is written: no resume point (nor its optimizer state) is kept.
    shutil.rmtree(root, ignore_errors=True)
    if not t.checkpoint_dir:
        with contextlib.suppress(OSError):  # <output.dir>/checkpoints, when nothing else is left
            os.rmdir(os.path.dirname(root))
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

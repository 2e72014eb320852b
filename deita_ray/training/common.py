"""What SFT and DPO share: rendering with label masks, collation, the step plan, the DeepSpeed
config, and the Ray Train worker loop (DeepSpeed engine, resumable checkpoints, HF export).

Masking contract: a conversation is rendered as a list of text segments, each flagged as an
assistant *target* or not (vicuna_v1.1 via :func:`deita_ray.templates.vicuna_segments`, or the
tokenizer's own chat template via :func:`chat_template_segments`). Segments are tokenised one by
one and concatenated, so the mask is exact by construction: the labels that are not
``IGNORE_INDEX`` are the tokens of the assistant texts plus their end marker, nothing else.

Everything heavy (torch, transformers, deepspeed) is imported inside functions.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from deita_ray.config import TrainingConfig
from deita_ray.data.rejects import DETAIL, RAW, REASON, to_raw

IGNORE_INDEX = -100
"""Label of every token that carries no loss (prompt, system, template, padding)."""

TRAINER_STATE = "trainer_state.json"
"""File in every checkpoint: step counters and the metric history so far."""

DS_STATE_DIR = "deepspeed"
"""Sub-folder of a resumable checkpoint that holds DeepSpeed's engine/optimizer/scheduler state."""

DS_TAG = "state"

FAIL_AT_STEP_ENV = "DEITA_TRAIN_FAIL_AT_STEP"
FAIL_FLAG_ENV = "DEITA_TRAIN_FAIL_FLAG"
"""Fault injection for tests: the last worker exits hard right after optimizer step
``$DEITA_TRAIN_FAIL_AT_STEP``, once (the flag file ``$DEITA_TRAIN_FAIL_FLAG`` records that it
happened). Read on the driver and passed to the workers in the loop config."""


class TemplateError(ValueError):
    """A conversation cannot be rendered with exact masks (the reason goes to rejects)."""


# ---------------------------------------------------------------------------------------------
# Rendering and masking


def chat_template_segments(messages: list[dict], tokenizer: Any) -> list[tuple[str, bool]]:
    """Split the tokenizer's chat-template rendering into (text, is_target) segments.

    The text of assistant message ``i`` is what rendering ``messages[: i + 1]`` adds to the
    rendering of ``messages[:i]`` with the generation prompt; it holds the content and the
    template's end marker. Whatever follows the tokenizer's EOS token inside it (e.g. a newline
    after ``<|im_end|>``) is not a target; without an EOS there, trailing whitespace after the
    end marker is not a target either.

    Raises:
        TemplateError: the template is not incremental (a prefix of the conversation does not
            render to a prefix of the full text), so exact masks are impossible.
    """

    def render(msgs: list[dict], gen: bool) -> str:
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    eos = tokenizer.eos_token or ""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = render(msgs[:i], True)
        after = render(msgs[: i + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise TemplateError("chat template is not incremental; masks would be inexact")
        target, tail = after[len(before) :], ""
        content = m["content"]
        cut = target.rfind(eos, len(content)) if eos else -1
        if cut >= 0:
            target, tail = target[: cut + len(eos)], target[cut + len(eos) :]
        elif target.startswith(content):
            # No EOS in the template: the end marker is what follows the content, minus
            # trailing whitespace (layout between messages, not something to predict).
            marker = target[len(content) :]
            target, tail = content + marker.rstrip(), marker[len(marker.rstrip()) :]
        segments += [(before[len(done) :], False), (target, True), (tail, False)]
        done = after
    full = render(msgs, False)
    if not full.startswith(done):
        raise TemplateError("chat template is not incremental; masks would be inexact")
    segments.append((full[len(done) :], False))
    return [(t, tgt) for t, tgt in segments if t]


def render_segments(
    messages: list[dict], template: str, tokenizer: Any = None
) -> list[tuple[str, bool]]:
    """Render a conversation as (text, is_target) segments with the configured template."""
    if template == "vicuna_v1.1":
        from deita_ray.templates import vicuna_segments

        return list(vicuna_segments(messages))
    if template == "chat_template":
        return chat_template_segments(messages, tokenizer)
    raise ValueError(f"unknown template {template!r}")


def only_last_target(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Keep the target flag only on the last assistant segment (DPO: the response)."""
    last = max((i for i, (_, t) in enumerate(segments) if t), default=-1)
    return [(text, tgt and i == last) for i, (text, tgt) in enumerate(segments)]


def special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts in front of a plain encoding (usually ``[bos]``, or nothing)."""
    with_sp = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_sp) - len(without)
    if n > 0 and with_sp[n:] == without:
        return list(with_sp[:n])
    return []


@dataclass
class Encoded:
    """One tokenised example."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def encode_segments(
    segments_batch: list[list[tuple[str, bool]]], tokenizer: Any, max_length: int
) -> list[Encoded]:
    """Tokenise rendered conversations segment by segment (one tokenizer call for the batch).

    The special prefix (BOS) is prepended, unmasked of loss, unless the rendering already starts
    with the BOS text. Sequences are cut to ``max_length`` tokens, keeping the beginning.
    """
    prefix = special_prefix(tokenizer)
    bos_text = tokenizer.bos_token or None
    flat = [text for segs in segments_batch for text, _ in segs]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, k = [], 0
    for segs in segments_batch:
        starts_with_bos = bool(bos_text) and bool(segs) and segs[0][0].startswith(bos_text)
        input_ids = [] if starts_with_bos else list(prefix)
        labels = [IGNORE_INDEX] * len(input_ids)
        for _, target in segs:
            piece = ids[k]
            k += 1
            input_ids += piece
            labels += piece if target else [IGNORE_INDEX] * len(piece)
        truncated = len(input_ids) > max_length
        out.append(Encoded(input_ids[:max_length], labels[:max_length], truncated))
    return out


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_template(t: Any, model_path: str, stage: str) -> None:
    """Fail at start (not row by row) when ``template: chat_template`` has no template."""
    if (
        t.template == "chat_template"
        and not load_tokenizer(model_path, t.trust_remote_code).chat_template
    ):
        raise ValueError(
            f"{stage}.template: 'chat_template' but the tokenizer of {model_path} has none "
            "(use vicuna_v1.1)"
        )


def row_messages(value: Any) -> list[dict]:
    """Normalise a ``messages`` cell (list of {role, content} or a JSON string) to a list."""
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list):
        raise ValueError(f"messages must be a list, got {type(value).__name__}")
    for m in value:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("content"), str)
            or m.get("role") not in ("system", "user", "assistant")
        ):
            raise ValueError(f"bad message {str(m)[:200]}")
    return value


class TokenizingStage:
    """Base of the tokenising Ray Data stages (SFT conversations, DPO pairs): the tokenizer,
    the rendering template and the token limit, from a training section's options."""

    def __init__(
        self, model_path: str, template: str, max_length: int, trust_remote_code: bool = False
    ):
        self.template = template
        self.max_length = max_length
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)


def map_tokenize(
    ds: Any, stage: type[TokenizingStage], model_path: str, t: TrainingConfig, batch_size: int
) -> Any:
    """``ds.map_batches(stage)`` on one single-CPU actor, built with ``t``'s template options."""
    import ray

    return ds.map_batches(
        stage,
        fn_constructor_kwargs={
            "model_path": model_path,
            "template": t.template,
            "max_length": t.max_length,
            "trust_remote_code": t.trust_remote_code,
        },
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    )


class TokenizeSFT(TokenizingStage):
    """Ray Data stage: render and tokenise selected conversations with exact label masks.

    Input columns: ``id``, ``messages`` (list<struct<role, content>>), anything else (kept only
    in the ``_raw`` text of rejects).
    Output columns: ``id``, ``input_ids`` (list<int32>), ``labels`` (list<int32>, -100 where
    there is no loss), ``num_tokens``, ``num_targets``, ``truncated`` and the reject mark columns
    (reasons: ``bad_messages``, ``template_error``, ``no_assistant_message``,
    ``no_target_tokens`` when truncation left no assistant token).
    """

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        segs_ok, idx_ok = [], []
        reasons: list[str | None] = [None] * len(rows)
        details: list[str | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            try:
                segs = render_segments(
                    row_messages(row.get("messages")), self.template, self.tokenizer
                )
            except TemplateError as e:
                reasons[i], details[i] = "template_error", str(e)[:500]
                continue
            except (ValueError, TypeError, KeyError) as e:
                reasons[i], details[i] = "bad_messages", f"{type(e).__name__}: {e}"[:500]
                continue
            if not any(t for _, t in segs):
                reasons[i], details[i] = "no_assistant_message", "nothing to train on"
                continue
            segs_ok.append(segs)
            idx_ok.append(i)
        encoded: list[Encoded | None] = [None] * len(rows)
        for i, enc in zip(
            idx_ok, encode_segments(segs_ok, self.tokenizer, self.max_length), strict=True
        ):
            if enc.num_targets == 0:
                reasons[i] = "no_target_tokens"
                details[i] = f"no assistant token left within max_length={self.max_length}"
            else:
                encoded[i] = enc
        return pa.table(
            {
                "id": pa.array([str(r.get("id")) for r in rows], pa.string()),
                "input_ids": pa.array(
                    [e.input_ids if e else [] for e in encoded], pa.list_(pa.int32())
                ),
                "labels": pa.array([e.labels if e else [] for e in encoded], pa.list_(pa.int32())),
                "num_tokens": pa.array([len(e.input_ids) if e else 0 for e in encoded], pa.int32()),
                "num_targets": pa.array([e.num_targets if e else 0 for e in encoded], pa.int32()),
                "truncated": pa.array([bool(e and e.truncated) for e in encoded], pa.bool_()),
                REASON: pa.array(reasons, pa.string()),
                DETAIL: pa.array(details, pa.string()),
                RAW: pa.array(
                    [to_raw(r) if reasons[i] else None for i, r in enumerate(rows)],
                    pa.large_string(),
                ),
            }
        )


def pad_batch(sequences: list[Any], pad: int) -> np.ndarray:
    """Right-pad integer sequences to the longest one (int64 matrix)."""
    n = max((len(s) for s in sequences), default=0)
    out = np.full((len(sequences), n), pad, dtype=np.int64)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
    return out


def collate(input_ids: list[Any], labels: list[Any], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded ``input_ids``, ``labels`` (-100 on padding) and ``attention_mask``."""
    ids = pad_batch(input_ids, pad_id)
    lab = pad_batch(labels, IGNORE_INDEX)
    mask = pad_batch([np.ones(len(s), dtype=np.int64) for s in input_ids], 0)
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------
# Plan, schedule, DeepSpeed config


@dataclass
class StepPlan:
    """How many optimizer steps a run makes and how its batches are built."""

    rows: int
    num_workers: int
    micro_batch_size: int
    grad_accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def plan_steps(rows: int, t: TrainingConfig) -> StepPlan:
    """Derive gradient accumulation and step counts from the config and the data size.

    Every worker receives ``rows // num_workers`` rows per epoch (Ray's equal split) and uses
    whole optimizer steps of ``global_batch_size`` examples; the remainder of an epoch is
    skipped, like ``drop_last``.

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
    micro_per_epoch = (rows // t.num_workers) // t.micro_batch_size
    spe = micro_per_epoch // accum
    if spe == 0:
        raise ValueError(
            f"{rows} training rows cannot fill one optimizer step of "
            f"global_batch_size={t.global_batch_size}"
        )
    total = max(1, math.ceil(t.epochs * spe))
    if t.max_steps:
        total = min(total, t.max_steps)
    return StepPlan(
        rows,
        t.num_workers,
        t.micro_batch_size,
        accum,
        spe,
        total,
        int(math.ceil(t.warmup_ratio * total)),
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


# ---------------------------------------------------------------------------------------------
# Log-probabilities (shared by SFT metrics, the DPO reference pass and the DPO loss)


def sequence_logps(logits: Any, labels: Any) -> Any:
    """Sum of log p(label) over the tokens whose label is not -100, per sequence (fp32)."""
    import torch

    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


# ---------------------------------------------------------------------------------------------
# The Ray Train worker loop


def _to_torch(batch: dict[str, np.ndarray], device: Any) -> dict[str, Any]:
    import torch

    return {k: torch.as_tensor(v).to(device) for k, v in batch.items()}


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
        # Ray Train's controller collects reported checkpoints on its health-check poll
        # (every 2 s by default); let it see the last one, as it would in a real failure
        # that strikes some time after a checkpoint.
        time.sleep(float(config.get("fail_delay_s", 5.0)))
        os._exit(1)


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
    if ckpt is not None:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(
                os.path.join(d, DS_STATE_DIR),
                tag=DS_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            with open(os.path.join(d, TRAINER_STATE)) as f:
                state.update(json.load(f))
        state["restarts"] += 1
        state["resumed_from_step"] = state["step"]

    def checkpoint(final: bool, metrics: dict) -> None:
        tmp = tempfile.mkdtemp(prefix="deita_ckpt_")
        try:
            _save_hf(engine, tokenizer, tmp, rank, ds_cfg["zero_optimization"]["stage"])
            if not final:
                engine.save_checkpoint(os.path.join(tmp, DS_STATE_DIR), tag=DS_TAG)
            if rank == 0:
                with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                    json.dump({**state, "final": final}, f)
            name = "final" if final else f"checkpoint_step{state['step']:06d}"
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    shard = ray.train.get_dataset_shard("train")
    every = config["checkpoint_every_steps"]
    micro_per_epoch = plan.steps_per_epoch * plan.grad_accum
    acc = {"loss": 0.0, "tokens": 0, "examples": 0, "extra": {}}
    t_step = time.perf_counter()
    while state["step"] < plan.total_steps:
        epoch = state["step"] // plan.steps_per_epoch
        skip = (state["step"] % plan.steps_per_epoch) * plan.grad_accum
        batches = shard.iter_batches(
            batch_size=plan.micro_batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=config["shuffle_buffer"] or None,
            local_shuffle_seed=config["seed"] + epoch,
        )
        for i, batch in enumerate(batches):
            # Every worker walks its whole shard so that all splits finish the epoch together.
            if i < skip or i >= micro_per_epoch or state["step"] >= plan.total_steps:
                continue
            loss, n_tokens, extra = step_fn(engine, batch, device, config)
            engine.backward(loss)
            lr = float(scheduler.get_last_lr()[0]) if scheduler else None  # lr of this step
            engine.step()
            acc["loss"] += float(loss.detach())
            acc["tokens"] += n_tokens
            acc["examples"] += len(next(iter(batch.values())))
            for k, v in extra.items():
                acc["extra"][k] = acc["extra"].get(k, 0.0) + v
            if (i + 1) % plan.grad_accum:
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


def resolve_threads(t: TrainingConfig) -> int:
    """Torch threads per CPU worker: its CPU reservation (at least 1)."""
    return max(1, int(t.cpus_per_worker))


def fault_injection_from_env() -> dict:
    """The test-only fault-injection settings from the driver's environment."""
    at = os.environ.get(FAIL_AT_STEP_ENV)
    return {"fail_at_step": int(at) if at else None, "fail_flag": os.environ.get(FAIL_FLAG_ENV)}


def fit(
    name: str,
    step_fn: Callable[[Any, dict, Any, dict], tuple[Any, int, dict]],
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
        "shuffle_buffer": 4 * t.micro_batch_size,
        **fault_injection_from_env(),
        **(extra_config or {}),
    }
    resources = {"CPU": t.cpus_per_worker}
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

"""DPO (sigmoid loss) from the SFT model with Ray Train + DeepSpeed (SPEC section 5).

Flow of :func:`run_dpo`:

1. ``cfg.dpo.paths`` are read with :func:`deita_ray.data.read.read_pool`; each record becomes a
   pair (:func:`parse_pair`: prompt / chosen / rejected as strings or message lists, the
   ShareGPT preference shape of LLaMA-Factory's ``dpo_en_demo.json``, or HH-RLHF transcripts)
   and is tokenised by :class:`PreparePairs` (loss mask on the response only).
2. :class:`ReferenceLogProbs` computes the frozen reference's log-probabilities of both
   responses ONCE, in a separate Ray Data pass, so the reference model never sits beside the
   policy in memory. Pairs and reference log-probs are written to ``<out_dir>/dpo/part-*``;
   bad pairs to ``<out_dir>/rejects/dpo/``.
3. The policy (the SFT model) trains under Ray Train + DeepSpeed (ZeRO stage by config) on the
   pairs; the final model goes to ``<out_dir>/dpo/final``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow as pa

from deita_ray.accounting import StageResult
from deita_ray.config import PipelineConfig
from deita_ray.data.formats import ROLE_ALIASES, parse_hh_transcript
from deita_ray.data.rejects import DETAIL, RAW, REASON
from deita_ray.data.sink import parquet_files, stage_dir, write_with_rejects
from deita_ray.preflight import ModelToLoad, same_path
from deita_ray.stages.base import Stage
from deita_ray.training.common import (
    TemplateError,
    TokenizingStage,
    check_template,
    encode_segments,
    fit,
    load_tokenizer,
    map_tokenize,
    only_last_target,
    render_segments,
    summarize_history,
)

NAME = "dpo"


class PairError(ValueError):
    """A preference record that cannot become a pair; ``reason`` goes to rejects."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Loss (pure)


def dpo_loss(
    policy_chosen: Any, policy_rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float
) -> tuple[Any, Any, Any]:
    """Sigmoid DPO loss (Rafailov et al. 2023), mean over the batch.

    ``loss = -log sigmoid(beta * ((pc - rc) - (pr - rr)))`` with sequence log-probabilities of
    the chosen / rejected responses under the policy (p*) and the reference (r*).

    Returns:
        (loss, chosen rewards ``beta * (pc - rc)``, rejected rewards ``beta * (pr - rr)``).
    """
    import torch.nn.functional as F

    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def reward_accuracy(margins: Any) -> float:
    """Share of pairs whose chosen reward beats the rejected one (a tie counts one half)."""
    m = np.asarray(margins, dtype=np.float64)
    return float(np.mean((m > 0) + 0.5 * (m == 0))) if m.size else float("nan")


def dpo_step(engine: Any, batch: dict, device: Any, config: dict) -> tuple[Any, int, dict]:
    """One DPO micro-batch on a worker: chosen and rejected responses in one forward pass."""
    import torch

    from deita_ray.training.common import _to_torch, collate, sequence_logps

    n = len(batch["chosen_input_ids"])
    t = _to_torch(
        collate(
            list(batch["chosen_input_ids"]) + list(batch["rejected_input_ids"]),
            list(batch["chosen_labels"]) + list(batch["rejected_labels"]),
            config["pad_id"],
        ),
        device,
    )
    logits = engine(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    logps = sequence_logps(logits, t["labels"])
    ref_c = torch.as_tensor(np.asarray(batch["ref_chosen_logp"], dtype=np.float32), device=device)
    ref_r = torch.as_tensor(np.asarray(batch["ref_rejected_logp"], dtype=np.float32), device=device)
    loss, rc, rr = dpo_loss(logps[:n], logps[n:], ref_c, ref_r, config["beta"])
    margins = (rc - rr).float().cpu().numpy()
    extra = {
        "reward_chosen": float(rc.mean()),
        "reward_rejected": float(rr.mean()),
        "reward_margin": float(margins.mean()),
        "reward_accuracy": reward_accuracy(margins),
    }
    return loss, int(torch.count_nonzero(t["attention_mask"])), extra


# ---------------------------------------------------------------------------------------------
# Pairs


def _messages(value: Any, field: str) -> list[dict]:
    """[{role|from, content|value}] -> canonical messages (roles via ROLE_ALIASES)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise PairError("bad_pair", f"'{field}' is not a non-empty message list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise PairError("bad_pair", f"{field}[{i}] is not an object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
        if role is None or not isinstance(content, str):
            raise PairError("bad_pair", f"{field}[{i}] has no known role or no string content")
        out.append({"role": role, "content": content})
    return out


def _response(value: Any, prompt: list[dict] | None, field: str) -> tuple[list[dict] | None, str]:
    """A response given as text, one message, or a conversation ending with it.

    Returns:
        (the prompt the conversation implies, or None; the response text).
    """
    if isinstance(value, str):
        return None, value
    msgs = _messages(value, field)
    if msgs[-1]["role"] != "assistant":
        raise PairError("bad_pair", f"'{field}' does not end with an assistant message")
    if prompt is not None and len(msgs) > 1 and msgs[: len(prompt)] == prompt:
        msgs = msgs[len(prompt) :]
    return (msgs[:-1] or None), msgs[-1]["content"]


def parse_pair(record: dict) -> tuple[list[dict], str, str]:
    """A preference record -> (prompt messages, chosen text, rejected text).

    Accepted shapes: ``prompt`` (string or messages) with ``chosen`` / ``rejected`` (strings,
    one message, or conversations that end with the response, e.g. UltraFeedback-binarized);
    ``conversations`` or ``messages`` as the prompt with ``chosen`` / ``rejected`` messages
    ``{from, value}`` (LLaMA-Factory); HH-RLHF transcript strings (no prompt field).

    Raises:
        PairError: with reason ``bad_pair``, ``empty_response`` or ``identical_responses``.
    """
    if not isinstance(record, dict):
        raise PairError("bad_pair", "record is not an object")
    if "chosen" not in record or "rejected" not in record:
        raise PairError("bad_pair", "no 'chosen'/'rejected'")
    raw_prompt = record.get("prompt", record.get("conversations", record.get("messages")))
    prompt: list[dict] | None
    if raw_prompt is None:
        prompt = None
    elif isinstance(raw_prompt, str):
        prompt = [{"role": "user", "content": raw_prompt}]
    else:
        prompt = _messages(raw_prompt, "prompt")
    chosen, rejected = record["chosen"], record["rejected"]
    if prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
        c, r = parse_hh_transcript(chosen), parse_hh_transcript(rejected)
        if isinstance(c, tuple) or isinstance(r, tuple) or not c or not r:
            raise PairError("bad_pair", "no prompt, and chosen/rejected are not transcripts")
        if c[:-1] != r[:-1] or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            raise PairError("bad_pair", "transcripts differ before their last assistant reply")
        prompt, chosen_text, rejected_text = c[:-1], c[-1]["content"], r[-1]["content"]
    else:
        p_c, chosen_text = _response(chosen, prompt, "chosen")
        p_r, rejected_text = _response(rejected, prompt, "rejected")
        if prompt is None:
            if p_c is None or p_c != p_r:
                raise PairError("bad_pair", "no prompt and no common conversation prefix")
            prompt = p_c
    if not prompt or prompt[-1]["role"] != "user":
        raise PairError("bad_pair", "the prompt does not end with a user message")
    if not chosen_text.strip() or not rejected_text.strip():
        raise PairError("empty_response", "chosen or rejected response is empty")
    if chosen_text == rejected_text:
        raise PairError("identical_responses", "chosen == rejected (no preference signal)")
    return prompt, chosen_text, rejected_text


class PreparePairs(TokenizingStage):
    """Ray Data stage: preference records -> tokenised pairs with response-only label masks.

    Input columns (:func:`deita_ray.data.read.read_pool`): ``record`` (JSON text), ``source``,
    ``index``, ``seq``, ``error``, ``detail``.
    Output columns: ``id`` (``<file stem>:<index>``), ``source``, ``seq``,
    ``chosen_input_ids`` / ``chosen_labels`` / ``rejected_input_ids`` / ``rejected_labels``
    (list<int32>), ``num_tokens``, and the reject mark columns (reasons: the reader's error,
    ``bad_pair``, ``empty_response``, ``identical_responses``, ``template_error``,
    ``no_target_tokens``).
    """

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        n = len(rows)
        reasons: list[str | None] = [None] * n
        details: list[str | None] = [None] * n
        segs, owners = [], []
        for i, row in enumerate(rows):
            try:
                if row.get("error"):
                    raise PairError(row["error"], row.get("detail") or row["error"])
                prompt, chosen, rejected = parse_pair(json.loads(row["record"]))
                for text in (chosen, rejected):
                    conv = prompt + [{"role": "assistant", "content": text}]
                    segs.append(
                        only_last_target(render_segments(conv, self.template, self.tokenizer))
                    )
                owners.append(i)
            except PairError as e:
                reasons[i], details[i] = e.reason, str(e)[:500]
            except (TemplateError, ValueError, TypeError, KeyError) as e:
                reasons[i], details[i] = "template_error", f"{type(e).__name__}: {e}"[:500]
        enc = encode_segments(segs, self.tokenizer, self.max_length)
        cols: dict[str, list] = {
            k: [[] for _ in range(n)]
            for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
        }
        num_tokens = [0] * n
        for j, i in enumerate(owners):
            c, r = enc[2 * j], enc[2 * j + 1]
            if c.num_targets == 0 or r.num_targets == 0:
                reasons[i] = "no_target_tokens"
                details[i] = f"no response token left within max_length={self.max_length}"
                continue
            cols["chosen_input_ids"][i], cols["chosen_labels"][i] = c.input_ids, c.labels
            cols["rejected_input_ids"][i], cols["rejected_labels"][i] = r.input_ids, r.labels
            num_tokens[i] = len(c.input_ids) + len(r.input_ids)
        ids = [
            f"{os.path.splitext(os.path.basename(str(r.get('source'))))[0]}:{r.get('index')}"
            for r in rows
        ]
        out = {
            "id": pa.array(ids, pa.string()),
            "source": pa.array([r.get("source") for r in rows], pa.string()),
            "seq": pa.array([r.get("seq") for r in rows], pa.int64()),
        }
        out.update({k: pa.array(v, pa.list_(pa.int32())) for k, v in cols.items()})
        out["num_tokens"] = pa.array(num_tokens, pa.int32())
        out[REASON] = pa.array(reasons, pa.string())
        out[DETAIL] = pa.array(details, pa.string())
        out[RAW] = pa.array(
            [rows[i]["record"] if reasons[i] else None for i in range(n)], pa.large_string()
        )
        return pa.table(out)


class ReferenceLogProbs:
    """Ray Data stage: the frozen reference model's log-probabilities of both responses.

    Input columns: those of :class:`PreparePairs`. Output: the same plus ``ref_chosen_logp``
    and ``ref_rejected_logp`` (float64; null on rows already marked as rejects).
    """

    def __init__(
        self,
        model_path: str,
        pad_id: int,
        batch_rows: int = 8,
        use_gpu: bool = False,
        bf16: bool = False,
        threads: int = 1,
        trust_remote_code: bool = False,
    ):
        import torch
        from transformers import AutoModelForCausalLM

        if not use_gpu:
            torch.set_num_threads(max(1, threads))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                model_path,
                dtype=torch.bfloat16 if bf16 else torch.float32,
                trust_remote_code=trust_remote_code,
            )
            .to(self.device)
            .eval()
        )
        self.pad_id = pad_id
        self.batch_rows = batch_rows

    def logps(self, input_ids: list, labels: list) -> np.ndarray:
        """Sequence log-probs of the label tokens, ``batch_rows`` sequences per forward."""
        import torch

        from deita_ray.training.common import collate, sequence_logps

        out = []
        for s in range(0, len(input_ids), self.batch_rows):
            t = collate(
                input_ids[s : s + self.batch_rows], labels[s : s + self.batch_rows], self.pad_id
            )
            t = {k: torch.as_tensor(v, device=self.device) for k, v in t.items()}
            with torch.no_grad():
                logits = self.model(
                    input_ids=t["input_ids"], attention_mask=t["attention_mask"]
                ).logits
                out.append(sequence_logps(logits, t["labels"]).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        good = [i for i, r in enumerate(batch[REASON].to_pylist()) if r is None]
        ref_c: list[float | None] = [None] * batch.num_rows
        ref_r: list[float | None] = [None] * batch.num_rows
        if good:
            take = pa.array(good)
            for col, dest in (("chosen", ref_c), ("rejected", ref_r)):
                ids = batch[f"{col}_input_ids"].take(take).to_pylist()
                labels = batch[f"{col}_labels"].take(take).to_pylist()
                for i, v in zip(good, self.logps(ids, labels), strict=True):
                    dest[i] = float(v)
        batch = batch.append_column("ref_chosen_logp", pa.array(ref_c, pa.float64()))
        return batch.append_column("ref_rejected_logp", pa.array(ref_r, pa.float64()))


# ---------------------------------------------------------------------------------------------
# Stage entry point


TRAIN_COLUMNS = [
    "chosen_input_ids",
    "chosen_labels",
    "rejected_input_ids",
    "rejected_labels",
    "ref_chosen_logp",
    "ref_rejected_logp",
]


def dpo_model_path(cfg: PipelineConfig, out_dir: str) -> str:
    """Policy and reference start: ``dpo.model``, else the SFT output ``<out_dir>/sft/final``."""
    from deita_ray.models.registry import resolve_model_path

    if cfg.dpo.model:
        return resolve_model_path(cfg.dpo.model, cfg.cache_dir)
    return os.path.join(stage_dir(out_dir, "sft"), "final")


def prepare_pairs(cfg: PipelineConfig, out_dir: str, model_path: str, pad_id: int) -> Any:
    """Read, tokenise and score (reference log-probs) the pairs; write them and their rejects.

    Returns:
        The stage counts (rows_in = records read).
    """
    import ray

    from deita_ray.data.read import ReadLedger, read_pool
    from deita_ray.training.common import use_bf16

    t = cfg.dpo
    ledger = ReadLedger()  # rows in as the read tasks count them, apart from what is written
    ds = read_pool(t.paths, max_record_bytes=cfg.input.max_record_bytes, ledger=ledger)
    # Tokenise first and keep the (small) result, so that the reading tasks never wait for
    # CPUs held by the reference-model actors on a small cluster.
    ds = map_tokenize(ds, PreparePairs, model_path, t, batch_size=64).materialize()
    ds = ds.map_batches(
        ReferenceLogProbs,
        fn_constructor_kwargs={
            "model_path": model_path,
            "pad_id": pad_id,
            "batch_rows": t.micro_batch_size,
            "use_gpu": t.use_gpu,
            "bf16": use_bf16(t),
            "threads": max(1, int(t.cpus_per_worker)),
            "trust_remote_code": t.trust_remote_code,
        },
        batch_format="pyarrow",
        batch_size=64,
        # One model replica per GPU; on CPU one replica leaves room for the write tasks.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=t.num_workers if t.use_gpu else 1),
        num_cpus=t.cpus_per_worker,
        num_gpus=1 if t.use_gpu else 0,
    )
    try:
        return write_with_rejects(ds, NAME, out_dir, rows_in=ledger.check)
    finally:
        ledger.close()


def run_dpo(cfg: PipelineConfig, out_dir: str) -> StageResult:
    """Preference-tune the SFT model on ``cfg.dpo.paths``; write ``<out_dir>/dpo/final``.

    Assumes Ray is initialised. Counts: rows_in = preference records read, rows_out = pairs
    trained on, rejects by reason. Metrics: loss, reward margins and accuracy, lr per step.
    """
    import ray

    model_path = dpo_model_path(cfg, out_dir)
    check_template(cfg.dpo, model_path, NAME)
    pad_id = int(load_tokenizer(model_path, cfg.dpo.trust_remote_code).pad_token_id)
    counts = prepare_pairs(cfg, out_dir, model_path, pad_id)
    counts.check(NAME)
    if counts.rows_out == 0:
        raise RuntimeError(f"dpo: no usable preference pairs ({counts.to_dict()})")
    dpo_dir = stage_dir(out_dir, NAME)
    train_ds = ray.data.read_parquet(parquet_files(dpo_dir)).select_columns(TRAIN_COLUMNS)
    train_ds = train_ds.materialize()
    state, plan = fit(
        NAME,
        dpo_step,
        cfg.dpo,
        model_path,
        train_ds,
        counts.rows_out,
        dpo_dir,
        extra_config={"pad_id": pad_id, "beta": cfg.dpo.beta},
    )
    metrics = {
        "model": model_path,
        "final_model": os.path.join(dpo_dir, "final"),
        "beta": cfg.dpo.beta,
        "steps": state["step"],
        "optimizer_steps": state.get("optimizer_steps"),
        "examples": state["examples"],
        "restarts": state["restarts"],
        "resumed_from_step": state["resumed_from_step"],
        "plan": plan.to_dict(),
        **summarize_history(
            state["history"],
            keys=("reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"),
        ),
    }
    return StageResult(counts=counts, metrics=metrics)


def _models(cfg: PipelineConfig) -> list[ModelToLoad]:
    """The start model (:func:`dpo_model_path`), unless this job's sft stage writes it first."""
    out_dir = os.path.abspath(os.path.expanduser(cfg.output.dir))
    sft_final = os.path.join(stage_dir(out_dir, "sft"), "final")
    path = cfg.dpo.model or sft_final
    if "sft" in cfg.stages and same_path(path, sft_final):
        return []
    key = "dpo.model" if cfg.dpo.model else "dpo.model (empty: <output.dir>/sft/final)"
    return [ModelToLoad(key, path, cfg.dpo.trust_remote_code)]


STAGE = Stage(
    name=NAME,
    run=run_dpo,
    config_keys=("dpo",),
    reads=("sft",),
    output_columns=tuple(TRAIN_COLUMNS),
    trains=True,
    models=_models,
    doc="DPO (sigmoid loss) from the SFT model on dpo.paths; the model in dpo/final",
)

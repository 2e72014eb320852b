"""DPO (sigmoid loss) from the SFT model with Ray Train + DeepSpeed (docs/training.md).

Flow of :func:`run_dpo`:

1. ``cfg.dpo.paths`` are read with :func:`deita_ray.data.read.read_pool`; each record becomes a
   pair (:func:`parse_pair`: prompt / chosen / rejected as strings or message lists, the
   ShareGPT preference shape of LLaMA-Factory's ``dpo_en_demo.json``, or HH-RLHF transcripts)
   with the pool's id scheme (its own id, else ``<file prefix>:<index>``), and is tokenised by
   :class:`PreparePairs`: prompt and responses apart, loss on the response only, cut to
   ``dpo.max_length`` in TRL's order (:func:`truncate_pair`).
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
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from deita_ray.accounting import StageCounts, StageResult
from deita_ray.config import PipelineConfig
from deita_ray.data.formats import (
    Reject,
    parse_hh_transcript,
    parse_messages,
    record_id,
    validate_messages,
)
from deita_ray.data.read import file_stem
from deita_ray.data.rejects import RANGE_END, RANGE_START, RANGE_UNIT, REASON, RejectMarks
from deita_ray.stages.base import (
    TRAINING_HASH_IGNORE,
    InputToRead,
    ModelToLoad,
    Stage,
    running_stage_hash,
    same_path,
)
from deita_ray.training.render import (
    IGNORE_INDEX,
    TemplateError,
    TokenizingStage,
    collate,
    labelled,
    only_last_target,
    render_segments,
    start_ids,
    tokenize_segments,
)
from deita_ray.training.tensors import sequence_logps, to_torch

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

    n = len(batch["chosen_input_ids"])
    t = to_torch(
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
    """[{role|from, content|value}] (or one such message) -> canonical messages."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise PairError("bad_pair", f"'{field}' is not a non-empty message list")
    msgs = parse_messages(value, field)
    if isinstance(msgs, Reject):
        raise PairError("bad_pair", f"{msgs.reason}: {msgs.detail}")
    return msgs


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
    bad = validate_messages(prompt)
    if bad is not None:
        raise PairError("bad_pair", f"{bad.reason}: {bad.detail}")
    if not chosen_text.strip() or not rejected_text.strip():
        raise PairError("empty_response", "chosen or rejected response is empty")
    if chosen_text == rejected_text:
        raise PairError("identical_responses", "chosen == rejected (no preference signal)")
    return prompt, chosen_text, rejected_text


Tokens = tuple[list[int], list[int]]
"""(input ids, labels) of one piece of a pair."""


def truncate_pair(
    prompt: list[int],
    chosen: Tokens,
    rejected: Tokens,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
) -> tuple[list[int], Tokens, Tokens, bool]:
    """Fit prompt + response into ``max_length`` tokens the way TRL's DPO collator does.

    The order of truncation of ``DPODataCollatorWithPadding.tokenize_batch_element`` in TRL
    0.7.2 (the version DEITA's DPO script pins, huggingface/trl, trl/trainer/utils.py): when the
    prompt plus the *longer* response exceed ``max_length``, the prompt is cut to
    ``max_prompt_length`` tokens (its end kept under ``keep_end``, its start under
    ``keep_start``); if that is still too long, both responses are cut to
    ``max_length - max_prompt_length`` tokens, keeping their start.

    Returns:
        (prompt ids, chosen, rejected, whether anything was cut).
    """
    longer = max(len(chosen[0]), len(rejected[0]))
    cut = False
    if len(prompt) + longer > max_length:
        kept = (
            prompt[:max_prompt_length]
            if truncation_mode == "keep_start"
            else prompt[-max_prompt_length:]
        )
        cut = len(kept) < len(prompt)
        prompt = kept
    if len(prompt) + longer > max_length:
        keep = max_length - max_prompt_length
        chosen = (chosen[0][:keep], chosen[1][:keep])
        rejected = (rejected[0][:keep], rejected[1][:keep])
        cut = True
    return prompt, chosen, rejected, cut


def split_response(segments: list[tuple[str, bool]]) -> tuple[str, list[tuple[str, bool]]]:
    """(prompt text, response segments) of a rendering whose last target is the response:
    the prompt is everything before it, tokenised as one text as TRL does."""
    last = max((i for i, (_, t) in enumerate(segments) if t), default=-1)
    if last < 0:
        raise TemplateError("the rendering has no response to train on")
    return "".join(text for text, _ in segments[:last]), segments[last:]


class PreparePairs(TokenizingStage):
    """Ray Data stage: preference records -> tokenised pairs with response-only label masks.

    Prompt and response are tokenised apart (the prompt as one text, with the template's BOS
    prefix) and cut with :func:`truncate_pair`. With ``template: deita_dpo`` each response
    also ends with the tokenizer's EOS id and no BOS is added, as TRL 0.7.2 tokenised the
    DEITA DPO script's pairs.

    Input columns (:func:`deita_ray.data.read.read_pool`): ``record`` (JSON text), ``source``,
    ``index``, ``seq``, ``error``, ``detail``.
    Output columns: ``id`` (the record's own id, else ``<file prefix>:<index>`` with the
    prefixes of :func:`deita_ray.data.read.id_prefixes`), ``source``, ``seq``,
    ``chosen_input_ids`` / ``chosen_labels`` / ``rejected_input_ids`` / ``rejected_labels``
    (list<int32>), ``num_tokens``, ``truncated``, and the reject mark columns with the
    reader's input range (reasons: the reader's error, ``bad_pair``, ``empty_response``,
    ``identical_responses``, ``template_error``, ``no_target_tokens``).

    Args:
        max_prompt_length: see :func:`truncate_pair`.
        truncation_mode: ``keep_end`` or ``keep_start``.
        id_prefixes: source path -> prefix of synthesized ids (default: the file stem).
        id_field: the field holding a record's own id.
    """

    def __init__(
        self,
        model_path: str,
        template: str,
        max_length: int,
        trust_remote_code: bool = False,
        max_prompt_length: int = 512,
        truncation_mode: str = "keep_end",
        id_prefixes: Mapping[str, str] | None = None,
        id_field: str = "id",
    ):
        super().__init__(model_path, template, max_length, trust_remote_code)
        if max_prompt_length >= max_length:
            raise ValueError(
                f"max_prompt_length {max_prompt_length} must be < max_length {max_length}"
            )
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.id_prefixes = dict(id_prefixes or {})
        self.id_field = id_field
        self.append_eos = template == "deita_dpo"

    def _id(self, record: Any, source: str, index: int) -> str:
        own = record_id(record, self.id_field) if isinstance(record, dict) else None
        if own is not None:
            return own
        prefix = self.id_prefixes.get(source)
        if prefix is None:
            prefix = self.id_prefixes[source] = file_stem(source)
        return f"{prefix}:{index}"

    def _response(self, segs: list[tuple[str, bool]], pieces: list[list[int]]) -> Tokens:
        ids, labels = labelled(segs, pieces)
        if self.append_eos:
            eos = self.tokenizer.eos_token_id
            ids, labels = ids + [eos], labels + [eos]
        return ids, labels

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        n = len(rows)
        marks = RejectMarks(n)
        ids = [""] * n
        work, owners, starts = [], [], []
        for i, row in enumerate(rows):
            record = None
            try:
                if row.get("error"):
                    raise PairError(row["error"], row.get("detail") or row["error"])
                record = json.loads(row["record"])
                prompt, chosen, rejected = parse_pair(record)
                halves = []
                for text in (chosen, rejected):
                    conv = prompt + [{"role": "assistant", "content": text}]
                    segs = only_last_target(render_segments(conv, self.template, self.tokenizer))
                    halves.append((split_response(segs), segs))
                (p_chosen, resp_c), segs_c = halves[0]
                (p_rejected, resp_r), _ = halves[1]
                if p_chosen != p_rejected:
                    raise TemplateError("chosen and rejected render different prompts")
                work.append([(p_chosen, False), *resp_c, *resp_r])
                starts.append((start_ids(segs_c, self.tokenizer, self.template), len(resp_c)))
                owners.append(i)
            except PairError as e:
                marks.reject(i, e.reason, str(e)[:500], row["record"])
            except (TemplateError, ValueError, TypeError, KeyError) as e:
                detail = f"{type(e).__name__}: {e}"[:500]
                marks.reject(i, "template_error", detail, row["record"])
            finally:
                ids[i] = self._id(record, str(row.get("source")), row.get("index"))
        cols: dict[str, list] = {
            k: [[] for _ in range(n)]
            for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
        }
        num_tokens = [0] * n
        truncated = [False] * n
        pieces_batch = tokenize_segments(work, self.tokenizer)
        for i, segs, pieces, (prefix, n_c) in zip(owners, work, pieces_batch, starts, strict=True):
            prompt = prefix + pieces[0]
            chosen = self._response(segs[1 : 1 + n_c], pieces[1 : 1 + n_c])
            rejected = self._response(segs[1 + n_c :], pieces[1 + n_c :])
            prompt, chosen, rejected, truncated[i] = truncate_pair(
                prompt,
                chosen,
                rejected,
                self.max_length,
                self.max_prompt_length,
                self.truncation_mode,
            )
            if not any(x != IGNORE_INDEX for x in chosen[1]) or not any(
                x != IGNORE_INDEX for x in rejected[1]
            ):
                detail = f"no response token left within max_length={self.max_length}"
                marks.reject(i, "no_target_tokens", detail, rows[i]["record"])
                continue
            masked = [IGNORE_INDEX] * len(prompt)
            for side, (r_ids, r_labels) in (("chosen", chosen), ("rejected", rejected)):
                cols[f"{side}_input_ids"][i] = prompt + r_ids
                cols[f"{side}_labels"][i] = masked + r_labels
            num_tokens[i] = 2 * len(prompt) + len(chosen[0]) + len(rejected[0])
        out = {
            "id": pa.array(ids, pa.string()),
            "source": pa.array([r.get("source") for r in rows], pa.string()),
            "seq": pa.array([r.get("seq") for r in rows], pa.int64()),
        }
        out.update({k: pa.array(v, pa.list_(pa.int32())) for k, v in cols.items()})
        out["num_tokens"] = pa.array(num_tokens, pa.int32())
        out["truncated"] = pa.array(truncated, pa.bool_())
        table = marks.attach(pa.table(out))
        # Where a rejected record sits in its file, as the reader located it.
        for col, field, typ in (
            (RANGE_START, "range_start", pa.int64()),
            (RANGE_END, "range_end", pa.int64()),
            (RANGE_UNIT, "range_unit", pa.string()),
        ):
            located = [rows[i].get(field) if marks.rejected(i) else None for i in range(n)]
            table = table.append_column(col, pa.array(located, typ))
        return table


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
    from deita_ray.data.sink import stage_dir
    from deita_ray.models.registry import resolve_model_path

    if cfg.dpo.model:
        return resolve_model_path(cfg.dpo.model, cfg.cache_dir)
    return os.path.join(stage_dir(out_dir, "sft"), "final")


def prepare_pairs(cfg: PipelineConfig, out_dir: str, model_path: str, pad_id: int) -> StageCounts:
    """Read, tokenise and score (reference log-probs) the pairs; write them and their rejects.

    Returns:
        The stage counts (rows_in = records read).
    """
    from deita_ray.data.read import ReadLedger, expand_paths, id_prefixes, read_pool
    from deita_ray.data.sink import write_with_rejects
    from deita_ray.runtime import map_batches_kwargs
    from deita_ray.training.plan import resolve_threads, use_bf16
    from deita_ray.training.render import map_tokenize

    t = cfg.dpo
    files = expand_paths(t.paths)
    ledger = ReadLedger()  # rows in as the read tasks count them, apart from what is written
    ds = read_pool(files, max_record_bytes=cfg.input.max_record_bytes, ledger=ledger)
    # Tokenise first and keep the (small) result, so that the reading tasks never wait for
    # CPUs held by the reference-model actors on a small cluster.
    ds = map_tokenize(
        ds,
        PreparePairs,
        model_path,
        t,
        batch_size=64,
        max_prompt_length=t.max_prompt_length,
        truncation_mode=t.truncation_mode,
        id_prefixes=id_prefixes(files),
        id_field=cfg.input.id_field,
    ).materialize()
    ds = ds.map_batches(
        ReferenceLogProbs,
        fn_constructor_kwargs={
            "model_path": model_path,
            "pad_id": pad_id,
            "batch_rows": t.micro_batch_size,
            "use_gpu": t.use_gpu,
            "bf16": use_bf16(t),
            "threads": resolve_threads(t),
            "trust_remote_code": t.trust_remote_code,
        },
        batch_format="pyarrow",
        # One model replica per GPU; on CPU one replica leaves room for the write tasks.
        **map_batches_kwargs(
            (1, t.num_workers if t.use_gpu else 1),
            num_cpus=t.cpus_per_worker,
            num_gpus=1 if t.use_gpu else 0,
            batch_size=64,
            resources=t.custom_resources,
        ),
    )
    try:
        return write_with_rejects(ds, NAME, out_dir, rows_in=ledger.check)
    finally:
        ledger.close()


def truncated_pairs(dpo_dir: str) -> int:
    """How many written pairs were cut to fit ``max_length``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from deita_ray.data.sink import parquet_files

    return sum(
        int(pc.sum(pq.read_table(f, columns=["truncated"])["truncated"]).as_py() or 0)
        for f in parquet_files(dpo_dir)
    )


def run_dpo(cfg: PipelineConfig, out_dir: str) -> StageResult:
    """Preference-tune the SFT model on ``cfg.dpo.paths``; write ``<out_dir>/dpo/final``.

    Assumes Ray is initialised. Counts: rows_in = preference records read, rows_out = pairs
    trained on, rejects by reason. Metrics: loss, reward margins and accuracy, lr per step.
    """
    import ray

    from deita_ray.data.sink import parquet_files, stage_dir
    from deita_ray.models.backend import load_tokenizer
    from deita_ray.training.loop import fit, summarize_history
    from deita_ray.training.render import check_template

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
        out_dir=out_dir,
        resume_key=running_stage_hash(out_dir, NAME),
    )
    metrics = {
        "model": model_path,
        "final_model": os.path.join(dpo_dir, "final"),
        "beta": cfg.dpo.beta,
        "template": cfg.dpo.template,
        "truncated_pairs": truncated_pairs(dpo_dir),
        "steps": state["step"],
        "optimizer_steps": state.get("optimizer_steps"),
        "examples": state["examples"],
        "restarts": state["restarts"],
        "resumed_from_step": state["resumed_from_step"],
        "steps_run": state.get("steps_run"),
        "plan": plan.to_dict(),
        **summarize_history(
            state["history"],
            keys=("reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"),
        ),
    }
    return StageResult(counts=counts, metrics=metrics)


def _models(cfg: PipelineConfig) -> list[ModelToLoad]:
    """The start model (:func:`dpo_model_path`), unless this job's sft stage writes it first."""
    from deita_ray.data.sink import stage_dir

    out_dir = os.path.abspath(os.path.expanduser(cfg.output.dir))
    sft_final = os.path.join(stage_dir(out_dir, "sft"), "final")
    path = cfg.dpo.model or sft_final
    if "sft" in cfg.stages and same_path(path, sft_final):
        return []
    key = "dpo.model" if cfg.dpo.model else "dpo.model (empty: <output.dir>/sft/final)"
    return [ModelToLoad(key, path, cfg.dpo.trust_remote_code)]


def _gpu_uses(cfg: PipelineConfig, out_dir: str) -> list:
    """The start model (and its frozen reference) under DeepSpeed on the training GPUs. Before
    this job's sft has written ``sft/final``, it is sized by sft's base (the same architecture)."""
    from deita_ray.data.sink import stage_dir
    from deita_ray.training.memory import GpuUse  # noqa: PLC0415

    if not cfg.dpo.use_gpu:
        return []
    path = cfg.dpo.model or os.path.join(stage_dir(out_dir, "sft"), "final")
    if not cfg.dpo.model and not os.path.isdir(path) and "sft" in cfg.stages:
        path = cfg.sft.model or cfg.embed.model.path
    return [GpuUse("dpo.model", path, "dpo", cfg.dpo)]


def _inputs(cfg: PipelineConfig) -> list[InputToRead]:
    """The preference pair files."""
    return [InputToRead("dpo.paths", cfg.dpo.paths, "auto", None)]


STAGE = Stage(
    name=NAME,
    run=run_dpo,
    # The pair files are read with the pool's record-size limit and id field.
    config_keys=("dpo", "input.id_field", "input.max_record_bytes"),
    # Where the workers run and where checkpoints are kept, not what they compute.
    hash_ignore=TRAINING_HASH_IGNORE,
    reads=("sft",),
    output_columns=tuple(TRAIN_COLUMNS),
    trains=True,
    models=_models,
    gpu_uses=_gpu_uses,
    inputs=_inputs,
    doc="DPO (sigmoid loss) from the SFT model on dpo.paths; the model in dpo/final",
)

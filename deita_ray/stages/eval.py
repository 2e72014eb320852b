"""The ``eval`` stage: the trained model on held-out sets (docs/evaluation.md).

Per configured set (``eval.sets``), in ``<out_dir>/eval/<set>/`` and ``<out_dir>/rejects/eval/<set>/``:

1. **Rows.** The set's files are read by the pool reader (:func:`deita_ray.data.read.read_pool`)
   and canonicalised like pool rows (:func:`deita_ray.evaluation.eval_row`; ``mt_bench``: the
   questions joined with their reference answers, one row per turn). Malformed records go to
   ``rejects/eval/<set>/input.parquet`` with their reason and raw text.
2. **Contamination guard.** Rows one of whose user messages, normalised
   (:func:`deita_ray.evaluation.normalize_prompt`), is also a user message of the pool
   (``<out_dir>/ingest``) are dropped: reason ``contaminated`` in the same rejects file.
3. **Metrics** (``eval.metrics``), each a Ray Data pass over the rows with an actor pool
   hosting a model, written shard by shard (an interrupted run resumes where it stopped):

   - ``likelihood`` (:class:`LikelihoodScorer`): per row the NLL of the reference answer
     given the prompt (prompt log-probabilities, one prefill per row) -> ``likelihood/``;
     rows that cannot be scored (too long, template) -> ``rejects/eval/<set>/likelihood``.
   - ``judge_single`` / ``judge_pairwise``: greedy generations (:class:`Generator`) ->
     ``generations/``, then the judge (:class:`JudgeModel`) grades each answer, or compares it
     with ``eval.judge.compare_to`` in both orders -> ``judge_single/`` / ``judge_pairwise/``
     with the raw judge outputs; outputs that do not parse keep their reason.

Accounting: rows in = eval rows read (an MT-Bench question contributes its turns, a rejected
record one row) = rows evaluated + rejected (malformed, contaminated). Rows a metric could not
score are counted per metric in the metrics (``failed_by_reason``), not as stage rejects.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deita_ray.accounting import StageCounts, StageResult
from deita_ray.config import EvalSetConfig, ModelConfig, PipelineConfig
from deita_ray.data.formats import MESSAGE_TYPE, Reject
from deita_ray.data.rejects import REJECTS_SCHEMA, RejectMarks, to_raw
from deita_ray.data.sink import parquet_files, rejects_dir, stage_dir
from deita_ray.evaluation import (
    EvalRow,
    bootstrap_means,
    generation_prompt,
    likelihood_summary,
    likelihood_texts,
    likelihood_tokens,
    mt_bench_rows,
    reference_turns,
    user_keys,
)
from deita_ray.preflight import InputToRead, ModelToLoad
from deita_ray.progress import begin_phase, count_rows, current_counter
from deita_ray.stages.base import Stage
from deita_ray.stages.reports.eval import REPORT

NAME = "eval"

ROWS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("seq", pa.int64()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("source", pa.string()),
    ]
)
"""Eval rows as they enter the metric passes."""


# ---------------------------------------------------------------------------------------------
# Which model


def eval_model(cfg: PipelineConfig, out_dir: str) -> tuple[str, str]:
    """``(loadable path, what it is)`` of the model to evaluate (see ``eval.model``)."""
    from deita_ray.models.registry import resolve_model_path

    if cfg.eval.model.path:
        return resolve_model_path(cfg.eval.model.path, cfg.cache_dir), "eval.model.path"
    if "dpo" in cfg.stages:
        return os.path.join(out_dir, "dpo", "final"), "dpo"
    if "sft" in cfg.stages or os.path.isdir(os.path.join(out_dir, "sft", "final")):
        return os.path.join(out_dir, "sft", "final"), "sft"
    from deita_ray.stages.sft import sft_model_path

    return sft_model_path(cfg), "base"


def _model_identity(cfg: PipelineConfig) -> str:
    # Which model is evaluated, for the stage hash: trained outputs are covered by the chain.
    if cfg.eval.model.path:
        return cfg.eval.model.path
    if "dpo" in cfg.stages:
        return "dpo"
    if "sft" in cfg.stages:
        return "sft"
    return "base:" + (cfg.sft.model or cfg.embed.model.path)


def _engine_cfg(model: ModelConfig, path: str) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(model, path=path)


# ---------------------------------------------------------------------------------------------
# Reading a set


def _read_records(paths: list[str], file_format: str) -> list[dict]:
    """Every record of the files (small sets: collected on the driver), in file order."""
    import ray

    from deita_ray.data.read import read_pool

    refs = read_pool(paths, file_format).to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    if not tables:
        return []
    table = pa.concat_tables(tables).sort_by("seq")
    return table.to_pylist()


def _reject(
    rid: str,
    seq: int,
    reason: str,
    detail: str,
    raw: str,
    source: str | None,
    read: dict | None = None,
) -> dict[str, Any]:
    """A rejects row; ``read`` (the reader's row) adds where in its file the record lies."""
    out = {
        "id": rid,
        "seq": seq,
        "stage": NAME,
        "reason": reason,
        "detail": detail,
        "raw": raw,
        "source": source,
    }
    for key in ("range_start", "range_end", "range_unit"):
        if read is not None and key in read:
            out[key] = read[key]
    return out


def read_eval_set(s: EvalSetConfig) -> tuple[list[EvalRow], list[dict]]:
    """The rows of one set and the rejects of its malformed records.

    Ids: the record's own ``id`` or ``<file stem>:<record index>`` (MT-Bench:
    ``mt_bench:<question_id>:t<turn>``).
    """
    from deita_ray.data.read import expand_paths, id_prefixes
    from deita_ray.evaluation import eval_row

    files = expand_paths(s.paths)
    prefixes = id_prefixes(files)
    records = _read_records(files, s.file_format)
    if s.limit is not None:
        records = records[: s.limit]
    references: dict[str, list[str]] = {}
    rejects: list[dict] = []
    if s.format == "mt_bench":
        ref_files = expand_paths(s.references)
        ref_prefixes = id_prefixes(ref_files)
        for r in _read_records(ref_files, "auto"):
            rid = f"{ref_prefixes.get(r['source']) or 'reference'}:{r['index']}"
            seq = -1 - r["seq"]  # reference records: negative, apart from the questions' seq
            if r["error"] is not None:
                rejects.append(
                    _reject(rid, seq, r["error"], r["detail"], r["record"], r["source"], r)
                )
                continue
            try:
                obj = json.loads(r["record"])
            except ValueError as e:
                rejects.append(
                    _reject(rid, seq, "invalid_json", str(e), r["record"], r["source"], r)
                )
                continue
            got_refs, bad = reference_turns([(obj, r["record"])])
            if bad:
                _, reason, detail = bad[0]
                rejects.append(_reject(rid, seq, reason, detail, r["record"], r["source"], r))
            for qid, turns in got_refs.items():
                references.setdefault(qid, turns)
    rows: list[EvalRow] = []
    for r in records:
        fallback = f"{prefixes.get(r['source']) or 'row'}:{r['index']}"
        if r["error"] is not None:
            rejects.append(
                _reject(fallback, r["seq"], r["error"], r["detail"], r["record"], r["source"], r)
            )
            continue
        try:
            obj = json.loads(r["record"])
        except ValueError as e:
            rejects.append(
                _reject(fallback, r["seq"], "invalid_json", str(e), r["record"], r["source"], r)
            )
            continue
        if s.format == "mt_bench":
            got: Any = mt_bench_rows(obj, r["seq"], r["source"], references)
        else:
            got = eval_row(obj, s.format, fallback, r["seq"], r["source"])
        if isinstance(got, Reject):
            rejects.append(
                _reject(fallback, r["seq"], got.reason, got.detail, r["record"], r["source"], r)
            )
            continue
        rows.extend(got if isinstance(got, list) else [got])
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row.id in seen:
            rejects.append(
                _reject(
                    row.id,
                    row.seq,
                    "duplicate_id",
                    "an earlier row of the set has this id",
                    to_raw({"id": row.id, "messages": row.messages}),
                    row.source,
                )
            )
            continue
        seen.add(row.id)
        unique.append(row)
    return unique, rejects


def pool_prompt_keys(out_dir: str) -> set[bytes] | None:
    """Keys of every user message of the pool (``<out_dir>/ingest``), or None without a pool."""
    files = parquet_files(stage_dir(out_dir, "ingest"))
    if not files:
        return None
    keys: set[bytes] = set()
    for f in files:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=8192, columns=["messages"]):
            for msgs in batch.column("messages").to_pylist():
                keys.update(user_keys(msgs or []))
    return keys


def split_contaminated(
    rows: list[EvalRow], pool_keys: set[bytes] | None
) -> tuple[list[EvalRow], list[dict]]:
    """Rows with no user message in the pool, and rejects (``contaminated``) for the others."""
    if not pool_keys:
        return rows, []
    keep, dropped = [], []
    for row in rows:
        if any(k in pool_keys for k in user_keys(row.messages)):
            dropped.append(
                _reject(
                    row.id,
                    row.seq,
                    "contaminated",
                    "a user message of this row, normalised, is also a user message of the pool",
                    to_raw({"id": row.id, "messages": row.messages}),
                    row.source,
                )
            )
        else:
            keep.append(row)
    return keep, dropped


def _rows_table(rows: list[EvalRow]) -> pa.Table:
    return pa.table(
        {
            "id": [r.id for r in rows],
            "seq": [r.seq for r in rows],
            "messages": [r.messages for r in rows],
            "source": [r.source for r in rows],
        },
        schema=ROWS_SCHEMA,
    )


def _write_table(table: pa.Table, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Ray Data callables (one model per actor)


def likelihood_table(batch: pa.Table, backend: Any, template: str) -> pa.Table:
    """Per row: prompt and answer token counts, the answer's summed and mean NLL (fp32 log-
    probabilities from the engine, summed in float64), or a reject mark.

    Reasons: ``template_error``, ``template_not_prefix``, ``empty_answer``, ``too_long``
    (prompt + answer beyond the engine's context), ``engine_error``, ``non_finite``.
    """
    rows = batch.to_pylist()
    n = len(rows)
    tok = backend.tokenizer
    marks = RejectMarks(n)

    def reject(i: int, reason: str, detail: str) -> None:
        marks.reject(i, reason, detail, {"id": rows[i]["id"], "messages": rows[i]["messages"]})

    seqs: list[list[int]] = []
    starts: list[int] = []
    live: list[int] = []
    prompt_tokens = [0] * n
    answer_tokens = [0] * n
    from deita_ray.evaluation import RenderError

    for i, row in enumerate(rows):
        try:
            p, f = likelihood_texts(row["messages"], template, tok)
        except RenderError as e:
            reject(i, e.reason, str(e))
            continue
        ids, start = likelihood_tokens(p, f, tok)
        prompt_tokens[i], answer_tokens[i] = start, len(ids) - start
        if start >= len(ids):
            reject(i, "empty_answer", "the answer renders to no token")
        elif len(ids) > backend.max_prompt_tokens:
            reject(
                i, "too_long", f"{len(ids)} tokens > {backend.max_prompt_tokens} the engine accepts"
            )
        else:
            seqs.append(ids)
            starts.append(start)
            live.append(i)
    nll_sum: list[float | None] = [None] * n
    if live:
        values, errors = backend.token_logprobs(seqs, starts)
        for k, i in enumerate(live):
            if errors[k] is not None:
                reject(i, "engine_error", errors[k])
                continue
            v = np.asarray(values[k], np.float64)
            if not np.isfinite(v).all():
                reject(i, "non_finite", "a log-probability is not finite")
                continue
            nll_sum[i] = float(-v.sum())
    out = pa.table(
        {
            "id": batch["id"],
            "seq": batch["seq"],
            "source": batch["source"],
            "prompt_tokens": pa.array(prompt_tokens, pa.int32()),
            "answer_tokens": pa.array(answer_tokens, pa.int32()),
            "nll_sum": pa.array(nll_sum, pa.float64()),
            "nll_mean": pa.array(
                [None if s is None else s / answer_tokens[i] for i, s in enumerate(nll_sum)],
                pa.float64(),
            ),
        }
    )
    return marks.attach(out)


class LikelihoodScorer:
    """Ray Data callable: :func:`likelihood_table` with one model (loaded for prefill).

    ``progress`` (here and in :class:`Generator`, :class:`JudgeModel`): the stage's progress
    counter (:mod:`deita_ray.progress`), told the rows of each finished batch, or None.
    """

    def __init__(
        self, model_cfg: ModelConfig, model_path: str, template: str, progress: Any = None
    ):
        from deita_ray.models.backend import load_backend

        self.backend = load_backend(model_cfg, model_path, "score")
        self.template = template
        self.progress = progress

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = likelihood_table(batch, self.backend, self.template)
        count_rows(self.progress, batch.num_rows)
        return out


def _prompt_ids(text: str, tokenizer: Any) -> list[int]:
    from deita_ray.training.render import encode_segments

    return encode_segments([[(text, False)]], tokenizer, 1 << 62)[0].input_ids


def generate_texts(
    backend: Any, conversations: list[list[dict]], template: str, max_new_tokens: int
) -> tuple[list[str | None], list[str | None], list[str | None]]:
    """Greedy answers to each conversation's last user turn: ``(texts, reasons, details)``."""
    from deita_ray.evaluation import RenderError

    n = len(conversations)
    texts: list[str | None] = [None] * n
    reasons: list[str | None] = [None] * n
    details: list[str | None] = [None] * n
    prompts, budgets, live = [], [], []
    for i, msgs in enumerate(conversations):
        try:
            if template == "judge":
                p = backend.tokenizer.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=True
                )
            else:
                p = generation_prompt(msgs, template, backend.tokenizer)
        except RenderError as e:
            reasons[i], details[i] = e.reason, str(e)
            continue
        except Exception as e:  # noqa: BLE001 - a judge's chat template may raise anything
            reasons[i], details[i] = "template_error", f"{type(e).__name__}: {e}"[:500]
            continue
        ids = _prompt_ids(p, backend.tokenizer)
        room = backend.cfg.max_model_len - len(ids)
        if room < 1:
            reasons[i] = "too_long"
            details[i] = (
                f"prompt of {len(ids)} tokens leaves no room in {backend.cfg.max_model_len}"
            )
            continue
        prompts.append(ids)
        budgets.append(min(max_new_tokens, room))
        live.append(i)
    if live:
        outs, errors = backend.generate(prompts, budgets)
        for k, i in enumerate(live):
            if errors[k] is not None:
                reasons[i], details[i] = "engine_error", errors[k]
            else:
                texts[i] = outs[k]
    return texts, reasons, details


class Generator:
    """Ray Data callable: greedy generations of the evaluated model for each eval row.

    Output columns: ``id``, ``seq``, ``source``, ``prompt`` (the last user message),
    ``reference`` (the reference answer), ``output`` and the reject marks.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        model_path: str,
        template: str,
        max_new_tokens: int,
        progress: Any = None,
    ):
        from deita_ray.models.backend import load_backend

        self.backend = load_backend(model_cfg, model_path, "generate")
        self.template = template
        self.max_new_tokens = max_new_tokens
        self.progress = progress

    def __call__(self, batch: pa.Table) -> pa.Table:
        from deita_ray.evaluation import prompt_of

        rows = batch.to_pylist()
        convs = [r["messages"][:-1] for r in rows]
        texts, reasons, details = generate_texts(
            self.backend, convs, self.template, self.max_new_tokens
        )
        marks = RejectMarks(len(rows))
        for i, reason in enumerate(reasons):
            if reason is not None:
                marks.reject(i, reason, details[i], rows[i])
        out = pa.table(
            {
                "id": batch["id"],
                "seq": batch["seq"],
                "source": batch["source"],
                "prompt": [prompt_of(r["messages"]) for r in rows],
                "reference": [r["messages"][-1]["content"] for r in rows],
                "output": pa.array(texts, pa.large_string()),
            }
        )
        count_rows(self.progress, batch.num_rows)
        return marks.attach(out)


class JudgeModel:
    """Ray Data callable: the judge's greedy output for each judge conversation.

    Input columns: ``seq``, ``judge_messages`` (JSON text); output: the input plus
    ``judge_output`` and ``judge_error`` (an engine or template failure; never a verdict).
    """

    def __init__(
        self, model_cfg: ModelConfig, model_path: str, max_tokens: int, progress: Any = None
    ):
        from deita_ray.models.backend import load_backend

        self.backend = load_backend(model_cfg, model_path, "generate")
        self.max_tokens = max_tokens
        self.progress = progress

    def __call__(self, batch: pa.Table) -> pa.Table:
        convs = [json.loads(x) for x in batch["judge_messages"].to_pylist()]
        texts, reasons, details = generate_texts(self.backend, convs, "judge", self.max_tokens)
        errors = [None if r is None else f"{r}: {d}" for r, d in zip(reasons, details, strict=True)]
        count_rows(self.progress, batch.num_rows)
        return batch.append_column(
            "judge_output", pa.array(texts, pa.large_string())
        ).append_column("judge_error", pa.array(errors, pa.string()))


# ---------------------------------------------------------------------------------------------
# Running a pass


def _run_pass(
    table: pa.Table,
    fn: type,
    kwargs: dict,
    pool: Any,
    model_cfg: ModelConfig,
    out_dir: str,
    key: str,
) -> None:
    """Map ``table`` through the actor class ``fn`` into ``<out_dir>/<key>`` (rejects into
    ``<out_dir>/rejects/<key>``), skipping rows (by ``seq``) a previous run finished. With live
    progress (:mod:`deita_ray.progress`) the pass is a phase of its own: ``<set>/<metric>``."""
    import ray

    from deita_ray.data.sink import SplitParquetSink, skip_finished
    from deita_ray.runtime import map_batches_kwargs

    counter = current_counter()
    if counter is not None:
        label = key.split("/", 1)[-1]  # eval/<set>/<metric> -> <set>/<metric>
        done = table.num_rows - _to_finish(table, out_dir, key)
        counter = begin_phase(counter, label, table.num_rows, done)
    ds = skip_finished(ray.data.from_arrow(table), out_dir, key)
    ds = ds.map_batches(
        fn,
        fn_constructor_kwargs={**kwargs, "progress": counter},
        batch_format="pyarrow",
        **map_batches_kwargs(pool, model_cfg),
    )
    ds.write_datasink(SplitParquetSink(NAME, stage_dir(out_dir, key), rejects_dir(out_dir, key)))


def _read_folder(folder: str, columns: list[str] | None = None) -> pa.Table | None:
    files = parquet_files(folder)
    if not files:
        return None
    return pa.concat_tables(
        [pq.read_table(f, columns=columns) for f in files], promote_options="default"
    ).sort_by("seq")


def _reasons(folder: str) -> dict[str, int]:
    t = _read_folder(folder, ["seq", "reason"])
    return dict(Counter(t["reason"].to_pylist())) if t is not None else {}


def _to_finish(table: pa.Table, out_dir: str, key: str) -> int:
    from deita_ray.data.sink import finished_seqs

    done = finished_seqs(out_dir, key)
    return int(np.count_nonzero(~np.isin(table["seq"].to_numpy(), done)))


# ---------------------------------------------------------------------------------------------
# Metrics


def likelihood_metric(
    cfg: PipelineConfig, out_dir: str, sname: str, rows: pa.Table, model: tuple
) -> dict:
    key = f"{NAME}/{sname}/likelihood"
    if rows.num_rows and _to_finish(rows, out_dir, key):
        engine = _engine_cfg(cfg.eval.model, model[0])
        _run_pass(
            rows,
            LikelihoodScorer,
            {"model_cfg": engine, "model_path": model[0], "template": cfg.eval.template},
            cfg.eval.resources,
            engine,
            out_dir,
            key,
        )
    got = _read_folder(stage_dir(out_dir, key), ["seq", "nll_sum", "answer_tokens"])
    nll = got["nll_sum"].to_numpy() if got is not None else np.empty(0)
    tokens = got["answer_tokens"].to_numpy() if got is not None else np.empty(0)
    out = likelihood_summary(nll, tokens, cfg.eval.bootstrap_resamples, cfg.eval.seed)
    out["failed_by_reason"] = _reasons(rejects_dir(out_dir, key))
    return out


def generations(cfg: PipelineConfig, out_dir: str, sname: str, rows: pa.Table, model: tuple):
    """The evaluated model's greedy answers (``eval/<set>/generations``), made once."""
    key = f"{NAME}/{sname}/generations"
    if rows.num_rows and _to_finish(rows, out_dir, key):
        engine = _engine_cfg(cfg.eval.model, model[0])
        _run_pass(
            rows,
            Generator,
            {
                "model_cfg": engine,
                "model_path": model[0],
                "template": cfg.eval.template,
                "max_new_tokens": cfg.eval.max_new_tokens,
            },
            cfg.eval.resources,
            engine,
            out_dir,
            key,
        )
    return _read_folder(stage_dir(out_dir, key))


def _opponents(cfg: PipelineConfig, sname: str, gen: pa.Table) -> dict[str, str]:
    """Opponent answer per row id: the reference, or another output dir's generations."""
    if cfg.eval.judge.compare_to == "reference":
        return dict(zip(gen["id"].to_pylist(), gen["reference"].to_pylist(), strict=True))
    other = os.path.join(os.path.expanduser(cfg.eval.judge.compare_to), NAME, sname, "generations")
    t = _read_folder(other, ["id", "seq", "output"])
    if t is None:
        raise FileNotFoundError(
            f"eval.judge.compare_to: no generations for set {sname!r} in {other}"
        )
    return dict(zip(t["id"].to_pylist(), t["output"].to_pylist(), strict=True))


def _judge_pass(cfg: PipelineConfig, out_dir: str, key: str, table: pa.Table) -> pa.Table | None:
    if table.num_rows and _to_finish(table, out_dir, key):
        from deita_ray.models.registry import resolve_model_path

        jm = cfg.eval.judge.model
        path = resolve_model_path(jm.path, cfg.cache_dir)
        _run_pass(
            table,
            JudgeModel,
            {"model_cfg": jm, "model_path": path, "max_tokens": cfg.eval.judge.max_tokens},
            cfg.eval.judge.resources,
            jm,
            out_dir,
            key,
        )
    return _read_folder(stage_dir(out_dir, key))


def judge_single_metric(cfg: PipelineConfig, out_dir: str, sname: str, gen: pa.Table) -> dict:
    from deita_ray.evaluation import judge_messages, load_judge_prompt, parse_rating

    prompt = load_judge_prompt(cfg.eval.judge.prompts, cfg.eval.judge.single_prompt, "single")
    ok = gen.filter(pc.is_valid(gen["output"])) if gen.num_rows else gen
    table = pa.table(
        {
            "id": ok["id"],
            "seq": ok["seq"],
            "judge_messages": [
                json.dumps(judge_messages(prompt, question=q, answer=a, ref_answer_1=r))
                for q, a, r in zip(
                    ok["prompt"].to_pylist(),
                    ok["output"].to_pylist(),
                    ok["reference"].to_pylist(),
                    strict=True,
                )
            ],
        }
    )
    got = _judge_pass(cfg, out_dir, f"{NAME}/{sname}/judge_single", table)
    ratings: list[float] = []
    failed: Counter = Counter()
    for out, err in zip(
        got["judge_output"].to_pylist() if got is not None else [],
        got["judge_error"].to_pylist() if got is not None else [],
        strict=True,
    ):
        if err is not None:
            failed["judge_error"] += 1
            continue
        value, why = parse_rating(out)
        if why:
            failed[why] += 1
        else:
            ratings.append(value)
    failed.update({f"generation_{k}": v for k, v in _gen_failures(out_dir, sname).items()})
    b = bootstrap_means(np.asarray(ratings), None, cfg.eval.bootstrap_resamples, cfg.eval.seed)
    return {
        "prompt": prompt.name,
        "judge": cfg.eval.judge.model.path,
        "rated": len(ratings),
        "rating_mean": b["mean"],
        "rating_mean_ci95": b["ci95"],
        "failed_by_reason": dict(failed),
    }


def _gen_failures(out_dir: str, sname: str) -> dict[str, int]:
    return _reasons(rejects_dir(out_dir, f"{NAME}/{sname}/generations"))


def judge_pairwise_metric(cfg: PipelineConfig, out_dir: str, sname: str, gen: pa.Table) -> dict:
    from deita_ray.evaluation import (
        judge_messages,
        load_judge_prompt,
        pairwise_outcome,
        parse_verdict,
    )

    prompt = load_judge_prompt(cfg.eval.judge.prompts, cfg.eval.judge.pairwise_prompt, "pairwise")
    opp = _opponents(cfg, sname, gen)
    ids, seqs, msgs = [], [], []
    failed: Counter = Counter()
    for rid, seq, q, a, r in zip(
        gen["id"].to_pylist(),
        gen["seq"].to_pylist(),
        gen["prompt"].to_pylist(),
        gen["output"].to_pylist(),
        gen["reference"].to_pylist(),
        strict=True,
    ):
        if a is None:
            continue
        b = opp.get(rid)
        if b is None:
            failed["no_opponent"] += 1
            continue
        # Order 0: the model is assistant A; order 1: the model is assistant B.
        for order, (x, y) in enumerate(((a, b), (b, a))):
            ids.append(rid)
            seqs.append(seq * 2 + order)
            msgs.append(
                json.dumps(
                    judge_messages(prompt, question=q, answer_a=x, answer_b=y, ref_answer_1=r)
                )
            )
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "seq": pa.array(seqs, pa.int64()),
            "judge_messages": msgs,
        }
    )
    got = _judge_pass(cfg, out_dir, f"{NAME}/{sname}/judge_pairwise", table)
    verdicts: dict[str, dict[int, tuple]] = {}
    if got is not None:
        for rid, seq, out, err in zip(
            got["id"].to_pylist(),
            got["seq"].to_pylist(),
            got["judge_output"].to_pylist(),
            got["judge_error"].to_pylist(),
            strict=True,
        ):
            verdicts.setdefault(rid, {})[seq % 2] = (
                (None, "judge_error") if err is not None else parse_verdict(out)
            )
    outcomes: Counter = Counter()
    scores: list[float] = []
    wins: list[float] = []
    for per in verdicts.values():
        (v0, why0), (v1, why1) = per.get(0, (None, "missing")), per.get(1, (None, "missing"))
        if why0 or why1:
            failed[why0 or why1] += 1
            continue
        o = pairwise_outcome(v0, v1)
        outcomes[o] += 1
        wins.append(1.0 if o == "win" else 0.0)
        scores.append({"win": 1.0, "loss": 0.0}.get(o, 0.5))
    failed.update({f"generation_{k}": v for k, v in _gen_failures(out_dir, sname).items()})
    w = bootstrap_means(np.asarray(wins), None, cfg.eval.bootstrap_resamples, cfg.eval.seed)
    s = bootstrap_means(np.asarray(scores), None, cfg.eval.bootstrap_resamples, cfg.eval.seed)
    return {
        "prompt": prompt.name,
        "judge": cfg.eval.judge.model.path,
        "compare_to": cfg.eval.judge.compare_to,
        "judged": len(wins),
        "outcomes": {k: outcomes.get(k, 0) for k in ("win", "loss", "tie", "inconsistent")},
        "win_rate": w["mean"],
        "win_rate_ci95": w["ci95"],
        "score": s["mean"],
        "score_ci95": s["ci95"],
        "failed_by_reason": dict(failed),
    }


# ---------------------------------------------------------------------------------------------
# Stage entry point


def run_eval(cfg: PipelineConfig, out_dir: str) -> StageResult:
    """Evaluate the model (:func:`eval_model`) on every set of ``eval.sets``.

    Assumes Ray is initialised. Returns counts (eval rows in = evaluated + rejected) and per
    set: rows, rejects by reason, contaminated rows and each metric's summary.
    """
    t0 = time.perf_counter()
    model = eval_model(cfg, out_dir)
    if not os.path.exists(model[0]) and model[1] in ("sft", "dpo"):
        raise FileNotFoundError(f"eval: the {model[1]} model {model[0]} does not exist")
    pool_keys = pool_prompt_keys(out_dir) if cfg.eval.contamination_check else None
    rows_in = rows_out = 0
    reasons: Counter = Counter()
    per_set: dict[str, Any] = {}
    for s in cfg.eval.sets:
        ts = time.perf_counter()
        rows, rejects = read_eval_set(s)
        rows, dirty = split_contaminated(rows, pool_keys)
        rejects += dirty
        _write_table(
            pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA),
            os.path.join(rejects_dir(out_dir, NAME), s.name, "input.parquet"),
        )
        by_reason = Counter(r["reason"] for r in rejects)
        reasons.update(by_reason)
        rows_in += len(rows) + len(rejects)
        rows_out += len(rows)
        table = _rows_table(rows)
        entry: dict[str, Any] = {
            "rows": len(rows),
            "rejected_by_reason": dict(by_reason),
            "contaminated": len(dirty),
            "contamination_checked": pool_keys is not None,
        }
        if "likelihood" in cfg.eval.metrics:
            entry["likelihood"] = likelihood_metric(cfg, out_dir, s.name, table, model)
        if any(m.startswith("judge_") for m in cfg.eval.metrics):
            gen = generations(cfg, out_dir, s.name, table, model)
            gen = gen if gen is not None else pa.table({"id": [], "seq": [], "output": []})
            entry["generated"] = gen.num_rows
            if "judge_single" in cfg.eval.metrics:
                entry["judge_single"] = judge_single_metric(cfg, out_dir, s.name, gen)
            if "judge_pairwise" in cfg.eval.metrics:
                entry["judge_pairwise"] = judge_pairwise_metric(cfg, out_dir, s.name, gen)
        entry["seconds"] = round(time.perf_counter() - ts, 3)
        per_set[s.name] = entry
    counts = StageCounts(rows_in=rows_in, rows_out=rows_out, rejected_by_reason=dict(reasons))
    counts.check(NAME)
    metrics = {
        "model": model[0],
        "model_kind": model[1],
        "template": cfg.eval.template,
        "backend": cfg.eval.model.backend,
        "metrics": list(cfg.eval.metrics),
        "sets": per_set,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return StageResult(counts=counts, metrics=metrics)


def _models(cfg: PipelineConfig) -> list[ModelToLoad]:
    """The evaluated model unless this job trains it first (:func:`eval_model`), and the judge."""
    out: list[ModelToLoad] = []
    ev = cfg.eval
    if ev.model.path:
        out.append(ModelToLoad("eval.model.path", ev.model.path, ev.model.trust_remote_code))
    elif not {"sft", "dpo"} & set(cfg.stages):
        out_dir = os.path.abspath(os.path.expanduser(cfg.output.dir))
        sft_final = os.path.join(out_dir, "sft", "final")
        if os.path.isdir(sft_final):
            key = "eval.model.path (empty: <output.dir>/sft/final)"
            out.append(ModelToLoad(key, sft_final, ev.model.trust_remote_code))
        else:
            key = "eval.model.path (empty: the base model, sft.model or embed.model.path)"
            base = cfg.sft.model or cfg.embed.model.path
            out.append(ModelToLoad(key, base, ev.model.trust_remote_code))
    if any(m.startswith("judge_") for m in ev.metrics):
        jm = ev.judge.model
        out.append(ModelToLoad("eval.judge.model.path", jm.path, jm.trust_remote_code))
    return out


def _inputs(cfg: PipelineConfig) -> list[InputToRead]:
    """Each set's files and, for MT-Bench sets, its reference answer files."""
    out: list[InputToRead] = []
    for i, s in enumerate(cfg.eval.sets):
        key = f"eval.sets[{i}]"
        out.append(InputToRead(f"{key}.paths", s.paths, s.file_format, f"{key}.file_format"))
        if s.references:
            out.append(InputToRead(f"{key}.references", s.references, "auto", None))
    return out


STAGE = Stage(
    name=NAME,
    run=run_eval,
    config_keys=("eval",),
    hash_ignore=("resources",),  # how many actors run a model does not change a value
    extra_hash=_model_identity,
    reads=("dpo", "sft", "ingest"),
    output_columns=("id", "seq", "prompt_tokens", "answer_tokens", "nll_sum", "nll_mean"),
    resumes_by_shard=True,
    counts_batches=True,
    models=_models,
    inputs=_inputs,
    report=REPORT,
    doc="the trained model on held-out sets: reference-answer likelihood, local-judge metrics",
)

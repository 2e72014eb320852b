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

   - ``likelihood`` (:class:`~deita_ray.stages.eval.likelihood.LikelihoodScorer`): per row the NLL of the reference answer
     given the prompt (prompt log-probabilities, one prefill per row) -> ``likelihood/``;
     rows that cannot be scored (too long, template) -> ``rejects/eval/<set>/likelihood``.
   - ``judge_single`` / ``judge_pairwise``: greedy generations
     (:class:`~deita_ray.stages.eval.judge.Generator`) -> ``generations/``, then the judge
     (:class:`~deita_ray.stages.eval.judge.JudgeModel`) grades each answer, or compares it
     with ``eval.judge.compare_to`` in both orders -> ``judge_single/`` / ``judge_pairwise/``
     with the raw judge outputs; outputs that do not parse keep their reason.

Accounting: rows in = eval rows read (an MT-Bench question contributes its turns, a rejected
record one row) = rows evaluated + rejected (malformed, contaminated). Rows a metric could not
score are counted per metric in the metrics (``failed_by_reason``), not as stage rejects.

The modules, by what they compute: ``sets`` (steps 1 and 2), ``likelihood`` and ``judge``
(generation and judging) (step 3), ``passes`` (which model; one resumable Ray Data pass, shared
by the metrics); this one runs them in order and declares the stage.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import pyarrow as pa

from deita_ray.accounting import StageCounts, StageResult
from deita_ray.config import PipelineConfig
from deita_ray.data.rejects import REJECTS_SCHEMA
from deita_ray.data.sink import rejects_dir
from deita_ray.stages.base import InputToRead, ModelToLoad, Stage
from deita_ray.stages.eval.judge import generations, judge_pairwise_metric, judge_single_metric
from deita_ray.stages.eval.likelihood import likelihood_metric
from deita_ray.stages.eval.passes import NAME, eval_model, model_identity
from deita_ray.stages.eval.sets import (
    pool_prompt_keys,
    read_eval_set,
    rows_table,
    split_contaminated,
    write_table,
)

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
        write_table(
            pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA),
            os.path.join(rejects_dir(out_dir, NAME), s.name, "input.parquet"),
        )
        by_reason = Counter(r["reason"] for r in rejects)
        reasons.update(by_reason)
        rows_in += len(rows) + len(rejects)
        rows_out += len(rows)
        table = rows_table(rows)
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
    extra_hash=model_identity,
    reads=("dpo", "sft", "ingest"),
    output_columns=("id", "seq", "prompt_tokens", "answer_tokens", "nll_sum", "nll_mean"),
    resumes_by_shard=True,
    counts_batches=True,
    models=_models,
    inputs=_inputs,
    doc="the trained model on held-out sets: reference-answer likelihood, local-judge metrics",
)

"""``python -m deita_ray.study``: a controlled study, one fine-tuned model per selection method.

The job's config is a pipeline config (validated the same way) with a ``study`` section:

1. **Shared phase.** ``ingest``, ``score`` and ``embed`` (those of ``stages``) run once in
   ``<output.dir>`` through :func:`deita_ray.pipeline.run`, resumable as any job.
2. **Arms.** Each arm (``study.arms``, expanded over ``taus`` / ``seeds``) is a pipeline job of
   its own in ``<output.dir>/arms/<arm>`` running ``select`` -> ``sft`` (-> ``dpo``) -> ``eval``
   (the ``base`` arm: ``eval`` only, on the untrained model) with the study's budget, base model,
   recipe and seeds; only the selection settings differ. The arm folder reads the shared
   outputs through relative symlinks (``ingest``, ``score``, ``embed`` -> ``../../<stage>``), so
   the stage functions never know about arms; the complexity-only, quality-only and
   diversity-only arms instead get a derived copy of ``score`` / ``embed`` whose
   ``evol_score`` holds their own row score (:func:`arm_row_scores`, the one place that defines
   it). The shared stages' manifest entries are copied into the arm's manifest, so a change
   upstream re-runs the arm, and nothing else does: a finished arm is skipped, an interrupted
   one resumes where it stopped, and adding an arm never recomputes the others.
   Arms run as Ray tasks, ``study.max_concurrent_arms`` at a time; an arm that fails is
   reported as failed with its error and the others go on.
3. **Summary.** ``<output.dir>/study.json`` (per arm: selection statistics, overlaps, training
   loss, each eval metric with its interval, wall time per phase; the random arms' spread and
   each arm's verdict against it), ``study.md`` (the table) and ``plots/study_*.png``.

Works on a laptop and under ``ray job submit -- python -m deita_ray.study --config ...``.
See docs/evaluation.md for how to read the table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import html
import json
import logging
import math
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deita_ray.config import (
    ConfigError,
    PipelineConfig,
    config_hash,
)
from deita_ray.data.sink import parquet_files, stage_dir
from deita_ray.evaluation import METRIC_KEYS

log = logging.getLogger("deita_ray.study")

SHARED_STAGES = ("ingest", "score", "embed")
"""Stages run once for all arms."""
ARM_STAGES = ("select", "sft", "dpo", "eval")
"""Stages every (trained) arm runs in its own folder."""
ARMS_DIR = "arms"
STUDY_JSON = "study.json"
STUDY_MD = "study.md"
DERIVED_MARKER = ".derived.json"

DERIVED_SCORE_METHODS = {"complexity": "score", "quality": "score", "diversity": "embed"}
"""Arms whose selection runs on a derived copy of a shared folder (the folder it replaces)."""

SELECT_METHOD = {
    "deita": "deita",
    "random": "random",
    "score": "score",
    "complexity": "score",
    "quality": "score",
    "instruction_length": "instruction_length",
    "response_length": "response_length",
    "kcenter": "kcenter",
    "diversity": "deita",
}
"""The ``select.method`` each study method runs with."""

NEEDS = {
    "deita": ("score", "embed"),
    "score": ("score",),
    "complexity": ("score",),
    "quality": ("score",),
    "kcenter": ("embed",),
    "diversity": ("embed",),
}
"""Shared stages an arm's method needs."""

_ARM_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Arm:
    """One concrete arm: a selection method with its parameters."""

    name: str
    method: str
    tau: float | None = None
    seed: int | None = None

    @property
    def trains(self) -> bool:
        return self.method != "base"


# ---------------------------------------------------------------------------------------------
# Arms and their configs


def expand_arms(cfg: PipelineConfig) -> list[Arm]:
    """The concrete arms of ``study.arms`` (one per tau of deita/diversity, per seed of random).

    Raises:
        ConfigError: no arm, a duplicate or malformed name, or a method whose inputs the job's
            stages do not produce.
    """
    arms: list[Arm] = []
    for i, a in enumerate(cfg.study.arms):
        key = f"study.arms[{i}]"
        if a.taus and a.method not in ("deita", "diversity"):
            raise ConfigError(f"{key}.taus: only for methods deita and diversity, not {a.method}")
        if a.seeds and a.method != "random":
            raise ConfigError(f"{key}.seeds: only for method random, not {a.method}")
        if a.method in ("deita", "diversity"):
            taus = a.taus or [cfg.select.tau]
            for t in taus:
                base = a.name or a.method
                name = f"{base}_tau{t:g}" if (len(taus) > 1 or not a.name) else base
                arms.append(Arm(name, a.method, tau=float(t)))
        elif a.method == "random":
            seeds = a.seeds or [cfg.select.seed]
            for s in seeds:
                base = a.name or a.method
                name = f"{base}_s{s}" if (len(seeds) > 1 or not a.name) else base
                arms.append(Arm(name, a.method, seed=int(s)))
        else:
            arms.append(Arm(a.name or a.method, a.method))
    if not arms:
        raise ConfigError("study.arms: a study needs at least one arm")
    names = [a.name for a in arms]
    for name in names:
        if not _ARM_NAME.match(name) or name.startswith("."):
            raise ConfigError(f"study.arms: arm name {name!r} must be letters, digits, _ - .")
        if names.count(name) > 1:
            raise ConfigError(f"study.arms: two arms are named {name!r}; give them distinct names")
    if "eval" not in cfg.stages:
        raise ConfigError("stages: a study needs the 'eval' stage (every arm is evaluated)")
    if any(a.trains for a in arms) and not {"select", "sft"} <= set(cfg.stages):
        raise ConfigError("stages: a study with trained arms needs 'select' and 'sft'")
    for arm in arms:
        missing = [s for s in NEEDS.get(arm.method, ()) if s not in cfg.stages]
        if missing:
            raise ConfigError(
                f"study.arms: arm {arm.name!r} (method {arm.method}) needs the stages "
                f"{', '.join(missing)} in stages"
            )
    if cfg.eval.model.path:
        raise ConfigError(
            "eval.model.path: must be empty in a study (each arm evaluates its own model)"
        )
    return arms


def arm_config(cfg: PipelineConfig, arm: Arm, arm_dir: str) -> PipelineConfig:
    """The pipeline config of one arm: the study's, with the arm's selection and folder."""
    select = dataclasses.replace(cfg.select, method=SELECT_METHOD.get(arm.method, "random"))
    if arm.tau is not None:
        select = dataclasses.replace(select, tau=arm.tau)
    if arm.seed is not None:
        select = dataclasses.replace(select, seed=arm.seed)
    stages = [s for s in cfg.stages if s in ARM_STAGES] if arm.trains else ["eval"]
    return dataclasses.replace(
        cfg,
        stages=stages,
        select=select,
        output=dataclasses.replace(cfg.output, dir=arm_dir),
        demo_pool=False,
    )


# ---------------------------------------------------------------------------------------------
# Derived scores (complexity-only, quality-only, diversity-only)


def arm_row_scores(method: str, table: pa.Table) -> pa.Array:
    """The row score a complexity-, quality- or diversity-only arm selects by.

    - ``complexity``: the sum over the row's turns of ``complexity_scores`` (the per-turn
      complexity of the score stage), so multi-turn rows add up as in the evol score
      ``sum_i c_i * q_i``;
    - ``quality``: the sum over turns of ``quality_scores``;
    - ``diversity``: 0.0 for every row (the greedy then walks the pool in input order, keeping
      what is not within tau of a kept row).

    Rows without scores get null (not candidates). When the score stage offers a selection
    expression (``select.score``), these arms become ``score`` arms with that expression here.
    """
    n = table.num_rows
    if method == "diversity":
        return pa.array(np.zeros(n), pa.float64())
    column = {"complexity": "complexity_scores", "quality": "quality_scores"}[method]
    lists = table[column].combine_chunks()
    flat = pc.list_flatten(lists).cast(pa.float64()).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    sums = np.bincount(parents, weights=flat, minlength=n)
    valid = pc.fill_null(pc.greater(pc.list_value_length(lists), 0), False)
    return pa.array(sums, pa.float64(), mask=~valid.to_numpy(zero_copy_only=False))


def _write_derived(src: str, dst: str, method: str, source_hash: str) -> None:
    """``dst`` = ``src``'s Parquet files with ``evol_score`` replaced by the arm's row score."""
    marker = os.path.join(dst, DERIVED_MARKER)
    want = {"source_hash": source_hash, "method": method}
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == want:
                return
    import shutil

    if os.path.islink(dst):
        os.remove(dst)
    shutil.rmtree(dst, ignore_errors=True)
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for path in parquet_files(src):
        table = pq.read_table(path)
        i = table.column_names.index("evol_score")
        table = table.set_column(i, "evol_score", arm_row_scores(method, table))
        pq.write_table(table, os.path.join(tmp, os.path.basename(path)))
    with open(os.path.join(tmp, DERIVED_MARKER), "w") as f:
        json.dump(want, f)
    os.replace(tmp, dst)


def prepare_arm(out_dir: str, arm: Arm, shared_manifest: dict) -> str:
    """Create ``<out_dir>/arms/<arm>``: links to the shared outputs (or derived copies) and
    the shared stages' manifest entries. Returns the arm's folder."""
    from deita_ray.pipeline import MANIFEST, _write_json_atomic, read_manifest

    arm_dir = os.path.join(out_dir, ARMS_DIR, arm.name)
    os.makedirs(arm_dir, exist_ok=True)
    derived = DERIVED_SCORE_METHODS.get(arm.method)
    done = shared_manifest.get("stages", {})
    manifest = read_manifest(arm_dir)
    for stage in SHARED_STAGES:
        link = os.path.join(arm_dir, stage)
        entry = done.get(stage)
        if stage == derived and entry is not None:
            _write_derived(stage_dir(out_dir, stage), link, arm.method, entry.get("hash", ""))
            entry = dict(entry, hash=config_hash({"shared": entry.get("hash"), "rule": arm.method}))
        elif os.path.isdir(stage_dir(out_dir, stage)) and not os.path.islink(link):
            if os.path.exists(link):
                import shutil

                shutil.rmtree(link)
            os.symlink(os.path.join("..", "..", stage), link)
        if entry is not None:
            manifest.setdefault("stages", {})[stage] = copy.deepcopy(entry)
        else:
            manifest.setdefault("stages", {}).pop(stage, None)
    _write_json_atomic(os.path.join(arm_dir, MANIFEST), manifest)
    return arm_dir


def _run_arm(cfg: PipelineConfig) -> dict:
    """Body of an arm's Ray task: the pipeline over the arm's folder."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from deita_ray.pipeline import run

    t0 = time.perf_counter()
    report = run(cfg)
    return {"seconds": round(time.perf_counter() - t0, 3), "stages": report.get("stages", {})}


# ---------------------------------------------------------------------------------------------
# Running the study


def run_study(cfg: PipelineConfig) -> dict:
    """Run the shared stages, then every arm, then write the summary. Returns study.json."""
    import ray

    from deita_ray.pipeline import read_manifest, run
    from deita_ray.runtime import init_ray

    arms = expand_arms(cfg)
    out_dir = os.path.abspath(os.path.expanduser(cfg.output.dir))
    os.makedirs(out_dir, exist_ok=True)
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    shared = [s for s in cfg.stages if s in SHARED_STAGES]
    shared_report = run(cfg, enabled=shared) if shared else {"stages": {}}
    shared_seconds = round(time.perf_counter() - t0, 3)
    manifest = read_manifest(out_dir)

    task = ray.remote(num_cpus=0, max_retries=0)(_run_arm)
    pending = deque(arms)
    running: dict[Any, Arm] = {}
    results: dict[str, dict] = {}
    t_arms = time.perf_counter()
    while pending or running:
        while pending and len(running) < cfg.study.max_concurrent_arms:
            arm = pending.popleft()
            arm_dir = prepare_arm(out_dir, arm, manifest)
            log.info("arm %s (%s): starting in %s", arm.name, arm.method, arm_dir)
            running[task.remote(arm_config(cfg, arm, arm_dir))] = arm
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            arm = running.pop(ref)
            try:
                results[arm.name] = {"status": "done", **ray.get(ref)}
                log.info("arm %s: done", arm.name)
            except Exception as e:  # noqa: BLE001 - one arm's failure must not end the study
                results[arm.name] = {"status": "failed", "error": _error_text(e)}
                log.error("arm %s: failed: %s", arm.name, results[arm.name]["error"])
            # The summary so far, after every arm: a long study shows its table as it goes.
            partial = {
                "shared_s": shared_seconds,
                "arms_s": round(time.perf_counter() - t_arms, 3),
                "total_s": round(time.perf_counter() - t0, 3),
            }
            write_outputs(
                out_dir,
                summarize(cfg, out_dir, arms, results, shared_report.get("stages", {}), partial),
            )
    timing = {
        "shared_s": shared_seconds,
        "arms_s": round(time.perf_counter() - t_arms, 3),
        "total_s": round(time.perf_counter() - t0, 3),
    }
    study = summarize(cfg, out_dir, arms, results, shared_report.get("stages", {}), timing)
    write_outputs(out_dir, study)
    return study


def _error_text(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"[:2000]
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return (lines[-1] if lines else type(e).__name__)[:2000]


# ---------------------------------------------------------------------------------------------
# Summary


def _pool_table(out_dir: str) -> pa.Table | None:
    """id, user/assistant chars, turns and the scores of the shared pool (score or ingest)."""
    from deita_ray.selection.baselines import message_lengths

    for stage in ("score", "ingest"):
        files = parquet_files(stage_dir(out_dir, stage))
        if not files:
            continue
        names = pq.read_schema(files[0]).names
        cols = [
            c
            for c in ("id", "messages", "complexity_scores", "quality_scores", "evol_score")
            if c in names
        ]
        t = pa.concat_tables([pq.read_table(f, columns=cols) for f in files])
        msgs = t["messages"]
        out = {
            "id": t["id"],
            "instruction_chars": message_lengths(msgs, "user"),
            "response_chars": message_lengths(msgs, "assistant"),
        }
        for c in ("complexity_scores", "quality_scores"):
            if c in t.column_names:
                # Per row: the mean over its turns.
                lists = t[c].combine_chunks()
                flat = pc.list_flatten(lists).cast(pa.float64()).to_numpy(zero_copy_only=False)
                parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
                n = np.bincount(parents, minlength=t.num_rows)
                s = np.bincount(parents, weights=flat, minlength=t.num_rows)
                with np.errstate(invalid="ignore", divide="ignore"):
                    out[c.replace("_scores", "_mean")] = np.where(
                        n > 0, s / np.maximum(n, 1), np.nan
                    )
        if "evol_score" in t.column_names:
            out["evol_score"] = t["evol_score"]
        return pa.table(out)
    return None


def _mean(values: np.ndarray) -> float | None:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


def selection_statistics(pool: pa.Table | None, ids: list[str]) -> dict[str, Any]:
    """Mean lengths and scores of the selected rows (scores from the shared score stage)."""
    out: dict[str, Any] = {"selected": len(ids)}
    if pool is None or not ids:
        return out
    sel = pool.filter(pc.is_in(pool["id"], value_set=pa.array(ids, pa.string())))
    for col in (
        "instruction_chars",
        "response_chars",
        "evol_score",
        "complexity_mean",
        "quality_mean",
    ):
        if col in sel.column_names:
            out[f"mean_{col}"] = _mean(
                pc.cast(sel[col], pa.float64()).to_numpy(zero_copy_only=False)
            )
    return out


def _read_ids(arm_dir: str) -> list[str]:
    files = parquet_files(stage_dir(arm_dir, "select"))
    if not files:
        return []
    t = pa.concat_tables([pq.read_table(f, columns=["id", "rank"]) for f in files])
    return t.sort_by("rank")["id"].to_pylist()


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _arm_metrics(report: dict | None) -> tuple[dict, dict, dict]:
    """(training, eval metrics per set/metric, seconds per stage) of an arm's report.json."""
    stages = (report or {}).get("stages", {})
    training = {}
    sft = (stages.get("sft") or {}).get("metrics") or {}
    for k in ("loss_first", "loss_last", "steps", "examples", "tokens"):
        if k in sft:
            training[k] = sft[k]
    evals: dict[str, dict] = {}
    sets = ((stages.get("eval") or {}).get("metrics") or {}).get("sets") or {}
    for sname, entry in sets.items():
        for metric, (vkey, ckey, _) in METRIC_KEYS.items():
            m = entry.get(metric)
            if isinstance(m, dict):
                evals.setdefault(sname, {})[metric] = {
                    "value": m.get(vkey),
                    "ci95": m.get(ckey),
                    **{k: v for k, v in m.items() if k not in (vkey, ckey)},
                }
        evals.setdefault(sname, {})["contaminated"] = entry.get("contaminated")
    seconds = {s: r.get("seconds") for s, r in stages.items() if isinstance(r, dict)}
    return training, evals, seconds


def _own_stage_seconds(seconds: dict) -> float | None:
    """An arm's work time: the sum of its own stages' seconds (not the shared ones it links),
    as recorded by whichever run computed them, so a resumed study keeps the real figure."""
    own = [v for s, v in seconds.items() if s not in SHARED_STAGES and isinstance(v, int | float)]
    return round(sum(own), 3) if own else None


def verdict(value_ci: list | None, spread: list[float] | None, lower_better: bool) -> str:
    """An arm against the random arms: ``better`` / ``worse`` only when its interval lies
    entirely outside the spread (min..max) of the random arms' values, else ``within``."""
    if not spread or not value_ci or None in value_ci:
        return "n/a"
    lo, hi = value_ci
    smin, smax = spread
    if hi < smin:
        return "better" if lower_better else "worse"
    if lo > smax:
        return "worse" if lower_better else "better"
    return "within"


def summarize(
    cfg: PipelineConfig,
    out_dir: str,
    arms: list[Arm],
    results: dict[str, dict],
    shared_stages: dict,
    timing: dict,
) -> dict:
    """study.json: per arm selection statistics, overlaps, training, eval metrics, phases."""
    pool = _pool_table(out_dir)
    per_arm: dict[str, dict] = {}
    selections: dict[str, set[str]] = {}
    for arm in arms:
        arm_dir = os.path.join(out_dir, ARMS_DIR, arm.name)
        ids = _read_ids(arm_dir) if arm.trains else []
        selections[arm.name] = set(ids)
        training, evals, seconds = _arm_metrics(_read_json(os.path.join(arm_dir, "report.json")))
        res = results.get(arm.name, {})
        per_arm[arm.name] = {
            "method": arm.method,
            "tau": arm.tau,
            "seed": arm.seed,
            "status": res.get("status", "not_run"),
            "error": res.get("error"),
            "selection": selection_statistics(pool, ids) if arm.trains and ids else None,
            "training": training or None,
            "eval": evals,
            "seconds": {
                "wall": _own_stage_seconds(seconds),
                "this_run": res.get("seconds"),
                **seconds,
            },
        }
    for name, entry in per_arm.items():
        if entry["selection"] is not None:
            entry["selection"]["overlap"] = {
                other: len(selections[name] & ids)
                for other, ids in selections.items()
                if other != name and per_arm[other]["selection"] is not None
            }
    # Random spread and verdicts, per set and metric.
    random_arms = [
        a.name for a in arms if a.method == "random" and per_arm[a.name]["status"] == "done"
    ]
    comparisons: dict[str, dict] = {}
    for arm in arms:
        for sname, metrics in per_arm[arm.name]["eval"].items():
            for metric in METRIC_KEYS:
                if metric in metrics:
                    comparisons.setdefault(sname, {}).setdefault(metric, {})
    for sname, metrics in comparisons.items():
        for metric in metrics:
            lower = METRIC_KEYS[metric][2]
            values = [
                per_arm[n]["eval"].get(sname, {}).get(metric, {}).get("value") for n in random_arms
            ]
            values = [v for v in values if v is not None]
            spread = [min(values), max(values)] if values else None
            verdicts = {}
            for arm in arms:
                m = per_arm[arm.name]["eval"].get(sname, {}).get(metric)
                if arm.method == "random" or m is None:
                    continue
                verdicts[arm.name] = verdict(m.get("ci95"), spread, lower)
            metrics[metric] = {
                "lower_is_better": lower,
                "random_arms": len(values),
                "random_spread": spread,
                "verdicts": verdicts,
            }
    shared_seconds = {
        s: r.get("seconds") for s, r in (shared_stages or {}).items() if isinstance(r, dict)
    }
    arm_walls = [a["seconds"]["wall"] for a in per_arm.values() if a["seconds"]["wall"]]
    timing = {**timing, "arms_stages_s": round(sum(arm_walls), 3) if arm_walls else None}
    return {
        "output_dir": out_dir,
        "budget": cfg.select.budget,
        "base_model": cfg.sft.model or cfg.embed.model.path,
        "eval_sets": [s.name for s in cfg.eval.sets],
        "metrics": list(cfg.eval.metrics),
        "arms": per_arm,
        "comparisons": comparisons,
        "seconds": {"shared_stages": shared_seconds, **timing},
    }


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _cell(text: str) -> str:
    """Escape a table cell (Markdown pipes, HTML)."""
    return html.escape(str(text), quote=False).replace("|", "\\|")


def render_markdown(study: dict) -> str:
    """study.md: one row per arm; each eval metric with its interval and its verdict."""
    arms = study["arms"]
    cols = [
        (sname, metric) for sname, metrics in study["comparisons"].items() for metric in metrics
    ]
    head = ["arm", "method", "status", "selected", "instr. chars", "resp. chars", "evol", "loss"]
    for sname, metric in cols:
        unit = {
            "likelihood": "NLL/token ↓",
            "judge_single": "rating ↑",
            "judge_pairwise": "win rate ↑",
        }
        head += [f"{sname} {unit[metric]} [95% CI]", "vs random"]
    head.append("wall s")
    lines = [
        f"# Study: budget {study['budget']}, base model {_cell(study['base_model'])}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, a in arms.items():
        sel = a.get("selection") or {}
        row = [
            _cell(name),
            _cell(a["method"]),
            _cell(a["status"]),
            _fmt(sel.get("selected")),
            _fmt(sel.get("mean_instruction_chars"), 0),
            _fmt(sel.get("mean_response_chars"), 0),
            _fmt(sel.get("mean_evol_score"), 2),
            _fmt((a.get("training") or {}).get("loss_last")),
        ]
        for sname, metric in cols:
            m = a["eval"].get(sname, {}).get(metric)
            if m is None:
                row += ["–", "–"]
                continue
            ci = m.get("ci95") or [None, None]
            row.append(f"{_fmt(m.get('value'))} [{_fmt(ci[0])}, {_fmt(ci[1])}]")
            v = study["comparisons"][sname][metric]["verdicts"].get(name)
            row.append("(random)" if a["method"] == "random" else _cell(v or "–"))
        row.append(_fmt(a["seconds"].get("wall"), 0))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "How to read it:", ""]
    for sname, metrics in study["comparisons"].items():
        for metric, c in metrics.items():
            spread = c["random_spread"]
            lines.append(
                f"- {_cell(sname)} {metric}: the {c['random_arms']} random arm(s) span "
                + (
                    f"{_fmt(spread[0])} .. {_fmt(spread[1])}"
                    if spread
                    else "nothing (no random arm)"
                )
                + ". An arm is `better` / `worse` only when its whole 95% interval lies outside "
                "that spread; `within` means its difference from random is not larger than the "
                "seed noise."
            )
            if c["random_arms"] < 2:
                lines.append(
                    "  With fewer than 2 random seeds the spread does not measure seed noise."
                )
    failed = {n: a["error"] for n, a in arms.items() if a["status"] == "failed"}
    if failed:
        lines += ["", "Failed arms:", ""]
        lines += [f"- {_cell(n)}: {_cell(e)}" for n, e in failed.items()]
    s = study["seconds"]
    shared = s.get("shared_stages", {})
    lines += [
        "",
        "Stage time (as recorded by the run that computed each stage): shared stages "
        f"{', '.join(f'{k} {_fmt(v, 0)} s' for k, v in shared.items()) or '–'}; arms "
        f"{_fmt(s.get('arms_stages_s'), 0)} s (each arm's own stages: `wall s` above). "
        f"This run: {_fmt(s.get('total_s'), 0)} s (what earlier runs finished is not run again).",
        "",
    ]
    return "\n".join(lines)


def plot_study(study: dict, plots_dir: str) -> list[str]:
    """plots/study_metrics.png (each metric per arm with its interval, the random spread
    shaded) and plots/study_selection.png (selection statistics per arm)."""
    from deita_ray.report import _figure, _save

    written = []
    arms = study["arms"]
    panels = [(s, m) for s, ms in study["comparisons"].items() for m in ms]
    if panels:
        fig = _figure(max(6, 0.6 * len(arms) + 3) * len(panels), 4.5)
        axes = np.atleast_1d(fig.subplots(1, len(panels)))
        for ax, (sname, metric) in zip(axes, panels, strict=True):
            names, vals, los, his, colors = [], [], [], [], []
            for name, a in arms.items():
                m = a["eval"].get(sname, {}).get(metric)
                if not m or m.get("value") is None:
                    continue
                ci = m.get("ci95") or [m["value"], m["value"]]
                names.append(name)
                vals.append(m["value"])
                los.append(m["value"] - (ci[0] if ci[0] is not None else m["value"]))
                his.append((ci[1] if ci[1] is not None else m["value"]) - m["value"])
                colors.append("#9e9e9e" if a["method"] == "random" else "#1f77b4")
            x = np.arange(len(names))
            ax.errorbar(x, vals, yerr=[los, his], fmt="none", ecolor="#444444", capsize=3)
            ax.scatter(x, vals, c=colors, zorder=3)
            spread = study["comparisons"][sname][metric]["random_spread"]
            if spread:
                ax.axhspan(spread[0], spread[1], color="#d62728", alpha=0.15, label="random spread")
                ax.legend(loc="best")
            ax.set_xticks(x, names, rotation=45, ha="right")
            ax.set_title(
                f"{sname}: {metric} ({'lower' if METRIC_KEYS[metric][2] else 'higher'} is better)"
            )
            ax.grid(alpha=0.3)
        written.append(_save(fig, plots_dir, "study_metrics.png"))
    trained = {n: a for n, a in arms.items() if a.get("selection")}
    keys = [
        ("mean_instruction_chars", "instruction chars"),
        ("mean_response_chars", "response chars"),
        ("mean_evol_score", "evol score"),
        ("mean_complexity_mean", "complexity"),
        ("mean_quality_mean", "quality"),
    ]
    # Arms not run yet (a summary written while the study goes on) have no statistics.
    keys = [k for k in keys if any(a["selection"].get(k[0]) is not None for a in trained.values())]
    if keys:
        fig = _figure(4 * len(keys), 4)
        axes = np.atleast_1d(fig.subplots(1, len(keys)))
        names = list(trained)
        for ax, (key, label) in zip(axes, keys, strict=True):
            v = [trained[n]["selection"].get(key) or 0.0 for n in names]
            ax.bar(np.arange(len(names)), v, color="#1f77b4")
            ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right")
            ax.set_title(f"selection: mean {label}")
            ax.grid(alpha=0.3, axis="y")
        written.append(_save(fig, plots_dir, "study_selection.png"))
    return [f"plots/{w}" for w in written]


def write_outputs(out_dir: str, study: dict) -> None:
    """study.json, study.md and the plots, each written atomically."""
    from deita_ray.pipeline import _write_json_atomic
    from deita_ray.report import _jsonable

    study["plots"] = plot_study(study, os.path.join(out_dir, "plots"))
    _write_json_atomic(os.path.join(out_dir, STUDY_JSON), _jsonable(study))
    tmp = os.path.join(out_dir, f".tmp-{os.getpid()}-{STUDY_MD}")
    with open(tmp, "w") as f:
        f.write(render_markdown(study))
    os.replace(tmp, os.path.join(out_dir, STUDY_MD))


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    from deita_ray.pipeline import job_parser  # noqa: PLC0415

    p = job_parser(
        "python -m deita_ray.study",
        "Run a controlled study: ingest, score, embed once; then select -> sft -> eval per "
        "arm; write study.json, study.md and plots/study_*.png.",
        "study YAML (see jobs/study_*.yaml)",
    )
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="rebuild study.json / study.md / plots from the arms' reports without running",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from deita_ray.pipeline import start_job  # noqa: PLC0415

    args = build_parser().parse_args(argv)
    cfg = start_job(args)
    if isinstance(cfg, int):
        return cfg
    try:
        arms = expand_arms(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.summary_only:
        out_dir = os.path.abspath(os.path.expanduser(cfg.output.dir))
        old = _read_json(os.path.join(out_dir, STUDY_JSON)) or {}
        results = {
            n: {k: a.get(k) for k in ("status", "error")}
            | {"seconds": a["seconds"].get("this_run")}
            for n, a in (old.get("arms") or {}).items()
        }
        report = _read_json(os.path.join(out_dir, "report.json")) or {}
        study = summarize(
            cfg, out_dir, arms, results, report.get("stages", {}), old.get("seconds", {})
        )
        write_outputs(out_dir, study)
    else:
        study = run_study(cfg)
    failed = [n for n, a in study["arms"].items() if a["status"] != "done"]
    print(
        json.dumps(
            {
                "output_dir": study["output_dir"],
                "study": os.path.join(study["output_dir"], STUDY_JSON),
                "table": os.path.join(study["output_dir"], STUDY_MD),
                "failed_arms": failed,
            },
            indent=2,
        )
    )
    return 1 if failed and len(failed) == len(study["arms"]) else 0


if __name__ == "__main__":
    sys.exit(main())

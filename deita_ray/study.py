"""``python -m deita_ray.study``: a controlled study, one fine-tuned model per selection method
and training seed, each compared with random selection.

The job's config is a pipeline config (validated the same way) with a ``study`` section:

1. **Shared phase.** ``ingest``, ``score`` and ``embed`` (those of ``stages``) run once in
   ``<output.dir>`` through :func:`deita_ray.pipeline.run`, resumable as any job.
2. **Runs.** Each arm (``study.arms``, expanded over ``taus`` / ``seeds``) is trained once per
   training seed (``study.train_seeds``; the base arm: once, untrained): a pipeline job of its
   own in ``<output.dir>/arms/<run>`` (``<arm>`` at ``sft.seed``, else ``<arm>_t<seed>``)
   running ``select`` -> ``sft`` (-> ``dpo``) -> ``eval`` with the study's budget, base model
   and recipe; only the selection and the seed differ. The run folder reads the shared outputs
   through relative symlinks (``ingest``, ``score``, ``embed`` -> ``../../<stage>``), so the
   stage functions never know about arms; the complexity-only, quality-only and
   diversity-only arms instead get a derived copy of ``score`` / ``embed`` whose
   ``evol_score`` holds their own row score (:func:`arm_row_scores`, the one place that
   defines it). The shared stages' manifest entries are copied into the run's manifest, so a
   change upstream re-runs the run, and nothing else does: a finished run is skipped, an
   interrupted one resumes where it stopped, and adding an arm, a draw or a seed never
   recomputes the others. Runs are Ray tasks, ``study.max_concurrent_arms`` at a time; one
   that fails is reported with its error, left out of the statistics, and the others go on.
3. **Summary.** ``<output.dir>/study.json`` (per run: selection statistics, overlaps, training
   loss, each eval metric, the folder of its per-row values, wall time per phase; per eval set
   the paired comparison of every arm with random, its verdict and MDE
   (:func:`deita_ray.evaluation.paired_comparison`), the length-adjusted difference; the
   style flags across sets), ``study.md`` and ``plots/study_*.png``.
4. **Planning.** ``--plan DIR`` reads a study's study.json and prints the designs (eval rows,
   random draws, training seeds) that resolve a given difference, with their time.

Works on a laptop and under ``ray job submit -- python -m deita_ray.study --config ...``.
See docs/evaluation.md for the statistics and how to read the table.
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
from deita_ray.evaluation import (
    METRIC_KEYS,
    design_mde,
    length_adjusted,
    paired_comparison,
    style_effects,
)
from deita_ray.report.html import format_value

log = logging.getLogger("deita_ray.study")

SHARED_STAGES = ("ingest", "score", "embed")
"""Stages run once for all arms."""
ARM_STAGES = ("select", "sft", "dpo", "eval")
"""Stages every (trained) arm runs in its own folder."""
ARMS_DIR = "arms"
STUDY_JSON = "study.json"
STUDY_MD = "study.md"
POWER = 0.8
"""Power at which a study states its minimal detectable effect (MDE)."""
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
    if cfg.select.lazy_embed:
        # Every arm's select reads the one shared embed folder: arms running side by side
        # would embed into it at once, and only the deita arms read embeddings at all.
        raise ConfigError(
            "select.lazy_embed: not supported by the study job (its arms share one embed "
            "output); set it to false"
        )
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


# ---------------------------------------------------------------------------------------------
# Runs: an arm at a training seed


@dataclass(frozen=True)
class Run:
    """One model of the study: a trained arm at one training seed, or the untrained base."""

    name: str
    """Its folder, ``arms/<name>``: the arm's name at ``sft.seed``, else ``<arm>_t<seed>``."""
    arm: Arm
    train_seed: int | None
    """``sft.seed`` of the run; None for the base model."""


def train_seeds(cfg: PipelineConfig) -> list[int]:
    """The study's training seeds: ``study.train_seeds``, or ``[sft.seed]``."""
    return [int(s) for s in cfg.study.train_seeds] or [int(cfg.sft.seed)]


def expand_runs(cfg: PipelineConfig, arms: list[Arm]) -> list[Run]:
    """Every run of the study, seed by seed (all arms at the first seed, then all at the next:
    an interrupted study has whole seeds first); the base model once.

    Raises:
        ConfigError: a repeated training seed, or two runs with one folder name.
    """
    seeds = train_seeds(cfg)
    for s in seeds:
        if seeds.count(s) > 1:
            raise ConfigError(f"study.train_seeds: seed {s} appears twice")
    runs: list[Run] = []
    for i, k in enumerate(seeds):
        for arm in arms:
            if not arm.trains:
                if i == 0:
                    runs.append(Run(arm.name, arm, None))
                continue
            name = arm.name if k == cfg.sft.seed else f"{arm.name}_t{k}"
            runs.append(Run(name, arm, k))
    names = [r.name for r in runs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(
                f"study.arms: two runs would share the folder arms/{name} (an arm named like "
                "another arm's run at a training seed, <arm>_t<seed>); rename the arm"
            )
    return runs


def arm_config(cfg: PipelineConfig, run: Run, arm_dir: str) -> PipelineConfig:
    """The pipeline config of one run: the study's, with the arm's selection, the run's
    training seed and folder (sft.seed = the seed; dpo.seed moves by as much)."""
    arm = run.arm
    select = dataclasses.replace(cfg.select, method=SELECT_METHOD.get(arm.method, "random"))
    if arm.tau is not None:
        select = dataclasses.replace(select, tau=arm.tau)
    if arm.seed is not None:
        select = dataclasses.replace(select, seed=arm.seed)
    sft, dpo = cfg.sft, cfg.dpo
    if run.train_seed is not None and run.train_seed != cfg.sft.seed:
        sft = dataclasses.replace(cfg.sft, seed=run.train_seed)
        dpo = dataclasses.replace(cfg.dpo, seed=cfg.dpo.seed + run.train_seed - cfg.sft.seed)
    stages = [s for s in cfg.stages if s in ARM_STAGES] if arm.trains else ["eval"]
    return dataclasses.replace(
        cfg,
        stages=stages,
        select=select,
        sft=sft,
        dpo=dpo,
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


def prepare_arm(out_dir: str, run: Run, shared_manifest: dict) -> str:
    """Create ``<out_dir>/arms/<run>``: links to the shared outputs (or derived copies) and
    the shared stages' manifest entries. Returns the run's folder."""
    from deita_ray.pipeline import MANIFEST, read_manifest, write_json_atomic

    arm = run.arm
    arm_dir = os.path.join(out_dir, ARMS_DIR, run.name)
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
    write_json_atomic(os.path.join(arm_dir, MANIFEST), manifest)
    return arm_dir


def _run_arm(cfg: PipelineConfig) -> dict:
    """Body of an arm's Ray task: the pipeline over the arm's folder."""
    from deita_ray.pipeline import run, setup_logging

    setup_logging()
    t0 = time.perf_counter()
    report = run(cfg)
    return {"seconds": round(time.perf_counter() - t0, 3), "stages": report.get("stages", {})}


# ---------------------------------------------------------------------------------------------
# Running the study


def run_study(cfg: PipelineConfig) -> dict:
    """Run the shared stages, then every run (arm x training seed), then write the summary.
    Returns study.json."""
    import ray

    from deita_ray.data.lock import hold_output_lock
    from deita_ray.pipeline import read_manifest, run
    from deita_ray.runtime import init_ray

    arms = expand_arms(cfg)
    runs = expand_runs(cfg, arms)
    out_dir = os.path.abspath(os.path.expanduser(cfg.output.dir))
    os.makedirs(out_dir, exist_ok=True)
    hold_output_lock(out_dir)  # one run per folder; refuses while another holds it
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    shared = [s for s in cfg.stages if s in SHARED_STAGES]
    shared_report = run(cfg, enabled=shared) if shared else {"stages": {}}
    shared_seconds = round(time.perf_counter() - t0, 3)
    manifest = read_manifest(out_dir)

    task = ray.remote(num_cpus=0, max_retries=0)(_run_arm)
    pending = deque(runs)
    running: dict[Any, Run] = {}
    results: dict[str, dict] = {}
    t_arms = time.perf_counter()

    def write_summary() -> dict:
        """study.json and study.md from the runs finished so far."""
        seconds = {
            "shared_s": shared_seconds,
            "arms_s": round(time.perf_counter() - t_arms, 3),
            "total_s": round(time.perf_counter() - t0, 3),
        }
        study = summarize(cfg, out_dir, arms, results, shared_report.get("stages", {}), seconds)
        write_outputs(out_dir, study)
        return study

    while pending or running:
        while pending and len(running) < cfg.study.max_concurrent_arms:
            r = pending.popleft()
            arm_dir = prepare_arm(out_dir, r, manifest)
            log.info("run %s (%s): starting in %s", r.name, r.arm.method, arm_dir)
            running[task.remote(arm_config(cfg, r, arm_dir))] = r
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            r = running.pop(ref)
            try:
                results[r.name] = {"status": "done", **ray.get(ref)}
                log.info("run %s: done", r.name)
            except Exception as e:  # noqa: BLE001 - one run's failure must not end the study
                results[r.name] = {"status": "failed", "error": _error_text(e)}
                log.error("run %s: failed: %s", r.name, results[r.name]["error"])
            # The summary so far, after every run: a long study shows its table as it goes.
            write_summary()
    return write_summary()


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
    """(training, eval metrics per set/metric, seconds per stage) of a run's report.json."""
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
        evals[sname]["seconds"] = entry.get("seconds")
    seconds = {s: r.get("seconds") for s, r in stages.items() if isinstance(r, dict)}
    return training, evals, seconds


def _own_stage_seconds(seconds: dict) -> float | None:
    """A run's work time: the sum of its own stages' seconds (not the shared ones it links),
    as recorded by whichever invocation computed them, so a resumed study keeps the real
    figure."""
    own = [v for s, v in seconds.items() if s not in SHARED_STAGES and isinstance(v, int | float)]
    return round(sum(own), 3) if own else None


def _rows_dir(run_name: str, sname: str) -> str:
    """Where a run's per-row likelihood values of a set are, relative to the study folder."""
    return os.path.join(ARMS_DIR, run_name, "eval", sname, "likelihood")


def _read_rows(out_dir: str, run_name: str, sname: str) -> pa.Table | None:
    """``id``, ``answer_tokens``, ``nll_sum`` of a run on a set, sorted by id (None: none)."""
    files = parquet_files(os.path.join(out_dir, _rows_dir(run_name, sname)))
    if not files:
        return None
    cols = ["id", "answer_tokens", "nll_sum"]
    t = pa.concat_tables([pq.read_table(f, columns=cols) for f in files])
    t = t.filter(pc.is_valid(t["nll_sum"]))
    return t.sort_by("id") if t.num_rows else None


def _arm_lengths(runs: list[Run], per_run: dict[str, dict]) -> dict[str, float | None]:
    """Mean response characters of each arm's selection (the same for all its runs)."""
    out: dict[str, float | None] = {}
    for r in runs:
        sel = per_run[r.name].get("selection") or {}
        if out.get(r.arm.name) is None:
            out[r.arm.name] = sel.get("mean_response_chars")
    return out


def _left_out(entry: dict, has_rows: bool) -> str:
    """Why a run is not among those a comparison rests on."""
    if entry["status"] == "failed":
        return f"failed: {entry['error']}"
    if entry["status"] != "done":
        return "not run"
    if not has_rows:
        return "no per-row likelihood values"
    return "finished, but no random draw finished at its training seed (or its draw misses one)"


def likelihood_comparison(
    cfg: PipelineConfig,
    out_dir: str,
    arms: list[Arm],
    runs: list[Run],
    per_run: dict[str, dict],
    sname: str,
) -> dict[str, Any]:
    """Every compared arm against random on one set, from the runs' per-row values.

    The rows are those every finished run scored (a row one run could not score leaves the
    comparison for all, and is counted); a run that failed or has not run is left out and
    named. The statistics are :func:`deita_ray.evaluation.paired_comparison`'s; the length
    line is :func:`deita_ray.evaluation.length_adjusted`'s.
    """
    seeds = train_seeds(cfg)
    pos = {k: j for j, k in enumerate(seeds)}
    random_arms = [a for a in arms if a.method == "random"]
    compared = [a for a in arms if a.trains and a.method != "random"]
    base = next((a for a in arms if a.method == "base"), None)
    wanted = {a.name for a in (*random_arms, *compared)} | ({base.name} if base else set())
    tables: dict[str, pa.Table] = {}
    for r in runs:
        if r.arm.name in wanted and per_run[r.name]["status"] == "done":
            t = _read_rows(out_dir, r.name, sname)
            if t is not None:
                tables[r.name] = t
    out: dict[str, Any] = {"lower_is_better": True, "metric": "nll_token_mean"}
    if not tables:
        return {**out, "reason": "no finished run has per-row likelihood values", "verdicts": {}}
    common = set.intersection(*(set(t["id"].to_pylist()) for t in tables.values()))
    ids = pa.array(sorted(common), pa.string())
    aligned = {
        name: t.filter(pc.is_in(t["id"], value_set=ids)).sort_by("id") for name, t in tables.items()
    }
    tok = None
    for name, t in aligned.items():
        got = t["answer_tokens"].to_numpy().astype(np.float64)
        if tok is None:
            tok, first = got, name
        elif not np.array_equal(tok, got):
            return {
                **out,
                "reason": f"answer tokens differ between runs {first} and {name} (another "
                "tokenizer or template?): the rows are not the same",
                "verdicts": {},
            }
    n = len(ids)
    nan = np.full(n, np.nan)
    arm_vals = {a.name: np.tile(nan, (len(seeds), 1)) for a in compared}
    rnd = np.tile(nan, (len(random_arms), len(seeds), 1))
    base_vals = None
    for r in runs:
        t = aligned.get(r.name)
        if t is None:
            continue
        v = t["nll_sum"].to_numpy().astype(np.float64)
        if r.arm.method == "random":
            rnd[random_arms.index(r.arm), pos[r.train_seed]] = v
        elif r.arm.method == "base":
            base_vals = v
        else:
            arm_vals[r.arm.name][pos[r.train_seed]] = v
    res = paired_comparison(
        arm_vals,
        rnd,
        tok,
        base_vals,
        alpha=cfg.study.alpha,
        power=POWER,
        resamples=cfg.study.bootstrap_resamples,
        seed=cfg.eval.seed,
    )
    res.update(out)
    res["reference_tokens"] = float(tok.mean()) if n else None
    res["rows_dropped"] = max(t.num_rows for t in tables.values()) - n
    res["verdicts"] = {nm: a["verdict"] for nm, a in res["arms"].items()}
    runs_of = {a.name: [r for r in runs if r.arm.name == a.name] for a in arms}
    for a in compared:
        entry = res["arms"][a.name]
        used = {seeds[k] for k in entry.get("seed_index", [])}
        entry["runs"] = [r.name for r in runs_of[a.name] if r.train_seed in used]
        entry["runs_left_out"] = {
            r.name: _left_out(per_run[r.name], r.name in tables)
            for r in runs_of[a.name]
            if r.name not in entry["runs"]
        }
    rand = res["random"]
    used_draws = [random_arms[i] for i in rand["draw_index"]]
    used_seeds = {seeds[k] for k in rand["seed_index"]}
    rand["runs_used"] = [
        r.name for a in used_draws for r in runs_of[a.name] if r.train_seed in used_seeds
    ]
    rand["runs_left_out"] = {
        r.name: _left_out(per_run[r.name], r.name in tables)
        for a in random_arms
        for r in runs_of[a.name]
        if r.name not in rand["runs_used"]
    }
    rand["draw_names"] = [a.name for a in used_draws]
    lengths = _arm_lengths(runs, per_run)
    res["length"] = length_adjusted(
        res["arms"],
        {a.name: lengths.get(a.name) for a in compared},
        rand["draw_deltas"],
        [lengths.get(a.name) for a in used_draws],
    )
    if base is not None:
        res["base_arm"] = base.name
    return res


def summarize(
    cfg: PipelineConfig,
    out_dir: str,
    arms: list[Arm],
    results: dict[str, dict],
    shared_stages: dict,
    timing: dict,
) -> dict:
    """study.json: per run (arm x training seed) its selection statistics, overlaps, training,
    eval metrics, per-row value folders and seconds; per eval set the paired comparison of
    every arm with random; the style flags; the design and the primary comparison."""
    runs = expand_runs(cfg, arms)
    pool = _pool_table(out_dir)
    per_run: dict[str, dict] = {}
    selections: dict[str, set[str]] = {}
    for r in runs:
        arm, arm_dir = r.arm, os.path.join(out_dir, ARMS_DIR, r.name)
        ids = _read_ids(arm_dir) if arm.trains else []
        if ids and arm.name not in selections:
            selections[arm.name] = set(ids)
        training, evals, seconds = _arm_metrics(_read_json(os.path.join(arm_dir, "report.json")))
        res = results.get(r.name, {})
        per_run[r.name] = {
            "arm": arm.name,
            "method": arm.method,
            "tau": arm.tau,
            "seed": arm.seed,
            "train_seed": r.train_seed,
            "status": res.get("status", "not_run"),
            "error": res.get("error"),
            "dir": os.path.join(ARMS_DIR, r.name),
            "selection": selection_statistics(pool, ids) if arm.trains and ids else None,
            "training": training or None,
            "eval": evals,
            "eval_rows": {
                s: _rows_dir(r.name, s)
                for s in evals
                if parquet_files(os.path.join(out_dir, _rows_dir(r.name, s)))
            },
            "seconds": {
                "wall": _own_stage_seconds(seconds),
                "this_run": res.get("seconds"),
                "eval_sets": {s: e.get("seconds") for s, e in evals.items()},
                **seconds,
            },
        }
    for entry in per_run.values():
        if entry["selection"] is not None:
            mine = selections.get(entry["arm"], set())
            entry["selection"]["overlap"] = {
                other: len(mine & ids) for other, ids in selections.items() if other != entry["arm"]
            }
    comparisons: dict[str, dict] = {}
    if "likelihood" in cfg.eval.metrics:
        for s in cfg.eval.sets:
            comparisons[s.name] = {
                "likelihood": likelihood_comparison(cfg, out_dir, arms, runs, per_run, s.name)
            }
    per_set = {
        s: c["likelihood"]["arms"] for s, c in comparisons.items() if "arms" in c["likelihood"]
    }
    ref_tokens = {s: comparisons[s]["likelihood"]["reference_tokens"] for s in per_set}
    style = style_effects(per_set, ref_tokens) if len(per_set) > 1 else {}
    deita = next((a for a in arms if a.method == "deita"), None)
    primary = (
        {"arm": deita.name, "set": cfg.eval.sets[0].name}
        if deita is not None and cfg.eval.sets and comparisons
        else None
    )
    if primary is not None:
        got = comparisons[primary["set"]]["likelihood"].get("arms", {}).get(deita.name, {})
        primary.update({k: got.get(k) for k in ("verdict", "delta", "ci", "mde", "reason")})
    shared_seconds = {
        s: r.get("seconds") for s, r in (shared_stages or {}).items() if isinstance(r, dict)
    }
    walls = [a["seconds"]["wall"] for a in per_run.values() if a["seconds"]["wall"]]
    timing = {**timing, "arms_stages_s": round(sum(walls), 3) if walls else None}
    return {
        "output_dir": out_dir,
        "budget": cfg.select.budget,
        "base_model": cfg.sft.model or cfg.embed.model.path,
        "eval_sets": [s.name for s in cfg.eval.sets],
        "metrics": list(cfg.eval.metrics),
        "design": {
            "train_seeds": train_seeds(cfg),
            "random_draws": [a.name for a in arms if a.method == "random"],
            "compared_arms": [a.name for a in arms if a.trains and a.method != "random"],
            "base_arm": next((a.name for a in arms if a.method == "base"), None),
            "runs": {a.name: [r.name for r in runs if r.arm.name == a.name] for a in arms},
            "alpha": cfg.study.alpha,
            "power": POWER,
            "bootstrap_resamples": cfg.study.bootstrap_resamples,
            "bootstrap_seed": cfg.eval.seed,
            "max_concurrent_arms": cfg.study.max_concurrent_arms,
        },
        "primary": primary,
        "arms": per_run,
        "comparisons": comparisons,
        "style": style,
        "seconds": {"shared_stages": shared_seconds, **timing},
    }


def _sgn(v: Any, digits: int = 4) -> str:
    """A signed difference (``+0.0123``), or ``–``."""
    if not isinstance(v, int | float) or not math.isfinite(v):
        return "–"
    return f"{v:+.{digits}f}"


def _ci(ci: Any, digits: int = 4) -> str:
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return "–"
    return f"[{_sgn(ci[0], digits)}, {_sgn(ci[1], digits)}]"


def _cell(text: str) -> str:
    """Escape a table cell (Markdown pipes, HTML)."""
    return html.escape(str(text), quote=False).replace("|", "\\|")


def _sqrt(v: Any) -> float | None:
    return math.sqrt(v) if isinstance(v, int | float) and v >= 0 else None


def _design_lines(study: dict) -> list[str]:
    d = study.get("design") or {}
    seeds, draws = d.get("train_seeds") or [], d.get("random_draws") or []
    compared = d.get("compared_arms") or []
    lines = [
        f"Design: {len(compared)} arm(s) compared with random selection; {len(seeds)} training "
        f"seed(s) ({', '.join(map(str, seeds))}) and {len(draws)} random draw(s) "
        f"({', '.join(map(_cell, draws)) or 'none'}); every trained arm, random included, is "
        f"trained once per seed and compared with random seed by seed. α = "
        f"{format_value(d.get('alpha'), 2)} family-wise per eval set (Holm across the compared arms), "
        f"MDE at {round(100 * (d.get('power') or POWER))}% power; two-level bootstrap "
        f"{d.get('bootstrap_resamples')} resamples (seed {d.get('bootstrap_seed')}).",
        "",
    ]
    pr = study.get("primary")
    if pr:
        lines.append(
            f"**Primary comparison: {_cell(pr['arm'])} vs random on {_cell(pr['set'])}: "
            f"{pr.get('verdict') or 'not computed'}**"
            + (
                f" (Δ {_sgn(pr.get('delta'))} NLL/token, Holm-corrected interval "
                f"{_ci(pr.get('ci'))}, MDE {format_value(pr.get('mde'), 4)})"
                if pr.get("delta") is not None
                else ""
            )
            + (f"; {_cell(pr['reason'])}" if pr.get("reason") else "")
            + ". The other arms and sets are exploratory."
        )
    else:
        lines.append("No deita arm: every comparison is exploratory.")
    return lines


def _set_lines(sname: str, lk: dict) -> list[str]:
    lines = ["", f"## {_cell(sname)}", ""]
    if "arms" not in lk:
        return [*lines, f"No comparison: {_cell(lk.get('reason'))}."]
    rand, var = lk["random"], lk["variance"]
    seed_sd = _sqrt(var.get("seed"))
    lines.append(
        f"{lk['rows']} eval rows in common ({lk.get('rows_dropped', 0)} left out: a run could "
        f"not score them), references of {format_value(lk.get('reference_tokens'), 0)} answer tokens on "
        f"average. Random: {rand['draws']} draw(s) x {rand['seeds']} seed(s) = {rand['runs']} "
        f"runs, {format_value(rand.get('nll_token_mean'), 4)} NLL/token; SD of a draw's mean "
        f"{format_value(_sqrt(var.get('draw')), 4)}; SD of a training run about its selection's mean "
        f"{format_value(seed_sd, 4)} "
        + (
            "(assumed: with one training seed it cannot be measured; taken as a whole random "
            "run's)."
            if var.get("seed_assumed")
            else f"(pooled over {var.get('selections_pooled')} selections, {var.get('seed_df')} df)."
        )
    )
    base = lk.get("base")
    if base and "delta" in base:
        lines.append(
            f"The untrained base model: {format_value(base.get('nll_token_mean'), 4)} NLL/token, "
            f"{_sgn(base['delta'])} {_ci(base.get('ci95'))} against random: the gap that "
            "training on a random selection closes."
        )
    lines += [
        "",
        "| arm | Δ NLL/token vs random [Holm-corrected CI] | verdict | MDE | P(arm < random) "
        "| share of base→random gap | length-adjusted Δ [95% CI] | runs (arm + random) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    adj = (lk.get("length") or {}).get("arms", {})
    for nm, a in lk["arms"].items():
        verdict = a.get("verdict", "–")
        if verdict == "inconclusive" and a.get("reason") and "delta" not in a:
            verdict = f"inconclusive: {a['reason']}"
        gap = a.get("gap_fraction")
        la = adj.get(nm) or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    _cell(nm),
                    f"{_sgn(a.get('delta'))} {_ci(a.get('ci'))}" if "delta" in a else "–",
                    _cell(verdict),
                    format_value(a.get("mde"), 4),
                    format_value(a.get("p_better"), 2),
                    f"{100 * gap:+.0f}%" if isinstance(gap, float) else "–",
                    f"{_sgn(la.get('delta'))} {_ci(la.get('ci95'))}" if la else "–",
                    f"{a.get('seeds', 0)} + {rand['runs']}",
                ]
            )
            + " |"
        )
    length = lk.get("length") or {}
    if "slope_per_1k_chars" in length:
        lines += [
            "",
            f"Length: across the {length['points']} selections (arms and random draws), Δ "
            f"changes by {_sgn(length['slope_per_1k_chars'])} ± "
            f"{format_value(length['slope_se'], 4)} NLL/token per 1,000 characters of the selection's "
            f"mean response (R² {format_value(length.get('r2'), 2)}); the length-adjusted Δ removes "
            "that part (it also removes any quality effect that goes with length here).",
        ]
    elif length.get("reason"):
        lines += ["", f"Length-adjusted Δ: not computed ({_cell(length['reason'])})."]
    left = {**rand.get("runs_left_out", {})}
    for a in lk["arms"].values():
        left.update(a.get("runs_left_out") or {})
    if left:
        lines += ["", "Runs left out of these statistics:", ""]
        lines += [f"- {_cell(n)}: {_cell(why)}" for n, why in left.items()]
    return lines


def _style_lines(study: dict) -> list[str]:
    style = study.get("style") or {}
    sets = [s for s, c in study["comparisons"].items() if "arms" in (c.get("likelihood") or {})]
    if not style or len(sets) < 2:
        return []
    toks = {s: study["comparisons"][s]["likelihood"].get("reference_tokens") for s in sets}
    head = ["arm", *[f"{_cell(s)} ({format_value(toks[s], 0)} tok.)" for s in sets], "style"]
    lines = [
        "",
        "## Reference styles",
        "",
        "Δ per eval set (the same prompts answered in different styles where the sets share "
        "them); ↓ its 95% interval lies below 0 (wins), ↑ above (loses).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for nm, st in style.items():
        cells = [_cell(nm)]
        for s in sets:
            d = st["delta"].get(s)
            mark = " ↓" if s in st["wins"] else " ↑" if s in st["loses"] else ""
            cells.append(_sgn(d) + mark)
        if st["style_effect"]:
            note = f"style effect: favours {st['direction']}"
        elif st["sign_flip"]:
            note = "sign differs across sets (not resolved)"
        else:
            note = "–"
        cells.append(note)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _runs_lines(study: dict) -> list[str]:
    runs = study["arms"]
    sets = list(study["comparisons"]) or list(study.get("eval_sets") or [])
    head = ["run", "arm", "train seed", "status", "selected", "instr. chars", "resp. chars"]
    head += ["evol", "loss", *[f"{_cell(s)} NLL/token" for s in sets], "eval s", "wall s"]
    lines = [
        "",
        "## Runs",
        "",
        "One row per trained model (arm x training seed); NLL/token over the set's rows with "
        "the 95% bootstrap interval over rows (a fixed model measured, not seed noise).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, a in runs.items():
        sel = a.get("selection") or {}
        row = [
            _cell(name),
            _cell(a.get("arm", name)),
            format_value(a.get("train_seed")),
            _cell(a["status"]),
            format_value(sel.get("selected")),
            format_value(sel.get("mean_instruction_chars"), 0),
            format_value(sel.get("mean_response_chars"), 0),
            format_value(sel.get("mean_evol_score"), 2),
            format_value((a.get("training") or {}).get("loss_last")),
        ]
        for s in sets:
            m = (a["eval"].get(s) or {}).get("likelihood")
            ci = (m or {}).get("ci95") or [None, None]
            row.append(
                f"{format_value(m.get('value'))} [{format_value(ci[0])}, {format_value(ci[1])}]"
                if m
                else "–"
            )
        row += [
            format_value(a["seconds"].get("eval"), 0),
            format_value(a["seconds"].get("wall"), 0),
        ]
        lines.append("| " + " | ".join(row) + " |")
    failed = {n: a["error"] for n, a in runs.items() if a["status"] == "failed"}
    if failed:
        lines += ["", "Failed runs (left out of the statistics):", ""]
        lines += [f"- {_cell(n)}: {_cell(e)}" for n, e in failed.items()]
    return lines


def render_markdown(study: dict) -> str:
    """study.md: the design and the primary comparison; per eval set every arm's paired
    difference from random with its verdict, MDE and length-adjusted value; the reference
    styles side by side; one row per run; the time."""
    lines = [
        f"# Study: budget {study['budget']}, base model {_cell(study['base_model'])}",
        "",
        *_design_lines(study),
    ]
    for sname, c in study["comparisons"].items():
        if "likelihood" in c:
            lines += _set_lines(sname, c["likelihood"])
    lines += _style_lines(study)
    lines += _runs_lines(study)
    s = study["seconds"]
    shared = s.get("shared_stages", {})
    lines += [
        "",
        "Stage time (as recorded by the run that computed each stage): shared stages "
        f"{', '.join(f'{k} {format_value(v, 0)} s' for k, v in shared.items()) or '–'}; runs "
        f"{format_value(s.get('arms_stages_s'), 0)} s (each run's own stages: `wall s` above). "
        f"This invocation: {format_value(s.get('total_s'), 0)} s (what earlier ones finished is not "
        "run again).",
        "",
        "How to read it: Δ < 0 means the arm's model gives the reference answers a lower NLL "
        "than random selection's models at the same seeds. `better` / `worse`: the "
        "Holm-corrected interval excludes 0; `equivalent`: it lies inside ±MDE (no difference "
        "as large as the study can detect); `inconclusive`: neither — more rows, draws or "
        "seeds would tell (`python -m deita_ray.study --plan <output dir>`). "
        "docs/evaluation.md has the formulas.",
        "",
    ]
    return "\n".join(lines)


_VERDICT_COLORS = {
    "better": "#2ca02c",
    "worse": "#d62728",
    "equivalent": "#1f77b4",
    "inconclusive": "#7f7f7f",
}


def plot_study(study: dict, plots_dir: str) -> list[str]:
    """plots/study_metrics.png (per eval set, each arm's Δ vs random with its Holm-corrected
    interval and its ±MDE band) and plots/study_selection.png (selection statistics per
    arm)."""
    from deita_ray.report.plots import figure, save_png

    written = []
    panels = [
        (s, c["likelihood"])
        for s, c in study["comparisons"].items()
        if any("delta" in a for a in (c.get("likelihood") or {}).get("arms", {}).values())
    ]
    if panels:
        width = max(6, 0.7 * max(len(lk["arms"]) for _, lk in panels) + 3)
        fig = figure(width * len(panels), 4.5)
        axes = np.atleast_1d(fig.subplots(1, len(panels)))
        for ax, (sname, lk) in zip(axes, panels, strict=True):
            names = [n for n, a in lk["arms"].items() if "delta" in a]
            x = np.arange(len(names))
            for j, nm in enumerate(names):
                a = lk["arms"][nm]
                if a.get("mde"):
                    ax.bar(j, 2 * a["mde"], bottom=-a["mde"], width=0.6, color="#cccccc")
                lo, hi = a.get("ci") or [a["delta"], a["delta"]]
                color = _VERDICT_COLORS.get(a.get("verdict"), "#444444")
                ax.errorbar(
                    j,
                    a["delta"],
                    yerr=[[a["delta"] - lo], [hi - a["delta"]]],
                    fmt="o",
                    color=color,
                    capsize=4,
                )
            ax.axhline(0, color="#444444", lw=0.8)
            ax.set_xticks(x, names, rotation=45, ha="right")
            ax.set_title(f"{sname}: Δ NLL/token vs random (grey: ±MDE)")
            ax.grid(alpha=0.3, axis="y")
        written.append(save_png(fig, plots_dir, "study_metrics.png"))
    selections: dict[str, dict] = {}
    for a in study["arms"].values():
        if a.get("selection") and a.get("arm", "") not in selections:
            selections[a.get("arm")] = a["selection"]
    keys = [
        ("mean_instruction_chars", "instruction chars"),
        ("mean_response_chars", "response chars"),
        ("mean_evol_score", "evol score"),
        ("mean_complexity_mean", "complexity"),
        ("mean_quality_mean", "quality"),
    ]
    # Arms not run yet (a summary written while the study goes on) have no statistics.
    keys = [k for k in keys if any(sel.get(k[0]) is not None for sel in selections.values())]
    if keys:
        fig = figure(4 * len(keys), 4)
        axes = np.atleast_1d(fig.subplots(1, len(keys)))
        names = list(selections)
        for ax, (key, label) in zip(axes, keys, strict=True):
            v = [selections[n].get(key) or 0.0 for n in names]
            ax.bar(np.arange(len(names)), v, color="#1f77b4")
            ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right")
            ax.set_title(f"selection: mean {label}")
            ax.grid(alpha=0.3, axis="y")
        written.append(save_png(fig, plots_dir, "study_selection.png"))
    return [f"plots/{w}" for w in written]


def write_outputs(out_dir: str, study: dict) -> None:
    """study.json, study.md and the plots, each written atomically."""
    from deita_ray.pipeline import write_json_atomic
    from deita_ray.report.section import jsonable

    study["plots"] = plot_study(study, os.path.join(out_dir, "plots"))
    write_json_atomic(os.path.join(out_dir, STUDY_JSON), jsonable(study))
    tmp = os.path.join(out_dir, f".tmp-{os.getpid()}-{STUDY_MD}")
    with open(tmp, "w") as f:
        f.write(render_markdown(study))
    os.replace(tmp, os.path.join(out_dir, STUDY_MD))


# ---------------------------------------------------------------------------------------------
# Planning: what resolves a given difference, and what it costs


def _phase_seconds(study: dict, sname: str) -> dict[str, float | None]:
    """Measured seconds per phase: training a run (select + sft (+ dpo)), evaluating one row
    of ``sname`` (the set's eval seconds over its rows, engine start included) and the other
    sets' eval per run, as means over the finished runs."""
    train, row, other = [], [], []
    for a in study["arms"].values():
        if a.get("status") != "done":
            continue
        sec = a.get("seconds") or {}
        sets = sec.get("eval_sets") or {}
        if a.get("train_seed") is not None and isinstance(sec.get("wall"), int | float):
            train.append(sec["wall"] - (sec.get("eval") or 0.0))
        rows = ((a.get("eval") or {}).get(sname, {}).get("likelihood") or {}).get("rows")
        if isinstance(sets.get(sname), int | float) and rows:
            row.append(sets[sname] / rows)
        others = [v for s, v in sets.items() if s != sname and isinstance(v, int | float)]
        if others:
            other.append(sum(others))
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    return {"train_s": mean(train), "row_s": mean(row), "other_sets_s": mean(other) or 0.0}


def plan_study(
    study: dict,
    target: float,
    set_name: str | None = None,
    *,
    max_rows: int | None = None,
    max_draws: int = 32,
    max_seeds: int = 16,
    top: int = 8,
) -> dict[str, Any]:
    """Designs (eval rows n, random draws R, training seeds K) whose MDE is at most ``target``
    on one set, from a finished (or pilot) study's measured variances and phase seconds.

    For each (R, K) the smallest n with :func:`deita_ray.evaluation.design_mde` <= target
    (the MDE falls as n grows, down to the floor the draws and seeds leave); its cost in stage
    seconds is runs x (training + eval of every set), with the number of compared arms and
    the phase seconds measured here. A pilot with one training seed cannot split a run's
    variance into draw and training parts: both extremes are evaluated and the larger MDE
    kept. Returns the current design's MDE, the cheapest designs that resolve ``target`` and,
    when none does within the limits, the smallest MDE within them.
    """
    comps = study.get("comparisons") or {}
    primary = study.get("primary") or {}
    if set_name is None:
        set_name = primary.get("set") or next(iter(comps), None)
    lk = (comps.get(set_name) or {}).get("likelihood") or {}
    if "variance" not in lk or lk["variance"].get("draw") is None:
        raise ValueError(
            f"set {set_name!r}: the study has no measured variances (it needs finished runs "
            "of at least 2 random draws)"
        )
    var = lk["variance"]
    arms = {n: a for n, a in lk["arms"].items() if "row_var" in a}
    if not arms:
        raise ValueError(f"set {set_name!r}: no compared arm has finished runs")
    basis = (
        primary.get("arm")
        if primary.get("arm") in arms and primary.get("set") == set_name
        else None
    )
    row_var = (
        arms[basis]["row_var"] if basis else float(np.median([a["row_var"] for a in arms.values()]))
    )
    design = study.get("design") or {}
    n_arms = len(design.get("compared_arms") or arms)
    family = max(1, lk.get("family") or n_arms)
    alpha = design.get("alpha", 0.05)
    power = design.get("power", POWER)
    splits = (
        [(var["draw"], 0.0), (0.0, var["draw"])]
        if var.get("seed_assumed")
        else [(var["draw_component"], var["seed"])]
    )

    def mde(n: Any, R: Any, K: Any) -> np.ndarray:
        return np.max(
            [
                design_mde(
                    row_var, a, e, n, R, K, n_arms + R, family=family, alpha=alpha, power=power
                )
                for a, e in splits
            ],
            axis=0,
        )

    n_now, R_now, K_now = lk["rows"], lk["random"]["draws"], lk["random"]["seeds"]
    cap = int(max_rows) if max_rows else max(100_000, n_now)
    R, K = np.meshgrid(np.arange(2, max_draws + 1), np.arange(1, max_seeds + 1), indexing="ij")
    R, K = R.ravel(), K.ravel()
    ok = mde(cap, R, K) <= target
    lo, hi = np.full(len(R), 2), np.full(len(R), cap)
    for _ in range(int(math.ceil(math.log2(cap))) + 1):  # smallest n with MDE <= target
        mid = (lo + hi) // 2
        good = mde(mid, R, K) <= target
        hi, lo = np.where(good, mid, hi), np.where(good, lo, mid + 1)
    n_need = np.where(ok, hi, -1)
    phases = _phase_seconds(study, set_name)
    has_base = bool(design.get("base_arm"))
    concurrency = max(1, int(design.get("max_concurrent_arms") or 1))

    def cost(n: int, r: int, k: int) -> float | None:
        if phases["train_s"] is None or phases["row_s"] is None:
            return None
        per_eval = phases["other_sets_s"] + n * phases["row_s"]
        return (n_arms + r) * k * (phases["train_s"] + per_eval) + has_base * per_eval

    designs = [
        {
            "rows": int(n),
            "draws": int(r),
            "seeds": int(k),
            "runs": int((n_arms + r) * k + has_base),
            "mde": float(mde(n, r, k)),
            "stage_s": cost(int(n), int(r), int(k)),
        }
        for n, r, k in zip(n_need, R, K, strict=True)
        if n > 0
    ]
    designs.sort(key=lambda d: (d["stage_s"] if d["stage_s"] is not None else d["runs"], d["runs"]))
    for d in designs:
        d["wall_s"] = None if d["stage_s"] is None else d["stage_s"] / concurrency
    best = None
    if not designs:
        floor = mde(cap, R, K)
        j = int(np.argmin(floor))
        best = {"rows": cap, "draws": int(R[j]), "seeds": int(K[j]), "mde": float(floor[j])}
    return {
        "set": set_name,
        "target": target,
        "basis": basis or "median over arms",
        "row_var": row_var,
        "draw_var": var.get("draw_component"),
        "seed_var": var.get("seed"),
        "seed_assumed": bool(var.get("seed_assumed")),
        "family": family,
        "compared_arms": n_arms,
        "alpha": alpha,
        "power": power,
        "current": {
            "rows": n_now,
            "draws": R_now,
            "seeds": K_now,
            "mde_design": float(mde(n_now, R_now, K_now)),
            "mde_measured": arms[basis]["mde"] if basis and "mde" in arms[basis] else None,
            "stage_s": cost(n_now, R_now, K_now),
        },
        "phases": phases,
        "concurrency": concurrency,
        "max_rows": cap,
        "designs": designs[:top],
        "resolvable": len(designs),
        "best_within_limits": best,
    }


def _hours(s: float | None) -> str:
    return "–" if s is None else f"{s / 3600:.1f} h"


def render_plan(plan: dict) -> str:
    """The plan as text (what ``--plan`` prints)."""
    cur, ph = plan["current"], plan["phases"]
    lines = [
        f"Plan for eval set {plan['set']}: resolve |Δ| >= {plan['target']:g} NLL/token "
        f"(MDE at {round(100 * plan['power'])}% power, α {plan['alpha']:g} over "
        f"{plan['family']} arm(s), Holm's first step).",
        f"Measured: per-row variance {plan['row_var']:.3g} ({plan['basis']}), draw variance "
        f"{format_value(plan['draw_var'], 6)}, training-seed variance {format_value(plan['seed_var'], 6)}"
        + (
            " (one training seed: draw and seed parts not separable; the worse split is used)"
            if plan["seed_assumed"]
            else ""
        )
        + ".",
        f"Phases (mean per run, measured here): training {format_value(ph['train_s'], 0)} s, eval "
        f"{format_value(ph['row_s'], 2)} s per row of this set, other sets {format_value(ph['other_sets_s'], 0)} "
        f"s; {plan['compared_arms']} compared arm(s); {plan['concurrency']} run(s) at a time.",
        f"This study: {cur['rows']} rows, {cur['draws']} draws, {cur['seeds']} seed(s): MDE "
        f"{cur['mde_design']:.4f}"
        + (f" (measured {cur['mde_measured']:.4f})" if cur.get("mde_measured") else "")
        + f", {_hours(cur['stage_s'])} of run stages.",
        "",
    ]
    if plan["designs"]:
        lines += [
            f"Cheapest designs that resolve {plan['target']:g} ({plan['resolvable']} found; rows "
            f"at most {plan['max_rows']}):",
            "",
            f"{'rows':>7} {'draws':>6} {'seeds':>6} {'runs':>6} {'MDE':>8} {'stage time':>11} "
            f"{'wall':>8}",
        ]
        for d in plan["designs"]:
            lines.append(
                f"{d['rows']:>7} {d['draws']:>6} {d['seeds']:>6} {d['runs']:>6} "
                f"{d['mde']:>8.4f} {_hours(d['stage_s']):>11} {_hours(d['wall_s']):>8}"
            )
        lines += [
            "",
            "Runs this study already has are reused when the rows stay the same (adding seeds "
            "or draws runs only the new ones); more rows re-evaluate every run. Times are "
            "estimates from the measured phases, not measurements.",
        ]
    else:
        b = plan["best_within_limits"]
        lines.append(
            f"No design within the limits resolves {plan['target']:g}: the smallest MDE is "
            f"{b['mde']:.4f} ({b['rows']} rows, {b['draws']} draws, {b['seeds']} seeds)."
        )
    return "\n".join(lines)


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
    p.add_argument(
        "--plan",
        metavar="OUTPUT_DIR",
        help="read a finished (or pilot) study's study.json and print how many eval rows, "
        "random draws and training seeds resolve --resolve, and what that costs; runs nothing",
    )
    p.add_argument(
        "--resolve",
        type=float,
        default=0.02,
        metavar="DELTA",
        help="--plan: the difference in NLL/token to resolve (default 0.02)",
    )
    p.add_argument("--plan-set", metavar="SET", help="--plan: the eval set (default: primary)")
    p.add_argument(
        "--max-rows",
        type=int,
        help="--plan: the most eval rows the set offers (e.g. 805 for AlpacaEval)",
    )
    p.add_argument("--max-draws", type=int, default=32, help="--plan: most random draws")
    p.add_argument("--max-seeds", type=int, default=16, help="--plan: most training seeds")
    return p


def main(argv: list[str] | None = None) -> int:
    from deita_ray.pipeline import start_job  # noqa: PLC0415

    args = build_parser().parse_args(argv)
    if args.plan:
        study = _read_json(os.path.join(os.path.expanduser(args.plan), STUDY_JSON))
        if study is None:
            print(f"--plan: no readable {STUDY_JSON} in {args.plan}", file=sys.stderr)
            return 2
        try:
            plan = plan_study(
                study,
                args.resolve,
                args.plan_set,
                max_rows=args.max_rows,
                max_draws=args.max_draws,
                max_seeds=args.max_seeds,
            )
        except ValueError as e:
            print(f"--plan: {e}", file=sys.stderr)
            return 2
        print(render_plan(plan))
        return 0
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
                "primary": study.get("primary"),
                "failed_runs": failed,
            },
            indent=2,
        )
    )
    return 1 if failed and len(failed) == len(study["arms"]) else 0


if __name__ == "__main__":
    sys.exit(main())

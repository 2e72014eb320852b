"""The ``score`` stage: every configured scorer over every turn of every row.

The scorers come from ``score.scorers`` (``deita_ray/scorers``; default: the paper's
``deita_complexity`` and ``deita_quality``). Scorers whose model configs are equal form one
group: one :class:`ModelScorers` actor pool, one engine, and for every batch one engine call per
request type (label prompts, token log-probabilities) for all of the group's scorers. Groups
run one after the other, each adding its columns. Kinds that load no model (``length``) run
first, as Ray Data CPU tasks (:func:`cpu_score`), never in a model actor. When a
``deita_complexity`` and a ``deita_quality`` scorer both ran, ``evol_score`` =
``sum_i complexity_i * quality_i``; the row column ``truncated`` is true when any scorer cut
the row's text to fit its model.

:func:`score_batch` is the pure batch function (apart from the engine); :func:`run_score`
reads ``<out_dir>/ingest``, runs the CPU step and the actor pool(s) and writes
``<out_dir>/score`` (and ``<out_dir>/rejects/score``). Per-scorer throughput (rows and tokens
per second of the time attributed to the scorer: its own preparation plus its share, by
tokens, of each engine call it took part in) goes into the stage's metrics in report.json.
"""

from __future__ import annotations

import functools
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from deita_ray.accounting import StageResult
from deita_ray.config import ModelConfig, PipelineConfig
from deita_ray.data.formats import extract_turns
from deita_ray.data.rejects import RejectMarks, row_raw
from deita_ray.data.sink import (
    in_parts,
    parquet_files,
    skip_finished,
    stage_dir,
    write_with_rejects,
)
from deita_ray.progress import count_rows, current_counter
from deita_ray.scorers import EVOL, TRUNCATED, get_kind
from deita_ray.scorers.base import BatchView, BoundScorer, LabelRequest, LogprobRequest
from deita_ray.scoring import PromptTooLong, expected_score, fit_prompt
from deita_ray.stages.base import ModelToLoad, Stage

KINDS: tuple[str, ...] = ("complexity", "quality")
"""The DEITA pair by its legacy short names (:func:`score_table`)."""
SCORE_COLUMNS = {"complexity": "complexity_scores", "quality": "quality_scores"}
CPU_TASK_CPUS = 0.25
"""CPUs a cheap-scorer task reserves (it only counts characters and tokens)."""


def _set(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)


class _Timer:
    """Per-scorer work counters of one batch: rows, requests, prompt tokens, seconds."""

    def __init__(self, scorers: Sequence[BoundScorer]):
        self.stats = {
            s.spec.name or s.spec.kind: {
                "kind": s.spec.kind,
                "rows": 0,
                "requests": 0,
                "tokens": 0,
                "seconds": 0.0,
            }
            for s in scorers
        }

    def add(self, scorer: BoundScorer, seconds: float, **counts: int) -> None:
        st = self.stats[scorer.spec.name or scorer.spec.kind]
        st["seconds"] += seconds
        for k, v in counts.items():
            st[k] += v

    def share(
        self, owners: list[BoundScorer], tokens: list[int], seconds: float, count: bool = True
    ) -> None:
        """Split one step's time between its scorers by their share of its tokens (and, for an
        engine call, ``count`` its requests and tokens)."""
        total = sum(tokens) or 1
        per: dict[int, list] = {}
        for s, t in zip(owners, tokens, strict=True):
            entry = per.setdefault(id(s), [s, 0, 0])
            entry[1] += t
            entry[2] += 1
        for s, tok, reqs in per.values():
            counts = {"tokens": tok, "requests": reqs} if count else {}
            self.add(s, seconds * tok / total, **counts)


def score_batch(
    table: pa.Table,
    backend: Any,
    scorers: Sequence[BoundScorer],
    evol: tuple[str, str] | None = None,
    stats: dict | None = None,
) -> pa.Table:
    """Run ``scorers`` over the turns of every row of ``table`` (pure apart from the engine).

    Label prompts of all scorers go to the engine in one call per label set, ordered by row
    (then scorer, then turn); token-log-probability requests in one call (identical sequences
    once). A row that cannot be scored (no turn, a prompt whose template alone exceeds the
    context, no response token within the context, an engine error on one of its requests, a
    non-finite result) is marked as a reject; the other rows are unaffected. Rows that arrive
    already marked are passed through unscored.

    Args:
        table: canonical rows (``id``, ``messages`` ...), possibly with earlier score columns.
        backend: a :class:`~deita_ray.models.backend.Backend` loaded for ``"score"``, or None
            when no scorer needs an engine (``length``).
        scorers: bound scorers of this backend's model.
        evol: turn columns (complexity, quality) whose products make ``evol_score``.
        stats: filled with per-scorer work counters (rows, requests, tokens, seconds).

    Returns:
        ``table`` plus each scorer's columns, ``evol_score`` (double; null until both evol
        columns exist), ``truncated`` (bool, OR-ed with an existing one) and the reject marks.
    """
    n = table.num_rows
    marks = RejectMarks.of(table)
    reasons = marks.reasons
    messages = table["messages"].to_pylist() if "messages" in table.column_names else [None] * n
    old_trunc = table[TRUNCATED].to_pylist() if TRUNCATED in table.column_names else [False] * n
    truncated = [bool(t) for t in old_trunc]
    timer = _Timer(scorers)

    def reject(i: int, reason: str, detail: str) -> None:
        if reasons[i] is None:  # the first reason wins
            marks.reject(i, reason, detail, row_raw(table, i))

    # 1. The turns of every row.
    turns: list[list[tuple[str, str]] | None] = [None] * n
    for i in range(n):
        if reasons[i] is not None:
            continue
        if messages[i] is None:
            reject(i, "missing_messages", "row has no messages")
            continue
        row_turns = extract_turns(messages[i])
        if not row_turns:
            reject(i, "no_turns", "conversation has no user message to score")
            continue
        turns[i] = row_turns
    view = BatchView(n, turns, reject, lambda i: reasons[i] is None)
    for s in scorers:
        timer.add(s, 0.0, rows=sum(t is not None for t in turns))

    # 2. Requests of every scorer.
    requests: list[list[LabelRequest | LogprobRequest]] = []
    for s in scorers:
        t0 = time.perf_counter()
        requests.append(s.prepare(view))
        timer.add(s, time.perf_counter() - t0)
    if backend is None and any(requests):
        raise RuntimeError("a scorer that sends engine requests ran without an engine")

    # 3. Label prompts: tokenised in one call, fitted (cut inside the text fields), ordered by
    #    row, then scorer, then turn.
    labelled = sorted(
        (
            (r.row, k, pos, r, s)
            for k, (s, reqs) in enumerate(zip(scorers, requests, strict=True))
            for pos, r in enumerate(reqs)
            if isinstance(r, LabelRequest)
        ),
        key=lambda x: x[:3],
    )
    label_reqs = [x[3] for x in labelled]
    label_owner = [x[4] for x in labelled]
    if label_reqs:
        tok = backend.tokenizer
        budget = backend.max_prompt_tokens
        t0 = time.perf_counter()
        encoded = tok([r.spec.text for r in label_reqs], add_special_tokens=True)["input_ids"]
        for r, ids in zip(label_reqs, encoded, strict=True):
            if reasons[r.row] is not None:
                continue
            try:
                r.ids, r.cut = fit_prompt(tok, r.spec, budget, ids=ids)
            except PromptTooLong as e:
                reject(r.row, "prompt_too_long", str(e))
                continue
            truncated[r.row] = truncated[r.row] or r.cut
        timer.share(
            label_owner,
            [len(r.ids or ()) for r in label_reqs],
            time.perf_counter() - t0,
            count=False,
        )

    # 4. One engine call per label set.
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for k, r in enumerate(label_reqs):
        if reasons[r.row] is None and r.ids is not None:
            groups[r.label_ids].append(k)
    for label_ids, members in groups.items():
        t0 = time.perf_counter()
        values, errors = backend.digit_logits([label_reqs[k].ids for k in members], list(label_ids))
        scores = expected_score(values, len(label_ids))  # NaN where the engine failed
        timer.share(
            [label_owner[k] for k in members],
            [len(label_reqs[k].ids) for k in members],
            time.perf_counter() - t0,
        )
        for pos, k in enumerate(members):
            r = label_reqs[k]
            if reasons[r.row] is not None:
                continue
            if errors[pos] is not None:
                reject(r.row, "engine_error", errors[pos])
                continue
            value = float(scores[pos])
            if not math.isfinite(value):
                name = label_owner[k].spec.name or label_owner[k].spec.kind
                reject(r.row, "non_finite_score", f"{name} score of turn {r.turn} is {value}")
                continue
            r.score = value

    # 5. Token log-probabilities: one engine call, identical sequences computed once.
    lp = [
        (r, s)
        for s, reqs in zip(scorers, requests, strict=True)
        for r in reqs
        if isinstance(r, LogprobRequest) and reasons[r.row] is None
    ]
    if lp:
        unique: dict[tuple[tuple[int, ...], int], int] = {}
        for r, _ in lp:
            unique.setdefault((tuple(r.seq), r.start), len(unique))
        keys = list(unique)
        t0 = time.perf_counter()
        values, errors = backend.token_logprobs([list(q) for q, _ in keys], [b for _, b in keys])
        timer.share([s for _, s in lp], [r.tokens for r, _ in lp], time.perf_counter() - t0)
        for r, s in lp:
            u = unique[(tuple(r.seq), r.start)]
            if reasons[r.row] is not None:
                continue
            if errors[u] is not None:
                reject(r.row, "engine_error", errors[u])
            elif not all(math.isfinite(v) for v in values[u]):
                reject(
                    r.row,
                    "non_finite_score",
                    f"{s.spec.name or s.spec.kind}: non-finite token log-probability",
                )
            else:
                r.values = values[u]

    # 6. Columns.
    out = table
    for s, reqs in zip(scorers, requests, strict=True):
        t0 = time.perf_counter()
        columns, cut = s.finish(view, reqs)
        for i, c in enumerate(cut):
            truncated[i] = truncated[i] or c
        for name, array in columns.items():
            out = _set(out, name, array)
        timer.add(s, time.perf_counter() - t0)
    if evol is not None and all(c in out.column_names for c in evol):
        cs = out[evol[0]].to_pylist()
        qs = out[evol[1]].to_pylist()
        evol_values = [
            math.fsum(c * q for c, q in zip(cs[i], qs[i], strict=True))
            if reasons[i] is None and cs[i] is not None and qs[i] is not None
            else None
            for i in range(n)
        ]
    else:
        evol_values = [None] * n
    out = _set(out, EVOL, pa.array(evol_values, pa.float64()))
    out = _set(out, TRUNCATED, pa.array(truncated, pa.bool_()))
    if stats is not None:
        stats.update(timer.stats)
    return marks.attach(out)


def _deita_specs(digit_ids: list[int], kinds: Sequence[str]) -> list:
    """Specs of the DEITA pair (legacy short kind names) with resolved digit ids."""
    from deita_ray.config import ScorerConfig  # noqa: PLC0415

    specs = []
    for i, short in enumerate(kinds):
        kind = get_kind(f"deita_{short}")
        # The model config is the caller's backend's; a spec only needs one to exist.
        entry = ScorerConfig(kind=f"deita_{short}")
        spec = kind.build_spec(entry, ModelConfig(), f"score.scorers[{i}]")
        specs.append(spec.with_labels(digit_ids))
    return specs


def score_table(
    table: pa.Table, backend: Any, digit_ids: list[int], kinds: Sequence[str] = KINDS
) -> pa.Table:
    """Score ``table`` with the DEITA pair on one backend (the default scorers' batch function).

    Args:
        table: canonical rows, possibly with earlier score columns.
        backend: a backend loaded for ``"score"``.
        digit_ids: token ids of "1".."6".
        kinds: "complexity" and/or "quality".

    Returns:
        ``table`` plus ``<kind>_scores`` (list<double>), ``evol_score``, ``truncated`` and the
        reject marks (see :func:`score_batch`).
    """
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    specs = _deita_specs(digit_ids, kinds)
    scorers = [
        get_kind(s.kind).bind(s, backend.tokenizer, backend.max_prompt_tokens) for s in specs
    ]
    return score_batch(
        table, backend, scorers, (SCORE_COLUMNS["complexity"], SCORE_COLUMNS["quality"])
    )


class ScoreMetrics:
    """A small Ray actor the scorer actors and tasks report their per-batch counters to
    (fire and forget); the driver reads the totals once the stage is written. Batches that Ray
    retries after a failure are counted again (work done, not distinct rows)."""

    def __init__(self) -> None:
        self.totals: dict[str, dict] = {}

    def record(self, stats: dict) -> None:
        for name, st in stats.items():
            tot = self.totals.setdefault(name, {"kind": st["kind"]})
            for k, v in st.items():
                if k != "kind":
                    tot[k] = tot.get(k, 0) + v

    def get(self) -> dict:
        return self.totals


def _bind_all(specs: Sequence, tokenizer: Any, budget: int) -> list[BoundScorer]:
    return [get_kind(s.kind).bind(s, tokenizer, budget) for s in specs]


class ModelScorers:
    """Ray Data callable: the scorers of one model, sharing its engine.

    Input columns: ``id``, ``messages`` (list<struct<role, content>>) and any others (kept);
    possibly earlier scorers' columns, ``truncated`` and reject marks.

    Output columns: the input plus each scorer's columns (docs/scoring.md), ``evol_score``
    (double, once both DEITA turn columns exist), ``truncated`` (bool) and the reject marks.

    Args:
        model_cfg: the group's model config.
        model_path: resolved local model folder.
        specs: the group's scorer specs (label ids resolved on the driver).
        evol: the DEITA turn columns that make ``evol_score`` (None: no DEITA pair).
        metrics: a :class:`ScoreMetrics` actor handle, or None.
        progress: the stage's progress counter (:mod:`deita_ray.progress`), told the rows of
            each finished batch, or None.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        model_path: str,
        specs: Sequence,
        evol: tuple[str, str] | None = None,
        metrics: Any = None,
        progress: Any = None,
    ):
        from deita_ray.models.backend import load_backend  # noqa: PLC0415

        self.backend = load_backend(model_cfg, model_path, "score")
        tok = self.backend.tokenizer
        specs = [
            get_kind(s.kind).resolve_labels(s, tok) if s.label_ids is None else s for s in specs
        ]
        self.scorers = _bind_all(specs, tok, self.backend.max_prompt_tokens)
        self.evol = evol
        self.metrics = metrics
        self.progress = progress

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats: dict = {}
        out = score_batch(batch, self.backend, self.scorers, self.evol, stats)
        if self.metrics is not None:
            self.metrics.record.remote(stats)
        count_rows(self.progress, batch.num_rows)
        return out


@functools.lru_cache(maxsize=8)
def _task_tokenizer(path: str, trust_remote_code: bool) -> Any:
    """A tokenizer per worker process (Ray reuses task workers, so batches share it)."""
    from deita_ray.models.backend import load_tokenizer  # noqa: PLC0415

    return load_tokenizer(path, trust_remote_code)


def cpu_score(
    batch: pa.Table,
    specs: Sequence,
    evol: tuple[str, str] | None,
    metrics: Any = None,
    progress: Any = None,
) -> pa.Table:
    """Ray Data task function: scorers that load no model (``length``) on one batch
    (``progress``: as :class:`ModelScorers`)."""
    scorers = []
    for s in specs:
        tok = None
        if s.model is not None:
            tok = _task_tokenizer(s.model_path or s.model.path, s.model.trust_remote_code)
        scorers.append(get_kind(s.kind).bind(s, tok, 0))
    stats: dict = {}
    out = score_batch(batch, None, scorers, evol, stats)
    if metrics is not None:
        metrics.record.remote(stats)
    count_rows(progress, batch.num_rows)
    return out


def score_plan(cfg: PipelineConfig) -> tuple[list, list[tuple[ModelConfig, str, list]]]:
    """(CPU scorer specs, [(model config, resolved path, specs)] per model actor pool), with
    model paths resolved and label token ids checked on the driver, so a bad scorer fails
    before any actor starts. A pool without label kinds loads no tokenizer here (importing
    transformers costs the driver seconds; preflight checked that the folder has one)."""
    from deita_ray.models.backend import load_tokenizer  # noqa: PLC0415
    from deita_ray.scorers import cpu_scorers, model_groups, resolve_scorers  # noqa: PLC0415

    specs = resolve_scorers(cfg, resolve_paths=True)
    for s in cpu_scorers(specs):
        if s.model is not None:  # fail here, not in a task, when its tokenizer does not load
            load_tokenizer(s.model_path, s.model.trust_remote_code)
    pools = []
    for group in model_groups(specs):
        model, path = group[0].model, group[0].model_path
        if any(get_kind(s.kind).has_labels for s in group):
            tok = load_tokenizer(path, model.trust_remote_code)
            group = [get_kind(s.kind).resolve_labels(s, tok) for s in group]
        pools.append((model, path, group))
    return cpu_scorers(specs), pools


def _stats(values: list[float]) -> dict:
    import numpy as np  # noqa: PLC0415

    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": float(a.min()),
        "p50": float(np.median(a)),
        "max": float(a.max()),
    }


def summarize_scores(folder: str, row_columns: Sequence[str] = ()) -> dict:
    """JSON-able statistics of a score output folder (for report.json): the DEITA pair's
    per-turn and evol statistics when present, and ``columns``: per row column of the other
    scorers, its statistics and null count."""
    import pyarrow.dataset as pds  # noqa: PLC0415

    if not parquet_files(folder):
        return {"rows": 0}
    dataset = pds.dataset(folder, format="parquet")
    names = dataset.schema.names
    legacy = [c for c in (*SCORE_COLUMNS.values(), EVOL, TRUNCATED) if c in names]
    extra = [c for c in row_columns if c in names and c not in legacy]
    t = dataset.to_table(columns=legacy + extra)
    out: dict[str, Any] = {"rows": t.num_rows}
    if TRUNCATED in names:
        out["truncated_rows"] = int(sum(t[TRUNCATED].to_pylist()))
    if EVOL in names:
        out["evol_score"] = _stats([v for v in t[EVOL].to_pylist() if v is not None])
    for kind, col in SCORE_COLUMNS.items():
        if col in names:
            flat = [v for row in t[col].to_pylist() if row for v in row]
            out[f"{kind}_turn_score"] = _stats(flat)
            out["turns"] = len(flat)
    if extra:
        out["columns"] = {}
        for c in extra:
            vals = t[c].to_pylist()
            good = [float(v) for v in vals if v is not None and math.isfinite(v)]
            out["columns"][c] = {**_stats(good), "nulls": len(vals) - len(good)}
    return out


def _throughput(totals: dict, seconds: float) -> dict:
    """Per scorer (and per kind): work counters and rows / tokens per second of its time."""
    per_scorer = {}
    per_kind: dict[str, dict] = {}
    for name, st in totals.items():
        sec = st.get("seconds", 0.0)
        entry = {
            "kind": st["kind"],
            "rows": int(st.get("rows", 0)),
            "requests": int(st.get("requests", 0)),
            "tokens": int(st.get("tokens", 0)),
            "seconds": round(sec, 3),
            "rows_per_s": round(st.get("rows", 0) / sec, 3) if sec > 0 else None,
            "tokens_per_s": round(st.get("tokens", 0) / sec, 1) if sec > 0 else None,
        }
        per_scorer[name] = entry
        agg = per_kind.setdefault(st["kind"], {"rows": 0, "tokens": 0, "seconds": 0.0})
        for k in ("rows", "tokens", "seconds"):
            agg[k] += entry[k]
    for agg in per_kind.values():
        sec = agg["seconds"]
        agg["seconds"] = round(sec, 3)
        agg["rows_per_s"] = round(agg["rows"] / sec, 3) if sec > 0 else None
        agg["tokens_per_s"] = round(agg["tokens"] / sec, 1) if sec > 0 else None
    return {"scorers": per_scorer, "kinds": per_kind, "stage_seconds": round(seconds, 3)}


def run_score(cfg: PipelineConfig, out_dir: str) -> StageResult:
    """Score ``<out_dir>/ingest`` into ``<out_dir>/score`` (Ray must be initialised).

    Model paths are resolved and label token ids checked on the driver, so a bad scorer fails
    before any actor starts.
    """
    import pyarrow.dataset as pds  # noqa: PLC0415
    import ray  # noqa: PLC0415

    from deita_ray.runtime import driver_side_actor, map_batches_kwargs  # noqa: PLC0415
    from deita_ray.scorers import evol_pair, resolve_scorers, row_columns  # noqa: PLC0415

    t0 = time.time()
    src = stage_dir(out_dir, "ingest")
    rows_in = pds.dataset(src, format="parquet").count_rows()
    cpu_specs, pools = score_plan(cfg)
    all_specs = resolve_scorers(cfg)
    evol = evol_pair(all_specs)
    res = cfg.score.resources
    metrics_actor = driver_side_actor(ScoreMetrics)
    # Live progress (deita_ray/progress.py): the last step of the chain counts the rows done.
    counter = current_counter()
    # Rows an interrupted earlier run already wrote are not scored again (resume).
    ds = skip_finished(ray.data.read_parquet(src), out_dir, "score")
    ds = in_parts(ds, cfg.output.rows_per_part)
    if cpu_specs:
        ds = ds.map_batches(
            cpu_score,
            fn_kwargs={
                "specs": cpu_specs,
                "evol": evol,
                "metrics": metrics_actor,
                "progress": None if pools else counter,
            },
            batch_format="pyarrow",
            batch_size=res.batch_size,
            num_cpus=CPU_TASK_CPUS,
        )
    models = {}
    for i, (model_cfg, path, specs) in enumerate(pools):
        models["+".join(s.name or s.kind for s in specs)] = {
            "path": path,
            "backend": model_cfg.backend,
            "scorers": [s.kind for s in specs],
            **(
                {"digit_token_ids": list(specs[0].label_ids)}
                if specs[0].label_ids is not None
                else {}
            ),
        }
        ds = ds.map_batches(
            ModelScorers,
            fn_constructor_kwargs={
                "model_cfg": model_cfg,
                "model_path": path,
                "specs": specs,
                "evol": evol,
                "metrics": metrics_actor,
                "progress": counter if i == len(pools) - 1 else None,
            },
            batch_format="pyarrow",
            **map_batches_kwargs(res, model_cfg),
        )
    counts = write_with_rejects(ds, "score", out_dir, rows_in=rows_in)
    counts.check("score")
    seconds = time.time() - t0
    try:
        totals = ray.get(metrics_actor.get.remote())
    finally:
        ray.kill(metrics_actor)
    metrics = {
        "models": models,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows_in / seconds, 3) if seconds > 0 else None,
        "throughput": _throughput(totals, seconds),
        **summarize_scores(stage_dir(out_dir, "score"), row_columns(all_specs)),
    }
    return StageResult(counts=counts, metrics=metrics)


def _scorer_models(cfg: PipelineConfig) -> list[tuple[str, Any, str]]:
    """``(config key, ModelConfig, kind)`` of every scorer that names a model; the DEITA kinds
    without their own model name the legacy keys."""
    out = []
    for i, sc in enumerate(cfg.score.scorers):
        if sc.model is not None:
            out.append((f"score.scorers[{i}].model.path", sc.model, sc.kind))
        elif sc.kind in ("deita_complexity", "deita_quality"):
            name = "complexity_model" if sc.kind == "deita_complexity" else "quality_model"
            out.append((f"score.{name}.path", getattr(cfg.score, name), sc.kind))
    return out


def _models(cfg: PipelineConfig) -> list[ModelToLoad]:
    """Every model a scorer loads (a length scorer's only for its tokenizer)."""
    out = []
    for key, model, _ in _scorer_models(cfg):
        entry = ModelToLoad(key, model.path, model.trust_remote_code)
        if entry not in out:
            out.append(entry)
    return out


def _gpu_uses(cfg: PipelineConfig, out_dir: str) -> list:
    """Each scorer model's engine (one per model: scorers of one model share its actors),
    when the scorer actors take GPUs; a length scorer loads only a tokenizer."""
    from deita_ray.training.memory import GpuUse  # noqa: PLC0415

    if cfg.score.resources.num_gpus <= 0:
        return []
    engines: dict[str, GpuUse] = {}
    for key, model, kind in _scorer_models(cfg):
        if kind != "length":
            engines.setdefault(model.path, GpuUse(key, model.path, "scorer", model))
    return list(engines.values())


def _notes(cfg: PipelineConfig) -> list[str]:
    from deita_ray.config import EMBEDDED_MODEL  # noqa: PLC0415

    if EMBEDDED_MODEL not in (cfg.score.complexity_model.path, cfg.score.quality_model.path):
        return []
    return [
        "Scores come from the embedded SmolLM2-135M-Instruct prompted with the DEITA scorer "
        "templates: a stand-in for the deita-complexity-scorer / deita-quality-scorer models, "
        "good for exercising the pipeline, not for judging data."
    ]


STAGE = Stage(
    name="score",
    run=run_score,
    config_keys=("score",),
    hash_ignore=("resources",),  # how many actors run the scorers does not change a score
    reads=("ingest",),
    input_columns=("id", "seq", "messages"),
    output_columns=("complexity_scores", "quality_scores", EVOL, TRUNCATED),
    resumes_by_shard=True,
    writes_parts=True,
    counts_batches=True,
    models=_models,
    gpu_uses=_gpu_uses,
    notes=_notes,
    doc="every configured scorer per turn and row (default: DEITA complexity, quality, evol)",
)

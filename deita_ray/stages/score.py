"""The ``score`` stage: DEITA complexity and quality scores per turn, and the row's evol score.

:class:`TurnScorer` is a callable class for ``Dataset.map_batches`` (``batch_format="pyarrow"``)
that owns one scorer model. When both scorers use the same model config (the quickstart), one
actor scores both prompt kinds of every turn of a batch in ONE engine call; otherwise two
actor pools run one after the other, the second adding its scores and the evol score.

:func:`run_score` reads ``<out_dir>/ingest``, runs the scorer pool(s) and writes
``<out_dir>/score`` (and ``<out_dir>/rejects/score``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from deita_ray.accounting import StageResult
from deita_ray.config import ModelConfig, PipelineConfig
from deita_ray.data.formats import extract_turns
from deita_ray.data.rejects import DETAIL, MARK_COLUMNS, RAW, REASON, to_raw
from deita_ray.data.sink import parquet_files, skip_finished, stage_dir, write_with_rejects
from deita_ray.preflight import ModelToLoad
from deita_ray.scoring import (
    PromptTooLong,
    complexity_spec,
    expected_score,
    fit_prompt,
    quality_spec,
    resolve_digit_ids,
)
from deita_ray.stages.base import Stage
from deita_ray.stages.reports.score import REPORT

KINDS: tuple[str, ...] = ("complexity", "quality")
SCORE_COLUMNS = {"complexity": "complexity_scores", "quality": "quality_scores"}
EVOL = "evol_score"
TRUNCATED = "truncated"


def _marks(table: pa.Table) -> tuple[list, list, list]:
    n = table.num_rows

    def col(name: str) -> list:
        return table[name].to_pylist() if name in table.column_names else [None] * n

    return col(REASON), col(DETAIL), col(RAW)


def _set(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)


def _row_raw(table: pa.Table, i: int) -> str:
    row = table.slice(i, 1).to_pylist()[0]
    return to_raw({k: v for k, v in row.items() if k not in MARK_COLUMNS})


def score_table(
    table: pa.Table, backend: Any, digit_ids: list[int], kinds: Sequence[str] = KINDS
) -> pa.Table:
    """Score the turns of every row of ``table`` with one backend (pure apart from the engine).

    Every prompt of the batch goes to the engine in one call. A row that cannot be scored
    (no turn, a prompt whose template alone exceeds the context, an engine error on one of its
    prompts, a non-finite result) is marked as a reject; the other rows are unaffected. Rows
    that arrive already marked are passed through unscored.

    Args:
        table: canonical rows (``id``, ``messages`` ...), possibly with earlier score columns.
        backend: a :class:`deita_ray.models.backend.Backend` loaded for ``"score"``.
        digit_ids: token ids of "1".."6".
        kinds: which scores to compute: "complexity" and/or "quality".

    Returns:
        ``table`` plus ``<kind>_scores`` (list<double>), ``truncated`` (bool, OR-ed with an
        existing one), ``evol_score`` (double; null until both score columns exist) and the
        reject mark columns.
    """
    n = table.num_rows
    reasons, details, raws = _marks(table)
    messages = table["messages"].to_pylist() if "messages" in table.column_names else [None] * n
    old_trunc = table[TRUNCATED].to_pylist() if TRUNCATED in table.column_names else [False] * n
    truncated = [bool(t) for t in old_trunc]

    def reject(i: int, reason: str, detail: str) -> None:
        reasons[i], details[i], raws[i] = reason, detail, _row_raw(table, i)

    # 1. Prompts of every turn of every row: (row, kind, turn) -> spec.
    jobs: list[tuple[int, str, int]] = []
    specs = []
    n_turns = [0] * n
    for i in range(n):
        if reasons[i] is not None:
            continue
        if messages[i] is None:
            reject(i, "missing_messages", "row has no messages")
            continue
        turns = extract_turns(messages[i])
        if not turns:
            reject(i, "no_turns", "conversation has no user message to score")
            continue
        n_turns[i] = len(turns)
        for kind in kinds:
            for t, (instruction, response) in enumerate(turns):
                jobs.append((i, kind, t))
                specs.append(
                    complexity_spec(instruction)
                    if kind == "complexity"
                    else quality_spec(instruction, response)
                )

    # 2. Tokenise in one call, truncate inside the text fields where needed.
    tok = backend.tokenizer
    budget = backend.max_prompt_tokens
    encoded = tok([s.text for s in specs], add_special_tokens=True)["input_ids"] if specs else []
    prompts: list[list[int] | None] = []
    for (i, _, _), spec, ids in zip(jobs, specs, encoded, strict=True):
        if reasons[i] is not None:
            prompts.append(None)
            continue
        try:
            fitted, cut = fit_prompt(tok, spec, budget, ids=ids)
        except PromptTooLong as e:
            reject(i, "prompt_too_long", str(e))
            prompts.append(None)
            continue
        truncated[i] = truncated[i] or cut
        prompts.append(fitted)

    # 3. One engine call for the whole batch.
    live = [k for k, (i, _, _) in enumerate(jobs) if reasons[i] is None and prompts[k] is not None]
    values, errors = backend.digit_logits([prompts[k] for k in live], digit_ids)
    all_scores = expected_score(values) if live else []  # NaN where the engine failed
    scores: dict[tuple[int, str], list[float | None]] = {}
    for pos, k in enumerate(live):
        i, kind, t = jobs[k]
        if reasons[i] is not None:
            continue
        if errors[pos] is not None:
            reject(i, "engine_error", errors[pos])
            continue
        s = float(all_scores[pos])
        if not math.isfinite(s):
            reject(i, "non_finite_score", f"{kind} score of turn {t} is {s}")
            continue
        scores.setdefault((i, kind), [None] * n_turns[i])[t] = s

    # 4. Columns.
    out = table
    for kind in kinds:
        col = [scores.get((i, kind)) if reasons[i] is None else None for i in range(n)]
        out = _set(out, SCORE_COLUMNS[kind], pa.array(col, pa.list_(pa.float64())))
    if all(SCORE_COLUMNS[k] in out.column_names for k in KINDS):
        cs = out[SCORE_COLUMNS["complexity"]].to_pylist()
        qs = out[SCORE_COLUMNS["quality"]].to_pylist()
        evol = [
            math.fsum(c * q for c, q in zip(cs[i], qs[i], strict=True))
            if reasons[i] is None and cs[i] is not None and qs[i] is not None
            else None
            for i in range(n)
        ]
    else:
        evol = [None] * n
    out = _set(out, EVOL, pa.array(evol, pa.float64()))
    out = _set(out, TRUNCATED, pa.array(truncated, pa.bool_()))
    out = _set(out, REASON, pa.array(reasons, pa.string()))
    out = _set(out, DETAIL, pa.array(details, pa.string()))
    return _set(out, RAW, pa.array(raws, pa.large_string()))


class TurnScorer:
    """Ray Data callable: scores every turn of each row with one scorer model.

    Input columns: ``id``, ``messages`` (list<struct<role, content>>) and any others (kept);
    possibly ``complexity_scores`` / ``truncated`` / reject marks from an earlier scorer.

    Output columns: the input plus ``complexity_scores`` and/or ``quality_scores``
    (list<double>, one per turn; the complexity prompt sees the turn's instruction alone, the
    quality prompt instruction + response, no history), ``evol_score`` (double,
    ``sum_i c_i * q_i`` once both lists exist), ``truncated`` (bool) and the reject marks
    ``_reject_reason`` / ``_reject_detail`` / ``_raw``.

    Args:
        model_cfg: the scorer model's config.
        model_path: resolved local model folder.
        kinds: the prompt kinds this model scores ("complexity", "quality" or both).
        digit_token_ids: ids of "1".."6" (resolved on the driver); None resolves them here.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        model_path: str,
        kinds: Sequence[str] = KINDS,
        digit_token_ids: list[int] | None = None,
    ):
        from deita_ray.models.backend import load_backend  # noqa: PLC0415

        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
        self.kinds = tuple(kinds)
        self.backend = load_backend(model_cfg, model_path, "score")
        self.digit_ids = resolve_digit_ids(self.backend.tokenizer, digit_token_ids)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_table(batch, self.backend, self.digit_ids, self.kinds)


def scorer_plan(cfg: PipelineConfig) -> list[tuple[ModelConfig, str, tuple[str, ...]]]:
    """(model config, resolved path, kinds) per scorer actor pool: one pool when complexity and
    quality use the same model config, else two."""
    from deita_ray.models.registry import resolve_model_path  # noqa: PLC0415

    sc = cfg.score
    cpath = resolve_model_path(sc.complexity_model.path, cfg.cache_dir)
    if sc.complexity_model == sc.quality_model:
        return [(sc.complexity_model, cpath, KINDS)]
    qpath = resolve_model_path(sc.quality_model.path, cfg.cache_dir)
    return [(sc.complexity_model, cpath, ("complexity",)), (sc.quality_model, qpath, ("quality",))]


def summarize_scores(folder: str) -> dict:
    """JSON-able statistics of a score output folder (for report.json)."""
    import numpy as np  # noqa: PLC0415
    import pyarrow.dataset as pds  # noqa: PLC0415

    if not parquet_files(folder):
        return {"rows": 0}
    t = pds.dataset(folder, format="parquet").to_table(
        columns=[*SCORE_COLUMNS.values(), EVOL, TRUNCATED]
    )

    def stats(values: list[float]) -> dict:
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

    out = {
        "rows": t.num_rows,
        "truncated_rows": int(sum(t[TRUNCATED].to_pylist())),
        "evol_score": stats([v for v in t[EVOL].to_pylist() if v is not None]),
    }
    for kind, col in SCORE_COLUMNS.items():
        flat = [v for row in t[col].to_pylist() if row for v in row]
        out[f"{kind}_turn_score"] = stats(flat)
        out["turns"] = len(flat)
    return out


def run_score(cfg: PipelineConfig, out_dir: str) -> StageResult:
    """Score ``<out_dir>/ingest`` into ``<out_dir>/score`` (Ray must be initialised).

    Model paths are resolved and digit token ids checked on the driver, so a bad scorer fails
    before any actor starts.
    """
    import pyarrow.dataset as pds  # noqa: PLC0415
    import ray  # noqa: PLC0415

    from deita_ray.models.backend import load_tokenizer  # noqa: PLC0415
    from deita_ray.runtime import actor_pool_kwargs  # noqa: PLC0415

    t0 = time.time()
    src = stage_dir(out_dir, "ingest")
    rows_in = pds.dataset(src, format="parquet").count_rows()
    plan = scorer_plan(cfg)
    # Rows an interrupted earlier run already wrote are not scored again (resume).
    ds = skip_finished(ray.data.read_parquet(src), out_dir, "score")
    models = {}
    for model_cfg, path, kinds in plan:
        tok = load_tokenizer(path, model_cfg.trust_remote_code)
        digit_ids = resolve_digit_ids(tok, cfg.score.digit_token_ids)
        models["+".join(kinds)] = {
            "path": path,
            "backend": model_cfg.backend,
            "digit_token_ids": digit_ids,
        }
        ds = ds.map_batches(
            TurnScorer,
            fn_constructor_kwargs={
                "model_cfg": model_cfg,
                "model_path": path,
                "kinds": kinds,
                "digit_token_ids": digit_ids,
            },
            batch_format="pyarrow",
            **actor_pool_kwargs(cfg.score.resources, model_cfg),
        )
    counts = write_with_rejects(ds, "score", out_dir, rows_in=rows_in)
    counts.check("score")
    seconds = time.time() - t0
    metrics = {
        "models": models,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows_in / seconds, 3) if seconds > 0 else None,
        **summarize_scores(stage_dir(out_dir, "score")),
    }
    return StageResult(counts=counts, metrics=metrics)


def _models(cfg: PipelineConfig) -> list[ModelToLoad]:
    sc = cfg.score
    return [
        ModelToLoad(f"score.{name}.path", m.path, m.trust_remote_code)
        for name, m in (
            ("complexity_model", sc.complexity_model),
            ("quality_model", sc.quality_model),
        )
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
    models=_models,
    report=REPORT,
    doc="DEITA complexity and quality scores per turn, and the row's evol score",
)

"""The ``select`` stage: choose the training set from the scored, embedded pool.

Input: ``<out_dir>/embed/*.parquet`` (``id``, ``seq``, ``evol_score``, ``embedding`` and the
scorers' row columns) for the embedding-based methods (``deita``, ``kcenter``); the text pool
``<out_dir>/score/`` (or ``<out_dir>/ingest/`` when there is no score folder) for the others and
for the output's text. ``select.score`` (a column or an expression over row columns,
:mod:`deita_ray.selection.score_expr`) orders ``deita``, ``score`` and ``kcenter``'s first pick.

Output: ``<out_dir>/select/part-00000.parquet`` sorted by ``rank``, with columns ``id``,
``rank`` (0-based selection order), the selection score (named ``evol_score`` when
``select.score`` is the default, else ``select_score``), ``max_sim`` (cosine of the pick to its
nearest earlier pick; null for the first pick and for methods that do not compare embeddings),
followed by every other column of the text pool (``seq``, ``messages``, ``source``, ...), so the
folder is directly a training set. The selection is small, the pool may be big: the text is
joined by streaming the pool's Parquet files batch by batch and keeping the selected ``seq``.

Decisions: ``<out_dir>/decisions/select/part-00000.parquet`` holds one row per pool row: ``id``,
``seq``, ``status`` (``selected``, ``similar_to_selected``, ``not_reached``, ``missing_score``,
``invalid_embedding``; the baselines: ``selected``, ``below_budget_cut``, or ``missing_score``
/ ``invalid_embedding`` for rows that were no candidate), ``rank`` (selected
rows), and for a row rejected for similarity ``rejected_by`` (the id of the selected row it was
too similar to: among the rows selected before it, the one with the largest cosine; ties: the
earliest selected), ``rejected_by_rank`` and ``cosine`` (that cosine), and for every row
``selection_score``, the value ``select.score`` gave it (null: none). The same in the
single-node and the distributed method (docs/report.md, "Why a row was not picked").

Tau calibration (method ``deita`` on one node, ``select.calibrate``): for each tau of
``select.tau_grid`` (default: a grid around ``select.tau``) the rows the exact greedy would
select before the budget fills and the rows it would scan, plus the cosine of a fixed-seed
sample of pool rows to their nearest other pool row; in ``metrics["calibration"]``.

Accounting: selection is not rejection. Nothing is written to ``rejects/select`` and
``rejected_by_reason`` stays empty; rows that are not selected are counted in
``not_selected_by_reason`` (:class:`~deita_ray.accounting.StageCounts`), so that ``rows_in``
(pool rows) ``== rows_out`` (selected) ``+`` not selected, by reason: ``similar_to_selected``
(cosine > tau to an earlier pick), ``not_reached`` (the budget filled before the row's turn),
``missing_score``, ``invalid_embedding`` (NaN/inf or null embedding), ``below_budget_cut``
(baselines: ranked below the budget).

Under ``select.lazy_embed`` (method ``deita``) the stage embeds the rows its greedy reads, in
score order (:mod:`deita_ray.stages.lazy_embed`): ``rows_in`` is then the scored pool, and the
embedder's rejects it met are ``rejected_by_reason`` (in ``rejects/embed``, left out of the
decisions, as a full run never sees them); the tau calibration is computed on the examined rows.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deita_ray.accounting import StageCounts, StageResult
from deita_ray.config import PipelineConfig
from deita_ray.data.sink import decisions_dir, parquet_files, stage_dir
from deita_ray.selection.baselines import (
    message_lengths,
    select_kcenter,
    select_longest,
    select_random,
    select_top_score,
)
from deita_ray.selection.calibration import nearest_neighbor_cosines, tau_curve, tau_grid
from deita_ray.selection.distributed import select_distributed
from deita_ray.selection.greedy import (
    ROW_STATUS,
    SELECTED,
    SelectionResult,
    select_diverse,
    valid_rows,
)
from deita_ray.selection.pool import iter_pieces, load_pool, plan_shards
from deita_ray.selection.score_expr import ScoreExpression
from deita_ray.selection.score_expr import parse as parse_score
from deita_ray.stages.base import Stage
from deita_ray.stages.lazy_embed import (
    lazy_embed_gpu_uses,
    lazy_embed_models,
    lazy_embed_notes,
)

NAME = "select"
SELECTION_SCORE = "selection_score"
"""The decisions' per-row value of ``select.score``: the report browser's score filter when it
is not the default ``evol_score`` (which the score stage's part already offers)."""
REASONS = (
    "similar_to_selected",
    "not_reached",
    "missing_score",
    "invalid_embedding",
    "below_budget_cut",
)
_STAT_OF_REASON = {"similar_to_selected": "rejected_for_similarity"}


def text_source_dir(out_dir: str) -> str | None:
    """The folder whose rows carry the text: score output if present, else ingest output."""
    for stage in ("score", "ingest"):
        d = stage_dir(out_dir, stage)
        if parquet_files(d):
            return d
    return None


def _read_text_pool(
    files: list[str], need_messages: bool, score: ScoreExpression, lengths: dict[str, str]
) -> dict[str, Any]:
    """Stream (id, seq, selection score, user/assistant lengths) out of the text pool.

    ``lengths`` maps ``user`` / ``assistant`` to the length scorer's row columns; where a file
    lacks them (no length scorer ran), the lengths are the characters of all user / assistant
    messages of the row.
    """
    ids: list[str] = []
    seqs, scores, ulen, alen = [], [], [], []
    for f in files:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        from_scorer = need_messages and all(c in names for c in lengths.values()) and lengths
        wanted = ["id", "seq", *score.names]
        if need_messages:
            wanted += list(lengths.values()) if from_scorer else ["messages"]
        cols = [c for c in dict.fromkeys(wanted) if c in names]
        for batch in pf.iter_batches(batch_size=8192, columns=cols):
            n = batch.num_rows
            ids.extend(batch.column("id").to_pylist())
            seqs.append(batch.column("seq").cast(pa.int64()).to_numpy(zero_copy_only=False))
            if all(c in cols for c in score.names):
                scores.append(score.evaluate({c: batch.column(c) for c in score.names}))
            else:
                scores.append(np.full(n, np.nan))
            if need_messages and from_scorer:
                for role, out in (("user", ulen), ("assistant", alen)):
                    col = batch.column(lengths[role]).cast(pa.int64())
                    out.append(col.fill_null(0).to_numpy(zero_copy_only=False))
            elif need_messages:
                msgs = batch.column("messages")
                ulen.append(message_lengths(msgs, "user"))
                alen.append(message_lengths(msgs, "assistant"))

    def cat(parts: list, dtype: Any) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype)

    return {
        "ids": ids,
        "seq": cat(seqs, np.int64),
        "scores": cat(scores, np.float64),
        "user_len": cat(ulen, np.int64),
        "assistant_len": cat(alen, np.int64),
    }


def _length_columns(cfg: PipelineConfig) -> dict[str, str]:
    """The first ``length`` scorer's instruction / response character columns (or nothing)."""
    from deita_ray.scorers import resolve_scorers  # noqa: PLC0415

    for spec in resolve_scorers(cfg):
        if spec.kind == "length":
            cols = spec.columns
            if "instruction_chars" in cols and "response_chars" in cols:
                return {"user": cols["instruction_chars"], "assistant": cols["response_chars"]}
    return {}


def _check_score_columns(files: list[str], score: ScoreExpression, folder: str) -> None:
    score.check_columns(pq.ParquetFile(files[0]).schema_arrow.names, folder)


def _select(cfg: PipelineConfig, out_dir: str) -> tuple[SelectionResult, dict[str, Any]]:
    """Run the configured method; returns the result and run facts for the metrics."""
    sc = cfg.select
    score = parse_score(sc.score)
    facts: dict[str, Any] = {}
    if sc.method == "deita" and sc.lazy_embed:
        from deita_ray.stages.lazy_embed import select_lazily  # noqa: PLC0415

        res, facts = select_lazily(cfg, out_dir)
        if sc.calibrate and "examined" in facts:
            facts["calibration"] = calibrate(cfg, *facts.pop("examined"))
            facts["calibration"]["computed_on"] = (
                "the rows the greedy examined (select.lazy_embed: the others have no embedding)"
            )
        return res, facts
    if sc.method in ("deita", "kcenter"):
        files = parquet_files(stage_dir(out_dir, "embed"))
        if not files:
            raise FileNotFoundError(f"select.method={sc.method} needs {out_dir}/embed/*.parquet")
        _check_score_columns(files, score, f"{out_dir}/embed")
        if sc.method == "deita" and sc.num_shards > 1:
            facts["mode"] = "distributed"
            res = select_distributed(
                files,
                sc.tau,
                sc.budget,
                sc.num_shards,
                block_size=sc.block_size,
                device=sc.device,
                shard_num_cpus=sc.shard_num_cpus,
                driver_device=sc.device,
                score=sc.score,
            )
            return res, facts
        plan, _ = plan_shards(files, 1)
        pool = load_pool(plan[0], score=sc.score)
        facts.update(mode="single_node", ids=pool.ids, seq=pool.seq, scores=pool.scores)
        if sc.method == "kcenter":
            facts["non_candidate"] = ("invalid_embedding", ~valid_rows(pool.embeddings)[0])
            return select_kcenter(
                pool.embeddings, sc.budget, pool.scores, pool.seq, pool.ids
            ), facts
        res = select_diverse(
            pool.embeddings,
            pool.scores,
            sc.tau,
            sc.budget,
            seq=pool.seq,
            ids=pool.ids,
            block_size=sc.block_size,
            device=sc.device,
        )
        if sc.calibrate:
            facts["calibration"] = calibrate(cfg, pool.scores, pool.embeddings, pool.seq)
        return res, facts
    src = text_source_dir(out_dir)
    if src is None:
        raise FileNotFoundError(f"select.method={sc.method} needs {out_dir}/score or /ingest")
    need_msgs = sc.method in ("instruction_length", "response_length")
    lengths = _length_columns(cfg) if need_msgs else {}
    files = parquet_files(src)
    pool = _read_text_pool(files, need_msgs, score, lengths)
    facts.update(mode="single_node", ids=pool["ids"], seq=pool["seq"], scores=pool["scores"])
    if need_msgs:
        names = pq.ParquetFile(files[0]).schema_arrow.names
        by_scorer = bool(lengths) and all(c in names for c in lengths.values())
        facts["length_source"] = "length_scorer" if by_scorer else "message_characters"
    if sc.method == "random":
        return select_random(
            len(pool["ids"]), sc.budget, sc.seed, pool["seq"], pool["scores"], pool["ids"]
        ), facts
    if sc.method == "score":
        if np.isnan(pool["scores"]).all() and len(pool["scores"]):
            _check_score_columns(files, score, src)
            raise ValueError(
                f"select.method=score: select.score={sc.score!r} is null for every row "
                "(run the score stage with the scorers it reads)"
            )
        facts["non_candidate"] = ("missing_score", np.isnan(pool["scores"]))
        return select_top_score(pool["scores"], sc.budget, pool["seq"], pool["ids"]), facts
    if need_msgs:
        lengths = pool["user_len" if sc.method == "instruction_length" else "assistant_len"]
        return select_longest(
            lengths, sc.budget, sc.method, pool["seq"], pool["scores"], pool["ids"]
        ), facts
    raise ValueError(f"unknown select.method {sc.method!r}")


CALIBRATION_SAMPLE = 2000
"""Pool rows whose nearest-neighbour cosine is computed (fixed seed 0), each against the whole
pool: enough for the distribution's percentiles, a few seconds at 100K rows."""


def calibrate(
    cfg: PipelineConfig, scores: np.ndarray, embeddings: np.ndarray, seq: np.ndarray
) -> dict[str, Any]:
    """The tau curve and the pool's nearest-neighbour cosines (docs/report.md, "Tau
    calibration"), for the select metrics."""
    sc = cfg.select
    t0 = time.perf_counter()
    taus = sorted(set(sc.tau_grid)) if sc.tau_grid else tau_grid(sc.tau)
    curve = tau_curve(
        scores, embeddings, taus, sc.budget, seq=seq, block_size=sc.block_size, device=sc.device
    )
    nn = nearest_neighbor_cosines(embeddings, sample=CALIBRATION_SAMPLE, seed=0)
    cos = nn["cosine"][np.isfinite(nn["cosine"])]
    from deita_ray.selection.calibration import histogram, summarize

    return {
        "configured_tau": sc.tau,
        "curve": {k: curve[k] for k in ("tau", "selected", "scanned", "budget_filled")},
        "budget": curve["budget"],
        "candidates": curve["candidates"],
        "pool": curve["pool"],
        "nearest_neighbour": {
            "method": nn["method"],
            "rows": int(len(cos)),
            "summary": summarize(cos),
            "histogram": histogram(cos),
            # Share of rows with a neighbour above each tau: rows that tau calls near-duplicates.
            "share_above": [float(np.mean(cos > t)) if len(cos) else None for t in taus],
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _pool_keys(
    facts: dict[str, Any], out_dir: str, n: int, score: str
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Ids, seq and selection score of the pool rows by position (the distributed method
    does not hand them back: they are read from the embed output in the order its positions
    refer to)."""
    if "ids" in facts:
        return list(facts["ids"]), np.asarray(facts["seq"], np.int64), facts["scores"]
    expr = parse_score(score)
    plan, _ = plan_shards(parquet_files(stage_dir(out_dir, "embed")), 1)
    ids: list[str] = []
    seqs, scores = [], []
    for t in iter_pieces(plan[0], tuple(dict.fromkeys(("id", "seq", *expr.names)))):
        ids.extend(t["id"].to_pylist())
        seqs.append(t["seq"].cast(pa.int64()).to_numpy(zero_copy_only=False))
        scores.append(expr.evaluate({c: t[c] for c in expr.names}))
    seq = np.concatenate(seqs) if seqs else np.empty(0, np.int64)
    if len(ids) != n:
        raise RuntimeError(f"select: {len(ids)} rows in the embed output, {n} in the selection")
    return ids, seq, np.concatenate(scores) if scores else np.empty(0, np.float64)


def decisions_table(
    res: SelectionResult,
    ids: list[str],
    seq: np.ndarray,
    scores: np.ndarray,
    non_candidate: tuple[str, np.ndarray] | None = None,
) -> pa.Table:
    """One row per pool row: what the selection did with it (see the module docstring).

    Args:
        res: the selection.
        ids, seq, scores: the pool's ids, seq and selection scores (NaN: none) by position.
        non_candidate: for the baselines, (reason, mask) of the rows that were no candidate.
    """
    n = len(ids)
    rank = np.full(n, -1, np.int64)
    rank[res.indices] = np.arange(len(res), dtype=np.int64)
    if res.row_status is not None:
        status_np = np.asarray(ROW_STATUS, dtype=object)[res.row_status]
    else:  # baselines: selected, ranked below the cut, or no candidate
        status_np = np.full(n, "below_budget_cut", dtype=object)
        if non_candidate is not None:
            status_np[np.asarray(non_candidate[1], bool)] = non_candidate[0]
        status_np[rank >= 0] = ROW_STATUS[SELECTED]
    status = pa.array(status_np, pa.string())
    by = res.rejected_by if res.rejected_by is not None else np.full(n, -1, np.int64)
    sim = res.rejected_sim if res.rejected_sim is not None else np.full(n, np.nan)
    sel_ids = np.asarray(res.ids if res.ids is not None else [None] * len(res), dtype=object)
    has_by = by >= 0
    by_id = np.full(n, None, dtype=object)
    by_id[has_by] = sel_ids[by[has_by]]
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "seq": pa.array(seq, pa.int64()),
            "status": status,
            "rank": pa.array(rank, mask=rank < 0),
            "rejected_by": pa.array(by_id, pa.string()),
            "rejected_by_rank": pa.array(by, mask=~has_by),
            "cosine": pa.array(np.asarray(sim, np.float64), mask=np.isnan(sim)),
            SELECTION_SCORE: pa.array(scores, pa.float64(), mask=~np.isfinite(scores)),
        }
    )


def score_column(cfg: PipelineConfig) -> str:
    """The selection output's score column: ``evol_score`` for the default score, else
    ``select_score`` (the scorers' own columns come with the text columns)."""
    return "evol_score" if cfg.select.score == "evol_score" else "select_score"


def _join_text(res: SelectionResult, out_dir: str, score_name: str = "evol_score") -> pa.Table:
    """The selected rows with their text columns, sorted by rank (streaming join on ``seq``)."""
    n = len(res)
    seq = np.asarray(res.seq, np.int64)
    max_sim = np.asarray(res.max_sim, np.float64)
    head = pa.table(
        {
            "id": pa.array(res.ids if res.ids is not None else [None] * n, pa.string()),
            "rank": pa.array(np.arange(n, dtype=np.int64)),
            score_name: pa.array(np.asarray(res.scores, np.float64), mask=np.isnan(res.scores)),
            "max_sim": pa.array(max_sim, mask=np.isnan(max_sim)),
        }
    )
    src = text_source_dir(out_dir)
    if src is None:
        return head.append_column("seq", pa.array(seq))
    wanted = pa.array(np.unique(seq))
    parts = []
    for f in parquet_files(src):
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=4096):
            hit = pc.is_in(batch.column("seq").cast(pa.int64()), value_set=wanted)
            if pc.any(hit).as_py():
                parts.append(pa.Table.from_batches([batch]).filter(hit))
    text = pa.concat_tables(parts, promote_options="default") if parts else None
    if text is None or text.num_rows == 0:
        if n:
            raise RuntimeError(f"select: none of the {n} selected rows found in {src}")
        return head.append_column("seq", pa.array(seq))
    tseq = text.column("seq").cast(pa.int64()).to_numpy(zero_copy_only=False)
    if len(np.unique(tseq)) != len(tseq) or len(tseq) != len(np.unique(seq)):
        raise RuntimeError(f"select: {len(tseq)} text rows for {n} selected seq in {src}")
    rank_of = {int(s): r for r, s in enumerate(seq)}
    text = text.take(np.argsort([rank_of[int(s)] for s in tseq], kind="stable"))
    text_ids = text.column("id").to_pylist()
    if res.ids is not None and text_ids != res.ids:
        raise RuntimeError("select: ids of the embed and text outputs disagree for the same seq")
    rest = [c for c in text.column_names if c not in head.column_names]
    for c in rest:
        head = head.append_column(text.schema.field(c), text.column(c))
    return head


def _summary(x: np.ndarray) -> dict[str, float] | None:
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return None
    q = np.quantile(x, [0.1, 0.5, 0.9])
    return {
        "min": float(x.min()),
        "p10": float(q[0]),
        "median": float(q[1]),
        "p90": float(q[2]),
        "max": float(x.max()),
        "mean": float(x.mean()),
    }


class NoCandidates(ValueError):
    """The pool has rows but none of them can be selected (e.g. no row has a score)."""


def check_candidates(stats: dict[str, Any], method: str) -> None:
    """Fail when a non-empty pool has no candidate: selecting nothing is never a result.

    Raises:
        NoCandidates: naming the counts that explain why (missing scores, bad embeddings).
    """
    pool = int(stats.get("pool", 0))
    if pool == 0 or int(stats.get("candidates", 0)) > 0:
        return
    causes = {k: int(stats[k]) for k in ("missing_score", "invalid_embedding") if stats.get(k)}
    hint = ""
    if causes.get("missing_score"):
        hint = (
            f" select.method={method} orders rows by their score: run the score stage "
            "(stages: [..., score, ...]) or pick a method that needs none (random, kcenter, "
            "instruction_length, response_length)."
        )
    raise NoCandidates(
        f"select: none of the {pool} pool rows is a candidate ({causes or 'no reason recorded'})."
        f"{hint}"
    )


def run_select(cfg: PipelineConfig, out_dir: str) -> StageResult:
    """Select ``select.budget`` rows with ``select.method`` and write ``<out_dir>/select/``.

    Assumes Ray is initialised when ``select.num_shards > 1`` (the distributed method).

    Returns:
        Counts (pool rows in, selected rows out, not-selected rows by reason; no rejects,
        nothing is written to rejects/) and metrics: method, tau, budget, pool statistics, score and
        max_sim summaries, timings.
    """
    sc = cfg.select
    t0 = time.perf_counter()
    res, facts = _select(cfg, out_dir)
    t_sel = time.perf_counter() - t0
    check_candidates(res.stats, sc.method)
    table = _join_text(res, out_dir, score_column(cfg))
    out = stage_dir(out_dir, NAME)
    os.makedirs(out, exist_ok=True)
    pq.write_table(table, os.path.join(out, "part-00000.parquet"))
    ids, seq, scores = _pool_keys(facts, out_dir, int(res.stats["pool"]), sc.score)
    why = decisions_dir(out_dir, NAME)
    os.makedirs(why, exist_ok=True)
    decisions = decisions_table(res, ids, seq, scores, facts.get("non_candidate"))
    if "dropped" in facts:  # lazy_embed: the embedder's rejects are in no pool (as in full)
        decisions = decisions.filter(pa.array(~facts["dropped"]))
    pq.write_table(decisions, os.path.join(why, "part-00000.parquet"))
    st = res.stats
    reasons = {}
    for reason in REASONS:
        v = int(st.get(_STAT_OF_REASON.get(reason, reason), 0))
        if v:
            reasons[reason] = v
    counts = StageCounts(
        rows_in=int(facts.get("rows_in", st["pool"])),
        rows_out=len(res),
        rejected_by_reason=dict(facts.get("rejected_by_reason") or {}),
        not_selected_by_reason=reasons,
    )
    counts.check(NAME)
    metrics = {
        "method": sc.method,
        "score": sc.score,
        "mode": facts.get("mode"),
        "tau": sc.tau if sc.method == "deita" else None,
        "budget": sc.budget,
        "block_size": sc.block_size,
        "num_shards": sc.num_shards,
        "device": sc.device,
        "num_selected": len(res),
        "pool": {k: (int(v) if isinstance(v, (int, np.integer)) else v) for k, v in st.items()},
        score_column(cfg): _summary(res.scores),
        **({"length_source": facts["length_source"]} if "length_source" in facts else {}),
        "max_sim": _summary(res.max_sim),
        "calibration": facts.get("calibration"),
        **({"lazy_embed": facts["lazy_embed"]} if "lazy_embed" in facts else {}),
        "timing_s": {
            "select": round(t_sel, 3),
            "join_write": round(time.perf_counter() - t0 - t_sel, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }
    return StageResult(counts=counts, metrics=metrics)


STAGE = Stage(
    name=NAME,
    run=run_select,
    config_keys=("select",),
    # Lazy or full, the greedy gives the same selection (docs/selection.md); the embed stage's
    # hash carries the switch. Left out here, finished outputs keep their hash.
    hash_ignore=("lazy_embed",),
    reads=("embed", "score", "ingest"),
    input_columns=("id", "seq", "evol_score", "embedding"),
    output_columns=("id", "rank", "evol_score", "max_sim"),
    rejects_are_failures=False,  # rows not selected are the point of the stage, not failures
    selects=True,
    models=lazy_embed_models,
    gpu_uses=lazy_embed_gpu_uses,
    notes=lazy_embed_notes,
    doc="score-first diversity-aware selection (or a baseline) of select.budget rows",
)

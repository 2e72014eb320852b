"""The select stage's report: what was picked, why the rest was not, and what tau does.

Reads (only the columns named; the pool's text and embeddings are never loaded whole):

- ``<out>/select``: ``id``, ``rank``, ``evol_score``, ``max_sim`` (cosine to the rows selected
  before it) of the selection;
- ``<out>/decisions/select``: per pool row ``status``, ``rank``, ``rejected_by``, ``cosine``
  (see :mod:`deita_ray.stages.select`);
- ``<out>/embed``: ``id``, ``embedding`` of the *selected* rows only (an id filter while
  scanning), for the nearest selected-neighbour cosine of every selected row;
- the select metrics' ``calibration`` (the tau curve and the pool's nearest-neighbour cosines,
  computed by the stage while the pool was in memory).

Statistics: ``similarity`` (tau, max_sim and nearest selected-neighbour summaries),
``why_not`` (rows per status, the cosines of the rows rejected for similarity, the selected
rows that rejected the most) and ``tau_calibration``. Plots: ``rank_vs_evol.png``,
``nearest_neighbour_similarity.png``, ``tau_curve.png``. See docs/report.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deita_ray.data.sink import decisions_dir, stage_dir
from deita_ray.report.plots import ACCENT_COLOR, SELECTION_COLOR, figure, save_png
from deita_ray.report.section import (
    SELECTED,
    ReportContext,
    ReportPart,
    StageReport,
    merge_rows,
    read_columns,
    read_json,
    rows_by_id,
    to_numpy,
)
from deita_ray.selection.calibration import nearest_neighbor_cosines, summarize
from deita_ray.selection.pool import embedding_matrix
from deita_ray.stages.select import SELECTION_SCORE

NAME = "select"
EMBED = "embed"
TOP_REJECTERS = 10
"""Selected rows listed in ``why_not.top_rejecters`` (those that rejected the most rows)."""


def read_selection(out_dir: str) -> pa.Table | None:
    """``id``, ``rank``, ``evol_score`` and ``max_sim`` of the selection in rank order, or None."""
    table = read_columns(
        stage_dir(out_dir, NAME), ["id", "rank", "evol_score", "max_sim"], ["id", "rank"]
    )
    return None if table is None else table.sort_by([("rank", "ascending")])


def read_decisions(out_dir: str) -> pa.Table | None:
    """What the selection did with every pool row (None for outputs written before the
    decisions existed)."""
    return read_columns(
        decisions_dir(out_dir, NAME),
        ["id", "status", "rank", "rejected_by", "cosine", SELECTION_SCORE],
        ["id", "status"],
    )


def read_selected_embeddings(out_dir: str, ids: Sequence[str]) -> np.ndarray | None:
    """Float32 embeddings of ``ids`` (rows in the order of ``ids``), streamed from the embed
    output so that only the selected rows' vectors are kept (:func:`rows_by_id`).

    Returns None when the embed output is absent or lacks any of the ids.
    """
    table = rows_by_id(stage_dir(out_dir, EMBED), ids, ["embedding"])
    if table is None or "embedding" not in table.column_names:
        return None
    table = table.filter(pc.is_valid(table["embedding"]))
    found: dict[str, np.ndarray] = {}
    if table.num_rows:
        vectors, _ = embedding_matrix(table["embedding"])
        for i, row_id in enumerate(table["id"].to_pylist()):
            found.setdefault(row_id, vectors[i])
    if any(i not in found for i in ids):
        return None
    return np.stack([found[i] for i in ids])


def selection_tau(ctx: ReportContext) -> float | None:
    """The selection threshold: from the select stage's metrics (None there means a method
    without one), else from the manifest's config when its method is ``deita``."""
    metrics = ctx.metrics(NAME)
    if "tau" in metrics:
        tau = metrics["tau"]
    else:
        manifest = read_json(os.path.join(ctx.out_dir, "manifest.json")) or {}
        cfg = (manifest.get("config") or {}).get(NAME) or {}
        tau = cfg.get("tau") if cfg.get("method", "deita") == "deita" else None
    return float(tau) if isinstance(tau, int | float) and not isinstance(tau, bool) else None


# ---------------------------------------------------------------------------------------------
# Plots


def plot_rank_vs_evol(rank: np.ndarray, evol: np.ndarray, plots_dir: str) -> str:
    """Evol score of each selected row against its selection rank."""
    from matplotlib.ticker import MaxNLocator

    fig = figure(7, 4.5)
    ax = fig.subplots()
    ax.plot(rank, evol, ".", markersize=3, color=SELECTION_COLOR)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("selection rank (0 = taken first)")
    ax.set_ylabel("evol score")
    ax.set_title(f"Selection rank vs evol score (n={rank.size:,})")
    ax.grid(alpha=0.3)
    return save_png(fig, plots_dir, "rank_vs_evol.png")


def plot_similarity(
    nn: np.ndarray, max_sim: np.ndarray | None, tau: float | None, plots_dir: str
) -> str:
    """Histogram of the nearest selected-neighbour cosine (and of ``max_sim``), tau marked."""
    fig = figure(7, 4.5)
    ax = fig.subplots()
    values = [nn] + ([max_sim] if max_sim is not None and max_sim.size else [])
    both = np.concatenate(values)
    lo = float(min(both.min(), tau if tau is not None else both.min()))
    hi = float(max(both.max(), tau if tau is not None else both.max()))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 41)
    ax.hist(nn, bins=bins, alpha=0.7, color=SELECTION_COLOR, label="nearest selected neighbour")
    if len(values) > 1:
        ax.hist(
            max_sim, bins=bins, alpha=0.5, color=ACCENT_COLOR, label="max_sim (to earlier picks)"
        )
    if tau is not None:
        ax.axvline(tau, color="black", linestyle="--", label=f"tau = {tau:g}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("selected rows")
    ax.set_title(f"Nearest selected-neighbour similarity (n={nn.size:,})")
    ax.legend(fontsize=8)
    return save_png(fig, plots_dir, "nearest_neighbour_similarity.png")


def plot_tau_curve(calibration: dict, plots_dir: str) -> str:
    """Left: rows selected and rows scanned per tau (budget and configured tau marked).
    Right: the pool's nearest-neighbour cosines, with the configured tau."""
    curve = calibration["curve"]
    tau0 = calibration.get("configured_tau")
    budget = calibration.get("budget")
    nn = calibration.get("nearest_neighbour") or {}
    hist = nn.get("histogram")
    fig = figure(13 if hist else 7, 4.5)
    axes = np.atleast_1d(fig.subplots(1, 2 if hist else 1))
    ax = axes[0]
    taus = np.asarray(curve["tau"], np.float64)
    ax.plot(taus, curve["selected"], "o-", color=SELECTION_COLOR, label="rows selected")
    ax.plot(taus, curve["scanned"], "s--", color=ACCENT_COLOR, label="rows scanned")
    if budget is not None:
        ax.axhline(budget, color="grey", linestyle=":", label=f"budget = {budget:,}")
    if tau0 is not None:
        ax.axvline(tau0, color="black", linestyle="--", label=f"configured tau = {tau0:g}")
    ax.set_xlabel("tau (a row is kept iff its cosine to every kept row is <= tau)")
    ax.set_ylabel("rows")
    ax.set_title(
        f"Tau curve: exact greedy on the pool ({calibration.get('candidates', 0):,} candidates)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if hist:
        ax = axes[1]
        edges = np.asarray(hist["edges"])
        ax.stairs(hist["counts"], edges, fill=True, color="#9e9e9e", alpha=0.8)
        if tau0 is not None:
            ax.axvline(tau0, color="black", linestyle="--", label=f"configured tau = {tau0:g}")
            ax.legend(fontsize=8)
        ax.set_xlabel("cosine to the nearest other row of the pool")
        ax.set_ylabel("rows")
        ax.set_title(f"Pool nearest-neighbour cosines ({nn.get('rows', 0):,} rows)")
        ax.grid(alpha=0.3)
    return save_png(fig, plots_dir, "tau_curve.png")


# ---------------------------------------------------------------------------------------------
# The part


def rows(ctx: ReportContext) -> pa.Table | None:
    """Per pool row: status, rank, rejected_by, cosine; per selected row also evol_score and
    max_sim. Without decisions (older outputs) only the selected rows are known; without the
    selection, nothing."""
    selection = read_selection(ctx.out_dir)
    if selection is None:
        return None  # decisions without their selection belong to a selection that is gone
    decisions = read_decisions(ctx.out_dir)
    score = ((ctx.stages.get(NAME) or {}).get("metrics") or {}).get("score", "evol_score")
    if (
        decisions is not None
        and score == "evol_score"
        and SELECTION_SCORE in decisions.schema.names
    ):
        decisions = decisions.drop_columns([SELECTION_SCORE])  # the same values as evol_score
    if decisions is None:
        selection = selection.append_column(
            "status", pa.array([SELECTED] * selection.num_rows, pa.string())
        )
    return merge_rows([decisions, selection])


def why_not(decisions: pa.Table, ids_by_rank: dict[str, int]) -> dict[str, Any]:
    """Rows per status; for the rows rejected for similarity, their cosine to the selected row
    that rejected them and the selected rows that rejected the most."""
    # use_threads=False throughout: a threaded group_by fails at random once Ray Data has
    # resized Arrow's CPU pool in this process (see ingest._reduce_bucket).
    counts = decisions.group_by("status", use_threads=False).aggregate([("status", "count")])
    by_status = dict(
        zip(counts["status"].to_pylist(), counts["status_count"].to_pylist(), strict=True)
    )
    out: dict[str, Any] = {"status": by_status}
    if "rejected_by" in decisions.column_names:
        rejected = decisions.filter(pc.is_valid(decisions["rejected_by"]))
        out["rejected_for_similarity"] = rejected.num_rows
        if "cosine" in rejected.column_names:
            out["cosine"] = summarize(to_numpy(rejected["cosine"]))
        top = rejected.group_by("rejected_by", use_threads=False).aggregate(
            [("rejected_by", "count")]
        )
        top = top.sort_by([("rejected_by_count", "descending"), ("rejected_by", "ascending")])
        out["top_rejecters"] = [
            {"id": i, "rank": ids_by_rank.get(i), "rejected": n}
            for i, n in zip(
                top["rejected_by"].to_pylist()[:TOP_REJECTERS],
                top["rejected_by_count"].to_pylist()[:TOP_REJECTERS],
                strict=True,
            )
        ]
    return out


def build(ctx: ReportContext) -> ReportPart:
    part = ReportPart()
    selection = read_selection(ctx.out_dir)
    if selection is None:
        return part
    plots_dir = ctx.plots_dir
    ids = selection["id"].to_pylist()
    if plots_dir is not None and "evol_score" in selection.column_names and selection.num_rows:
        evol = to_numpy(selection["evol_score"])
        if np.isfinite(evol).any():
            part.plots.append(plot_rank_vs_evol(to_numpy(selection["rank"]), evol, plots_dir))

    tau = selection_tau(ctx)
    max_sim = to_numpy(selection["max_sim"]) if "max_sim" in selection.column_names else None
    similarity: dict[str, Any] = {
        "tau": tau,
        "selected": selection.num_rows,
        "max_sim": summarize(max_sim) if max_sim is not None else None,
        "nearest_neighbour": None,
    }
    vectors = read_selected_embeddings(ctx.out_dir, ids)
    if vectors is not None and len(ids) >= 2:
        nn = nearest_neighbor_cosines(vectors, sample=None)["cosine"]
        similarity["nearest_neighbour"] = summarize(nn)
        if tau is not None:
            similarity["nearest_neighbour_above_tau"] = int(np.count_nonzero(nn > tau))
        if plots_dir is not None:
            finite = max_sim[np.isfinite(max_sim)] if max_sim is not None else None
            part.plots.append(plot_similarity(nn, finite, tau, plots_dir))
    part.statistics["similarity"] = similarity

    decisions = read_decisions(ctx.out_dir)
    if decisions is not None:
        part.statistics["why_not"] = why_not(decisions, {i: r for r, i in enumerate(ids)})

    calibration = ctx.metrics(NAME).get("calibration")
    if isinstance(calibration, dict) and calibration.get("curve"):
        nn = calibration.get("nearest_neighbour") or {}
        part.statistics["tau_calibration"] = {
            "configured_tau": calibration.get("configured_tau"),
            "budget": calibration.get("budget"),
            "candidates": calibration.get("candidates"),
            **calibration["curve"],
            "nearest_neighbour": nn.get("summary"),
            "share_above": nn.get("share_above"),
        }
        if plots_dir is not None:
            part.plots.append(plot_tau_curve(calibration, plots_dir))
    return part


REPORT = StageReport(
    rows=rows,
    row_score=SELECTION_SCORE,
    build=build,
    plots=("rank_vs_evol.png", "nearest_neighbour_similarity.png", "tau_curve.png"),
)

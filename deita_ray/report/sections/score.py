"""The score stage's report: score statistics and distributions, pool vs selection.

Reads ``<out>/score``: ``id`` and every score column the output has (:func:`score_columns`:
each numeric column is a per-row score, each list of numbers a per-turn score, one value per
(instruction, response) turn), so a new scorer's column is reported without a change here.
Per-turn statistics count one value per turn (a multi-turn row contributes several; one point
per turn in the scatter); per-row statistics one per row. The selection is the merged rows'
``selected`` status (:meth:`ReportContext.selected_ids`); the pool's text is never loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deita_ray.data.sink import stage_dir
from deita_ray.report.plots import POOL_COLOR, SELECTION_COLOR, figure, save_png
from deita_ray.report.section import (
    ReportContext,
    ReportPart,
    StageReport,
    dataset,
    score_columns,
    score_key,
    to_numpy,
)
from deita_ray.report.sections.canonical import canonical_rows, canonical_texts
from deita_ray.selection.calibration import summarize

NAME = "score"
ROW_SCORE = "evol_score"
"""The per-row score that orders the pool (and the report browser's score filter)."""

SCATTER_MAX_POINTS = 50_000
"""The pool's scatter is a fixed-seed sample of this many points (statistics use every row)."""


@dataclass
class ScoreSet:
    """Score values of a set of rows: flattened per-turn lists and per-row values, by key, and
    the per-turn pairs of the first two per-turn scores (rows whose two lists have the same
    length; others cannot be matched turn by turn)."""

    rows: int
    per_turn: dict[str, np.ndarray]
    per_row: dict[str, np.ndarray]
    pair: tuple[np.ndarray, np.ndarray] | None

    @classmethod
    def of(cls, table: pa.Table, per_row: Sequence[str], per_turn: Sequence[str]) -> ScoreSet:
        turn = {score_key(c): to_numpy(pc.list_flatten(table[c])) for c in per_turn}
        row = {score_key(c): to_numpy(table[c]) for c in per_row}
        pair = None
        if len(per_turn) >= 2:
            a, b = table[per_turn[0]], table[per_turn[1]]
            same = pc.fill_null(pc.equal(pc.list_value_length(a), pc.list_value_length(b)), False)
            pair = (
                to_numpy(pc.list_flatten(pc.filter(a, same))),
                to_numpy(pc.list_flatten(pc.filter(b, same))),
            )
        return cls(table.num_rows, turn, row, pair)

    @property
    def empty(self) -> bool:
        return not any(v.size for v in (*self.per_turn.values(), *self.per_row.values()))

    def statistics(self) -> dict:
        out: dict = {"rows": self.rows}
        out.update({k: summarize(v) for k, v in self.per_turn.items()})
        out.update({k: summarize(v) for k, v in self.per_row.items()})
        out.update(
            {
                f"missing_{k}": int(np.count_nonzero(~np.isfinite(v)))
                for k, v in self.per_row.items()
            }
        )
        return out


def plot_score_distributions(pool: ScoreSet, sel: ScoreSet | None, plots_dir: str) -> str:
    """Histograms (density) of every score: pool vs selection."""
    panels = [(k, v, "per turn") for k, v in pool.per_turn.items()]
    panels += [(k, v, "per row") for k, v in pool.per_row.items()]
    fig = figure(max(6.0, 4.3 * len(panels)), 4)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (key, values, unit) in zip(axes, panels, strict=True):
        p = values[np.isfinite(values)]
        s = np.empty(0)
        if sel is not None:
            s = (sel.per_turn if unit == "per turn" else sel.per_row)[key]
            s = s[np.isfinite(s)]
        both = np.concatenate([p, s])
        if both.size == 0:
            ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
        else:
            lo, hi = float(both.min()), float(both.max())
            bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
            for v, color, name in ((p, POOL_COLOR, "pool"), (s, SELECTION_COLOR, "selection")):
                if v.size:
                    label = f"{name} (n={v.size:,})"
                    ax.hist(v, bins=bins, density=True, alpha=0.6, color=color, label=label)
            ax.legend(fontsize=8)
        ax.set_title(f"{key.capitalize()} score ({unit})")
        ax.set_xlabel("score")
        ax.set_ylabel("density")
    fig.suptitle("Score distributions: pool vs selection")
    return save_png(fig, plots_dir, "score_distributions.png")


def plot_pair(
    pool: ScoreSet, sel: ScoreSet | None, names: tuple[str, str], plots_dir: str
) -> str | None:
    """Scatter of the first two per-turn scores, one point per turn: pool in grey, selection
    highlighted (``complexity_vs_quality.png`` for the DEITA scorers)."""
    if pool.pair is None:
        return None
    a, b = pool.pair
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return None
    fig = figure(6.5, 5.5)
    ax = fig.subplots()
    pa_, pb_ = a[ok], b[ok]
    label = f"pool (n={pa_.size:,})"
    if pa_.size > SCATTER_MAX_POINTS:
        keep = np.random.default_rng(0).choice(pa_.size, SCATTER_MAX_POINTS, replace=False)
        pa_, pb_ = pa_[keep], pb_[keep]
        label = f"pool (sample of {SCATTER_MAX_POINTS:,} of {ok.sum():,})"
    ax.scatter(pa_, pb_, s=6, alpha=0.35, color=POOL_COLOR, label=label, linewidths=0)
    if sel is not None and sel.pair is not None:
        sa, sb = sel.pair
        sok = np.isfinite(sa) & np.isfinite(sb)
        ax.scatter(
            sa[sok],
            sb[sok],
            s=10,
            alpha=0.8,
            color=SELECTION_COLOR,
            label=f"selection (n={sok.sum():,})",
            linewidths=0,
        )
    ax.set_xlabel(f"{names[0]} score")
    ax.set_ylabel(f"{names[1]} score")
    ax.set_title(f"{names[0].capitalize()} vs {names[1]} (one point per turn)")
    ax.legend(fontsize=8, loc="best")
    return save_png(fig, plots_dir, f"{names[0]}_vs_{names[1]}.png")


def _table(ctx: ReportContext) -> tuple[pa.Table, list[str], list[str]] | None:
    ds = dataset(stage_dir(ctx.out_dir, NAME), ["id"])
    if ds is None:
        return None
    per_row, per_turn = score_columns(ds.schema)
    if not (per_row or per_turn):
        return None
    return ds.to_table(columns=["id", *per_turn, *per_row]), per_row, per_turn


def rows(ctx: ReportContext) -> pa.Table | None:
    """Every row's scores (plus its source, for a job whose ingest output is gone)."""
    ds = dataset(stage_dir(ctx.out_dir, NAME), ["id"])
    if ds is None:
        return None
    per_row, per_turn = score_columns(ds.schema)
    return canonical_rows(stage_dir(ctx.out_dir, NAME), [*per_row, *per_turn])


def texts(ctx: ReportContext, ids: Sequence[str]) -> pa.Table | None:
    return canonical_texts(stage_dir(ctx.out_dir, NAME), ids)


def build(ctx: ReportContext) -> ReportPart:
    """``statistics["scores"]``: ``pool`` and ``selection``, each ``rows``, a summary per score
    key and ``missing_<key>`` per per-row score; the distributions and the pair scatter."""
    part = ReportPart()
    sel_ids = ctx.selected_ids()
    read = _table(ctx)
    if read is None:
        # No score output (e.g. cleaned up): the selection's own row score still tells a story.
        sel = ctx.selected()
        if sel is not None and ROW_SCORE in sel.column_names:
            only = ScoreSet(
                sel.num_rows, {}, {score_key(ROW_SCORE): to_numpy(sel[ROW_SCORE])}, None
            )
            part.statistics["scores"] = {"selection": only.statistics()}
        return part
    table, per_row, per_turn = read
    pool = ScoreSet.of(table, per_row, per_turn)
    sel = None
    if sel_ids:
        chosen = pc.is_in(table["id"], value_set=pa.array(sel_ids, table["id"].type))
        sel = ScoreSet.of(table.filter(chosen), per_row, per_turn)
    scores = {"pool": pool.statistics()}
    if sel is not None:
        scores["selection"] = sel.statistics()
    part.statistics["scores"] = scores
    if ctx.plots_dir is not None and not pool.empty:
        part.plots.append(plot_score_distributions(pool, sel, ctx.plots_dir))
        if len(per_turn) >= 2:
            names = (score_key(per_turn[0]), score_key(per_turn[1]))
            name = plot_pair(pool, sel, names, ctx.plots_dir)
            if name:
                part.plots.append(name)
    return part


REPORT = StageReport(
    rows=rows,
    texts=texts,
    build=build,
    plots=("score_distributions.png", "*_vs_*.png"),
    row_score=ROW_SCORE,
)

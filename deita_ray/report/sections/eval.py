"""The eval stage's report: each set's headline metrics with their 95% intervals.

Reads only the stage's recorded metrics (``metrics.sets.<set>.<metric>``). Statistics:
``evaluation`` (per set: rows, contaminated rows, rejects by reason and, per metric, the value,
its interval and which direction is better). Plot: ``eval_metrics.png`` (one panel per metric,
a point with its interval per set). See docs/evaluation.md.
"""

from __future__ import annotations

from typing import Any

from deita_ray.evaluation import METRIC_KEYS
from deita_ray.report.plots import SELECTION_COLOR, figure, save_png
from deita_ray.report.section import ReportContext, ReportPart, StageReport

NAME = "eval"
PLOT = "eval_metrics.png"


def evaluation(metrics: dict) -> dict[str, Any]:
    """Per set: its counts and each metric's value, interval and direction."""
    out: dict[str, Any] = {}
    for sname, entry in (metrics.get("sets") or {}).items():
        row: dict[str, Any] = {
            k: entry.get(k) for k in ("rows", "contaminated", "rejected_by_reason")
        }
        for metric, (vkey, ckey, lower) in METRIC_KEYS.items():
            summary = entry.get(metric)
            if isinstance(summary, dict):
                row[metric] = {
                    "value": summary.get(vkey),
                    "ci95": summary.get(ckey),
                    "better": "lower" if lower else "higher",
                }
        out[sname] = row
    return out


def plot_metrics(table: dict[str, Any], model: str, plots_dir: str) -> str | None:
    panels = [m for m in METRIC_KEYS if any(m in row for row in table.values())]
    if not panels:
        return None
    fig = figure(max(5.0, 4.5 * len(panels)), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, metric in zip(axes, panels, strict=True):
        names = [
            s for s, row in table.items() if metric in row and row[metric]["value"] is not None
        ]
        values = [table[s][metric]["value"] for s in names]
        lo = [
            v - (table[s][metric]["ci95"] or [v, v])[0] for s, v in zip(names, values, strict=True)
        ]
        hi = [
            (table[s][metric]["ci95"] or [v, v])[1] - v for s, v in zip(names, values, strict=True)
        ]
        ax.errorbar(
            values, range(len(names)), xerr=[lo, hi], fmt="o", color=SELECTION_COLOR, capsize=4
        )
        ax.set_yticks(range(len(names)), names)
        ax.set_ylim(-0.7, len(names) - 0.3)
        better = "lower" if METRIC_KEYS[metric][2] else "higher"
        ax.set_xlabel(f"{METRIC_KEYS[metric][0]} ({better} is better; 95% interval)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Evaluation of {model}")
    return save_png(fig, plots_dir, PLOT)


def build(ctx: ReportContext) -> ReportPart:
    part = ReportPart()
    metrics = ctx.metrics(NAME)
    if not metrics.get("sets"):
        return part
    table = evaluation(metrics)
    part.statistics["evaluation"] = {"model": metrics.get("model"), "sets": table}
    if ctx.plots_dir is not None:
        name = plot_metrics(
            table, str(metrics.get("model_kind") or metrics.get("model")), ctx.plots_dir
        )
        if name is not None:
            part.plots.append(name)
    return part


REPORT = StageReport(build=build, plots=(PLOT,))

"""Assembling the job report: ``<out>/report.json``, PNG plots in ``<out>/plots/`` and
``<out>/report.html``.

This module names no stage. Each stage of the registry (:func:`deita_ray.stages.registry`) may
have a section (:data:`deita_ray.report.sections.SECTIONS`, keyed by stage name): a
:class:`~deita_ray.report.section.StageReport` with its per-row facts, its statistics and its
plots. The report merges the sections' row facts into one table, lets each section build its
part from it, plots the loss of every stage that ``trains`` (:mod:`deita_ray.report.plots`),
and writes:

- ``report.json``: ``stages`` (per stage rows in/out/rejected by reason, time, metrics, as the
  pipeline recorded them), ``statistics`` (the sections' parts), ``selected_ids`` (rank order),
  ``plots`` (paths relative to the output directory), ``notes``;
- ``plots/*.png``;
- ``report.html``: one self-contained page with all of it and a sample browser of the rows
  (:mod:`deita_ray.report.html`, docs/report.md).

:func:`write_report` is called by the pipeline at the end of a job with the per-stage results;
``python -m deita_ray.report <out dir>`` (:func:`main`) rebuilds all three later from the
``stages`` section of an existing ``report.json`` (or of ``manifest.json``) plus the outputs on
disk. Each part is produced only when its inputs exist: a job that ran only ``ingest`` gets a
report without statistics plots instead of a crash, and the page says which stages are missing.

Example:
    >>> report = write_report("outputs/run", {"ingest": {"rows_in": 10, "rows_out": 10}})
    >>> sorted(report)
    ['notes', 'plots', 'selected_ids', 'stages', 'statistics']
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deita_ray.report.plots import LOSS_PLOT, plot_losses
from deita_ray.report.section import ReportContext, StageReport, jsonable, merge_rows, read_json
from deita_ray.report.sections import SECTIONS

if TYPE_CHECKING:
    from deita_ray.stages.base import Stage

REPORT_FILE = "report.json"
MANIFEST_FILE = "manifest.json"
PLOTS_DIR = "plots"


def _losses(stages: dict, descriptors: list[Stage]) -> dict[str, list[float]]:
    out = {}
    for stage in (desc.name for desc in descriptors if desc.trains):
        loss = (stages.get(stage) or {}).get("metrics", {}).get("loss")
        if isinstance(loss, list):
            values = [float(v) for v in loss if isinstance(v, int | float) and math.isfinite(v)]
            if values:
                out[stage] = values
    return out


@dataclass
class Assembled:
    """Everything the report is made of (report.json's parts plus what the page needs)."""

    statistics: dict[str, Any]
    selected_ids: list[str]
    plots: list[str]
    context: ReportContext
    descriptors: list[Stage]
    sections: list[tuple[str, StageReport]] = field(default_factory=list)
    """(stage name, its section) of the registry's stages that have one, in pipeline order."""
    plot_stage: dict[str, str] = field(default_factory=dict)
    """Plot path -> the stage it belongs to (``training`` for the loss plot)."""

    @property
    def row_score(self) -> str | None:
        """The per-row score column that orders rows (declared by a stage's report; a later
        stage's wins: the selection's own score over the score stage's default)."""
        rows = self.context.rows
        for _, section in reversed(self.sections):
            score = section.row_score
            if score and rows is not None and score in rows.column_names:
                return score
        return None


def assemble(out_dir: str, stages: dict, plots_dir: str | None = None) -> Assembled:
    """Merge the sections' row facts, build every section's part (writing plots when
    ``plots_dir`` is given) and the loss plot of the training stages."""
    from deita_ray.stages import registry

    descriptors = registry()
    ctx = ReportContext(out_dir=out_dir, stages=stages, plots_dir=plots_dir)
    reports = [(d.name, SECTIONS[d.name]) for d in descriptors if d.name in SECTIONS]
    ctx.rows = merge_rows([r.rows(ctx) for _, r in reports if r.rows is not None])
    statistics: dict[str, Any] = {}
    plots: list[str] = []
    plot_stage: dict[str, str] = {}
    for stage, rep in reports:
        if rep.build is None:
            continue
        part = rep.build(ctx)
        statistics.update(part.statistics)
        for name in part.plots:
            plots.append(f"{PLOTS_DIR}/{name}")
            plot_stage[plots[-1]] = stage
    losses = _losses(stages, descriptors)
    if losses and plots_dir is not None:
        plots.append(f"{PLOTS_DIR}/{plot_losses(losses, plots_dir)}")
        plot_stage[plots[-1]] = "training"
    return Assembled(statistics, ctx.selected_ids(), plots, ctx, descriptors, reports, plot_stage)


def build_statistics(out_dir: str, stages: dict, plots_dir: str | None = None) -> dict:
    """Compute the statistics (and, when ``plots_dir`` is given, write the plots).

    Returns:
        ``{"statistics": ..., "selected_ids": [...], "plots": [relative paths]}``.
    """
    built = assemble(out_dir, stages, plots_dir)
    return {
        "statistics": built.statistics,
        "selected_ids": built.selected_ids,
        "plots": built.plots,
    }


def plot_patterns(descriptors: list[Stage]) -> list[str]:
    """File name patterns of every plot the stages' sections (and the loss plot) may write."""
    names = [LOSS_PLOT]
    for desc in descriptors:
        if desc.name in SECTIONS:
            names.extend(SECTIONS[desc.name].plots)
    return names


def _remove_stale_plots(plots_dir: str, produced: set[str], descriptors: list[Stage]) -> None:
    """A rebuild must not leave plots whose inputs are gone (only the report's own plots are
    touched: other jobs' plots in the folder, such as a study's, stay)."""
    if not os.path.isdir(plots_dir):
        return
    patterns = plot_patterns(descriptors)
    for name in os.listdir(plots_dir):
        if name in produced or not name.endswith(".png"):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            os.remove(os.path.join(plots_dir, name))


def _write_atomic(out_dir: str, name: str, text: str) -> None:
    tmp = os.path.join(out_dir, f".tmp-{os.getpid()}-{name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out_dir, name))


def merge_earlier_stages(out_dir: str, stages: dict[str, dict]) -> dict[str, dict]:
    """``stages`` plus every stage an earlier job finished in ``out_dir`` (``manifest.json``),
    marked ``earlier_run``, in pipeline order: a job that runs only some stages into the
    output directory of another (DPO after SFT) still reports all of them."""
    from deita_ray.accounting import current_entry
    from deita_ray.config import STAGES
    from deita_ray.stages import registry

    manifest = read_json(os.path.join(out_dir, MANIFEST_FILE)) or {}
    merged = {
        name: dict(entry["result"], earlier_run=True)
        for name, entry in (manifest.get("stages") or {}).items()
        if isinstance(entry, dict) and entry.get("status") == "done" and "result" in entry
    }
    merged.update(stages)
    rank = {name: i for i, name in enumerate(STAGES)}
    # Entries an earlier version wrote call the rows a selecting stage did not pick "rejected".
    selects = {desc.name for desc in registry() if desc.selects}
    return {
        name: current_entry(entry, name in selects)
        for name, entry in sorted(merged.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    }


def write_report(out_dir: str, stages: dict[str, dict], notes: list[str] | None = None) -> dict:
    """Write ``<out_dir>/report.json``, the plots in ``<out_dir>/plots/`` and
    ``<out_dir>/report.html``.

    Args:
        out_dir: the job's output directory.
        stages: per stage ``{rows_in, rows_out, rows_rejected, rejected_by_reason, seconds,
            rows_per_s, metrics}`` (the select stage also ``rows_not_selected``,
            ``not_selected_by_reason``) as the pipeline records them (copied into the report as is);
            stages that earlier jobs finished there are added (:func:`merge_earlier_stages`).
        notes: free-text remarks for the reader (e.g. which models stood in for which); those
            of the existing report are kept.

    Returns:
        The report: ``{"stages", "statistics", "selected_ids", "plots", "notes"}``; plot paths
        are relative to ``out_dir``.
    """
    stages = merge_earlier_stages(out_dir, stages)
    old_notes = (read_json(os.path.join(out_dir, REPORT_FILE)) or {}).get("notes") or []
    notes = list(dict.fromkeys([*old_notes, *(notes or [])]))
    plots_dir = os.path.join(out_dir, PLOTS_DIR)
    built = assemble(out_dir, stages, plots_dir)
    _remove_stale_plots(plots_dir, {os.path.basename(p) for p in built.plots}, built.descriptors)
    report = jsonable(
        {
            "stages": stages,
            "statistics": built.statistics,
            "selected_ids": built.selected_ids,
            "plots": built.plots,
            "notes": list(notes or []),
        }
    )
    _write_atomic(out_dir, REPORT_FILE, json.dumps(report, indent=2, allow_nan=False))
    from deita_ray.report.html import HTML_FILE, render_html

    _write_atomic(out_dir, HTML_FILE, render_html(out_dir, report, built))
    return report


def rebuild(out_dir: str) -> dict:
    """Rebuild report.json, the plots and report.html of ``out_dir`` from its existing
    ``report.json`` (stages and notes), else from ``manifest.json``'s finished stages, plus
    the outputs on disk."""
    old = read_json(os.path.join(out_dir, REPORT_FILE))
    if old is not None:
        return write_report(out_dir, old.get("stages") or {}, old.get("notes"))
    manifest = read_json(os.path.join(out_dir, MANIFEST_FILE)) or {}
    stages = {
        name: entry["result"]
        for name, entry in (manifest.get("stages") or {}).items()
        if isinstance(entry, dict) and "result" in entry
    }
    return write_report(out_dir, stages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deita_ray.report",
        description="Rebuild report.json, the PNG plots and report.html of a job's output "
        "directory.",
    )
    parser.add_argument("out_dir", help="the job's output directory (output.dir)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.out_dir):
        print(f"error: {args.out_dir} is not a directory", file=sys.stderr)
        return 2
    report = rebuild(args.out_dir)
    print(
        json.dumps(
            {
                "report": os.path.join(args.out_dir, REPORT_FILE),
                "html": os.path.join(args.out_dir, "report.html"),
                "plots": report["plots"],
            }
        )
    )
    return 0

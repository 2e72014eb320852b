"""The job report: ``<out>/report.json`` and PNG plots in ``<out>/plots/``.

:func:`write_report` is called by the pipeline at the end of a job with the per-stage results;
``python -m deita_ray.report <out dir>`` rebuilds the statistics and plots later from the
``stages`` section of an existing ``report.json`` (or of ``manifest.json``) plus the Parquet
outputs. Each part is produced only when its inputs exist, so a job that ran only ``ingest``
gets a report without statistics plots instead of a crash.

Inputs read (only the columns named; the pool's text and its embeddings are never loaded):

- ``<out>/score``: ``id``, ``complexity_scores``, ``quality_scores`` (list<double>, one value per
  (instruction, response) turn), ``evol_score``.
- ``<out>/select``: ``id``, ``rank``, ``evol_score``, ``max_sim`` (cosine to the rows selected
  before it).
- ``<out>/embed``: ``id``, ``embedding`` of the *selected* rows only (an id filter while
  scanning), for the nearest selected-neighbour cosine of every selected row.

Complexity and quality statistics are per turn (a multi-turn row contributes one value per
turn, and one point per turn to the scatter); evol statistics are per row.

Example:
    >>> report = write_report("outputs/run", {"ingest": {"rows_in": 10, "rows_out": 10}})
    >>> sorted(report)
    ['notes', 'plots', 'selected_ids', 'stages', 'statistics']
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from deita_ray.data.sink import parquet_files

REPORT_FILE = "report.json"
MANIFEST_FILE = "manifest.json"
PLOTS_DIR = "plots"
PLOT_NAMES = (
    "score_distributions.png",
    "complexity_vs_quality.png",
    "rank_vs_evol.png",
    "nearest_neighbour_similarity.png",
    "training_loss.png",
)
"""Every plot this module may write (a rebuild removes the ones whose inputs are gone)."""

SCATTER_MAX_POINTS = 50_000
"""The pool's scatter is a fixed-seed sample of this many points (statistics use every row)."""

SIM_BLOCK_ROWS = 1024
"""Rows of the selection multiplied at once for the nearest-neighbour cosines (bounds memory)."""

POOL_COLOR, SELECTION_COLOR = "#9e9e9e", "#d62728"


# ---------------------------------------------------------------------------------------------
# Reading the stage outputs


def _dataset(out_dir: str, stage: str, needed: Sequence[str]) -> pds.Dataset | None:
    """The stage's Parquet as a dataset, or None when absent or lacking a needed column."""
    files = parquet_files(os.path.join(out_dir, stage))
    if not files:
        return None
    dataset = pds.dataset(files, format="parquet")
    if any(name not in dataset.schema.names for name in needed):
        return None
    return dataset


def _to_numpy(array: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Float64 numpy values, nulls as NaN."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks else pa.array([], pa.float64())
    return pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)


@dataclass
class ScoreData:
    """Per-turn complexity/quality pairs and per-row evol scores of a set of rows."""

    complexity: np.ndarray
    quality: np.ndarray
    evol: np.ndarray

    @property
    def empty(self) -> bool:
        return not (self.complexity.size or self.quality.size or self.evol.size)


def _score_data(table: pa.Table) -> ScoreData:
    """Flatten the per-turn score lists of ``table``; rows whose two lists differ in length
    contribute no pairs (they cannot be matched turn by turn)."""
    comp, qual = table["complexity_scores"], table["quality_scores"]
    same = pc.fill_null(pc.equal(pc.list_value_length(comp), pc.list_value_length(qual)), False)
    comp = _to_numpy(pc.list_flatten(pc.filter(comp, same)))
    qual = _to_numpy(pc.list_flatten(pc.filter(qual, same)))
    return ScoreData(complexity=comp, quality=qual, evol=_to_numpy(table["evol_score"]))


def read_scores(out_dir: str) -> pa.Table | None:
    """``id``, both score lists and ``evol_score`` of the scored pool, or None."""
    columns = ["id", "complexity_scores", "quality_scores", "evol_score"]
    dataset = _dataset(out_dir, "score", columns)
    return None if dataset is None else dataset.to_table(columns=columns)


def read_selection(out_dir: str) -> pa.Table | None:
    """``id``, ``rank``, ``evol_score`` and ``max_sim`` of the selection in rank order, or None."""
    dataset = _dataset(out_dir, "select", ["id", "rank"])
    if dataset is None:
        return None
    columns = [c for c in ("id", "rank", "evol_score", "max_sim") if c in dataset.schema.names]
    table = dataset.to_table(columns=columns)
    return table.sort_by([("rank", "ascending")])


def read_selected_embeddings(out_dir: str, ids: Sequence[str]) -> np.ndarray | None:
    """Float32 embeddings of ``ids`` (rows in the order of ``ids``), scanning ``<out>/embed``
    batch by batch with an id filter so only the selected rows' vectors are kept.

    Returns None when the embed output is absent or lacks any of the ids.
    """
    dataset = _dataset(out_dir, "embed", ["id", "embedding"])
    if dataset is None or not ids:
        return None
    wanted = pa.array(list(ids), dataset.schema.field("id").type)
    scanner = dataset.scanner(
        columns=["id", "embedding"], filter=pds.field("id").isin(wanted), batch_size=4096
    )
    found: dict[str, np.ndarray] = {}
    for batch in scanner.to_batches():
        if batch.num_rows == 0:
            continue
        batch = batch.filter(pc.is_valid(batch["embedding"]))
        emb = batch["embedding"]
        dim = emb.type.list_size
        vectors = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        vectors = vectors.reshape(-1, dim)
        for i, row_id in enumerate(batch["id"].to_pylist()):
            found.setdefault(row_id, vectors[i])
    if any(i not in found for i in ids):
        return None
    return np.stack([found[i] for i in ids])


# ---------------------------------------------------------------------------------------------
# Statistics (pure)


def summarize(values: np.ndarray) -> dict | None:
    """count/mean/median/p10/p90/min/max of the finite values, or None when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {
        "count": int(values.size),
        "mean": float(values.mean()),
        "median": float(median),
        "p10": float(p10),
        "p90": float(p90),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def nearest_neighbour_cosines(vectors: np.ndarray, block_rows: int = SIM_BLOCK_ROWS) -> np.ndarray:
    """Per row, its largest cosine to any other row (float32, L2-normalised; zero vectors have
    cosine 0 to everything). Computed in row blocks so memory stays ``block_rows x n``.

    Returns:
        float32 array of length n (empty when n < 2).
    """
    x = np.asarray(vectors, dtype=np.float32)
    n = x.shape[0]
    if n < 2:
        return np.empty(0, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    out = np.empty(n, np.float32)
    for start in range(0, n, block_rows):
        sims = x[start : start + block_rows] @ x.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # not its own neighbour
        out[start : start + sims.shape[0]] = sims.max(axis=1)
    return out


def _score_stats(data: ScoreData, rows: int) -> dict:
    return {
        "rows": rows,
        "complexity": summarize(data.complexity),
        "quality": summarize(data.quality),
        "evol": summarize(data.evol),
        "missing_evol": int(np.count_nonzero(~np.isfinite(data.evol))),
    }


def _tau(out_dir: str, stages: dict) -> float | None:
    """The selection threshold: from the select stage's metrics (None there means a method
    without one), else from the manifest's config when its method is ``deita``."""
    metrics = (stages.get("select") or {}).get("metrics") or {}
    if "tau" in metrics:
        tau = metrics["tau"]
    else:
        manifest = _read_json(os.path.join(out_dir, MANIFEST_FILE)) or {}
        select_cfg = (manifest.get("config") or {}).get("select") or {}
        tau = select_cfg.get("tau") if select_cfg.get("method", "deita") == "deita" else None
    return float(tau) if isinstance(tau, int | float) and not isinstance(tau, bool) else None


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg canvas, imported lazily)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, plots_dir: str, name: str) -> str:
    os.makedirs(plots_dir, exist_ok=True)
    path = os.path.join(plots_dir, name)
    tmp = os.path.join(plots_dir, f".tmp-{os.getpid()}-{name}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return name


def plot_score_distributions(pool: ScoreData, sel: ScoreData | None, plots_dir: str) -> str:
    """Histograms (density) of complexity, quality and evol score: pool vs selection."""
    fig = _figure(13, 4)
    axes = fig.subplots(1, 3)
    panels = [
        ("complexity", "Complexity score (per turn)"),
        ("quality", "Quality score (per turn)"),
        ("evol", "Evol score (per row)"),
    ]
    for ax, (key, label) in zip(axes, panels, strict=True):
        p = getattr(pool, key)
        p = p[np.isfinite(p)]
        s = getattr(sel, key)[np.isfinite(getattr(sel, key))] if sel is not None else np.empty(0)
        both = np.concatenate([p, s])
        if both.size == 0:
            ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
        else:
            lo, hi = float(both.min()), float(both.max())
            bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
            for values, color, name in ((p, POOL_COLOR, "pool"), (s, SELECTION_COLOR, "selection")):
                if values.size:
                    ax.hist(
                        values,
                        bins=bins,
                        density=True,
                        alpha=0.6,
                        color=color,
                        label=f"{name} (n={values.size:,})",
                    )
            ax.legend(fontsize=8)
        ax.set_title(label)
        ax.set_xlabel("score")
        ax.set_ylabel("density")
    fig.suptitle("Score distributions: pool vs selection")
    return _save(fig, plots_dir, "score_distributions.png")


def plot_complexity_vs_quality(pool: ScoreData, sel: ScoreData | None, plots_dir: str) -> str:
    """Scatter of (complexity, quality) per turn: pool in grey, selection highlighted."""
    fig = _figure(6.5, 5.5)
    ax = fig.subplots()
    ok = np.isfinite(pool.complexity) & np.isfinite(pool.quality)
    pc_, pq_ = pool.complexity[ok], pool.quality[ok]
    label = f"pool (n={pc_.size:,})"
    if pc_.size > SCATTER_MAX_POINTS:
        keep = np.random.default_rng(0).choice(pc_.size, SCATTER_MAX_POINTS, replace=False)
        pc_, pq_ = pc_[keep], pq_[keep]
        label = f"pool (sample of {SCATTER_MAX_POINTS:,} of {ok.sum():,})"
    ax.scatter(pc_, pq_, s=6, alpha=0.35, color=POOL_COLOR, label=label, linewidths=0)
    if sel is not None:
        ok = np.isfinite(sel.complexity) & np.isfinite(sel.quality)
        ax.scatter(
            sel.complexity[ok],
            sel.quality[ok],
            s=10,
            alpha=0.8,
            color=SELECTION_COLOR,
            label=f"selection (n={ok.sum():,})",
            linewidths=0,
        )
    ax.set_xlabel("complexity score")
    ax.set_ylabel("quality score")
    ax.set_title("Complexity vs quality (one point per turn)")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, plots_dir, "complexity_vs_quality.png")


def plot_rank_vs_evol(rank: np.ndarray, evol: np.ndarray, plots_dir: str) -> str:
    """Evol score of each selected row against its selection rank."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(7, 4.5)
    ax = fig.subplots()
    ax.plot(rank, evol, ".", markersize=3, color=SELECTION_COLOR)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("selection rank (0 = taken first)")
    ax.set_ylabel("evol score")
    ax.set_title(f"Selection rank vs evol score (n={rank.size:,})")
    ax.grid(alpha=0.3)
    return _save(fig, plots_dir, "rank_vs_evol.png")


def plot_similarity(
    nn: np.ndarray, max_sim: np.ndarray | None, tau: float | None, plots_dir: str
) -> str:
    """Histogram of the nearest selected-neighbour cosine (and of ``max_sim``), tau marked."""
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    values = [nn] + ([max_sim] if max_sim is not None and max_sim.size else [])
    both = np.concatenate(values)
    lo = float(min(both.min(), tau if tau is not None else both.min()))
    hi = float(max(both.max(), tau if tau is not None else both.max()))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 41)
    ax.hist(
        nn,
        bins=bins,
        alpha=0.7,
        color=SELECTION_COLOR,
        label="nearest selected neighbour (any rank)",
    )
    if len(values) > 1:
        ax.hist(
            max_sim,
            bins=bins,
            alpha=0.5,
            color="#1f77b4",
            label="max_sim (to rows selected before it)",
        )
    if tau is not None:
        ax.axvline(tau, color="black", linestyle="--", label=f"tau = {tau:g}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("selected rows")
    ax.set_title(f"Nearest selected-neighbour similarity (n={nn.size:,})")
    ax.legend(fontsize=8)
    return _save(fig, plots_dir, "nearest_neighbour_similarity.png")


def plot_losses(losses: dict[str, list[float]], plots_dir: str) -> str:
    """Training loss per step, one panel per training stage."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(6 * len(losses), 4)
    axes = np.atleast_1d(fig.subplots(1, len(losses)))
    for ax, (stage, loss) in zip(axes, losses.items(), strict=True):
        ax.plot(np.arange(1, len(loss) + 1), loss, marker="." if len(loss) < 50 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{stage.upper()} training loss")
        ax.grid(alpha=0.3)
    return _save(fig, plots_dir, "training_loss.png")


# ---------------------------------------------------------------------------------------------
# The report


def _losses(stages: dict) -> dict[str, list[float]]:
    from deita_ray.stages import registry

    out = {}
    for stage in (desc.name for desc in registry() if desc.trains):
        loss = (stages.get(stage) or {}).get("metrics", {}).get("loss")
        if isinstance(loss, list):
            values = [float(v) for v in loss if isinstance(v, int | float) and math.isfinite(v)]
            if values:
                out[stage] = values
    return out


def build_statistics(out_dir: str, stages: dict, plots_dir: str | None = None) -> dict:
    """Compute the statistics (and, when ``plots_dir`` is given, write the plots).

    Returns:
        ``{"statistics": ..., "selected_ids": [...], "plots": [relative paths]}``.
    """
    plots: list[str] = []

    def plot(fn, *args) -> None:
        if plots_dir is not None:
            plots.append(f"{PLOTS_DIR}/{fn(*args, plots_dir)}")

    stats: dict[str, Any] = {}
    scores = read_scores(out_dir)
    selection = read_selection(out_dir)
    selected_ids = selection["id"].to_pylist() if selection is not None else []

    pool = sel = None
    if scores is not None:
        pool = _score_data(scores)
        if selection is not None:
            in_sel = pc.is_in(
                scores["id"], value_set=selection["id"].combine_chunks().cast(scores["id"].type)
            )
            sel = _score_data(scores.filter(in_sel))
        stats["scores"] = {"pool": _score_stats(pool, scores.num_rows)}
    if selection is not None and sel is None and "evol_score" in selection.column_names:
        # No score output (e.g. cleaned up): the selection's own evol column still tells a story.
        empty = np.empty(0)
        sel = ScoreData(empty, empty, _to_numpy(selection["evol_score"]))
    if sel is not None:
        stats.setdefault("scores", {})["selection"] = _score_stats(sel, selection.num_rows)
    if pool is not None and not pool.empty:
        plot(plot_score_distributions, pool, sel)
        if pool.complexity.size:
            plot(plot_complexity_vs_quality, pool, sel)
    if selection is not None and "evol_score" in selection.column_names and selection.num_rows:
        evol = _to_numpy(selection["evol_score"])
        if np.isfinite(evol).any():
            plot(plot_rank_vs_evol, _to_numpy(selection["rank"]), evol)

    if selection is not None:
        tau = _tau(out_dir, stages)
        max_sim = _to_numpy(selection["max_sim"]) if "max_sim" in selection.column_names else None
        similarity: dict[str, Any] = {
            "tau": tau,
            "selected": selection.num_rows,
            "max_sim": summarize(max_sim) if max_sim is not None else None,
        }
        vectors = read_selected_embeddings(out_dir, selected_ids)
        if vectors is not None and len(selected_ids) >= 2:
            nn = nearest_neighbour_cosines(vectors)
            similarity["nearest_neighbour"] = summarize(nn)
            if tau is not None:
                similarity["nearest_neighbour_above_tau"] = int(np.count_nonzero(nn > tau))
            finite = max_sim[np.isfinite(max_sim)] if max_sim is not None else None
            plot(plot_similarity, nn, finite, tau)
        else:
            similarity["nearest_neighbour"] = None
        stats["similarity"] = similarity

    losses = _losses(stages)
    if losses:
        plot(plot_losses, losses)
    return {"statistics": stats, "selected_ids": selected_ids, "plots": plots}


def _jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays converted, NaN/inf as null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def merge_earlier_stages(out_dir: str, stages: dict[str, dict]) -> dict[str, dict]:
    """``stages`` plus every stage an earlier job finished in ``out_dir`` (``manifest.json``),
    marked ``earlier_run``, in pipeline order: a job that runs only some stages into the
    output directory of another (DPO after SFT) still reports all of them."""
    from deita_ray.config import STAGES

    manifest = _read_json(os.path.join(out_dir, MANIFEST_FILE)) or {}
    merged = {
        name: dict(entry["result"], earlier_run=True)
        for name, entry in (manifest.get("stages") or {}).items()
        if isinstance(entry, dict) and entry.get("status") == "done" and "result" in entry
    }
    merged.update(stages)
    rank = {name: i for i, name in enumerate(STAGES)}
    return dict(sorted(merged.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def write_report(out_dir: str, stages: dict[str, dict], notes: list[str] | None = None) -> dict:
    """Write ``<out_dir>/report.json`` and the plots in ``<out_dir>/plots/``.

    Args:
        out_dir: the job's output directory.
        stages: per stage ``{rows_in, rows_out, rows_rejected, rejected_by_reason, seconds,
            rows_per_s, metrics}`` as the pipeline records them (copied into the report as is);
            stages that earlier jobs finished there are added (:func:`merge_earlier_stages`).
        notes: free-text remarks for the reader (e.g. which models stood in for which); those
            of the existing report are kept.

    Returns:
        The report: ``{"stages", "statistics", "selected_ids", "plots", "notes"}``; plot paths
        are relative to ``out_dir``.
    """
    stages = merge_earlier_stages(out_dir, stages)
    old_notes = (_read_json(os.path.join(out_dir, REPORT_FILE)) or {}).get("notes") or []
    notes = list(dict.fromkeys([*old_notes, *(notes or [])]))
    plots_dir = os.path.join(out_dir, PLOTS_DIR)
    built = build_statistics(out_dir, stages, plots_dir)
    # A rebuild must not leave plots whose inputs are gone.
    produced = {os.path.basename(p) for p in built["plots"]}
    for name in PLOT_NAMES:
        if name not in produced and os.path.exists(os.path.join(plots_dir, name)):
            os.remove(os.path.join(plots_dir, name))
    report = _jsonable(
        {
            "stages": stages,
            "statistics": built["statistics"],
            "selected_ids": built["selected_ids"],
            "plots": built["plots"],
            "notes": list(notes or []),
        }
    )
    path = os.path.join(out_dir, REPORT_FILE)
    tmp = os.path.join(out_dir, f".tmp-{os.getpid()}-{REPORT_FILE}")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, allow_nan=False)
    os.replace(tmp, path)
    return report


def rebuild(out_dir: str) -> dict:
    """Rebuild report.json and the plots of ``out_dir`` from its existing ``report.json``
    (stages and notes), else from ``manifest.json``'s finished stages, plus the Parquet outputs."""
    old = _read_json(os.path.join(out_dir, REPORT_FILE))
    if old is not None:
        return write_report(out_dir, old.get("stages") or {}, old.get("notes"))
    manifest = _read_json(os.path.join(out_dir, MANIFEST_FILE)) or {}
    stages = {
        name: entry["result"]
        for name, entry in (manifest.get("stages") or {}).items()
        if isinstance(entry, dict) and "result" in entry
    }
    return write_report(out_dir, stages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deita_ray.report",
        description="Rebuild report.json statistics and the PNG plots of a job's output directory.",
    )
    parser.add_argument("out_dir", help="the job's output directory (output.dir)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.out_dir):
        print(f"error: {args.out_dir} is not a directory", file=sys.stderr)
        return 2
    report = rebuild(args.out_dir)
    print(json.dumps({"report": os.path.join(args.out_dir, REPORT_FILE), "plots": report["plots"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

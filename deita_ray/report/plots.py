"""The report's plots: a matplotlib figure on an Agg canvas, its atomic PNG write, the colours
every plot uses, and the training-loss plot of the stages that train. The sections
(:mod:`deita_ray.report.sections`) draw their own plots with these.

matplotlib is imported inside the functions (the report module imports stay light).
"""

from __future__ import annotations

import os

import numpy as np

LOSS_PLOT = "training_loss.png"
POOL_COLOR, SELECTION_COLOR, ACCENT_COLOR = "#9e9e9e", "#d62728", "#1f77b4"


def figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas (no pyplot state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, plots_dir: str, name: str) -> str:
    """Write ``fig`` as ``plots_dir/name`` atomically; returns ``name``."""
    os.makedirs(plots_dir, exist_ok=True)
    path = os.path.join(plots_dir, name)
    tmp = os.path.join(plots_dir, f".tmp-{os.getpid()}-{name}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return name


def plot_losses(losses: dict[str, list[float]], plots_dir: str) -> str:
    """Training loss per step, one panel per training stage."""
    from matplotlib.ticker import MaxNLocator

    fig = figure(6 * len(losses), 4)
    axes = np.atleast_1d(fig.subplots(1, len(losses)))
    for ax, (stage, loss) in zip(axes, losses.items(), strict=True):
        ax.plot(np.arange(1, len(loss) + 1), loss, marker="." if len(loss) < 50 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(f"{stage.upper()} training loss")
        ax.grid(alpha=0.3)
    return save_png(fig, plots_dir, LOSS_PLOT)

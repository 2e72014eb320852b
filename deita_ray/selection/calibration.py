"""What tau does to a pool, before anyone trains on it (docs/selection.md, "Choosing tau").

Two pure functions over the pool's arrays (no Ray, no files):

* :func:`tau_curve`: for each tau of a list, how many rows the exact greedy would select before
  the budget is reached and how many candidates it would scan to get there. One run of the
  blocked method per tau (a few seconds at 100K rows); the normalised candidate blocks are
  computed once and shared by the runs.
* :func:`nearest_neighbor_cosines`: the cosine of each row (of a fixed-seed sample of rows, or
  of every row) to its nearest other row of the pool, i.e. where the embedding model puts
  near-duplicates. Exact against the whole pool (canonical cosines, see greedy.py); only the
  query rows are sampled.

:func:`tau_grid` gives the default list of taus around a configured one; :func:`summarize`
and :func:`histogram` describe a distribution of values (these cosines in the select stage's
metrics, and every score in the report).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from deita_ray.selection.greedy import (
    NORMALIZE_CHUNK,
    GreedySelector,
    candidate_order,
    canonical_best,
    merge_best,
    near_width,
    normalize_rows,
    resolve_device,
    valid_rows,
)

GRID_FACTORS = (4.0, 2.5, 2.0, 1.5, 1.25, 1.0, 0.8, 2 / 3, 0.5, 0.25)
"""Multiples of the configured distance ``1 - tau`` in the default grid (scale-free: a tau of
0.99 gets a grid as fine as its distance to 1, a tau of 0.9 a coarser one)."""


def tau_grid(tau: float, factors: tuple[float, ...] = GRID_FACTORS) -> list[float]:
    """Taus around ``tau``: ``1 - f * (1 - tau)`` for each factor, clipped to [-1, 1], sorted.

    Example:
        >>> tau_grid(0.9)
        [0.6, 0.75, 0.8, 0.85, 0.875, 0.9, 0.92, 0.933333, 0.95, 0.975]
    """
    dist = 1.0 - float(tau)
    taus = {round(min(1.0, max(-1.0, 1.0 - f * dist)), 6) for f in factors}
    return sorted(taus)


def tau_curve(
    scores: np.ndarray,
    embeddings: np.ndarray,
    taus: list[float] | np.ndarray,
    budget: int,
    seq: np.ndarray | None = None,
    block_size: int = 1024,
    device: str = "auto",
    cache_bytes: int = 1 << 30,
) -> dict[str, Any]:
    """For each tau, what the exact greedy (:func:`~deita_ray.selection.greedy.select_diverse`)
    would do with this pool and budget.

    Args:
        scores: ``[n]`` evol scores (NaN: not a candidate).
        embeddings: ``[n, d]`` embeddings (rows with NaN/inf are not candidates).
        taus: thresholds to try.
        budget: rows to select.
        seq: input order for score ties (default: position).
        block_size: candidates per matrix product.
        device: as for ``select_diverse``.
        cache_bytes: most memory spent on normalised candidate blocks shared by the runs
            (blocks beyond it are normalised again in each run).

    Returns:
        ``tau``, ``selected`` (rows selected before the budget is reached, or all the pool
        gives), ``scanned`` (candidates examined to get there), ``budget_filled`` and
        ``seconds``, one entry per tau in the given order; plus ``budget``, ``candidates``
        and ``pool``.
    """
    emb = np.asarray(embeddings)
    n, dim = emb.shape
    scores = np.asarray(scores, np.float64).reshape(-1)
    seq = np.arange(n, dtype=np.int64) if seq is None else np.asarray(seq, np.int64)
    finite, _ = valid_rows(emb)
    order = candidate_order(scores, seq, ~np.isnan(scores) & finite)
    capacity = max(0, min(int(budget), len(order)))
    dev = resolve_device(device)
    cache: list[np.ndarray] = []
    cached = 0
    out: dict[str, Any] = {
        "tau": [],
        "selected": [],
        "scanned": [],
        "budget_filled": [],
        "seconds": [],
        "budget": int(budget),
        "candidates": int(len(order)),
        "pool": int(n),
    }
    for tau in taus:
        t0 = time.perf_counter()
        selector = GreedySelector(max(dim, 1), float(tau), capacity, dev)
        scanned = 0
        for b, start in enumerate(range(0, len(order), block_size)):
            if selector.full:
                break
            if b < len(cache):
                x = cache[b]
            else:
                x = normalize_rows(emb[order[start : start + block_size]])
                if b == len(cache) and cached + x.nbytes <= cache_bytes:
                    cache.append(x)
                    cached += x.nbytes
            res = selector.offer(x)
            scanned = start + res.examined
        if not selector.full:
            scanned = len(order)
        out["tau"].append(float(tau))
        out["selected"].append(int(selector.k))
        out["scanned"].append(int(scanned))
        out["budget_filled"].append(bool(selector.full and capacity == int(budget)))
        out["seconds"].append(round(time.perf_counter() - t0, 4))
    return out


def nearest_neighbor_cosines(
    embeddings: np.ndarray,
    sample: int | None = 2000,
    seed: int = 0,
    mask: np.ndarray | None = None,
    chunk: int = NORMALIZE_CHUNK,
) -> dict[str, Any]:
    """Cosine of rows to their nearest other row of the pool (canonical cosines, exact).

    Args:
        embeddings: ``[n, d]`` embeddings; rows with NaN/inf take no part.
        sample: query this many rows, drawn without replacement with ``seed`` (None: every
            row, O(n^2 d)); each is compared with every other valid row of the pool.
        seed: seed of the sample.
        mask: optional boolean ``[n]``: only these rows take part (e.g. the candidates).
        chunk: pool rows per matrix product.

    Returns:
        ``rows`` (positions of the query rows, sorted), ``cosine`` (float64, to the nearest
        other row; NaN when the pool has a single row), ``neighbor`` (its position; ties: the
        lowest), ``sampled`` (False when every row was queried), ``seed``, ``pool`` (rows
        taking part) and ``method`` (what was computed, in words).
    """
    emb = np.asarray(embeddings)
    n = emb.shape[0]
    finite, _ = valid_rows(emb) if n else (np.ones(0, bool), None)
    ok = finite if mask is None else finite & np.asarray(mask, bool)
    pool = np.flatnonzero(ok)
    if sample is None or sample >= len(pool):
        rows, sampled = pool, False
    else:
        rng = np.random.default_rng(seed)
        rows, sampled = np.sort(rng.choice(pool, size=int(sample), replace=False)), True
    q = normalize_rows(emb[rows])
    width = near_width(emb.shape[1] if emb.ndim == 2 else 1)
    best = np.full(len(rows), -np.inf)
    neighbor = np.full(len(rows), -1, np.int64)
    for start in range(0, len(pool), chunk):
        cols = pool[start : start + chunk]
        u = normalize_rows(emb[cols])
        sims = q @ u.T
        sims[rows[:, None] == cols[None, :]] = -np.inf  # not itself
        b, c = canonical_best(q, sims, u, width)
        merge_best(best, neighbor, b, np.where(c >= 0, cols[np.maximum(c, 0)], -1))
    cosine = np.where(neighbor >= 0, best, np.nan)
    how = (
        f"{len(rows)} rows drawn with seed {seed}" if sampled else f"every one of {len(rows)} rows"
    )
    return {
        "rows": rows,
        "cosine": cosine,
        "neighbor": neighbor,
        "sampled": sampled,
        "seed": seed,
        "pool": int(len(pool)),
        "method": f"{how}, each against all {len(pool)} rows of the pool (exact cosines)",
    }


# ---------------------------------------------------------------------------------------------
# Distribution summaries


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


def histogram(values: np.ndarray, bins: int = 50) -> dict | None:
    """``{"edges", "counts"}`` of the finite values (None when there are none)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = float(values.min()), float(values.max())
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi if hi > lo else lo + 1e-6))
    return {"edges": edges.tolist(), "counts": counts.tolist()}

"""Tau calibration: the curve equals one exact selection per tau; nearest-neighbour cosines
equal a brute-force computation."""

from __future__ import annotations

import numpy as np
import pytest
from test_greedy import planted_pool

from deita_ray.selection.calibration import nearest_neighbor_cosines, tau_curve, tau_grid
from deita_ray.selection.greedy import canonical_cosines, normalize_rows, select_diverse


def test_tau_grid_brackets_the_tau():
    for tau in (0.5, 0.9, 0.99):
        grid = tau_grid(tau)
        assert tau in grid and grid == sorted(grid) and all(-1 <= t <= 1 for t in grid)
        assert min(grid) < tau < max(grid)
    assert tau_grid(0.9) == [0.6, 0.75, 0.8, 0.85, 0.875, 0.9, 0.92, 0.933333, 0.95, 0.975]


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30])
def test_tau_curve_equals_one_selection_per_tau(cache_bytes):
    rng = np.random.default_rng(2)
    emb, scores, seq = planted_pool(rng, 700, 16, 120, spread=(0.05, 0.6))
    scores[:7] = np.nan
    emb[7] = np.nan
    taus = [0.3, 0.8, 0.9, 0.95, 0.99, 1.0]
    for budget in (50, 300, 10_000):
        curve = tau_curve(
            scores,
            emb,
            taus,
            budget,
            seq=seq,
            block_size=64,
            device="numpy",
            cache_bytes=cache_bytes,
        )
        assert curve["tau"] == taus and curve["candidates"] == 692 and curve["pool"] == 700
        for i, tau in enumerate(taus):
            r = select_diverse(emb, scores, tau, budget, seq=seq, block_size=97, device="numpy")
            assert curve["selected"][i] == len(r), (tau, budget)
            assert curve["scanned"][i] == r.stats["scanned"], (tau, budget)
            assert curve["budget_filled"][i] == (len(r) == budget)
    # Looser thresholds keep more rows and scan fewer to fill the same budget.
    curve = tau_curve(scores, emb, taus, 300, seq=seq, device="numpy")
    assert curve["scanned"] == sorted(curve["scanned"], reverse=True)


def _brute_nn(emb: np.ndarray, rows: np.ndarray, pool: np.ndarray):
    u = normalize_rows(emb)
    cos, nb = [], []
    for r in rows:
        others = pool[pool != r]
        c = canonical_cosines(np.repeat(u[r : r + 1], len(others), 0), u[others])
        cos.append(c.max())
        nb.append(int(others[np.argmax(c)]))
    return np.array(cos), np.array(nb)


def test_nearest_neighbor_cosines_exact_and_sampled():
    rng = np.random.default_rng(5)
    emb, _, _ = planted_pool(rng, 300, 8, 40)
    emb[10] = emb[20]  # an exact duplicate: cosine 1, neighbour the other copy
    emb[30] = np.inf  # takes no part
    everything = nearest_neighbor_cosines(emb, sample=None, chunk=64)
    pool = np.flatnonzero(np.arange(300) != 30)
    assert not everything["sampled"] and everything["pool"] == 299
    assert everything["rows"].tolist() == pool.tolist()
    cos, nb = _brute_nn(emb, pool, pool)
    np.testing.assert_array_equal(everything["cosine"], cos)
    np.testing.assert_array_equal(everything["neighbor"], nb)
    i10 = int(np.flatnonzero(pool == 10)[0])
    assert everything["cosine"][i10] > 1 - 1e-6 and everything["neighbor"][i10] == 20
    # A fixed-seed sample of query rows, still against the whole pool; same seed, same rows.
    a = nearest_neighbor_cosines(emb, sample=50, seed=3, chunk=100)
    b = nearest_neighbor_cosines(emb, sample=50, seed=3)
    assert a["sampled"] and len(a["rows"]) == 50 and a["rows"].tolist() == b["rows"].tolist()
    assert 30 not in a["rows"] and "50 rows drawn with seed 3" in a["method"]
    cos, nb = _brute_nn(emb, a["rows"], pool)
    np.testing.assert_array_equal(a["cosine"], cos)
    np.testing.assert_array_equal(a["neighbor"], nb)
    # A mask restricts both sides.
    mask = np.arange(300) < 100
    m = nearest_neighbor_cosines(emb, sample=None, mask=mask)
    inside = np.flatnonzero(mask & (np.arange(300) != 30))
    cos, _ = _brute_nn(emb, inside, inside)
    assert m["rows"].tolist() == inside.tolist()
    np.testing.assert_array_equal(m["cosine"], cos)
    single = nearest_neighbor_cosines(emb[:1], sample=None)
    assert np.isnan(single["cosine"]).all() and single["neighbor"].tolist() == [-1]

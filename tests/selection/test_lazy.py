"""Lazy selection (deita_ray/selection/lazy.py): the exact greedy fed chunk by chunk in score
order equals the brute-force oracle and the full blocked greedy, whatever the chunk sizes, with
embedder rejects dropped as the full method never sees them; and it reads no further than it
must.

Pools: planted random pools (every chunk size against the oracle), the demo pool and real rows
embedded by the embedded MiniLM through the embed stage's code, and a 100K synthetic pool.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_greedy import oracle_explained, planted_pool

from deita_ray.selection.greedy import (
    INVALID_EMBEDDING,
    NOT_REACHED,
    IncrementalGreedy,
    candidate_order,
    select_diverse,
)
from deita_ray.selection.lazy import ChunkSizer, LazySelection


def run_lazy(
    emb: np.ndarray,
    scores: np.ndarray,
    seq: np.ndarray,
    tau: float,
    budget: int,
    sizes: ChunkSizer | list[int],
    rejected: np.ndarray | None = None,
    block_size: int = 1024,
) -> tuple[LazySelection, int]:
    """Drive a LazySelection as the select stage does (sizes: a sizer, or a list cycled), the
    "embedder" handing back rows of ``emb``; returns it and the rows embedded."""
    lazy = LazySelection(scores, seq, tau, budget, block_size=block_size, device="numpy")
    embedded, k = 0, 0
    while not lazy.done:
        if isinstance(sizes, ChunkSizer):
            size = sizes.next_size(lazy.budget, lazy.selected, lazy.examined, lazy.planned)
        else:
            size = sizes[k % len(sizes)]
        k += 1
        rows = lazy.next_rows(size)
        embedded += len(rows)
        lazy.feed(rows, emb[rows], None if rejected is None else rejected[rows])
    return lazy, embedded


def assert_equal_to_full(lazy: LazySelection, emb, scores, seq, tau, budget, rejected=None):
    """Picks, their order, every kept row's status / rejected_by / rejected_sim equal the full
    method's on the pool without the embedder's rejects; rows it never examined are
    not_reached (or missing_score / invalid_embedding, known without the greedy)."""
    keep = np.ones(len(scores), bool) if rejected is None else ~rejected
    kept = np.flatnonzero(keep)
    full = select_diverse(emb[kept], scores[kept], tau, budget, seq=seq[kept], device="numpy")
    got = lazy.result()
    assert kept[full.indices].tolist() == got.indices.tolist()
    np.testing.assert_allclose(got.max_sim, full.max_sim, atol=1e-5, equal_nan=True)
    np.testing.assert_array_equal(got.rejected_by[kept], full.rejected_by)
    np.testing.assert_array_equal(got.rejected_sim[kept], full.rejected_sim)
    # A row the lazy run never embedded: not_reached there; the full run knows more about it
    # only when its embedding was bad.
    status = got.row_status[kept]
    unseen = (status == NOT_REACHED) & (full.row_status == INVALID_EMBEDDING)
    np.testing.assert_array_equal(status[~unseen], full.row_status[~unseen])
    for key in ("selected", "scanned", "rejected_for_similarity", "missing_score"):
        assert got.stats[key] == full.stats[key], key
    # The pool: every row but the rejects the lazy run met (it never met the others).
    assert got.stats["pool"] == len(scores) - int(lazy.dropped.sum())
    assert not (lazy.dropped & keep).any()
    return got, full


@pytest.mark.parametrize("seed", range(6))
def test_random_pools_match_the_oracle_for_any_chunking(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 400))
    d = int(rng.choice([3, 8, 32]))
    emb, scores, seq = planted_pool(rng, n, d, int(rng.integers(3, 60)), ties=seed % 2 == 0)
    scores[rng.random(n) < 0.05] = np.nan
    for tau in (0.5, 0.9, 0.99):
        for budget in (1, int(rng.integers(2, n)), n + 10):
            want = oracle_explained(emb, scores, seq, tau, budget)
            for sizes in ([1], [7], [3, 50], [n + 5], ChunkSizer(min_rows=4)):
                for block in (1, 16, 1024):
                    lazy, _ = run_lazy(emb, scores, seq, tau, budget, sizes, block_size=block)
                    got = lazy.result()
                    ctx = (seed, tau, budget, sizes, block)
                    assert got.indices.tolist() == want["picks"], ctx
                    np.testing.assert_array_equal(got.row_status, want["status"], str(ctx))
                    np.testing.assert_array_equal(got.rejected_by, want["rejected_by"], str(ctx))
                    np.testing.assert_array_equal(got.rejected_sim, want["rejected_sim"], str(ctx))


def test_embedder_rejects_are_dropped_as_the_full_method_never_sees_them():
    rng = np.random.default_rng(7)
    emb, scores, seq = planted_pool(rng, 300, 16, 30)
    rejected = rng.random(300) < 0.1
    emb[rejected] = 0  # what the embedder leaves in a rejected row: never read
    emb[5] = np.nan  # a vector that is not finite (e.g. float16 overflow): invalid_embedding
    for tau in (0.5, 0.9):
        for budget in (10, 100, 400):
            lazy, _ = run_lazy(emb, scores, seq, tau, budget, [13], rejected)
            got, _ = assert_equal_to_full(lazy, emb, scores, seq, tau, budget, rejected)
            examined = lazy.order[: lazy.received]
            assert set(np.flatnonzero(lazy.dropped)) == set(examined[rejected[examined]])
            assert got.stats["embedder_rejected"] == int(lazy.dropped.sum())


def test_budget_fills_early_only_the_rows_read_are_embedded():
    rng = np.random.default_rng(3)
    emb, scores, seq = planted_pool(rng, 5000, 24, 400, spread=(0.05, 0.3))
    lazy, embedded = run_lazy(emb, scores, seq, 0.9, 100, ChunkSizer(min_rows=16))
    got, full = assert_equal_to_full(lazy, emb, scores, seq, 0.9, 100)
    scanned = full.stats["scanned"]
    assert scanned < 5000 // 4
    assert embedded <= 1.2 * scanned + 16, (embedded, scanned)
    # Rows it never read are not_reached.
    order = candidate_order(scores, seq, ~np.isnan(scores))
    assert (got.row_status[order[scanned:]] == NOT_REACHED).all()


def test_incremental_greedy_is_chunking_invariant():
    """Feeding in any chunks gives the state select_diverse reaches in one go."""
    rng = np.random.default_rng(11)
    emb, scores, seq = planted_pool(rng, 2000, 16, 200)
    order = candidate_order(scores, seq, np.ones(2000, bool))
    full = select_diverse(emb, scores, 0.9, 300, seq=seq, device="numpy", block_size=64)
    g = IncrementalGreedy(16, 0.9, 300, block_size=64)
    at = 0
    for size in [5, 1, 64, 100, 3, 999, 2000]:
        g.feed(emb[order[at : at + size]])
        at += size
    assert order[g.picks].tolist() == full.indices.tolist()
    assert g.scanned == full.stats["scanned"] and g.full
    assert g.feed(emb[:10]) == 0  # nothing is examined once the budget is full


def test_chunk_sizer_starts_at_the_budget_and_follows_the_rate():
    s = ChunkSizer(min_rows=8, max_rows=1000, growth=2.0)
    assert s.next_size(budget=100, selected=0, examined=0, planned=0) == 100
    # Prefetch before any feedback: every planned row might be taken; the minimum.
    assert s.next_size(budget=100, selected=0, examined=0, planned=100) == 8
    # A quarter accepted: about 4 rows per slot left, capped at twice what was planned.
    assert s.next_size(budget=100, selected=25, examined=100, planned=108) == 216
    assert s.next_size(budget=1000, selected=25, examined=100, planned=108) == 216
    assert s.next_size(budget=100000, selected=900, examined=1000, planned=9000) == 1000


def test_synthetic_100k_pool_lazy_equals_full():
    """100K rows (numpy embeddings), budgets of 1 % and 5 %: same picks and explanations, and
    about as many rows embedded as read."""
    rng = np.random.default_rng(0)
    emb, scores, seq = planted_pool(rng, 100_000, 32, 20_000, spread=(0.05, 0.5))
    for budget in (1000, 5000):
        lazy, embedded = run_lazy(emb, scores, seq, 0.9, budget, ChunkSizer(min_rows=256))
        got, full = assert_equal_to_full(lazy, emb, scores, seq, 0.9, budget)
        assert embedded <= 1.2 * full.stats["scanned"] + 256
        assert got.stats["not_reached"] == full.stats["not_reached"]


# ------------------------------------------ real embeddings: the demo pool and real rows


@pytest.fixture(scope="module")
def minilm_rows(minilm_path, shared_data: Path, canonical_table):
    """The demo pool and 400 Alpaca rows, embedded by MiniLM through the embed stage's code
    (rejects marked), with coarse scores (many ties)."""
    import pyarrow as pa

    from deita_ray.config import ModelConfig
    from deita_ray.data.demo import demo_records
    from deita_ray.data.formats import canonicalize
    from deita_ray.models.backend import load_backend
    from deita_ray.models.embedding_spec import model_embedding_spec
    from deita_ray.selection.pool import embedding_matrix
    from deita_ray.stages.embed import embed_table

    demo = [r for r in demo_records() if isinstance(r, dict) and isinstance(canonicalize(r), dict)]
    alpaca = json.loads((shared_data / "alpaca/alpaca_data.json").read_text())[:400]
    spec = model_embedding_spec(minilm_path)
    cfg = ModelConfig(path=minilm_path, backend="hf", dtype="float32", max_model_len=256)
    backend = load_backend(cfg, minilm_path, "embed", spec.pooling)
    out = {}
    for name, records in (("demo", demo), ("alpaca", alpaca)):
        table = embed_table(canonical_table(records, name), backend, 256, spec=spec)
        mat, nulls = embedding_matrix(table["embedding"])
        lengths = [len(json.dumps(r)) for r in records]
        out[name] = (mat, np.array([x // 100 for x in lengths], np.float64), nulls)
    backend.close()
    assert isinstance(out["demo"][0], np.ndarray) and pa
    return out


@pytest.mark.parametrize("name", ["demo", "alpaca"])
def test_real_rows_lazy_equals_full_and_oracle(minilm_rows, name):
    emb, scores, rejected = minilm_rows[name]
    seq = np.arange(len(scores))
    kept = np.flatnonzero(~rejected)
    for tau in (0.6, 0.8, 0.9):
        for budget in (5, 30, len(scores)):
            want = oracle_explained(emb[kept], scores[kept], seq[kept], tau, budget)
            for sizes in ([8], ChunkSizer(min_rows=4)):
                lazy, _ = run_lazy(emb, scores, seq, tau, budget, sizes, rejected)
                got, _ = assert_equal_to_full(lazy, emb, scores, seq, tau, budget, rejected)
                assert kept[want["picks"]].tolist() == got.indices.tolist()
                np.testing.assert_array_equal(got.rejected_sim[kept], want["rejected_sim"])

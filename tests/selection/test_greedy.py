"""The blocked greedy (numpy and torch paths) against a brute-force per-row oracle.

Boundary policy under test (see deita_ray/selection/greedy.py): decisions follow the canonical
cosine (float64 dot of the float32 unit vectors, clamped to [-1, 1]); a pair whose canonical
cosine equals tau is taken, one a float64 ulp above is rejected, whatever float32 kernel value
the matrix products produced. The oracle below computes canonical cosines directly (one float64
mat-vec per row), so it never sees float32 kernel values at all.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from deita_ray.selection.greedy import (
    INVALID_EMBEDDING,
    MISSING_SCORE,
    NOT_REACHED,
    SELECTED,
    SIMILAR,
    canonical_cosines,
    kernel_margin,
    normalize_rows,
    select_diverse,
)

TAUS = (0.5, 0.9, 0.99)
BLOCKS = (1, 2, 3, 7, 64, 100, 333, 1024, 4096)


def oracle(
    emb: np.ndarray, scores: np.ndarray, seq: np.ndarray, tau: float, budget: int
) -> tuple[list[int], list[float]]:
    """The contract of docs/selection.md, one row at a time: (picks, max cosine to earlier
    picks)."""
    want = oracle_explained(emb, scores, seq, tau, budget)
    return want["picks"], want["sims"]


def oracle_explained(
    emb: np.ndarray, scores: np.ndarray, seq: np.ndarray, tau: float, budget: int
) -> dict:
    """The brute-force greedy, with what happened to every row.

    Decisions use one float64 mat-vec per row; for a rejected row, ``rejected_by`` is the
    selection rank of the row with the largest canonical cosine among the rows selected before
    it (``np.argmax``: ties go to the earliest selected) and ``rejected_sim`` that cosine.
    """
    n = len(scores)
    finite = np.isfinite(emb).all(axis=1)
    u32 = normalize_rows(np.where(finite[:, None], emb, 0))
    u = u32.astype(np.float64)
    missing = np.isnan(scores)
    cands = [i for i in range(n) if not missing[i] and finite[i]]
    cands.sort(key=lambda i: (-scores[i], seq[i]))
    status = np.full(n, NOT_REACHED, np.int8)
    status[~finite] = INVALID_EMBEDDING
    status[missing] = MISSING_SCORE
    rejected_by = np.full(n, -1, np.int64)
    rejected_sim = np.full(n, np.nan)
    picks: list[int] = []
    sims: list[float] = []
    for i in cands:
        if len(picks) >= budget:
            break
        cos = np.clip(u[picks] @ u[i], -1.0, 1.0) if picks else np.empty(0)
        if not picks or cos.max() <= tau:
            picks.append(i)
            sims.append(float(cos.max()) if picks[:-1] else float("nan"))
            status[i] = SELECTED
        else:
            canon = canonical_cosines(u32[picks], np.repeat(u32[i : i + 1], len(picks), 0))
            status[i] = SIMILAR
            rejected_by[i] = int(np.argmax(canon))
            rejected_sim[i] = canon.max()
    return {
        "picks": picks,
        "sims": sims,
        "status": status,
        "rejected_by": rejected_by,
        "rejected_sim": rejected_sim,
    }


def assert_same_explanation(result, want: dict, context: object = None) -> None:
    """Row status, rejected_by and rejected_sim equal the oracle's exactly (bit for bit)."""
    np.testing.assert_array_equal(result.row_status, want["status"], err_msg=str(context))
    np.testing.assert_array_equal(result.rejected_by, want["rejected_by"], err_msg=str(context))
    np.testing.assert_array_equal(result.rejected_sim, want["rejected_sim"], err_msg=str(context))


def planted_pool(
    rng: np.random.Generator,
    n: int,
    d: int,
    clusters: int,
    spread: tuple[float, float] = (0.05, 0.8),
    ties: bool = True,
    dtype: type = np.float32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random pool with planted near-duplicate clusters of varying tightness.

    Returns (embeddings, scores, seq); scores are small integers (many ties) when ``ties``.
    """
    centers = rng.standard_normal((clusters, d))
    noise = rng.uniform(*spread, size=clusters)
    lab = rng.integers(0, clusters, n)
    emb = centers[lab] + noise[lab, None] * rng.standard_normal((n, d))
    scores = rng.integers(0, 6, n).astype(np.float64) if ties else rng.random(n) * 10
    seq = rng.permutation(n).astype(np.int64) + 1000
    return emb.astype(dtype), scores, seq


def check(emb, scores, seq, tau, budget, blocks=BLOCKS, devices=("numpy", "cpu")):
    explained = oracle_explained(emb, scores, seq, tau, budget)
    want, want_sims = explained["picks"], explained["sims"]
    for dev in devices:
        for bs in blocks:
            r = select_diverse(emb, scores, tau, budget, seq=seq, block_size=bs, device=dev)
            assert r.indices.tolist() == want, (dev, bs, tau, budget)
            assert_same_explanation(r, explained, (dev, bs, tau, budget))
            np.testing.assert_allclose(
                r.max_sim, np.asarray(want_sims, np.float32), atol=1e-5, equal_nan=True
            )
            st = r.stats
            assert st["selected"] == len(want)
            assert st["pool"] == (
                st["selected"]
                + st["rejected_for_similarity"]
                + st["not_reached"]
                + st["missing_score"]
                + st["invalid_embedding"]
            )
    return want


@pytest.mark.parametrize("seed", range(8))
def test_random_pools_match_oracle(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 500))
    d = int(rng.choice([3, 8, 32, 96]))
    emb, scores, seq = planted_pool(rng, n, d, int(rng.integers(3, 80)), ties=seed % 2 == 0)
    for tau in TAUS:
        for budget in (1, int(rng.integers(2, n)), n + 50):  # m larger than the pool too
            check(emb, scores, seq, tau, budget)


def test_large_pool_spans_many_blocks():
    """A pool big enough that every block size (up to 4096) splits it, with half rejected."""
    rng = np.random.default_rng(42)
    emb, scores, seq = planted_pool(rng, 6000, 24, 1500, spread=(0.05, 0.4))
    for tau in TAUS:
        picks = check(emb, scores, seq, tau, 5000, blocks=(7, 1000, 4096))
        assert 0 < len(picks) < 6000


def test_float16_embeddings_match_oracle():
    rng = np.random.default_rng(7)
    emb, scores, seq = planted_pool(rng, 300, 64, 40, dtype=np.float16)
    check(emb, scores, seq, 0.9, 200, blocks=(1, 16, 300))


def _tau_at(u: np.ndarray, i: int, j: int) -> float:
    return float(canonical_cosines(u[i : i + 1], u[j : j + 1])[0])


@pytest.mark.parametrize("device", ["numpy", "cpu"])
def test_cosine_exactly_tau_is_taken(device):
    """tau set to the canonical cosine of a pair: taken; one ulp lower: rejected."""
    rng = np.random.default_rng(3)
    for trial in range(25):
        d = int(rng.choice([2, 17, 256, 1024]))
        a = rng.standard_normal(d)
        b = a + rng.uniform(0.05, 1.0) * rng.standard_normal(d)
        emb = np.stack([a, b]).astype(np.float32)
        u = normalize_rows(emb)
        tau = _tau_at(u, 0, 1)
        # The float32 kernel value differs from the canonical one: the band re-check decides.
        f32 = float(u[0] @ u[1])
        assert abs(f32 - tau) <= kernel_margin(d)
        for bs in (1, 2):
            for t, want in ((tau, [0, 1]), (np.nextafter(tau, -2.0), [0])):
                r = select_diverse(emb, np.array([2.0, 1.0]), t, 5, block_size=bs, device=device)
                assert r.indices.tolist() == want, (trial, d, bs, t, tau, f32)
                # The same decision when the accepted row comes from an earlier block.
                many = np.concatenate([emb[:1], np.zeros((5, d), np.float32), emb[1:]])
                sc = np.array([9.0, 5, 5, 5, 5, 5, 1.0])
                r = select_diverse(many, sc, t, 10, block_size=bs, device=device)
                assert (6 in r.indices.tolist()) == (want == [0, 1])


@pytest.mark.parametrize("device", ["numpy", "cpu"])
def test_exact_duplicates_at_tau_one(device):
    """Duplicated vectors: their canonical cosine is clamped to <= 1.0, so tau=1.0 takes all
    copies; any tau a little below 1 keeps only the first."""
    rng = np.random.default_rng(5)
    for d in (3, 384, 1024):
        v = rng.standard_normal((1, d)).astype(np.float32)
        emb = np.repeat(v, 3, axis=0)
        u = normalize_rows(emb)
        assert canonical_cosines(u[:1], u[1:2])[0] <= 1.0
        for bs in (1, 3):
            r = select_diverse(emb, np.ones(3), 1.0, 10, block_size=bs, device=device)
            assert r.indices.tolist() == [0, 1, 2]
            r = select_diverse(emb, np.ones(3), 1 - 1e-6, 10, block_size=bs, device=device)
            assert r.indices.tolist() == [0]


def test_ties_break_by_seq_and_nan_scores_are_not_candidates():
    emb = np.eye(6, dtype=np.float32)
    scores = np.array([1.0, np.nan, 3.0, 3.0, np.nan, 0.5])
    seq = np.array([10, 11, 5, 2, 1, 0])
    r = select_diverse(emb, scores, 0.9, 10, seq=seq, ids=list("abcdef"), device="numpy")
    assert r.indices.tolist() == [3, 2, 0, 5]
    assert r.ids == ["d", "c", "a", "f"]
    assert r.seq.tolist() == [2, 5, 10, 0]
    assert r.stats["missing_score"] == 2 and r.stats["candidates"] == 4
    assert np.isnan(r.max_sim[0]) and np.allclose(r.max_sim[1:], 0)


def test_zero_vectors_are_never_similar():
    """A zero vector has cosine 0 to everything: taken for tau >= 0, counted."""
    emb = np.array([[1, 0], [0, 0], [1, 0.001], [0, 0]], np.float32)
    scores = np.array([4.0, 3, 2, 1])
    for dev in ("numpy", "cpu"):
        r = select_diverse(emb, scores, 0.5, 10, device=dev)
        assert r.indices.tolist() == [0, 1, 3]
        assert r.stats["zero_vector"] == 2
        assert r.indices.tolist() == oracle(emb, scores, np.arange(4), 0.5, 10)[0]
        # With a negative tau the zero vector's cosine 0 exceeds tau: rejected after the first.
        r = select_diverse(emb, scores, -0.1, 10, device=dev)
        assert r.indices.tolist() == oracle(emb, scores, np.arange(4), -0.1, 10)[0] == [0]


def test_invalid_embeddings_are_not_candidates():
    emb = np.array([[1, 0], [np.nan, 1], [0, 1], [np.inf, 0]], np.float32)
    r = select_diverse(emb, np.array([4.0, 3, 2, np.nan]), 0.9, 10, device="numpy")
    assert r.indices.tolist() == [0, 2]
    assert r.stats["invalid_embedding"] == 1 and r.stats["missing_score"] == 1


@pytest.mark.parametrize("device", ["numpy", "cpu"])
def test_empty_pool_and_small_budgets(device):
    empty = select_diverse(np.empty((0, 8), np.float32), np.empty(0), 0.9, 5, device=device)
    assert empty.indices.tolist() == [] and empty.stats["scanned"] == 0
    rng = np.random.default_rng(0)
    emb, scores, seq = planted_pool(rng, 50, 8, 5)
    r0 = select_diverse(emb, scores, 0.9, 0, seq=seq, device=device)
    assert r0.indices.tolist() == [] and r0.stats["scanned"] == 0
    assert r0.stats["not_reached"] == 50
    r1 = select_diverse(emb, scores, 0.9, 1, seq=seq, device=device)
    assert r1.indices.tolist() == oracle(emb, scores, seq, 0.9, 1)[0]
    assert r1.stats["scanned"] == 1 and np.isnan(r1.max_sim[0])


def test_numpy_path_does_not_import_torch():
    code = (
        "import sys, json, numpy as np\n"
        "from deita_ray.selection.greedy import select_diverse\n"
        "e = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)\n"
        "r = select_diverse(e, np.arange(200.0), 0.5, 50, block_size=32, device='numpy')\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'ids': r.indices.tolist()}))\n"
    )
    out = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout
    )
    assert out["torch"] is False
    e = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    assert out["ids"] == oracle(e, np.arange(200.0), np.arange(200), 0.5, 50)[0]


def test_real_rows_embedded_by_tiny_model(shared_data, tiny_llama):
    """300 Alpaca rows embedded by the tiny LLaMA (last-token hidden state): equals the oracle."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = json.loads((shared_data / "alpaca" / "alpaca_data.json").read_text())[:300]
    texts = [
        f"USER: {r['instruction']} {r.get('input', '')} ASSISTANT: {r['output']}</s>" for r in rows
    ]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    embs = []
    with torch.no_grad():
        for i in range(0, len(texts), 50):
            enc = tok(
                texts[i : i + 50],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=128,
                padding_side="right",
            )
            out = model(**enc, output_hidden_states=True)
            last = enc["attention_mask"].sum(1) - 1
            embs.append(out.hidden_states[-1][torch.arange(len(last)), last].numpy())
    emb = np.concatenate(embs).astype(np.float32)
    # Scores with many ties: a coarse function of the text (the scorers are tested elsewhere).
    scores = np.array([len(r["output"]) // 200 for r in rows], np.float64)
    seq = np.arange(len(rows))
    u = normalize_rows(emb)
    sims = (u @ u.T)[np.triu_indices(len(rows), 1)]
    for q in (0.5, 0.9, 0.99):
        tau = float(np.quantile(sims, q))
        picks = check(emb, scores, seq, tau, 120, blocks=(1, 16, 300))
        assert 1 < len(picks) <= 120


def _special_rows(rng: np.random.Generator, d: int) -> np.ndarray:
    """Finite rows at the edges of float32: tiny, subnormal, huge, zero, a lone subnormal."""
    base = rng.standard_normal((4, d))
    return np.stack(
        [
            base[0] * 1e-39,  # norm ~1e-39: the float32 reciprocal overflows
            base[1] * 1e-44,  # every value subnormal (or zero)
            base[2] / np.abs(base[2]).max() * 3e38,  # norm above float32 max
            np.zeros(d),
            np.eye(1, d, int(rng.integers(d)))[0] * 1e-45,  # one subnormal, the rest zero
            base[3] * 1e-20,
        ]
    ).astype(np.float32)


@pytest.mark.parametrize("d", [1, 2, 7, 64, 1024])
def test_normalize_rows_against_float64(d):
    """Every finite non-zero row becomes the float64 unit vector rounded to float32 (within an
    ulp or two), whatever its scale; zero rows stay zero; non-finite rows stay non-finite."""
    rng = np.random.default_rng(d)
    x = np.concatenate(
        [
            _special_rows(rng, d),
            rng.standard_normal((20, d)).astype(np.float32),
            (rng.standard_normal((5, d)) * 1e30).astype(np.float32),
            np.full((1, d), np.float32(1.5e-38)),
            np.full((1, d), np.float32(3e38)),
        ]
    )
    bad = np.stack([np.full(d, np.nan), np.full(d, np.inf)]).astype(np.float32)
    out = normalize_rows(np.concatenate([x, bad]))
    assert out.dtype == np.float32
    x64 = x.astype(np.float64)
    norms = np.sqrt((x64 * x64).sum(axis=1))  # independent: plain float64 arithmetic
    nonzero = norms > 0
    want = np.zeros_like(x64)
    want[nonzero] = x64[nonzero] / norms[nonzero, None]
    got = out[: len(x)].astype(np.float64)
    assert np.isfinite(got).all()
    # float32 rounding of a unit vector: 2**-24 relative, plus the subnormal spacing.
    np.testing.assert_allclose(got, want, rtol=2.0**-22, atol=2.0**-148)
    got_norms = np.sqrt((got * got).sum(axis=1))
    np.testing.assert_allclose(got_norms[nonzero], 1.0, atol=(d + 2) * 2.0**-23)
    assert (got[~nonzero] == 0).all()
    assert not np.isfinite(out[len(x) :]).all(axis=1).any()
    # Row by row: the same bits whichever rows are normalised together.
    for i in range(len(x)):
        np.testing.assert_array_equal(normalize_rows(x[i : i + 1])[0], out[i])


def test_tiny_norm_row_is_block_size_invariant():
    """The row of the bug report: a 1e-39 row plus eye(4) gave [0], [0, 1] or 5 rows
    depending on the block size; it is a unit vector at cosine 0.5 to each e_i."""
    emb = np.concatenate([np.full((1, 4), 1e-39, np.float32), np.eye(4, dtype=np.float32)])
    scores = np.arange(5.0)[::-1].copy()
    for dev in ("numpy", "cpu"):
        for bs in (1, 2, 3, 1024):
            r = select_diverse(emb, scores, 0.9, 10, block_size=bs, device=dev)
            assert r.indices.tolist() == [0, 1, 2, 3, 4], (dev, bs)
            r = select_diverse(emb, scores, 0.4, 10, block_size=bs, device=dev)
            assert r.indices.tolist() == [0], (dev, bs)
            assert r.rejected_by.tolist() == [-1, 0, 0, 0, 0]
            np.testing.assert_allclose(r.rejected_sim[1:], 0.5, rtol=1e-7)


@pytest.mark.parametrize("seed", range(6))
def test_block_size_invariance_with_extreme_rows(seed):
    """Property: random pools salted with tiny-norm, subnormal, huge-norm and zero rows (and
    rescaled copies of ordinary rows, near-duplicates at any scale) select the oracle's ids,
    with the same explanations, for every block size and device."""
    rng = np.random.default_rng(1000 + seed)
    d = int(rng.choice([2, 5, 16, 64]))
    emb, scores, seq = planted_pool(rng, int(rng.integers(40, 160)), d, int(rng.integers(3, 20)))
    special = np.concatenate([_special_rows(rng, d) for _ in range(3)])
    scale = np.float32(10.0) ** rng.integers(-42, 38, size=12).astype(np.float32)
    with np.errstate(over="ignore", under="ignore"):
        rescaled = emb[rng.integers(0, len(emb), 12)] * scale[:, None]
    rescaled = rescaled[np.isfinite(rescaled).all(axis=1)]
    emb = np.concatenate([emb, special, rescaled])
    n = len(emb)
    scores = np.concatenate([scores, rng.integers(0, 6, n - len(scores)).astype(np.float64)])
    seq = rng.permutation(n).astype(np.int64)
    for tau in (-0.1, 0.5, 0.9, 0.99):
        check(emb, scores, seq, tau, int(rng.integers(1, n + 5)), blocks=(1, 2, 5, 33, 4096))


@pytest.mark.parametrize("device", ["numpy", "cpu"])
def test_rejected_by_is_largest_cosine_and_ties_go_to_earliest(device):
    """c is similar to two selected rows: blamed on the closer one, wherever they were
    accepted (earlier block or same block); at an exact tie, on the earlier selected."""
    e1, e2 = np.eye(3, dtype=np.float32)[:2]
    near_e2 = np.array([0.1, 1.0, 0.0], np.float32)  # closer to e2 than to e1
    mid = np.array([0.9, 0.8, 0.0], np.float32)  # cos 0.75 to e1, 0.66 to e2
    emb = np.stack([e1, e2, mid, near_e2])
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    for bs in (1, 2, 3, 4):
        r = select_diverse(emb, scores, 0.6, 10, block_size=bs, device=device)
        assert r.indices.tolist() == [0, 1], bs
        assert r.rejected_by.tolist() == [-1, -1, 0, 1], bs
        assert r.row_status.tolist() == [SELECTED, SELECTED, SIMILAR, SIMILAR]
    # An exact tie: (1, 1)/sqrt(2) is at the same cosine to e1 and e2; e2 is selected first.
    tie = np.stack([e2, e1, np.array([1.0, 1.0, 0.0], np.float32)])
    for bs in (1, 2, 3):
        r = select_diverse(tie, np.array([3.0, 2.0, 1.0]), 0.5, 10, block_size=bs, device=device)
        assert r.indices.tolist() == [0, 1]
        assert r.rejected_by.tolist() == [-1, -1, 0]
        assert r.rejected_sim[2] == canonical_cosines(normalize_rows(tie[2:]), tie[:1])[0]


def test_explain_off_changes_nothing_else():
    rng = np.random.default_rng(11)
    emb, scores, seq = planted_pool(rng, 400, 16, 40)
    a = select_diverse(emb, scores, 0.9, 150, seq=seq, block_size=64, device="numpy")
    b = select_diverse(emb, scores, 0.9, 150, seq=seq, block_size=64, device="numpy", explain=False)
    assert a.indices.tolist() == b.indices.tolist() and a.stats == b.stats
    np.testing.assert_array_equal(a.row_status, b.row_status)
    assert b.rejected_by is None and b.rejected_sim is None
    assert (a.rejected_by[a.row_status == SIMILAR] >= 0).all()
    assert (a.rejected_by[a.row_status != SIMILAR] == -1).all()
    assert np.count_nonzero(a.row_status == SIMILAR) == a.stats["rejected_for_similarity"]
    assert np.count_nonzero(a.row_status == NOT_REACHED) == a.stats["not_reached"]

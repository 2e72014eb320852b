"""The paper's baselines: random, score-only, instruction / response length, k-center greedy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from deita_ray.selection.baselines import (
    message_lengths,
    select_kcenter,
    select_longest,
    select_random,
    select_top_score,
)
from deita_ray.selection.greedy import normalize_rows

MSG_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def test_random_is_seeded_and_independent_of_row_layout():
    seq = np.arange(100, dtype=np.int64)
    a = select_random(100, 10, seed=3, seq=seq)
    assert a.indices.tolist() == select_random(100, 10, seed=3, seq=seq).indices.tolist()
    assert a.indices.tolist() != select_random(100, 10, seed=4, seq=seq).indices.tolist()
    assert len(set(a.indices.tolist())) == 10
    # The same rows stored in another order: the same rows (by seq) are drawn.
    perm = np.random.default_rng(0).permutation(100)
    b = select_random(100, 10, seed=3, seq=seq[perm])
    assert b.seq.tolist() == a.seq.tolist()
    assert len(select_random(5, 10, seed=0)) == 5
    assert a.stats["below_budget_cut"] == 90 and np.isnan(a.max_sim).all()


def test_top_score_ties_by_seq_and_skips_missing():
    scores = np.array([1.0, 5.0, np.nan, 5.0, 3.0])
    seq = np.array([0, 9, 2, 4, 3])
    r = select_top_score(scores, 3, seq=seq, ids=list("abcde"))
    assert r.ids == ["d", "b", "e"]
    assert r.stats == {
        "pool": 5,
        "candidates": 4,
        "selected": 3,
        "below_budget_cut": 1,
        "missing_score": 1,
    }
    assert r.scores.tolist() == [5.0, 5.0, 3.0]


def test_message_lengths_sum_all_turns():
    msgs = pa.array(
        [
            [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "ab"},
                {"role": "assistant", "content": "xyz"},
                {"role": "user", "content": "héllo"},
                {"role": "assistant", "content": None},
            ],
            [],
            None,
            [{"role": "user", "content": "q"}],
        ],
        MSG_TYPE,
    )
    assert message_lengths(msgs, "user").tolist() == [7, 0, 0, 1]
    assert message_lengths(msgs, "assistant").tolist() == [3, 0, 0, 0]
    # Chunked columns and sliced arrays give the same lengths.
    chunked = pa.chunked_array([msgs.slice(0, 2), msgs.slice(2)])
    assert message_lengths(chunked, "user").tolist() == [7, 0, 0, 1]
    assert message_lengths(msgs.slice(1), "user").tolist() == [0, 0, 1]


def test_longest_first_with_ties():
    r = select_longest(np.array([5, 9, 9, 1]), 3, "response_length", seq=np.array([3, 2, 1, 0]))
    assert r.indices.tolist() == [2, 1, 0] and r.method == "response_length"


def brute_kcenter(emb: np.ndarray, first: int, m: int) -> list[int]:
    u = normalize_rows(emb).astype(np.float64)
    picks = [first]
    while len(picks) < m:
        best, best_j = np.inf, -1
        for j in range(len(u)):
            if j in picks:
                continue
            near = max(float(u[j] @ u[p]) for p in picks)
            if near < best - 1e-9:
                best, best_j = near, j
        picks.append(best_j)
    return picks


def test_kcenter_matches_brute_force():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((60, 5)).astype(np.float32)
    scores = rng.random(60)
    r = select_kcenter(emb, 12, scores=scores, chunk=7)
    first = int(np.argmax(scores))
    assert r.indices.tolist() == brute_kcenter(emb, first, 12)
    assert np.isnan(r.max_sim[0]) and (np.diff(r.max_sim[1:]) >= -1e-6).all()
    assert select_kcenter(emb, 0).indices.tolist() == []
    assert len(select_kcenter(emb, 100)) == 60

"""The paper's selection baselines behind :class:`~deita_ray.selection.greedy.SelectionResult`.

Pure functions over arrays (and one helper over an Arrow ``messages`` column):

* ``random``: a seeded uniform sample of the pool, in sampled order.
* ``score``: top ``m`` by evol score, no diversity (ties by input order; rows without a score
  are not candidates).
* ``instruction_length`` / ``response_length``: longest first, the length being the total
  number of characters of all user (resp. assistant) messages of the row; ties by input order.
* ``kcenter``: k-center greedy on the embeddings (cosine distance): start from the best-scored
  row (or the first row), then repeatedly take the row farthest from everything taken.

``max_sim`` is NaN for every baseline except ``kcenter`` (where it is the cosine of the pick to
its nearest earlier pick).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deita_ray.selection.greedy import SelectionResult, normalize_rows, valid_rows


def _result(
    indices: np.ndarray,
    n: int,
    method: str,
    seq: np.ndarray | None,
    scores: np.ndarray | None,
    ids: list[str] | None,
    candidates: int,
    extra: dict | None = None,
) -> SelectionResult:
    indices = np.asarray(indices, dtype=np.int64)
    stats = {
        "pool": int(n),
        "candidates": int(candidates),
        "selected": int(len(indices)),
        "below_budget_cut": int(candidates - len(indices)),
        **(extra or {}),
    }
    return SelectionResult(
        indices=indices,
        max_sim=np.full(len(indices), np.nan, np.float32),
        stats=stats,
        ids=[ids[i] for i in indices] if ids is not None else None,
        seq=np.asarray(seq)[indices] if seq is not None else indices.copy(),
        scores=(
            np.asarray(scores, np.float64)[indices]
            if scores is not None
            else np.full(len(indices), np.nan)
        ),
        method=method,
    )


def select_random(
    n: int,
    budget: int,
    seed: int = 0,
    seq: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    ids: list[str] | None = None,
) -> SelectionResult:
    """A seeded uniform sample of ``min(budget, n)`` rows, in sampled order.

    The sample depends only on ``(n, seed)`` and the rows' ``seq`` order, not on how the pool
    was split into files: rows are first put in ``seq`` order.
    """
    seq_arr = np.arange(n, dtype=np.int64) if seq is None else np.asarray(seq, np.int64)
    by_seq = np.argsort(seq_arr, kind="stable")
    perm = np.random.default_rng(seed).permutation(n)[: max(0, min(budget, n))]
    return _result(by_seq[perm], n, "random", seq_arr, scores, ids, n)


def _top(key: np.ndarray, seq: np.ndarray | None, budget: int, mask: np.ndarray) -> np.ndarray:
    """Positions in ``mask`` by ``key`` descending, ties by ``seq``; the first ``budget``."""
    n = len(key)
    seq_arr = np.arange(n, dtype=np.int64) if seq is None else np.asarray(seq, np.int64)
    pos = np.flatnonzero(mask)
    order = pos[np.lexsort((seq_arr[pos], -np.asarray(key, np.float64)[pos]))]
    return order[: max(0, budget)]


def select_top_score(
    scores: np.ndarray, budget: int, seq: np.ndarray | None = None, ids: list[str] | None = None
) -> SelectionResult:
    """Top ``budget`` rows by evol score (no diversity); NaN scores are not candidates."""
    scores = np.asarray(scores, np.float64)
    ok = ~np.isnan(scores)
    idx = _top(scores, seq, budget, ok)
    return _result(
        idx,
        len(scores),
        "score",
        seq,
        scores,
        ids,
        int(ok.sum()),
        {"missing_score": int((~ok).sum())},
    )


def select_longest(
    lengths: np.ndarray,
    budget: int,
    method: str,
    seq: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    ids: list[str] | None = None,
) -> SelectionResult:
    """Longest first (``instruction_length`` / ``response_length``), ties by input order."""
    lengths = np.asarray(lengths, np.float64)
    idx = _top(lengths, seq, budget, np.ones(len(lengths), bool))
    return _result(idx, len(lengths), method, seq, scores, ids, len(lengths))


def message_lengths(messages: pa.Array | pa.ChunkedArray, role: str) -> np.ndarray:
    """Total characters of the ``role`` messages of each row of a list<struct<role, content>>.

    Rows with no such message (or a null list) get 0.
    """
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    n = len(messages)
    flat = pc.list_flatten(messages)
    if len(flat) == 0:
        return np.zeros(n, np.int64)
    parents = pc.list_parent_indices(messages).to_numpy(zero_copy_only=False)
    roles = pc.struct_field(flat, "role")
    lens = pc.fill_null(pc.utf8_length(pc.struct_field(flat, "content")), 0)
    mask = pc.fill_null(pc.equal(roles, role), False).to_numpy(zero_copy_only=False)
    lens_np = lens.to_numpy(zero_copy_only=False)
    return np.bincount(parents[mask], weights=lens_np[mask], minlength=n).astype(np.int64)


def select_kcenter(
    embeddings: np.ndarray,
    budget: int,
    scores: np.ndarray | None = None,
    seq: np.ndarray | None = None,
    ids: list[str] | None = None,
    chunk: int = 65536,
) -> SelectionResult:
    """k-center greedy (farthest-first traversal) under cosine distance.

    Starts from the best-scored row (ties by input order; the first row without scores), then
    repeatedly takes the row whose cosine to its nearest taken row is smallest (ties: lowest
    position). Rows with non-finite embeddings are not candidates. O(n * budget * d).
    """
    emb = np.asarray(embeddings)
    n = emb.shape[0]
    finite, _ = valid_rows(emb) if n else (np.ones(0, bool), None)
    cand = np.flatnonzero(finite)
    m = max(0, min(budget, len(cand)))
    if m == 0:
        return _result(np.empty(0, np.int64), n, "kcenter", seq, scores, ids, len(cand))
    u = normalize_rows(emb[cand])
    if scores is not None and not np.all(np.isnan(np.asarray(scores, np.float64)[cand])):
        sc = np.nan_to_num(np.asarray(scores, np.float64)[cand], nan=-np.inf)
        first = int(
            _top(sc, None if seq is None else np.asarray(seq)[cand], 1, np.ones(len(cand), bool))[0]
        )
    else:
        first = 0
    nearest = np.full(len(cand), -np.inf, np.float32)  # cosine to the nearest taken row
    picks, sims = [first], [np.nan]
    for _ in range(m - 1):
        c = u[picks[-1]]
        for s0 in range(0, len(cand), chunk):
            np.maximum(
                nearest[s0 : s0 + chunk], u[s0 : s0 + chunk] @ c, out=nearest[s0 : s0 + chunk]
            )
        nearest[picks] = np.inf
        j = int(np.argmin(nearest))
        picks.append(j)
        sims.append(float(nearest[j]))
    res = _result(
        cand[np.asarray(picks)],
        n,
        "kcenter",
        seq,
        scores,
        ids,
        len(cand),
        {"invalid_embedding": int((~finite).sum())},
    )
    res.max_sim = np.asarray(sims, np.float32)
    return res

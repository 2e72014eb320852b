"""Exact distributed selection over shard actors (docs/selection.md, the frontier algorithm).

The pool (ids, scores, embeddings) is split into ``P`` contiguous row ranges of the embedder's
Parquet output; each :class:`SelectShard` actor reads its own range
(:mod:`deita_ray.selection.pool`), drops non-candidates, normalises and sorts its rows by
``(-score, seq)``. The driver only ever holds the accepted set (ids and unit vectors of the
accepted rows) and the small survivor lists of a round.

Why it is exact: rejection is monotone. A shard rejects a candidate against a snapshot of the
accepted set, and every row of that snapshot precedes the candidate in global order and is in
the final selection, so the candidate would be rejected by the sequential greedy too. Round r:
the driver sends the rows accepted since the previous round; each shard screens its next ``k``
unseen candidates and returns the survivors and the key of the last row it examined. The
*frontier* is the smallest such key over the shards that still have rows (every unexamined row
lies after it); the driver runs the in-order greedy (:class:`~deita_ray.selection.greedy.
GreedySelector`) over the pending survivors up to the frontier, against the full accepted set,
and keeps the rest for a later round. The result is identical to
:func:`~deita_ray.selection.greedy.select_diverse` for any number of shards and block size:
decisions use the canonical cosine of greedy.py whichever matrix shapes produced the float32
values.

What each rejected row was too similar to (``rejected_by``): the selected rows before a row are
a prefix of the selection (the greedy accepts in key order). The driver's own rejections see
that whole prefix. A shard's rejection sees the snapshot it screened with; at the end the
driver sends the rest of the selection with its keys and the shard completes each of its
rejected rows against the selected rows after its snapshot that precede it (:meth:`SelectShard.
finish`). Both use the canonical best match of greedy.py, so the answer equals the single-node
one.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from deita_ray.data.sink import parquet_files
from deita_ray.selection.greedy import (
    INVALID_EMBEDDING,
    MISSING_SCORE,
    NOT_REACHED,
    SELECTED,
    SIMILAR,
    GreedySelector,
    SelectionResult,
    candidate_order,
    merge_best,
    normalize_rows,
    resolve_device,
    valid_rows,
)
from deita_ray.selection.pool import (
    Piece,
    check_unique_seq,
    duplicate_seq_error,
    first_shared_seq,
    load_pool,
    plan_shards,
)


def keys_before(
    neg: np.ndarray, seq: np.ndarray, q_neg: np.ndarray, q_seq: np.ndarray
) -> np.ndarray:
    """For each query key, how many of the keys ``(neg, seq)`` are smaller.

    Keys are ``(-score, seq)`` pairs, compared lexicographically; ``seq`` is unique, and no
    query key is among ``(neg, seq)``.
    """
    k = len(neg)
    all_neg = np.concatenate([np.asarray(neg, np.float64), np.asarray(q_neg, np.float64)])
    all_seq = np.concatenate([np.asarray(seq, np.int64), np.asarray(q_seq, np.int64)])
    order = np.lexsort((all_seq, all_neg))
    before = np.cumsum(order < k)  # keys of ``neg`` up to each position of the merged order
    out = np.empty(len(q_neg), np.int64)
    q = order >= k
    out[order[q] - k] = before[q]
    return out


class SelectShard:
    """One shard of the pool: reads its rows, screens candidates against the accepted set.

    Wrapped with ``ray.remote`` by :class:`ShardedPool`; a plain object otherwise (tests
    of the logic can run it in-process).

    Args:
        pieces: the row ranges this shard owns.
        offset: global position of the shard's first row.
        device: as for :class:`~deita_ray.selection.greedy.GreedySelector`.

    Call :meth:`reset` before each selection and :meth:`finish` after it.
    """

    def __init__(
        self, pieces: list[Piece], offset: int, device: str = "cpu", score: str = "evol_score"
    ):
        t0 = time.perf_counter()
        # seq is checked by check_seq(), called by the driver: one clear error for all shards.
        pool = load_pool(pieces, check_seq=False, score=score)
        self.ids = pool.ids
        n = len(pool.ids)
        self.emb = pool.embeddings
        self.dim = self.emb.shape[1] if n else 0
        finite, zero = valid_rows(self.emb) if n else (np.ones(0, bool), np.zeros(0, bool))
        missing = np.isnan(pool.scores)
        cand = ~missing & finite
        self.order = candidate_order(pool.scores, pool.seq, cand)
        self.neg_score = -pool.scores[self.order]
        self.seq = pool.seq[self.order]
        self.offset = offset
        self.missing_pos = np.flatnonzero(missing) + offset
        self.invalid_pos = np.flatnonzero(~finite & ~missing) + offset
        self.all_seq = pool.seq
        self.sorted_seq = np.sort(pool.seq)
        self.device = resolve_device(device)
        self.cursor = 0
        self.selector: GreedySelector | None = None
        self._rejected: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
        self.stats = {
            "pool": int(n),
            "candidates": int(len(self.order)),
            "missing_score": int(missing.sum()),
            "invalid_embedding": int((~finite & ~missing).sum()),
            "zero_vector": int((zero & cand).sum()),
            "load_s": time.perf_counter() - t0,
        }

    def reset(self, tau: float, budget: int) -> None:
        """Start a new selection: empty accepted set, cursor back at the best candidate."""
        self.cursor = 0
        self._rejected = []
        self.selector = GreedySelector(max(self.dim, 1), tau, max(budget, 0), self.device)

    def info(self) -> dict[str, Any]:
        """Pool statistics of this shard, the embedding dimension, its ``seq`` range and the
        Ray node it runs on."""
        node = None
        try:
            import ray  # noqa: PLC0415

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except ImportError:  # pragma: no cover
            pass
        ss = self.sorted_seq
        seq_range = (int(ss[0]), int(ss[-1])) if len(ss) else None
        return {**self.stats, "dim": int(self.dim), "node_id": node, "seq_range": seq_range}

    def check_seq(self) -> None:
        """Raise :class:`~deita_ray.selection.pool.DuplicateSeqError` if a ``seq`` repeats."""
        check_unique_seq(self.all_seq, self.ids, f"shard at row {self.offset}")

    def seq_values(self) -> np.ndarray:
        """This shard's ``seq`` values, sorted (for the driver's uniqueness check)."""
        return self.sorted_seq

    def ids_of_seq(self, seq: int) -> list[str]:
        """Ids of this shard's rows with ``seq`` (for the error message)."""
        return [self.ids[i] for i in np.flatnonzero(self.all_seq == seq)]

    def next_round(self, delta: np.ndarray | None, k: int, explain: bool = True) -> dict[str, Any]:
        """Add the driver's newly accepted rows, then screen the next ``k`` candidates.

        The rows rejected here are kept (with their best match within the snapshot of the
        accepted set they were screened against, when ``explain``) for :meth:`finish`.

        Returns:
            ``neg_score``, ``seq``, ``ids``, ``pos`` (global), ``emb`` of the survivors, the
            ``last`` examined key ``(neg_score, seq)`` (None if nothing was examined) and
            ``exhausted``.
        """
        if self.selector is None or len(self.order) == 0:
            return {
                "exhausted": True,
                "last": None,
                "neg_score": np.empty(0),
                "seq": np.empty(0, np.int64),
                "ids": [],
                "pos": np.empty(0, np.int64),
                "emb": np.empty((0, 0), np.float32),
                "screened": 0,
            }
        if delta is not None and len(delta):
            self.selector.add(delta)
        a, b = self.cursor, min(self.cursor + k, len(self.order))
        self.cursor = b
        rows = self.order[a:b]
        x = normalize_rows(self.emb[rows])
        scr = self.selector.screen(x, explain=explain)
        sel = np.flatnonzero(scr.survives)
        out = np.flatnonzero(~scr.survives)
        if len(out):
            best = scr.best_sim[out] if explain else np.full(len(out), np.nan)
            rank = scr.best_rank[out] if explain else np.full(len(out), -1, np.int64)
            self._rejected.append((a + out, best, rank, self.selector.k))
        last = (float(self.neg_score[b - 1]), int(self.seq[b - 1])) if b > a else None
        return {
            "neg_score": self.neg_score[a:b][sel],
            "seq": self.seq[a:b][sel],
            "ids": [self.ids[i] for i in rows[sel]],
            "pos": (rows[sel] + self.offset).astype(np.int64),
            "emb": x[sel],
            "last": last,
            "exhausted": b >= len(self.order),
            "screened": int(b - a),
        }

    def count_upto(self, neg_score: float, seq: int) -> int:
        """Candidates of this shard whose key is <= ``(neg_score, seq)``."""
        lo = int(np.searchsorted(self.neg_score, neg_score, side="left"))
        hi = int(np.searchsorted(self.neg_score, neg_score, side="right"))
        return lo + int(np.searchsorted(self.seq[lo:hi], seq, side="right"))

    def finish(
        self,
        delta: np.ndarray | None,
        acc_neg: np.ndarray,
        acc_seq: np.ndarray,
        last_taken: tuple[float, int] | None,
        explain: bool = True,
    ) -> dict[str, Any]:
        """What happened to this shard's rows, once the selection is complete.

        Args:
            delta: the rows accepted since the last round (unit vectors, selection order).
            acc_neg, acc_seq: the keys of the whole selection, in selection (= key) order.
            last_taken: key of the row that filled the budget (rows after it were not
                reached), or None when the budget did not fill.
            explain: complete each rejected row's best match with the selected rows after
                its snapshot that precede it.

        Returns:
            ``rejected`` (global positions of the rows rejected here, examined ones only),
            ``rejected_rank`` / ``rejected_sim`` (when ``explain``), ``scanned`` (this shard's
            candidates up to ``last_taken``), ``missing_pos``, ``invalid_pos``.
        """
        sel = self.selector
        if sel is not None and delta is not None and len(delta):
            sel.add(delta)
        if last_taken is None:
            scanned = int(len(self.order)) if sel is not None and sel.capacity else 0
        else:
            scanned = self.count_upto(*last_taken)
        out_cur, out_best, out_rank = [], [], []
        for cur, best, rank, snap in self._rejected:  # one part per round (one snapshot)
            keep = cur < scanned  # candidates after the budget filled were not reached
            cur, best, rank = cur[keep], best[keep].copy(), rank[keep].copy()
            if explain and len(cur) and sel is not None:
                upto = keys_before(
                    acc_neg[: sel.k], acc_seq[: sel.k], self.neg_score[cur], self.seq[cur]
                )
                todo = np.flatnonzero(upto > snap)
                if len(todo):
                    hi = int(upto[todo].max())
                    x = normalize_rows(self.emb[self.order[cur[todo]]])
                    cols = sel.accepted[snap:hi]
                    f = x @ cols.T
                    f[np.arange(snap, hi)[None, :] >= upto[todo, None]] = -np.inf
                    b2, c2 = sel.best_match(x, f, cols)
                    sub_best, sub_rank = best[todo], rank[todo]
                    merge_best(sub_best, sub_rank, b2, np.where(c2 >= 0, c2 + snap, -1))
                    best[todo], rank[todo] = sub_best, sub_rank
            out_cur.append(cur)
            out_best.append(best)
            out_rank.append(rank)
        cur = np.concatenate(out_cur) if out_cur else np.empty(0, np.int64)
        best = np.concatenate(out_best) if out_best else np.empty(0)
        rank = np.concatenate(out_rank) if out_rank else np.empty(0, np.int64)
        return {
            "rejected": (self.order[cur] + self.offset).astype(np.int64),
            "rejected_rank": rank if explain else None,
            "rejected_sim": best if explain else None,
            "scanned": scanned,
            "missing_pos": self.missing_pos,
            "invalid_pos": self.invalid_pos,
        }


class ShardedPool:
    """The pool loaded into ``num_shards`` shard actors; any number of selections over it.

    The shards read their row ranges once; :meth:`select` can then run with different tau,
    budget and block size (a sweep, a benchmark) without re-reading. Use as a context manager
    or call :meth:`close` (it kills the actors). Ray must be initialised.

    Args:
        embed_dir: the embedder's Parquet folder, or a list of Parquet files.
        num_shards: shard actors (any number >= 1 gives the same ids).
        device: matrix-product device of the shards (``cpu``, ``cuda``, ``numpy``, ``auto``).
        shard_num_cpus: CPUs reserved per shard actor.
        scheduling_strategy: Ray placement of the shards (``SPREAD`` puts them on
            different nodes).
    """

    def __init__(
        self,
        embed_dir: str | list[str],
        num_shards: int,
        device: str = "cpu",
        shard_num_cpus: float = 1.0,
        scheduling_strategy: str = "SPREAD",
        score: str = "evol_score",
    ):
        import ray  # noqa: PLC0415 - only the distributed path needs Ray

        t0 = time.perf_counter()
        files = (
            parquet_files(embed_dir, recursive=True)
            if isinstance(embed_dir, str)
            else list(embed_dir)
        )
        plans, self.total = plan_shards(files, num_shards)
        offsets = np.cumsum([0] + [sum(b - a for _, a, b in p) for p in plans]).tolist()
        actor_cls = ray.remote(num_cpus=shard_num_cpus, scheduling_strategy=scheduling_strategy)(
            SelectShard
        )
        self.shards = [actor_cls.remote(p, offsets[s], device, score) for s, p in enumerate(plans)]
        try:
            self.infos = ray.get([sh.info.remote() for sh in self.shards])
            ray.get([sh.check_seq.remote() for sh in self.shards])
            self._check_seq_across_shards()
        except Exception:
            self.close()
            raise
        self.num_shards = num_shards
        self.dim = max(i["dim"] for i in self.infos)
        self.load_s = time.perf_counter() - t0
        self.pool_stats = {
            k: int(sum(i[k] for i in self.infos))
            for k in ("pool", "candidates", "missing_score", "invalid_embedding", "zero_vector")
        }

    def _check_seq_across_shards(self) -> None:
        """The frontier algorithm orders rows by ``(-score, seq)`` across shards: ``seq`` must
        be unique. Only shards whose ``seq`` ranges overlap send their values."""
        import ray  # noqa: PLC0415

        ranges = [i["seq_range"] for i in self.infos]
        overlapping = {
            s
            for a, ra in enumerate(ranges)
            for b, rb in enumerate(ranges)
            if a < b and ra and rb and ra[0] <= rb[1] and rb[0] <= ra[1]
            for s in (a, b)
        }
        if not overlapping:
            return
        parts: list[np.ndarray | None] = [None] * len(ranges)
        for s, values in zip(
            sorted(overlapping),
            ray.get([self.shards[s].seq_values.remote() for s in sorted(overlapping)]),
            strict=True,
        ):
            parts[s] = values
        shared = first_shared_seq(parts)
        if shared is not None:
            a, b, seq = shared
            ids_a, ids_b = ray.get(
                [self.shards[a].ids_of_seq.remote(seq), self.shards[b].ids_of_seq.remote(seq)]
            )
            raise duplicate_seq_error(seq, f"shards {a} and {b}", (ids_a[0], ids_b[0]))

    def __enter__(self) -> ShardedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the shard actors."""
        import ray  # noqa: PLC0415

        for sh in self.shards:
            ray.kill(sh)
        self.shards = []

    def select(
        self,
        tau: float,
        budget: int,
        block_size: int = 1024,
        driver_device: str = "auto",
        explain: bool = True,
    ) -> SelectionResult:
        """Run the exact frontier algorithm (module docstring) over the shards.

        Args:
            tau: cosine threshold.
            budget: number of rows to select.
            block_size: candidates each shard screens per round, and the driver's block size.
            driver_device: device of the driver's greedy over survivors.
            explain: fill ``rejected_by`` / ``rejected_sim`` (``row_status`` always).

        Returns:
            The selection; ``indices`` (and the per-row arrays) are global positions in the
            files' row order, ``stats`` as for :func:`~deita_ray.selection.greedy.
            select_diverse` plus ``rounds``, ``shard_screened`` (rows the shards screened,
            over-scan included), ``shard_nodes`` and timings.
        """
        import ray  # noqa: PLC0415

        t0 = time.perf_counter()
        ray.get([sh.reset.remote(tau, budget) for sh in self.shards])
        stats = dict(self.pool_stats)
        dim = max(self.dim, 1)
        capacity = max(0, min(int(budget), stats["candidates"]))
        selector = GreedySelector(dim, tau, capacity, resolve_device(driver_device))
        active = [i for i, info in enumerate(self.infos) if info["candidates"] > 0]
        last: dict[int, tuple[float, int]] = {}
        sent = rounds = screened = 0
        pend: dict[str, Any] = {
            "neg": np.empty(0),
            "seq": np.empty(0, np.int64),
            "ids": [],
            "pos": np.empty(0, np.int64),
            "emb": np.empty((0, dim), np.float32),
        }
        picks_pos: list[np.ndarray] = []
        picks_ids: list[str] = []
        picks_seq: list[np.ndarray] = []
        picks_neg: list[np.ndarray] = []
        sims: list[np.ndarray] = []
        rej_pos: list[np.ndarray] = []  # the driver's own rejections
        rej_rank: list[np.ndarray] = []
        rej_sim: list[np.ndarray] = []
        last_taken: tuple[float, int] | None = None
        while not selector.full and (active or len(pend["neg"])):
            if active:
                # One broadcast of the rows accepted since the last round.
                delta = ray.put(selector.accepted[sent : selector.k].copy())
                sent = selector.k
                outs = ray.get(
                    [self.shards[i].next_round.remote(delta, block_size, explain) for i in active]
                )
                rounds += 1
                still = []
                for i, out in zip(active, outs, strict=True):
                    screened += out["screened"]
                    if out["last"] is not None:
                        last[i] = out["last"]
                    if not out["exhausted"]:
                        still.append(i)
                    if len(out["neg_score"]):
                        pend["neg"] = np.concatenate([pend["neg"], out["neg_score"]])
                        pend["seq"] = np.concatenate([pend["seq"], out["seq"]])
                        pend["ids"] = pend["ids"] + out["ids"]
                        pend["pos"] = np.concatenate([pend["pos"], out["pos"]])
                        pend["emb"] = np.concatenate([pend["emb"], out["emb"]])
                active = still
            # Frontier: every unexamined row of an active shard lies after its last key.
            frontier = min((last[i] for i in active), default=None)
            order = np.lexsort((pend["seq"], pend["neg"]))
            if frontier is None:
                n_ok = len(order)
            else:
                neg_s, seq_s = pend["neg"][order], pend["seq"][order]
                n_ok = int(
                    np.sum(
                        (neg_s < frontier[0]) | ((neg_s == frontier[0]) & (seq_s <= frontier[1]))
                    )
                )
            ready, rest = order[:n_ok], order[n_ok:]
            for b0 in range(0, len(ready), block_size):
                blk = ready[b0 : b0 + block_size]
                res = selector.offer(pend["emb"][blk], explain)
                chosen = blk[res.pos]
                picks_pos.append(pend["pos"][chosen])
                picks_ids.extend(pend["ids"][j] for j in chosen)
                picks_seq.append(pend["seq"][chosen])
                picks_neg.append(pend["neg"][chosen])
                sims.append(res.max_sim)
                rej_pos.append(pend["pos"][blk[res.rejected]])
                if explain:
                    rej_rank.append(res.rejected_rank)
                    rej_sim.append(res.rejected_sim)
                if selector.full:
                    j = blk[res.examined - 1]
                    last_taken = (float(pend["neg"][j]), int(pend["seq"][j]))
                    break
            pend = {
                "neg": pend["neg"][rest],
                "seq": pend["seq"][rest],
                "ids": [pend["ids"][j] for j in rest],
                "pos": pend["pos"][rest],
                "emb": pend["emb"][rest],
            }
        neg = np.concatenate(picks_neg) if picks_neg else np.empty(0)
        acc_seq = np.concatenate(picks_seq) if picks_seq else np.empty(0, np.int64)
        # Every shard learns the rest of the selection and reports what happened to its rows.
        delta = ray.put(selector.accepted[sent : selector.k].copy())
        fins = ray.get(
            [sh.finish.remote(delta, neg, acc_seq, last_taken, explain) for sh in self.shards]
        )
        scanned = int(sum(f["scanned"] for f in fins))
        indices = np.concatenate(picks_pos) if picks_pos else np.empty(0, np.int64)
        selected = len(indices)
        status = np.full(self.total, NOT_REACHED, np.int8)
        rejected_by = np.full(self.total, -1, np.int64) if explain else None
        rejected_sim = np.full(self.total, np.nan) if explain else None
        for f in fins:
            status[f["missing_pos"]] = MISSING_SCORE
            status[f["invalid_pos"]] = INVALID_EMBEDDING
        for f in fins:
            status[f["rejected"]] = SIMILAR
            if explain:
                rejected_by[f["rejected"]] = f["rejected_rank"]
                rejected_sim[f["rejected"]] = f["rejected_sim"]
        for k, pos in enumerate(rej_pos):
            status[pos] = SIMILAR
            if explain:
                rejected_by[pos] = rej_rank[k]
                rejected_sim[pos] = rej_sim[k]
        status[indices] = SELECTED
        n_rejected = int(np.count_nonzero(status == SIMILAR))
        if n_rejected != scanned - selected:  # the shards and the driver must agree
            raise RuntimeError(
                f"distributed selection: {n_rejected} rows rejected for similarity, but "
                f"{scanned} scanned and {selected} selected"
            )
        stats.update(
            {
                "selected": int(selected),
                "scanned": scanned,
                "rejected_for_similarity": int(scanned - selected),
                "not_reached": int(stats["candidates"] - scanned),
                "band_checks": int(selector.band_checks),
                "rounds": int(rounds),
                "shard_screened": int(screened),
                "num_shards": int(self.num_shards),
                "shard_nodes": len({i["node_id"] for i in self.infos}),
                "load_s": round(self.load_s, 3),
                "select_s": round(time.perf_counter() - t0, 3),
            }
        )
        return SelectionResult(
            indices=indices.astype(np.int64),
            max_sim=np.concatenate(sims) if sims else np.empty(0, np.float32),
            stats=stats,
            ids=picks_ids,
            seq=acc_seq,
            scores=-neg,
            method="deita",
            row_status=status,
            rejected_by=rejected_by,
            rejected_sim=rejected_sim,
        )


def select_distributed(
    embed_dir: str | list[str],
    tau: float,
    budget: int,
    num_shards: int,
    block_size: int = 1024,
    device: str = "cpu",
    shard_num_cpus: float = 1.0,
    scheduling_strategy: str = "SPREAD",
    driver_device: str = "auto",
    explain: bool = True,
    score: str = "evol_score",
) -> SelectionResult:
    """Exact distributed selection over ``num_shards`` Ray actors (Ray must be initialised).

    One-shot form of :class:`ShardedPool` (load, :meth:`ShardedPool.select`, close); the
    arguments are those of the two.
    """
    with ShardedPool(
        embed_dir, num_shards, device, shard_num_cpus, scheduling_strategy, score
    ) as pool:
        return pool.select(tau, budget, block_size, driver_device, explain)

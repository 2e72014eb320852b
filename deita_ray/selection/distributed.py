"""Exact distributed selection over shard actors (SPEC section 4, the frontier algorithm).

The pool (ids, scores, embeddings) is split into ``P`` contiguous row ranges of the embedder's
Parquet output; each :class:`SelectShard` actor reads its own range, drops non-candidates,
normalises and sorts its rows by ``(-score, seq)``. The driver only ever holds the accepted set
(ids and unit vectors of the accepted rows) and the small survivor lists of a round.

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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deita_ray.data.sink import parquet_files
from deita_ray.selection.greedy import (
    GreedySelector,
    SelectionResult,
    candidate_order,
    normalize_rows,
    resolve_device,
    valid_rows,
)
from deita_ray.selection.score_expr import parse as parse_score

EMBED_COLUMNS = ("id", "seq", "evol_score", "embedding")

Piece = tuple[str, int, int]
"""(parquet file, first row, end row) within that file."""


def plan_shards(files: list[str], num_shards: int) -> tuple[list[list[Piece]], int]:
    """Split the concatenated rows of ``files`` into ``num_shards`` contiguous ranges.

    Only Parquet footers are read. Global row position = offset in the concatenation of the
    files in the given order (what :attr:`SelectionResult.indices` refers to).

    Returns:
        (pieces per shard, total rows).
    """
    counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
    total = int(sum(counts))
    bounds = [total * s // num_shards for s in range(num_shards + 1)]
    plans: list[list[Piece]] = []
    for s in range(num_shards):
        lo, hi = bounds[s], bounds[s + 1]
        pieces, off = [], 0
        for f, c in zip(files, counts, strict=True):
            a, b = max(lo, off), min(hi, off + c)
            if a < b:
                pieces.append((f, a - off, b - off))
            off += c
        plans.append(pieces)
    return plans, total


def embedding_matrix(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A fixed_size_list<float32|float16>[d] column as an ``[n, d]`` float32 matrix.

    Returns:
        (matrix, null mask); null rows come back as NaN rows (so they are invalid).
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_fixed_size_list(arr.type):
        arr = arr.cast(pa.list_(arr.type.value_type, len(arr[0]) if len(arr) else 0))
    d = arr.type.list_size
    # Child values of a fixed-size list exist for null slots too; slice by the array offset.
    values = arr.values.slice(arr.offset * d, len(arr) * d)
    mat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(arr), d)
    nulls = arr.is_null().to_numpy(zero_copy_only=False)
    if nulls.any():
        mat = mat.copy()
        mat[nulls] = np.nan
    return mat, nulls


def iter_pieces(pieces: list[Piece], columns: tuple[str, ...] = EMBED_COLUMNS):
    """Yield the rows of row ranges of Parquet files, one row group (slice) at a time."""
    for path, a, b in pieces:
        pf = pq.ParquetFile(path)
        start = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            lo, hi = max(a, start), min(b, start + n)
            if lo < hi:
                t = pf.read_row_group(g, columns=list(columns))
                yield t.slice(lo - start, hi - lo)
            start += n


@dataclass
class PoolArrays:
    """Embedder output as arrays (ids, seq, scores, float32 embeddings)."""

    ids: list[str]
    seq: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray


def load_pool(pieces: list[Piece], score: str = "evol_score") -> PoolArrays:
    """Read (ids, seq, selection score, embedding) of row ranges into arrays (nulls -> NaN).

    Row group by row group into preallocated arrays, so the peak memory is the float32
    matrix plus one row group (not twice the pool).

    Args:
        pieces: row ranges of the embed output's files.
        score: the selection score, a column or an expression over columns
            (:mod:`deita_ray.selection.score_expr`; ``select.score``).
    """
    expr = parse_score(score)
    columns = tuple(dict.fromkeys(("id", "seq", "embedding", *expr.names)))
    n = sum(b - a for _, a, b in pieces)
    ids: list[str] = []
    seq = np.empty(n, np.int64)
    scores = np.empty(n, np.float64)
    emb: np.ndarray | None = None
    at = 0
    for t in iter_pieces(pieces, columns):
        m = t.num_rows
        mat, _ = embedding_matrix(t["embedding"])
        if emb is None:
            emb = np.empty((n, mat.shape[1]), np.float32)
        emb[at : at + m] = mat
        ids.extend(t["id"].to_pylist())
        seq[at : at + m] = t["seq"].cast(pa.int64()).to_numpy(zero_copy_only=False)
        scores[at : at + m] = expr.evaluate({n: t[n] for n in expr.names})
        at += m
    if emb is None:
        emb = np.empty((0, 0), np.float32)
    return PoolArrays(ids=ids, seq=seq, scores=scores, embeddings=emb)


class SelectShard:
    """One shard of the pool: reads its rows, screens candidates against the accepted set.

    Wrapped with ``ray.remote`` by :class:`ShardedPool`; a plain object otherwise (tests
    of the logic can run it in-process).

    Args:
        pieces: the row ranges this shard owns.
        offset: global position of the shard's first row.
        device: as for :class:`~deita_ray.selection.greedy.GreedySelector`.

    Call :meth:`reset` before each selection.
    """

    def __init__(
        self, pieces: list[Piece], offset: int, device: str = "cpu", score: str = "evol_score"
    ):
        t0 = time.perf_counter()
        pool = load_pool(pieces, score)
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
        self.device = resolve_device(device)
        self.cursor = 0
        self.selector: GreedySelector | None = None
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
        self.selector = GreedySelector(max(self.dim, 1), tau, max(budget, 0), self.device)

    def info(self) -> dict[str, Any]:
        """Pool statistics of this shard, the embedding dimension and the Ray node it runs on."""
        node = None
        try:
            import ray  # noqa: PLC0415

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except ImportError:  # pragma: no cover
            pass
        return {**self.stats, "dim": int(self.dim), "node_id": node}

    def next_round(self, delta: np.ndarray | None, k: int) -> dict[str, Any]:
        """Add the driver's newly accepted rows, then screen the next ``k`` candidates.

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
        keep, _ = self.selector.screen(x)
        sel = np.flatnonzero(keep)
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
        score: the selection score (a column or expression, as for :func:`load_pool`).
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
        self, tau: float, budget: int, block_size: int = 1024, driver_device: str = "auto"
    ) -> SelectionResult:
        """Run the exact frontier algorithm (module docstring) over the shards.

        Args:
            tau: cosine threshold.
            budget: number of rows to select.
            block_size: candidates each shard screens per round, and the driver's block size.
            driver_device: device of the driver's greedy over survivors.

        Returns:
            The selection; ``indices`` are global positions in the files' row order, ``stats``
            as for :func:`~deita_ray.selection.greedy.select_diverse` plus ``rounds``,
            ``shard_screened`` (rows the shards screened, over-scan included),
            ``shard_nodes`` and timings.
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
        last_taken: tuple[float, int] | None = None
        while not selector.full and (active or len(pend["neg"])):
            if active:
                # One broadcast of the rows accepted since the last round.
                delta = ray.put(selector.accepted[sent : selector.k].copy())
                sent = selector.k
                outs = ray.get(
                    [self.shards[i].next_round.remote(delta, block_size) for i in active]
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
                pos, ms, examined = selector.offer(pend["emb"][blk])
                chosen = blk[pos]
                picks_pos.append(pend["pos"][chosen])
                picks_ids.extend(pend["ids"][j] for j in chosen)
                picks_seq.append(pend["seq"][chosen])
                picks_neg.append(pend["neg"][chosen])
                sims.append(ms)
                if selector.full:
                    j = blk[examined - 1]
                    last_taken = (float(pend["neg"][j]), int(pend["seq"][j]))
                    break
            pend = {
                "neg": pend["neg"][rest],
                "seq": pend["seq"][rest],
                "ids": [pend["ids"][j] for j in rest],
                "pos": pend["pos"][rest],
                "emb": pend["emb"][rest],
            }
        if last_taken is not None:  # scanned = candidates up to the row that filled the budget
            scanned = int(sum(ray.get([sh.count_upto.remote(*last_taken) for sh in self.shards])))
        else:
            scanned = 0 if capacity == 0 else stats["candidates"]
        indices = np.concatenate(picks_pos) if picks_pos else np.empty(0, np.int64)
        selected = len(indices)
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
        neg = np.concatenate(picks_neg) if picks_neg else np.empty(0)
        return SelectionResult(
            indices=indices.astype(np.int64),
            max_sim=np.concatenate(sims) if sims else np.empty(0, np.float32),
            stats=stats,
            ids=picks_ids,
            seq=np.concatenate(picks_seq) if picks_seq else np.empty(0, np.int64),
            scores=-neg,
            method="deita",
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
    score: str = "evol_score",
) -> SelectionResult:
    """Exact distributed selection over ``num_shards`` Ray actors (Ray must be initialised).

    One-shot form of :class:`ShardedPool` (load, :meth:`ShardedPool.select`, close); the
    arguments are those of the two.
    """
    with ShardedPool(
        embed_dir, num_shards, device, shard_num_cpus, scheduling_strategy, score
    ) as pool:
        return pool.select(tau, budget, block_size, driver_device)

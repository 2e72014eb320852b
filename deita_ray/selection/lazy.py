"""Lazy selection: the exact greedy over a pool whose embeddings arrive in score order, chunk by
chunk, so that only the rows the greedy reads are embedded (docs/selection.md, "Lazy embedding").

Pure: arrays in, positions out; no Ray, no files, no models. The caller (the select stage under
``select.lazy_embed``, :mod:`deita_ray.stages.lazy_embed`) asks :class:`LazySelection` which
rows to embed next (:meth:`LazySelection.next_rows`, in candidate order: score descending, ties
by ``seq``), embeds them, and hands the vectors back (:meth:`LazySelection.feed`), until
:attr:`LazySelection.done`. :class:`ChunkSizer` sizes the chunks.

Exactness: the candidate order is :func:`~deita_ray.selection.greedy.candidate_order` over the
rows with a score, as the full method orders them; a row the embedder rejects (``empty_text``,
``zero_embedding``, ...) is *dropped*, as the full method never sees it (it is not in the
embed output), and a row whose vector is not finite is ``invalid_embedding``, as there. The
rows left are fed in order to the same :class:`~deita_ray.selection.greedy.IncrementalGreedy`
that :func:`~deita_ray.selection.greedy.select_diverse` runs, so picks, their order, and every
examined row's status, ``rejected_by`` and ``rejected_sim`` equal the full method's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from deita_ray.selection.greedy import (
    INVALID_EMBEDDING,
    MISSING_SCORE,
    NOT_REACHED,
    ROW_STATUS,
    IncrementalGreedy,
    SelectionResult,
    candidate_order,
    valid_rows,
)


@dataclass
class ChunkSizer:
    """How many rows to embed next: start small, grow geometrically, never far past the need.

    The need is predicted from the greedy's acceptance rate so far: to fill the remaining
    ``budget - selected`` slots it will read about ``(budget - selected) * examined /
    selected`` more rows (before any feedback: ``budget``, every row taken). The next chunk is
    that need minus the rows already embedded or in flight beyond what the greedy examined,
    clipped to ``[min_rows, max_rows]`` and to ``growth`` times the rows planned so far. The
    rate only falls as the accepted set grows, so the prediction errs short: near the end the
    chunks are small and little is embedded for nothing.

    Attributes:
        min_rows: smallest chunk (one batch per embed actor keeps them all busy).
        max_rows: largest chunk.
        growth: a chunk is at most this many times the rows planned before it.
        slack: the prediction is scaled by this (> 1 embeds a little ahead of the need).
    """

    min_rows: int = 64
    max_rows: int = 65536
    growth: float = 2.0
    slack: float = 1.0

    def next_size(self, budget: int, selected: int, examined: int, planned: int) -> int:
        """Rows of the next chunk.

        Args:
            budget: rows to select.
            selected: rows the greedy took so far.
            examined: rows the greedy examined so far (candidates fed and read).
            planned: rows handed out for embedding so far (examined ones included).
        """
        left = max(0, budget - selected)
        rate = selected / examined if examined and selected else 1.0
        need = examined + math.ceil(self.slack * left / max(rate, 1e-9))
        size = need - planned
        cap = max(self.min_rows, int(self.growth * planned)) if planned else self.max_rows
        return int(max(self.min_rows, min(size, cap, self.max_rows)))


class LazySelection:
    """The exact greedy over a pool, fed its embeddings chunk by chunk in candidate order.

    Args:
        scores: ``[n]`` selection scores (NaN: missing, not a candidate, never embedded).
        seq: ``[n]`` global input order (breaks score ties).
        tau, budget, block_size, device, explain: as for
            :func:`~deita_ray.selection.greedy.select_diverse` (``device`` resolved).
    """

    def __init__(
        self,
        scores: np.ndarray,
        seq: np.ndarray,
        tau: float,
        budget: int,
        block_size: int = 1024,
        device: str = "numpy",
        explain: bool = True,
    ):
        self.scores = np.asarray(scores, np.float64).reshape(-1)
        self.seq = np.asarray(seq, np.int64).reshape(-1)
        if len(self.seq) != len(self.scores):
            raise ValueError(f"{len(self.scores)} scores for {len(self.seq)} seq")
        self.n = len(self.scores)
        self.tau, self.block_size, self.device, self.explain = tau, block_size, device, explain
        self.missing = np.isnan(self.scores)
        self.order = candidate_order(self.scores, self.seq, ~self.missing)
        """Pool positions of the rows with a score, in candidate order (score desc, seq)."""
        self.budget = max(0, min(int(budget), len(self.order)))
        self.planned = 0
        """Rows of :attr:`order` handed out by :meth:`next_rows`."""
        self.received = 0
        """Rows of :attr:`order` whose embeddings (or rejection) came back through :meth:`feed`."""
        self.dropped = np.zeros(self.n, bool)
        """Rows the embedder rejected: not in the pool the greedy selects from."""
        self.invalid = np.zeros(self.n, bool)
        self.zero = np.zeros(self.n, bool)
        self.greedy: IncrementalGreedy | None = None
        self._fed: list[np.ndarray] = []  # pool positions of the rows fed, in order

    @property
    def selected(self) -> int:
        return self.greedy.selected if self.greedy is not None else 0

    @property
    def examined(self) -> int:
        """Candidates the greedy examined (rows it read, in order)."""
        return self.greedy.scanned if self.greedy is not None else 0

    @property
    def done(self) -> bool:
        """The budget is full, or every candidate came back: nothing more to embed."""
        full = self.greedy is not None and self.greedy.full
        return self.budget == 0 or full or self.received == len(self.order)

    def next_rows(self, size: int) -> np.ndarray:
        """Pool positions of the next ``size`` rows to embed (fewer at the end of the order)."""
        rows = self.order[self.planned : self.planned + max(0, int(size))]
        self.planned += len(rows)
        return rows

    def feed(self, rows: np.ndarray, embeddings: np.ndarray, rejected: np.ndarray | None) -> int:
        """The embeddings of the next rows handed out, in the order they were handed out.

        Args:
            rows: pool positions, the next ``len(rows)`` rows of :attr:`order` not yet fed.
            embeddings: ``[len(rows), d]`` their vectors (a rejected row's row is ignored).
            rejected: per row, the embedder rejected it (None: none was).

        Returns:
            Rows the greedy examined out of this chunk.
        """
        rows = np.asarray(rows, np.int64)
        want = self.order[self.received : self.received + len(rows)]
        if len(want) != len(rows) or not np.array_equal(want, rows):
            raise ValueError("feed: rows must be the next rows of the candidate order")
        self.received += len(rows)
        emb = np.asarray(embeddings)
        keep = np.ones(len(rows), bool) if rejected is None else ~np.asarray(rejected, bool)
        self.dropped[rows[~keep]] = True
        if not keep.any():
            return 0
        emb = emb[keep]
        rows = rows[keep]
        finite, zero = valid_rows(emb)
        self.invalid[rows[~finite]] = True
        self.zero[rows[finite & zero]] = True
        if self.greedy is None:
            self.greedy = IncrementalGreedy(
                emb.shape[1], self.tau, self.budget, self.block_size, self.device, self.explain
            )
        self._fed.append(rows[finite])
        return self.greedy.feed(emb[finite] if not finite.all() else emb)

    def drop(self, rows: np.ndarray) -> None:
        """Mark rows the embedder rejected that were not fed (e.g. known from an earlier run)."""
        self.dropped[np.asarray(rows, np.int64)] = True

    def result(self, ids: list[str] | None = None) -> SelectionResult:
        """The selection so far over the whole pool (positions as given to the constructor).

        ``row_status`` of a dropped row is meaningless (it is in no pool: leave it out of the
        decisions, see :attr:`dropped`); ``stats`` count the pool without the dropped rows;
        candidates never embedded count as candidates (``not_reached``).
        """
        n = self.n
        status = np.full(n, NOT_REACHED, np.int8)
        status[self.invalid] = INVALID_EMBEDDING
        status[self.missing] = MISSING_SCORE
        rejected_by = np.full(n, -1, np.int64) if self.explain else None
        rejected_sim = np.full(n, np.nan) if self.explain else None
        if self.greedy is not None:
            fed = np.concatenate(self._fed) if self._fed else np.empty(0, np.int64)
            indices, max_sim = fed[self.greedy.picks], self.greedy.max_sim
            self.greedy.explain_into(fed, status, rejected_by, rejected_sim)
        else:
            indices, max_sim = np.empty(0, np.int64), np.empty(0, np.float32)
        kept = ~self.dropped
        counts = np.bincount(status[kept], minlength=len(ROW_STATUS))
        candidates = int((kept & ~self.missing & ~self.invalid).sum())
        scanned = int(self.examined)
        stats = {
            "pool": int(kept.sum()),
            "candidates": candidates,
            "selected": int(len(indices)),
            "scanned": scanned,
            "rejected_for_similarity": scanned - int(len(indices)),
            "not_reached": candidates - scanned,
            "missing_score": int(counts[MISSING_SCORE]),
            "invalid_embedding": int(counts[INVALID_EMBEDDING]),
            "zero_vector": int((self.zero & kept).sum()),
            "band_checks": int(self.greedy.band_checks) if self.greedy is not None else 0,
            "embedder_rejected": int(self.dropped.sum()),
        }
        return SelectionResult(
            indices=indices.astype(np.int64),
            max_sim=max_sim,
            stats=stats,
            ids=[ids[i] for i in indices] if ids is not None else None,
            seq=self.seq[indices],
            scores=self.scores[indices],
            method="deita",
            row_status=status,
            rejected_by=rejected_by,
            rejected_sim=rejected_sim,
        )

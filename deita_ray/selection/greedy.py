"""Exact score-first, diversity-aware greedy selection (docs/selection.md): the blocked method.

Pure: arrays in, positions out. No Ray, no files, no models; torch is imported lazily and only
when a torch device is asked for (``device="numpy"`` never imports it).

The contract is the plain in-order greedy: walk the candidates by evol score descending (ties
by input order ``seq`` ascending), take a row iff its cosine to EVERY already-taken row is
``<= tau``, stop after ``budget`` rows. :func:`select_diverse` returns exactly that list, at
matrix-product speed: candidates come in blocks of ``B``; one product of the block against the
accepted set rejects most of them; the block's survivors are then resolved in order with the
block's own similarities (:data:`SUB_BLOCK` rows per Gram product; the in-order decisions are
computed as a vectorised fixed point, see :meth:`GreedySelector._resolve`).

Numerical policy (why every method returns the same ids):
    * Vectors are L2-normalised once per row by :func:`normalize_rows`, the norm accumulated
      in float64. The computation of a row depends on that row only, so every caller (this
      module, the distributed shards, the tests' oracle) gets bit-identical unit vectors, and
      no finite non-zero row overflows: a row whose float32 reciprocal norm would not be a
      normal float32 number (norm below ~8.5e-39 or above ~8.5e37, subnormal rows included)
      is divided by its norm in float64 instead.
    * The *canonical* cosine of two rows is the dot product of their float32 unit vectors,
      evaluated in float64 (each product of two float32 numbers is exact in float64; only the
      summation rounds, by at most ``d * 2**-53``) and clamped to ``[-1, 1]``. A row is rejected
      iff some canonical cosine is ``> tau``; a pair whose cosine equals ``tau`` is TAKEN.
      (Two float64 evaluations in different summation orders could only disagree on a pair
      within ``~d * 2**-53`` of tau; the tests build exact boundary pairs on purpose.)
    * Bulk cosines are float32 matrix products (BLAS, torch, GPU with TF32 off). Their error on
      unit vectors is below ``kernel_margin(d) ~ d * 2**-24``, whatever the summation order.
      A float32 value above ``tau + margin`` is a certain rejection, one below ``tau - margin``
      a certain pass; only values inside that band are recomputed canonically. Decisions are
      therefore those of the canonical cosine, independent of block size, device, matrix
      shapes and the number of shards.
    * Zero vectors stay zero after normalisation: their cosine to anything is 0 (never similar
      for ``tau >= 0``). They are candidates like any other row and are counted in
      ``stats["zero_vector"]``. Rows whose embedding has a NaN/inf are not candidates
      (``stats["invalid_embedding"]``), nor are rows whose score is NaN (``missing_score``).
    * ``max_sim`` reports the float32 kernel value (it may differ from another method's report
      in the last bits; the decisions do not).
    * Why a row was not picked (``SelectionResult.rejected_by`` / ``rejected_sim``): for a row
      rejected for similarity, the selected row with the largest canonical cosine among those
      selected before it (ties: the earliest selected) and that cosine. The float32 products
      only narrow the search (every entry within two kernel margins of a row's float32
      maximum is recomputed canonically), so the answer is the canonical one, the same in
      every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

NORMALIZE_CHUNK = 8192
"""Rows normalised at a time (bounds the float64 temporary)."""

SUB_BLOCK = 512
"""Survivors of a block resolved together with their own Gram matrix (one product per
sub-block: few large operations beat many small ones, notably on busy CPUs)."""

ROW_STATUS = (
    "selected",
    "similar_to_selected",
    "not_reached",
    "missing_score",
    "invalid_embedding",
)
"""What happened to each pool row (:attr:`SelectionResult.row_status` holds indices into it)."""
SELECTED, SIMILAR, NOT_REACHED, MISSING_SCORE, INVALID_EMBEDDING = range(len(ROW_STATUS))

ProductHook = Callable[[int, int], None]
"""Called with ``(rows, cols)`` of every similarity product a selector computes (each
``rows x d`` times ``d x cols``); benchmarks use it to replay the bare work."""


@dataclass
class SelectionResult:
    """What a selector returns: the picks in selection order plus pool statistics.

    Attributes:
        indices: int64 positions of the selected rows in the caller's arrays (for the
            distributed method: global positions in the shard plan's row order), in
            selection order.
        max_sim: float32, per selected row its largest cosine to the rows selected before it
            (NaN for the first pick and for methods that do not compare embeddings).
        stats: pool statistics: ``pool``, ``candidates``, ``selected``, ``scanned``,
            ``rejected_for_similarity``, ``not_reached``, ``missing_score``,
            ``invalid_embedding``, ``zero_vector`` (deita); baselines fill the keys they use.
        ids: ids of the selected rows, when the caller gave ids.
        seq: global input order of the selected rows, when known.
        scores: evol scores of the selected rows (NaN where unknown).
        method: the method that produced it.
        row_status: int8 per pool row (same positions as ``indices``), an index into
            :data:`ROW_STATUS` (deita only; None for the baselines).
        rejected_by: int64 per pool row: for a row rejected for similarity, the selection
            position (index into ``indices``) of the selected row it was too similar to, the
            one with the largest canonical cosine among the rows selected before it (ties: the
            earliest selected); -1 for every other row. None when not asked for.
        rejected_sim: float64 per pool row: that canonical cosine (NaN for every other row).
    """

    indices: np.ndarray
    max_sim: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)
    ids: list[str] | None = None
    seq: np.ndarray | None = None
    scores: np.ndarray | None = None
    method: str = "deita"
    row_status: np.ndarray | None = None
    rejected_by: np.ndarray | None = None
    rejected_sim: np.ndarray | None = None

    def __len__(self) -> int:
        return int(len(self.indices))


def kernel_margin(dim: int) -> float:
    """Upper bound on the error of a float32 dot product of two (near) unit vectors of ``dim``.

    The classic bound ``|fl(x.y) - x.y| <= gamma_d * sum|x_i y_i|`` with ``gamma_d ~ d * 2**-24``
    holds for any summation order (blocked, pairwise, split-K on a GPU); ``sum|x_i y_i| <= 1``
    for unit vectors. A little slack covers norms off 1 by a few ulps.
    """
    return 1.05 * (dim + 2) * 2.0**-24 + 1e-7


_F32 = np.finfo(np.float32)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows to float32 unit vectors; zero rows stay zero.

    The norm is accumulated in float64. A row is then scaled by the float32 reciprocal of its
    norm when that is a normal float32 number (nearly every row), else divided by its norm in
    float64 (tiny, subnormal or huge rows, whose reciprocal would overflow to inf or lose bits
    as a subnormal): every finite non-zero row becomes a unit vector. Every row is computed
    from that row alone, so the result is the same bits whichever rows are normalised
    together (and wherever they sit in memory). Non-finite rows yield non-finite output:
    filter them out first (see :func:`valid_rows`).
    """
    x = np.asarray(x)
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, x.shape[0], NORMALIZE_CHUNK):
        chunk = x[start : start + NORMALIZE_CHUNK]
        dst = out[start : start + NORMALIZE_CHUNK]
        norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk, dtype=np.float64))
        # Zero vectors stay zero: cosine 0 to everything.
        inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        with np.errstate(over="ignore"):
            inv32 = inv.astype(np.float32)
        slow = np.flatnonzero(
            (norms > 0) & np.isfinite(norms) & ~((inv32 >= _F32.tiny) & (inv32 <= _F32.max))
        )
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(chunk, inv32[:, None], out=dst)
        if len(slow):
            dst[slow] = chunk[slow].astype(np.float64) / norms[slow, None]
    return out


def valid_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (finite, zero) boolean masks over the rows of an embedding matrix.

    One cheap pass (row sums by a matrix-vector product: NaN/inf propagate, a zero row sums to
    0); only the rows it flags are checked element by element.
    """
    n = x.shape[0]
    finite = np.ones(n, dtype=bool)
    zero = np.zeros(n, dtype=bool)
    if n == 0:
        return finite, zero
    ones = np.ones(x.shape[1], dtype=x.dtype)
    for start in range(0, n, NORMALIZE_CHUNK):
        chunk = x[start : start + NORMALIZE_CHUNK]
        with np.errstate(over="ignore", invalid="ignore"):
            sums = chunk @ ones
        odd = np.flatnonzero(~np.isfinite(sums))  # non-finite, or finite values overflowing
        finite[start + odd] = np.isfinite(chunk[odd]).all(axis=1)
        maybe = np.flatnonzero(sums == 0)  # zero rows, or rows whose values cancel
        zero[start + maybe] = ~chunk[maybe].any(axis=1)
    return finite, zero


def candidate_order(scores: np.ndarray, seq: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Positions of the rows in ``mask``, by score descending, then ``seq`` ascending."""
    pos = np.flatnonzero(mask)
    keys = np.lexsort((np.asarray(seq)[pos], -np.asarray(scores, dtype=np.float64)[pos]))
    return pos[keys]


def canonical_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Canonical cosines of row pairs ``(a[i], b[i])`` of float32 unit vectors (see module doc)."""
    if a.shape[-1] <= np.getbufsize():
        # einsum casts each row to float64 in one buffer: the same sum, bit for bit, as on
        # float64 copies, without making them.
        c = np.einsum("ij,ij->i", a, b, dtype=np.float64)
    else:
        c = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))
    return np.clip(c, -1.0, 1.0)


def resolve_device(device: str = "auto") -> str:
    """Map a device name to ``"numpy"``, ``"cpu"`` (torch) or ``"cuda"`` (torch).

    ``auto``: cuda when torch sees a GPU, else numpy: on CPU, numpy's products beat torch's
    for this method (benchmarks/select.py times both, interleaved; results/select.json).
    """
    if device == "numpy":
        return "numpy"
    try:
        import torch  # noqa: PLC0415 - heavy, only when a torch path is asked for
    except ImportError:
        if device in ("auto", "cpu"):
            return "numpy"
        raise
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "numpy"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("select.device is 'cuda' but torch sees no GPU")
    return device


class _NumpyOps:
    """Matrix products on the host with numpy (BLAS)."""

    def __init__(self, capacity: int, dim: int):
        self.acc = np.empty((capacity, dim), dtype=np.float32)

    def resize(self, host: np.ndarray, k: int) -> None:
        self.acc = host  # the selector's host matrix is the accepted set itself

    def put(self, x: np.ndarray) -> np.ndarray:
        return x

    def append(self, k: int, x: np.ndarray) -> None:
        pass  # already written into the shared host matrix

    def screen(self, xd: np.ndarray, k: int) -> tuple[np.ndarray, Any]:
        s = xd @ self.acc[:k].T
        return s.max(axis=1), s

    def rows(self, s: Any, rows: np.ndarray) -> np.ndarray:
        return s[rows]

    def gram(self, xd: np.ndarray, rows: np.ndarray, extra: np.ndarray) -> np.ndarray:
        xs = xd[np.concatenate([rows, extra])] if len(extra) else xd[rows]
        return xs @ xs[: len(rows)].T

    def cross(self, xd: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, Any]:
        s = xd[rows] @ xd[cols].T
        return s.max(axis=1), s

    def near(self, s: Any, rows: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row in ``rows``, column) of the entries of ``s[rows]`` at or above their row's
        threshold."""
        return np.nonzero(s[rows] >= thr[:, None])


class _TorchOps:
    """Matrix products with torch on CPU or GPU (float32, TF32 off)."""

    def __init__(self, capacity: int, dim: int, device: str):
        import torch  # noqa: PLC0415 - heavy, only on this path

        self.torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # TF32 products would exceed kernel_margin: the float32 policy needs IEEE fp32.
            torch.backends.cuda.matmul.allow_tf32 = False
        self.acc = torch.empty((capacity, dim), dtype=torch.float32, device=self.device)

    def resize(self, host: np.ndarray, k: int) -> None:
        grown = self.torch.empty(host.shape, dtype=self.torch.float32, device=self.device)
        grown[:k] = self.acc[:k]
        self.acc = grown

    def put(self, x: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def append(self, k: int, x: np.ndarray) -> None:
        self.acc[k : k + len(x)] = self.put(x)

    def screen(self, xd: Any, k: int) -> tuple[np.ndarray, Any]:
        s = xd @ self.acc[:k].T
        return s.amax(dim=1).cpu().numpy(), s

    def rows(self, s: Any, rows: np.ndarray) -> np.ndarray:
        return s[self.torch.from_numpy(rows).to(self.device)].cpu().numpy()

    def gram(self, xd: Any, rows: np.ndarray, extra: np.ndarray) -> np.ndarray:
        both = np.concatenate([rows, extra]) if len(extra) else rows
        xs = xd[self.torch.from_numpy(both).to(self.device)]
        return (xs @ xs[: len(rows)].T).cpu().numpy()

    def cross(self, xd: Any, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, Any]:
        idx = self.torch.from_numpy
        s = xd[idx(rows).to(self.device)] @ xd[idx(cols).to(self.device)].T
        return s.amax(dim=1).cpu().numpy(), s

    def near(self, s: Any, rows: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        to = self.torch.from_numpy
        sub = s[to(rows).to(self.device)]
        nz = (sub >= to(thr).to(self.device)[:, None]).nonzero().cpu().numpy()
        return nz[:, 0], nz[:, 1]


def best_of(
    ri: np.ndarray, ci: np.ndarray, cos: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the largest of some canonical cosines and its column (ties: lowest column).

    Args:
        ri, ci: row and column of each computed cosine.
        cos: the canonical cosines.
        n: number of rows.

    Returns:
        (best cosine, its column) per row; ``-inf`` and -1 for rows with none.
    """
    best = np.full(n, -np.inf)
    col = np.full(n, -1, np.int64)
    if len(ri):
        order = np.lexsort((ci, -cos, ri))
        r = ri[order]
        first = order[np.concatenate([[True], r[1:] != r[:-1]])]
        best[ri[first]] = cos[first]
        col[ri[first]] = ci[first]
    return best, col


def near_width(dim: int) -> float:
    """How far below a row's float32 maximum its canonical maximum may lie: two kernel
    margins, plus slack for rounding the threshold to float32."""
    return 2 * kernel_margin(dim) + 2.0**-20


def canonical_best(
    xr: np.ndarray,
    sims: np.ndarray,
    others: np.ndarray,
    width: float,
    rowmax: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Canonical best match of each row of ``xr`` among ``others``, from float32 ``sims``.

    Only the entries within ``width`` (:func:`near_width`) of a row's float32 maximum can hold
    its canonical maximum; those are recomputed canonically.

    Args:
        xr: unit vectors (host), one per row of ``sims``.
        sims: their float32 cosines to ``others`` (host); ``-inf`` masks an entry out.
        others: unit vectors of the columns (host).
        width: see :func:`near_width`.
        rowmax: ``sims.max(axis=1)`` when the caller has it already.

    Returns:
        (largest canonical cosine, its column; ties: the lowest) per row, ``-inf`` / -1 for
        rows with no unmasked entry.
    """
    n = len(xr)
    if n == 0 or sims.shape[1] == 0:
        return np.full(n, -np.inf), np.full(n, -1, np.int64)
    rowmax = sims.max(axis=1) if rowmax is None else rowmax
    thr = (rowmax.astype(np.float64) - width).astype(np.float32)
    thr[rowmax == -np.inf] = np.inf  # nothing unmasked in that row
    ri, ci = np.nonzero(sims >= thr[:, None])
    return best_of(ri, ci, canonical_cosines(xr[ri], others[ci]), n)


def merge_best(
    best: np.ndarray, rank: np.ndarray, other: np.ndarray, other_rank: np.ndarray
) -> None:
    """Fold ``(other, other_rank)`` into ``(best, rank)`` in place: larger cosine wins, ties
    go to the earlier selected row (lower rank)."""
    take = (other > best) | ((other == best) & (other_rank >= 0) & (other_rank < rank))
    best[take] = other[take]
    rank[take] = other_rank[take]


class Screen(NamedTuple):
    """Candidates screened against the accepted set (:meth:`GreedySelector.screen`).

    ``survives``: no accepted row is within tau; ``rowmax``: float32 maximum cosine to the
    accepted set (-inf when empty); for the rows that do not survive (when asked for),
    ``best_sim`` / ``best_rank``: the largest canonical cosine to the accepted set and the
    accepted row's rank (ties: the lowest), ``-inf`` / -1 elsewhere.
    """

    survives: np.ndarray
    rowmax: np.ndarray
    best_sim: np.ndarray | None = None
    best_rank: np.ndarray | None = None


class Offer(NamedTuple):
    """A block offered to the in-order greedy (:meth:`GreedySelector.offer`).

    ``pos``: positions in the block of the accepted rows, in order; ``max_sim``: their float32
    max cosine to earlier picks (NaN for the very first pick); ``examined``: leading rows of
    the block examined (fewer than the block when the budget filled); ``rejected``: positions
    of the examined rows rejected for similarity; ``rejected_rank`` / ``rejected_sim``: the
    rank of the selected row each was too similar to and that canonical cosine (see
    :attr:`SelectionResult.rejected_by`), when asked for.
    """

    pos: np.ndarray
    max_sim: np.ndarray
    examined: int
    rejected: np.ndarray
    rejected_rank: np.ndarray | None = None
    rejected_sim: np.ndarray | None = None


class GreedySelector:
    """The accepted set of the greedy, and the two blocked operations on it.

    ``offer`` runs the exact in-order greedy over a block of candidates (already in global
    order, already normalised) against everything accepted so far; ``screen`` only rejects
    candidates against the accepted set (what the distributed shards do). Both follow the
    numerical policy of the module docstring. Accepted rows are kept in selection order: the
    rank of a selected row is its row in :attr:`accepted`.

    Args:
        dim: embedding dimension.
        tau: cosine threshold (a row is taken iff its cosine to every taken row is <= tau).
        capacity: most rows that will be accepted (the budget).
        device: ``"numpy"``, ``"cpu"`` or ``"cuda"`` (see :func:`resolve_device`).
        on_product: optional :data:`ProductHook`, called for every similarity product.
    """

    def __init__(
        self,
        dim: int,
        tau: float,
        capacity: int,
        device: str = "numpy",
        on_product: ProductHook | None = None,
    ):
        self.dim = dim
        self.tau = float(tau)
        self.margin = kernel_margin(dim)
        self.hi = self.tau + self.margin
        self.lo = self.tau - self.margin
        self.near_width = near_width(dim)
        self.capacity = int(capacity)
        self.k = 0
        self.device = device
        # Host copy of the accepted unit vectors (canonical re-checks, broadcasts to shards);
        # grown on demand so that a huge budget does not preallocate a huge matrix.
        self.accepted = np.empty((min(self.capacity, 1024), dim), dtype=np.float32)
        self.ops = _NumpyOps(0, dim) if device == "numpy" else _TorchOps(0, dim, device)
        self.ops.resize(self.accepted, 0)
        self.band_checks = 0
        self.on_product = on_product

    def _product(self, rows: int, cols: int) -> None:
        if self.on_product is not None:
            self.on_product(rows, cols)

    def _reserve(self, n: int) -> None:
        """Make room for ``n`` accepted rows."""
        if n <= self.accepted.shape[0]:
            return
        size = min(self.capacity, max(n, 2 * self.accepted.shape[0]))
        grown = np.empty((size, self.dim), dtype=np.float32)
        grown[: self.k] = self.accepted[: self.k]
        self.accepted = grown
        self.ops.resize(grown, self.k)

    @property
    def full(self) -> bool:
        return self.k >= self.capacity

    def add(self, x: np.ndarray) -> None:
        """Append rows to the accepted set without checks (shards mirroring the driver)."""
        n = min(len(x), self.capacity - self.k)
        if n <= 0:
            return
        self._reserve(self.k + n)
        self.accepted[self.k : self.k + n] = x[:n]
        self.ops.append(self.k, x[:n])
        self.k += n

    def _band_reject(
        self, x: np.ndarray, cand: np.ndarray, s_rows: np.ndarray, others: np.ndarray
    ) -> np.ndarray:
        """Canonical re-check of candidates whose float32 maximum lies in the band.

        Args:
            x: the block's unit vectors (host).
            cand: positions in ``x`` of the candidates to re-check.
            s_rows: their float32 similarities to ``others`` (len(cand) x len(others)).
            others: the unit vectors they were compared with (host).

        Returns:
            Boolean per candidate: rejected (some canonical cosine > tau).
        """
        ri, ci = np.nonzero(s_rows >= self.lo)
        self.band_checks += len(ri)
        exact = canonical_cosines(x[cand[ri]], others[ci])
        rejected = np.zeros(len(cand), dtype=bool)
        rejected[ri[exact > self.tau]] = True
        return rejected

    def best_match(
        self, xr: np.ndarray, sims: np.ndarray, others: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`canonical_best` with this selector's kernel margin."""
        return canonical_best(xr, sims, others, self.near_width)

    def screen(self, x: np.ndarray, xd: Any = None, explain: bool = False) -> Screen:
        """Reject candidates against the accepted set only.

        Args:
            x: block of unit vectors (host, float32), in global order.
            xd: the same block already on the device (optional).
            explain: also find, for each rejected row, its canonical best match.

        Returns:
            A :class:`Screen`.
        """
        n = len(x)
        if self.k == 0 or n == 0:
            none = np.full(n, -np.inf), np.full(n, -1, np.int64)
            return Screen(
                np.ones(n, dtype=bool),
                np.full(n, -np.inf, dtype=np.float32),
                *(none if explain else (None, None)),
            )
        xd = self.ops.put(x) if xd is None else xd
        rowmax, s = self.ops.screen(xd, self.k)
        self._product(n, self.k)
        survives = rowmax <= self.hi
        band = np.flatnonzero(survives & (rowmax >= self.lo))
        if len(band):
            rej = self._band_reject(x, band, self.ops.rows(s, band), self.accepted[: self.k])
            survives[band[rej]] = False
        if not explain:
            return Screen(survives, rowmax)
        best = np.full(n, -np.inf)
        rank = np.full(n, -1, np.int64)
        out = np.flatnonzero(~survives)
        if len(out):
            thr = (rowmax[out].astype(np.float64) - self.near_width).astype(np.float32)
            ri, ci = self.ops.near(s, out, thr)
            cos = canonical_cosines(x[out[ri]], self.accepted[ci])
            best[out], rank[out] = best_of(ri, ci, cos, len(out))
        return Screen(survives, rowmax, best, rank)

    def _resolve(self, x: np.ndarray, sub: np.ndarray, g: np.ndarray) -> np.ndarray:
        """In-order greedy among the rows ``sub`` of a block, from their Gram matrix ``g``.

        Vectorised: ``sim[i, j]`` (j < i) is the canonical "too similar" relation; each pass
        accepts every undecided row with no earlier row that is accepted or undecided and
        similar to it, and rejects every undecided row similar to an accepted one. The first
        undecided row is always decided, so this ends, and every decision is the one the
        sequential loop makes (by induction over the order). Passes = longest chain of
        similar rows (about 1-3 in practice).

        Returns:
            Boolean per row of ``sub``: accepted.
        """
        r = len(sub)
        lower = np.tri(r, k=-1, dtype=bool)
        sim = (g > self.hi) & lower
        bi, bj = np.nonzero((g >= self.lo) & (g <= self.hi) & lower)
        if len(bi):
            self.band_checks += len(bi)
            exact = canonical_cosines(x[sub[bi]], x[sub[bj]])
            sim[bi, bj] = exact > self.tau
        acc = np.zeros(r, dtype=bool)
        undecided = np.ones(r, dtype=bool)
        while undecided.any():
            blocked = (sim & (acc | undecided)[None, :]).any(axis=1)
            acc |= undecided & ~blocked
            rejected = undecided & (sim & acc[None, :]).any(axis=1)
            undecided &= ~(acc | rejected)
        return acc

    def offer(self, x: np.ndarray, explain: bool = False) -> Offer:
        """Run the exact greedy over a block of candidates in order, accepting into the set.

        The block is screened against the accepted set in one product; its survivors are then
        resolved with their own Gram matrix (in sub-blocks of :data:`SUB_BLOCK` rows, each
        first screened against the rows the block has taken so far).

        Args:
            x: block of unit vectors (host, float32), in global candidate order.
            explain: also find what each rejected row was too similar to (its canonical best
                match among the rows selected before it). The products the method computes
                anyway carry it: the screen for the rows selected before the block; for the
                block's own acceptances, the rows rejected before the Gram step ride along
                as extra rows of the sub-block's products (no extra product).

        Returns:
            An :class:`Offer`.
        """
        n = len(x)
        if n == 0 or self.full:
            e = np.empty(0, np.int64)
            return Offer(e, np.empty(0, np.float32), 0, e)
        k0 = self.k
        xd = self.ops.put(x)
        scr = self.screen(x, xd, explain)
        rowmax = scr.rowmax
        surv = np.flatnonzero(scr.survives)
        # Rows the screen rejected, in order: each rides along with the sub-block of survivors
        # its position falls in (explain only).
        passive = np.flatnonzero(~scr.survives) if explain else np.empty(0, np.int64)
        room = self.capacity - self.k
        hi, lo = self.hi, self.lo
        taken: list[np.ndarray] = []  # positions in x, in order
        sims: list[np.ndarray] = []
        n_taken = 0
        for s0 in range(0, len(surv), SUB_BLOCK):
            sub = surv[s0 : s0 + SUB_BLOCK]
            last = s0 + SUB_BLOCK >= len(surv)
            ride = passive[passive < (n if last else sub[-1] + 1)]
            passive = passive[len(ride) :]
            prev = np.full(len(sub), -np.inf, dtype=np.float32)
            if n_taken:  # screen against this block's earlier acceptances
                tk = np.concatenate(taken)
                both = np.concatenate([sub, ride])
                cmax, s = self.ops.cross(xd, both, tk)
                self._product(len(both), len(tk))
                prev = cmax[: len(sub)]
                ok = prev <= hi
                band = np.flatnonzero(ok & (prev >= lo))
                if len(band):
                    rej = self._band_reject(x, sub[band], self.ops.rows(s, band), x[tk])
                    ok[band[rej]] = False
                if explain:
                    # Every row of the sub-block and its riders: best match among ``tk``.
                    cb, cr = canonical_best(
                        x[both],
                        self.ops.rows(s, np.arange(len(both))),
                        x[tk],
                        self.near_width,
                        cmax,
                    )
                    cr = np.where(cr >= 0, k0 + cr, -1)
                    ride = np.concatenate([sub[~ok], ride])
                    r_sim = np.concatenate([cb[: len(sub)][~ok], cb[len(sub) :]])
                    r_rank = np.concatenate([cr[: len(sub)][~ok], cr[len(sub) :]])
                    k_sim, k_rank = cb[: len(sub)][ok], cr[: len(sub)][ok]
                sub, prev = sub[ok], prev[ok]
            elif explain:
                r_sim, r_rank = np.full(len(ride), -np.inf), np.full(len(ride), -1, np.int64)
                k_sim, k_rank = np.full(len(sub), -np.inf), np.full(len(sub), -1, np.int64)
            if len(sub) == 0:
                if explain:
                    self._explain_set(scr, ride, r_sim, r_rank)
                continue
            if len(sub) > 1 or len(ride):
                g = self.ops.gram(xd, sub, ride)  # (sub + riders) x sub
                self._product(len(sub) + len(ride), len(sub))
            else:
                g = np.ones((1, 1), np.float32)
            acc = self._resolve(x, sub, g[: len(sub)])
            # Max cosine of each accepted row to the block's earlier accepted rows.
            earlier = np.tri(len(sub), k=-1, dtype=bool) & acc[None, :]
            gm = np.where(earlier, g[: len(sub)], -np.inf).max(axis=1)
            best = np.maximum(np.maximum(rowmax[sub], prev), gm)[acc]
            if explain:
                # Rejected survivors and riders: best match among this sub-block's acceptances
                # that precede them, merged with the earlier ones.
                rows = np.concatenate([sub[~acc], ride])
                mask = acc[None, :] & (sub[None, :] < rows[:, None])
                f = np.where(mask, np.concatenate([g[: len(sub)][~acc], g[len(sub) :]]), -np.inf)
                b, c = canonical_best(x[rows], f, x[sub], self.near_width)
                rank_in = k0 + n_taken + np.cumsum(acc) - 1
                b0 = np.concatenate([k_sim[~acc], r_sim])
                r0 = np.concatenate([k_rank[~acc], r_rank])
                merge_best(b0, r0, b, np.where(c >= 0, rank_in[np.maximum(c, 0)], -1))
                self._explain_set(scr, rows, b0, r0)
            take = sub[acc][: room - n_taken]
            taken.append(take)
            sims.append(best[: len(take)])
            n_taken += len(take)
            if n_taken >= room:
                break
        pos = np.concatenate(taken) if taken else np.empty(0, np.int64)
        examined = int(pos[-1]) + 1 if n_taken >= room and len(pos) else n
        is_rej = np.ones(examined, dtype=bool)
        is_rej[pos] = False
        rejected = np.flatnonzero(is_rej)
        self.add(x[pos])
        ms = np.concatenate(sims).astype(np.float32) if sims else np.empty(0, np.float32)
        ms[ms == -np.inf] = np.nan
        if not explain:
            return Offer(pos.astype(np.int64), ms, examined, rejected)
        return Offer(
            pos.astype(np.int64),
            ms,
            examined,
            rejected,
            scr.best_rank[rejected],
            scr.best_sim[rejected],
        )

    @staticmethod
    def _explain_set(scr: Screen, rows: np.ndarray, sim: np.ndarray, rank: np.ndarray) -> None:
        """Fold in-block best matches of ``rows`` into the screen's (held in ``scr``)."""
        b, r = scr.best_sim[rows], scr.best_rank[rows]
        merge_best(b, r, sim, rank)
        scr.best_sim[rows], scr.best_rank[rows] = b, r


class IncrementalGreedy:
    """The exact greedy fed its candidates in order, a chunk at a time: one state, many feeds.

    The state is the accepted set (a :class:`GreedySelector`) plus what the greedy decided for
    every row it examined. :func:`select_diverse` feeds it the whole candidate order, block by
    block; the lazy method (:mod:`deita_ray.selection.lazy`) feeds each chunk as soon as it is
    embedded. Both run the same kernel (:meth:`GreedySelector.offer`) on the same rows in the
    same order, so the picks, their order and the explanations of every examined row
    (``rejected_by`` / ``rejected_sim``, canonical cosines) are identical whatever the chunk
    sizes; only ``max_sim`` (a float32 kernel value, see the module docstring) may differ in
    the last bits when the chunks cut the order elsewhere than ``block_size`` does.

    Positions are *candidate positions*: the k-th row ever fed is position k.

    Args:
        dim: embedding dimension.
        tau: cosine threshold.
        budget: most rows to accept (the capacity of the accepted set).
        block_size: rows per :meth:`GreedySelector.offer` (a chunk longer than this is
            offered in blocks).
        device: ``"numpy"``, ``"cpu"`` or ``"cuda"`` (already resolved, see
            :func:`resolve_device`).
        explain: also find what each rejected row was too similar to.
        on_product: optional :data:`ProductHook`.
    """

    def __init__(
        self,
        dim: int,
        tau: float,
        budget: int,
        block_size: int = 1024,
        device: str = "numpy",
        explain: bool = True,
        on_product: ProductHook | None = None,
    ):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.selector = GreedySelector(dim, tau, max(0, int(budget)), device, on_product)
        self.block_size = int(block_size)
        self.explain = explain
        self.fed = 0
        """Rows fed so far (examined or not)."""
        self.scanned = 0
        """Rows examined so far: every row fed, except those fed after the budget filled."""
        self._picks: list[np.ndarray] = []
        self._sims: list[np.ndarray] = []
        self._rejected: list[np.ndarray] = []
        self._rank: list[np.ndarray] = []
        self._sim: list[np.ndarray] = []

    @property
    def full(self) -> bool:
        """The budget is full: no row fed from now on is examined."""
        return self.selector.full

    @property
    def selected(self) -> int:
        return self.selector.k

    @property
    def band_checks(self) -> int:
        return self.selector.band_checks

    def feed(self, x: np.ndarray) -> int:
        """Run the greedy over the next rows of the candidate order.

        Args:
            x: ``[r, d]`` finite embeddings (any float dtype, not necessarily normalised) of
                the next ``r`` candidates, in candidate order.

        Returns:
            How many of them were examined (fewer than ``r`` only when the budget filled).
        """
        base = self.fed
        self.fed += len(x)
        if self.full:
            return 0
        seen = 0
        for start in range(0, len(x), self.block_size):
            if self.full:
                break
            res = self.selector.offer(
                normalize_rows(x[start : start + self.block_size]), self.explain
            )
            at = base + start
            self._picks.append(at + res.pos)
            self._sims.append(res.max_sim)
            self._rejected.append(at + res.rejected)
            if self.explain:
                self._rank.append(res.rejected_rank)
                self._sim.append(res.rejected_sim)
            seen = start + res.examined
        self.scanned = base + seen
        return seen

    @staticmethod
    def _cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)

    @property
    def picks(self) -> np.ndarray:
        """Candidate positions of the accepted rows, in selection order."""
        return self._cat(self._picks, np.int64)

    @property
    def max_sim(self) -> np.ndarray:
        """Per accepted row its float32 max cosine to the rows accepted before it (NaN first)."""
        return self._cat(self._sims, np.float32)

    @property
    def rejected(self) -> np.ndarray:
        """Candidate positions of the rows rejected for similarity."""
        return self._cat(self._rejected, np.int64)

    def explain_into(
        self,
        rows: np.ndarray,
        status: np.ndarray,
        rejected_by: np.ndarray | None,
        rejected_sim: np.ndarray | None,
    ) -> None:
        """Write the decisions into per-pool-row arrays (see :class:`SelectionResult`).

        Args:
            rows: pool position of each candidate position fed (``rows[k]``: the k-th row fed).
            status: set to ``SELECTED`` / ``SIMILAR`` for the examined rows (others untouched).
            rejected_by, rejected_sim: filled for the rejected rows when not None (and the
                greedy explains).
        """
        status[rows[self.picks]] = SELECTED
        rej = rows[self.rejected]
        status[rej] = SIMILAR
        if self.explain and rejected_by is not None:
            rejected_by[rej] = self._cat(self._rank, np.int64)
        if self.explain and rejected_sim is not None:
            rejected_sim[rej] = self._cat(self._sim, np.float64)


def select_diverse(
    embeddings: np.ndarray,
    scores: np.ndarray,
    tau: float,
    budget: int,
    seq: np.ndarray | None = None,
    ids: list[str] | None = None,
    block_size: int = 1024,
    device: str = "auto",
    explain: bool = True,
    on_product: ProductHook | None = None,
) -> SelectionResult:
    """Exact score-first, diversity-aware greedy selection (docs/selection.md).

    Args:
        embeddings: ``[n, d]`` float32 (or float16) embeddings, not necessarily normalised.
        scores: ``[n]`` evol scores; NaN means missing (the row is not a candidate).
        tau: cosine threshold; a row is taken iff its cosine to every taken row is <= tau.
        budget: number of rows to select (m); fewer when the pool runs out.
        seq: ``[n]`` global input order used to break score ties (default: position).
        ids: optional row ids, returned for the selected rows.
        block_size: candidates per matrix product (any value >= 1 gives the same ids).
        device: ``"auto"``, ``"cpu"``/``"cuda"`` (torch) or ``"numpy"``.
        explain: fill :attr:`SelectionResult.rejected_by` / ``rejected_sim`` (what each
            rejected row was too similar to); ``row_status`` is always filled.
        on_product: optional :data:`ProductHook` (benchmarks).

    Returns:
        The selection in order, with per-pick max cosine to earlier picks, what happened to
        every row, and pool statistics.

    Example:
        >>> emb = np.array([[1, 0], [1, 0.01], [0, 1]], np.float32)
        >>> r = select_diverse(emb, np.array([3.0, 2.0, 1.0]), tau=0.9, budget=2, device="numpy")
        >>> r.indices.tolist(), r.rejected_by.tolist()
        ([0, 2], [-1, 0, -1])
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got shape {emb.shape}")
    n, dim = emb.shape
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != n:
        raise ValueError(f"{len(scores)} scores for {n} embeddings")
    seq = np.arange(n, dtype=np.int64) if seq is None else np.asarray(seq, dtype=np.int64)
    finite, zero = valid_rows(emb)
    missing = np.isnan(scores)
    cand_mask = ~missing & finite
    order = candidate_order(scores, seq, cand_mask)
    capacity = max(0, min(int(budget), len(order)))
    greedy = IncrementalGreedy(
        dim, tau, capacity, block_size, resolve_device(device), explain, on_product
    )
    for start in range(0, len(order), block_size):
        if greedy.full:
            break
        greedy.feed(emb[order[start : start + block_size]])
    status = np.full(n, NOT_REACHED, np.int8)
    status[~finite] = INVALID_EMBEDDING
    status[missing] = MISSING_SCORE
    rejected_by = np.full(n, -1, np.int64) if explain else None
    rejected_sim = np.full(n, np.nan) if explain else None
    indices, max_sim, scanned = order[greedy.picks], greedy.max_sim, greedy.scanned
    greedy.explain_into(order, status, rejected_by, rejected_sim)
    stats = {
        "pool": int(n),
        "candidates": int(len(order)),
        "selected": int(len(indices)),
        "scanned": int(scanned),
        "rejected_for_similarity": int(scanned - len(indices)),
        "not_reached": int(len(order) - scanned),
        "missing_score": int(missing.sum()),
        "invalid_embedding": int((~finite & ~missing).sum()),
        "zero_vector": int((zero & cand_mask).sum()),
        "band_checks": int(greedy.band_checks),
    }
    return SelectionResult(
        indices=indices.astype(np.int64),
        max_sim=max_sim,
        stats=stats,
        ids=[ids[i] for i in indices] if ids is not None else None,
        seq=seq[indices],
        scores=scores[indices],
        method="deita",
        row_status=status,
        rejected_by=rejected_by,
        rejected_sim=rejected_sim,
    )

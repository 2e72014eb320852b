"""Loading the selection pool: the embedder's Parquet output as arrays, whole or in row ranges.

The one place both selection paths read their input: the single-node select stage loads the
whole pool (:func:`load_embed_pool`), and each shard actor of the distributed method loads its
own row range (:func:`plan_shards` + :func:`load_pool`). Only the columns the selector needs
are read (``id``, ``seq``, ``evol_score``, ``embedding``), row group by row group.

``seq`` (the global input order from ingest) breaks score ties, and the distributed method
uses ``(-score, seq)`` as a total order across shards: it must be unique. :func:`load_pool`
fails on a duplicate within what it loads; the distributed driver checks across shards with
:func:`first_shared_seq`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

EMBED_COLUMNS = ("id", "seq", "evol_score", "embedding")

Piece = tuple[str, int, int]
"""(parquet file, first row, end row) within that file."""


class DuplicateSeqError(ValueError):
    """Two rows of the selection pool share a ``seq`` (the input order must be unique)."""


def plan_shards(files: list[str], num_shards: int) -> tuple[list[list[Piece]], int]:
    """Split the concatenated rows of ``files`` into ``num_shards`` contiguous ranges.

    Only Parquet footers are read. Global row position = offset in the concatenation of the
    files in the given order (what :attr:`~deita_ray.selection.greedy.SelectionResult.indices`
    refers to).

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


def iter_pieces(
    pieces: list[Piece], columns: tuple[str, ...] = EMBED_COLUMNS
) -> Iterator[pa.Table]:
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


def check_unique_seq(seq: np.ndarray, ids: list[str], where: str = "the pool") -> None:
    """Raise :class:`DuplicateSeqError` naming a duplicated ``seq`` and two of its ids."""
    if len(seq) < 2:
        return
    order = np.argsort(seq, kind="stable")
    same = np.flatnonzero(seq[order][1:] == seq[order][:-1])
    if len(same):
        i, j = order[same[0]], order[same[0] + 1]
        raise duplicate_seq_error(int(seq[i]), where, (ids[i], ids[j]))


def first_shared_seq(parts: list[np.ndarray]) -> tuple[int, int, int] | None:
    """The first ``(part a, part b, seq)`` with a ``seq`` in two of the ``parts``, or None.

    Args:
        parts: one sorted, duplicate-free ``seq`` array per shard (None: skip that shard).
    """
    for a in range(len(parts)):
        for b in range(a + 1, len(parts)):
            x, y = parts[a], parts[b]
            if x is None or y is None or not len(x) or not len(y):
                continue
            if x[-1] < y[0] or y[-1] < x[0]:
                continue
            common = np.intersect1d(x, y, assume_unique=True)
            if len(common):
                return a, b, int(common[0])
    return None


def duplicate_seq_error(seq: int, where: str, ids: tuple[str, str]) -> DuplicateSeqError:
    """The error for a ``seq`` held by two rows (``where``: which rows, for the message)."""
    return DuplicateSeqError(
        f"select: seq must be unique (the input order ingest assigns); seq {seq} appears "
        f"twice ({where}: ids {ids[0]!r} and {ids[1]!r}); re-run ingest/score/embed into a "
        "fresh output dir"
    )


def load_pool(pieces: list[Piece], check_seq: bool = True, score: str = "evol_score") -> PoolArrays:
    """Read (ids, seq, selection score, embedding) of row ranges into arrays (nulls -> NaN).

    Row group by row group into preallocated arrays, so the peak memory is the float32
    matrix plus one row group (not twice the pool).

    Args:
        pieces: the row ranges to read.
        check_seq: fail with :class:`DuplicateSeqError` when a ``seq`` repeats.
        score: the selection score, a column or an expression over columns
            (:mod:`deita_ray.selection.score_expr`; ``select.score``).
    """
    from deita_ray.selection.score_expr import parse as parse_score

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
        scores[at : at + m] = expr.evaluate({c: t[c] for c in expr.names})
        at += m
    if emb is None:
        emb = np.empty((0, 0), np.float32)
    if check_seq:
        where = pieces[0][0] if len(pieces) == 1 else f"{len(pieces)} file ranges"
        check_unique_seq(seq, ids, where)
    return PoolArrays(ids=ids, seq=seq, scores=scores, embeddings=emb)


def load_embed_pool(files: list[str]) -> PoolArrays:
    """The whole pool of the embedder's Parquet ``files`` (in this order), ``seq`` checked."""
    plans, _ = plan_shards(files, 1)
    return load_pool(plans[0])

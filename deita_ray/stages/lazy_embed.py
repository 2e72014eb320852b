"""Lazy embedding: the select stage embeds only the rows the greedy reads (``select.lazy_embed``;
docs/selection.md, "Lazy embedding").

Stage layout under ``select.lazy_embed: true``:

- the ``embed`` stage embeds nothing: it returns at once with ``rows_in = rows_out = 0`` and
  ``metrics.deferred_to = "select"`` (:func:`deita_ray.stages.embed.deferred_result`);
- the ``select`` stage (method ``deita``) calls :func:`select_lazily`: it reads the scored pool
  (``<out>/score``, else ``<out>/ingest``: the columns the embedder needs plus those of
  ``select.score``), orders it as the full method does (score descending, ties by ``seq``;
  rows without a score are no candidates and are never embedded), then embeds it chunk by
  chunk in that order in an actor pool of the embed stage's own :class:`Embedder` (same model,
  rendering, pooling, normalisation and rejects, sized by ``embed.resources``), feeds each
  chunk to the exact greedy (:class:`~deita_ray.selection.lazy.LazySelection`) and stops when
  the budget is full. One chunk is always in flight while the greedy reads the one before;
  chunk sizes follow :class:`~deita_ray.selection.lazy.ChunkSizer` (the first = the budget,
  then what the acceptance rate predicts, at least one batch per actor, at most double the
  rows planned so far).
- Each chunk's rows are written as they arrive to ``<out>/embed/part-lazy-*.parquet`` and the
  embedder's rejects to ``<out>/rejects/embed/``, with the embed stage's columns: the embed
  folder holds the rows embedded so far (every row the greedy examined, plus the unread tail
  of the last chunk). It is a cache keyed by the embed stage's hash: a re-run of select (a
  resume after an interruption, or another tau or budget) reads the rows already there instead
  of embedding them again, and replays the greedy over them (recomputing its state is cheap;
  nothing is pickled); a change of the embed config re-runs the embed stage, which clears it.

Accounting (select): ``rows_in`` = rows of the scored pool (its Parquet footers); ``rows_out``
= selected; ``rejected_by_reason`` = the embedder's rejects the run met (in ``rejects/embed``;
the full method never sees them either: they are not in its pool); ``not_selected_by_reason``
as in the full method, where a row never embedded is ``not_reached``. The embed stage's failure
budget applies to the rows embedded, chunk after chunk.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deita_ray.accounting import StageCounts, over_budget
from deita_ray.config import PipelineConfig
from deita_ray.data.rejects import REASON
from deita_ray.data.sink import SplitParquetSink, parquet_files, rejects_dir, stage_dir
from deita_ray.selection.greedy import SelectionResult, resolve_device
from deita_ray.selection.lazy import ChunkSizer, LazySelection
from deita_ray.selection.pool import check_unique_seq, embedding_matrix
from deita_ray.selection.score_expr import parse as parse_score
from deita_ray.stages.embed import EMBEDDING, Embedder, embed_source, score_carry_columns

log = logging.getLogger("deita_ray")

EMBED = "embed"
PART_PREFIX = "part-lazy-"
MAX_CHUNK_ROWS = 65536
"""Largest chunk (rows): bounds the text and vectors of one chunk in flight."""


class _EmbedWorker:
    """An embed actor: the embed stage's :class:`Embedder`, called on one batch at a time."""

    def __init__(self, **kwargs: Any):
        self.embedder = Embedder(**kwargs)

    def embed(self, batch: pa.Table) -> pa.Table:
        return self.embedder(batch)


class EmbedActors:
    """``embed.resources.concurrency`` embed actors, started on first use, fed batches of
    ``embed.resources.batch_size`` rows round robin (each actor runs its queue in order).

    A lost actor is restarted (model reloaded) and its unfinished batches retried: only they
    are embedded again.
    """

    MAX_RESTARTS = 3

    def __init__(self, cfg: PipelineConfig, carry: list[str]):
        self.cfg, self.carry = cfg, carry
        self.actors: list[Any] = []
        self.batch_size = int(cfg.embed.resources.batch_size)
        self.size = int(cfg.embed.resources.concurrency)
        self._next = 0
        self.started_s: float | None = None

    def start(self) -> None:
        import ray  # noqa: PLC0415

        from deita_ray.models.embedding_spec import resolve_embedding_spec  # noqa: PLC0415
        from deita_ray.models.registry import resolve_model_path  # noqa: PLC0415
        from deita_ray.runtime import map_batches_kwargs  # noqa: PLC0415

        t0 = time.perf_counter()
        model_cfg = self.cfg.embed.model
        path = resolve_model_path(model_cfg.path, self.cfg.cache_dir)
        kw = map_batches_kwargs(self.cfg.embed.resources, model_cfg)
        opts: dict[str, Any] = {
            "num_cpus": kw["num_cpus"],
            "num_gpus": kw["num_gpus"],
            "max_restarts": self.MAX_RESTARTS,
            "max_task_retries": self.MAX_RESTARTS,
        }
        if kw.get("resources"):
            opts["resources"] = kw["resources"]
        worker = ray.remote(_EmbedWorker).options(**opts)
        ctor = {
            "model_cfg": model_cfg,
            "model_path": path,
            "max_length": self.cfg.embed.max_length,
            "dtype": self.cfg.output.embedding_dtype,
            "carry": self.carry,
            "spec": resolve_embedding_spec(self.cfg.embed, path),
        }
        self.actors = [worker.remote(**ctor) for _ in range(self.size)]
        self.started_s = time.perf_counter() - t0

    def submit(self, table: pa.Table) -> list[Any]:
        """Object refs of the embedded batches of ``table``, in row order."""
        if not self.actors:
            self.start()
        refs = []
        for start in range(0, table.num_rows, self.batch_size):
            actor = self.actors[self._next % len(self.actors)]
            self._next += 1
            refs.append(actor.embed.remote(table.slice(start, self.batch_size)))
        return refs

    def close(self, refs: list[Any] = ()) -> None:
        """Cancel ``refs`` (a chunk the greedy no longer needs: not retried) and kill the
        actors."""
        import ray  # noqa: PLC0415

        for ref in refs:
            # Finished or already gone: nothing to cancel.
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


@dataclass
class EmbedCache:
    """The rows ``<out>/embed`` and ``<out>/rejects/embed`` already hold (earlier runs)."""

    seq: np.ndarray  # sorted
    vectors: np.ndarray  # [len(seq), d] float32, rows by ``seq``
    reject_seq: np.ndarray  # sorted
    reject_reason: np.ndarray  # object, by ``reject_seq``

    @classmethod
    def read(cls, out_dir: str) -> EmbedCache:
        seqs, mats = [], []
        for f in parquet_files(stage_dir(out_dir, EMBED)):
            t = pq.read_table(f, columns=["seq", EMBEDDING])
            seqs.append(t["seq"].cast(pa.int64()).to_numpy(zero_copy_only=False))
            mats.append(embedding_matrix(t[EMBEDDING])[0])
        rseq, reasons = [], []
        for f in parquet_files(rejects_dir(out_dir, EMBED)):
            t = pq.read_table(f, columns=["seq", "reason"])
            rseq.append(t["seq"].cast(pa.int64()).to_numpy(zero_copy_only=False))
            reasons.extend(t["reason"].to_pylist())
        seq = np.concatenate(seqs) if seqs else np.empty(0, np.int64)
        vec = np.concatenate(mats) if mats else np.empty((0, 0), np.float32)
        order = np.argsort(seq, kind="stable")
        r = np.concatenate(rseq) if rseq else np.empty(0, np.int64)
        rorder = np.argsort(r, kind="stable")
        return cls(seq[order], vec[order], r[rorder], np.asarray(reasons, dtype=object)[rorder])

    def __len__(self) -> int:
        return len(self.seq) + len(self.reject_seq)

    @staticmethod
    def _find(keys: np.ndarray, seq: np.ndarray) -> np.ndarray:
        """Index into ``keys`` of each of ``seq``, -1 where absent."""
        if not len(keys):
            return np.full(len(seq), -1, np.int64)
        at = np.clip(np.searchsorted(keys, seq), 0, len(keys) - 1)
        return np.where(keys[at] == seq, at, -1)

    def lookup(self, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index into :attr:`vectors`, index into the rejects) per ``seq``; -1 where absent."""
        return self._find(self.seq, seq), self._find(self.reject_seq, seq)


@dataclass
class Chunk:
    """One chunk in flight: the pool rows, which come from the cache, the refs of the rest."""

    first: int  # position in the candidate order of its first row
    rows: np.ndarray  # pool positions, in candidate order
    hit: np.ndarray  # index into the cache's vectors, -1: none
    hit_reject: np.ndarray  # index into the cache's rejects, -1: none
    new: np.ndarray  # positions in ``rows`` embedded now
    refs: list[Any] = field(default_factory=list)


@dataclass
class LazyStats:
    embedded: int = 0
    reused: int = 0
    chunks: list[int] = field(default_factory=list)
    wait_s: float = 0.0
    greedy_s: float = 0.0
    write_s: float = 0.0
    rejects: Counter = field(default_factory=Counter)


def _read_text_pool(
    files: list[str], columns: list[str], where: str
) -> tuple[pa.Table, list[str], np.ndarray]:
    parts = []
    for f in files:
        names = pq.ParquetFile(f).schema_arrow.names
        parts.append(pq.read_table(f, columns=[c for c in columns if c in names]))
    table = pa.concat_tables(parts, promote_options="default")
    ids = table["id"].to_pylist()
    seq = table["seq"].cast(pa.int64()).to_numpy(zero_copy_only=False)
    check_unique_seq(seq, ids, where)
    return table, ids, seq


def select_lazily(cfg: PipelineConfig, out_dir: str) -> tuple[SelectionResult, dict[str, Any]]:
    """The select stage's ``deita`` method under ``select.lazy_embed`` (Ray initialised).

    Returns:
        The selection over the scored pool's rows (positions in its file order) and the run
        facts for the select stage: ``ids`` / ``seq`` / ``scores`` (every pool row),
        ``dropped`` (rows the embedder rejected: left out of the decisions), ``rows_in``,
        ``rejected_by_reason``, ``lazy_embed`` (the metrics) and, when ``select.calibrate``,
        ``examined`` = (scores, embeddings, seq) of the rows the greedy read.
    """
    sc = cfg.select
    t0 = time.perf_counter()
    src = embed_source(out_dir)
    files = parquet_files(src)
    if not files:
        raise FileNotFoundError(f"select.lazy_embed needs {out_dir}/score or /ingest")
    expr = parse_score(sc.score)
    names = pq.ParquetFile(files[0]).schema_arrow.names
    expr.check_columns(names, src)
    carry = [c for c in score_carry_columns(cfg) if c in names]
    base = [c for c in ("id", "seq", "messages", "evol_score") if c in names]
    embed_cols = list(dict.fromkeys(base + carry))
    text, ids, seq = _read_text_pool(files, list(dict.fromkeys(embed_cols + list(expr.names))), src)
    scores = expr.evaluate({c: text[c] for c in expr.names})
    text = text.select(embed_cols)
    n = text.num_rows
    t_read = time.perf_counter() - t0

    cache = EmbedCache.read(out_dir)
    lazy = LazySelection(scores, seq, sc.tau, sc.budget, sc.block_size, resolve_device(sc.device))
    res_cfg = cfg.embed.resources
    min_rows = max(1, res_cfg.concurrency * res_cfg.batch_size)
    sizer = ChunkSizer(min_rows=min_rows, max_rows=max(min_rows, MAX_CHUNK_ROWS))
    actors = EmbedActors(cfg, carry)
    sink = SplitParquetSink(EMBED, stage_dir(out_dir, EMBED), rejects_dir(out_dir, EMBED))
    sink.on_write_start()
    reason_of = np.full(n, None, dtype=object)
    stats = LazyStats()
    keep_examined = sc.calibrate
    fed_vectors: list[np.ndarray] = []
    fed_rows: list[np.ndarray] = []
    fb = cfg.failure_budget

    def start(rows: np.ndarray) -> Chunk:
        hit, hit_rej = cache.lookup(seq[rows])
        new = np.flatnonzero((hit < 0) & (hit_rej < 0))
        chunk = Chunk(lazy.planned - len(rows), rows, hit, hit_rej, new)
        if len(new):
            chunk.refs = actors.submit(text.take(pa.array(rows[new])))
        return chunk

    def finish(chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, rejected) of the chunk's rows; its new rows written as a part."""
        import ray  # noqa: PLC0415

        rows, m = chunk.rows, len(chunk.rows)
        dim = cache.vectors.shape[1] if len(cache.seq) else 0
        new_mat, new_rej = None, None
        if chunk.refs:
            t = time.perf_counter()
            out = pa.concat_tables(ray.get(chunk.refs), promote_options="default")
            stats.wait_s += time.perf_counter() - t
            t = time.perf_counter()
            sink.write_part(
                [out], f"{PART_PREFIX}{chunk.first:09d}-{uuid.uuid4().hex[:12]}.parquet"
            )
            stats.write_s += time.perf_counter() - t
            new_mat, _ = embedding_matrix(out[EMBEDDING])
            new_rej = out[REASON].is_valid().to_numpy(zero_copy_only=False)
            why = np.asarray(out[REASON].to_pylist(), dtype=object)[new_rej]
            reason_of[rows[chunk.new[new_rej]]] = why
            stats.rejects.update(why.tolist())
            dim = new_mat.shape[1]
            stats.embedded += len(chunk.new)
        vec = np.zeros((m, dim), np.float32)
        rejected = np.zeros(m, bool)
        if new_mat is not None:
            vec[chunk.new] = new_mat
            rejected[chunk.new] = new_rej
        got = np.flatnonzero(chunk.hit >= 0)
        if len(got):
            vec[got] = cache.vectors[chunk.hit[got]]
        gone = np.flatnonzero(chunk.hit_reject >= 0)
        rejected[gone] = True
        reason_of[rows[gone]] = cache.reject_reason[chunk.hit_reject[gone]]
        stats.rejects.update(reason_of[rows[gone]].tolist())
        stats.reused += len(got) + len(gone)
        return vec, rejected

    pending: deque[Chunk] = deque()
    t_loop = time.perf_counter()
    try:
        while not lazy.done:
            while len(pending) < 2 and lazy.planned < len(lazy.order):
                size = sizer.next_size(lazy.budget, lazy.selected, lazy.examined, lazy.planned)
                pending.append(start(lazy.next_rows(size)))
                stats.chunks.append(len(pending[-1].rows))
            chunk = pending.popleft()
            vec, rejected = finish(chunk)
            t = time.perf_counter()
            lazy.feed(chunk.rows, vec, rejected)
            stats.greedy_s += time.perf_counter() - t
            if keep_examined:
                ok = ~rejected
                fed_rows.append(chunk.rows[ok])
                fed_vectors.append(vec[ok])
            seen = int(lazy.received)
            rej = dict(stats.rejects)
            err = over_budget(
                EMBED,
                StageCounts(seen, seen - sum(rej.values()), rej),
                fb.stages.get(EMBED, fb.max_rejected_fraction),
                fb.reasons,
                fb.min_rows,
            )
            if err is not None:
                raise err
            log.info(
                "stage select: lazy embed: %d/%d candidates embedded or reused (%.1f%%), "
                "%d examined, %d/%d selected",
                seen,
                len(lazy.order),
                100.0 * seen / max(1, len(lazy.order)),
                lazy.examined,
                lazy.selected,
                lazy.budget,
            )
    finally:
        actors.close([ref for c in pending for ref in c.refs])
    discarded = int(sum(len(c.new) for c in pending))
    # Rows an earlier run's embedder rejected are in no pool, read or not (as in a full run).
    _, known_rej = cache.lookup(seq)
    gone = np.flatnonzero(known_rej >= 0)
    lazy.drop(gone)
    reason_of[gone] = cache.reject_reason[known_rej[gone]]
    res = lazy.result(ids)
    rejected_by_reason = dict(Counter(reason_of[lazy.dropped].tolist()))
    cands = len(lazy.order)
    examined = int(lazy.examined)
    work = stats.embedded + discarded
    # Embed seconds per row of this run (the loop's time without the model load): what each
    # row the run did not embed would have cost.
    loop_s = time.perf_counter() - t_loop - (actors.started_s or 0.0) - stats.greedy_s
    per_row = max(0.0, loop_s) / stats.embedded if stats.embedded else 0.0
    metrics = {
        "pool_rows": n,
        "candidates": cands,
        "rows_examined": examined,
        "rows_embedded": stats.embedded,
        "rows_reused": stats.reused,
        "rows_discarded_in_flight": discarded,
        "rows_not_embedded": cands - int(lazy.received),
        "share_of_candidates_embedded": round(int(lazy.received) / cands, 4) if cands else None,
        "embed_work_per_examined_row": round((work + stats.reused) / examined, 3)
        if examined
        else None,
        "estimated_embed_seconds_saved": round(per_row * (cands - int(lazy.received)), 1),
        "chunks": len(stats.chunks),
        "chunk_rows": stats.chunks,
        "actors": actors.size if stats.embedded else 0,
        "batch_size": actors.batch_size,
        "seconds": {
            "read_pool": round(t_read, 3),
            "actor_start": round(actors.started_s or 0.0, 3),
            "embed_wait": round(stats.wait_s, 3),
            "greedy": round(stats.greedy_s, 3),
            "write_parts": round(stats.write_s, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }
    facts: dict[str, Any] = {
        "mode": "lazy_embed",
        "ids": ids,
        "seq": seq,
        "scores": scores,
        "dropped": lazy.dropped.copy(),
        "rows_in": n,
        "rejected_by_reason": rejected_by_reason,
        "lazy_embed": metrics,
    }
    if keep_examined:
        rows = np.concatenate(fed_rows) if fed_rows else np.empty(0, np.int64)
        vecs = np.concatenate(fed_vectors) if fed_vectors else np.empty((0, 0), np.float32)
        first = np.flatnonzero(~lazy.invalid[rows])[:examined]  # the rows the greedy read
        facts["examined"] = (scores[rows[first]], vecs[first], seq[rows[first]])
    return res, facts


def lazy_embed_models(cfg: PipelineConfig) -> list:
    """The embed model, which the select stage loads under ``select.lazy_embed``."""
    if not cfg.select.lazy_embed:
        return []
    from deita_ray.stages.embed import STAGE as EMBED_STAGE  # noqa: PLC0415

    return EMBED_STAGE.models(cfg) if EMBED_STAGE.models is not None else []


def lazy_embed_gpu_uses(cfg: PipelineConfig, out_dir: str) -> list:
    """The embedder's engine on GPUs, which the select stage starts under ``select.lazy_embed``."""
    if not cfg.select.lazy_embed:
        return []
    from deita_ray.stages.embed import STAGE as EMBED_STAGE  # noqa: PLC0415

    return EMBED_STAGE.gpu_uses(cfg, out_dir) if EMBED_STAGE.gpu_uses is not None else []


def lazy_embed_notes(cfg: PipelineConfig) -> list[str]:
    """The report's caveat under ``select.lazy_embed``."""
    if not (cfg.select.lazy_embed and cfg.select.method == "deita"):
        return []
    return [
        "select.lazy_embed: only the rows the greedy read were embedded (in score order; "
        "rows embedded and the saving: select metrics.lazy_embed); the tau curve and the "
        "nearest-neighbour cosines are computed on those rows, not on the whole pool."
    ]

"""Ingest stage: pool files -> canonical rows (``<out>/ingest``) and rejects, streamed by Ray Data.

Plan (nothing of the pool passes through the driver):

1. :func:`~deita_ray.data.read.read_pool` streams every record as a row (read tasks, one per
   file); :class:`Canonicalize` (fused into the same tasks) turns each into a canonical row
   or a marked reject; :func:`~deita_ray.data.sink.write_with_rejects` writes both.
2. A pass over the written Parquet (no ``extra`` column) computes the metrics and counts the
   rows whose id came from the record itself.
3. Duplicate ids. Synthesized ids (``<file prefix>:<index>``) are unique by construction
   (:func:`~deita_ray.data.read.id_prefixes`), so when no row carries its own id the check is
   skipped. Otherwise a distributed ``groupby(id)`` over (id, seq) (hash shuffle, memory
   bounded per partition) finds the ids that occur more than once, with their first seq. If
   there are any, the accepted rows are rewritten by tasks that look ids up in that table of
   duplicated ids only (shared through the object store, never the driver; Ray's
   ``Dataset.join`` would need polars): the first occurrence in input order keeps the id,
   later ones go to ``rejects/ingest`` with reason ``duplicate_id``. Their ``raw`` is the
   canonical row as JSON (id, source, format, messages, extra: the record's whole content).
   Ids therefore stay stable across runs and never depend on timing.

Accounting: ``rows_in`` = records read (one read row per record, bad ones included) =
``rows_out`` + rejected, checked before returning.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from deita_ray.accounting import StageCounts, StageResult
from deita_ray.data.formats import (
    CANONICAL_SCHEMA,
    ROLES,
    Reject,
    canonicalize,
    record_id,
)
from deita_ray.data.read import SEQ_FILE_SHIFT, expand_paths, file_stem, id_prefixes, read_pool
from deita_ray.data.rejects import DETAIL, RAW, REASON
from deita_ray.data.sink import rejects_dir, stage_dir, write_with_rejects

STAGE = "ingest"

MARKED_SCHEMA = (
    CANONICAL_SCHEMA.append(pa.field(REASON, pa.string()))
    .append(pa.field(DETAIL, pa.string()))
    .append(pa.field(RAW, pa.large_string()))
)
"""Output of :class:`Canonicalize`: the canonical columns plus the reject mark columns."""

_INDEX_MASK = (1 << SEQ_FILE_SHIFT) - 1


class Canonicalize:
    """Read rows -> canonical rows, or rows marked as rejects (a ``map_batches`` callable).

    Input columns (:data:`deita_ray.data.read.READ_SCHEMA`): ``record``, ``source``,
    ``index``, ``seq``, ``error``, ``detail``.

    Output columns (:data:`MARKED_SCHEMA`): ``id``, ``seq``, ``messages``, ``source``,
    ``format``, ``extra`` (:data:`~deita_ray.data.formats.CANONICAL_SCHEMA`) and
    ``_reject_reason``, ``_reject_detail``, ``_raw``. A good row has a null reason and null raw;
    a rejected row has null messages/format/extra, its id (own or synthesized), the reason
    (the reader's error, a :func:`~deita_ray.data.formats.canonicalize` reason, or
    ``invalid_utf8`` for strings with unpaired surrogate escapes, which Arrow cannot store)
    and the record text as raw. One output row per input row.

    Args:
        format: record shape, ``auto`` or one of :data:`~deita_ray.data.formats.FORMATS`.
        role_map: extra role names -> system/user/assistant.
        id_field: field holding a record's own id.
        id_prefixes: source path -> prefix of synthesized ids (default: the file stem).
    """

    def __init__(
        self,
        format: str = "auto",
        role_map: Mapping[str, str] | None = None,
        id_field: str = "id",
        id_prefixes: Mapping[str, str] | None = None,
    ):
        bad = {k: v for k, v in (role_map or {}).items() if v not in ROLES}
        if bad:
            raise ValueError(f"input.role_map values must be one of {ROLES}, got {bad}")
        self.format = format
        self.role_map = dict(role_map or {})
        self.id_field = id_field
        self.id_prefixes = dict(id_prefixes or {})

    def _prefix(self, source: str) -> str:
        prefix = self.id_prefixes.get(source)
        if prefix is None:
            prefix = self.id_prefixes[source] = file_stem(source)
        return prefix

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = batch.column("record").to_pylist()
        sources = batch.column("source").to_pylist()
        indexes = batch.column("index").to_pylist()
        errors = batch.column("error").to_pylist()
        details = batch.column("detail").to_pylist()
        n = len(records)
        ids: list[str] = [""] * n
        messages: list[Any] = [None] * n
        formats: list[Any] = [None] * n
        extras: list[Any] = [None] * n
        reasons: list[Any] = [None] * n
        rdetails: list[Any] = [None] * n
        raws: list[Any] = [None] * n
        loads = json.loads
        dumps = json.dumps
        for i in range(n):
            fallback = f"{self._prefix(sources[i])}:{indexes[i]}"
            text = records[i]
            if errors[i] is not None:
                ids[i], reasons[i], rdetails[i], raws[i] = fallback, errors[i], details[i], text
                continue
            try:
                obj = loads(text)
            except (ValueError, RecursionError) as e:  # the reader checked, but stay safe
                ids[i], reasons[i], rdetails[i], raws[i] = fallback, "invalid_json", str(e), text
                continue
            res = canonicalize(
                obj, format=self.format, role_map=self.role_map, id_field=self.id_field
            )
            if isinstance(res, Reject):
                own = record_id(obj, self.id_field) if isinstance(obj, dict) else None
                ids[i] = own or fallback
                reasons[i], rdetails[i], raws[i] = res.reason, res.detail, text
                continue
            ids[i] = res["id"] or fallback
            messages[i] = res["messages"]
            formats[i] = res["format"]
            extras[i] = dumps(res["extra"], ensure_ascii=False)
        cols = [
            ids,
            batch.column("seq"),
            messages,
            sources,
            formats,
            extras,
            reasons,
            rdetails,
            raws,
        ]
        try:
            return _table(cols)
        except (pa.ArrowInvalid, UnicodeEncodeError):
            # Some string holds an unpaired surrogate (a JSON "\\ud800" escape): reject those rows.
            for i in range(n):
                if not _encodable(ids[i], messages[i], extras[i]):
                    reasons[i] = "invalid_utf8"
                    rdetails[i] = "a string holds an unpaired surrogate escape"
                    raws[i] = records[i]
                    ids[i] = _safe(ids[i])
                    messages[i] = formats[i] = extras[i] = None
                raws[i] = _safe(raws[i]) if raws[i] is not None else None
            return _table(cols)


def _table(cols: list) -> pa.Table:
    arrays = []
    for value, field in zip(cols, MARKED_SCHEMA, strict=True):
        arrays.append(value if isinstance(value, pa.ChunkedArray) else pa.array(value, field.type))
    return pa.Table.from_arrays(arrays, schema=MARKED_SCHEMA)


def _safe(text: str) -> str:
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "backslashreplace")


def _encodable(*values: Any) -> bool:
    try:
        for v in values:
            if isinstance(v, str):
                v.encode("utf-8")
            elif isinstance(v, list):
                for m in v:
                    m["role"].encode("utf-8")
                    m["content"].encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Post-write passes: metrics and duplicate ids


class _Summarize:
    """Accepted rows -> one summary row per (block, format): counts for the metrics."""

    def __init__(self, id_prefixes: Mapping[str, str]):
        self.id_prefixes = dict(id_prefixes)

    def __call__(self, batch: pa.Table) -> pa.Table:
        msgs = batch.column("messages").combine_chunks()
        roles = pc.list_flatten(msgs).field("role")
        parents = pc.list_parent_indices(msgs)
        user = pc.equal(roles, "user")
        n = batch.num_rows
        import numpy as np

        turns = np.bincount(
            parents.to_numpy(zero_copy_only=False)[user.to_numpy(zero_copy_only=False)],
            minlength=n,
        )
        n_msgs = pc.list_value_length(msgs).to_numpy(zero_copy_only=False)
        lengths = pc.utf8_length(pc.list_flatten(msgs).field("content")).to_numpy(
            zero_copy_only=False
        )
        chars = np.bincount(parents.to_numpy(zero_copy_only=False), weights=lengths, minlength=n)
        seqs = batch.column("seq").to_numpy()
        own = [
            rid != f"{self.id_prefixes.get(src) or file_stem(src)}:{seq & _INDEX_MASK}"
            for rid, src, seq in zip(
                batch.column("id").to_pylist(),
                batch.column("source").to_pylist(),
                seqs.tolist(),
                strict=True,
            )
        ]
        own = np.asarray(own, dtype=bool)
        fmts = np.asarray(batch.column("format").to_pylist(), dtype=object)
        rows = []
        for fmt in sorted(set(fmts.tolist())):
            sel = fmts == fmt
            rows.append(
                {
                    "format": fmt,
                    "rows": int(sel.sum()),
                    "turns": int(turns[sel].sum()),
                    "multi_turn": int((turns[sel] > 1).sum()),
                    "max_turns": int(turns[sel].max()),
                    "messages": int(n_msgs[sel].sum()),
                    "system": int(
                        np.bincount(
                            parents.to_numpy(zero_copy_only=False)[
                                pc.equal(roles, "system").to_numpy(zero_copy_only=False)
                            ],
                            minlength=n,
                        )[sel]
                        .astype(bool)
                        .sum()
                    ),
                    "chars": int(chars[sel].sum()),
                    "own_ids": int(own[sel].sum()),
                }
            )
        return pa.Table.from_pylist(rows)


def _summarize(out_dir: str, prefixes: Mapping[str, str]) -> dict:
    import ray

    folder = stage_dir(out_dir, STAGE)
    if not _has_parquet(folder):
        return {"rows": 0, "by_format": {}, "turns": 0, "own_ids": 0}
    parts = (
        ray.data.read_parquet(folder, columns=["id", "seq", "source", "format", "messages"])
        .map_batches(_Summarize(prefixes), batch_format="pyarrow")
        .take_all()
    )
    by_format: Counter = Counter()
    total: Counter = Counter()
    max_turns = 0
    for p in parts:
        by_format[p["format"]] += p["rows"]
        max_turns = max(max_turns, p["max_turns"])
        for k in ("rows", "turns", "multi_turn", "messages", "system", "chars", "own_ids"):
            total[k] += p[k]
    rows = total["rows"]
    return {
        "rows": rows,
        "by_format": dict(sorted(by_format.items())),
        "turns": total["turns"],
        "mean_turns": round(total["turns"] / rows, 4) if rows else 0.0,
        "max_turns": max_turns,
        "multi_turn_rows": total["multi_turn"],
        "rows_with_system": total["system"],
        "messages": total["messages"],
        "mean_chars": round(total["chars"] / rows, 1) if rows else 0.0,
        "own_ids": total["own_ids"],
    }


def _has_parquet(folder: str) -> bool:
    return os.path.isdir(folder) and any(f.endswith(".parquet") for f in os.listdir(folder))


_FIRST = "_first_seq"


class _MarkDuplicates:
    """Canonical rows -> marked canonical rows: later occurrences of a duplicated id rejected.

    Holds object refs to the (id, first seq) table of duplicated ids only; each worker fetches
    it once. The driver never holds it, and the pool itself is never gathered anywhere.
    """

    def __init__(self, dup_refs: list):
        self.dup_refs = dup_refs
        self._dups: pa.Table | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self._dups is None:
            import ray

            self._dups = pa.concat_tables(ray.get(self.dup_refs)).combine_chunks()
        at = pc.index_in(batch.column("id"), value_set=self._dups.column("id"))
        first = pc.take(self._dups.column(_FIRST), at)
        dup = pc.fill_null(pc.not_equal(batch.column("seq"), first), False)
        dup_np = dup.to_numpy(zero_copy_only=False)
        n = batch.num_rows
        reasons: list[Any] = [None] * n
        details: list[Any] = [None] * n
        raws: list[Any] = [None] * n
        if dup_np.any():
            rows = batch.select(["id", "source", "format", "messages", "extra"]).to_pylist()
            firsts = first.to_pylist()
            for i in dup_np.nonzero()[0].tolist():
                r = rows[i]
                reasons[i] = "duplicate_id"
                details[i] = (
                    f"id {r['id']!r} first occurs at seq {firsts[i]} (file rank "
                    f"{firsts[i] >> SEQ_FILE_SHIFT}, index {firsts[i] & _INDEX_MASK})"
                )
                raw = {k: r[k] for k in ("id", "source", "format", "messages")}
                raw["extra"] = json.loads(r["extra"]) if r["extra"] else None
                raws[i] = json.dumps(raw, ensure_ascii=False)
        cols = [batch.column(f.name) for f in CANONICAL_SCHEMA] + [reasons, details, raws]
        return _table(cols)


def _dedup_ids(out_dir: str, num_partitions: int) -> int:
    """Reject later occurrences of duplicated ids in ``<out>/ingest``; returns how many."""
    import ray
    from ray.data.aggregate import Count, Min

    folder = stage_dir(out_dir, STAGE)
    dups = (
        ray.data.read_parquet(folder, columns=["id", "seq"])
        .groupby("id", num_partitions=num_partitions)
        .aggregate(Count(alias_name="n"), Min("seq", alias_name=_FIRST))
        .filter(expr="n > 1")
        .select_columns(["id", _FIRST])
        .materialize()
    )
    if dups.count() == 0:
        return 0
    tmp = os.path.join(out_dir, "_ingest_dedup")
    shutil.rmtree(tmp, ignore_errors=True)
    marked = ray.data.read_parquet(folder).map_batches(
        _MarkDuplicates(dups.to_arrow_refs()), batch_format="pyarrow"
    )
    counts = write_with_rejects(marked, STAGE, tmp)
    # Swap in the rewritten rows; the duplicate rejects join the stage's other rejects.
    shutil.rmtree(folder)
    os.replace(stage_dir(tmp, STAGE), folder)
    rej = rejects_dir(out_dir, STAGE)
    os.makedirs(rej, exist_ok=True)
    new_rej = rejects_dir(tmp, STAGE)
    for name in sorted(os.listdir(new_rej)):
        os.replace(os.path.join(new_rej, name), os.path.join(rej, "dup-" + name))
    shutil.rmtree(tmp)
    return counts.rejected_by_reason.get("duplicate_id", 0)


# ---------------------------------------------------------------------------------------------
# Stage entry point


def run_ingest(cfg: Any, out_dir: str) -> StageResult:
    """Read ``cfg.input.paths`` (or the demo pool) into ``<out_dir>/ingest`` and its rejects.

    Args:
        cfg: the job's :class:`~deita_ray.config.PipelineConfig` (Ray already initialised).
        out_dir: the job's output directory.

    Returns:
        Counts (records read = accepted + rejected by reason) and metrics: files read, rows per
        format, turns, multi-turn rows, rows with own ids, duplicate ids, seconds.
    """
    t0 = time.time()
    inp = cfg.input
    if cfg.demo_pool:
        from deita_ray.data.demo import write_demo_pool

        os.makedirs(out_dir, exist_ok=True)
        paths = [os.path.join(out_dir, "demo_pool.jsonl")]
        write_demo_pool(paths[0])
    else:
        paths = list(inp.paths)
        if not paths:
            raise ValueError("input.paths is empty: give a pool file, directory or glob")
    files = expand_paths(paths)
    prefixes = id_prefixes(files)
    for folder in (stage_dir(out_dir, STAGE), rejects_dir(out_dir, STAGE)):
        shutil.rmtree(folder, ignore_errors=True)  # a re-run replaces the stage's output
    ds = read_pool(files, inp.file_format, inp.max_record_bytes).map_batches(
        Canonicalize(inp.format, inp.role_map, inp.id_field, prefixes),
        batch_format="pyarrow",
        batch_size=None,
    )
    counts = write_with_rejects(ds, STAGE, out_dir)
    summary = _summarize(out_dir, prefixes)
    n_dup = 0
    if summary["own_ids"]:
        n_dup = _dedup_ids(out_dir, num_partitions=min(64, counts.rows_out // 100_000 + 1))
        if n_dup:
            counts = StageCounts(
                rows_in=counts.rows_in,
                rows_out=counts.rows_out - n_dup,
                rejected_by_reason=StageCounts.merge_reasons(
                    counts.rejected_by_reason, {"duplicate_id": n_dup}
                ),
            )
            summary = _summarize(out_dir, prefixes)
    counts.check(STAGE)
    if summary["rows"] != counts.rows_out:
        raise RuntimeError(
            f"ingest: {summary['rows']} rows on disk but {counts.rows_out} counted as written"
        )
    metrics = {
        "files": len(files),
        "format_declared": inp.format,
        **{k: v for k, v in summary.items() if k != "rows"},
        "duplicate_ids": n_dup,
        "seconds": round(time.time() - t0, 2),
    }
    if cfg.demo_pool:
        metrics["demo_pool"] = paths[0]
    return StageResult(counts=counts, metrics=metrics)

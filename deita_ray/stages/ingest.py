"""Ingest stage: pool files -> canonical rows (``<out>/ingest``) and rejects, streamed by Ray Data.

Plan (nothing of the pool passes through the driver):

1. :class:`~deita_ray.data.read.PoolDatasource` streams every record of the files still to
   read as a row (read tasks, one per file group), each file's rows followed by one
   :data:`~deita_ray.data.read.FILE_END` row that carries the reader's counts of the file;
   :class:`Canonicalize` (fused into the same tasks) turns each record into a canonical row or
   a marked reject; :class:`IngestSink` writes both, one part per input file and piece
   (``part-r<rank>-i<first index>.parquet``), and each end-of-file row as
   ``_files/r<rank>.json``.
2. One Ray task per written part file reads it back (without ``extra``) and returns its
   metrics (rows per format, turns, ...) and its (id, seq) pairs split into hash buckets.
3. Duplicate ids. Synthesized ids (``<file prefix>:<index>``) are unique by construction
   (:func:`~deita_ray.data.read.id_prefixes`), so when no row carries its own id nothing more
   happens. Otherwise one reduce task per bucket groups its (id, seq) pairs (memory bounded
   per bucket; buckets grow with the pool) and finds the ids that occur more than once with
   their first seq, and the part files holding later occurrences. Only those part files are
   rewritten: the first occurrence in input order keeps the id, later ones go to
   ``rejects/ingest`` (``dup-<part>.parquet``) with reason ``duplicate_id``; their ``raw`` is
   the canonical row as JSON (id, source, format, messages, extra: the record's whole
   content). The driver holds only object refs and per-file summaries, never ids or rows.
   Ids are therefore stable across runs and never depend on timing.

Resume by input file: a file is *finished* when its end-of-file record is on disk and its
parts (accepted rows, rejects, duplicate-id rejects) hold exactly the rows the reader counted.
A re-run in the same folder (the pipeline keeps it after an interrupted run with the same
settings) keeps the parts of finished files, deletes the rest, and reads only the unfinished
files, with the ranks and id prefixes of the whole pool, so ``seq`` and ids do not change. The
duplicate-id pass then runs over every part, kept and new, so its result is that of an
uninterrupted run.

Accounting: ``rows_in`` = the rows the reader counted per file (one per record or reject
piece), summed over the end-of-file records of every file, resumed ones included, after
:func:`~deita_ray.data.read.check_file_counts` checked that each file's ranges and syntax
bytes add up to its size; counted apart from what the sink writes, ``rows_out`` + rejected
must equal it, checked before returning.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deita_ray.accounting import StageCounts, StageResult
from deita_ray.config import PipelineConfig
from deita_ray.data.formats import (
    CANONICAL_SCHEMA,
    ROLES,
    Reject,
    canonicalize,
    record_id,
)
from deita_ray.data.read import (
    FILE_END,
    FILE_FORMATS,
    SEQ_FILE_SHIFT,
    PoolDatasource,
    check_file_counts,
    expand_paths,
    file_size,
    file_stem,
    id_prefixes,
)
from deita_ray.data.rejects import (
    DETAIL,
    INPUT_RANGE,
    RANGE_END,
    RANGE_START,
    RANGE_UNIT,
    REASON,
    REJECT_MARKS,
    RejectMarks,
)
from deita_ray.data.sink import (
    TMP_PREFIX,
    SplitParquetSink,
    count_written,
    parquet_files,
    rejects_dir,
    split_block,
    stage_dir,
    write_atomic,
)
from deita_ray.stages.base import InputToRead, Stage

NAME = "ingest"

_INPUT_RANGES = dict(
    zip((RANGE_START, RANGE_END, RANGE_UNIT), (typ for _, typ in INPUT_RANGE), strict=True)
)
"""The reader's ``range_*`` columns, as the mark columns that locate a reject in its file."""

MARKED_SCHEMA = pa.schema([*CANONICAL_SCHEMA, *REJECT_MARKS, *_INPUT_RANGES.items()])
"""Output of :class:`Canonicalize`: the canonical columns plus the reject mark columns."""

_INDEX_MASK = (1 << SEQ_FILE_SHIFT) - 1


class Canonicalize:
    """Read rows -> canonical rows, or rows marked as rejects (a ``map_batches`` callable).

    Input columns (:data:`deita_ray.data.read.READ_SCHEMA`): ``record``, ``source``,
    ``index``, ``seq``, ``error``, ``detail``, ``range_start``, ``range_end``, ``range_unit``.

    Output columns (:data:`MARKED_SCHEMA`): ``id``, ``seq``, ``messages``, ``source``,
    ``format``, ``extra`` (:data:`~deita_ray.data.formats.CANONICAL_SCHEMA`) and
    ``_reject_reason``, ``_reject_detail``, ``_raw`` and the record's input range
    (``_range_start``, ``_range_end``, ``_range_unit``). A good row has a null reason and null raw;
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
        marks = RejectMarks(n)
        loads = json.loads
        dumps = json.dumps
        for i in range(n):
            fallback = f"{self._prefix(sources[i])}:{indexes[i]}"
            text = records[i]
            if errors[i] is not None:
                ids[i] = fallback
                marks.reject(i, errors[i], details[i], text)
                continue
            try:
                obj = loads(text)
            except (ValueError, RecursionError) as e:  # the reader checked, but stay safe
                ids[i] = fallback
                marks.reject(i, "invalid_json", str(e), text)
                continue
            res = canonicalize(
                obj, format=self.format, role_map=self.role_map, id_field=self.id_field
            )
            if isinstance(res, Reject):
                own = record_id(obj, self.id_field) if isinstance(obj, dict) else None
                ids[i] = own or fallback
                marks.reject(i, res.reason, res.detail, text)
                continue
            ids[i] = res["id"] or fallback
            messages[i] = res["messages"]
            formats[i] = res["format"]
            extras[i] = dumps(res["extra"], ensure_ascii=False) if res["extra"] else "{}"
        cols = [ids, batch.column("seq"), messages, sources, formats, extras]
        ranges = batch.select([name for name, _ in INPUT_RANGE])
        try:
            return _marked(marks, cols, ranges)
        except (pa.ArrowInvalid, UnicodeEncodeError):
            # Some string holds an unpaired surrogate (a JSON "\\ud800" escape): reject those rows.
            for i in range(n):
                if not _encodable(ids[i], messages[i], extras[i]):
                    marks.reject(
                        i, "invalid_utf8", "a string holds an unpaired surrogate escape", records[i]
                    )
                    ids[i] = _safe(ids[i])
                    messages[i] = formats[i] = extras[i] = None
                raw = marks.raws[i]
                marks.raws[i] = _safe(raw) if raw is not None else None
            return _marked(marks, cols, ranges)


def _marked(marks: RejectMarks, cols: list, ranges: pa.Table | None = None) -> pa.Table:
    """Canonical columns + reject marks + input ranges (null without ``ranges``): one table of
    :data:`MARKED_SCHEMA`."""
    arrays = []
    for value, field in zip(cols, CANONICAL_SCHEMA, strict=True):
        arrays.append(value if isinstance(value, pa.ChunkedArray) else pa.array(value, field.type))
    table = marks.attach(pa.Table.from_arrays(arrays, schema=CANONICAL_SCHEMA))
    n = table.num_rows
    for k, (name, typ) in enumerate(_INPUT_RANGES.items()):
        column = ranges.column(k) if ranges is not None else pa.nulls(n, typ)
        table = table.append_column(name, column)
    return table


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
# Files, parts and resume

FILES_DIR = "_files"
"""Folder under ``<out>/ingest`` with one ``r<rank>.json`` per input file read to its end
(Ray Data and pyarrow skip ``_``-prefixed names when they read the stage folder)."""

_PART = re.compile(r"-r(\d+)-i(\d+)\.parquet$")
_END = re.compile(r"^r(\d+)\.json$")


def part_name(first_seq: int) -> str:
    """Name of the part whose first row has ``first_seq``: its file rank and record index."""
    return f"part-r{first_seq >> SEQ_FILE_SHIFT:07d}-i{first_seq & _INDEX_MASK:013d}.parquet"


def part_rank(path: str) -> int | None:
    """File rank of a part (also of its ``dup-`` rejects), None for a name not from
    :func:`part_name`."""
    m = _PART.search(os.path.basename(path))
    return int(m.group(1)) if m else None


def _end_name(rank: int) -> str:
    return f"r{rank:07d}.json"


def _end_records(out_dir: str) -> list[str]:
    folder = os.path.join(stage_dir(out_dir, NAME), FILES_DIR)
    return (
        sorted(os.path.join(folder, n) for n in os.listdir(folder)) if os.path.isdir(folder) else []
    )


def _write_json_atomic(folder: str, name: str, data: Any) -> None:
    tmp = os.path.join(folder, TMP_PREFIX + name)
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(folder, name))


class IngestSink(SplitParquetSink):
    """Writes canonical rows split by input file: one part per file and write task, named by
    its first row (:func:`part_name`; a retried write replaces its part instead of adding
    one), then each :data:`~deita_ray.data.read.FILE_END` row as ``_files/r<rank>.json``
    (rank, source, id prefix, the reader's counts of the file)."""

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict:
        tables = [b if isinstance(b, pa.Table) else pa.Table.from_pandas(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        rows_out = 0
        reasons: Counter = Counter()
        if not tables:
            return {"rows_out": 0, "rejected_by_reason": {}}
        table = pa.concat_tables(tables)
        is_end = pc.fill_null(pc.equal(table[REASON], FILE_END), False)
        rows = table.filter(pc.invert(is_end))
        ranks = pc.shift_right(rows["seq"], SEQ_FILE_SHIFT)
        for rank in sorted(pc.unique(ranks).to_pylist()):
            piece = rows.filter(pc.equal(ranks, rank))
            done = self.write_part([piece], part_name(pc.min(piece["seq"]).as_py()))
            rows_out += done["rows_out"]
            reasons.update(done["rejected_by_reason"])
        ends = table.filter(is_end).to_pylist()
        if ends:  # after the rows before them: a record never announces rows not yet on disk
            folder = os.path.join(self.stage_dir, FILES_DIR)
            os.makedirs(folder, exist_ok=True)
            for end in ends:
                rank = end["seq"] >> SEQ_FILE_SHIFT
                record = {
                    "rank": rank,
                    "source": end["source"],
                    "id_prefix": end["id"].rsplit(":", 1)[0],
                    "counts": json.loads(end[DETAIL]),
                }
                _write_json_atomic(folder, _end_name(rank), record)
        return {"rows_out": rows_out, "rejected_by_reason": dict(reasons)}


def finished_files(out_dir: str, files: list[str], prefixes: Mapping[str, str]) -> dict[int, dict]:
    """``{rank: the reader's counts}`` of the pool's files whose output is complete in
    ``out_dir``.

    A file is complete when ``_files/r<rank>.json`` names the same file (its rank and id
    prefix in this pool, and the size the reader accounted for is still its size on disk)
    and its parts, in both folders, hold exactly the rows the reader counted.
    """
    records: dict[int, dict] = {}
    for path in _end_records(out_dir):
        if not _END.match(os.path.basename(path)):
            continue
        with open(path) as f:
            end = json.load(f)
        rank, counts = end["rank"], end["counts"]
        same = rank < len(files) and end["id_prefix"] == prefixes[files[rank]]
        if same and counts["file_bytes"] not in (None, file_size(files[rank])):
            same = False  # the file changed since: read it again
        if same:
            records[rank] = counts
    written: Counter = Counter()
    for part in _all_parts(out_dir):
        written[part_rank(part)] += pq.ParquetFile(part).metadata.num_rows
    return {rank: c for rank, c in records.items() if written[rank] == c["rows"]}


def _all_parts(out_dir: str) -> list[str]:
    return parquet_files(stage_dir(out_dir, NAME)) + parquet_files(rejects_dir(out_dir, NAME))


def keep_finished(out_dir: str, files: list[str], prefixes: Mapping[str, str]) -> dict[int, dict]:
    """Keep the output of the finished files (:func:`finished_files`), delete everything else
    an interrupted run left (parts of unfinished files, their end-of-file records, temporary
    files); returns the finished files' ``{rank: counts}``."""
    finished = finished_files(out_dir, files, prefixes)
    for path in _all_parts(out_dir):
        if part_rank(path) not in finished:
            os.remove(path)
    for path in _end_records(out_dir):  # temporary files of an interrupted write included
        m = _END.match(os.path.basename(path))
        if m is None or int(m.group(1)) not in finished:
            os.remove(path)
    for folder in (stage_dir(out_dir, NAME), rejects_dir(out_dir, NAME)):
        for stray in glob.glob(os.path.join(folder, TMP_PREFIX + "*")):
            os.remove(stray)
    return finished


# ---------------------------------------------------------------------------------------------
# Post-write passes: metrics and duplicate ids (plain Ray tasks, one per written part file)

_SUM_KEYS = ("rows", "turns", "multi_turn", "messages", "system", "chars", "own_ids")


def summarize_rows(table: pa.Table, id_prefixes: Mapping[str, str]) -> dict[str, dict]:
    """Per format: rows, turns, multi-turn rows, messages, rows with a system message, content
    chars, rows with their own id, max turns. ``table`` has id, seq, source, format, messages."""
    import numpy as np

    n = table.num_rows
    if n == 0:
        return {}
    msgs = table.column("messages").combine_chunks()
    flat = pc.list_flatten(msgs)
    parents = pc.list_parent_indices(msgs).to_numpy(zero_copy_only=False)
    roles = flat.field("role")

    def per_row(mask: pa.Array | None = None, weights: Any = None) -> Any:
        sel = parents if mask is None else parents[mask.to_numpy(zero_copy_only=False)]
        return np.bincount(sel, weights=weights, minlength=n)

    turns = per_row(pc.equal(roles, "user"))  # every user message starts a turn
    system = per_row(pc.equal(roles, "system")) > 0
    chars = per_row(weights=pc.utf8_length(flat.field("content")).to_numpy(zero_copy_only=False))
    n_msgs = pc.list_value_length(msgs).to_numpy(zero_copy_only=False)
    mask = _INDEX_MASK
    own = np.fromiter(
        (
            rid != f"{id_prefixes.get(src) or file_stem(src)}:{seq & mask}"
            for rid, src, seq in zip(
                table.column("id").to_pylist(),
                table.column("source").to_pylist(),
                table.column("seq").to_pylist(),
                strict=True,
            )
        ),
        dtype=bool,
        count=n,
    )
    fmts = np.asarray(table.column("format").to_pylist(), dtype=object)
    out = {}
    for fmt in sorted(set(fmts.tolist())):
        sel = fmts == fmt
        out[fmt] = {
            "rows": int(sel.sum()),
            "turns": int(turns[sel].sum()),
            "multi_turn": int((turns[sel] > 1).sum()),
            "messages": int(n_msgs[sel].sum()),
            "system": int(system[sel].sum()),
            "chars": int(chars[sel].sum()),
            "own_ids": int(own[sel].sum()),
            "max_turns": int(turns[sel].max()),
        }
    return out


def _merge_summaries(parts: list[dict[str, dict]]) -> dict:
    by_format: dict[str, Counter] = {}
    max_turns = 0
    for part in parts:
        for fmt, s in part.items():
            by_format.setdefault(fmt, Counter()).update({k: s[k] for k in _SUM_KEYS})
            max_turns = max(max_turns, s["max_turns"])
    total: Counter = Counter()
    for c in by_format.values():
        total.update(c)
    rows = total["rows"]
    return {
        "rows": rows,
        "by_format": {f: c["rows"] for f, c in sorted(by_format.items())},
        "turns": total["turns"],
        "mean_turns": round(total["turns"] / rows, 4) if rows else 0.0,
        "max_turns": max_turns,
        "multi_turn_rows": total["multi_turn"],
        "rows_with_system": total["system"],
        "messages": total["messages"],
        "mean_chars": round(total["chars"] / rows, 1) if rows else 0.0,
        "own_ids": total["own_ids"],
    }


_SUMMARY_COLUMNS = ["id", "seq", "source", "format", "messages"]
_FIRST = "_first_seq"


def _bucket(ids: list[str], num_buckets: int) -> Any:
    import zlib

    import numpy as np

    # crc32, not hash(): buckets must agree across worker processes.
    return np.fromiter(
        (zlib.crc32(i.encode("utf-8")) % num_buckets for i in ids), dtype=np.int64, count=len(ids)
    )


def _map_part(path: str, part: int, prefixes: dict, num_buckets: int) -> list:
    """One written part file -> [summary, bucket_0 .. bucket_{P-1}] of (id, seq, part)."""
    table = pq.read_table(path, columns=_SUMMARY_COLUMNS)
    keys = table.select(["id", "seq"]).append_column(
        "part", pa.array([part] * table.num_rows, pa.int32())
    )
    out: list = [summarize_rows(table, prefixes)]
    if num_buckets == 1:
        return [*out, keys]
    buckets = _bucket(table.column("id").to_pylist(), num_buckets)
    return out + [keys.filter(pa.array(buckets == b)) for b in range(num_buckets)]


def _reduce_bucket(*tables: pa.Table) -> tuple[pa.Table, list[int]]:
    """(id, seq, part) rows of one hash bucket -> (duplicated ids with first seq, parts to fix)."""
    keys = pa.concat_tables(tables)
    # use_threads=False: Acero sizes its per-thread states once per process (CPU + IO pool
    # capacity + 1, a C++ static fixed at the first grouping), and Ray Data's Parquet reader
    # raises the CPU pool of any worker it runs in to 32 threads (pa.set_cpu_count). A threaded
    # group_by in a reused worker then fails at random with "thread index 10 is out of range
    # [0, 10)" (tests/stages/test_ingest.py::test_group_by_survives_a_resized_arrow_pool).
    agg = keys.group_by("id", use_threads=False).aggregate([("seq", "min"), ("seq", "count")])
    dups = agg.filter(pc.greater(agg.column("seq_count"), 1))
    dups = pa.table({"id": dups.column("id"), _FIRST: dups.column("seq_min")})
    if dups.num_rows == 0:
        return dups, []
    at = pc.index_in(keys.column("id"), value_set=dups.column("id"))
    later = pc.fill_null(pc.not_equal(keys.column("seq"), pc.take(dups.column(_FIRST), at)), False)
    parts = pc.unique(keys.column("part").filter(later)).to_pylist()
    return dups, sorted(parts)


def mark_duplicates(table: pa.Table, dups: pa.Table) -> pa.Table:
    """Canonical rows -> marked rows: rows whose id is in ``dups`` (id, first seq) but whose
    seq is not the first are rejected with ``duplicate_id``; raw = the canonical row as JSON."""
    at = pc.index_in(table.column("id"), value_set=dups.column("id"))
    first = pc.take(dups.column(_FIRST), at)
    dup = pc.fill_null(pc.not_equal(table.column("seq"), first), False)
    dup_np = dup.to_numpy(zero_copy_only=False)
    marks = RejectMarks(table.num_rows)
    if dup_np.any():
        firsts = first.to_pylist()
        for i in dup_np.nonzero()[0].tolist():
            r = table.slice(i, 1).to_pylist()[0]
            raw = {k: r[k] for k in ("id", "source", "format", "messages")}
            raw["extra"] = json.loads(r["extra"]) if r["extra"] else None
            detail = (
                f"id {r['id']!r} first occurs at seq {firsts[i]} (file rank "
                f"{firsts[i] >> SEQ_FILE_SHIFT}, index {firsts[i] & _INDEX_MASK})"
            )
            marks.reject(i, "duplicate_id", detail, json.dumps(raw, ensure_ascii=False))
    # canonical rows do not keep their input range
    return _marked(marks, [table.column(f.name) for f in CANONICAL_SCHEMA])


def _fix_part(path: str, rejects: str, prefixes: dict, *dup_tables: pa.Table) -> tuple:
    """Rewrite one part file without its later duplicates; their rejects go to ``rejects``
    (added to the ``dup-`` file an earlier, interrupted pass may have left for this part)."""
    dups = pa.concat_tables(dup_tables)
    table = pq.read_table(path).select(CANONICAL_SCHEMA.names).cast(CANONICAL_SCHEMA)
    good, bad = split_block(mark_duplicates(table, dups), NAME)
    name = "dup-" + os.path.basename(path)
    if os.path.exists(os.path.join(rejects, name)):
        bad = pa.concat_tables([pq.read_table(os.path.join(rejects, name)), bad])
    write_atomic(bad, rejects, name)
    write_atomic(good, os.path.dirname(path), os.path.basename(path))
    return bad.num_rows, summarize_rows(good.select(_SUMMARY_COLUMNS), prefixes)


def _post_write(out_dir: str, prefixes: dict, rows_out: int) -> tuple[dict, int]:
    """Metrics of the written rows and the duplicate-id pass; returns (summary, duplicates)."""
    import ray

    folder = stage_dir(out_dir, NAME)
    parts = parquet_files(folder)
    if not parts:
        return _merge_summaries([]), 0
    num_buckets = min(64, rows_out // 500_000 + 1)
    prefixes_ref = ray.put(prefixes)
    map_task = ray.remote(num_cpus=1, num_returns=num_buckets + 1)(_map_part)
    mapped = [map_task.remote(p, i, prefixes_ref, num_buckets) for i, p in enumerate(parts)]
    summaries = ray.get([m[0] for m in mapped])
    merged = _merge_summaries(summaries)
    if not merged["own_ids"]:
        return merged, 0  # only synthesized ids: unique by construction
    reduce_task = ray.remote(num_cpus=1, num_returns=2)(_reduce_bucket)
    reduced = [reduce_task.remote(*[m[b + 1] for m in mapped]) for b in range(num_buckets)]
    del mapped
    to_fix = sorted({p for r in ray.get([r[1] for r in reduced]) for p in r})
    if not to_fix:
        return merged, 0
    dup_refs = [r[0] for r in reduced]
    rejects = rejects_dir(out_dir, NAME)
    os.makedirs(rejects, exist_ok=True)
    fix_task = ray.remote(num_cpus=1)(_fix_part)
    fixed = ray.get([fix_task.remote(parts[i], rejects, prefixes_ref, *dup_refs) for i in to_fix])
    for i, (_, summary) in zip(to_fix, fixed, strict=True):
        summaries[i] = summary
    return _merge_summaries(summaries), sum(n for n, _ in fixed)


# ---------------------------------------------------------------------------------------------
# Stage entry point


def run_ingest(cfg: Any, out_dir: str) -> StageResult:
    """Read ``cfg.input.paths`` (or the demo pool) into ``<out_dir>/ingest`` and its rejects.

    Args:
        cfg: the job's :class:`~deita_ray.config.PipelineConfig` (Ray already initialised).
        out_dir: the job's output directory.

    Returns:
        Counts (rows read = accepted + rejected by reason) and metrics: files, files kept from
        an interrupted run, bytes read, rows per format, turns, multi-turn rows, rows with own
        ids, duplicate ids, seconds.
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
    if inp.file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {inp.file_format!r}")
    files = expand_paths(paths)
    prefixes = id_prefixes(files)
    finished = keep_finished(out_dir, files, prefixes)  # a fresh folder: none
    todo = [f for rank, f in enumerate(files) if rank not in finished]
    if todo:
        import ray

        source = PoolDatasource(
            todo,
            file_format=inp.file_format,
            max_record_bytes=inp.max_record_bytes,
            ranks={f: rank for rank, f in enumerate(files)},
            file_ends=True,
        )
        ds = ray.data.read_datasource(source).map_batches(
            Canonicalize(inp.format, inp.role_map, inp.id_field, prefixes),
            batch_format="pyarrow",
            batch_size=None,
        )
        ds.write_datasink(IngestSink(NAME, stage_dir(out_dir, NAME), rejects_dir(out_dir, NAME)))
    read = finished_files(out_dir, files, prefixes)
    unfinished = [f for rank, f in enumerate(files) if rank not in read]
    if unfinished:
        raise RuntimeError(
            f"ingest: {len(unfinished)} input files were not written completely "
            f"(e.g. {unfinished[0]}): their rows on disk do not match the rows read"
        )
    by_path = {files[rank]: c for rank, c in read.items()}
    counts = count_written(out_dir, NAME)
    counts.rows_in = check_file_counts(files, by_path)
    bytes_read = sum(c["file_bytes"] or 0 for c in by_path.values())
    summary, n_dup = _post_write(out_dir, prefixes, counts.rows_out)
    if n_dup:
        counts = StageCounts(
            rows_in=counts.rows_in,
            rows_out=counts.rows_out - n_dup,
            rejected_by_reason=StageCounts.merge_reasons(
                counts.rejected_by_reason, {"duplicate_id": n_dup}
            ),
        )
    counts.check(NAME)
    if summary["rows"] != counts.rows_out:
        raise RuntimeError(
            f"ingest: {summary['rows']} rows on disk but {counts.rows_out} counted as written"
        )
    metrics = {
        "files": len(files),
        "files_resumed": len(finished),
        "bytes_read": bytes_read,
        "format_declared": inp.format,
        **{k: v for k, v in summary.items() if k != "rows"},
        # from disk: duplicates an interrupted run's pass already moved count too
        "duplicate_ids": counts.rejected_by_reason.get("duplicate_id", 0),
        "seconds": round(time.time() - t0, 2),
    }
    if cfg.demo_pool:
        metrics["demo_pool"] = paths[0]
    return StageResult(counts=counts, metrics=metrics)


def _inputs(cfg: PipelineConfig) -> list[InputToRead]:
    """The pool files (none with ``demo_pool``: the job writes its own)."""
    if cfg.demo_pool:
        return []
    inp = cfg.input
    return [InputToRead("input.paths", inp.paths, inp.file_format, "input.file_format")]


STAGE = Stage(
    name=NAME,
    run=run_ingest,
    config_keys=("input", "demo_pool"),
    output_columns=tuple(f.name for f in CANONICAL_SCHEMA),
    resumes_by_shard=True,  # by input file: keep_finished
    inputs=_inputs,
    writes_parts=True,
    doc="pool files -> canonical rows (ids, messages, source, format, extra) and rejects",
)

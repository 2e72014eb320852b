"""An eval set's rows: its files read and canonicalised, malformed records rejected, and rows
whose prompt is also a pool prompt dropped (the contamination guard)."""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from deita_ray.config import EvalSetConfig
from deita_ray.data.formats import MESSAGE_TYPE, Reject
from deita_ray.data.rejects import to_raw
from deita_ray.data.sink import parquet_files, stage_dir
from deita_ray.evaluation import (
    EvalRow,
    mt_bench_rows,
    reference_turns,
    user_keys,
)
from deita_ray.stages.eval.passes import NAME

ROWS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("seq", pa.int64()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("source", pa.string()),
    ]
)
"""Eval rows as they enter the metric passes."""


# ---------------------------------------------------------------------------------------------
# Reading a set


def _read_records(paths: list[str], file_format: str) -> list[dict]:
    """Every record of the files (small sets: collected on the driver), in file order."""
    import ray

    from deita_ray.data.read import read_pool

    refs = read_pool(paths, file_format).to_arrow_refs()
    tables = [t for t in ray.get(refs) if t.num_rows]
    if not tables:
        return []
    table = pa.concat_tables(tables).sort_by("seq")
    return table.to_pylist()


def _reject(
    rid: str,
    seq: int,
    reason: str,
    detail: str,
    raw: str,
    source: str | None,
    read: dict | None = None,
) -> dict[str, Any]:
    """A rejects row; ``read`` (the reader's row) adds where in its file the record lies."""
    out = {
        "id": rid,
        "seq": seq,
        "stage": NAME,
        "reason": reason,
        "detail": detail,
        "raw": raw,
        "source": source,
    }
    for key in ("range_start", "range_end", "range_unit"):
        if read is not None and key in read:
            out[key] = read[key]
    return out


def read_eval_set(s: EvalSetConfig) -> tuple[list[EvalRow], list[dict]]:
    """The rows of one set and the rejects of its malformed records.

    Ids: the record's own ``id`` or ``<file stem>:<record index>`` (MT-Bench:
    ``mt_bench:<question_id>:t<turn>``).
    """
    from deita_ray.data.read import expand_paths, id_prefixes
    from deita_ray.evaluation import eval_row

    files = expand_paths(s.paths)
    prefixes = id_prefixes(files)
    records = _read_records(files, s.file_format)
    if s.limit is not None:
        records = records[: s.limit]
    references: dict[str, list[str]] = {}
    rejects: list[dict] = []
    if s.format == "mt_bench":
        ref_files = expand_paths(s.references)
        ref_prefixes = id_prefixes(ref_files)
        for r in _read_records(ref_files, "auto"):
            rid = f"{ref_prefixes.get(r['source']) or 'reference'}:{r['index']}"
            seq = -1 - r["seq"]  # reference records: negative, apart from the questions' seq
            if r["error"] is not None:
                rejects.append(
                    _reject(rid, seq, r["error"], r["detail"], r["record"], r["source"], r)
                )
                continue
            try:
                obj = json.loads(r["record"])
            except ValueError as e:
                rejects.append(
                    _reject(rid, seq, "invalid_json", str(e), r["record"], r["source"], r)
                )
                continue
            got_refs, bad = reference_turns([(obj, r["record"])])
            if bad:
                _, reason, detail = bad[0]
                rejects.append(_reject(rid, seq, reason, detail, r["record"], r["source"], r))
            for qid, turns in got_refs.items():
                references.setdefault(qid, turns)
    rows: list[EvalRow] = []
    for r in records:
        fallback = f"{prefixes.get(r['source']) or 'row'}:{r['index']}"
        if r["error"] is not None:
            rejects.append(
                _reject(fallback, r["seq"], r["error"], r["detail"], r["record"], r["source"], r)
            )
            continue
        try:
            obj = json.loads(r["record"])
        except ValueError as e:
            rejects.append(
                _reject(fallback, r["seq"], "invalid_json", str(e), r["record"], r["source"], r)
            )
            continue
        if s.format == "mt_bench":
            got: Any = mt_bench_rows(obj, r["seq"], r["source"], references)
        else:
            got = eval_row(obj, s.format, fallback, r["seq"], r["source"])
        if isinstance(got, Reject):
            rejects.append(
                _reject(fallback, r["seq"], got.reason, got.detail, r["record"], r["source"], r)
            )
            continue
        rows.extend(got if isinstance(got, list) else [got])
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row.id in seen:
            rejects.append(
                _reject(
                    row.id,
                    row.seq,
                    "duplicate_id",
                    "an earlier row of the set has this id",
                    to_raw({"id": row.id, "messages": row.messages}),
                    row.source,
                )
            )
            continue
        seen.add(row.id)
        unique.append(row)
    return unique, rejects


def pool_prompt_keys(out_dir: str) -> set[bytes] | None:
    """Keys of every user message of the pool (``<out_dir>/ingest``), or None without a pool."""
    files = parquet_files(stage_dir(out_dir, "ingest"))
    if not files:
        return None
    keys: set[bytes] = set()
    for f in files:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=8192, columns=["messages"]):
            for msgs in batch.column("messages").to_pylist():
                keys.update(user_keys(msgs or []))
    return keys


def split_contaminated(
    rows: list[EvalRow], pool_keys: set[bytes] | None
) -> tuple[list[EvalRow], list[dict]]:
    """Rows with no user message in the pool, and rejects (``contaminated``) for the others."""
    if not pool_keys:
        return rows, []
    keep, dropped = [], []
    for row in rows:
        if any(k in pool_keys for k in user_keys(row.messages)):
            dropped.append(
                _reject(
                    row.id,
                    row.seq,
                    "contaminated",
                    "a user message of this row, normalised, is also a user message of the pool",
                    to_raw({"id": row.id, "messages": row.messages}),
                    row.source,
                )
            )
        else:
            keep.append(row)
    return keep, dropped


def rows_table(rows: list[EvalRow]) -> pa.Table:
    return pa.table(
        {
            "id": [r.id for r in rows],
            "seq": [r.seq for r in rows],
            "messages": [r.messages for r in rows],
            "source": [r.source for r in rows],
        },
        schema=ROWS_SCHEMA,
    )


def write_table(table: pa.Table, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    pq.write_table(table, tmp)
    os.replace(tmp, path)

"""The ``export`` stage (optional, last): the selection as files trainers read.

Input: ``<out_dir>/select/*.parquet`` (``id``, ``messages``, ``extra``; rank order).

Output: ``<out_dir>/export/<format>.jsonl`` for each of ``export.formats`` (``sharegpt``,
``messages``, ``alpaca``: see :mod:`deita_ray.data.exports`), in rank order, and
``<out_dir>/export/dataset_info.json`` with a LLaMA-Factory entry ``<export.name>_<format>`` for
each file (copy the folder into LLaMA-Factory's ``data/`` or point ``dataset_dir`` at it).
Every file loads as one table (``datasets``, ``pyarrow.json``): a field whose values no one
column type holds is made one type (:func:`~deita_ray.data.exports.unify_types`). The select folder itself is the Parquet export:
``datasets.load_dataset("parquet", data_files="<out_dir>/select/*.parquet")`` gives
``messages`` as a list of ``{role, content}`` records.

Accounting: ``rows_in`` = selected rows; ``rows_out`` = rows written in every requested format;
a row one format cannot hold (only Alpaca has a shape rule) is written in the others and goes
to ``<out_dir>/rejects/export/part-<format>.parquet`` with reason ``not_alpaca_shape`` and its
row as raw JSON. ``python -m deita_ray.export`` runs the same code outside a pipeline.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from deita_ray.accounting import StageCounts, StageResult
from deita_ray.config import PipelineConfig
from deita_ray.data.exports import (
    EXPORT_FORMATS,
    FILE_NAMES,
    dataset_info,
    export_record,
    llamafactory_ready,
    unify_types,
)
from deita_ray.data.formats import Reject
from deita_ray.data.rejects import REJECTS_SCHEMA
from deita_ray.data.sink import parquet_files, rejects_dir, stage_dir
from deita_ray.stages.base import Stage

NAME = "export"
SOURCE = "select"
INFO_FILE = "dataset_info.json"


def _write_text_atomic(path: str, lines: Sequence[str]) -> None:
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
            f.write("\n")
    os.replace(tmp, path)


def _rejects_table(rejected: list[tuple[dict, Reject]]) -> pa.Table:
    """The rows a format cannot hold, as rejects (the row itself as raw JSON; no input range:
    the row comes from the selection, not from an input file)."""
    return pa.Table.from_pylist(
        [
            {
                "id": r["id"],
                "seq": r.get("seq"),
                "stage": NAME,
                "reason": why.reason,
                "detail": why.detail,
                "raw": json.dumps({"id": r["id"], "messages": r["messages"], "extra": r["extra"]}),
                "source": r.get("source"),
            }
            for r, why in rejected
        ],
        schema=REJECTS_SCHEMA,
    )


def read_selection(out_dir: str) -> list[dict]:
    """The selected rows (``id``, ``seq``, ``messages``, ``extra``, ``source``) in rank order."""
    files = parquet_files(stage_dir(out_dir, SOURCE))
    if not files:
        raise FileNotFoundError(f"export needs the selection: {stage_dir(out_dir, SOURCE)}")
    tables = []
    for f in files:
        names = pq.read_schema(f).names
        cols = [c for c in ("id", "rank", "seq", "messages", "extra", "source") if c in names]
        tables.append(pq.read_table(f, columns=cols))
    table = pa.concat_tables(tables, promote_options="default")
    if "messages" not in table.column_names:
        raise ValueError(f"export: {stage_dir(out_dir, SOURCE)} has no messages column")
    if "rank" in table.column_names:
        table = table.sort_by([("rank", "ascending")])
    return table.to_pylist()


def export_selection(
    out_dir: str,
    formats: Sequence[str],
    dest: str | None = None,
    name: str = "deita_selection",
) -> dict[str, Any]:
    """Write the selection of ``out_dir`` in each of ``formats`` under ``dest`` (default
    ``<out_dir>/export``), the LLaMA-Factory entries, and the rows a format cannot hold under
    ``<out_dir>/rejects/export/part-<format>.parquet``.

    Returns:
        ``{"rows", "written": {format: rows}, "rejected": {format: {reason: rows}},
        "rejected_ids", "extra_fields_dropped": {format: {field: rows}} (extra fields named
        like one the format reads, left out), "extra_fields_retyped": {format: {field: rows}}
        (fields of mixed types written as JSON text, the id as the row's id text: see
        :func:`~deita_ray.data.exports.unify_types`), "llamafactory_skips", "files"}``.
    """
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"export formats {unknown}: allowed {', '.join(EXPORT_FORMATS)}")
    dest = dest or stage_dir(out_dir, NAME)
    os.makedirs(dest, exist_ok=True)
    rows = read_selection(out_dir)
    summary: dict[str, Any] = {
        "rows": len(rows),
        "written": {},
        "rejected": {},
        "extra_fields_dropped": {},
        "extra_fields_retyped": {},
        "files": [],
    }
    rejected_ids: set[int] = set()
    for fmt in formats:
        records: list[dict] = []
        ids: list[str] = []
        rejected: list[tuple[dict, Reject]] = []
        dropped: Counter = Counter()
        for k, row in enumerate(rows):
            out = export_record(row["id"], row["messages"], row.get("extra"), fmt)
            if isinstance(out, Reject):
                rejected.append((row, out))
                rejected_ids.add(k)
                continue
            record, left_out = out
            dropped.update(left_out)
            records.append(record)
            ids.append(row["id"])
        retyped = unify_types(records, ids)
        lines = [json.dumps(r, ensure_ascii=False) for r in records]
        path = os.path.join(dest, FILE_NAMES[fmt])
        _write_text_atomic(path, lines)
        summary["files"].append(path)
        summary["written"][fmt] = len(lines)
        summary["rejected"][fmt] = dict(Counter(why.reason for _, why in rejected))
        summary["extra_fields_dropped"][fmt] = dict(dropped)
        summary["extra_fields_retyped"][fmt] = retyped
        rej_dir = rejects_dir(out_dir, NAME)
        rej_path = os.path.join(rej_dir, f"part-{fmt}.parquet")
        if rejected:
            os.makedirs(rej_dir, exist_ok=True)
            tmp = os.path.join(rej_dir, f".tmp-{os.getpid()}-part-{fmt}.parquet")
            pq.write_table(_rejects_table(rejected), tmp)
            os.replace(tmp, rej_path)
        elif os.path.exists(rej_path):
            os.remove(rej_path)  # an earlier export's rejects of this format no longer hold
    info = dataset_info(name, formats)
    if info:
        info_path = os.path.join(dest, INFO_FILE)
        old = {}
        if os.path.exists(info_path):
            with open(info_path, encoding="utf-8") as f:
                old = json.load(f)
        _write_text_atomic(info_path, [json.dumps({**old, **info}, indent=2)])
        summary["files"].append(info_path)
    summary["rejected_ids"] = len(rejected_ids)
    summary["llamafactory_skips"] = (
        sum(not llamafactory_ready(r["messages"]) for r in rows) if "sharegpt" in formats else 0
    )
    return summary


def run_export(cfg: PipelineConfig, out_dir: str) -> StageResult:
    """Export the selection in ``export.formats`` (see the module docstring)."""
    summary = export_selection(out_dir, cfg.export.formats, name=cfg.export.name)
    reasons: Counter = Counter()
    for per_format in summary["rejected"].values():
        reasons.update(per_format)
    # A row counts once however many formats could not hold it (only Alpaca can refuse one).
    n_rejected = summary["rejected_ids"]
    if sum(reasons.values()) != n_rejected:
        reasons = Counter({"not_alpaca_shape": n_rejected}) if n_rejected else Counter()
    counts = StageCounts(
        rows_in=summary["rows"],
        rows_out=summary["rows"] - n_rejected,
        rejected_by_reason=dict(reasons),
    )
    counts.check(NAME)
    metrics = {k: v for k, v in summary.items() if k != "rejected_ids"}
    metrics["files"] = [os.path.relpath(p, out_dir) for p in summary["files"]]
    return StageResult(counts=counts, metrics=metrics)


STAGE = Stage(
    name=NAME,
    run=run_export,
    config_keys=("export",),
    reads=(SOURCE,),
    input_columns=("id", "messages", "extra"),
    output_columns=(),
    # Rows a format cannot hold stay in the selection and in the other formats.
    rejects_are_failures=False,
    doc="the selection as ShareGPT / OpenAI-messages / Alpaca JSONL (+ LLaMA-Factory entries)",
)

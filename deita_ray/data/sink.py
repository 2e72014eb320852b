"""A Ray Data sink that splits a stage's output into accepted rows and rejects in one pass.

Each write task writes its accepted rows to ``<stage_dir>/part-<task>-<uuid>.parquet`` and its
rejected rows (those with a non-null :data:`~deita_ray.data.rejects.REASON`) to
``<rejects_dir>/part-<task>-<uuid>.parquet`` with :data:`~deita_ray.data.rejects.REJECTS_SCHEMA`,
and returns its counts, which :func:`write_with_rejects` adds up into a
:class:`~deita_ray.accounting.StageCounts`.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deita_ray.accounting import StageCounts
from deita_ray.data.rejects import DETAIL, MARK_COLUMNS, RAW, REASON, REJECTS_SCHEMA

try:  # Ray is a core dependency, but keep this module importable for pure unit tests.
    from ray.data import Datasink
except ImportError:  # pragma: no cover
    Datasink = object  # type: ignore[assignment,misc]


def split_block(table: pa.Table, stage: str) -> tuple[pa.Table, pa.Table]:
    """Split a marked table into (accepted rows without mark columns, rejects table)."""
    if REASON not in table.column_names:
        return table, REJECTS_SCHEMA.empty_table()
    bad = pc.is_valid(table[REASON])
    good_rows = table.filter(pc.invert(bad)).drop_columns(
        [c for c in MARK_COLUMNS if c in table.column_names]
    )
    bad_rows = table.filter(bad)
    n = bad_rows.num_rows

    def col(name: str, typ: pa.DataType) -> pa.Array:
        if name in bad_rows.column_names:
            return bad_rows[name].cast(typ)
        return pa.nulls(n, typ)

    rejects = pa.table(
        {
            "id": col("id", pa.string()),
            "stage": pa.array([stage] * n, pa.string()),
            "reason": col(REASON, pa.string()),
            "detail": col(DETAIL, pa.string()),
            "raw": col(RAW, pa.large_string()),
            "source": col("source", pa.string()),
        },
        schema=REJECTS_SCHEMA,
    )
    return good_rows, rejects


class SplitParquetSink(Datasink):
    """Writes accepted rows and rejects of a marked dataset to two Parquet folders."""

    def __init__(self, stage: str, stage_dir: str, rejects_dir: str):
        self.stage = stage
        self.stage_dir = stage_dir
        self.rejects_dir = rejects_dir
        self.counts: StageCounts | None = None

    def on_write_start(self, schema: Any = None) -> None:
        os.makedirs(self.stage_dir, exist_ok=True)
        os.makedirs(self.rejects_dir, exist_ok=True)

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict:
        goods, bads = [], []
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            if table.num_rows == 0:
                continue
            good, bad = split_block(table, self.stage)
            goods.append(good)
            bads.append(bad)
        name = f"part-{getattr(ctx, 'task_idx', 0):05d}-{uuid.uuid4().hex[:12]}.parquet"
        rows_out = 0
        reasons: Counter = Counter()
        if goods:
            good = pa.concat_tables(goods, promote_options="default")
            if good.num_rows:
                pq.write_table(good, os.path.join(self.stage_dir, name))
                rows_out = good.num_rows
        if bads:
            bad = pa.concat_tables(bads)
            if bad.num_rows:
                pq.write_table(bad, os.path.join(self.rejects_dir, name))
                reasons.update(bad["reason"].to_pylist())
        return {"rows_out": rows_out, "rejected_by_reason": dict(reasons)}

    def on_write_complete(self, write_result: Any) -> None:
        returns = getattr(write_result, "write_returns", write_result) or []
        self.counts = StageCounts(
            rows_in=0,
            rows_out=sum(r["rows_out"] for r in returns),
            rejected_by_reason=StageCounts.merge_reasons(
                *(r["rejected_by_reason"] for r in returns)
            ),
        )


def write_with_rejects(
    ds: Any, stage: str, out_dir: str, rows_in: int | None = None
) -> StageCounts:
    """Run ``ds`` (a marked Ray Dataset) to completion, writing rows and rejects of ``stage``.

    Args:
        ds: dataset whose rows may carry the reject mark columns.
        stage: stage name (folder names and the ``stage`` column of rejects).
        out_dir: the job's output directory.
        rows_in: rows the stage read; None means "every row that reached the sink" (for stages
            that map each input row to exactly one output row).

    Returns:
        The stage's counts (rows_in filled in).
    """
    sink = SplitParquetSink(stage, stage_dir(out_dir, stage), rejects_dir(out_dir, stage))
    ds.write_datasink(sink)
    counts = sink.counts or StageCounts()
    counts.rows_in = counts.rows_out + counts.rows_rejected if rows_in is None else rows_in
    return counts


def stage_dir(out_dir: str, stage: str) -> str:
    """Folder of a stage's accepted rows."""
    return os.path.join(out_dir, stage)


def rejects_dir(out_dir: str, stage: str) -> str:
    """Folder of a stage's rejects."""
    return os.path.join(out_dir, "rejects", stage)

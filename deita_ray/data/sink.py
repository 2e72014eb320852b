"""Writing a stage's output: accepted rows and rejects in one pass, resumable shard by shard.

A stage's output dataset carries the reject mark columns of :mod:`deita_ray.data.rejects`.
:class:`SplitParquetSink` splits every block it receives: accepted rows go to
``<out>/<stage>/part-*.parquet``, marked rows to ``<out>/rejects/<stage>/part-*.parquet`` with
:data:`~deita_ray.data.rejects.REJECTS_SCHEMA`. Each file is written under a temporary name and
renamed when complete, so a crash never leaves a half-written part behind.

Resume: when a driver dies in the middle of a stage, the parts already written stay.
:func:`skip_finished` drops the input rows whose ``seq`` already appears in them before the
expensive work, and :func:`write_with_rejects` counts the stage's rows from what is on disk, so
a resumed stage ends with the same rows and the same counts as an uninterrupted one.

Accounting: rows out and rows rejected come from disk; rows in must come from the stage's
input (a count of the input files or dataset, or what the read tasks report), so that
``rows in == rows out + rows rejected`` is a check that can fail.
"""

from __future__ import annotations

import glob
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deita_ray.accounting import StageCounts
from deita_ray.data.rejects import (
    DETAIL,
    MARK_COLUMNS,
    RANGE_END,
    RANGE_START,
    RANGE_UNIT,
    RAW,
    REASON,
    REJECTS_SCHEMA,
)

try:  # Ray is a core dependency, but keep this module importable for pure unit tests.
    from ray.data import Datasink
except ImportError:  # pragma: no cover
    Datasink = object  # type: ignore[assignment,misc]

TMP_PREFIX = ".tmp-"


def stage_dir(out_dir: str, stage: str) -> str:
    """Folder of a stage's accepted rows."""
    return os.path.join(out_dir, stage)


def rejects_dir(out_dir: str, stage: str) -> str:
    """Folder of a stage's rejects."""
    return os.path.join(out_dir, "rejects", stage)


def decisions_dir(out_dir: str, stage: str) -> str:
    """Folder of what a stage decided for every row it examined (``decisions/<stage>``).

    Beside the stage's output folder, not inside it: the output folder is read whole as a
    dataset (the select folder is a training set), and these rows are not training rows.
    """
    return os.path.join(out_dir, "decisions", stage)


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
            "seq": col("seq", pa.int64()),
            "stage": pa.array([stage] * n, pa.string()),
            "reason": col(REASON, pa.string()),
            "detail": col(DETAIL, pa.string()),
            "raw": col(RAW, pa.large_string()),
            "source": col("source", pa.string()),
            "range_start": col(RANGE_START, pa.int64()),
            "range_end": col(RANGE_END, pa.int64()),
            "range_unit": col(RANGE_UNIT, pa.string()),
        },
        schema=REJECTS_SCHEMA,
    )
    return good_rows, rejects


def write_atomic(table: pa.Table, folder: str, name: str) -> None:
    """Write ``folder/name`` under a temporary name first, so no reader sees a half file."""
    tmp = os.path.join(folder, TMP_PREFIX + name)
    pq.write_table(table, tmp)
    os.replace(tmp, os.path.join(folder, name))


class SplitParquetSink(Datasink):
    """Writes the accepted rows and the rejects of a marked dataset to two Parquet folders."""

    def __init__(self, stage: str, stage_dir: str, rejects_dir: str):
        self.stage = stage
        self.stage_dir = stage_dir
        self.rejects_dir = rejects_dir

    def on_write_start(self, schema: Any = None) -> None:
        for folder in (self.stage_dir, self.rejects_dir):
            os.makedirs(folder, exist_ok=True)
            for stray in glob.glob(os.path.join(folder, TMP_PREFIX + "*")):
                os.remove(stray)  # left by a task that died mid-write

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict:
        name = f"part-{getattr(ctx, 'task_idx', 0):05d}-{uuid.uuid4().hex[:12]}.parquet"
        return self.write_part(blocks, name)

    def write_part(self, blocks: Iterable[Any], name: str) -> dict:
        """Split marked blocks and write them as ``name`` in the stage and rejects folders
        (a folder gets no file when it has no rows); returns this part's counts."""
        goods, bads = [], []
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            if table.num_rows == 0:
                continue
            good, bad = split_block(table, self.stage)
            goods.append(good)
            bads.append(bad)
        rows_out = 0
        reasons: Counter = Counter()
        good = pa.concat_tables(goods, promote_options="default") if goods else None
        if good is not None and good.num_rows:
            write_atomic(good, self.stage_dir, name)
            rows_out = good.num_rows
        bad = pa.concat_tables(bads) if bads else None
        if bad is not None and bad.num_rows:
            write_atomic(bad, self.rejects_dir, name)
            reasons.update(bad["reason"].to_pylist())
        return {"rows_out": rows_out, "rejected_by_reason": dict(reasons)}


def parquet_files(folder: str, recursive: bool = False) -> list[str]:
    """Finished Parquet files in ``folder``, sorted (``.``-prefixed temp files skipped).

    Args:
        folder: the folder; a missing one has no files.
        recursive: also the files in its sub-folders, at any depth.
    """
    parts = ("**", "*.parquet") if recursive else ("*.parquet",)
    return sorted(glob.glob(os.path.join(folder, *parts), recursive=recursive))  # skips dotfiles


class WrittenRows:
    """Rows in a stage's finished parts, accepted and rejected, counted from Parquet footers;
    each part is read once, so counting again while the stage runs is cheap."""

    def __init__(self, out_dir: str, stage: str):
        self.folders = (stage_dir(out_dir, stage), rejects_dir(out_dir, stage))
        self._rows: dict[str, int] = {}

    def count(self) -> int:
        for folder in self.folders:
            for path in parquet_files(folder):
                if path not in self._rows:
                    try:
                        self._rows[path] = pq.ParquetFile(path).metadata.num_rows
                    except (OSError, pa.ArrowInvalid):  # removed since the listing
                        continue
        return sum(self._rows.values())


def _column(paths: list[str], name: str) -> list[pa.ChunkedArray]:
    cols = []
    for path in paths:
        if name in pq.read_schema(path).names:
            cols.append(pq.read_table(path, columns=[name])[name])
    return cols


def count_written(out_dir: str, stage: str) -> StageCounts:
    """Rows out and rejects by reason of a stage, read from its Parquet footers and reasons."""
    rows_out = sum(
        pq.ParquetFile(p).metadata.num_rows for p in parquet_files(stage_dir(out_dir, stage))
    )
    reasons: Counter = Counter()
    for col in _column(parquet_files(rejects_dir(out_dir, stage)), "reason"):
        reasons.update(col.to_pylist())
    return StageCounts(rows_in=0, rows_out=rows_out, rejected_by_reason=dict(reasons))


def finished_seqs(out_dir: str, stage: str) -> np.ndarray:
    """Sorted ``seq`` values of the rows a stage has already written (accepted or rejected)."""
    cols = _column(
        parquet_files(stage_dir(out_dir, stage)) + parquet_files(rejects_dir(out_dir, stage)), "seq"
    )
    if not cols:
        return np.empty(0, dtype=np.int64)
    seqs = np.concatenate([c.to_numpy(zero_copy_only=False) for c in cols]).astype(np.int64)
    return np.unique(seqs)


class _DropFinished:
    """map_batches filter: drops rows whose ``seq`` is in a sorted array of finished seqs."""

    def __init__(self, done: np.ndarray):
        self.done = done

    def __call__(self, batch: pa.Table) -> pa.Table:
        seq = batch["seq"].to_numpy(zero_copy_only=False)
        pos = np.clip(np.searchsorted(self.done, seq), 0, len(self.done) - 1)
        return batch.filter(pa.array(self.done[pos] != seq))


def skip_finished(ds: Any, out_dir: str, stage: str) -> Any:
    """Drop from ``ds`` the rows that ``stage`` already wrote in an interrupted earlier run.

    Needs a ``seq`` column (every canonical row has one). A fresh stage gets ``ds`` back as is.
    """
    done = finished_seqs(out_dir, stage)
    if done.size == 0:
        return ds
    return ds.map_batches(_DropFinished(done), batch_format="pyarrow", zero_copy_batch=True)


def in_parts(ds: Any, rows_per_part: int) -> Any:
    """``ds`` in blocks of at most ``rows_per_part`` rows (streaming: no shuffle, no barrier).

    Ray Data's Parquet reader merges small files into one read block; without this a stage
    would hand a whole pool to one model actor and write it as one part at the very end, so an
    interrupted run would keep nothing and the other actors of the pool would idle. Each block
    becomes one output part (:class:`SplitParquetSink`).
    """
    return ds.repartition(target_num_rows_per_block=rows_per_part)


def write_with_rejects(
    ds: Any, stage: str, out_dir: str, rows_in: int | Callable[[], int]
) -> StageCounts:
    """Run ``ds`` (a marked Ray Dataset) to completion, writing rows and rejects of ``stage``.

    Args:
        ds: dataset whose rows may carry the reject mark columns.
        stage: stage name (folder names and the ``stage`` column of rejects).
        out_dir: the job's output directory.
        rows_in: rows the stage read in total (including rows finished by an interrupted
            earlier run), counted from the stage's input, never from what it wrote; a
            callable is called after the write (e.g. a count the read tasks report).

    Returns:
        The stage's counts: rows out and rejected read back from disk (so a resumed stage
        counts its earlier parts), rows in as given. ``counts.check`` compares them.
    """
    ds.write_datasink(
        SplitParquetSink(stage, stage_dir(out_dir, stage), rejects_dir(out_dir, stage))
    )
    counts = count_written(out_dir, stage)
    counts.rows_in = int(rows_in() if callable(rows_in) else rows_in)
    return counts

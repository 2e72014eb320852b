"""What a stage's section of the job report gives (:class:`StageReport`), what it may read
(:class:`ReportContext`), and the helpers the sections share to read finished outputs.

The sections live in :mod:`deita_ray.report.sections`, keyed by stage name; the stages do not
know them. :mod:`deita_ray.report.assemble` asks each section of a stage of the registry, in
pipeline order, and assembles what they give into ``report.json``, ``plots/`` and
``report.html`` (docs/report.md). A section reads its stage's finished outputs and returns:

- **rows** (:attr:`StageReport.rows`): per-row facts keyed by ``id``, in the row vocabulary
  below. The report merges every stage's facts into one table (:attr:`ReportContext.rows`, a
  column first given by an earlier stage wins where it is not null) that the sample browser
  and the other stages' statistics read;
- **texts** (:attr:`StageReport.texts`): the heavy columns (``messages``) of a few ids, fetched
  only for the rows the browser shows;
- **a part** (:attr:`StageReport.build`): statistics for ``report.json`` and plots.

Row vocabulary (every column optional except ``id``):

- ``id`` (string), ``seq`` (int64: input order), ``source`` (string: input file);
- ``status`` (string: what happened to the row, e.g. ``selected``, ``similar_to_selected``,
  ``not_reached``); :data:`SELECTED` rows carry ``rank`` (int64, 0 = taken first);
- ``rejected_by`` (string id) and ``cosine`` (float64): the selected row a row was too similar
  to, and that cosine; ``max_sim`` (float64): a selected row's cosine to earlier picks;
- any other numeric column, or list of numbers, is a score (shown as such);
- ``messages`` (list of ``{role, content}``), from ``texts`` only.

Everything here is light: numpy and pyarrow at import (plots: :mod:`deita_ray.report.plots`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from deita_ray.data.sink import parquet_files

SELECTED = "selected"
"""The ``status`` of a selected row (the browser lists these in ``rank`` order)."""

NOT_SCORES = frozenset({"seq", "rank", "cosine", "max_sim"})
"""Numeric columns of the row vocabulary that are not scores."""


@dataclass
class ReportContext:
    """What a stage's report code may read.

    Attributes:
        out_dir: the job's output directory.
        stages: per stage, the result the pipeline recorded (``rows_in``, ..., ``metrics``).
        plots_dir: where to write plots, or None for statistics only.
        rows: the merged per-row facts of every stage (set before the parts are built).
    """

    out_dir: str
    stages: dict[str, dict]
    plots_dir: str | None = None
    rows: pa.Table | None = None

    def metrics(self, stage: str) -> dict:
        """The metrics a stage recorded (empty when it has none)."""
        return (self.stages.get(stage) or {}).get("metrics") or {}

    def selected(self) -> pa.Table | None:
        """The merged rows with status :data:`SELECTED`, in ``rank`` order (None if none)."""
        rows = self.rows
        if rows is None or "status" not in rows.column_names:
            return None
        sel = rows.filter(pc.fill_null(pc.equal(rows["status"], SELECTED), False))
        if "rank" in sel.column_names:
            sel = sel.sort_by([("rank", "ascending")])
        return sel if sel.num_rows else None

    def selected_ids(self) -> list[str]:
        sel = self.selected()
        return [] if sel is None else sel["id"].to_pylist()


@dataclass
class ReportPart:
    """A stage's share of the report: ``statistics`` (merged into report.json's
    ``statistics``) and the file names of the plots it wrote under ``plots_dir``."""

    statistics: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StageReport:
    """How a stage reports (its entry in :data:`deita_ray.report.sections.SECTIONS`).

    Attributes:
        rows: ``fn(ctx) -> table | None``: per-row facts (row vocabulary of this module).
        texts: ``fn(ctx, ids) -> table | None``: ``id`` + ``messages`` of those ids.
        build: ``fn(ctx) -> ReportPart``: statistics and plots (``ctx.rows`` is set).
        plots: every plot file name ``build`` may write (a rebuild removes those it did not).
        row_score: the per-row score column that orders rows (the browser's score filter).
    """

    rows: Callable[[ReportContext], pa.Table | None] | None = None
    texts: Callable[[ReportContext, Sequence[str]], pa.Table | None] | None = None
    build: Callable[[ReportContext], ReportPart] | None = None
    plots: tuple[str, ...] = ()
    row_score: str | None = None


# ---------------------------------------------------------------------------------------------
# Reading outputs


def dataset(folder: str, needed: Sequence[str] = ()) -> pds.Dataset | None:
    """The folder's Parquet files as one dataset, or None when absent or lacking a column."""
    files = parquet_files(folder)
    if not files:
        return None
    ds = pds.dataset(files, format="parquet")
    if any(name not in ds.schema.names for name in needed):
        return None
    return ds


def read_columns(folder: str, columns: Sequence[str], required: Sequence[str] = ("id",)):
    """The ``columns`` of the folder's Parquet that exist (``required`` must), or None."""
    ds = dataset(folder, required)
    if ds is None:
        return None
    return ds.to_table(columns=[c for c in columns if c in ds.schema.names])


def rows_by_id(
    folder: str, ids: Sequence[str], columns: Sequence[str], batch_rows: int = 1024
) -> pa.Table | None:
    """``columns`` (``id`` first) of the rows of ``ids``, in file order; None when the folder
    has no ``id``.

    The driver never holds a whole column (a pool's texts or embeddings are GBs at 1M rows):
    each Parquet file is read one row group of ids at a time, and only the row groups that
    hold a wanted id are streamed for the other columns, ``batch_rows`` rows at a time.
    """
    import pyarrow.parquet as pq  # noqa: PLC0415

    files = parquet_files(folder)
    if not files or not len(ids):
        return None
    wanted = pa.array(list(ids), pa.string())
    pieces: list[pa.Table] = []
    for path in files:
        # buffer_size without pre_buffer: pages are read as the batches need them.
        pf = pq.ParquetFile(path, buffer_size=1 << 22, pre_buffer=False)
        names = pf.schema_arrow.names
        if "id" not in names:
            return None
        cols = ["id", *[c for c in columns if c != "id" and c in names]]
        for group in range(pf.metadata.num_row_groups):
            group_ids = pf.read_row_group(group, columns=["id"], use_threads=False)["id"]
            hit = pc.is_in(group_ids, value_set=wanted.cast(group_ids.type))
            if not pc.any(hit).as_py():
                continue
            start = 0
            for batch in pf.iter_batches(
                batch_size=batch_rows, row_groups=[group], columns=cols, use_threads=False
            ):
                mask = hit.slice(start, batch.num_rows)
                start += batch.num_rows
                if pc.any(mask).as_py():
                    pieces.append(pa.Table.from_batches([batch]).filter(mask))
    if not pieces:
        first = pq.read_schema(files[0])
        cols = ["id", *[c for c in columns if c != "id" and c in first.names]]
        return first.empty_table().select(cols)
    return pa.concat_tables(pieces, promote_options="default")


def read_json(path: str) -> Any:
    """A JSON file's value, or None when it is absent or not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def to_numpy(array: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Float64 numpy values, nulls as NaN."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks else pa.array([], pa.float64())
    return pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)


def is_number(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def score_columns(schema: pa.Schema) -> tuple[list[str], list[str]]:
    """(per-row numeric columns, per-turn list-of-number columns) of a stage's output that
    are scores: every numeric column but those of :data:`NOT_SCORES` (booleans are flags)."""
    per_row, per_turn = [], []
    for f in schema:
        if f.name in NOT_SCORES or f.name == "id":
            continue
        if is_number(f.type):
            per_row.append(f.name)
        elif (pa.types.is_list(f.type) or pa.types.is_large_list(f.type)) and is_number(
            f.type.value_type
        ):
            per_turn.append(f.name)
    return per_row, per_turn


def score_key(column: str) -> str:
    """The statistics key of a score column: ``evol_score`` -> ``evol``,
    ``quality_scores`` -> ``quality``."""
    for suffix in ("_scores", "_score"):
        if column.endswith(suffix) and len(column) > len(suffix):
            return column[: -len(suffix)]
    return column


def merge_rows(tables: Sequence[pa.Table | None]) -> pa.Table | None:
    """Join per-row fact tables on ``id`` (every id of any table, in order of first
    appearance); a column present in several tables takes the first non-null value."""
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return None
    ids = pc.unique(pa.chunked_array([t["id"].cast(pa.string()) for t in tables]))
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    columns: dict[str, pa.Array] = {"id": ids}
    for t in tables:
        at = pc.index_in(ids, value_set=t["id"].cast(pa.string()).combine_chunks())
        for name in t.column_names:
            if name == "id":
                continue
            col = t[name].combine_chunks().take(at)
            if name not in columns:
                columns[name] = col
            elif columns[name].type == col.type and columns[name].null_count:
                columns[name] = pc.coalesce(columns[name], col)
    return pa.table(columns)


def jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays converted, NaN/inf as null."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

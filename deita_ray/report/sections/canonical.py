"""Report facts of a stage whose output is canonical rows (``id``, ``seq``, ``source``,
``messages``, ...): the rows' source file and input order, and their text on request."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from deita_ray.data.sink import stage_dir
from deita_ray.report.section import ReportContext, StageReport, read_columns, rows_by_id

ROW_COLUMNS = ("id", "seq", "source")


def canonical_rows(folder: str, extra: Sequence[str] = ()) -> pa.Table | None:
    """``id``, ``seq``, ``source`` (and ``extra`` columns) of a folder of canonical rows."""
    return read_columns(folder, [*ROW_COLUMNS, *extra])


def canonical_texts(folder: str, ids: Sequence[str]) -> pa.Table | None:
    """``id`` and ``messages`` of the rows of ``ids`` (None when the folder has no text)."""
    table = rows_by_id(folder, ids, ["messages"])
    return table if table is not None and "messages" in table.column_names else None


def canonical_report(stage: str) -> StageReport:
    """The report of a stage that writes canonical rows and nothing to plot (ingest)."""

    def rows(ctx: ReportContext) -> pa.Table | None:
        return canonical_rows(stage_dir(ctx.out_dir, stage))

    def texts(ctx: ReportContext, ids: Sequence[str]) -> pa.Table | None:
        return canonical_texts(stage_dir(ctx.out_dir, stage), ids)

    return StageReport(rows=rows, texts=texts)

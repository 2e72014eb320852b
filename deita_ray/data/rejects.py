"""The one reject record, shared by every stage.

A stage marks a row as rejected by filling the three columns below in its output batch; the
splitting sink (:mod:`deita_ray.data.sink`) writes such rows to ``rejects/<stage>/`` instead of
the stage's output. Reasons are short machine-readable snake_case strings; ``detail`` is for
people; ``raw`` holds the original record text (JSON), so nothing the user gave disappears.
Three optional columns locate a reject in its input file (filled by ingest).

Batch callables do not build these columns themselves: they decide per row whether to keep it
and record each row they cannot keep in a :class:`RejectMarks`, which attaches the columns to
their output once (the filter/base split of datatrove's pipeline blocks).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

REASON = "_reject_reason"
"""Column: null for a good row, else the machine-readable reject reason."""
DETAIL = "_reject_detail"
"""Column: human-readable detail of the rejection (may be null)."""
RAW = "_raw"
"""Column: the original record as text (JSON for parsed records, decoded bytes otherwise)."""

RANGE_START = "_range_start"
"""Column (optional): where the rejected input starts, in ``_range_unit`` (may be null)."""
RANGE_END = "_range_end"
"""Column (optional): where it ends (exclusive)."""
RANGE_UNIT = "_range_unit"
"""Column (optional): ``bytes`` (file offsets), ``decompressed_bytes`` (offsets in the
decompressed stream of a ``.gz`` file) or ``rows`` (Parquet row numbers)."""

INPUT_RANGE = (("range_start", pa.int64()), ("range_end", pa.int64()), ("range_unit", pa.string()))
"""Where a row sits in its input file: columns of the reader's rows and of every rejects file
(the mark columns above carry them from one to the other)."""

MARK_COLUMNS = (REASON, DETAIL, RAW, RANGE_START, RANGE_END, RANGE_UNIT)
"""Every mark column: the sink drops them from accepted rows."""

REJECT_MARKS = ((REASON, pa.string()), (DETAIL, pa.string()), (RAW, pa.large_string()))
"""The marks every reject has, with their Arrow types (:class:`RejectMarks` sets them)."""

REJECTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("seq", pa.int64()),
        ("stage", pa.string()),
        *((name.split("_")[-1], typ) for name, typ in REJECT_MARKS),  # reason, detail, raw
        ("source", pa.string()),
        *INPUT_RANGE,
    ]
)
"""Schema of every file under ``<output.dir>/rejects/<stage>/``. ``range_*`` locate the
rejected input in its source file (see :mod:`deita_ray.data.read`); null where the stage
does not know it (rows rejected after ingest)."""


def to_raw(record: Any) -> str:
    """Serialise a record losslessly for the ``raw`` column."""
    if isinstance(record, str):
        return record
    if isinstance(record, bytes):
        return record.decode("utf-8", errors="backslashreplace")
    return json.dumps(record, ensure_ascii=False, default=str)


def row_raw(table: pa.Table, i: int) -> str:
    """Row ``i`` of ``table`` as the ``raw`` text of a reject (its mark columns left out)."""
    row = table.slice(i, 1).to_pylist()[0]
    return to_raw({k: v for k, v in row.items() if k not in MARK_COLUMNS})


class RejectMarks:
    """The reject marks of one batch: rows are marked one by one, the columns attached once.

    A ``map_batches`` callable keeps a row by doing nothing and rejects it with
    :meth:`reject`; :meth:`attach` then adds (or replaces) the :data:`REJECT_MARKS` columns on
    its output table. ``reasons``, ``details`` and ``raws`` are the per-row lists (``None`` =
    kept).

    Example:
        >>> marks = RejectMarks(2)
        >>> marks.reject(1, "no_turns", "conversation has no user message", {"id": "b"})
        >>> marks.attach(pa.table({"id": ["a", "b"]})).column(REASON).to_pylist()
        [None, 'no_turns']
    """

    __slots__ = ("reasons", "details", "raws")

    def __init__(self, num_rows: int):
        self.reasons: list[str | None] = [None] * num_rows
        self.details: list[str | None] = [None] * num_rows
        self.raws: list[str | None] = [None] * num_rows

    def _lists(self) -> tuple[list, list, list]:
        return self.reasons, self.details, self.raws

    @classmethod
    def of(cls, table: pa.Table) -> RejectMarks:
        """Marks for the rows of ``table``, starting from the marks it already carries (rows an
        earlier callable rejected stay rejected)."""
        marks = cls(table.num_rows)
        for (name, _), values in zip(REJECT_MARKS, marks._lists(), strict=True):
            if name in table.column_names:
                values[:] = table[name].to_pylist()
        return marks

    def reject(self, i: int, reason: str, detail: str | None, raw: Any) -> None:
        """Mark row ``i`` (replacing an earlier mark): a machine-readable ``reason``, a note
        for people and the row's raw content (text is kept as is, anything else serialised
        with :func:`to_raw`)."""
        self.reasons[i] = reason
        self.details[i] = detail
        self.raws[i] = raw if raw is None or isinstance(raw, str) else to_raw(raw)

    def rejected(self, i: int) -> bool:
        """Whether row ``i`` is marked."""
        return self.reasons[i] is not None

    def attach(self, table: pa.Table) -> pa.Table:
        """``table`` with the :data:`REJECT_MARKS` columns set from the marks (replaced where
        present, else appended in that order)."""
        for (name, typ), values in zip(REJECT_MARKS, self._lists(), strict=True):
            array = pa.array(values, typ)
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, array)
            else:
                table = table.append_column(name, array)
        return table

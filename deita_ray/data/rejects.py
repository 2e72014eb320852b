"""The one reject record, shared by every stage.

A stage marks a row as rejected by filling the three columns below in its output batch; the
splitting sink (:mod:`deita_ray.data.sink`) writes such rows to ``rejects/<stage>/`` instead of
the stage's output. Reasons are short machine-readable snake_case strings; ``detail`` is for
people; ``raw`` holds the original record text (JSON), so nothing the user gave disappears.
Three optional columns locate a reject in its input file (filled by ingest).
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

MARK_COLUMNS = (REASON, DETAIL, RAW, RANGE_START, RANGE_END, RANGE_UNIT)

REJECTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("seq", pa.int64()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.large_string()),
        ("source", pa.string()),
        ("range_start", pa.int64()),
        ("range_end", pa.int64()),
        ("range_unit", pa.string()),
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

"""The reject marks that batch callables attach, and what the splitting sink makes of them."""

from __future__ import annotations

import json

import pyarrow as pa

from deita_ray.data.rejects import (
    DETAIL,
    RAW,
    REASON,
    REJECT_MARKS,
    REJECTS_SCHEMA,
    RejectMarks,
    row_raw,
)
from deita_ray.data.sink import split_block


def test_marks_attach_appends_typed_columns_in_order():
    marks = RejectMarks(3)
    marks.reject(1, "no_turns", "nothing to score", {"id": "b", "n": 2})
    marks.reject(2, "engine_error", None, "already text")
    out = marks.attach(pa.table({"id": ["a", "b", "c"]}))
    assert out.column_names == ["id", REASON, DETAIL, RAW]
    assert [(f.name, f.type) for f in out.schema][1:] == list(REJECT_MARKS)
    assert out[REASON].to_pylist() == [None, "no_turns", "engine_error"]
    assert out[DETAIL].to_pylist() == [None, "nothing to score", None]
    # text is kept verbatim, anything else serialised as JSON
    assert out[RAW].to_pylist() == [None, '{"id": "b", "n": 2}', "already text"]
    assert [marks.rejected(i) for i in range(3)] == [False, True, True]


def test_marks_of_a_marked_table_keep_earlier_rejects_and_replace_in_place():
    first = RejectMarks(2)
    first.reject(0, "prompt_too_long", "template alone is too long", "row 0")
    table = first.attach(pa.table({"id": ["a", "b"], "x": [1, 2]}))
    again = RejectMarks.of(table)
    assert again.rejected(0) and not again.rejected(1)
    again.reject(1, "non_finite_score", "nan", "row 1")
    out = again.attach(table)
    assert out.column_names == table.column_names  # replaced, not appended twice
    assert out[REASON].to_pylist() == ["prompt_too_long", "non_finite_score"]
    assert out[RAW].to_pylist() == ["row 0", "row 1"]
    assert RejectMarks.of(pa.table({"id": ["a"]})).reasons == [None]


def test_row_raw_leaves_mark_columns_out():
    marks = RejectMarks(1)
    marks.reject(0, "r", "d", "old raw")
    table = marks.attach(pa.table({"id": ["a"], "messages": [[{"role": "user", "content": "q"}]]}))
    assert json.loads(row_raw(table, 0)) == {
        "id": "a",
        "messages": [{"role": "user", "content": "q"}],
    }


def test_sink_writes_what_the_marks_say():
    marks = RejectMarks(3)
    marks.reject(2, "bad", "why", "raw text")
    good, bad = split_block(
        marks.attach(pa.table({"id": ["a", "b", "c"], "seq": [0, 1, 2]})), "stage"
    )
    assert good.column_names == ["id", "seq"] and good["id"].to_pylist() == ["a", "b"]
    assert bad.schema == REJECTS_SCHEMA
    assert bad.to_pylist() == [
        {
            "id": "c",
            "seq": 2,
            "stage": "stage",
            "reason": "bad",
            "detail": "why",
            "raw": "raw text",
            "source": None,
            "range_start": None,
            "range_end": None,
            "range_unit": None,
        }
    ]

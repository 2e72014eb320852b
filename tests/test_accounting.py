"""Row accounting: rejected rows and rows the select stage did not pick are counted apart."""

from __future__ import annotations

import json

import pytest

from deita_ray.accounting import StageCounts, current_entry, done_line
from deita_ray.report.assembly import merge_earlier_stages
from deita_ray.stages import registry

NOT_PICKED = {"similar_to_selected": 150, "not_reached": 62}


def test_not_selected_rows_balance_the_select_stage_without_being_rejects():
    c = StageCounts(rows_in=276, rows_out=64, not_selected_by_reason=NOT_PICKED)
    c.check("select")
    assert (c.rows_rejected, c.rows_not_selected) == (0, 212)
    assert c.to_dict() == {
        "rows_in": 276,
        "rows_out": 64,
        "rows_rejected": 0,
        "rejected_by_reason": {},
        "rows_not_selected": 212,
        "not_selected_by_reason": {"not_reached": 62, "similar_to_selected": 150},
    }
    # A stage that does not select has no not-selected keys at all.
    assert set(StageCounts(3, 2, {"invalid_json": 1}).to_dict()) == {
        "rows_in",
        "rows_out",
        "rows_rejected",
        "rejected_by_reason",
    }
    with pytest.raises(RuntimeError, match=r"in=277 != out=64 .* not selected=212"):
        StageCounts(rows_in=277, rows_out=64, not_selected_by_reason=NOT_PICKED).check("select")


def test_the_console_line_says_not_selected_apart_from_rejected():
    select = StageCounts(276, 64, not_selected_by_reason=NOT_PICKED).to_dict()
    assert done_line("select", 1.23, select) == (
        "stage select: done in 1.2s: in=276 out=64 rejected=0 "
        "not_selected=212 {'not_reached': 62, 'similar_to_selected': 150}"
    )
    ingest = StageCounts(10, 8, {"invalid_json": 2}).to_dict()
    assert done_line("ingest", 2.0, ingest) == (
        "stage ingest: done in 2.0s: in=10 out=8 rejected=2 {'invalid_json': 2}"
    )


def test_an_earlier_versions_select_entry_is_read_in_the_new_words(tmp_path):
    old = {"rows_in": 276, "rows_out": 64, "rows_rejected": 212, "rejected_by_reason": NOT_PICKED}
    new = current_entry(old, selects=True)
    assert (new["rows_rejected"], new["rejected_by_reason"]) == (0, {})
    assert (new["rows_not_selected"], new["not_selected_by_reason"]) == (212, NOT_PICKED)
    assert current_entry(new, selects=True) == new
    ingest = {"rows_in": 10, "rows_out": 8, "rows_rejected": 2, "rejected_by_reason": {"x": 2}}
    assert current_entry(ingest, selects=False) is ingest
    # the stage registry says which stages select
    assert [d.name for d in registry() if d.selects] == ["select"]
    # report.json of a job whose select stage an earlier version finished
    manifest = {"stages": {"select": {"status": "done", "hash": "h", "result": old}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    merged = merge_earlier_stages(str(tmp_path), {"ingest": ingest})
    assert list(merged) == ["ingest", "select"]
    assert merged["select"]["not_selected_by_reason"] == NOT_PICKED
    assert merged["select"]["rows_rejected"] == 0 and merged["select"]["earlier_run"]

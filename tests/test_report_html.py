"""report.html: a self-contained page, its sampling rule, and the page itself driven in a real
headless Chromium (Debian's package) over the DevTools protocol.

The job folders are written with pyarrow directly (benchmarks/report.py: no model runs); the
selection is the real select stage's."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from headless import Browser, local_only

import deita_ray.report.html as report_html
from deita_ray.report import rebuild, write_report
from deita_ray.report.section import SELECTED

HOSTILE = '<script>window.__pwned = 1</script></script><!-- <b onmouseover="x()">bold?</b> & co'
"""The text benchmarks/report.py plants in one row and one reject."""

DATA_SCRIPT = re.compile(
    r'<script type="application/json" id="report-data">(.*?)</script>', re.DOTALL
)


def page_data(path: Path) -> dict:
    """The JSON payload of a report.html, as the page's script reads it."""
    text = path.read_text(encoding="utf-8")
    found = DATA_SCRIPT.findall(text)
    assert len(found) == 1, "exactly one data element, closed only by its own </script>"
    return json.loads(found[0])


@pytest.fixture(scope="module")
def job(tmp_path_factory, report_bench) -> dict:
    assert report_bench.HOSTILE == HOSTILE
    return report_bench.write_job(tmp_path_factory.mktemp("html_job"), n=400, dim=16, budget=40)


@pytest.fixture(scope="module")
def browser(tmp_path_factory, chromium):
    with Browser(tmp_path_factory.mktemp("chromium-profile"), binary=chromium) as b:
        yield b


# ---------------------------------------------------------------------------------------------
# The file


def test_page_is_one_self_contained_file(job):
    html = (job["out"] / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    # Nothing is fetched: no external script, style sheet, font or image.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<link" not in html and "@import" not in html
    data = page_data(job["out"] / "report.html")
    plots = {p["name"] for p in data["plots"]}
    assert plots == {Path(p).name for p in job["report"]["plots"]}
    assert all(p["src"].startswith("data:image/png;base64,") for p in data["plots"])
    assert data["stages"][0]["name"] == "ingest" and not data["missing"]


def test_row_text_cannot_close_the_data_element(job):
    html = (job["out"] / "report.html").read_text(encoding="utf-8")
    payload = DATA_SCRIPT.findall(html)[0]
    assert "<" not in payload and ">" not in payload and "&" not in payload
    data = json.loads(payload)
    rows = data["rows"]
    at = rows["id"].index(job["hostile_id"])
    assert rows["messages"][at][0][1] == HOSTILE  # the text itself, unaltered
    raws = [r[0] for r in rows["raw"] if r]
    assert HOSTILE in raws


def test_script_json_escapes_markup_and_line_separators():
    text = report_html.script_json({"t": "</script><!--&\u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"t": "</script><!--&\u2028"}


def test_page_holds_every_selected_row_and_the_rows_that_explain_rejections(job):
    data = page_data(job["out"] / "report.html")
    rows = data["rows"]
    selected = [i for i, s in zip(rows["id"], rows["status"], strict=True) if s == SELECTED]
    assert sorted(selected) == sorted(job["report"]["selected_ids"])
    held = set(rows["id"])
    rejected_by = [b for b in rows["rejected_by"] if b is not None]
    assert rejected_by and set(rejected_by) <= held
    facts = data["status_facts"]
    select = job["stages"]["select"]
    assert facts[SELECTED]["total"] == select["rows_out"]
    assert select["rows_rejected"] == 0 and select["rejected_by_reason"] == {}
    assert select["rows_not_selected"] == select["rows_in"] - select["rows_out"]
    for reason, n in select["not_selected_by_reason"].items():
        assert facts[reason]["total"] == n
    assert list(facts)[0] == SELECTED
    # Counts per source file cover every row, rejects included.
    sources = {s["source"]: s for s in data["sources"]}
    assert sum(s["rows"] for s in sources.values()) == select["rows_in"]
    ingest_rejects = job["stages"]["ingest"]["rows_rejected"]
    assert sum(s["rejected"].get("ingest", 0) for s in sources.values()) == ingest_rejects


def test_sampling_rule(monkeypatch):
    """All selected rows in rank order (capped), a fixed-seed sample per other status, the
    best and worst by score, and every selected row that rejected a shown row."""
    monkeypatch.setattr(report_html, "MAX_SELECTED", 5)
    monkeypatch.setattr(report_html, "PER_STATUS", 4)
    monkeypatch.setattr(report_html, "TOP_BOTTOM", 2)
    n = 60
    status = ["selected"] * 8 + ["similar_to_selected"] * 30 + ["not_reached"] * 22
    rank = list(range(7, -1, -1)) + [None] * 52
    rejected_by = [None] * 8 + [f"r{k % 8}" for k in range(30)] + [None] * 22
    score = np.linspace(10.0, 1.0, n)
    score[[3, 40]] = np.nan
    rows = pa.table(
        {
            "id": [f"r{k}" for k in range(n)],
            "status": status,
            "rank": pa.array(rank, pa.int64()),
            "rejected_by": rejected_by,
            "evol_score": score,
        }
    )
    pos, facts = report_html.sample_positions(rows, "evol_score")
    again, _ = report_html.sample_positions(rows, "evol_score")
    assert pos.tolist() == again.tolist(), "fixed seed"
    held = set(pos.tolist())
    # The first 5 by rank: rows 7, 6, 5, 4, 3 hold ranks 0..4.
    assert {7, 6, 5, 4, 3} <= held
    dup = [p for p in held if status[p] == "similar_to_selected"]
    reached = [p for p in held if status[p] == "not_reached"]
    finite = [k for k in range(n) if np.isfinite(score[k])]
    best, worst = finite[:2], finite[-2:]
    extra = {*best, *worst}
    assert len(dup) == 4 + len({p for p in extra if status[p] == "similar_to_selected"})
    assert len(reached) == 4 + len({p for p in extra if status[p] == "not_reached"} - set(dup))
    assert extra <= held
    # Rejecters of held rows are held, even beyond the cap of selected rows.
    for p in dup:
        assert int(rejected_by[p][1:]) in held
    assert facts["selected"]["total"] == 8 and facts["not_reached"]["total"] == 22
    assert facts["not_reached"]["shown"] == len(reached)


# ---------------------------------------------------------------------------------------------
# Missing stages, a study, a rebuild


def test_missing_stages_are_named_and_the_rest_renders(tmp_path, job):
    out = tmp_path / "partial"
    shutil.copytree(job["out"], out)
    for folder in ("score", "embed", "select", "decisions"):
        shutil.rmtree(out / folder)
    report = json.loads((out / "report.json").read_text())
    report["stages"].pop("embed")
    (out / "report.json").write_text(json.dumps(report))
    (out / "manifest.json").write_text(
        json.dumps({"config": {"stages": ["ingest", "score", "embed", "select", "sft"]}})
    )
    rebuilt = rebuild(str(out))
    assert rebuilt["selected_ids"] == [] and rebuilt["plots"] == []
    data = page_data(out / "report.html")
    states = {s["name"]: s["state"] for s in data["stages"]}
    assert states == {
        "ingest": "done",
        "score": "outputs missing",
        "embed": "missing",
        "select": "outputs missing",
        "sft": "missing",
    }
    assert len(data["missing"]) == 4 and any(m.startswith("sft:") for m in data["missing"])
    assert data["status_facts"] == {"pool": {"total": 400, "shown": 400}}
    assert data["row_score"] is None


def test_empty_folder_renders_a_page_that_says_so(tmp_path):
    write_report(str(tmp_path), {})
    data = page_data(tmp_path / "report.html")
    assert data["rows"]["id"] == [] and data["stages"] == []
    assert data["missing"] == ["no stage result and no stage output found in this folder"]


def _study(out: Path) -> None:
    study = {
        "budget": 40,
        "arms": {
            "deita_tau0.9": {
                "method": "deita",
                "status": "done",
                "selection": {"selected": 40, "mean_evol_score": 21.5},
                "training": {"loss_last": 1.25},
                "eval": {"alpaca_eval": {"likelihood": {"value": 2.1, "ci95": [2.0, 2.2]}}},
                "seconds": {"wall": 12.0},
            },
            "random_s0": {
                "method": "random",
                "status": "failed",
                "error": "<b>boom</b>",
                "selection": {"selected": 40, "mean_evol_score": 15.0},
                "eval": {},
                "seconds": {"wall": 3.0},
            },
        },
        "comparisons": {
            "alpaca_eval": {
                "likelihood": {"verdicts": {"deita_tau0.9": "better"}, "random_spread": [2.5, 2.6]}
            }
        },
    }
    (out / "study.json").write_text(json.dumps(study))
    (out / "study.md").write_text("# Study\n\n| arm | <script>x</script> |\n")
    shutil.copy(out / "plots" / "rank_vs_evol.png", out / "plots" / "study_metrics.png")


def test_study_table_and_plots_join_the_page(tmp_path, job):
    out = tmp_path / "study"
    shutil.copytree(job["out"], out)
    _study(out)
    rebuilt = rebuild(str(out))
    assert (out / "plots" / "study_metrics.png").exists(), "a rebuild keeps the study's plots"
    assert "plots/study_metrics.png" not in rebuilt["plots"]
    study = page_data(out / "report.html")["study"]
    assert [p["name"] for p in study["plots"]] == ["study_metrics.png"]
    table = study["table"]
    assert table["columns"][:3] == ["arm", "method", "status"]
    assert "alpaca_eval likelihood [95% CI]" in table["columns"]
    first = dict(zip(table["columns"], table["rows"][0], strict=True))
    assert first["alpaca_eval likelihood [95% CI]"] == "2.100 [2.000, 2.200]"
    assert first["alpaca_eval likelihood vs random"] == "better"
    assert "<script>x</script>" in study["markdown"]


# ---------------------------------------------------------------------------------------------
# In a real browser


def _set(b: Browser, element: str, value: str, event: str = "change") -> None:
    b.eval(
        f"(() => {{ const e = document.getElementById({json.dumps(element)}); "
        f"e.value = {json.dumps(value)}; e.dispatchEvent(new Event({json.dumps(event)})); }})()"
    )


def _visible(b: Browser) -> list[dict]:
    return b.eval(
        "[...document.querySelectorAll('#rows .row-card')].map(c => ({status: c.dataset.status,"
        " id: c.dataset.id || null, text: c.innerText}))"
    )


def _shot(b: Browser, path: Path) -> Path:
    """A screenshot of the row browser."""
    b.eval("document.getElementById('browser').scrollIntoView()")
    return b.screenshot(path)


def _matched(b: Browser) -> int:
    return int(b.eval("document.getElementById('rows').dataset.matched"))


def test_page_in_headless_chromium(browser, job, tmp_path):
    b = browser
    b.open(job["out"] / "report.html")
    assert b.eval("document.body.dataset.ready") == "1"
    assert b.errors == [], b.errors
    assert local_only(b.requests), [u[:80] for u in b.requests]
    data = page_data(job["out"] / "report.html")
    facts = data["status_facts"]

    # The stage table: rows the selector did not pick are "not selected", not rejected.
    heads = b.eval("[...document.querySelectorAll('#stages th')].map(t => t.innerText)")
    cells = b.eval(
        "[...document.querySelectorAll('#stages tbody tr')].map(r => [...r.cells]"
        ".map(c => c.innerText)).find(r => r[0] === 'select')"
    )
    select = dict(zip(heads, cells, strict=True))
    not_selected = job["stages"]["select"]["rows_not_selected"]
    assert not_selected > 0
    assert (select["rejected"], select["not selected"]) == ("0", f"{not_selected:,}")
    assert "similar_to_selected" in select["not selected by reason"]
    assert select["rejected by reason"] == "\u2013"

    # Opens on the selection, in rank order.
    cards = _visible(b)
    assert _matched(b) == facts[SELECTED]["shown"] and len(cards) == 25
    assert {c["status"] for c in cards} == {SELECTED}
    assert [c["id"] for c in cards] == job["report"]["selected_ids"][:25]
    _shot(b, tmp_path / "selected.png")

    # Status filter: the near-duplicates, each beside the selected row that rejected it.
    _set(b, "f-status", "similar_to_selected")
    cards = _visible(b)
    assert _matched(b) == facts["similar_to_selected"]["shown"] > 0
    assert {c["status"] for c in cards} == {"similar_to_selected"}
    assert all("Not picked: cosine" in c["text"] for c in cards)
    assert b.eval("document.querySelectorAll('#rows .pair').length") == len(cards)
    shot = _shot(b, tmp_path / "near_duplicates.png")

    # Borderline first: the lowest cosines above tau, the pairs to check before trusting tau.
    def shown_cosines() -> list[float]:
        return [
            float(re.search(r"Not picked: cosine ([0-9.]+)", c["text"]).group(1))
            for c in _visible(b)
        ]

    _set(b, "f-sort", "cosine_asc")
    low_first = shown_cosines()
    assert low_first and low_first == sorted(low_first)
    _set(b, "f-sort", "cosine_desc")
    assert shown_cosines()[0] >= low_first[-1]
    _set(b, "f-sort", "default")

    # Source filter narrows further.
    source = data["sources"][0]["source"]
    _set(b, "f-source", source)
    narrowed = _matched(b)
    assert 0 < narrowed < facts["similar_to_selected"]["shown"]
    assert all(source in c["text"] for c in _visible(b))

    # Score range and ordering.
    _set(b, "f-source", "all")
    _set(b, "f-status", "all")
    _set(b, "f-sort", "score_desc")
    _set(b, "f-min", "20")
    _set(b, "f-max", "25")
    scores = b.eval(
        "[...document.querySelectorAll('#rows .row-card .row-head')].map(h => h.innerText)"
    )
    values = [float(re.search(r"evol_score ([0-9.]+)", s).group(1)) for s in scores]
    assert values and all(20 <= v <= 25 for v in values) and values == sorted(values, reverse=True)
    _set(b, "f-min", "")
    _set(b, "f-max", "")

    # Text search finds the hostile row, and its markup is shown as text, never run.
    _set(b, "f-search", "window.__pwned", "input")
    cards = _visible(b)
    assert {c["id"] for c in cards if c["id"]} == {job["hostile_id"]}
    assert any(c["status"] == "rejected" for c in cards)  # the reject with the same raw text
    assert all(HOSTILE in c["text"] for c in cards)
    assert b.eval("typeof window.__pwned") == "undefined"
    assert b.eval("document.querySelectorAll('#rows b, #rows script').length") == 0
    _shot(b, tmp_path / "hostile.png")

    # Rejects per stage and reason, with their raw text.
    _set(b, "f-search", "", "input")
    _set(b, "f-status", "rejected")
    assert _matched(b) == sum(r["shown"] for r in data["reject_summary"])
    assert {c["status"] for c in _visible(b)} == {"rejected"}
    assert b.errors == [], b.errors

    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_partial_report_in_headless_chromium(browser, job, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(job["out"], out)
    shutil.rmtree(out / "select")
    shutil.rmtree(out / "embed")
    _study(out)
    rebuild(str(out))
    b = browser
    b.errors.clear()
    b.open(out / "report.html")
    assert b.eval("document.body.dataset.ready") == "1"
    assert b.errors == [], b.errors
    missing = b.eval("document.getElementById('missing').innerText")
    assert "select" in missing and "embed" in missing
    assert b.eval("document.querySelectorAll('#study table tr').length") == 3
    assert "<script>x</script>" in b.eval("document.querySelector('#study pre').textContent")
    # Without a selection the page opens on every row of the pool.
    assert _matched(b) == b.eval(
        "JSON.parse(document.getElementById('report-data').textContent).rows.id.length"
    )
    b.screenshot(tmp_path / "partial.png", full_page=True)


def test_long_rows_are_cut_and_say_so():
    msgs = [
        {"role": "user" if k % 2 == 0 else "assistant", "content": "x" * 1000} for k in range(9)
    ]
    msgs[0]["content"] = "y" * 5000
    shown, hidden = report_html._messages(msgs)
    chars = sum(len(m[1]) for m in shown)
    assert chars == report_html.ROW_CHARS
    assert shown[0][1] == "y" * report_html.MESSAGE_CHARS
    assert shown[0][2] == 5000 - report_html.MESSAGE_CHARS
    assert hidden == [9 - len(shown), 1000 * (9 - len(shown))]
    assert report_html._messages(msgs[1:3]) == (
        [["assistant", "x" * 1000, 0], ["user", "x" * 1000, 0]],
        None,
    )

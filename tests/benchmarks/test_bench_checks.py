"""The benchmarks check themselves: a failed check exits 1 and prints no ratio, results carry the
machine they ran on, every ratio's sides are timed interleaved, and the README's table is built
from the result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import _common  # noqa: E402
from benchmarks import render_readme as rr  # noqa: E402


def _has_ratio(text: str) -> bool:
    low = text.lower()
    return "ratio" in low or "_over_" in low or "_vs_" in low


def test_require_passes_when_outputs_agree(capsys):
    _common.require("x", {"ids_equal": True, "counts_equal": True}, {"n": 3})
    assert capsys.readouterr().out == ""


def test_failed_check_exits_nonzero_without_ratio(capsys):
    facts = {"max_abs_diff": 0.5, "ours_over_reference": 3.0, "nested": {"speed_ratio": 2}}
    with pytest.raises(SystemExit) as exit_info:
        _common.require("demo", {"ids_equal": False, "counts_equal": True}, facts)
    assert exit_info.value.code == 1
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["ok"] is False and report["failed_checks"] == ["ids_equal"]
    assert report["facts"] == {"max_abs_diff": 0.5, "nested": {}}
    assert not _has_ratio(out.out)
    assert "ids_equal" in out.err and "no ratio" in out.err


def test_failed_check_in_a_process_exits_1_and_writes_no_result(tmp_path):
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from benchmarks._common import require, finish;"
        "require('demo', {'ids_equal': [1, 2] == [1, 3]}, {'ids': [[1, 2], [1, 3]]});"
        "finish('demo', {'ratios': {'ours_over_reference': 9.9}})"
    )
    env = {**os.environ, "DEITA_BENCH_RESULTS": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 1
    assert not _has_ratio(done.stdout) and "9.9" not in done.stdout
    assert not list(tmp_path.iterdir())


def test_write_result_records_the_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("DEITA_BENCH_RESULTS", str(tmp_path))
    path = _common.write_result(
        "demo", {"quick": True, "x": np.float32(1.5), "machine": {"load_avg_at_start": [1, 2, 3]}}
    )
    assert path == tmp_path / "demo.json"
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "demo" and doc["quick"] is True and doc["x"] == 1.5
    m = doc["machine"]
    for key in ("cores", "memory_gib", "load_avg", "versions", "commit", "date", "python"):
        assert m.get(key) not in (None, "", []), key
    assert m["load_avg_at_start"] == [1, 2, 3] and "numpy" in m["versions"]
    assert len(m["commit"]) == 40


def test_interleaved_runs_sides_in_turn():
    calls: list[str] = []
    sides = {
        "a": lambda: calls.append("a") or "out-a",
        "b": lambda: (calls.append("b"), _common.Timed(0.25, "out-b"))[1],
    }
    res = _common.interleaved(sides, 3)
    assert calls == ["a", "b"] * 3
    assert res["b"]["runs_s"] == [0.25] * 3 and res["b"]["min_s"] == 0.25
    assert res["a"]["outputs"] == ["out-a"] * 3 and res["a"]["min_s"] == min(res["a"]["runs_s"])


def test_select_benchmark_checks_itself(monkeypatch, capsys):
    """The single-node part at toy sizes: its checks hold; when one device's ids differ from
    the others', the check fails and the run stops before any ratio is printed."""
    bs = pytest.importorskip("benchmarks.select")
    res, checks, facts = bs.single_node(2000, 16, 100, 0.9, 256, 0.5, 5.0, 1)
    assert all(checks.values()), checks
    assert res["ratios"]["reference_over_ours_extrapolated"] > 0
    assert "extrapolated" in res["reference"]["note"]

    real = bs.select_diverse

    def one_device_wrong(*args, **kw):
        r = real(*args, **kw)
        if kw.get("device") == "cpu" and len(r.indices) > 1:
            r.indices = r.indices[::-1].copy()
        return r

    monkeypatch.setattr(bs, "select_diverse", one_device_wrong)
    _, checks, facts = bs.single_node(2000, 16, 100, 0.9, 256, 0.5, 5.0, 1)
    assert checks["ours_ids_equal_numpy_torch_explain_or_not"] is False
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        bs.require(bs.NAME, checks, facts)
    assert exit_info.value.code == 1
    assert not _has_ratio(capsys.readouterr().out)


def test_distributed_check_compares_every_row(tmp_path):
    """The 1M-row comparison's logic at toy size: equal when the distributed arrays are the
    single-node ones, unequal as soon as one row's explanation differs."""
    bs = pytest.importorskip("benchmarks.select")
    folder = tmp_path / "embed"
    bs.write_pool(str(folder), 400, 8, 150)
    check_args = (str(folder), 60, 0.9, 64)
    emb = np.load(tmp_path / "embeddings.npy")
    import pyarrow.dataset as pds

    t = pds.dataset(str(folder), format="parquet").to_table()
    r = bs.select_diverse(
        emb,
        t["evol_score"].to_numpy(),
        0.9,
        60,
        seq=t["seq"].to_numpy(),
        ids=t["id"].to_pylist(),
        device="numpy",
    )
    arrays = {
        "indices": r.indices,
        "ids": np.asarray(r.ids),
        "row_status": r.row_status,
        "rejected_by": r.rejected_by,
        "rejected_sim": r.rejected_sim,
    }
    np.savez(tmp_path / "distributed.npz", **arrays)
    got = bs.single_node_check(*check_args)
    assert got["rejected_rows"] > 0
    assert all(got[k] for k in got if k.endswith("_equal")), got
    bad = dict(arrays)
    bad["rejected_by"] = r.rejected_by.copy()
    i = int(np.flatnonzero(r.rejected_by >= 0)[0])
    bad["rejected_by"][i] += 1
    np.savez(tmp_path / "distributed.npz", **bad)
    got = bs.single_node_check(*check_args)
    assert got["ids_equal"] and not got["rejected_by_equal"]


README = """# demo

intro

<!-- bench:start -->
old table
<!-- bench:end -->

after
"""


def _result(folder: Path, name: str, quick: bool, rows: list[dict]) -> None:
    doc = {
        "benchmark": name,
        "quick": quick,
        "readme": rows,
        "machine": {
            "date": "2026-12-01T00:00:00+00:00",
            "commit": "0123456789abcdef0123456789abcdef01234567",
            "uncommitted_changes": False,
            "cores": 2,
            "load_avg": [2.04, 2, 2],
        },
    }
    (folder / f"{name}.json").write_text(json.dumps(doc))


def test_render_readme_builds_the_table_from_results(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(README)
    earlier = {"date": "2026-11-30T00:00:00+00:00", "commit": "fedcba9876", "load_avg": [9, 9, 9]}
    _result(
        results,
        "select",
        False,
        [
            {"setting": "100K x 1024", "result": "0.5 s | fast"},
            {"setting": "1M distributed", "result": "40 s", "run": earlier},
        ],
    )
    _result(results, "score", True, [{"setting": "40 rows", "result": "quick figure"}])
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    for name in ("select", "score", "embed", "_common", "render_readme"):
        (bench_dir / f"{name}.py").write_text("")
    text = rr.render_readme(readme, results, bench_dir)
    assert text.startswith("# demo\n\nintro\n\n<!-- bench:start -->\n")
    assert text.endswith("<!-- bench:end -->\n\nafter\n") and "old table" not in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| `select.py`"))
    assert "100K x 1024" in row and "0.5 s \\| fast" in row
    assert "2026-12-01" in row and "`0123456`" in row and "load 2.0" in row
    dist = next(ln for ln in text.splitlines() if "1M distributed" in ln)
    assert "2026-11-30" in dist and "`fedcba9`" in dist and "load 9.0" in dist  # its own run
    assert "quick figure" not in text  # quick runs are never figures
    assert "Quick runs only" in text and "`score.py`" in text
    assert "No full run recorded yet: `embed.py` (run it" in text  # not _common, render_readme


def test_render_readme_names_a_mode_by_its_script(tmp_path):
    """``score.py --kinds`` writes ``score_kinds.json``: its rows name the command, right after
    ``score.py``'s, and no ``score_kinds.py`` appears."""
    results = tmp_path / "results"
    results.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(README)
    _result(results, "score", False, [{"setting": "pair", "result": "r"}])
    _result(results, "score_kinds", False, [{"setting": "ppl", "result": "k"}])
    _result(results, "embed", False, [{"setting": "emb", "result": "e"}])
    doc = json.loads((results / "score_kinds.json").read_text())
    (results / "score_kinds.json").write_text(json.dumps({**doc, "script": "score.py --kinds"}))
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    for name in ("score", "embed"):
        (bench_dir / f"{name}.py").write_text("")
    lines = rr.render_readme(readme, results, bench_dir).splitlines()
    rows = [ln for ln in lines if ln.startswith("| `")]
    assert rows[0].startswith("| `score.py` | pair |")
    assert rows[1].startswith("| `score.py --kinds` | ppl |")
    assert rows[2].startswith("| `embed.py` | emb |")
    assert not any("score_kinds.py" in ln for ln in lines)


def test_render_readme_cli_check_and_write(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(README)
    _result(results, "select", False, [{"setting": "s", "result": "r"}])
    args = ["--readme", str(readme), "--results", str(results)]
    assert rr.main([*args, "--check"]) == 1
    assert readme.read_text() == README
    assert rr.main(args) == 0
    assert "| `select.py` | s | r |" in readme.read_text()
    assert rr.main([*args, "--check"]) == 0
    (tmp_path / "NOMARK.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="bench:start"):
        rr.render_readme(tmp_path / "NOMARK.md", results)


def test_repository_readme_has_the_markers():
    text = (REPO / "README.md").read_text()
    assert text.index(rr.START) < text.index(rr.END)

"""report.json and the plots, built from a small fake job output written with pyarrow in each
stage's real schema (the selection made by the project's own greedy selector)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import deita_ray.report as report_module
from deita_ray.config import PipelineConfig
from deita_ray.data.formats import CANONICAL_SCHEMA
from deita_ray.report import write_report
from deita_ray.report.section import ReportContext
from deita_ray.report.sections.select import (
    read_selected_embeddings,
    read_selection,
    selection_tau,
)
from deita_ray.selection.calibration import summarize
from deita_ray.selection.greedy import select_diverse

REPO = Path(__file__).resolve().parents[1]
N, DIM, TAU, BUDGET = 300, 32, 0.9, 40
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOT_NAMES = (
    "score_distributions.png",
    "complexity_vs_quality.png",
    "rank_vs_evol.png",
    "nearest_neighbour_similarity.png",
    "tau_curve.png",
    "training_loss.png",
)


def _canonical(ids: list[str], seq: np.ndarray) -> dict[str, pa.Array]:
    n = len(ids)
    msgs = [
        [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]
        for i in ids
    ]
    cols = [
        pa.array(ids, pa.string()),
        pa.array(seq, pa.int64()),
        pa.array(msgs, CANONICAL_SCHEMA.field("messages").type),
        pa.array(["pool.jsonl"] * n),
        pa.array(["alpaca"] * n),
        pa.array(["{}"] * n, pa.large_string()),
    ]
    return dict(zip(CANONICAL_SCHEMA.names, cols, strict=True))


def _write(folder: Path, table: pa.Table, parts: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-table.num_rows // parts)
    for k in range(parts):
        pq.write_table(table.slice(k * step, step), folder / f"part-{k:05d}.parquet")


@pytest.fixture(scope="module")
def job(tmp_path_factory, report_bench) -> dict:
    """A job output with every stage: ingest, score, embed, select (the real stage), rejects,
    plus the training stages' recorded losses (benchmarks/report.py writes it)."""

    def entry(n: int, metrics: dict) -> dict:
        return {
            "rows_in": n,
            "rows_out": n,
            "rows_rejected": 0,
            "rejected_by_reason": {},
            "seconds": 1.5,
            "rows_per_s": n / 1.5,
            "metrics": metrics,
        }

    training = {
        "sft": entry(BUDGET, {"loss": [3.0, 2.5, 2.1, 1.9, 1.8], "lr": [1e-5] * 5}),
        "dpo": entry(BUDGET, {"loss": [0.69, 0.6, 0.52]}),
    }
    out = tmp_path_factory.mktemp("job")
    facts = report_bench.write_job(
        out, n=N, dim=DIM, budget=BUDGET, tau=TAU, extra_stages=training, notes=["a note"]
    )
    ref = select_diverse(
        facts["emb"],
        facts["evol"],
        tau=TAU,
        budget=BUDGET,
        seq=facts["seq"],
        ids=facts["ids"],
        device="numpy",
    )
    assert facts["stages"]["select"]["rows_out"] == ref.indices.size
    return {**facts, "idx": ref.indices, "max_sim": ref.max_sim}


def _check_png(path: Path) -> None:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes)"
    img = imread(path)
    assert img.shape[0] >= 300 and img.shape[1] >= 400
    assert float(img[..., :3].std()) > 0.02, f"{path} looks blank"


def test_report_json_written_with_all_sections(job):
    on_disk = json.loads((job["out"] / "report.json").read_text())
    assert on_disk == job["report"]
    assert sorted(on_disk) == ["notes", "plots", "selected_ids", "stages", "statistics"]
    assert on_disk["stages"] == job["stages"]
    assert on_disk["notes"] == ["a note"]
    assert (job["out"] / "report.html").stat().st_size > 10_000


def test_selected_ids_in_rank_order(job):
    assert job["report"]["selected_ids"] == [job["ids"][i] for i in job["idx"]]
    assert len(job["report"]["selected_ids"]) == BUDGET


def test_score_statistics_pool_vs_selection(job):
    scores = job["report"]["statistics"]["scores"]
    flat_c = np.concatenate(job["comp"])
    flat_q = np.concatenate(job["qual"])
    pool = scores["pool"]
    assert pool["rows"] == N and pool["missing_evol"] == 1
    assert pool["complexity"]["count"] == flat_c.size > N  # per turn
    assert pool["complexity"]["mean"] == pytest.approx(flat_c.mean())
    assert pool["quality"]["median"] == pytest.approx(np.median(flat_q))
    assert pool["quality"]["p90"] == pytest.approx(np.percentile(flat_q, 90))
    finite = job["evol"][np.isfinite(job["evol"])]
    assert pool["evol"]["count"] == N - 1
    assert pool["evol"]["min"] == pytest.approx(finite.min())
    assert pool["evol"]["max"] == pytest.approx(finite.max())

    sel = scores["selection"]
    idx = job["idx"]
    assert sel["rows"] == BUDGET and sel["missing_evol"] == 0
    assert sel["evol"]["mean"] == pytest.approx(job["evol"][idx].mean())
    assert sel["complexity"]["mean"] == pytest.approx(
        np.concatenate([job["comp"][i] for i in idx]).mean()
    )
    # Score-first selection: the selection's mean evol score beats the pool's.
    assert sel["evol"]["mean"] > pool["evol"]["mean"]


def test_similarity_statistics(job):
    sim = job["report"]["statistics"]["similarity"]
    assert sim["tau"] == TAU and sim["selected"] == BUDGET
    # Brute force nearest selected neighbour of every selected row.
    x = job["emb"][job["idx"]].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    nn = s.max(axis=1)
    assert sim["nearest_neighbour"]["max"] == pytest.approx(nn.max(), abs=1e-5)
    assert sim["nearest_neighbour"]["mean"] == pytest.approx(nn.mean(), abs=1e-5)
    assert sim["nearest_neighbour"]["max"] <= TAU + 1e-6
    assert sim["nearest_neighbour_above_tau"] == 0
    assert sim["max_sim"] == summarize(job["max_sim"])  # NaN of the first pick dropped
    assert sim["max_sim"]["count"] == BUDGET - 1


def test_every_plot_exists_and_is_an_image(job):
    plots = job["report"]["plots"]
    assert sorted(Path(p).name for p in plots) == sorted(PLOT_NAMES)
    for rel in plots:
        assert rel.startswith("plots/")
        _check_png(job["out"] / rel)


def test_ingest_only_job_gets_report_without_plots(tmp_path):
    canon = _canonical(["a", "b", "c"], np.arange(3))
    _write(tmp_path / "ingest", pa.table(canon, schema=CANONICAL_SCHEMA), parts=1)
    stages = {
        "ingest": {
            "rows_in": 3,
            "rows_out": 3,
            "rows_rejected": 0,
            "rejected_by_reason": {},
            "seconds": 0.1,
            "rows_per_s": 30.0,
            "metrics": {},
        }
    }
    report = write_report(str(tmp_path), stages)
    assert report == {
        "stages": stages,
        "statistics": {},
        "selected_ids": [],
        "plots": [],
        "notes": [],
    }
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert not list(tmp_path.glob("plots/*.png"))


def test_cli_rebuilds_plots_and_drops_stale_ones(job, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(job["out"], out)
    shutil.rmtree(out / "plots")
    (out / "report.html").unlink()
    cmd = [sys.executable, "-m", "deita_ray.report", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rebuilt = json.loads((out / "report.json").read_text())
    assert rebuilt == job["report"]
    page = (out / "report.html").read_text()
    assert json.loads(proc.stdout)["html"] == str(out / "report.html")
    assert all(i in page for i in rebuilt["selected_ids"])
    for rel in rebuilt["plots"]:
        _check_png(out / rel)
    # Without the selection and the training metrics, their plots and statistics go away.
    shutil.rmtree(out / "select")
    old = json.loads((out / "report.json").read_text())
    old["stages"] = {k: v for k, v in old["stages"].items() if k not in ("select", "sft", "dpo")}
    (out / "report.json").write_text(json.dumps(old))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rebuilt = json.loads((out / "report.json").read_text())
    assert sorted(Path(p).name for p in rebuilt["plots"]) == [
        "complexity_vs_quality.png",
        "score_distributions.png",
    ]
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == [
        "complexity_vs_quality.png",
        "score_distributions.png",
    ]
    assert rebuilt["selected_ids"] == [] and "similarity" not in rebuilt["statistics"]
    assert "selection" not in rebuilt["statistics"]["scores"]


def test_cli_rejects_missing_dir(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "deita_ray.report", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "not a directory" in proc.stderr


def test_read_selected_embeddings_float16_in_requested_order(tmp_path):
    vecs = np.arange(12, dtype=np.float16).reshape(4, 3)
    table = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vecs.reshape(-1), pa.float16()), 3
            ),
        }
    )
    _write(tmp_path / "embed", table, parts=2)
    got = read_selected_embeddings(str(tmp_path), ["d", "a"])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, vecs[[3, 0]].astype(np.float32))
    assert read_selected_embeddings(str(tmp_path), ["a", "zz"]) is None


def test_selection_read_in_rank_order(tmp_path):
    table = pa.table(
        {
            "id": ["c", "a", "b"],
            "rank": pa.array([2, 0, 1], pa.int64()),
            "evol_score": [1.0, 3.0, 2.0],
            "max_sim": [0.5, None, 0.1],
        }
    )
    _write(tmp_path / "select", table, parts=2)
    sel = read_selection(str(tmp_path))
    assert sel["id"].to_pylist() == ["a", "b", "c"]
    assert report_module.write_report(str(tmp_path), {})["selected_ids"] == ["a", "b", "c"]


def test_tau_from_metrics_or_manifest(tmp_path):
    def tau(stages: dict) -> float | None:
        return selection_tau(ReportContext(str(tmp_path), stages))

    assert tau({"select": {"metrics": {"tau": 0.8}}}) == 0.8
    # A method without a threshold: no tau line, even though the config has a default tau.
    (tmp_path / "manifest.json").write_text(
        json.dumps({"config": {"select": {"method": "random", "tau": 0.9}}})
    )
    assert tau({"select": {"metrics": {"tau": None}}}) is None
    assert tau({}) is None
    (tmp_path / "manifest.json").write_text(
        json.dumps({"config": {"select": {"method": "deita", "tau": 0.7}}})
    )
    assert tau({}) == 0.7


def test_a_later_job_in_the_same_dir_reports_every_finished_stage(job, tmp_path):
    """The DPO job writes into the SFT job's output dir: its report keeps the stages the SFT
    job finished there (from manifest.json) and that report's notes, next to its own."""
    out = tmp_path / "sft_then_dpo"
    shutil.copytree(job["out"], out)
    earlier = {k: v for k, v in job["stages"].items() if k != "dpo"}
    manifest = {
        "version": 2,
        "stages": {
            **{k: {"status": "done", "hash": k, "result": v} for k, v in earlier.items()},
            "dpo": {"status": "running", "hash": "x"},  # not finished: not an earlier result
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    dpo = dict(job["stages"]["dpo"], metrics={"loss": [0.69, 0.5]})
    report = write_report(str(out), {"dpo": dpo}, notes=["dpo note"])
    assert list(report["stages"]) == ["ingest", "score", "embed", "select", "sft", "dpo"]
    assert report["stages"]["dpo"] == dpo
    assert report["stages"]["sft"] == dict(earlier["sft"], earlier_run=True)
    assert report["notes"] == ["a note", "dpo note"]
    assert report["selected_ids"] == job["report"]["selected_ids"]
    assert "similarity" in report["statistics"] and "training_loss.png" in str(report["plots"])


def test_the_browser_orders_rows_by_the_selections_own_score(job, tmp_path):
    """With the default select.score the browser's score is evol_score; with another, the
    decisions' selection_score (the value the selection ordered by, for every pool row)."""
    from deita_ray.report.assembly import assemble
    from deita_ray.stages.select import run_select

    assert assemble(str(job["out"]), job["stages"]).row_score == "evol_score"
    out = tmp_path / "negated"
    shutil.copytree(job["out"], out)
    cfg = PipelineConfig()
    cfg.select.tau, cfg.select.budget, cfg.select.score = TAU, BUDGET, "-evol_score"
    result = run_select(cfg, str(out))
    stages = dict(job["stages"], select={"metrics": result.metrics})
    built = assemble(str(out), stages)
    assert built.row_score == "selection_score"
    rows = built.context.rows
    evol = rows["evol_score"].to_numpy(zero_copy_only=False)
    got = rows["selection_score"].to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(got, -evol)


def test_eval_part_shows_each_sets_metrics_with_their_intervals(tmp_path):
    from deita_ray.report.sections.eval import build

    lk = {"nll_token_mean": 1.25, "nll_token_mean_ci95": [1.1, 1.4], "rows": 48}
    judge = {"rating_mean": 6.5, "rating_mean_ci95": [6.0, 7.0]}
    metrics = {
        "model": "/m/sft/final",
        "model_kind": "sft",
        "sets": {
            "alpaca_eval": {
                "rows": 48,
                "contaminated": 2,
                "rejected_by_reason": {},
                "likelihood": lk,
            },
            "mt_bench": {
                "rows": 80,
                "contaminated": 0,
                "rejected_by_reason": {},
                "judge_single": judge,
            },
        },
    }
    ctx = ReportContext(
        out_dir=str(tmp_path), stages={"eval": {"metrics": metrics}}, plots_dir=str(tmp_path)
    )
    part = build(ctx)
    sets = part.statistics["evaluation"]["sets"]
    assert sets["alpaca_eval"]["likelihood"] == {
        "value": 1.25,
        "ci95": [1.1, 1.4],
        "better": "lower",
    }
    assert sets["mt_bench"]["judge_single"]["better"] == "higher"
    assert "likelihood" not in sets["mt_bench"] and sets["alpaca_eval"]["contaminated"] == 2
    assert part.plots == ["eval_metrics.png"]
    _check_png(tmp_path / "eval_metrics.png")
    empty = ReportContext(out_dir=str(tmp_path), stages={}, plots_dir=str(tmp_path))
    assert build(empty).statistics == {} and build(empty).plots == []

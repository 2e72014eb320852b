"""The pipeline's resume plan and its command line (no Ray needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from deita_ray.config import load_config
from deita_ray.pipeline import plan

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "input": {"paths": ["pool.jsonl"]},
    "stages": ["ingest", "score", "embed", "select", "sft"],
    "sft": {"global_batch_size": 8},  # one SFT step fits the small budgets below
}


def _done(cfg) -> dict:
    return {"stages": {s: {"status": "done", "hash": h, "result": {}} for s, h, _ in plan(cfg, {})}}


def test_fresh_output_runs_every_stage():
    cfg = load_config(data=BASE)
    assert [(s, run) for s, _, run in plan(cfg, {})] == [
        ("ingest", True),
        ("score", True),
        ("embed", True),
        ("select", True),
        ("sft", True),
    ]


def test_same_config_skips_everything():
    cfg = load_config(data=BASE)
    assert not any(run for _, _, run in plan(cfg, _done(cfg)))


def test_changed_budget_reruns_select_and_later_only():
    cfg = load_config(data=BASE)
    manifest = _done(cfg)
    cfg2 = load_config(data=BASE, overrides=["select.budget=10"])
    assert [(s, run) for s, _, run in plan(cfg2, manifest)] == [
        ("ingest", False),
        ("score", False),
        ("embed", False),
        ("select", True),
        ("sft", True),
    ]


def test_changed_scorer_reruns_score_and_later():
    cfg = load_config(data=BASE)
    cfg2 = load_config(data=BASE, overrides=["score.quality_model.backend=hf"])
    runs = {s: run for s, _, run in plan(cfg2, _done(cfg))}
    assert runs == {"ingest": False, "score": True, "embed": True, "select": True, "sft": True}


def test_actor_pool_size_does_not_invalidate_results():
    cfg = load_config(data=BASE)
    cfg2 = load_config(data=BASE, overrides=["score.resources.concurrency=4"])
    assert not any(run for _, _, run in plan(cfg2, _done(cfg)))


def test_placement_and_part_size_do_not_invalidate_results():
    cfg = load_config(data=BASE)
    overrides = [
        "score.resources.custom_resources={scorer_node: 1}",
        "embed.resources.custom_resources={scorer_node: 1}",
        "sft.custom_resources={trainer_node: 1}",
        "output.rows_per_part=64",
        "output.progress_every_s=5",
    ]
    cfg2 = load_config(data=BASE, overrides=overrides)
    assert not any(run for _, _, run in plan(cfg2, _done(cfg)))


def test_a_running_stage_is_not_finished():
    cfg = load_config(data=BASE)
    manifest = _done(cfg)
    manifest["stages"]["embed"]["status"] = "running"  # the driver died here
    runs = {s: run for s, _, run in plan(cfg, manifest)}
    assert runs == {"ingest": False, "score": False, "embed": True, "select": True, "sft": True}


def test_a_later_job_with_fewer_stages_chains_on_finished_ones():
    cfg = load_config(data=BASE)
    manifest = _done(cfg)
    only_select = load_config(data=dict(BASE, stages=["select"]), overrides=["select.tau=0.8"])
    steps = plan(only_select, manifest)
    assert [(s, run) for s, _, run in steps] == [("select", True)]
    # and running it again with the same settings is a no-op
    manifest["stages"]["select"]["hash"] = steps[0][1]
    assert plan(only_select, manifest)[0][2] is False


def test_cli_rejects_a_bad_value_naming_the_key():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "deita_ray.pipeline",
            "--config",
            str(REPO / "jobs" / "quickstart.yaml"),
            "--set",
            "select.tau=2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "select.tau: 2.0 must be <= 1" in out.stderr


def test_cli_help_config_lists_keys():
    out = subprocess.run(
        [sys.executable, "-m", "deita_ray.pipeline", "--help-config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0
    assert "select.tau (float, default 0.9)" in out.stdout
    assert "input.role_map" in out.stdout


def test_progress_lines_count_the_rows_on_disk(tmp_path, caplog):
    """While a stage that writes part by part and has no batch counter runs (ingest; here the
    score stage without its counter), the driver logs its rows on disk (accepted and rejected)
    out of its input's rows."""
    import dataclasses
    import logging
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    from deita_ray.pipeline import StageProgress
    from deita_ray.stages import registry

    score = next(s for s in registry() if s.name == "score")
    score = dataclasses.replace(score, counts_batches=False)
    (tmp_path / "ingest").mkdir()
    pq.write_table(pa.table({"seq": list(range(40))}), tmp_path / "ingest" / "part-0.parquet")
    for folder in (tmp_path / "score", tmp_path / "rejects" / "score"):
        folder.mkdir(parents=True)
    info = caplog.at_level(logging.INFO, logger="deita_ray")
    with info, StageProgress(score, str(tmp_path), every_s=0.05) as progress:
        assert progress.input_rows() == 40
        time.sleep(0.2)
        pq.write_table(pa.table({"seq": list(range(8))}), tmp_path / "score" / "part-1.parquet")
        pq.write_table(pa.table({"seq": [8, 9]}), tmp_path / "rejects" / "score" / "part-1.parquet")
        time.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage score:")]
    assert lines[0].startswith("stage score: 0/40 rows (0.0%)")
    assert lines[-1].startswith("stage score: 10/40 rows (25.0%)")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deita_ray"), StageProgress(score, str(tmp_path), 0):
        time.sleep(0.1)
    assert not caplog.records  # progress_every_s: 0 turns the lines off


def test_the_ray_actor_restart_line_is_explained_once_per_process(monkeypatch, caplog):
    import logging

    from deita_ray import pipeline

    monkeypatch.setattr(pipeline, "_ACTOR_LINE_NOTED", False)
    with caplog.at_level(logging.INFO, logger="deita_ray"):
        pipeline._note_actor_restart_line()
        pipeline._note_actor_restart_line()
    lines = [r.getMessage() for r in caplog.records if "core_worker.cc" in r.getMessage()]
    assert len(lines) == 1 and "not an error of this job" in lines[0]
    assert "ray-project/ray#57733" in lines[0]

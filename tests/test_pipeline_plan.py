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

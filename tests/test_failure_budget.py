"""A systematic failure stops the job: failure budgets, and a selection with no candidate."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deita_ray.accounting import FailureBudgetExceeded, StageCounts, StageResult, over_budget
from deita_ray.config import ConfigError, PipelineConfig, load_config
from deita_ray.data.rejects import REJECTS_SCHEMA
from deita_ray.stages import registry
from deita_ray.stages.base import Stage

sys.path.insert(0, str(Path(__file__).parent / "selection"))
from test_distributed import write_embed_parquet  # noqa: E402


def test_over_budget_per_reason_then_overall():
    counts = StageCounts(rows_in=100, rows_out=90, rejected_by_reason={"engine_error": 2, "x": 8})
    err = over_budget("score", counts, 0.5, {"engine_error": 0.01})
    assert isinstance(err, FailureBudgetExceeded) and err.reason == "engine_error"
    assert "score" in str(err) and "2 of 100" in str(err)
    assert over_budget("score", counts, 0.5, {"engine_error": 0.02}) is None
    err = over_budget("score", counts, 0.05, {})
    assert err is not None and err.reason is None and err.rejected == 10
    # Tiny stages are not judged by fractions.
    assert over_budget("score", counts, 0.05, {}, min_rows=101) is None


def test_config_names_bad_budget_keys():
    with pytest.raises(ConfigError, match="failure_budget.stages.nope"):
        load_config(data={"demo_pool": True, "failure_budget": {"stages": {"nope": 0.2}}})
    with pytest.raises(ConfigError, match="failure_budget.reasons.engine_error"):
        load_config(data={"demo_pool": True, "failure_budget": {"reasons": {"engine_error": 2}}})
    with pytest.raises(ConfigError, match="max_rejected_fraction"):
        load_config(data={"demo_pool": True, "failure_budget": {"max_rejected_fraction": 1.5}})


def _failing_run(cfg, out_dir: str) -> StageResult:
    """A stage whose 'engine' fails on every row: each row goes to rejects as engine_error."""
    n = 40
    folder = os.path.join(out_dir, "rejects", "flaky")
    os.makedirs(folder, exist_ok=True)
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "seq": pa.array(range(n), pa.int64()),
            "stage": ["flaky"] * n,
            "reason": ["engine_error"] * n,
            "detail": ["RuntimeError: engine died"] * n,
            "raw": [f'{{"text": "row {i}"}}' for i in range(n)],
            "source": ["pool.jsonl"] * n,
            "range_start": [None] * n,  # no input range: not a reader reject
            "range_end": [None] * n,
            "range_unit": [None] * n,
        },
        schema=REJECTS_SCHEMA,
    )
    pq.write_table(table, os.path.join(folder, "part-00000.parquet"))
    return StageResult(StageCounts(rows_in=n, rows_out=0, rejected_by_reason={"engine_error": n}))


FLAKY = Stage(name="flaky", run=_failing_run, config_keys=("select.budget",), doc="fails")


def test_stage_over_budget_stops_the_job_and_keeps_its_rows(tmp_path, ray_local):
    from deita_ray import pipeline

    cfg = load_config(data={"output": {"dir": str(tmp_path)}, "stages": ["select"]})
    with pytest.raises(FailureBudgetExceeded) as info:
        pipeline.run(cfg, stages=[*registry(), FLAKY], enabled=["flaky"])
    msg = str(info.value)
    assert "stage flaky" in msg and "engine_error" in msg and "40 of 40" in msg
    assert "id='r0'" in msg and "engine died" in msg and "failure_budget.reasons" in msg
    # Not marked done, and its rejects stay on disk for the resume after the fix.
    entry = pipeline.read_manifest(str(tmp_path))["stages"]["flaky"]
    assert entry["status"] == "failed" and entry["error"].startswith("FailureBudgetExceeded")
    assert (tmp_path / "rejects" / "flaky" / "part-00000.parquet").exists()
    # A budget that allows it lets the stage finish.
    ok = load_config(
        data={
            "output": {"dir": str(tmp_path)},
            "stages": ["select"],
            "failure_budget": {"reasons": {"engine_error": 1.0}, "max_rejected_fraction": 1.0},
        }
    )
    report = pipeline.run(ok, stages=[*registry(), FLAKY], enabled=["flaky"])
    assert report["stages"]["flaky"]["rejected_by_reason"] == {"engine_error": 40}


def test_selection_without_scores_is_an_error(tmp_path):
    from deita_ray.stages.select import NoCandidates, run_select

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 8)).astype(np.float32)
    scores = np.full(30, np.nan)
    write_embed_parquet(tmp_path / "embed", emb, scores, np.arange(30), files=2)
    cfg = PipelineConfig()
    cfg.select.method, cfg.select.budget = "deita", 5
    with pytest.raises(NoCandidates, match="missing_score.*30.*run the score stage"):
        run_select(cfg, str(tmp_path))

"""Losing a whole worker node in the middle of a stage, on a simulated multi-node cluster.

Each test runs ``node_loss_job.py`` in a subprocess: a ``ray.cluster_utils.Cluster`` with a
head and two one-CPU worker nodes, the job pinned to the worker nodes through
``custom_resources``, one undisturbed run, then the same job while the node that hosts the
model actor (score) or the Ray Train worker (sft) is SIGKILLed, raylet and all. The jobs must
finish on the surviving node with exactly the undisturbed results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pds
import pytest
from fault_jobs import assert_same_rows
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def run_job(kind: str, work: Path, model: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)  # the script starts its own cluster
    proc = subprocess.run(
        [sys.executable, str(HERE / "node_loss_job.py"), kind, str(work), str(model)],
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        cwd=work,
    )
    result_file = work / "result.json"
    assert proc.returncode == 0 and result_file.exists(), proc.stderr[-4000:]
    result = json.loads(result_file.read_text())
    for name in ("ref", "cut"):
        assert f"{name}_error" not in result, result[f"{name}_error"]
    assert result["removed"], "the watcher never removed the node"
    assert result["alive_nodes"] == 2  # the head and the surviving worker node
    return result


def _table(folder: Path, sort: str = "seq"):
    return pds.dataset(str(folder), format="parquet").to_table().sort_by(sort)


def test_losing_the_scorer_node_mid_stage_gives_the_same_scores(tiny_llama, tmp_path):
    res = run_job("score", tmp_path, tiny_llama)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    total = res["reports"]["ref"]["stages"]["score"]["rows_in"]
    # The node died with rows still to score: its actor's unfinished batches were redone on
    # the other node (Ray Data restarts the actor where custom_resources allow).
    assert res["removed"]["after_removal"]["score_rows"] < total
    assert res["actor_after"]["restarts"] >= 1
    assert res["actor_after"]["node_id"] != res["removed"]["node_id"]
    for stage in ("ingest", "score", "select"):
        r = res["reports"]["ref"]["stages"][stage]
        c = res["reports"]["cut"]["stages"][stage]
        assert (c["rows_in"], c["rows_out"], c["rejected_by_reason"]) == (
            r["rows_in"],
            r["rows_out"],
            r["rejected_by_reason"],
        ), stage
    # Every row once, with the undisturbed run's scores (one row per forward pass in both).
    want, got = _table(ref / "score"), _table(cut / "score")
    assert got.num_rows == want.num_rows == total
    assert_same_rows(got.to_pylist(), want.to_pylist(), where="score")
    assert len(set(got["seq"].to_pylist())) == total
    assert _table(cut / "select", "rank")["id"].to_pylist() == (
        _table(ref / "select", "rank")["id"].to_pylist()
    )


def test_losing_the_trainer_node_resumes_from_the_last_checkpoint(tiny_llama, tmp_path):
    res = run_job("sft", tmp_path, tiny_llama)
    ref = res["reports"]["ref"]["stages"]["sft"]["metrics"]
    cut = res["reports"]["cut"]["stages"]["sft"]["metrics"]
    removed = res["removed"]
    assert not removed["after_removal"]["final"], "training had finished before the node died"
    # The group restarted from the newest complete checkpoint: at least the one on storage
    # when the node was removed (a worker of a SIGKILLed raylet may finish writing the next one
    # before it notices and dies), never the start and never a step past the last one.
    last_step = removed["after_removal"]["checkpoint"][0]
    assert ref["restarts"] == 0 and ref["resumed_from_step"] is None
    assert cut["restarts"] == 1
    assert 1 <= last_step <= cut["resumed_from_step"] < ref["steps"]
    assert cut["steps"] == cut["optimizer_steps"] == ref["steps"] == 5
    # The loss curve, the schedule and the weights are those of the undisturbed run, before
    # and after the resume point, to float rounding (a resume from the wrong step or with a
    # fresh optimizer state is off by orders of magnitude more).
    assert_same_rows(cut["loss"], ref["loss"], where="loss")
    assert cut["lr"] == ref["lr"] and cut["examples"] == ref["examples"]
    a = load_file(str(tmp_path / "ref" / "sft" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "sft" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)

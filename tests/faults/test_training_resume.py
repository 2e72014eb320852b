"""A killed driver in the middle of SFT (a RayJob's pod lost, a retried attempt), then the same
command again: training resumes from the newest complete checkpoint on the job's storage
instead of starting over, runs only the steps that were left, and ends with the undisturbed
run's loss curve, schedule and weights. The checkpoint a killed run leaves is a resume point
only (DeepSpeed state, no HF copy); a finished run keeps the final model and no checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from fault_jobs import assert_same_rows, child_env, pipeline_cmd, sft_cli_job, write_selection
from proc_utils import kill_tree
from safetensors.numpy import load_file

from deita_ray.config import load_config
from deita_ray.pipeline import read_manifest
from deita_ray.training.loop import (
    DS_STATE_DIR,
    RUN_KEY,
    STEP_DELAY_ENV,
    TRAINER_STATE,
    checkpoint_root,
    newest_complete_checkpoint,
)

pytestmark = pytest.mark.slow

TOTAL_STEPS = 9


def sft_metrics(out: Path) -> dict:
    return read_manifest(str(out))["stages"]["sft"]["result"]["metrics"]


def prepare(work: Path, model: Path) -> tuple[Path, Path]:
    out = work / "out"
    write_selection(out)
    job = work / "job.yaml"
    job.write_text(yaml.safe_dump(sft_cli_job(model, out)))
    return out, job


def run_to_end(job: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        pipeline_cmd(job), env=env or child_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_killed_driver_resumes_sft_from_the_last_checkpoint(tiny_llama, tmp_path):
    ref_out, ref_job = prepare(tmp_path / "ref", tiny_llama)
    run_to_end(ref_job)
    ref = sft_metrics(ref_out)
    assert ref["steps"] == ref["steps_run"] == TOTAL_STEPS and ref["resumed_from_step"] is None

    out, job = prepare(tmp_path / "cut", tiny_llama)
    root = Path(checkpoint_root(load_config(job).sft, str(out), "sft"))
    assert root == out / "checkpoints" / "sft"
    # Each optimizer step sleeps 0.5 s (test-only knob): the kill lands between checkpoints.
    env = {**child_env(), STEP_DELAY_ENV: "0.5"}
    with open(tmp_path / "run1.log", "w") as console:
        proc = subprocess.Popen(pipeline_cmd(job), env=env, stdout=console, stderr=console)
        try:
            deadline = time.time() + 420
            while time.time() < deadline:
                if newest_complete_checkpoint(str(root)) is not None:
                    break
                assert proc.poll() is None, "the driver ended before a checkpoint was complete"
                time.sleep(0.05)
            else:
                pytest.fail("no checkpoint was completed")
        finally:
            kill_tree(proc)
    step, folder = newest_complete_checkpoint(str(root))
    assert 2 <= step < TOTAL_STEPS and step % 2 == 0
    assert read_manifest(str(out))["stages"]["sft"]["status"] == "running", "killed too late"
    assert not (out / "sft" / "final").exists()
    # A resume point: DeepSpeed's state and the trainer state, no HF model copy.
    names = set(Path(folder).iterdir())
    assert {Path(folder) / DS_STATE_DIR, Path(folder) / TRAINER_STATE} <= names
    assert not list(Path(folder).glob("*.safetensors"))
    assert json.loads((root / RUN_KEY).read_text())["output_dir"] == str(out)

    done = run_to_end(job)
    assert "sft: resuming training from the checkpoint of step" in done.stdout + done.stderr
    cut = sft_metrics(out)
    # It went on from the last complete checkpoint (or a later one that completed before the
    # kill took effect), ran only the steps that were left ...
    assert step <= cut["resumed_from_step"] < TOTAL_STEPS
    assert cut["steps_run"] == TOTAL_STEPS - cut["resumed_from_step"] < ref["steps_run"]
    assert cut["steps"] == cut["optimizer_steps"] == TOTAL_STEPS
    # ... and ended where the undisturbed run did: the loss curve and schedule before and after
    # the resume point, and the weights, to float rounding.
    assert_same_rows(cut["loss"], ref["loss"], where="loss")
    assert cut["lr"] == ref["lr"] and cut["examples"] == ref["examples"]
    a = load_file(str(ref_out / "sft" / "final" / "model.safetensors"))
    b = load_file(str(out / "sft" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # The final model is written: no checkpoint (nor optimizer state) is left.
    assert not (out / "checkpoints").exists() and not (ref_out / "checkpoints").exists()
    assert not (out / "sft" / "final" / DS_STATE_DIR).exists()

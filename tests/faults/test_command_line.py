"""The command line (``python -m deita_ray.pipeline``) as a user runs it, against one undisturbed
reference run (conftest.py):

- what the console shows when it is not a terminal (``ray job submit``, CI, a log file): the
  stages' starts, their progress, their ends and the summary; none of Ray's own chatter (worker
  and actor log lines, Ray Data's progress tables), which stays in the session's log files;
- the driver SIGKILLed in the middle of each stage that resumes by shard, then the same command
  again: the outputs equal the undisturbed run's, and the parts finished before each kill are
  kept, not computed again.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import yaml
from fault_jobs import STAGES_TO_SELECT, assert_same_rows, child_env, cli_job, pipeline_cmd
from proc_utils import kill_tree

from deita_ray.data.sink import parquet_files, rejects_dir, stage_dir
from deita_ray.pipeline import read_manifest

pytestmark = pytest.mark.slow

# A line that Ray forwards from a worker, actor, raylet or GCS process to the driver's console:
# "(MapWorker(MapBatches(ModelScorers)) pid=123) ...", "(raylet) ...", possibly colour-coded.
WORKER_LINE = re.compile(r"^(\x1b\[[0-9;]*m)*\((?:[^\n]*pid=\d+|raylet|gcs_server)[^\n]*\)")
STAGES = ("ingest", "score", "embed", "select", "sft")
RESUMED = re.compile(r"stage (\w+): resuming an interrupted run \((\d+) rows on disk")


def finished_parts(out: Path, stage: str) -> dict[str, str]:
    """The stage's finished parts (accepted and rejected): path -> sha256 of the file."""
    files = parquet_files(stage_dir(str(out), stage)) + parquet_files(rejects_dir(str(out), stage))
    return {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}


def rows(files) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def run_until_killed(job: Path, out: Path, stage: str, log: Path) -> dict[str, str]:
    """Run the job and SIGKILL it once ``stage`` has written its first part; return the parts
    it had finished."""
    with open(log, "w") as console:
        proc = subprocess.Popen(
            pipeline_cmd(job), env=child_env(), stdout=console, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.time() + 420
            while time.time() < deadline:
                state = read_manifest(str(out))["stages"].get(stage, {}).get("status")
                if state == "running" and parquet_files(stage_dir(str(out), stage)):
                    break
                assert proc.poll() is None, f"the driver ended before {stage} wrote a part"
                time.sleep(0.05)
            else:
                pytest.fail(f"{stage} never wrote a part")
        finally:
            kill_tree(proc)
    assert read_manifest(str(out))["stages"][stage]["status"] == "running", "killed too late"
    return finished_parts(out, stage)


def table(out: Path, stage: str):
    return pds.dataset(str(out / stage), format="parquet").to_table().sort_by("seq")


def test_killed_driver_resumes_score_and_embed_without_redoing_finished_parts(
    reference_run, tiny_llama, pool_dir, tmp_path
):
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(cli_job(tiny_llama, pool_dir, out, STAGES_TO_SELECT)))

    # 1. Killed in the middle of score; 2. the re-run finishes score and is killed in the
    # middle of embed; 3. the re-run finishes the job.
    kept = {"score": run_until_killed(job, out, "score", tmp_path / "run1.log")}
    kept["embed"] = run_until_killed(job, out, "embed", tmp_path / "run2.log")
    done = subprocess.run(
        pipeline_cmd(job), env=child_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    consoles = (tmp_path / "run2.log").read_text() + done.stderr

    ref = reference_run.out
    total = read_manifest(str(ref))["stages"]["score"]["result"]["rows_in"]
    for stage in ("score", "embed"):
        # The kill struck with rows left to do, after some parts were finished ...
        assert 0 < rows(kept[stage]) < total, stage
        # ... and those parts are still there, byte for byte: not computed or written again.
        now = finished_parts(out, stage)
        assert {f: now.get(f) for f in kept[stage]} == kept[stage], stage
        # The re-run said how many rows it kept, and that number is what was on disk.
        said = [int(n) for s, n in RESUMED.findall(consoles) if s == stage]
        assert said == [rows(kept[stage])], stage
        # Every row exactly once (a recomputed row would appear twice), equal to the
        # undisturbed run's.
        got, want = table(out, stage), table(ref, stage)
        assert got.num_rows == total and len(set(got["seq"].to_pylist())) == total, stage
        assert_same_rows(got.to_pylist(), want.to_pylist(), where=stage)

    manifest = read_manifest(str(out))["stages"]
    ref_manifest = read_manifest(str(ref))["stages"]
    for stage in STAGES_TO_SELECT:
        assert manifest[stage]["status"] == "done", stage
        counts = ("rows_in", "rows_out", "rejected_by_reason")
        assert {k: manifest[stage]["result"][k] for k in counts} == {
            k: ref_manifest[stage]["result"][k] for k in counts
        }, stage
    sel = pds.dataset(str(out / "select")).to_table().sort_by("rank")["id"].to_pylist()
    want_sel = pds.dataset(str(ref / "select")).to_table().sort_by("rank")["id"].to_pylist()
    assert sel == want_sel and sel


def test_console_shows_the_job_and_none_of_rays_chatter(reference_run):
    console = reference_run.stdout + reference_run.stderr
    lines = console.splitlines()
    chatter = [line for line in lines if WORKER_LINE.search(line)]
    assert chatter == [], "\n".join(chatter[:20])
    failing = sum("Failed to query Ray Train Controller" in line for line in lines)
    assert failing == 0
    # Ray Data's non-terminal progress tables ("======= Running Dataset: ...", every 10 s)
    # and its INFO lines stay in logs/ray-data/ray-data.log.
    assert not [line for line in lines if "Running Dataset" in line or "Execution plan" in line]

    for stage in STAGES:
        assert re.search(rf"deita_ray INFO stage {stage}: running$", console, re.M), stage
        assert re.search(rf"deita_ray INFO stage {stage}: done in \S+s: in=\d+", console), stage
    # Live progress: the model stages from their per-batch counts, "loading model" until the
    # first batch, then "stage score: 40/116 rows (34.5%), 9.5 rows/s, ETA 8 s"; ingest from
    # its parts on disk; sft one line per logged optimizer step (step 1 always).
    total = re.search(r"stage score: done in \S+s: in=(\d+)", console).group(1)
    assert re.search(r"stage score: loading model \(\d+ s\)", console)
    assert re.search(rf"stage score: [1-9]\d*/{total} rows \(\d+\.\d%\), \d+\.\d rows/s", console)
    assert re.search(r"stage ingest: \d+ rows, \d+\.\d rows/s", console)
    step = r"stage sft: step 1/1 \(100\.0%\), loss \d+\.\d{4}, lr \S+, \d+ tokens/s, ETA 0 s"
    assert re.search(step, console)
    assert "Ray's own logs: " in console  # where the chatter went

    # The summary on stdout is the job's result as JSON.
    summary = json.loads(reference_run.stdout[reference_run.stdout.index("{") :])
    assert set(summary["stages"]) == set(STAGES)
    assert summary["stages"]["sft"]["rows_out"] > 0

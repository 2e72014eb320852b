"""What the fault tests share: a small pool in several files and one undisturbed run of the
pipeline's command line (``python -m deita_ray.pipeline``), whose outputs are the reference for
the interrupted runs and whose console is checked for noise."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from fault_jobs import STAGES_TO_SELECT, child_env, cli_job, pipeline_cmd, write_pool


@dataclass
class CliRun:
    out: Path
    stdout: str
    stderr: str
    seconds: float


@pytest.fixture(scope="session")
def pool_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fault_pool")
    write_pool(folder)
    return folder


@pytest.fixture(scope="session")
def reference_run(tiny_llama, pool_dir, tmp_path_factory) -> CliRun:
    """The command line, undisturbed, ingest to sft (one step), its console captured (not a
    terminal, as under ``ray job submit``)."""
    work = tmp_path_factory.mktemp("fault_ref")
    job = work / "job.yaml"
    stages = [*STAGES_TO_SELECT, "sft"]
    job.write_text(yaml.safe_dump(cli_job(tiny_llama, pool_dir, work / "out", stages)))
    t0 = time.time()
    done = subprocess.run(
        pipeline_cmd(job), env=child_env(), capture_output=True, text=True, timeout=600
    )
    (work / "console.txt").write_text(done.stdout + done.stderr)  # for a failing test's reader
    assert done.returncode == 0, done.stderr[-4000:]
    return CliRun(work / "out", done.stdout, done.stderr, time.time() - t0)

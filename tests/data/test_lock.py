"""One run per output folder (deita_ray/data/lock.py): a second run refuses while the first
holds the folder, a killed run's lock is taken over, and the pipeline's CLI says so. No Ray."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deita_ray.data.lock import (
    LOCK_FILE,
    OutputDirInUse,
    OutputLock,
    acquire_output_lock,
    release_output_lock,
)

HOLDER = """
import sys, time
from deita_ray.data.lock import acquire_output_lock
acquire_output_lock(sys.argv[1])
print("locked", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def holder(tmp_path):
    """``start(out_dir)``: another process that holds ``out_dir`` until the test ends (or the
    test kills it)."""
    procs: list[subprocess.Popen] = []

    def start(out_dir: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(out_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _holds(out_dir: Path) -> bool:
    """Whether a fresh process finds ``out_dir`` held."""
    probe = (
        "import sys\nfrom deita_ray.data.lock import OutputDirInUse, acquire_output_lock\n"
        "try:\n    acquire_output_lock(sys.argv[1])\nexcept OutputDirInUse:\n    sys.exit(7)\n"
    )
    rc = subprocess.run([sys.executable, "-c", probe, str(out_dir)], timeout=60).returncode
    assert rc in (0, 7), rc
    return rc == 7


def test_a_second_run_refuses_while_the_first_holds_the_folder(tmp_path, holder):
    out = tmp_path / "out"
    proc = holder(out)
    info = json.loads((out / LOCK_FILE).read_text())
    assert info["pid"] == proc.pid
    with pytest.raises(OutputDirInUse, match=rf"is in use by another run \(pid {proc.pid} on "):
        acquire_output_lock(str(out))
    proc.stdin.write("\n")  # the holder exits normally: its lock file goes with it
    proc.stdin.flush()
    assert proc.wait(timeout=30) == 0
    with OutputLock(str(out)):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_FILE).exists()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, holder, caplog):
    out = tmp_path / "out"
    proc = holder(out)
    proc.kill()
    proc.wait(timeout=30)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind
    with caplog.at_level(logging.INFO, logger="deita_ray"), OutputLock(str(out)):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert _holds(out)
    assert f"took over the lock left by a run that ended (pid {proc.pid}" in caplog.text
    assert not (out / LOCK_FILE).exists()
    assert not _holds(out)


def test_the_same_process_may_hold_a_folder_twice(tmp_path):
    """The study locks its folder and runs the pipeline over it."""
    out = tmp_path / "out"
    acquire_output_lock(str(out))
    try:
        with OutputLock(str(out)):
            assert _holds(out)
        assert _holds(out)  # the outer hold is still there
    finally:
        release_output_lock(str(out))
    assert not (out / LOCK_FILE).exists()
    assert not _holds(out)


def test_pipeline_cli_refuses_a_busy_output_dir_and_leaves_it_alone(tmp_path, holder):
    out = tmp_path / "out"
    out.mkdir()
    manifest = out / "manifest.json"
    manifest.write_text('{"version": 2, "stages": {"ingest": {"status": "running"}}}')
    before = manifest.read_bytes()
    proc = holder(out)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "deita_ray.pipeline", "--set", "demo_pool=true"]
        + ["--set", "stages=[ingest]", "--set", f"output.dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    seconds = time.monotonic() - t0
    assert res.returncode == 3, res.stderr[-2000:]
    assert f"error: output.dir {out} is in use by another run (pid {proc.pid} on " in res.stderr
    assert "ray cluster" not in res.stderr  # refused before a Ray cluster started
    assert manifest.read_bytes() == before and not (out / "demo_pool.jsonl").exists()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid  # the holder's, intact
    print(f"refused in {seconds:.1f} s")


def test_a_study_refuses_a_busy_output_dir_before_ray_starts(tmp_path, holder):
    from deita_ray.config import load_config
    from deita_ray.study import run_study

    out = tmp_path / "study"
    proc = holder(out)
    cfg = load_config(
        data={
            "stages": ["ingest", "eval"],
            "input": {"paths": ["pool.json"]},
            "output": {"dir": str(out)},
            "eval": {"sets": [{"name": "held_out", "paths": ["held_out.json"]}]},
            "study": {"arms": [{"method": "base"}]},
        }
    )
    with pytest.raises(OutputDirInUse, match=rf"\(pid {proc.pid} on "):
        run_study(cfg)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written

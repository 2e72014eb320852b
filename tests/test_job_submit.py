"""`ray start --head` + `ray job submit -- python -m deita_ray.pipeline ...`, token auth on.

The head gets its own ports and temp dir, and is stopped afterwards by the process ids that
belong to it (never with a broad `ray stop`).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from proc_utils import kill_processes, processes_mentioning

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _stop_own_head(temp_dir: str) -> None:
    kill_processes(processes_mentioning(temp_dir))


@pytest.fixture
def ray_head(tmp_path_factory):
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = f"/tmp/deita_head_{os.getpid()}_{secrets.token_hex(3)}"
    os.makedirs(temp_dir)
    token = secrets.token_hex(16)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent, agent_grpc, metrics, rte = _free_ports(7)
    cmd = [
        RAY,
        "start",
        "--head",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rte}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--disable-usage-stats",
    ]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "temp_dir": temp_dir}
    finally:
        _stop_own_head(temp_dir)


def _submit(head: dict, env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", head["address"], "--", *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_pipeline_runs_as_a_ray_job_with_token_auth(ray_head, tmp_path):
    out = tmp_path / "job_out"
    result = _submit(
        ray_head,
        ray_head["env"],
        sys.executable,
        "-m",
        "deita_ray.pipeline",
        "--config",
        str(REPO / "jobs/quickstart.yaml"),
        "--set",
        "stages=[ingest, select]",
        "--set",
        "select.method=instruction_length",
        "--set",
        "select.budget=5",
        "--set",
        f"output.dir={out}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    sel = pads.dataset(str(out / "select"), format="parquet").to_table().to_pydict()
    assert len(sel["id"]) == 5
    assert (out / "report.json").exists()


def test_a_client_with_a_wrong_token_is_refused(ray_head):
    env = dict(ray_head["env"], RAY_AUTH_TOKEN=secrets.token_hex(16))  # not the cluster's token
    result = _submit(ray_head, env, sys.executable, "-c", "print('should not run')", timeout=120)
    assert result.returncode != 0
    assert "should not run" not in result.stdout
    text = (result.stdout + result.stderr).lower()
    assert "401" in text or "unauthorized" in text or "authentication" in text, text[-2000:]

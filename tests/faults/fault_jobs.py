"""Helpers of the fault tests and of node_loss_job.py: a small pool in several files, the job
config of the command-line runs, and the command itself."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGES_TO_SELECT = ["ingest", "score", "embed", "select"]


def cli_job(model: Path, pool: Path, out: Path, stages: list[str]) -> dict:
    """A job on the tiny LLaMA, hf backend, one row per forward pass: a row's numbers then do
    not depend on which rows share its batch (batched kernels round differently with other
    batch shapes), so interrupted and undisturbed runs agree to float rounding
    (:func:`assert_same_rows`)."""
    tiny = {
        "path": str(model),
        "backend": "hf",
        "dtype": "float32",
        "max_model_len": 512,
        "hf_batch_size": 1,
    }
    pool_cfg = {"concurrency": 1, "num_cpus": 1, "batch_size": 5}
    return {
        "stages": stages,
        "input": {"paths": [str(pool)]},
        # Parts of 10 rows: score and embed write a dozen parts each, one after the other.
        "output": {"dir": str(out), "rows_per_part": 10, "progress_every_s": 0.5},
        "ray": {"num_cpus": 2},
        "score": {"complexity_model": tiny, "quality_model": tiny, "resources": pool_cfg},
        "embed": {"model": tiny, "max_length": 256, "resources": pool_cfg},
        "select": {"method": "deita", "tau": 0.9, "budget": 12, "block_size": 8},
        "sft": {
            "max_steps": 1,
            "global_batch_size": 4,
            "micro_batch_size": 4,
            "max_length": 128,
            "precision": "fp32",
            "num_workers": 1,
        },
    }


def pipeline_cmd(job: Path) -> list[str]:
    return [sys.executable, "-m", "deita_ray.pipeline", "--config", str(job)]


def child_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # each driver starts its own local cluster
    return env


def assert_same_rows(got: list, want: list, rel: float = 1e-6, where: str = "rows") -> None:
    """``got == want`` with floats compared to ``rel`` (relative, or absolute near zero) and
    everything else exactly. One row per pass is not enough for bit identity on CPU: the BLAS
    may round a recomputed row differently (MKL's results depend on buffer alignment; a CI run
    saw 1.5e-8 relative), while a wrong or mixed-up row is off by far more."""
    if isinstance(got, float) or isinstance(want, float):
        assert isinstance(got, (int, float)) and isinstance(want, (int, float)), where
        assert math.isclose(got, want, rel_tol=rel, abs_tol=rel), f"{where}: {got} != {want}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_same_rows(got[k], want[k], rel, f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_rows(g, w, rel, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def write_pool(folder: Path, files: int = 6, rows: int = 72) -> None:
    """The demo pool's first well-formed records, in several files: ingest writes one part
    per file and score one part per ingest part, so the score stage writes as it goes."""
    from deita_ray.data.demo import demo_records

    records = [r for r in demo_records() if isinstance(r, dict)][:rows]
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        lines = [json.dumps(r) for r in records[k::files]]
        (folder / f"pool{k}.jsonl").write_text("\n".join(lines) + "\n")


def write_selection(out: Path, rows: int = 15) -> None:
    """A small selection in ``<out>/select``, as the select stage writes it: a job with
    ``stages: [sft]`` trains on it without running the stages before."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = [
        {
            "id": f"r{i}",
            "rank": i,
            "evol_score": 10.0 - i / 10,
            "max_sim": 0.1,
            "source": "handmade",
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"The answer is {2 * i}."},
            ],
        }
        for i in range(rows)
    ]
    (out / "select").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table), out / "select" / "part-00000.parquet")


def sft_cli_job(model: Path, out: Path) -> dict:
    """SFT alone on :func:`write_selection`'s 15 rows: one worker, micro-batches of 2, two per
    optimizer step, 3 steps an epoch, 3 epochs (9 steps), a checkpoint every 2 steps."""
    return {
        "stages": ["sft"],
        "output": {"dir": str(out)},
        "ray": {"num_cpus": 2},
        "sft": {
            "model": str(model),
            "num_workers": 1,
            "cpus_per_worker": 1,
            "zero_stage": 2,
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "max_length": 128,
            "epochs": 3,
            "learning_rate": 3e-3,
            "warmup_ratio": 0.1,
            "precision": "fp32",
            "checkpoint_every_steps": 2,
        },
    }

"""What the model benchmarks (``score.py``, ``embed.py``) share: env, data, model config, Ray.

Import it after the script's ``sys.path`` guard and before anything that loads torch or vLLM:
the env defaults below are set at import time, so that OpenMP pools and vLLM's CPU backend see
them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep stdout for the JSON

REPO = Path(__file__).resolve().parents[1]
KV_BYTES = 512 << 20
MAX_LEN = 2048


def shared_data(arg: str | None) -> Path:
    """The shared data folder: ``--data``, else ``$DEITA_SHARED_DATA``, else ``../shared/data``."""
    return Path(arg or os.environ.get("DEITA_SHARED_DATA") or REPO.parent / "shared" / "data")


def resolve_model(spec: str) -> str:
    """A local model folder for ``--model`` (``embedded:smollm2`` or a path)."""
    from deita_ray.models.registry import resolve_model_path

    return resolve_model_path(spec, os.environ.get("DEITA_CACHE_DIR") or "~/.cache/deita_ray")


def alpaca_table(data: Path, n: int):
    """The first ``n`` Alpaca records as canonical rows."""
    import pyarrow as pa

    from deita_ray.data.formats import CANONICAL_SCHEMA, canonicalize

    records = json.loads((data / "alpaca" / "alpaca_data.json").read_text())[:n]
    rows = [
        {
            "id": f"alpaca:{k}",
            "seq": k,
            "messages": canonicalize(r)["messages"],
            "source": "alpaca",
            "format": "alpaca",
            "extra": "{}",
        }
        for k, r in enumerate(records)
    ]
    return pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA)


def model_cfg(path: str, backend: str):
    """The fp32 eager model config every method of a benchmark runs with."""
    from deita_ray.config import ModelConfig

    return ModelConfig(
        path=path,
        backend=backend,
        dtype="float32",
        max_model_len=MAX_LEN,
        enforce_eager=True,
        kv_cache_memory_bytes=KV_BYTES,
        hf_batch_size=16,
    )


def time_stage(stage: str, run, cfg, table):
    """Time ``run(cfg, out_dir)`` on ``table`` written as the ``ingest`` output of a temp job.

    Ray is started before the clock (a fresh local 2-CPU cluster with the project's worker env,
    worker logs off stdout) and shut down after; the temp folder is removed.

    Returns:
        (seconds, the ``<stage>`` output as one table, the stage counts as a dict).
    """
    import pyarrow.dataset as pds
    import pyarrow.parquet as pq
    import ray

    from deita_ray.config import RayConfig
    from deita_ray.runtime import apply_driver_env, worker_env

    out = Path(tempfile.mkdtemp(prefix=f"bench_{stage}_"))
    (out / "ingest").mkdir()
    pq.write_table(table, out / "ingest" / "part-00000.parquet")
    apply_driver_env()
    ray.init(
        address="local",  # a fresh local cluster, never another one on the machine
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": worker_env(RayConfig(), num_threads=2)},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    result = run(cfg, str(out))
    seconds = time.perf_counter() - t0
    written = pds.dataset(str(out / stage), format="parquet").to_table()
    ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)
    return seconds, written, result.counts.to_dict()


def fresh_vllm_import_s() -> float:
    """Seconds a fresh Python process takes to import vLLM's ``LLM`` (torch and transformers
    included), as a stage's new actor must; in the benchmark process they are already loaded."""
    import subprocess
    import sys

    code = (
        "import time; t = time.perf_counter(); from vllm import LLM; print(time.perf_counter() - t)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options both benchmarks take: ``--rows --quick --model --data --out``."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="40 rows")
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--data", default=None, help="the shared data folder")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    return ap


def emit(report: dict, out: str | None) -> None:
    """Prints the report as JSON, and writes it to ``out`` too when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")

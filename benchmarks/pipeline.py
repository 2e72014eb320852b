"""Benchmark: the whole job, per stage, on one node and on a simulated 2-node cluster.

Prints one JSON object:

* ``single_node``: a synthetic mixed-format pool of ``--rows`` rows (default 100K) through
  ingest -> score -> embed -> select -> sft with tiny random LLaMA models built on the fly
  (SmolLM2 on 2 CPU cores would take hours at this size), on a local Ray cluster with 2 CPUs:
  per-stage seconds, rows/s and share of the total.
* ``two_nodes``: the same pool and job on ``ray.cluster_utils.Cluster`` with two nodes of one CPU
  each (both on this machine), with the number of tasks and actors each node ran per stage kind,
  to show how the stages spread.
* ``quickstart`` (with ``--quickstart``): the wall time and per-stage split of
  ``jobs/quickstart.yaml`` on the real SmolLM2-135M model.

Each phase runs in a fresh subprocess (its own Ray cluster); timings exclude cluster start. The
two layouts run ``--repeat`` times interleaved (default 2; quick: 1), the fastest run of each
counts. Every run must finish and select the same ids with the same rows in/out per stage,
else the run exits 1 and prints no ratio. Writes ``benchmarks/results/pipeline.json`` and
prints it.

Usage: ``python benchmarks/pipeline.py [--rows N] [--quick] [--repeat N] [--quickstart] [--workdir DIR]``
"""

from __future__ import annotations

import os
import sys

# Running this file as a script puts benchmarks/ first on sys.path, where benchmarks/select.py
# would shadow the standard library's `select`; put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

from benchmarks._common import finish, ratio, require  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["ingest", "score", "embed", "select", "sft"]
NAME = "pipeline"


def job(pool: str, model: str, out: str, rows: int) -> dict:
    """A job over the synthetic pool with the tiny model in every role."""
    m = {
        "path": model,
        "backend": "vllm",
        "dtype": "float32",
        "max_model_len": 512,
        "enforce_eager": True,
        "kv_cache_memory_bytes": 128 * 1024 * 1024,
    }
    pool_res = {"concurrency": 1, "num_cpus": 1, "batch_size": 512}
    return {
        "stages": STAGES,
        "input": {"paths": [pool]},
        "output": {"dir": out},
        "score": {"complexity_model": m, "quality_model": m, "resources": pool_res},
        "embed": {"model": m, "max_length": 256, "resources": pool_res},
        "select": {"method": "deita", "tau": 0.9, "budget": max(rows // 50, 10)},
        "sft": {
            "epochs": 1,
            "max_steps": 20,
            "global_batch_size": 16,
            "micro_batch_size": 8,
            "max_length": 256,
            "precision": "fp32",
            "num_workers": 1,
        },
    }


def _stage_table(report: dict) -> dict:
    stages = report["stages"]
    total = sum(s["seconds"] for s in stages.values())
    return {
        name: {
            "rows_in": s["rows_in"],
            "rows_out": s["rows_out"],
            "seconds": round(s["seconds"], 2),
            "rows_per_s": s["rows_per_s"],
            "share_of_time": round(s["seconds"] / total, 3) if total else None,
        }
        for name, s in stages.items()
    }


def _selected_ids(out: str) -> list[str]:
    """The ids of the job's selection, in rank order."""
    import pyarrow.dataset as pds

    t = pds.dataset(os.path.join(out, "select"), format="parquet").to_table(columns=["id", "rank"])
    return t.sort_by("rank")["id"].to_pylist()


def _placement(address: str) -> dict:
    """Tasks and actors per node, by name (Ray's state API of the cluster at ``address``)."""
    from ray.util.state import list_actors, list_tasks

    nodes: dict[str, Counter] = {}
    for a in list_actors(address=address, limit=10_000):
        if a.node_id:  # actors that never got a node have none
            nodes.setdefault(a.node_id[:8], Counter())[f"actor:{a.class_name}"] += 1
    for t in list_tasks(address=address, limit=10_000, raise_on_missing_output=False):
        if t.node_id:
            name = t.name.split("->")[-1][:60]
            nodes.setdefault(t.node_id[:8], Counter())[f"task:{name}"] += 1
    return {node: dict(c.most_common(12)) for node, c in nodes.items()}


def phase(kind: str, pool: str, model: str, out: str, rows: int) -> dict:
    """Run one phase in this process (called in a subprocess)."""
    import ray

    from deita_ray.config import load_config
    from deita_ray.pipeline import run
    from deita_ray.runtime import worker_env

    env = {"runtime_env": {"env_vars": worker_env(num_threads=2)}, "include_dashboard": False}
    cluster = None
    if kind == "single_node":
        ray.init(address="local", num_cpus=2, **env)  # never join another cluster here
    else:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env=env["runtime_env"])
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = load_config(data=job(pool, model, out, rows))
    t0 = time.perf_counter()
    report = run(cfg)
    result = {
        "wall_s": round(time.perf_counter() - t0, 2),
        "stages": _stage_table(report),
        "selected_ids": _selected_ids(out),
    }
    if cluster is not None:
        result["nodes"] = len(ray.nodes())
        try:
            result["placement"] = _placement(cluster.address)
        except Exception as e:  # the stage timings above stand without it
            result["placement"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    return result


def quickstart(out: str) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "deita_ray.pipeline", "--config", "jobs/quickstart.yaml"]
    done = subprocess.run(
        [*cmd, "--set", f"output.dir={out}"], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    return {"wall_s": round(time.perf_counter() - t0, 2), "stages": _stage_table(report)}


def _sub(kind: str, pool: str, model: str, out: str, rows: int) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from benchmarks.pipeline import phase;"
        "print('RESULT=' + json.dumps(phase(*sys.argv[2:6], int(sys.argv[6]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, REPO, kind, pool, model, out, str(rows)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT=")]
    if done.returncode or not lines:
        return {"error": done.stderr[-3000:]}
    return json.loads(lines[-1][len("RESULT=") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--quick", action="store_true", help="5K rows, one run each")
    p.add_argument("--repeat", type=int, default=None, help="interleaved runs (2; quick: 1)")
    p.add_argument("--quickstart", action="store_true", help="also time jobs/quickstart.yaml")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args()
    rows = 5_000 if args.quick else args.rows
    repeat = args.repeat or (1 if args.quick else 2)
    load_start = list(os.getloadavg())

    from testing.synthetic_pool import generate_pool
    from testing.tiny_models import build_tiny_llama

    work = args.workdir or tempfile.mkdtemp(prefix="deita_bench_pipeline_")
    try:
        pool = os.path.join(work, "pool")
        generate_pool(pool, rows, files=8)
        model = str(build_tiny_llama(os.path.join(work, "tiny")))
        runs: dict[str, list[dict]] = {"single_node": [], "two_nodes": []}
        for r in range(repeat):  # interleaved: both layouts see the same machine load
            for kind in runs:
                runs[kind].append(_sub(kind, pool, model, os.path.join(work, f"{kind}_{r}"), rows))
        every = [x for v in runs.values() for x in v]
        ok = [x for x in every if "wall_s" in x]
        first = ok[0] if ok else {}

        def counts(x: dict) -> dict:
            return {k: (v["rows_in"], v["rows_out"]) for k, v in x["stages"].items()}

        require(
            NAME,
            {
                "every_run_finished": len(ok) == len(every),
                "same_selected_ids": bool(ok)
                and all(x["selected_ids"] == first["selected_ids"] for x in ok),
                "selected_something": bool(first.get("selected_ids")),
                "same_rows_per_stage": bool(ok) and all(counts(x) == counts(first) for x in ok),
            },
            {
                "errors": [x["error"][-1500:] for x in every if "error" in x],
                "selected": [len(x["selected_ids"]) for x in ok],
                "rows_per_stage": [counts(x) for x in ok],
            },
        )
        best = {k: min(v, key=lambda x: x["wall_s"]) for k, v in runs.items()}
        for v in best.values():
            v["selected"] = len(v.pop("selected_ids"))
        result: dict = {
            "quick": args.quick,
            "rows": rows,
            "model": "tiny random LLaMA (hidden 128, 2 layers)",
            "repeat": repeat,
            "wall_s_all_runs": {k: [x["wall_s"] for x in v] for k, v in runs.items()},
            **best,
            "ratios": {
                "two_nodes_vs_single_wall": ratio(
                    best["two_nodes"]["wall_s"], best["single_node"]["wall_s"], 3
                )
            },
            "machine": {"load_avg_at_start": load_start},
        }
        if args.quickstart:
            result["quickstart"] = quickstart(os.path.join(work, "quickstart"))
        sn = best["single_node"]
        share = ", ".join(
            f"{k} {v['share_of_time']:.0%}" for k, v in sn["stages"].items() if v["share_of_time"]
        )
        result["readme"] = [
            {
                "setting": f"{rows:,} synthetic rows, tiny LLaMA, 2 CPUs",
                "result": (
                    f"{sn['wall_s']:.0f} s on one node ({share}); "
                    f"{best['two_nodes']['wall_s']:.0f} s on 2 simulated nodes (1 CPU each, same "
                    f"machine); same selected ids and rows per stage (best of {repeat} "
                    "interleaved runs)"
                ),
            }
        ]
        finish(NAME, result, args.out)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Run one job twice on a simulated multi-node Ray cluster, the second time losing a node.

``python node_loss_job.py {score|sft} WORKDIR MODEL`` (run by test_node_loss.py in a subprocess,
so that its cluster never meets the test session's own Ray instance).

The cluster (``ray.cluster_utils.Cluster``, all on this machine): a head with one CPU, which
runs the driver's reads and writes, and two worker nodes with one CPU and one unit of the
custom resource ``model_node`` each. The job pins its model actors (score) or its Ray Train
worker (sft) to ``model_node`` through the config's ``custom_resources``, so they run on a
worker node and, once that node is gone, can only move to the other one.

The job runs once undisturbed (``WORKDIR/ref``), then again (``WORKDIR/cut``) while a watcher
thread removes the node that hosts the model actor (score: once the stage has written its first
part) or the training worker (sft: once a checkpoint is complete) with ``allow_graceful=False``:
its raylet and every process on it are SIGKILLed, as when a spot instance vanishes or the OOM
killer takes the raylet. ``WORKDIR/result.json`` records both reports and what the watcher saw.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from fault_jobs import write_pool
from ray.cluster_utils import Cluster

from deita_ray.config import load_config
from deita_ray.data.sink import WrittenRows, parquet_files
from deita_ray.pipeline import run
from deita_ray.training.loop import checkpoint_root, newest_complete_checkpoint

MODEL_NODE = "model_node"
# The GCS declares a SIGKILLed node dead after about 5 s instead of 15 s (Ray's defaults); not
# shorter, or a live node stalled by a loaded 2-core CI machine may be declared dead too.
HEAD_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
NODE_STORE = 96 * 1024 * 1024  # object store bytes per node: the jobs move a few hundred KiB


def model(path: str) -> dict:
    # One row per forward pass: a row's scores do not depend on which rows share its batch,
    # so the two runs agree to float rounding.
    return {
        "path": path,
        "backend": "hf",
        "dtype": "float32",
        "max_model_len": 512,
        "hf_batch_size": 1,
    }


def score_job(work: Path, out: Path, model_path: str) -> dict:
    if not (work / "input").exists():
        write_pool(work / "input")
    return {
        "stages": ["ingest", "score", "select"],
        "input": {"paths": [str(work / "input")]},
        # Parts of 10 rows: the stage writes a dozen parts, one after the other.
        "output": {"dir": str(out), "progress_every_s": 0, "rows_per_part": 10},
        "score": {
            "complexity_model": model(model_path),
            "quality_model": model(model_path),
            "resources": {
                "concurrency": 1,
                "num_cpus": 1,
                "batch_size": 5,
                "custom_resources": {MODEL_NODE: 1},
            },
        },
        "select": {"method": "score", "budget": 20},
    }


def sft_job(work: Path, out: Path, model_path: str) -> dict:
    # The selection SFT trains on, written as the select stage would.
    rows = [
        {
            "id": f"r{i}",
            "rank": i,
            "evol_score": 1.0,
            "max_sim": 0.0,
            "source": "handmade",
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"The answer is {2 * i}."},
            ],
        }
        for i in range(12)
    ]
    (out / "select").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "select" / "part-00000.parquet")
    return {
        "stages": ["sft"],
        "output": {"dir": str(out)},
        "sft": {
            "model": model_path,
            "num_workers": 1,
            "cpus_per_worker": 1,
            "zero_stage": 2,
            "micro_batch_size": 2,
            "global_batch_size": 2,
            "max_length": 64,
            "max_steps": 5,
            "learning_rate": 3e-3,
            "warmup_ratio": 0.0,
            "precision": "fp32",
            "checkpoint_every_steps": 1,
            "max_failures": 1,
            "custom_resources": {MODEL_NODE: 1},
        },
    }


def live_actors(class_part: str) -> list[dict]:
    """ALIVE actors whose class name contains ``class_part`` (GCS table: no dashboard needed)."""
    table = ray._private.state.actors()
    return [
        a for a in table.values() if class_part in a["ActorClassName"] and a["State"] == "ALIVE"
    ]


class NodeRemover(threading.Thread):
    """Removes the worker node that hosts an actor of ``actor_class`` once ``ready()`` holds."""

    def __init__(self, cluster: Cluster, nodes: list, actor_class: str, ready, describe):
        super().__init__(daemon=True)
        self.cluster, self.nodes, self.actor_class = cluster, nodes, actor_class
        self.ready, self.describe = ready, describe
        self.seen: dict = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.ready():
                for actor in live_actors(self.actor_class):
                    node = next(
                        (n for n in self.nodes if n.node_id == actor["Address"]["NodeID"]), None
                    )
                    if node is not None:
                        self.seen = {
                            "node_id": node.node_id,
                            "actor_id": actor["ActorID"],
                            "at_removal": self.describe(),
                        }
                        self.cluster.remove_node(node, allow_graceful=False)
                        self.seen["after_removal"] = self.describe()
                        return
            time.sleep(0.05)


def main() -> None:
    kind, work, model_path = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    make_job = {"score": score_job, "sft": sft_job}[kind]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": NODE_STORE,
            "include_dashboard": False,
            "_system_config": HEAD_SYSTEM_CONFIG,
        },
    )
    nodes = [
        cluster.add_node(num_cpus=1, resources={MODEL_NODE: 1}, object_store_memory=NODE_STORE)
        for _ in range(2)
    ]
    cluster.wait_for_nodes()
    result: dict = {"kind": kind}
    remover = None
    try:
        reports = {}
        for name in ("ref", "cut"):
            out = work / name
            out.mkdir(parents=True, exist_ok=True)
            job = make_job(work, out, model_path)
            job["ray"] = {"address": cluster.address, "env_vars": {"OMP_NUM_THREADS": "1"}}
            cfg = load_config(data=job)
            if name == "cut":
                if kind == "score":
                    written = WrittenRows(str(out), "score")
                    remover = NodeRemover(
                        cluster,
                        nodes,
                        "ModelScorers",
                        ready=lambda out=out: bool(parquet_files(str(out / "score"))),
                        describe=lambda written=written: {"score_rows": written.count()},
                    )
                else:
                    root = Path(checkpoint_root(cfg.sft, str(out), "sft"))
                    remover = NodeRemover(
                        cluster,
                        nodes,
                        "RayTrainWorker",
                        ready=lambda root=root: newest_complete_checkpoint(str(root)) is not None,
                        describe=lambda root=root: {
                            "checkpoint": newest_complete_checkpoint(str(root)),
                            "final": (root / "final").exists(),
                        },
                    )
                remover.start()
            t0 = time.time()
            try:
                reports[name] = run(cfg)
            except Exception as e:  # a clear error is an allowed outcome: the test reads it
                result[f"{name}_error"] = "".join(traceback.format_exception(e))[-4000:]
                break
            finally:
                result[f"{name}_seconds"] = round(time.time() - t0, 1)
        result["reports"] = reports
        if remover is not None:
            remover.stop.set()
            result["removed"] = remover.seen
            if remover.seen:
                after = ray._private.state.actors(actor_id=remover.seen["actor_id"])
                result["actor_after"] = {
                    "state": after["State"],
                    "restarts": after["NumRestarts"],
                    "node_id": after["Address"]["NodeID"],
                }
        result["alive_nodes"] = sum(1 for n in ray.nodes() if n["Alive"])
    finally:
        (work / "result.json").write_text(json.dumps(result, indent=1, default=str))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()

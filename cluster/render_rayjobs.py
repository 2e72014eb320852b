"""Write the RayJob manifests ``cluster/rayjob-*.yaml`` from ``cluster/raycluster.yaml``.

Each RayJob creates the cluster of ``raycluster.yaml`` (its ``.spec`` becomes
``.spec.rayClusterSpec``), runs one paper job from the image, and deletes the cluster when the
job ends. Edit ``raycluster.yaml`` or :data:`JOBS`, then:

    python cluster/render_rayjobs.py            # rewrite the files
    python cluster/render_rayjobs.py --gpus 64  # ... for a cluster of up to 64 GPUs
    python cluster/render_rayjobs.py --check    # exit 1 when a file is stale (a test runs this)

One parameter sizes a RayJob to the GPUs it may use, ``--gpus N`` (default :data:`GPU_COUNT`,
recorded in each file's ``metadata.annotations``, :data:`GPUS_ANNOTATION`):

- the GPU worker group's ``maxReplicas`` = ceil(N / GPUs per pod): the autoscaler adds pods up
  to that many while GPU work waits;
- ``score.resources.max_concurrency`` = N / (scorer models x GPUs per actor): the DEITA pair
  runs two actor pools side by side, each on half the GPUs;
- ``embed.resources.max_concurrency`` = N / GPUs per actor.

Both pools autoscale from one actor (``concurrency: 1``): a stage starts with the first GPU pod
and takes the others as the autoscaler adds them.

Training keeps its recipe's ``num_workers`` (the global batch is micro-batch x workers x
accumulation). ``ray.gpu_memory_gib`` is the memory of the GPU product the GPU group's
nodeSelector pins (:data:`GPU_MEMORY_GIB`), for the job's start-up check that its models fit
(deita_ray/training/memory.py); a product not listed there gets no such override.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMAGE_ROOT = "/opt/deita_ray"
"""Where cluster/Dockerfile puts the repository (its jobs/ included) inside the image."""

GPU_COUNT = 32
"""GPUs a RayJob's cluster may grow to unless ``--gpus`` says otherwise (4 pods of 8)."""

GPUS_ANNOTATION = "deita-ray.io/gpus"
"""The annotation of each RayJob that records the GPU count it was rendered for."""

PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_GIB = {
    "NVIDIA-H100-80GB-HBM3": 79,
    "NVIDIA-A100-SXM4-80GB": 79,
    "NVIDIA-H100-NVL": 93,
    "NVIDIA-H200": 140,
}
"""Memory of one GPU as torch reports it (GiB, rounded down), by GPU feature discovery's
product label."""


@dataclass(frozen=True)
class PaperJob:
    name: str
    file: str
    config: str
    deadline_hours: int
    summary: str
    after: str = ""


JOBS = (
    PaperJob(
        "deita-6k",
        "rayjob-6k.yaml",
        "deita_6k.yaml",
        72,
        "score and embed the X_sota pool, select 6K rows (tau 0.9), SFT Mistral-7B-v0.1 on them",
    ),
    PaperJob(
        "deita-10k",
        "rayjob-10k.yaml",
        "deita_10k.yaml",
        96,
        "score and embed the X_sota pool, select 10K rows (tau 0.9), SFT Mistral-7B-v0.1 on them",
    ),
    PaperJob(
        "deita-dpo",
        "rayjob-dpo.yaml",
        "deita_dpo.yaml",
        72,
        "DPO on the 10K UltraFeedback sample, starting from the 6K job's SFT model",
        after="rayjob-6k.yaml",
    ),
)


class _Dumper(yaml.SafeDumper):
    """Block style, no anchors (the source's aliases are expanded), ``|`` for scripts."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def cluster_spec() -> dict:
    return yaml.safe_load((HERE / "raycluster.yaml").read_text())["spec"]


def gpus_per_pod(spec: dict) -> int:
    """GPUs of one pod of the GPU worker group."""
    counts = [
        int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in spec["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
        if "resources" in c and "limits" in c["resources"]
    ]
    return max(counts)


def gpu_product(spec: dict) -> str | None:
    """The GPU product the GPU worker group's nodeSelector pins."""
    for g in spec["workerGroupSpecs"]:
        label = g["template"]["spec"].get("nodeSelector", {}).get(PRODUCT_LABEL)
        if label:
            return label
    return None


def score_pools(cfg: Any) -> int:
    """Actor pools the score stage runs side by side: one per scorer model."""
    from deita_ray.scorers import model_groups, resolve_scorers

    return len(model_groups(resolve_scorers(cfg)))


def _autoscaling(stage: str, res: Any, engines: int) -> list[str]:
    """An actor pool that starts with the first GPU pod and grows to ``engines`` actors as the
    autoscaler adds pods (a fixed pool of ``engines`` would wait for all of them, and forever
    on a cluster whose quota holds fewer)."""
    if (res.concurrency, res.max_concurrency) == (1, engines):
        return []
    return [f"{stage}.resources.concurrency=1", f"{stage}.resources.max_concurrency={engines}"]


def cluster_overrides(config: str, spec: dict, gpus: int) -> list[str]:
    """``--set`` options that fit a job to the cluster's shape (not to the recipe): the score
    and embed stages run as many engines as the ``gpus`` GPUs hold, and the models' start-up
    check knows the memory of the pinned GPU product."""
    from deita_ray.config import load_config

    cfg = load_config(REPO / "jobs" / config)
    sets = []
    res = cfg.score.resources
    if "score" in cfg.stages and res.num_gpus > 0 and score_pools(cfg):
        engines = max(1, gpus // (score_pools(cfg) * math.ceil(res.num_gpus)))
        sets += _autoscaling("score", res, engines)
    res = cfg.embed.resources
    if "embed" in cfg.stages and res.num_gpus > 0:
        engines = max(1, gpus // math.ceil(res.num_gpus))
        sets += _autoscaling("embed", res, engines)
    memory = GPU_MEMORY_GIB.get(gpu_product(spec) or "")
    if memory and not cfg.ray.gpu_memory_gib:
        sets.append(f"ray.gpu_memory_gib={memory}")
    return sets


def sized_spec(spec: dict, gpus: int) -> dict:
    """The cluster spec with the GPU group's maxReplicas for ``gpus`` GPUs."""
    spec = copy.deepcopy(spec)
    per_pod = gpus_per_pod(spec)
    for g in spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)):
            g["maxReplicas"] = math.ceil(gpus / per_pod)
            g["minReplicas"] = min(g["minReplicas"], g["maxReplicas"])
            g["replicas"] = min(g.get("replicas", 0), g["maxReplicas"])
    return spec


def output_dir(config: str) -> str:
    from deita_ray.config import load_config

    return load_config(REPO / "jobs" / config).output.dir


def rayjob(job: PaperJob, spec: dict, gpus: int = GPU_COUNT) -> dict:
    head = spec["headGroupSpec"]["template"]["spec"]
    image = head["containers"][0]["image"]
    argv = ["python", "-m", "deita_ray.pipeline", "--config", f"{IMAGE_ROOT}/jobs/{job.config}"]
    for s in cluster_overrides(job.config, spec, gpus):
        argv += ["--set", s]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": job.name,
            "labels": {"app.kubernetes.io/name": "deita-ray"},
            "annotations": {GPUS_ANNOTATION: str(gpus)},
        },
        "spec": {
            "entrypoint": " ".join(argv),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "activeDeadlineSeconds": job.deadline_hours * 3600,
            "backoffLimit": 2,
            "submissionMode": "K8sJobMode",
            # KubeRay fills in the submitter's command (ray job submit), the dashboard address,
            # and, from rayClusterSpec.authOptions, RAY_AUTH_MODE / RAY_AUTH_TOKEN.
            "submitterPodTemplate": {
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": copy.deepcopy(head["securityContext"]),
                    "affinity": copy.deepcopy(head["affinity"]),
                    "containers": [
                        {
                            "name": "ray-job-submitter",
                            "image": image,
                            "resources": {
                                "requests": {"cpu": "500m", "memory": "1Gi"},
                                "limits": {"cpu": "1", "memory": "2Gi"},
                            },
                        }
                    ],
                }
            },
            "rayClusterSpec": sized_spec(spec, gpus),
        },
    }


def rendered_gpus(path: Path) -> int:
    """The GPU count an existing RayJob file was rendered for (default when none)."""
    if path.is_file():
        doc = yaml.safe_load(path.read_text()) or {}
        value = ((doc.get("metadata") or {}).get("annotations") or {}).get(GPUS_ANNOTATION)
        if value:
            return int(value)
    return GPU_COUNT


def render(job: PaperJob, gpus: int = GPU_COUNT) -> str:
    spec = cluster_spec()
    out = output_dir(job.config)
    before = "cluster/stage-inputs.yaml (inputs and weights)"
    if job.after:
        before += f", and cluster/{job.after} (its output)"
    header = f"""\
# GENERATED by cluster/render_rayjobs.py from cluster/raycluster.yaml: edit those, then re-run it.
#
# RayJob {job.name} (KubeRay >= 1.6.0, Ray 2.60), jobs/{job.config}:
#   {job.summary}.
# Sized for up to {gpus} GPUs (annotation {GPUS_ANNOTATION}): GPU group maxReplicas, score /
# embed engine counts; re-render with: python cluster/render_rayjobs.py --gpus N
# KubeRay creates the cluster of cluster/raycluster.yaml, submits the entrypoint, and deletes
# the cluster when the job ends; outputs stay on the deita-shared volume.
# Token auth: rayClusterSpec.authOptions; the operator gives the submitter and its own dashboard
# calls the token of the Secret deita-ray-auth.
#
#   kubectl apply -f cluster/{job.file}
#   kubectl get rayjob {job.name} -w       # JOB STATUS: RUNNING, then SUCCEEDED
#   kubectl logs -f job/{job.name}         # the driver's log, followed by the submitter
#
# Before: {before}.
# Outputs: {out} (report.json, plots/, ...).
# Ray logs: /mnt/deita/ray-logs/<cluster>/<pod>/.
# A failed attempt is retried (backoffLimit) on a new cluster: the pipeline resumes finished
# stages and shards from the manifest in the output folder, and training from its newest
# checkpoint (<output.dir>/checkpoints/<stage>).
# Token auth needs KubeRay >= 1.5.1 (authOptions); the pods' DEITA_REQUIRE_RAY_AUTH=1 makes the
# job fail at start on a cluster that runs without it (an older operator, validation off).
"""
    doc = rayjob(job, spec, gpus)
    return header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report stale files")
    p.add_argument(
        "--gpus",
        type=int,
        default=None,
        help=f"GPUs each RayJob's cluster may use (default {GPU_COUNT}; --check: each file's own)",
    )
    args = p.parse_args(argv)
    if args.gpus is not None and args.gpus < 1:
        p.error("--gpus must be at least 1")
    stale = []
    for job in JOBS:
        path = HERE / job.file
        gpus = args.gpus or (rendered_gpus(path) if args.check else GPU_COUNT)
        text = render(job, gpus)
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path.name)
        if not args.check:
            path.write_text(text)
    if args.check and stale:
        print(f"stale (run python cluster/render_rayjobs.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

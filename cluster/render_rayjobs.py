"""Write the RayJob manifests ``cluster/rayjob-*.yaml`` from ``cluster/raycluster.yaml``.

Each RayJob creates the cluster of ``raycluster.yaml`` (its ``.spec`` becomes
``.spec.rayClusterSpec``), runs one paper job from the image, and deletes the cluster when the
job ends. Edit ``raycluster.yaml`` or :data:`JOBS`, then:

    python cluster/render_rayjobs.py            # rewrite the files
    python cluster/render_rayjobs.py --check    # exit 1 when a file is stale (a test runs this)
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


def cluster_overrides(config: str, spec: dict) -> list[str]:
    """``--set`` options that fit a job to the cluster's shape (not to the recipe): the embed
    stage runs one engine per GPU of a GPU pod, so it uses every GPU it is given."""
    from deita_ray.config import load_config

    cfg = load_config(REPO / "jobs" / config)
    sets = []
    res = cfg.embed.resources
    if "embed" in cfg.stages and res.num_gpus > 0:
        engines = gpus_per_pod(spec) // math.ceil(res.num_gpus)
        if engines != res.concurrency:
            sets.append(f"embed.resources.concurrency={engines}")
    return sets


def output_dir(config: str) -> str:
    from deita_ray.config import load_config

    return load_config(REPO / "jobs" / config).output.dir


def rayjob(job: PaperJob, spec: dict) -> dict:
    head = spec["headGroupSpec"]["template"]["spec"]
    image = head["containers"][0]["image"]
    argv = ["python", "-m", "deita_ray.pipeline", "--config", f"{IMAGE_ROOT}/jobs/{job.config}"]
    for s in cluster_overrides(job.config, spec):
        argv += ["--set", s]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": job.name, "labels": {"app.kubernetes.io/name": "deita-ray"}},
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
            "rayClusterSpec": copy.deepcopy(spec),
        },
    }


def render(job: PaperJob) -> str:
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
# stages and shards from the manifest in the output folder.
"""
    return header + yaml.dump(rayjob(job, spec), Dumper=_Dumper, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report stale files")
    args = p.parse_args(argv)
    stale = []
    for job in JOBS:
        path = HERE / job.file
        text = render(job)
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

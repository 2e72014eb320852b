"""The KubeRay manifests in cluster/: every ray.io document validates against the KubeRay CRD
OpenAPI schema (made strict, so a misspelt field fails), plus the deployment facts the project
relies on (GPU workers, token from a Secret, shared storage, the RayJob's entrypoint)."""

from __future__ import annotations

import copy
import functools
import os
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRD_DIR = Path(os.environ.get("DEITA_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
IMAGE = "rayproject/ray:2.60.0-py311-gpu"
MOUNT = "/mnt/deita"


def _documents() -> list[tuple[str, int, dict]]:
    docs = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((path.name, i, doc))
    return docs


DOCS = _documents()
RAY_DOCS = [d for d in DOCS if str(d[2].get("apiVersion", "")).startswith("ray.io/")]


def _one(kind: str) -> dict:
    found = [doc for _, _, doc in DOCS if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in cluster/*.yaml, found {len(found)}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# Schema validation


def strict_schema(node: dict) -> dict:
    """A copy of a CRD's OpenAPI v3 schema for jsonschema: objects that list ``properties`` (and
    do not say ``x-kubernetes-preserve-unknown-fields``) reject unknown fields, as the API
    server's pruning would silently drop them; ``x-kubernetes-int-or-string`` accepts both.
    Other ``x-kubernetes-*`` keys are annotations (jsonschema ignores unknown keywords)."""
    node = dict(node)
    if isinstance(node.get("properties"), dict):
        node["properties"] = {k: strict_schema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
    if isinstance(node.get("items"), dict):
        node["items"] = strict_schema(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict_schema(node["additionalProperties"])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(node.get(key), list):
            node[key] = [strict_schema(s) for s in node[key]]
    if isinstance(node.get("not"), dict):
        node["not"] = strict_schema(node["not"])
    if node.get("x-kubernetes-int-or-string") and not any(
        k in node for k in ("type", "anyOf", "oneOf")
    ):
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return node


@functools.cache
def _load_crd(path: Path) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 40K lines
    return yaml.load(path.read_text(), Loader=loader)


def _crd_schema(kind: str) -> dict:
    path = CRD_DIR / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRD {path} not found (set DEITA_KUBERAY_CRDS to its folder)")
    crd = _load_crd(path)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


_VALIDATORS: dict[tuple[str, bool], object] = {}


def _validator(kind: str, strict: bool = True):
    jsonschema = pytest.importorskip("jsonschema")
    key = (kind, strict)
    if key not in _VALIDATORS:
        schema = _crd_schema(kind)
        schema = strict_schema(schema) if strict else schema
        cls = jsonschema.Draft7Validator
        cls.check_schema(schema)
        _VALIDATORS[key] = cls(schema)
    return _VALIDATORS[key]


def _errors(doc: dict, strict: bool = True) -> list[str]:
    errs = _validator(doc["kind"], strict).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errs]


def test_manifests_found():
    kinds = sorted(doc["kind"] for _, _, doc in RAY_DOCS)
    assert kinds == ["RayCluster", "RayJob"]
    assert all(doc["apiVersion"] == "ray.io/v1" for _, _, doc in RAY_DOCS)


@pytest.mark.parametrize("name,index,doc", RAY_DOCS, ids=[f"{n}#{i}" for n, i, _ in RAY_DOCS])
def test_ray_documents_validate_against_crd(name, index, doc):
    assert _errors(doc) == []
    assert doc["metadata"]["name"]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _typo(doc: dict, edit) -> dict:
    doc = copy.deepcopy(doc)
    edit(doc)
    return doc


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


TYPOS = {
    "headGroupSpec.rayStartParam": lambda d: _rename(
        _cluster_spec(d)["headGroupSpec"], "rayStartParams", "rayStartParam"
    ),
    "enableInTreeAutoscalling": lambda d: _rename(
        _cluster_spec(d), "enableInTreeAutoscaling", "enableInTreeAutoscalling"
    ),
    "workerGroupSpecs.maxReplica": lambda d: _rename(
        _cluster_spec(d)["workerGroupSpecs"][0], "maxReplicas", "maxReplica"
    ),
    "container.imagee": lambda d: _rename(
        _cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0], "image", "imagee"
    ),
    "env.secretKeyRef.keys": lambda d: _rename(
        _cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][1][
            "valueFrom"
        ]["secretKeyRef"],
        "key",
        "keys",
    ),
    "minReplicas as a word": lambda d: _cluster_spec(d)["workerGroupSpecs"][0].update(
        minReplicas="zero"
    ),
    "gpu quantity not a quantity": lambda d: _cluster_spec(d)["workerGroupSpecs"][0]["template"][
        "spec"
    ]["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": "eight"}),
    "upscalingMode not in enum": lambda d: _cluster_spec(d)["autoscalerOptions"].update(
        upscalingMode="Fast"
    ),
}


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
@pytest.mark.parametrize("typo", list(TYPOS))
def test_typo_fails_validation(kind, typo):
    broken = _typo(_one(kind), TYPOS[typo])
    assert _errors(broken), f"{typo} in the {kind} was not caught"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_strictness_is_what_catches_a_misspelt_field(kind):
    broken = _typo(_one(kind), TYPOS["headGroupSpec.rayStartParam"])
    # The CRD as published ignores unknown fields (the API server would prune them silently) ...
    assert _errors(broken, strict=False) == []
    # ... the strict schema names the field.
    errors = _errors(broken)
    assert any("rayStartParam'" in e and "headGroupSpec" in e for e in errors), errors


def test_rayjob_typo_in_job_fields_fails():
    broken = _typo(_one("RayJob"), lambda d: _rename(d["spec"], "entrypoint", "entrypont"))
    assert any("entrypont" in e for e in _errors(broken))


def test_int_or_string_quantities_accept_both():
    doc = copy.deepcopy(_one("RayCluster"))
    res = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    res["limits"]["cpu"], res["requests"]["cpu"] = 80, "80"
    res["limits"]["nvidia.com/gpu"] = "8"
    assert _errors(doc) == []


# ---------------------------------------------------------------------------------------------
# Deployment facts


def _pod_specs(spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    return pods


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret() -> dict:
    return _one("Secret")


def _ray_token_envs() -> list[tuple[str, dict]]:
    """(where, env by name) of every container that talks to Ray: pods, autoscaler, submitter."""
    out = []
    for _, _, doc in RAY_DOCS:
        spec = _cluster_spec(doc)
        for group, pod in _pod_specs(spec):
            for c in pod["containers"]:
                out.append((f"{doc['kind']}/{group}/{c['name']}", _env(c)))
        out.append((f"{doc['kind']}/autoscaler", _env(spec["autoscalerOptions"])))
        if doc["kind"] == "RayJob":
            for c in doc["spec"]["submitterPodTemplate"]["spec"]["containers"]:
                out.append((f"RayJob/submitter/{c['name']}", _env(c)))
    return out


def test_ray_auth_token_comes_from_the_secret():
    secret = _secret()
    (secret_key,) = secret["stringData"]
    envs = _ray_token_envs()
    assert len(envs) >= 7
    for where, env in envs:
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token, f"{where}: a literal token"
        ref = token["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], secret_key), where
        assert not ref.get("optional"), where


def test_example_secret_holds_only_a_placeholder():
    value = next(iter(_secret()["stringData"].values()))
    assert "REPLACE" in value
    text = (CLUSTER / "prerequisites.yaml").read_text()
    assert "kubectl create secret generic deita-ray-auth" in text


def test_gpu_worker_group_requests_gpus_and_head_none():
    spec = _one("RayCluster")["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head.get("limits", {})
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    ]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for g in gpu_groups:
        res = g["template"]["spec"]["containers"][0]["resources"]
        # Extended resources: requests must equal limits when both are given.
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]


def test_autoscaling_bounds():
    spec = _one("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        assert g["maxReplicas"] >= 1


def test_shared_storage_mounted_at_the_same_path_everywhere():
    pvc = _one("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for _, _, doc in RAY_DOCS:
        for group, pod in _pod_specs(_cluster_spec(doc)):
            claims = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in pod["volumes"]
                if "persistentVolumeClaim" in v
            }
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            assert claims.get(mounts.get(MOUNT)) == pvc["metadata"]["name"], group


def test_images_and_ray_version():
    for _, _, doc in RAY_DOCS:
        spec = _cluster_spec(doc)
        assert spec["rayVersion"] == "2.60.0"
        for _, pod in _pod_specs(spec):
            assert {c["image"] for c in pod["containers"]} == {IMAGE}


def test_rayjob_runs_the_pipeline_with_deita_6k():
    job = _one("RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "deita_ray.pipeline"]
    assert argv[argv.index("--config") + 1] == "jobs/deita_6k.yaml"
    assert (REPO / "jobs" / "deita_6k.yaml").is_file()
    assert f"output.dir={MOUNT}/outputs/deita_6k" in argv
    assert job["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["working_dir"] and runtime_env["pip"]["packages"]


def test_rayjob_cluster_matches_the_raycluster():
    assert _one("RayJob")["spec"]["rayClusterSpec"] == _one("RayCluster")["spec"]

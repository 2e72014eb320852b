"""The KubeRay manifests in cluster/: every ray.io document validates against the KubeRay CRD
OpenAPI schema (made strict, so a misspelt field fails), the token-auth wiring matches what the
KubeRay operator does with it, and the deployment facts the project relies on hold (scheduling,
shared volume and its permissions, Ray logs, secrets kept out of applied files, the RayJobs).

The operator behaviour checked here is that of ray-project/kuberay at the commit the CRDs come
from (feeaf72, the CRDs of v1.7.0; authOptions since v1.5.1, authOptions.secretName since
v1.6.0):
- ray-operator/controllers/ray/common/pod.go, SetContainerTokenAuthEnvVars: when
  ``authOptions.mode`` is ``token`` the operator adds RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from
  the Secret ``secretName`` (default: the cluster's name), key ``auth_token``, to the Ray
  container, the autoscaler, the wait-gcs-ready init container and (rayjob_controller.go,
  configureSubmitterContainer) the RayJob submitter, unless the container already sets them.
- ray-operator/controllers/ray/utils/util.go: the operator's own dashboard client (job status)
  reads the same Secret key and sends ``x-ray-authorization: Bearer <token>`` only when
  ``authOptions.mode == token`` (utils.IsAuthEnabled compares the field itself; the CRD gives
  ``mode`` no default).
- ray-operator/controllers/ray/utils/validation.go: token mode needs rayVersion >= 2.52.0;
  enableK8sTokenAuth and secretName exclude each other.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRD_DIR = Path(os.environ.get("DEITA_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
MOUNT = "/mnt/deita"
UID, GID = 1000, 100  # the Ray image's user "ray" (rayproject/ray base-deps)

# What the operator expects (constants of ray-operator/controllers/ray/utils/constant.go).
OPERATOR_TOKEN_SECRET_KEY = "auth_token"
OPERATOR_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)
SECRET_NAME = "deita-ray-auth"
PAPER_JOBS = {
    "deita-6k": "deita_6k.yaml",
    "deita-10k": "deita_10k.yaml",
    "deita-dpo": "deita_dpo.yaml",
}


def _documents() -> list[tuple[str, int, dict]]:
    docs = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((path.name, i, doc))
    return docs


DOCS = _documents()
RAY_DOCS = [d for d in DOCS if str(d[2].get("apiVersion", "")).startswith("ray.io/")]
RAY_JOBS = [doc for _, _, doc in RAY_DOCS if doc["kind"] == "RayJob"]


def _one(kind: str) -> dict:
    found = [doc for _, _, doc in DOCS if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in cluster/*.yaml, found {len(found)}"
    return found[0]


def _missing(what: str) -> None:
    """A missing input fails in CI (it must be there) and skips elsewhere."""
    if IN_CI:
        pytest.fail(f"{what} (CI=true: required)")
    pytest.skip(what)


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
        _missing(f"KubeRay CRD {path} not found (set DEITA_KUBERAY_CRDS to its folder)")
    crd = _load_crd(path)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


_VALIDATORS: dict[tuple[str, bool], object] = {}


def _validator(kind: str, strict: bool = True):
    try:
        import jsonschema
    except ImportError:
        _missing("jsonschema is not installed (pip install -e '.[dev]')")
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
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayJob"]
    assert all(doc["apiVersion"] == "ray.io/v1" for _, _, doc in RAY_DOCS)
    assert {j["metadata"]["name"] for j in RAY_JOBS} == set(PAPER_JOBS)


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


def _head_container(d: dict) -> dict:
    return _cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0]


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
    "container.imagee": lambda d: _rename(_head_container(d), "image", "imagee"),
    "env.secretKeyRef.keys": lambda d: _rename(
        _head_container(d)["env"][1]["valueFrom"]["secretKeyRef"], "key", "keys"
    ),
    "minReplicas as a word": lambda d: _cluster_spec(d)["workerGroupSpecs"][0].update(
        minReplicas="zero"
    ),
    "gpu quantity not a quantity": lambda d: _cluster_spec(d)["workerGroupSpecs"][1]["template"][
        "spec"
    ]["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": "eight"}),
    "upscalingMode not in enum": lambda d: _cluster_spec(d)["autoscalerOptions"].update(
        upscalingMode="Fast"
    ),
    "authOptions.mode not in enum": lambda d: _cluster_spec(d)["authOptions"].update(mode="Token"),
    "authOptions.secretname": lambda d: _rename(
        _cluster_spec(d)["authOptions"], "secretName", "secretname"
    ),
}


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
@pytest.mark.parametrize("typo", list(TYPOS))
def test_typo_fails_validation(kind, typo):
    doc = _one("RayCluster") if kind == "RayCluster" else RAY_JOBS[0]
    broken = _typo(doc, TYPOS[typo])
    assert _errors(broken), f"{typo} in the {kind} was not caught"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_strictness_is_what_catches_a_misspelt_field(kind):
    doc = _one("RayCluster") if kind == "RayCluster" else RAY_JOBS[0]
    broken = _typo(doc, TYPOS["headGroupSpec.rayStartParam"])
    # The CRD as published ignores unknown fields (the API server would prune them silently) ...
    assert _errors(broken, strict=False) == []
    # ... the strict schema names the field.
    errors = _errors(broken)
    assert any("rayStartParam'" in e and "headGroupSpec" in e for e in errors), errors


def test_rayjob_typo_in_job_fields_fails():
    broken = _typo(RAY_JOBS[0], lambda d: _rename(d["spec"], "entrypoint", "entrypont"))
    assert any("entrypont" in e for e in _errors(broken))


def test_int_or_string_quantities_accept_both():
    doc = copy.deepcopy(_one("RayCluster"))
    res = doc["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]
    res["limits"]["cpu"], res["requests"]["cpu"] = 80, "80"
    res["limits"]["nvidia.com/gpu"] = "8"
    assert _errors(doc) == []


# ---------------------------------------------------------------------------------------------
# Token auth: the CRD's field and what the operator does with it


def _cluster_specs() -> list[tuple[str, dict]]:
    return [
        (f"{doc['kind']}/{doc['metadata']['name']}", _cluster_spec(doc)) for _, _, doc in RAY_DOCS
    ]


def _pod_specs(spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    return pods


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _all_containers() -> list[tuple[str, dict]]:
    """(where, container) of every container and init container in cluster/*.yaml."""
    out = []
    for name, _, doc in DOCS:
        pods = []
        if doc.get("kind") in ("RayCluster", "RayJob"):
            pods = [(g, p) for g, p in _pod_specs(_cluster_spec(doc))]
            if doc["kind"] == "RayJob":
                pods.append(("submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
        elif doc.get("kind") == "Job":
            pods = [("job", doc["spec"]["template"]["spec"])]
        for group, pod in pods:
            for c in pod.get("initContainers", []) + pod["containers"]:
                out.append((f"{name}/{group}/{c['name']}", c))
    return out


def test_auth_options_token_mode_with_the_secret_by_name():
    for where, spec in _cluster_specs():
        auth = spec.get("authOptions")
        # utils.IsAuthEnabled: the operator wires the token only for mode == "token" exactly.
        assert auth == {"mode": "token", "secretName": SECRET_NAME}, where
        assert "enableK8sTokenAuth" not in auth, where  # excludes secretName (validation.go)


def test_crd_gives_auth_mode_no_default_so_it_is_spelled_out():
    props = _crd_schema("RayCluster")["properties"]["spec"]["properties"]["authOptions"]
    assert set(props["properties"]) >= {"mode", "secretName"}
    assert "default" not in props["properties"]["mode"]
    assert props["properties"]["mode"]["enum"] == ["disabled", "token"]
    job_props = _crd_schema("RayJob")["properties"]["spec"]["properties"]["rayClusterSpec"]
    assert job_props["properties"]["authOptions"] == props


def test_ray_version_supports_token_auth():
    for where, spec in _cluster_specs():
        version = tuple(int(x) for x in spec["rayVersion"].split("."))
        assert version >= MIN_RAY_FOR_TOKEN_AUTH, where


def test_no_container_sets_the_auth_variables_itself():
    """The operator skips a variable a container already has: a literal or another Secret here
    would silently win over authOptions."""
    for where, c in _all_containers():
        assert not set(_env(c)) & set(OPERATOR_AUTH_ENV), where
    for where, spec in _cluster_specs():
        assert not set(_env(spec.get("autoscalerOptions", {}))) & set(OPERATOR_AUTH_ENV), where


def _operator_sets_token_auth(cluster_name: str, container: dict, auth: dict | None) -> dict:
    """Python rendering of the operator's SetContainerTokenAuthEnvVars (token mode, no K8s
    token auth): the container as the operator leaves it."""
    c = copy.deepcopy(container)
    env = c.setdefault("env", [])
    names = {e["name"] for e in env}
    if "RAY_AUTH_MODE" not in names:
        env.append({"name": "RAY_AUTH_MODE", "value": "token"})
    secret = (auth or {}).get("secretName") or cluster_name
    if "RAY_AUTH_TOKEN" not in names:
        ref = {"name": secret, "key": OPERATOR_TOKEN_SECRET_KEY}
        env.append({"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    return c


def _auth_enabled(spec: dict) -> bool:
    return (spec.get("authOptions") or {}).get("mode") == "token"


def test_every_ray_process_and_the_submitter_get_the_token():
    """Where the operator injects the token (Ray container = index 0 of each pod, autoscaler,
    wait-gcs-ready, RayJob submitter), the result reads the Secret's auth_token key."""
    for doc in [d for _, _, d in RAY_DOCS]:
        spec = _cluster_spec(doc)
        assert _auth_enabled(spec)
        name = doc["metadata"]["name"]
        targets = [(g, p["containers"][0]) for g, p in _pod_specs(spec)]
        targets.append(("autoscaler", {"name": "autoscaler", **spec["autoscalerOptions"]}))
        targets.append(("wait-gcs-ready", {"name": "wait-gcs-ready"}))
        if doc["kind"] == "RayJob":
            sub = doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
            # K8sJobMode: the operator writes `ray job submit` only into a container without a
            # command; it adds the address and (auth enabled) the token variables.
            assert "command" not in sub and "args" not in sub
            targets.append(("submitter", sub))
        for where, c in targets:
            env = _env(_operator_sets_token_auth(name, c, spec["authOptions"]))
            assert env["RAY_AUTH_MODE"]["value"] == "token", (name, where)
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": SECRET_NAME, "key": OPERATOR_TOKEN_SECRET_KEY}, (name, where)
            assert not ref.get("optional"), (name, where)


def test_the_documented_secret_is_the_one_the_operator_reads():
    """The README and prerequisites.yaml create deita-ray-auth with the key auth_token: the key
    the operator's dashboard client and the injected env both read."""
    create = re.compile(r"kubectl create secret generic (\S+)\s+\\?\s*--from-literal=(\w+)=")
    for path in (CLUSTER / "README.md", CLUSTER / "prerequisites.yaml"):
        found = dict(create.findall(path.read_text().replace("#", " ")))
        assert found.get(SECRET_NAME) == OPERATOR_TOKEN_SECRET_KEY, path.name
    readme = (CLUSTER / "README.md").read_text()
    assert "1.6.0" in readme and "authOptions" in readme


# ---------------------------------------------------------------------------------------------
# Secrets stay out of applied files


def test_no_secret_manifest_anywhere_in_cluster():
    """`kubectl apply -f cluster/...` must never replace a real token with a placeholder."""
    for path in sorted(CLUSTER.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert (doc or {}).get("kind") != "Secret", path
    pre = [doc for name, _, doc in DOCS if name == "prerequisites.yaml"]
    assert [d["kind"] for d in pre] == ["PersistentVolumeClaim"]


def test_hf_token_is_optional_in_ray_pods_and_required_for_staging():
    for where, c in _all_containers():
        env = _env(c)
        if "HF_TOKEN" not in env:
            continue
        ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("deita-hf-token", "token"), where
        # Ray pods read staged weights; only the staging Job must download gated ones.
        assert bool(ref.get("optional")) != where.startswith("stage-inputs.yaml"), where


# ---------------------------------------------------------------------------------------------
# Scheduling


def _gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _avoids_gpu_nodes(pod: dict) -> bool:
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    exprs = [e for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]]
    rules = {(e["key"], e["operator"], tuple(e.get("values", []))) for e in exprs}
    tolerates_gpu = any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    return ("nvidia.com/gpu.present", "NotIn", ("true",)) in rules and not tolerates_gpu


def test_head_cpu_group_submitter_and_staging_stay_off_gpu_nodes():
    for where, spec in _cluster_specs():
        pods = dict(_pod_specs(spec))
        assert set(pods) == {"head", "cpu", "gpu"}, where
        for group in ("head", "cpu"):
            assert _avoids_gpu_nodes(pods[group]), (where, group)
            assert all(_gpus(c) == 0 for c in pods[group]["containers"]), (where, group)
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", where
    for job in RAY_JOBS:
        assert _avoids_gpu_nodes(job["spec"]["submitterPodTemplate"]["spec"])
    assert _avoids_gpu_nodes(_one("Job")["spec"]["template"]["spec"])


def test_gpu_group_requests_and_tolerates_gpus():
    spec = _one("RayCluster")["spec"]
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    pod = gpu["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert _gpus(pod["containers"][0]) == 8
    # Extended resources: requests must equal limits when both are given.
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_autoscaling_bounds():
    for where, spec in _cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True
        for g in spec["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
            assert g["maxReplicas"] >= 1, (where, g["groupName"])


def test_operator_accepts_the_autoscaler_settings():
    """validation.go: a worker group's idleTimeoutSeconds needs autoscaler v2, and v2 needs the
    head and worker pods' restartPolicy unset or Never."""
    for where, spec in _cluster_specs():
        groups = spec["workerGroupSpecs"]
        if any("idleTimeoutSeconds" in g for g in groups):
            assert spec["autoscalerOptions"].get("version") == "v2", where
        if spec["autoscalerOptions"].get("version") == "v2":
            for _, pod in _pod_specs(spec):
                assert pod.get("restartPolicy", "Never") == "Never", where


def _job_config(job: dict):
    from deita_ray.config import load_config

    argv = shlex.split(job["spec"]["entrypoint"])
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return load_config(REPO / "jobs" / PAPER_JOBS[job["metadata"]["name"]], sets)


def _render_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_rayjobs", CLUSTER / "render_rayjobs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _gpu_group(spec: dict) -> dict:
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    return gpu


def _check_sized_for(job: dict, gpus: int, per_pod: int = 8) -> None:
    """The one GPU count sizes the GPU group and the engines of the score and embed stages."""
    from deita_ray.scorers import model_groups, resolve_scorers

    name = job["metadata"]["name"]
    assert int(job["metadata"]["annotations"]["deita-ray.io/gpus"]) == gpus, name
    assert _gpu_group(job["spec"]["rayClusterSpec"])["maxReplicas"] == -(-gpus // per_pod), name
    cfg = _job_config(job)
    if "score" in cfg.stages:
        pools = len(model_groups(resolve_scorers(cfg)))
        res = cfg.score.resources
        assert pools == 2 and res.max_concurrency * pools * res.num_gpus == gpus, name
        assert res.concurrency == 1, name  # autoscales from the first GPU pod
    if "embed" in cfg.stages:
        res = cfg.embed.resources
        assert res.max_concurrency * res.num_gpus == gpus and res.concurrency == 1, name


def test_one_gpu_count_sizes_the_gpu_group_and_the_engines():
    """render_rayjobs.py --gpus N: maxReplicas of the GPU group and the score / embed engine
    counts follow from N (the files are rendered for the default, 32), so 64 GPUs are used
    when a cluster has 64."""
    render = _render_module()
    for job in RAY_JOBS:
        _check_sized_for(job, render.GPU_COUNT)
    for paper in render.JOBS:
        job = yaml.safe_load(render.render(paper, 64))
        _check_sized_for(job, 64)
        # A RayJob the --check of the test suite compares against its own count.
        path = CLUSTER / paper.file
        assert render.rendered_gpus(path) == render.GPU_COUNT


def test_gpu_pods_are_pinned_to_a_product_whose_memory_the_jobs_check():
    """The GPU group's nodeSelector names the GPU product; the RayJobs pass its memory to the
    job (ray.gpu_memory_gib) for the start-up check that the models fit, and the paper's
    training recipes (Mistral-7B, 7.24B parameters) fit it."""
    from deita_ray.training.memory import training_bytes_per_gpu

    render = _render_module()
    for where, spec in _cluster_specs():
        product = _gpu_group(spec)["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
        assert product in render.GPU_MEMORY_GIB, where
    product = _gpu_group(_one("RayCluster")["spec"])["template"]["spec"]["nodeSelector"]
    memory = render.GPU_MEMORY_GIB[product["nvidia.com/gpu.product"]]
    for job in RAY_JOBS:
        cfg = _job_config(job)
        assert cfg.ray.gpu_memory_gib == memory, job["metadata"]["name"]
        for stage in ("sft", "dpo"):
            if stage in cfg.stages:
                need = training_bytes_per_gpu(7_241_732_096, getattr(cfg, stage))
                assert need < 0.5 * memory * 1024**3, (job["metadata"]["name"], stage)


# ---------------------------------------------------------------------------------------------
# Shared volume, permissions, logs


def test_shared_storage_mounted_at_the_same_path_everywhere():
    pvc = _one("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    pods = [(w, p) for _, s in _cluster_specs() for w, p in _pod_specs(s)]
    pods.append(("staging", _one("Job")["spec"]["template"]["spec"]))
    for group, pod in pods:
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        for c in pod.get("initContainers", []) + pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert claims.get(mounts.get(MOUNT)) == pvc["metadata"]["name"], (group, c["name"])


def _init_script(pod: dict) -> tuple[dict, str]:
    (init,) = [c for c in pod["initContainers"] if c["name"] == "volume-permissions"]
    return init, init["args"][0]


def test_pods_run_as_the_image_user_and_the_volume_is_made_theirs():
    pods = [(w, p) for _, s in _cluster_specs() for w, p in _pod_specs(s)]
    pods += [
        (f"submitter {j['metadata']['name']}", j["spec"]["submitterPodTemplate"]["spec"])
        for j in RAY_JOBS
    ]
    pods.append(("staging", _one("Job")["spec"]["template"]["spec"]))
    for where, pod in pods:
        sc = pod["securityContext"]
        assert (sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"]) == (UID, GID, GID), where
    head = _one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    init, script = _init_script(head)
    assert init["securityContext"]["runAsUser"] == 0
    assert f"chown {UID}:{GID}" in script
    assert f"--reuid={UID} --regid={GID}" in script and "exit 1" in script
    # The staging Job, which runs before any cluster, sets the volume up the same way.
    assert _init_script(_one("Job")["spec"]["template"]["spec"])[0] == init


def test_volume_permissions_cover_every_folder_the_jobs_write():
    from deita_ray.config import load_config

    head = _one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    dirs = re.search(r'DIRS="([^"]+)"', _init_script(head)[1]).group(1).split()
    written = ["/mnt/deita/ray-logs/x", "/mnt/deita/staging/manifest.json"]
    written += [_env(head["containers"][0])["HF_HOME"]["value"]]
    for config in PAPER_JOBS.values():
        cfg = load_config(REPO / "jobs" / config)
        written += [cfg.output.dir, *cfg.input.paths, *cfg.dpo.paths]
    for path in written:
        rel = Path(path).relative_to(MOUNT)
        assert rel.parts[0] in dirs, path


def test_ray_logs_are_copied_to_the_shared_volume():
    for where, spec in _cluster_specs():
        for group, pod in _pod_specs(spec):
            ray, *sidecars = pod["containers"]
            (logs,) = [c for c in sidecars if c["name"] == "ray-logs"]
            tmp = {m["mountPath"]: m["name"] for m in ray["volumeMounts"]}["/tmp/ray"]
            side = {m["mountPath"]: m for m in logs["volumeMounts"]}
            assert side["/tmp/ray"]["name"] == tmp and side["/tmp/ray"]["readOnly"]
            script = logs["args"][0]
            assert '"/mnt/deita/ray-logs/${RAY_CLUSTER}/${POD_NAME}"' in script, (where, group)
            assert "session_latest/logs" in script and "trap" in script
            assert "ephemeral-storage" in ray["resources"]["limits"], (where, group)


# ---------------------------------------------------------------------------------------------
# RayJobs


def test_rayjobs_run_the_paper_jobs_from_the_image():
    for job in RAY_JOBS:
        spec = job["spec"]
        argv = shlex.split(spec["entrypoint"])
        assert argv[:3] == ["python", "-m", "deita_ray.pipeline"]
        config = argv[argv.index("--config") + 1]
        assert config == f"/opt/deita_ray/jobs/{PAPER_JOBS[job['metadata']['name']]}"
        assert (REPO / "jobs" / Path(config).name).is_file()
        assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
        assert spec["submissionMode"] == "K8sJobMode"
        assert "runtimeEnvYAML" not in spec  # the image carries the project and its stack


def test_rayjob_cluster_matches_the_raycluster():
    """The RayJobs' clusters are raycluster.yaml's, but for the GPU group's maxReplicas (their
    GPU count's)."""
    for job in RAY_JOBS:
        want = copy.deepcopy(_one("RayCluster")["spec"])
        got = job["spec"]["rayClusterSpec"]
        _gpu_group(want)["maxReplicas"] = _gpu_group(got)["maxReplicas"]
        assert got == want, job["metadata"]["name"]


def test_rayjob_files_are_rendered_from_the_raycluster():
    out = subprocess.run(
        [sys.executable, str(CLUSTER / "render_rayjobs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------------------------
# Models offline, auth required, memory and disk sized, comments true


def _ray_containers() -> list[tuple[str, dict]]:
    """(where, the Ray container) of every pod of every cluster spec."""
    return [
        (f"{where}/{group}", pod["containers"][0])
        for where, spec in _cluster_specs()
        for group, pod in _pod_specs(spec)
    ]


def test_ray_pods_run_offline_after_staging():
    """Dozens of engine actors must not call the Hub (rate limits, gated models): the weights
    are in HF_HOME, staged by the staging Job, which alone downloads."""
    for where, c in _ray_containers():
        env = _env(c)
        assert env["HF_HUB_OFFLINE"]["value"] == "1", where
        assert env["HF_HOME"]["value"] == f"{MOUNT}/hf-cache", where
    staging = _env(_one("Job")["spec"]["template"]["spec"]["containers"][0])
    assert "HF_HUB_OFFLINE" not in staging and staging["HF_HOME"]["value"] == f"{MOUNT}/hf-cache"


def test_a_cluster_without_token_auth_cannot_run_a_job_silently():
    """Applied with field validation off, an operator older than KubeRay 1.5.1 drops
    authOptions and starts the cluster without auth. Every Ray container says
    DEITA_REQUIRE_RAY_AUTH=1, so the job's driver (a process of the head's Ray container) stops
    at start unless the operator injected RAY_AUTH_MODE=token."""
    from deita_ray.runtime import check_required_auth

    for doc in [d for _, _, d in RAY_DOCS]:
        spec, name = _cluster_spec(doc), doc["metadata"]["name"]
        for group, pod in _pod_specs(spec):
            ray_container = pod["containers"][0]
            assert _env(ray_container)["DEITA_REQUIRE_RAY_AUTH"]["value"] == "1", (name, group)
            with_auth = _operator_sets_token_auth(name, ray_container, spec["authOptions"])
            env = {e["name"]: e.get("value", "<from secret>") for e in with_auth["env"]}
            check_required_auth(env)  # the operator honoured authOptions: the job runs
            without = {e["name"]: e.get("value", "") for e in ray_container["env"]}
            with pytest.raises(RuntimeError, match=r"KubeRay >= 1\.5\.1"):
                check_required_auth(without)  # an old operator injects nothing: refused
    readme = (CLUSTER / "README.md").read_text()
    assert "1.5.1" in readme and "DEITA_REQUIRE_RAY_AUTH" in readme
    for path in CLUSTER.glob("ray*.yaml"):
        assert "1.5.1" in path.read_text() and "DEITA_REQUIRE_RAY_AUTH" in path.read_text(), path


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(q) -> int:
    q = str(q)
    for unit, factor in _UNITS.items():
        if q.endswith(unit):
            return int(float(q[: -len(unit)]) * factor)
    return int(q)


def _volume(pod: dict, name: str) -> dict:
    (vol,) = [v for v in pod["volumes"] if v["name"] == name]
    return vol


def test_object_store_shm_and_local_disk_are_sized_to_what_pods_write():
    """Every Ray pod sets its object store size, and /dev/shm (a memory emptyDir, counted in
    the container's memory) holds it, else Ray falls back to a disk store; /tmp/ray (logs and
    spilled objects) has room for twice the store; each container asks for the local disk it
    writes (the Ray container: /tmp/ray plus 10 GiB of writable layer), so the pod's
    ephemeral-storage limit covers everything it writes. Head included."""
    gib = 2**30
    for where, spec in _cluster_specs():
        heads = [("head", spec["headGroupSpec"])] + [
            (g["groupName"], g) for g in spec["workerGroupSpecs"]
        ]
        for group, g in heads:
            pod = g["template"]["spec"]
            ray_c = pod["containers"][0]
            store = int(g["rayStartParams"]["object-store-memory"])
            shm = _volume(pod, "dshm")["emptyDir"]
            assert shm["medium"] == "Memory", (where, group)
            mounts = {m["mountPath"]: m["name"] for m in ray_c["volumeMounts"]}
            assert mounts["/dev/shm"] == "dshm" and mounts["/tmp/ray"] == "ray-tmp"
            assert _bytes(shm["sizeLimit"]) >= store + 2 * gib, (where, group)
            res = ray_c["resources"]
            assert _bytes(res["limits"]["memory"]) >= _bytes(shm["sizeLimit"]) + 16 * gib
            assert store >= 4 * gib, (where, group)
            tmp = _bytes(_volume(pod, "ray-tmp")["emptyDir"]["sizeLimit"])
            assert tmp >= 2 * store + 4 * gib, (where, group)
            for c in pod["containers"]:
                r = c["resources"]
                assert r["requests"]["ephemeral-storage"] == r["limits"]["ephemeral-storage"]
            assert _bytes(res["limits"]["ephemeral-storage"]) >= tmp + 10 * gib, (where, group)
        gpu = _gpu_group(spec)["template"]["spec"]
        # GPU pods: room beside the store for NCCL's shared-memory transport between 8 GPUs.
        store = int(_gpu_group(spec)["rayStartParams"]["object-store-memory"])
        assert _bytes(_volume(gpu, "dshm")["emptyDir"]["sizeLimit"]) >= store + 8 * gib


PATH_IN_TEXT = re.compile(
    r"(?<![\w/.:-])((?:deita_ray|cluster|jobs|docs|tests|benchmarks|training)/[\w./<>*-]+)"
)


def test_cluster_files_name_files_that_exist():
    """Comments and docs in cluster/ cite repository files (a bare ``training/x.py`` means
    deita_ray/training/x.py); each one must exist. Patterns (``*``, ``<name>``) are skipped."""
    cited = 0
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        for match in PATH_IN_TEXT.finditer(path.read_text()):
            token = match.group(1).rstrip(".")
            if "*" in token or "<" in token:
                continue
            rel = f"deita_ray/{token}" if token.startswith("training/") else token
            assert (REPO / rel).exists(), f"{path.name} cites {token}, which does not exist"
            cited += 1
    assert cited > 20
    assert "training/plan.py" in (CLUSTER / "Dockerfile").read_text()

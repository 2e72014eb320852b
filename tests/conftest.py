"""Shared fixtures: a real local Ray cluster with explicit small resources, tiny models built on
the fly, and the real public data of ../shared/data (tests skip with a message when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEITA_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real public data; skips the test when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set DEITA_SHARED_DATA)")
    return SHARED_DATA


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
            runtime_env={"env_vars": worker_env(num_threads=2)},
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    # Left running for the rest of the session; pytest's exit shuts it down.


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random LLaMA (hidden 128, 2 heads of dim 64) with a byte-level BPE tokenizer."""
    from deita_ray.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))

"""Fixtures the model stages' tests share: the tiny model's config and backends, canonical rows."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pytest

from deita_ray.config import ModelConfig
from deita_ray.data.formats import CANONICAL_SCHEMA, canonicalize

TINY_MAX_LEN = 512


@pytest.fixture(scope="session")
def tiny_model_cfg(tiny_llama) -> Callable[..., ModelConfig]:
    """``make(backend, max_len=512)``: the tiny LLaMA's config for the ``vllm`` or ``hf`` backend."""

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
def canonical_table() -> Callable[..., pa.Table]:
    """``make(records, prefix="r")``: raw records canonicalised into one table, ids ``prefix:k``."""

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

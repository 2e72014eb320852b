"""The embed stage on the tiny random LLaMA: real vLLM pooling engine, real transformers, real Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from deita_ray.config import ActorPoolConfig, PipelineConfig
from deita_ray.data.formats import CANONICAL_SCHEMA
from deita_ray.stages.embed import OUTPUT_COLUMNS, embed_table
from deita_ray.templates import render_vicuna

MAX_LEN = 512
EMBED_LEN = 384


@pytest.fixture(scope="module")
def pool(shared_data: Path, canonical_table) -> pa.Table:
    """Alpaca rows, multi-turn ShareGPT rows and long LLaMA-Factory conversations."""
    alpaca = json.loads((shared_data / "alpaca/alpaca_data.json").read_text())[:200]
    convs = json.loads((shared_data / "fastchat/dummy_conversation.json").read_text())[:60]
    parts = [canonical_table(alpaca, "alpaca"), canonical_table(convs, "conv")]
    t = pa.concat_tables(parts)
    return t.set_column(1, "seq", pa.array(np.arange(t.num_rows), pa.int64()))


@pytest.fixture(scope="module")
def vllm_embedder(load_tiny):
    backend = load_tiny("vllm", "embed", MAX_LEN)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf_embedder(load_tiny):
    return load_tiny("hf", "embed", MAX_LEN)


@pytest.fixture(scope="module")
def vllm_out(pool, vllm_embedder) -> pa.Table:
    return embed_table(pool, vllm_embedder, EMBED_LEN)


@pytest.fixture(scope="module")
def hf_out(pool, hf_embedder) -> pa.Table:
    return embed_table(pool, hf_embedder, EMBED_LEN)


def matrix(table: pa.Table) -> np.ndarray:
    col = table["embedding"].combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_vllm_and_hf_agree_per_row(vllm_out, hf_out, pool):
    assert vllm_out.column_names[:5] == list(OUTPUT_COLUMNS)
    assert vllm_out["_reject_reason"].null_count == pool.num_rows
    assert vllm_out.schema.field("embedding").type == pa.list_(pa.float32(), 128)
    v, h = matrix(vllm_out), matrix(hf_out)
    assert v.shape == (pool.num_rows, 128)
    assert cosine(v, h).min() >= 0.9999
    np.testing.assert_allclose(v, h, atol=1e-3)
    # not normalised: the raw final hidden state
    assert np.abs(np.linalg.norm(v, axis=1) - 1).max() > 0.1
    assert vllm_out["embed_truncated"].to_pylist() == hf_out["embed_truncated"].to_pylist()


def test_equals_plain_transformers_last_hidden_state(pool, vllm_out, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    v = matrix(vllm_out)
    for i in (0, 1, 200, 201):
        ids = tok(render_vicuna(pool["messages"][i].as_py()), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            h = model(input_ids=ids[:, :EMBED_LEN], output_hidden_states=True).hidden_states[-1]
        np.testing.assert_allclose(v[i], h[0, -1].double().numpy(), atol=1e-3)


def test_independent_of_batch_size_and_batchmates(pool, vllm_out, vllm_embedder, hf_embedder):
    idx = np.random.default_rng(1).permutation(pool.num_rows)[:30]
    sub = pool.take(pa.array(idx))
    want = matrix(vllm_out)[idx]
    for backend in (vllm_embedder, hf_embedder):
        for bs in (1, 7, 30):
            got = matrix(
                pa.concat_tables(
                    [
                        embed_table(sub.slice(s, bs), backend, EMBED_LEN)
                        for s in range(0, sub.num_rows, bs)
                    ]
                )
            )
            assert cosine(got, want).min() >= 0.99999
            np.testing.assert_allclose(got, want, atol=1e-3)


def test_long_conversations_truncated_not_rejected(vllm_embedder, hf_embedder, tiny_llama):
    long = [
        {"role": "user", "content": "Tell me about the ocean. " * 200},
        {"role": "assistant", "content": "The ocean is large. " * 200},
    ]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    table = pa.Table.from_pylist(
        [
            {
                "id": "long",
                "seq": 0,
                "messages": long,
                "source": "t",
                "format": "messages",
                "extra": "{}",
            },
            {
                "id": "short",
                "seq": 1,
                "messages": short,
                "source": "t",
                "format": "messages",
                "extra": "{}",
            },
        ],
        schema=CANONICAL_SCHEMA,
    )
    outs = [embed_table(table, b, 100) for b in (vllm_embedder, hf_embedder)]
    for out in outs:
        assert out["embed_truncated"].to_pylist() == [True, False]
        assert out["_reject_reason"].null_count == 2
    assert cosine(matrix(outs[0]), matrix(outs[1])).min() >= 0.9999
    # the kept part is the beginning: equal to embedding the first 100 tokens' text
    tok = vllm_embedder.tokenizer
    ids = tok(render_vicuna(long))["input_ids"][:100]
    direct, _ = hf_embedder.embed([ids])
    np.testing.assert_allclose(matrix(outs[1])[0], direct[0], atol=1e-4)


def test_rows_without_messages_rejected_rest_embedded(hf_embedder, pool):
    sub = pool.slice(0, 3)
    bad = pa.Table.from_pylist(
        [
            {
                "id": "nomsg",
                "seq": 99,
                "messages": None,
                "source": "t",
                "format": "messages",
                "extra": "{}",
            },
            {
                "id": "tool",
                "seq": 100,
                "messages": [{"role": "tool", "content": "x"}],
                "source": "t",
                "format": "messages",
                "extra": "{}",
            },
        ],
        schema=CANONICAL_SCHEMA,
    )
    out = embed_table(pa.concat_tables([sub, bad]), hf_embedder, EMBED_LEN)
    assert out["_reject_reason"].to_pylist() == [
        None,
        None,
        None,
        "missing_messages",
        "render_error",
    ]
    assert out["embedding"].null_count == 2
    assert json.loads(out["_raw"][4].as_py())["id"] == "tool"
    good = embed_table(sub, hf_embedder, EMBED_LEN)
    np.testing.assert_allclose(matrix(out.slice(0, 3)), matrix(good), atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_parquet_round_trip_keeps_shape_and_dtype(pool, hf_embedder, tmp_path, dtype):
    from deita_ray.data.sink import split_block

    out = embed_table(pool.slice(0, 10), hf_embedder, EMBED_LEN, dtype=dtype)
    good, _ = split_block(out, "embed")
    pq.write_table(good, tmp_path / "e.parquet")
    back = pq.read_table(tmp_path / "e.parquet")
    want = pa.list_(pa.float16() if dtype == "float16" else pa.float32(), 128)
    assert back.schema.field("embedding").type == want
    assert back.column_names == list(OUTPUT_COLUMNS)
    np.testing.assert_array_equal(matrix(back), matrix(good))
    if dtype == "float16":
        full = embed_table(pool.slice(0, 10), hf_embedder, EMBED_LEN)
        assert cosine(matrix(back), matrix(full)).min() >= 0.999


def test_run_embed_stage(ray_local, tiny_model_cfg, tmp_path, pool, vllm_out):
    """Reads ingest (no score stage ran), writes only the selector's columns, balanced counts."""
    from deita_ray.stages.embed import run_embed

    folder = tmp_path / "ingest"
    folder.mkdir()
    sub = pool.slice(150, 80)  # alpaca and multi-turn rows
    for k in range(2):
        pq.write_table(sub.slice(40 * k, 40), folder / f"part-{k}.parquet")
    cfg = PipelineConfig()
    cfg.embed.model = tiny_model_cfg("vllm", MAX_LEN)
    cfg.embed.max_length = EMBED_LEN
    cfg.embed.resources = ActorPoolConfig(concurrency=1, num_cpus=0.5, batch_size=32)
    result = run_embed(cfg, str(tmp_path))
    assert result.counts.to_dict()["rows_in"] == 80 and result.counts.rows_out == 80
    assert result.metrics["dim"] == 128 and result.metrics["source"] == "ingest"
    got = pds.dataset(str(tmp_path / "embed"), format="parquet").to_table()
    assert got.column_names == list(OUTPUT_COLUMNS)
    assert got["evol_score"].null_count == 80
    order = {rid: i for i, rid in enumerate(pool["id"].to_pylist())}
    rows = [order[r] for r in got["id"].to_pylist()]
    assert got["seq"].to_pylist() == pool["seq"].take(pa.array(rows)).to_pylist()
    assert cosine(matrix(got), matrix(vllm_out)[rows]).min() >= 0.99999

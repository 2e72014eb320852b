"""The embed stage with a sentence embedder (the embedded all-MiniLM-L6-v2) and the pooling
rules on a causal LM: real vLLM pooling engine, real transformers, real rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from deita_ray.config import ModelConfig
from deita_ray.models.backend import load_backend
from deita_ray.models.embedding_spec import EmbeddingSpec, model_embedding_spec
from deita_ray.stages.embed import embed_table
from deita_ray.templates import render_plain
from testing.near_duplicates import demo_set, embedder_quality, real_set

QUICKSTART_TAU = 0.8  # jobs/quickstart.yaml


def _cfg(path: str, backend: str, max_len: int = 256) -> ModelConfig:
    return ModelConfig(
        path=path,
        backend=backend,
        dtype="float32",
        max_model_len=max_len,
        enforce_eager=True,
        kv_cache_memory_bytes=64 << 20,
        hf_batch_size=16,
    )


@pytest.fixture(scope="module")
def rows(shared_data: Path, canonical_table) -> pa.Table:
    """Short Alpaca rows, long LIMA answers (past MiniLM's 256 tokens) and multi-turn chats."""
    alpaca = json.loads((shared_data / "alpaca/alpaca_data.json").read_text())[:80]
    lima = json.loads((shared_data / "llama_factory/lima.json").read_text())[:16]
    convs = json.loads((shared_data / "fastchat/dummy_conversation.json").read_text())[100:116]
    return pa.concat_tables(
        [
            canonical_table(alpaca, "alpaca"),
            canonical_table(lima, "lima"),
            canonical_table(convs, "c"),
        ]
    )


@pytest.fixture(scope="module")
def spec(minilm_path) -> EmbeddingSpec:
    return model_embedding_spec(minilm_path)


@pytest.fixture(scope="module")
def outputs(rows, minilm_path, spec) -> dict[str, pa.Table]:
    out = {}
    for backend in ("vllm", "hf"):
        b = load_backend(_cfg(minilm_path, backend), minilm_path, "embed", spec.pooling)
        out[backend] = embed_table(rows, b, 256, spec=spec)
        b.close()
    return out


def _matrix(t: pa.Table) -> np.ndarray:
    return np.array(t["embedding"].to_pylist(), np.float64)


def test_both_backends_give_the_same_unit_vectors(outputs, rows):
    a, b = _matrix(outputs["vllm"]), _matrix(outputs["hf"])
    assert a.shape == (rows.num_rows, 384)
    assert outputs["vllm"]["_reject_reason"].null_count == rows.num_rows
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99999, cos.min()
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-6)  # the folder's Normalize module


def test_equals_the_sentence_transformers_rule_on_the_plain_text(outputs, rows, minilm_path):
    """Reference: plain transformers, the tokenizer's own truncation to 256, mean over the
    attention mask, L2 normalisation (what sentence-transformers computes for this folder)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path, dtype=torch.float32).eval()
    texts = [render_plain(m) for m in rows["messages"].to_pylist()]
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    got = _matrix(outputs["vllm"])
    assert np.abs(got - ref).max() < 1e-4
    assert ((got * ref).sum(1)).min() >= 0.99999
    # Long LIMA answers are cut at 256 tokens and flagged; short rows are not.
    lengths = [len(ids) for ids in tok(texts)["input_ids"]]
    assert outputs["vllm"]["embed_truncated"].to_pylist() == [n > 256 for n in lengths]
    assert sum(n > 256 for n in lengths) >= 8


def test_plain_text_is_the_conversation_without_template():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "(greeting before any question)"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": ""},
    ]
    assert render_plain(msgs) == "What is 2 + 2?\n\n4.\n\nAnd 3 + 3?"
    with pytest.raises(ValueError, match="tool"):
        render_plain([{"role": "tool", "content": "x"}])


def test_pooling_rules_agree_across_backends_on_a_causal_lm(tiny_llama, canonical_table):
    records = [
        {"instruction": f"Explain topic number {k} in detail.", "output": "Sure. " * (k + 1)}
        for k in range(12)
    ]
    table = canonical_table(records)
    for pooling in ("mean", "cls"):
        spec = EmbeddingSpec(pooling=pooling, normalize=True)
        got = {}
        for backend in ("vllm", "hf"):
            b = load_backend(_cfg(str(tiny_llama), backend, 512), str(tiny_llama), "embed", pooling)
            got[backend] = _matrix(embed_table(table, b, 512, spec=spec))
            b.close()
        cos = (got["vllm"] * got["hf"]).sum(1)
        assert cos.min() >= 0.9999, (pooling, cos.min())
        assert np.allclose(np.linalg.norm(got["hf"], axis=1), 1, atol=1e-6)
    # The three rules are different vectors.
    last = load_backend(_cfg(str(tiny_llama), "hf", 512), str(tiny_llama), "embed", "last")
    mean = load_backend(_cfg(str(tiny_llama), "hf", 512), str(tiny_llama), "embed", "mean")
    a = _matrix(embed_table(table, last, 512))
    b = _matrix(embed_table(table, mean, 512))
    assert not np.allclose(a, b)


def test_all_zero_vector_is_a_reject_not_a_row_similar_to_nothing(
    tiny_llama, tmp_path, canonical_table
):
    """A model whose final norm is zero returns zero vectors: each row is rejected with a
    reason (a zero row has cosine 0 to everything and would pass every similarity check)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(str(tiny_llama)).save_pretrained(tmp_path)
    table = canonical_table(
        [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "Count.", "output": "1 2 3"}]
    )
    b = load_backend(_cfg(str(tmp_path), "hf", 512), str(tmp_path), "embed", "last")
    out = embed_table(table, b, 512)
    assert out["_reject_reason"].to_pylist() == ["zero_embedding", "zero_embedding"]
    assert out["embedding"].null_count == 2
    assert json.loads(out["_raw"][0].as_py())["id"] == "r:0"


def test_near_duplicate_quality_does_not_regress(shared_data, minilm_path, spec):
    """A slice of benchmarks/near_duplicates.py: MiniLM separates near-duplicates from unrelated
    rows, and at the quickstart's tau every rejection on the demo pool is a true one."""
    sets = {
        "real": real_set(
            shared_data, {"alpaca": 24, "lima": 8, "seed_tasks": 8, "user_oriented": 8}
        ),
        "demo": demo_set(),
    }
    backend = load_backend(_cfg(minilm_path, "hf"), minilm_path, "embed", spec.pooling)
    figures = {}
    for name, labelled in sets.items():
        table = pa.table(
            {"id": [str(i) for i in range(len(labelled))], "messages": labelled.messages}
        )
        emb = np.array(
            embed_table(table, backend, 256, spec=spec)["embedding"].to_pylist(), np.float32
        )
        figures[name] = embedder_quality(emb, labelled, [QUICKSTART_TAU])
    assert figures["real"]["auc"] >= 0.98, figures["real"]["cosines"]
    demo = figures["demo"]["taus"][0]
    assert demo["precision"] >= 0.95, demo
    assert demo["unrelated_pairs_above"] == 0, demo
    assert demo["recall"] >= 0.8, demo


def test_the_embedder_caps_the_context_at_the_models_own_limit(minilm_path, spec):
    """A sentence embedder reads at most its max_seq_length: the Embedder gives the engine
    that context whatever max_model_len the job sets (vLLM refuses a longer one)."""
    from deita_ray.stages.embed import Embedder

    embedder = Embedder(_cfg(minilm_path, "hf", max_len=2048), minilm_path, 2048, spec=spec)
    assert embedder.backend.cfg.max_model_len == 256 == embedder.backend.max_prompt_tokens
    embedder.backend.close()

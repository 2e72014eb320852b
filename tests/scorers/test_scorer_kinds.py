"""Every scorer kind on the tiny random LLaMA: values against an independent plain-transformers
computation written here, vLLM against transformers, rating == DEITA quality with the DEITA
template, truncation and rejects, lengths. The same checks on SmolLM2 are slow tests.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from deita_ray.config import ModelConfig, load_config
from deita_ray.data.formats import extract_turns
from deita_ray.scorers import get_kind, resolve_scorers
from deita_ray.scoring import DigitTokenError
from deita_ray.stages.score import _bind_all, score_batch
from deita_ray.templates import QUALITY_PIECES

MAX_LEN = 1024
DEITA_QUALITY_TEMPLATE = "{instruction}".join(
    [QUALITY_PIECES[0], "{response}".join(QUALITY_PIECES[1:])]
)


@pytest.fixture(scope="module")
def rows(shared_data: Path, canonical_table) -> pa.Table:
    """Short Alpaca rows, two multi-turn conversations and one row with an empty response."""
    alpaca = json.loads((shared_data / "alpaca/alpaca_data.json").read_text())
    short = [r for r in alpaca[:200] if len(r["instruction"] + r["input"] + r["output"]) < 300]
    convs = json.loads((shared_data / "fastchat/dummy_conversation.json").read_text())
    multi = [c for c in convs if len(c["conversations"]) >= 4][:2]
    empty = {"instruction": "Say nothing.", "output": ""}
    return canonical_table([*short[:10], *multi, empty], "k")


def _specs(entries: list[dict], model_path: str, backend: str, max_len: int = MAX_LEN):
    model = {
        "path": model_path,
        "backend": backend,
        "dtype": "float32",
        "max_model_len": max_len,
        "enforce_eager": True,
        "kv_cache_memory_bytes": 64 << 20,
    }
    scorers = [{**e, "model": model} for e in entries]
    cfg = load_config(
        data={"demo_pool": True, "stages": ["ingest", "score"], "score": {"scorers": scorers}}
    )
    return resolve_scorers(cfg)


def _run(table: pa.Table, backend, specs) -> tuple[pa.Table, dict]:
    tok = backend.tokenizer
    specs = [get_kind(s.kind).resolve_labels(s, tok) for s in specs]
    stats: dict = {}
    out = score_batch(
        table,
        backend,
        _bind_all(specs, tok, backend.max_prompt_tokens),
        ("complexity_scores", "quality_scores"),
        stats,
    )
    return out, stats


@pytest.fixture(scope="module")
def backends(tiny_llama):
    from deita_ray.models.backend import load_backend

    made = {}
    for name in ("hf", "vllm"):
        cfg = ModelConfig(
            path=str(tiny_llama),
            backend=name,
            dtype="float32",
            max_model_len=MAX_LEN,
            enforce_eager=True,
            kv_cache_memory_bytes=64 << 20,
            hf_batch_size=8,
        )
        made[name] = load_backend(cfg, str(tiny_llama), "score")
    yield made
    for b in made.values():
        b.close()


ALL = [
    {"kind": "perplexity"},
    {
        "kind": "ifd",
        "max_ifd": float("inf"),
        "columns": ["turn", "turn_nll_cond", "turn_nll_alone", "row", "nll_cond", "nll_alone"]
        + ["ppl_ratio", "tokens", "truncated"],
    },
    {"kind": "rating", "template": DEITA_QUALITY_TEMPLATE, "scale": 6},
    {"kind": "deita_quality", "columns": ["turn", "row"]},  # the row mean is off by default
    {"kind": "length"},
]


@pytest.fixture(scope="module")
def scored(rows, backends, tiny_llama) -> dict[str, pa.Table]:
    return {
        name: _run(rows, b, _specs(ALL, str(tiny_llama), name))[0] for name, b in backends.items()
    }


def reference(model_path: str, table: pa.Table, template: str = "{instruction}\n") -> list:
    """Per row: per turn (sum of -log p given instruction and history, sum alone, tokens),
    computed with one unpadded plain-transformers forward per sequence."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prefix = tok("", add_special_tokens=True)["input_ids"] or [tok.bos_token_id]

    def neg_logprobs(ids: list[int], lo: int, hi: int) -> float:
        with torch.inference_mode():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        return -sum(lp[j - 1, ids[j]].item() for j in range(lo, hi))

    out = []
    for messages in table["messages"].to_pylist():
        ids, spans = list(prefix), []
        for instruction, response in extract_turns(messages):
            ids += tok(template.format(instruction=instruction), add_special_tokens=False)[
                "input_ids"
            ]
            r = tok(response, add_special_tokens=False)["input_ids"]
            spans.append((len(ids), len(ids) + len(r), r))
            ids += r
        turns = []
        for a, b, r in spans:
            if a == b:
                turns.append(None)
                continue
            alone = neg_logprobs(prefix + r, len(prefix), len(prefix) + len(r))
            turns.append((neg_logprobs(ids, a, b), alone, b - a))
        out.append(turns)
    return out


def test_perplexity_and_ifd_equal_plain_transformers(scored, rows, tiny_llama):
    want = reference(str(tiny_llama), rows)
    for name, t in scored.items():
        got = t.to_pylist()
        for row, turns in zip(got, want, strict=True):
            assert row["_reject_reason"] is None, (name, row["_reject_detail"])
            scored_turns = [x for x in turns if x is not None]
            if not scored_turns:  # the empty response: nulls, not a reject
                assert row["ppl"] is None and row["ifd"] is None and row["ppl_tokens"] == 0
                assert row["ppl_nll_turns"] == [None]
                continue
            cond = sum(x[0] for x in scored_turns)
            alone = sum(x[1] for x in scored_turns)
            m = sum(x[2] for x in scored_turns)
            assert row["ppl_tokens"] == row["ifd_tokens"] == m
            np.testing.assert_allclose(row["ppl_nll"], cond / m, atol=1e-4, err_msg=name)
            np.testing.assert_allclose(row["ppl"], np.exp(cond / m), rtol=1e-4, err_msg=name)
            np.testing.assert_allclose(row["ifd_nll_cond"], cond / m, atol=1e-4)
            np.testing.assert_allclose(row["ifd_nll_alone"], alone / m, atol=1e-4)
            np.testing.assert_allclose(row["ifd"], cond / alone, atol=1e-5)
            np.testing.assert_allclose(
                row["ifd_ppl_ratio"], np.exp(cond / m - alone / m), rtol=1e-4
            )
            for t_, x in enumerate(turns):
                if x is None:
                    assert row["ppl_nll_turns"][t_] is None
                    continue
                np.testing.assert_allclose(row["ppl_nll_turns"][t_], x[0] / x[2], atol=1e-4)
                np.testing.assert_allclose(row["ifd_turns"][t_], x[0] / x[1], atol=1e-5)
            assert row["ppl_truncated"] is False and row["truncated"] is False


def test_vllm_and_hf_agree_on_every_kind(scored):
    v, h = scored["vllm"], scored["hf"]
    for col in ("ppl_nll", "ppl", "ifd", "ifd_nll_cond", "ifd_nll_alone", "rating", "quality"):
        if col not in v.column_names:
            continue
        a = np.array(v[col].to_pylist(), dtype=float)
        b = np.array(h[col].to_pylist(), dtype=float)
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5, err_msg=col)
    for col in ("rating_scores", "quality_scores", "ifd_turns", "ppl_nll_turns"):
        a = [x for r in v[col].to_pylist() for x in r if x is not None]
        b = [x for r in h[col].to_pylist() for x in r if x is not None]
        assert len(a) == len(b) > 10
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=col)
    assert np.std(v["ppl_nll"].to_numpy(zero_copy_only=False)[:-1]) > 1e-3


def test_rating_with_the_deita_template_equals_deita_quality(scored, rows, backends, tiny_llama):
    """Same prompts, same labels, same formula: the rating kind with the DEITA quality template
    and scale 6 is the DEITA quality scorer, exactly (each run alone and both in one batch)."""
    for name, backend in backends.items():
        rating, _ = _run(rows, backend, _specs(ALL[2:3], str(tiny_llama), name))
        quality, _ = _run(rows, backend, _specs(ALL[3:4], str(tiny_llama), name))
        assert rating["rating_scores"].to_pylist() == quality["quality_scores"].to_pylist(), name
        both = scored[name]
        np.testing.assert_allclose(
            [x for r in both["rating_scores"].to_pylist() for x in r],
            [x for r in both["quality_scores"].to_pylist() for x in r],
            atol=1e-9,
        )


def test_lengths_count_characters_and_tokens(scored, rows, backends):
    tok = backends["hf"].tokenizer
    got = scored["hf"].to_pylist()
    for row, messages in zip(got, rows["messages"].to_pylist(), strict=True):
        turns = extract_turns(messages)
        assert row["instruction_chars"] == sum(len(u) for u, _ in turns)
        assert row["response_chars"] == sum(len(r) for _, r in turns)
        assert row["response_tokens"] == sum(
            len(tok(r, add_special_tokens=False)["input_ids"]) for _, r in turns
        )


def test_long_rows_truncated_by_the_rule_and_flagged_or_rejected(load_tiny, tiny_llama):
    """Budget 63 tokens: a long response is scored on its first tokens and flagged; a row whose
    instruction alone fills the budget is rejected with a reason; rating prompts are cut
    inside their text fields and flagged like the DEITA ones; nothing is silently cut."""
    from deita_ray.data.formats import CANONICAL_SCHEMA

    backend = load_tiny("hf", "score", 64)
    long_text = "Write a poem about the ocean. " * 20
    records = [
        [("user", "Give three tips."), ("assistant", long_text)],
        [("user", long_text), ("assistant", "Short.")],
        [("user", "Hi"), ("assistant", "Hello.")],
    ]
    table = pa.Table.from_pylist(
        [
            {
                "id": f"t:{k}",
                "seq": k,
                "messages": [{"role": r, "content": c} for r, c in msgs],
                "source": "t",
                "format": "messages",
                "extra": "{}",
            }
            for k, msgs in enumerate(records)
        ],
        schema=CANONICAL_SCHEMA,
    )
    rubric = {"kind": "rating", "template": "Q: {instruction} A: {response} Rating: "}
    specs = _specs([{"kind": "perplexity"}, {"kind": "ifd"}, rubric], str(tiny_llama), "hf", 64)
    out, _ = _run(table, backend, specs)
    rows = out.to_pylist()
    assert rows[0]["_reject_reason"] is None
    assert rows[0]["ppl_truncated"] and rows[0]["ifd_truncated"] and rows[0]["truncated"]
    prompt = len(backend.tokenizer("Give three tips.\n")["input_ids"])
    assert rows[0]["ppl_tokens"] == rows[0]["ifd_tokens"] == 63 - prompt
    assert rows[0]["rating_truncated"]  # the rubric prompt was cut inside the response field
    assert rows[1]["_reject_reason"] == "prompt_too_long"
    assert "score.scorers[0] (perplexity)" in rows[1]["_reject_detail"]
    assert rows[1]["ppl"] is None and rows[1]["rating"] is None
    assert rows[2]["_reject_reason"] is None and not rows[2]["truncated"]
    assert not rows[2]["ppl_truncated"] and not rows[2]["rating_truncated"]


def test_rating_token_that_is_not_one_token_fails_naming_it(backends, tiny_llama):
    spec = _specs(
        [{"kind": "rating", "rating_tokens": ["1", "xyzzy"], "template": "{instruction}"}],
        str(tiny_llama),
        "hf",
    )[0]
    with pytest.raises(DigitTokenError, match="rating token 'xyzzy' is not a single token"):
        get_kind("rating").resolve_labels(spec, backends["hf"].tokenizer)
    bad_ids = dataclasses.replace(spec, options={**spec.options, "token_ids": [1, 1]})
    with pytest.raises(DigitTokenError, match=r"score.scorers\[0\].token_ids"):
        get_kind("rating").resolve_labels(bad_ids, backends["hf"].tokenizer)


# ------------------------------------------------------------------ SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_kinds_vllm_hf_and_plain_transformers_agree_fp32(smollm2_path, rows):
    """On the real model: perplexity and IFD equal the plain-transformers computation, the
    two backends agree to 1e-4 on every kind, and rating with the DEITA quality template
    equals DEITA quality on the vLLM engine."""
    from deita_ray.models.backend import load_backend

    got = {}
    for name in ("vllm", "hf"):
        cfg = ModelConfig(
            path=smollm2_path,
            backend=name,
            dtype="float32",
            max_model_len=MAX_LEN,
            enforce_eager=True,
            kv_cache_memory_bytes=128 << 20,
        )
        backend = load_backend(cfg, smollm2_path, "score")
        got[name] = _run(rows, backend, _specs(ALL, smollm2_path, name))[0]
        if name == "vllm":
            q = _run(rows, backend, _specs(ALL[3:4], smollm2_path, name))[0]
            r = _run(rows, backend, _specs(ALL[2:3], smollm2_path, name))[0]
            assert r["rating_scores"].to_pylist() == q["quality_scores"].to_pylist()
        backend.close()
    want = reference(smollm2_path, rows)
    for name, t in got.items():
        for row, turns in zip(t.to_pylist(), want, strict=True):
            kept = [x for x in turns if x is not None]
            if not kept:
                continue
            cond, alone, m = (sum(x[k] for x in kept) for k in range(3))
            np.testing.assert_allclose(row["ppl_nll"], cond / m, atol=1e-4, err_msg=name)
            np.testing.assert_allclose(row["ifd"], cond / alone, atol=1e-4, err_msg=name)
    for col in ("ppl_nll", "ifd", "ifd_nll_alone", "rating", "quality"):
        a = np.array(got["vllm"][col].to_pylist(), dtype=float)
        b = np.array(got["hf"][col].to_pylist(), dtype=float)
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=col)

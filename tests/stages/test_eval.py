"""The eval stage: rows and rejects, the contamination guard, the likelihood against an
independent transformers computation, vLLM against hf, the judge machinery, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deita_ray.config import load_config
from deita_ray.evaluation import (
    bootstrap_means,
    likelihood_texts,
    normalize_prompt,
    pairwise_outcome,
    parse_rating,
    parse_verdict,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

EVAL_RECORDS = [
    {"instruction": "Name a primary color.", "output": "Red is a primary color."},
    {"instruction": "What is 2 + 2?", "output": "2 + 2 = 4."},
    {"instruction": "Write a haiku about rain.", "output": "Soft rain on the roof\nquiet drums"},
    # Also in the pool below, written differently (case, spaces): contaminated.
    {"instruction": "Give  three tips for staying HEALTHY.", "output": "Sleep, eat, move."},
    {"instruction": "No answer here"},  # missing_field
    ["not", "an", "object"],  # not_an_object
    {"instruction": "Say nothing.", "output": "   "},  # empty_reference_answer
]


@pytest.fixture(scope="module")
def chat_model(tiny_llama, tmp_path_factory) -> Path:
    """The tiny LLaMA with a ChatML-like chat template (its tokenizer has none)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_chat")
    shutil.copytree(tiny_llama, out, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    return out


def _model(path: Path, backend: str) -> dict:
    return {
        "path": str(path),
        "backend": backend,
        "dtype": "float32",
        "max_model_len": 512,
        "enforce_eager": True,
        "kv_cache_memory_bytes": 64 << 20,
        "hf_batch_size": 4,
    }


def _job(out: Path, sets: list[dict], model: dict, **eval_extra) -> dict:
    return {
        "stages": ["eval"],
        "output": {"dir": str(out)},
        "eval": {
            "model": model,
            "sets": sets,
            "resources": {"concurrency": 1, "num_cpus": 1, "batch_size": 4},
            **eval_extra,
        },
    }


def _pool(out: Path, canonical_table) -> None:
    table = canonical_table(
        [
            {"instruction": "give three tips for staying healthy.", "output": "Eat well."},
            {"instruction": "Translate 'cat' to French.", "output": "chat"},
        ],
        prefix="pool",
    )
    (out / "ingest").mkdir(parents=True)
    pq.write_table(table, out / "ingest" / "part-0.parquet")


def _eval_file(tmp_path: Path) -> Path:
    path = tmp_path / "evalset.json"
    path.write_text(json.dumps(EVAL_RECORDS))
    return path


def _read(folder: Path) -> pa.Table:
    files = sorted(folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("seq")


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_bootstrap_is_seeded_and_weighted():
    rng = np.random.default_rng(1)
    v = rng.normal(2.0, 1.0, 200)
    w = rng.integers(1, 50, 200).astype(float)
    a = bootstrap_means(v, w, 1000, seed=0)
    assert a == bootstrap_means(v, w, 1000, seed=0)
    assert a["mean"] == pytest.approx((v * w).sum() / w.sum())
    lo, hi = a["ci95"]
    assert lo < a["mean"] < hi and hi - lo < 0.6
    assert bootstrap_means(v, None, 1000, 0)["mean"] == pytest.approx(v.mean())
    assert bootstrap_means(np.empty(0))["mean"] is None


def test_judge_outputs_parse_or_keep_their_reason():
    assert parse_rating("Rating: [[8]]") == (8.0, None)
    assert parse_rating("Rating: [8.5]") == (8.5, None)
    assert parse_rating("I think it is good") == (None, "no_rating")
    assert parse_rating("[[3]] or maybe [[9]]") == (None, "ambiguous_rating")
    assert parse_rating("[[42]]") == (None, "rating_out_of_range")
    assert parse_verdict("so [[A]]") == ("A", None)
    assert parse_verdict("[[A]] ... no, [[B]]") == (None, "ambiguous_verdict")
    assert parse_verdict("A is better") == (None, "no_verdict")
    assert pairwise_outcome("A", "B") == "win"
    assert pairwise_outcome("B", "A") == "loss"
    assert pairwise_outcome("C", "C") == "tie"
    assert pairwise_outcome("A", "A") == "inconsistent"  # position bias is not a win


def test_likelihood_texts_follow_the_definition(chat_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    p, f = likelihood_texts(msgs, "chat_template", tok)
    assert p.endswith("<|im_start|>assistant\n") and f.startswith(p)
    assert f[len(p) :] == "Hello</s>\n"  # end-of-turn included
    p, f = likelihood_texts(msgs, "vicuna_v1.1", tok)
    assert p.endswith("USER: Hi ASSISTANT: ") and f[len(p) :] == "Hello</s>"
    assert normalize_prompt("  A\u00a0b\n\tC ") == "a b c"


# ---------------------------------------------------------------------------------------------
# Reading sets


def test_real_eval_sets_read_with_rejects(ray_local, shared_data):
    from deita_ray.config import EvalSetConfig
    from deita_ray.stages.eval import read_eval_set

    alpaca = shared_data / "alpaca_eval/results/gpt4_1106_preview/model_outputs.json"
    rows, rejects = read_eval_set(EvalSetConfig(name="a", paths=[str(alpaca)], limit=25))
    assert len(rows) == 25 and not rejects
    first = json.loads(alpaca.read_text())[0]
    assert rows[0].messages == [
        {"role": "user", "content": first["instruction"]},
        {"role": "assistant", "content": first["output"]},
    ]
    assert rows[0].id == "model_outputs:0"

    mt = shared_data / "fastchat/llm_judge/mt_bench"
    rows, rejects = read_eval_set(
        EvalSetConfig(
            name="mt",
            paths=[str(mt / "question.jsonl")],
            format="mt_bench",
            references=[str(mt / "reference_answer/gpt-4.jsonl")],
        )
    )
    # 80 questions, 30 with GPT-4 reference answers, 2 turns each.
    assert len(rows) == 60 and len(rejects) == 50
    assert {r["reason"] for r in rejects} == {"no_reference_answer"}
    t2 = next(r for r in rows if r.id.endswith(":t2"))
    assert [m["role"] for m in t2.messages] == ["user", "assistant", "user", "assistant"]


# ---------------------------------------------------------------------------------------------
# The stage


def _independent_nll(model_dir: Path, messages: list[dict]) -> tuple[float, int]:
    """Sum of NLL of the answer tokens, straight from transformers (fp32, one forward)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    p = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    f = tok.apply_chat_template(messages, tokenize=False)
    prompt = [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
    answer = tok(f[len(p) :], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    pos = torch.arange(len(prompt), len(prompt) + len(answer))
    return float(-logp[pos - 1, ids[0, pos]].sum()), len(answer)


def test_likelihood_stage_hf(ray_local, chat_model, canonical_table, tmp_path):
    from deita_ray.stages.eval import run_eval

    out = tmp_path / "out"
    _pool(out, canonical_table)
    cfg = load_config(
        data=_job(
            out, [{"name": "tiny", "paths": [str(_eval_file(tmp_path))]}], _model(chat_model, "hf")
        )
    )
    res = run_eval(cfg, str(out))
    c = res.counts
    assert (c.rows_in, c.rows_out) == (7, 3)
    assert c.rejected_by_reason == {
        "contaminated": 1,
        "missing_field": 1,
        "not_an_object": 1,
        "empty_reference_answer": 1,
    }
    rejects = pq.read_table(out / "rejects/eval/tiny/input.parquet").to_pylist()
    dirty = next(r for r in rejects if r["reason"] == "contaminated")
    assert "HEALTHY" in dirty["raw"]
    assert all(r["raw"] for r in rejects)
    bad = next(r for r in rejects if r["reason"] == "not_an_object")
    assert bad["range_unit"] and bad["range_start"] < bad["range_end"]  # where in its file

    got = _read(out / "eval/tiny/likelihood")
    assert got.num_rows == 3
    for row in got.to_pylist():
        rec = EVAL_RECORDS[row["seq"] & ((1 << 40) - 1)]
        msgs = [
            {"role": "user", "content": rec["instruction"]},
            {"role": "assistant", "content": rec["output"]},
        ]
        nll, n = _independent_nll(chat_model, msgs)
        assert row["answer_tokens"] == n
        assert row["nll_sum"] == pytest.approx(nll, abs=1e-4)
    m = res.metrics["sets"]["tiny"]["likelihood"]
    sums = np.array(got["nll_sum"].to_pylist())
    toks = np.array(got["answer_tokens"].to_pylist())
    assert m["nll_token_mean"] == pytest.approx(sums.sum() / toks.sum())
    assert m["nll_row_mean"] == pytest.approx(np.mean(sums / toks))
    assert m["nll_token_mean_ci95"][0] <= m["nll_token_mean"] <= m["nll_token_mean_ci95"][1]

    # Resume: a re-run with the parts on disk computes nothing again and reports the same.
    before = sorted(p.name for p in (out / "eval/tiny/likelihood").glob("*.parquet"))
    again = run_eval(cfg, str(out))
    assert sorted(p.name for p in (out / "eval/tiny/likelihood").glob("*.parquet")) == before
    assert again.metrics["sets"]["tiny"]["likelihood"] == m


def test_judge_machinery_counts_unparsed_outputs(ray_local, chat_model, tmp_path, shared_data):
    """The tiny random model judges: its outputs are noise, so nearly every one is
    unparseable, and every one is counted by its reason, never as a tie or a score."""
    from deita_ray.stages.eval import run_eval

    out = tmp_path / "out"
    model = _model(chat_model, "hf")
    cfg = load_config(
        data=_job(
            out,
            [{"name": "tiny", "paths": [str(_eval_file(tmp_path))]}],
            model,
            metrics=["judge_single", "judge_pairwise"],
            max_new_tokens=8,
            judge={
                "model": model,
                "prompts": str(shared_data / "fastchat/llm_judge/judge_prompts.jsonl"),
                "max_tokens": 8,
                "resources": {"concurrency": 1, "num_cpus": 1, "batch_size": 8},
            },
        )
    )
    res = run_eval(cfg, str(out))
    e = res.metrics["sets"]["tiny"]
    assert e["generated"] == 4  # no pool: nothing contaminated
    single = e["judge_single"]
    assert single["rated"] + sum(single["failed_by_reason"].values()) == 4
    pair = e["judge_pairwise"]
    assert pair["judged"] + sum(pair["failed_by_reason"].values()) == 4
    assert pair["judged"] == sum(pair["outcomes"].values())
    judged = _read(out / "eval/tiny/judge_pairwise")
    assert judged.num_rows == 8  # both orders of each row
    prompts = [json.loads(x) for x in judged["judge_messages"].to_pylist()]
    assert "[The Start of Assistant A's Answer]" in prompts[0][-1]["content"]
    gen = _read(out / "eval/tiny/generations")
    assert gen["output"].null_count == 0


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_vllm_and_hf_likelihoods_agree(ray_local, chat_model, tmp_path, shared_data, which):
    from deita_ray.config import EMBEDDED_MODEL
    from deita_ray.stages.eval import run_eval

    alpaca = shared_data / "alpaca_eval/results/gpt4_1106_preview/model_outputs.json"
    path = chat_model if which == "tiny" else EMBEDDED_MODEL
    results = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        model = dict(_model(path, backend), max_model_len=2048, kv_cache_memory_bytes=256 << 20)
        sets = [{"name": "ae", "paths": [str(alpaca)], "limit": 8}]
        cfg = load_config(data=_job(out, sets, model))
        run_eval(cfg, str(out))
        results[backend] = _read(out / "eval/ae/likelihood")
    hf, vl = results["hf"], results["vllm"]
    # The same rows are too long for both (the tiny tokenizer spends many tokens per word).
    assert hf["id"].to_pylist() == vl["id"].to_pylist() and hf.num_rows >= 5
    assert hf["answer_tokens"].to_pylist() == vl["answer_tokens"].to_pylist()
    a = np.array(hf["nll_mean"].to_pylist())
    b = np.array(vl["nll_mean"].to_pylist())
    assert np.abs(a - b).max() < 1e-4, np.abs(a - b).max()


def test_hf_generate_is_greedy_and_isolates_bad_prompts(load_tiny, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    backend = load_tiny("hf", "generate")
    tok = backend.tokenizer
    good = [tok.bos_token_id, *tok("What is the capital of France?")["input_ids"][1:]]
    short = good[:3]
    texts, errors = backend.generate([good, [], short], [6, 6, 3])
    assert errors[0] is None and errors[2] is None and "empty prompt" in errors[1]
    assert texts[1] is None
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    for prompt, n, text in ((good, 6, texts[0]), (short, 3, texts[2])):
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
        )[0, len(prompt) :].tolist()
        eos = ref.index(tok.eos_token_id) if tok.eos_token_id in ref else len(ref)
        assert text == tok.decode(ref[:eos], skip_special_tokens=True)
    backend.close()

"""The backend interface: factory, dtype policy, the vLLM log-probability contract, and the
vllm/hf agreement on the real SmolLM2-135M model (slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from deita_ray.config import EMBEDDED_MODEL, ModelConfig
from deita_ray.models.backend import BackendContractError, load_backend, resolve_dtype
from deita_ray.templates import complexity_prompt


def test_dtype_policy():
    import torch

    assert resolve_dtype("auto") == ("bfloat16" if torch.cuda.is_available() else "float32")
    assert resolve_dtype("bfloat16") == "bfloat16"
    assert resolve_dtype("float32") == "float32"


def test_factory_and_task_guard(tiny_llama):
    from deita_ray.models.hf_backend import HFBackend

    cfg = ModelConfig(path=str(tiny_llama), backend="hf", max_model_len=256)
    scorer = load_backend(cfg, str(tiny_llama), "score")
    assert isinstance(scorer, HFBackend) and scorer.max_prompt_tokens == 255
    assert scorer.dtype == resolve_dtype("auto")
    with pytest.raises(RuntimeError, match="scoring"):
        scorer.embed([[1, 2]])
    embedder = load_backend(cfg, str(tiny_llama), "embed")
    assert embedder.max_prompt_tokens == 256 and embedder.hidden_size == 128
    with pytest.raises(RuntimeError, match="embedding"):
        embedder.digit_logits([[1, 2]], list(range(6)))
    with pytest.raises(ValueError, match="task"):
        load_backend(cfg, str(tiny_llama), "train")
    bad = ModelConfig(path=str(tiny_llama), backend="hf")
    bad.backend = "onnx"
    with pytest.raises(ValueError, match="onnx"):
        load_backend(bad, str(tiny_llama), "score")


def test_load_tokenizer_pads_with_eos_and_encodes_the_same(tiny_llama, tmp_path):
    """The one load_tokenizer (scoring, embedding, training) gives a tokenizer without a pad
    token its EOS as pad; encodings do not change."""
    from transformers import AutoTokenizer

    from deita_ray.models.backend import load_tokenizer

    plain = AutoTokenizer.from_pretrained(str(tiny_llama))
    plain.pad_token = None  # as Mistral / LLaMA tokenizers ship
    plain.save_pretrained(tmp_path)
    raw = AutoTokenizer.from_pretrained(str(tmp_path))
    assert raw.pad_token_id is None
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token_id == tok.eos_token_id
    text = complexity_prompt("Pad </s> me <pad> twice")
    assert tok(text)["input_ids"] == raw(text)["input_ids"]
    assert load_tokenizer(str(tiny_llama)).pad_token == "<pad>"  # an own pad token stays


@pytest.mark.parametrize("task", ["embed", "score"])
def test_hf_backend_outputs_do_not_depend_on_the_pad_id(tiny_llama, task):
    """Right padding is masked: the values of every prompt are bit-identical whatever id fills
    the padding (so giving pad-less tokenizers EOS as pad changes no score or embedding)."""
    cfg = ModelConfig(path=str(tiny_llama), backend="hf", max_model_len=256, hf_batch_size=4)
    backend = load_backend(cfg, str(tiny_llama), task)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 500, size=n).tolist() for n in (3, 17, 9, 40, 5, 22)]

    def run() -> np.ndarray:
        if task == "embed":
            return backend.embed(prompts)[0]
        return backend.digit_logits(prompts, list(range(10, 16)))[0]

    results = []
    for pad in (0, backend.tokenizer.eos_token_id, 499):
        backend.pad_id = pad
        results.append(run())
    for other in results[1:]:
        assert other.tobytes() == results[0].tobytes()


def test_vllm_logprob_contract_fails_loudly(tiny_llama):
    """An engine whose log-probabilities are not the six processed digit ones must raise,
    never yield a score (the reference code silently returns 3.0 here)."""
    from vllm import LLM, SamplingParams

    from deita_ray.models.vllm_backend import digit_logprobs
    from deita_ray.scoring import resolve_digit_ids

    llm = LLM(
        str(tiny_llama),
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        kv_cache_memory_bytes=32 << 20,
        logprobs_mode="raw_logprobs",
    )
    try:
        digits = resolve_digit_ids(llm.get_tokenizer())
        prompts = [complexity_prompt(q) for q in ("What is 2+2?", "Write a poem.")]
        raw = llm.generate(
            prompts,
            SamplingParams(max_tokens=1, temperature=0, allowed_token_ids=digits, logprobs=6),
            use_tqdm=False,
        )
        with pytest.raises(BackendContractError, match="processed_logprobs"):
            digit_logprobs(raw, digits)
        too_few = llm.generate(
            prompts,
            SamplingParams(max_tokens=1, temperature=0, allowed_token_ids=digits, logprobs=1),
            use_tqdm=False,
        )
        with pytest.raises(BackendContractError):
            digit_logprobs(too_few, digits)
    finally:
        llm.llm_engine.engine_core.shutdown()


# ------------------------------------------------------------------ token log-probabilities


def _reference_token_logprobs(path: str, seqs: list[list[int]], starts: list[int]) -> list:
    """Independent plain-transformers computation: one unpadded forward per sequence, the full
    logits, log_softmax in fp32, the prompt token's entry."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for seq, start in zip(seqs, starts, strict=True):
            logits = model(torch.tensor([seq])).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            out.append(np.array([lp[j - 1, seq[j]].item() for j in range(start, len(seq))]))
    return out


def _logprob_inputs(tok) -> tuple[list[list[int]], list[int]]:
    texts = [
        "What is the capital of France? Paris.",
        "Write a poem about the ocean.",
        "def add(a, b): return a + b",
        "Give three tips for staying healthy. " * 6,
        "x",
    ]
    seqs = [tok(t)["input_ids"] for t in texts]
    return seqs, [3, 1, len(seqs[2]) - 1, 10, len(seqs[4])]


@pytest.fixture(scope="module")
def tiny_logprob_backends(tiny_llama):
    """The tiny LLaMA as vllm (its scoring engine: processed_logprobs mode) and hf scorers."""
    made = {}
    for name in ("vllm", "hf"):
        cfg = ModelConfig(
            path=str(tiny_llama),
            backend=name,
            dtype="float32",
            max_model_len=128,
            enforce_eager=True,
            kv_cache_memory_bytes=32 << 20,
            hf_batch_size=2,
        )
        made[name] = load_backend(cfg, str(tiny_llama), "score")
    yield made
    for b in made.values():
        b.close()


def test_token_logprobs_backends_agree_with_plain_transformers(tiny_llama, tiny_logprob_backends):
    """vllm and hf return the raw fp32 log-softmax of the prompt tokens (the vLLM engine runs
    in processed_logprobs mode and with the digit mask on other requests: neither leaks into
    prompt log-probabilities), equal to an unpadded plain-transformers forward to 1e-4."""
    from deita_ray.scoring import resolve_digit_ids

    tok = tiny_logprob_backends["hf"].tokenizer
    seqs, starts = _logprob_inputs(tok)
    want = _reference_token_logprobs(str(tiny_llama), seqs, starts)
    digits = resolve_digit_ids(tok)
    for name, backend in tiny_logprob_backends.items():
        backend.digit_logits(seqs[:2], digits)  # a masked request before, on the same engine
        vals, errors = backend.token_logprobs(seqs, starts)
        assert errors == [None] * len(seqs), name
        for v, w, s, b in zip(vals, want, seqs, starts, strict=True):
            assert v.dtype == np.float64 and v.shape == (len(s) - b,)
            np.testing.assert_allclose(v, w, atol=1e-4, rtol=0, err_msg=name)
        assert vals[4].shape == (0,)  # start == len: nothing to return
        assert np.all(np.concatenate(vals) < 0)


def test_token_logprobs_bad_rows_isolated(tiny_logprob_backends):
    """A too-long sequence, a start outside [1, len] and a token id the engine refuses each
    fail alone with a message; the other rows equal their values computed alone."""
    tok = tiny_logprob_backends["hf"].tokenizer
    seqs, starts = _logprob_inputs(tok)
    long = tok("Write a poem about the ocean. " * 40)["input_ids"]
    assert len(long) > 127
    bad_id = [seqs[0][0], 10**6, seqs[0][1], seqs[0][2]]
    batch = [seqs[0], long, seqs[1], seqs[2], bad_id, seqs[3]]
    begin = [starts[0], 1, 0, starts[2], 1, starts[3]]
    for name, backend in tiny_logprob_backends.items():
        alone, _ = backend.token_logprobs(
            [seqs[0], seqs[2], seqs[3]], [starts[i] for i in (0, 2, 3)]
        )
        vals, errors = backend.token_logprobs(batch, begin)
        assert [e is None for e in errors] == [True, False, False, True, False, True], name
        assert "127" in errors[1] and "start 0" in errors[2]
        assert vals[1] is None and vals[2] is None and vals[4] is None
        for got, ref in zip([vals[0], vals[3], vals[5]], alone, strict=True):
            np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=name)
    with pytest.raises(ValueError, match="starts"):
        tiny_logprob_backends["hf"].token_logprobs(seqs, starts[:-1])


def test_token_logprobs_vllm_contract_fails_loudly():
    """An output without a prompt log-probability per position, or one for another token,
    raises instead of yielding a number."""
    from types import SimpleNamespace

    from vllm.logprobs import FlatLogprobs, Logprob

    from deita_ray.models.vllm_backend import prompt_token_logprobs

    flat = FlatLogprobs()
    flat.append(None)
    flat.append({7: Logprob(-1.5)})
    flat.append({9: Logprob(-0.5)})
    assert prompt_token_logprobs(SimpleNamespace(prompt_logprobs=flat), [1, 7, 9], 1).tolist() == [
        -1.5,
        -0.5,
    ]
    listed = [None, {7: Logprob(-1.5)}, {9: Logprob(-0.5)}]
    out = prompt_token_logprobs(SimpleNamespace(prompt_logprobs=listed), [1, 7, 9], 2)
    assert out.tolist() == [-0.5]
    with pytest.raises(BackendContractError, match="position 2"):
        prompt_token_logprobs(SimpleNamespace(prompt_logprobs=flat), [1, 7, 8], 1)
    with pytest.raises(BackendContractError, match="positions"):
        prompt_token_logprobs(SimpleNamespace(prompt_logprobs=None), [1, 7, 9], 1)


# ------------------------------------------------------------------ real model (slow)


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    from deita_ray.models import smollm2
    from deita_ray.models.registry import resolve_model_path

    try:
        smollm2.gguf_path()
    except smollm2.EmbeddedModelMissing as e:
        pytest.skip(str(e))
    cache = os.environ.get("DEITA_CACHE_DIR") or "~/.cache/deita_ray"
    return resolve_model_path(EMBEDDED_MODEL, cache)


@pytest.mark.slow
def test_smollm2_vllm_and_hf_embeddings_agree_fp32(smollm2_path, shared_data: Path):
    """The embedder on the real model: vLLM's and transformers' last-token states of real
    Alpaca rows agree (cosine >= 0.9999 in fp32). Scores and token log-probabilities on
    SmolLM2 are compared in tests/scorers/test_scorer_kinds.py (every kind, both backends and
    plain transformers, one engine start)."""
    from deita_ray.data.formats import CANONICAL_SCHEMA, canonicalize
    from deita_ray.stages.embed import embed_table

    records = json.loads((shared_data / "alpaca/alpaca_data.json").read_text())[:40]
    rows = [
        {
            "id": str(k),
            "seq": k,
            "messages": canonicalize(r)["messages"],
            "source": "a",
            "format": "alpaca",
            "extra": "{}",
        }
        for k, r in enumerate(records)
    ]
    table = pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA)
    embedded = {}
    for name in ("vllm", "hf"):
        cfg = ModelConfig(
            path=smollm2_path,
            backend=name,
            dtype="float32",
            max_model_len=1024,
            enforce_eager=True,
            kv_cache_memory_bytes=128 << 20,
        )
        backend = load_backend(cfg, smollm2_path, "embed")
        embedded[name] = embed_table(table, backend, 1024)
        backend.close()
    ev, eh = (np.array(embedded[n]["embedding"].to_pylist()) for n in ("vllm", "hf"))
    assert ev.shape == (40, 576)
    cos = (ev * eh).sum(1) / np.linalg.norm(ev, axis=1) / np.linalg.norm(eh, axis=1)
    assert cos.min() >= 0.9999


def test_vllm_engine_inline_and_separate_give_the_same_values(tiny_llama):
    """``engine_process``: 'inline' runs the engine in this process (no child process), 'separate'
    in vLLM's own processes; both return the same label and token log-probabilities, and 'auto'
    is inline on this CPU machine (one tensor-parallel worker)."""
    import psutil

    from deita_ray.models.vllm_backend import runs_inline
    from deita_ray.scoring import resolve_digit_ids

    def cfg(where: str, tp: int = 1) -> ModelConfig:
        return ModelConfig(
            path=str(tiny_llama),
            dtype="float32",
            max_model_len=128,
            enforce_eager=True,
            kv_cache_memory_bytes=32 << 20,
            tensor_parallel_size=tp,
            engine_process=where,
        )

    assert runs_inline(cfg("auto")) and runs_inline(cfg("inline"))
    assert not runs_inline(cfg("separate")) and not runs_inline(cfg("auto", tp=2))
    env_before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    got = {}
    for where in ("inline", "separate"):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        backend = load_backend(cfg(where), str(tiny_llama), "score")
        try:
            started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
            assert backend.inline is (where == "inline")
            assert (started == []) is (where == "inline"), [p.name() for p in started]
            tok = backend.tokenizer
            seqs, starts = _logprob_inputs(tok)
            seqs, starts = seqs[:4], starts[:4]
            labels, errors = backend.digit_logits(seqs, resolve_digit_ids(tok))
            assert errors == [None] * len(seqs)
            vals, errors = backend.token_logprobs(seqs, starts)
            assert errors == [None] * len(seqs)
            got[where] = (labels, vals)
        finally:
            backend.close()
    np.testing.assert_array_equal(got["inline"][0], got["separate"][0])
    for a, b in zip(got["inline"][1], got["separate"][1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == env_before  # left as found


def test_an_inline_vllm_engine_error_outside_prompt_validation_is_fatal():
    """A refused request (vLLM's client errors, ValueError, TypeError) is isolated by bisection
    in both layouts; any other error of an inline engine fails the stage, as EngineDeadError
    does for a separate one (a failed model step may leave requests inside the engine)."""
    from vllm.exceptions import VLLMValidationError

    from deita_ray.models.vllm_backend import VLLMBackend

    backend = object.__new__(VLLMBackend)
    for inline in (True, False):
        backend.inline = inline
        assert not backend._fatal(ValueError("prompt too long"))
        assert not backend._fatal(TypeError("bad prompt"))
        assert not backend._fatal(VLLMValidationError("Token id 1000000 is out of vocabulary"))
        assert backend._fatal(BackendContractError("x")) and backend._fatal(MemoryError())
        assert backend._fatal(RuntimeError("model step failed")) is inline

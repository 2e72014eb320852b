"""Rendering with exact label masks and collation (training/render.py), and the SFT tokenizer
stage (no Ray here: the stage is called directly on Arrow tables)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from deita_ray.data.rejects import REASON
from deita_ray.models.backend import load_tokenizer
from deita_ray.stages.sft import TokenizeSFT
from deita_ray.templates import render_vicuna
from deita_ray.training.render import (
    IGNORE_INDEX,
    TemplateError,
    chat_template_segments,
    collate,
    encode_segments,
    only_last_target,
    render_segments,
)

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SINGLE = [
    {"role": "user", "content": "Give three tips for staying healthy."},
    {"role": "assistant", "content": "Eat a balanced diet, exercise, and sleep well."},
]
MULTI = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And 12345 + 1?"},
    {"role": "assistant", "content": " 12346\n\n(with spaces)  "},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": ""},
]


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama):
    return load_tokenizer(str(tiny_llama))


@pytest.fixture(scope="module")
def tiny_chatml_tok(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    tok.chat_template = CHATML  # its end marker <|im_end|> is not the EOS token here
    return tok


@pytest.fixture(scope="module")
def smol_tok():
    """The real SmolLM2 tokenizer (converted once into the cache; skip if not installed)."""
    try:
        from deita_ray.models.smollm2 import default_cache_dir, ensure_smollm2
    except ImportError:
        pytest.skip("deita_ray.models.smollm2 not available")
    try:
        path = ensure_smollm2(default_cache_dir())
    except Exception as e:  # noqa: BLE001 - package missing: skip with the reason
        pytest.skip(f"SmolLM2 not available: {e}")
    return load_tokenizer(str(path))


def target_runs(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of positions that carry a label (each should be one assistant message)."""
    runs, cur = [], []
    for tok_id, lab in zip(input_ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tok_id, "a label must be the token itself"
            cur.append(lab)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def assert_exact_masks(tok, messages, template, end_marker):
    segs = render_segments(messages, template, tok)
    enc = encode_segments([segs], tok, 100_000)[0]
    # vicuna_v1.1 renders an empty reply as "ASSISTANT:" with no target (FastChat's rendering).
    expected = [
        m["content"] + end_marker
        for m in messages
        if m["role"] == "assistant" and (m["content"] or template != "vicuna_v1.1")
    ]
    decoded = [
        tok.decode(r, clean_up_tokenization_spaces=False)
        for r in target_runs(enc.input_ids, enc.labels)
    ]
    assert decoded == expected
    # Nothing else carries loss, and the whole sequence is the full rendering.
    assert enc.num_targets == sum(
        len(tok(e, add_special_tokens=False)["input_ids"]) for e in expected
    )
    full = tok.decode(enc.input_ids, clean_up_tokenization_spaces=False)
    assert full.endswith("".join(t for t, _ in segs))
    return enc


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_vicuna_masks_tiny_tokenizer(tiny_tok, messages):
    enc = assert_exact_masks(tiny_tok, messages, "vicuna_v1.1", "</s>")
    assert enc.input_ids[0] == tiny_tok.bos_token_id and enc.labels[0] == IGNORE_INDEX
    full = tiny_tok.decode(enc.input_ids[1:], clean_up_tokenization_spaces=False)
    assert full == render_vicuna(messages)


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_vicuna_masks_smollm2_tokenizer(smol_tok, messages):
    enc = assert_exact_masks(smol_tok, messages, "vicuna_v1.1", "</s>")
    assert smol_tok.decode(enc.input_ids, clean_up_tokenization_spaces=False) == render_vicuna(
        messages
    )


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_chat_template_masks_smollm2_tokenizer(smol_tok, messages):
    enc = assert_exact_masks(smol_tok, messages, "chat_template", "<|im_end|>")
    rendered = smol_tok.apply_chat_template(messages, tokenize=False)
    assert smol_tok.decode(enc.input_ids, clean_up_tokenization_spaces=False) == rendered


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_chat_template_masks_tiny_tokenizer(tiny_chatml_tok, messages):
    assert_exact_masks(tiny_chatml_tok, messages, "chat_template", "<|im_end|>")


def test_chat_template_target_stops_at_eos(smol_tok):
    segs = chat_template_segments(SINGLE, smol_tok)
    targets = [t for t, is_t in segs if is_t]
    assert targets == [SINGLE[1]["content"] + "<|im_end|>"]
    # the newline after <|im_end|> is template, not target
    assert "".join(t for t, _ in segs) == smol_tok.apply_chat_template(SINGLE, tokenize=False)


def test_non_incremental_chat_template_is_refused(tiny_chatml_tok):
    tok = tiny_chatml_tok
    saved = tok.chat_template
    # Renders only the last message: a prefix does not render to a prefix -> inexact masks.
    tok.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    try:
        with pytest.raises(TemplateError):
            chat_template_segments(MULTI, tok)
    finally:
        tok.chat_template = saved


def test_only_last_target_keeps_the_response():
    segs = only_last_target(render_segments(MULTI[:5], "vicuna_v1.1"))
    assert [t for t, is_t in segs if is_t] == [MULTI[4]["content"] + "</s>"]


def test_truncation_keeps_the_beginning(tiny_tok):
    segs = render_segments(MULTI, "vicuna_v1.1")
    full = encode_segments([segs], tiny_tok, 100_000)[0]
    cut = encode_segments([segs], tiny_tok, len(full.input_ids) - 7)[0]
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:-7] and cut.labels == full.labels[:-7]


def test_tokenize_stage_rejects_rows_without_targets(tiny_llama, tiny_tok):
    long_user = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    rows = [
        {"id": "good", "messages": SINGLE, "evol_score": 1.0},
        {"id": "long", "messages": long_user, "evol_score": 2.0},
        {"id": "noasst", "messages": [{"role": "user", "content": "hi"}], "evol_score": 3.0},
        {"id": "badrole", "messages": [{"role": "tool", "content": "x"}], "evol_score": 4.0},
    ]
    stage = TokenizeSFT(str(tiny_llama), "vicuna_v1.1", max_length=128)
    out = stage(pa.Table.from_pylist(rows)).to_pylist()
    assert [r[REASON] for r in out] == [
        None,
        "no_target_tokens",
        "no_assistant_message",
        "unsupported_role",  # the pool's message rules (data/formats.py), as at ingest
    ]
    good = out[0]
    assert good["num_tokens"] == len(good["input_ids"]) == len(good["labels"])
    runs = target_runs(good["input_ids"], good["labels"])
    assert [tiny_tok.decode(r) for r in runs] == [SINGLE[1]["content"] + "</s>"]
    assert '"word word' in out[1]["_raw"] and out[0]["_raw"] is None


def test_collate_right_pads():
    b = collate([[5, 6, 7], [8]], [[-100, 6, 7], [8]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]

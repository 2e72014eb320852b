"""Golden strings for the scorer prompts and the vicuna_v1.1 rendering (docs/scoring.md, docs/embedding.md)."""

from __future__ import annotations

import pytest

from deita_ray.templates import (
    VICUNA_SYSTEM,
    complexity_prompt,
    quality_prompt,
    render_vicuna,
    vicuna_segments,
)


def test_complexity_prompt_golden():
    assert complexity_prompt("Give three tips.") == (
        "You are a helpful assistant. Please identify the complexity score of the following "
        "user query. \n##Query: Give three tips.  \n##Complexity: "
    )
    # the two spaces before "\n##Complexity" are part of the contract
    assert complexity_prompt("x").endswith("x  \n##Complexity: ")


def test_quality_prompt_golden():
    assert quality_prompt("What is 2+2?", "4") == (
        "You are a helpful assistant. Please identify the quality score of the Response "
        "corresponding to the Question. \n #Question#:\nWhat is 2+2?\n#Response#:\n4 \n##Quality: "
    )
    assert quality_prompt("q", "").endswith("#Response#:\n \n##Quality: ")


def test_vicuna_golden_multi_turn():
    msgs = [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Vicuna."},
        {"role": "user", "content": "Have a nice day!"},
        {"role": "assistant", "content": "You too!"},
    ]
    assert render_vicuna(msgs) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. "
        "USER: Who are you? ASSISTANT: I am Vicuna.</s>USER: Have a nice day! ASSISTANT: You too!</s>"
    )


def test_vicuna_system_message_replaces_default():
    msgs = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    text = render_vicuna(msgs)
    assert text == "Be terse. USER: Hi ASSISTANT: Hello</s>"
    assert VICUNA_SYSTEM not in text
    two = [{"role": "system", "content": "A"}, *msgs[1:], {"role": "system", "content": "B"}]
    assert render_vicuna(two) == "A\nB USER: Hi ASSISTANT: Hello</s>"


def test_vicuna_trailing_user_and_empty():
    assert render_vicuna([]) == VICUNA_SYSTEM + " "
    assert render_vicuna([{"role": "user", "content": "Q"}]).endswith(" USER: Q ")


@pytest.mark.parametrize(
    "msgs",
    [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": ""},
        ],
        [{"role": "assistant", "content": "lead"}, {"role": "user", "content": "a"}],
    ],
)
def test_segments_concatenate_to_render_and_mark_only_assistant_targets(msgs):
    segs = vicuna_segments(msgs)
    assert "".join(t for t, _ in segs) == render_vicuna(msgs)
    targets = [t for t, is_target in segs if is_target]
    # Targets: every non-empty assistant reply that answers a user message, with its "</s>".
    first_user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
    want = [
        m["content"] + "</s>"
        for m in msgs[first_user:]
        if m["role"] == "assistant" and m["content"]
    ]
    assert targets == want
    for text, is_target in segs:
        if not is_target:
            assert "</s>" not in text


def test_unknown_role_raises():
    with pytest.raises(ValueError, match="tool"):
        render_vicuna([{"role": "tool", "content": "x"}])


# ------------------------------------------------------------------ FastChat's own strings


def _fastchat(messages: list[dict]) -> str:
    """FastChat's vicuna_v1.1 prompt of ``messages``, as DEITA's embedder builds it.

    DEITA (src/deita/selection/embedder/utils.py in hkust-nlp/deita) drops a leading message
    that is not from the user, then appends the rest; a row's system text goes through
    FastChat's ``set_system_message``.
    """
    from fastchat.conversation import get_conv_template

    conv = get_conv_template("vicuna_v1.1")
    roles = {"user": conv.roles[0], "assistant": conv.roles[1]}
    systems = [m["content"] for m in messages if m["role"] == "system"]
    if systems:
        conv.set_system_message("\n".join(systems))
    body = [m for m in messages if m["role"] != "system"]
    if body and body[0]["role"] != "user":
        body = body[1:]
    for m in body:
        conv.append_message(roles[m["role"]], m["content"])
    return conv.get_prompt()


FASTCHAT_CASES = {
    "alternating": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "Sure."},
    ],
    "ends_with_user": [{"role": "user", "content": "Q"}],
    "empty_reply": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}],
    "empty_reply_mid": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ],
    "leading_assistant": [
        {"role": "assistant", "content": "Welcome!"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ],
    "system_message": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ],
    "unicode": [
        {"role": "user", "content": "naïve 日本 </s>"},
        {"role": "assistant", "content": "ok"},
    ],
}


@pytest.mark.parametrize("case", sorted(FASTCHAT_CASES))
def test_vicuna_equals_fastchat(case):
    msgs = FASTCHAT_CASES[case]
    assert render_vicuna(msgs) == _fastchat(msgs)


def test_empty_reply_has_no_target():
    segs = vicuna_segments(FASTCHAT_CASES["empty_reply"])
    assert not any(target for _, target in segs)


def test_deita_dpo_segments_are_vicuna_with_lower_case_roles_and_the_tag_in_the_target():
    """hkust-nlp/deita src/deita/alignment/dpo_train.py writes "user: " / "assistant: " and
    TRL trains on the whole response text, role tag included."""
    from deita_ray.templates import deita_dpo_segments

    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "USER: Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "ASSISTANT: ok"},
    ]
    assert deita_dpo_segments(msgs) == [
        ("Be brief. ", False),
        ("user: USER: Hi ", False),
        ("assistant: Hello</s>", True),
        ("user: Bye ", False),
        ("assistant: ASSISTANT: ok</s>", True),
    ]
    with pytest.raises(ValueError, match="tool"):
        deita_dpo_segments([{"role": "tool", "content": "x"}])


# ------------------------------------------------------------ the template a trained model ships

SHIPPED_CASES = {
    **FASTCHAT_CASES,
    "systems_anywhere_and_quotes": [
        {"role": "system", "content": "S1"},
        {"role": "assistant", "content": "lead"},
        {"role": "user", "content": 'Q\'s "x"\n{{ not jinja }}'},
        {"role": "assistant", "content": ""},
        {"role": "system", "content": "S2"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "A"},
        {"role": "assistant", "content": "B"},
    ],
}


@pytest.mark.parametrize("case", sorted(SHIPPED_CASES))
def test_shipped_chat_templates_render_as_training_does(case, tiny_llama):
    """apply_chat_template with the template SFT / DPO save gives the training rendering; the
    generation prompt is FastChat's ("ASSISTANT:")."""
    from transformers import AutoTokenizer

    from deita_ray.templates import (
        CHAT_TEMPLATES,
        deita_dpo_segments,
        vicuna_segments,
    )

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    msgs = SHIPPED_CASES[case]
    for name, segments, next_turn in (
        ("vicuna_v1.1", vicuna_segments, "ASSISTANT:"),
        ("deita_dpo", deita_dpo_segments, "assistant:"),
    ):
        tok.chat_template = CHAT_TEMPLATES[name]
        want = "".join(text for text, _ in segments(msgs))
        assert tok.apply_chat_template(msgs, tokenize=False) == want
        got = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert got == want + next_turn

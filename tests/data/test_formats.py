"""Record shapes -> canonical fields, role mapping, turn extraction and every reject reason."""

from __future__ import annotations

import json
import re

import pytest

from deita_ray.data.formats import (
    CANONICAL_SCHEMA,
    Reject,
    canonicalize,
    detect_format,
    extract_turns,
    parse_hh_transcript,
    record_id,
    render_hh_transcript,
)

U, A, S = "user", "assistant", "system"


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def ok(record, **kw):
    res = canonicalize(record, **kw)
    assert not isinstance(res, Reject), res
    return res


def reason(record, **kw):
    res = canonicalize(record, **kw)
    assert isinstance(res, Reject), res
    return res.reason


def test_schema_names_and_types():
    assert CANONICAL_SCHEMA.names == ["id", "seq", "messages", "source", "format", "extra"]
    assert str(CANONICAL_SCHEMA.field("messages").type) == (
        "list<item: struct<role: string, content: string>>"
    )
    assert str(CANONICAL_SCHEMA.field("extra").type) == "large_string"


def test_sharegpt_multi_turn_with_aliases_and_id():
    rec = {
        "id": "c1",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "USER", "value": "Bye"},
            {"from": "chatgpt", "value": "Bye!"},
        ],
        "lang": "en",
    }
    res = ok(rec)
    assert res["format"] == "sharegpt"
    assert res["id"] == "c1"
    assert res["messages"] == msgs(
        (S, "Be brief."), (U, "Hi"), (A, "Hello"), (U, "Bye"), (A, "Bye!")
    )
    assert res["extra"] == {"lang": "en"}


@pytest.mark.parametrize("alias", ["gpt", "assistant", "chatgpt", "bing", "bard", "model", "bot"])
def test_assistant_aliases(alias):
    rec = {"conversations": [{"from": "human", "value": "q"}, {"from": alias, "value": "a"}]}
    assert ok(rec)["messages"][1]["role"] == A


def test_openai_messages_and_message_level_extra_keys_kept():
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    res = ok(rec)
    assert (res["format"], res["messages"], res["extra"]) == (
        "messages",
        msgs((U, "q"), (A, "a")),
        {},
    )
    rec2 = {"messages": [{"role": "user", "content": "q", "name": "bob"}], "label": True}
    res2 = ok(rec2)
    assert res2["extra"] == {"messages": rec2["messages"], "label": True}  # lossless


def test_alpaca_with_and_without_input():
    res = ok({"instruction": "Sum", "input": "1 2", "output": "3"})
    assert res["format"] == "alpaca"
    assert res["messages"] == msgs((U, "Sum\n\n1 2"), (A, "3"))
    assert ok({"instruction": "Hi", "input": "", "output": "Yo"})["messages"] == msgs(
        (U, "Hi"), (A, "Yo")
    )
    assert ok({"instruction": "Hi", "output": "Yo"})["messages"] == msgs((U, "Hi"), (A, "Yo"))
    # empty reply is allowed (real Alpaca has some)
    assert ok({"instruction": "Hi", "input": "", "output": ""})["messages"][1] == {
        "role": A,
        "content": "",
    }


def test_alpaca_history_and_system_llama_factory():
    rec = {
        "instruction": "And then?",
        "input": "",
        "output": "The end.",
        "system": "You tell stories.",
        "history": [["Tell a story", "Once upon a time"], ["More", "A dragon came"]],
    }
    res = ok(rec)
    assert res["messages"] == msgs(
        (S, "You tell stories."),
        (U, "Tell a story"),
        (A, "Once upon a time"),
        (U, "More"),
        (A, "A dragon came"),
        (U, "And then?"),
        (A, "The end."),
    )
    assert extract_turns(res["messages"]) == [
        ("Tell a story", "Once upon a time"),
        ("More", "A dragon came"),
        ("And then?", "The end."),
    ]
    assert res["extra"] == {}


def test_dolly_context_joined_and_category_kept():
    rec = {
        "instruction": "Who?",
        "context": "Ada wrote it.",
        "response": "Ada",
        "category": "closed_qa",
    }
    res = ok(rec)
    assert res["format"] == "dolly"
    assert res["messages"] == msgs((U, "Who?\n\nAda wrote it."), (A, "Ada"))
    assert res["extra"] == {"category": "closed_qa"}


def test_self_instruct_single_and_multiple_instances():
    rec = {
        "id": "t0",
        "instruction": "Add",
        "instances": [{"input": "1,2", "output": "3"}],
        "name": "add",
    }
    res = ok(rec)
    assert res["format"] == "self_instruct"
    assert res["messages"] == msgs((U, "Add\n\n1,2"), (A, "3"))
    assert res["extra"] == {"name": "add"}
    many = {
        "instruction": "Add",
        "instances": [{"input": "1", "output": "1"}, {"input": "2", "output": "2"}],
    }
    res2 = ok(many)
    assert res2["messages"] == msgs((U, "Add\n\n1"), (A, "1"))
    assert res2["extra"] == {"instances": many["instances"]}  # nothing lost


def test_hh_transcript_parsed_and_rebuilt():
    chosen = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    res = ok({"chosen": chosen, "rejected": "\n\nHuman: hi there\n\nAssistant: go away"})
    assert res["format"] == "hh"
    assert res["messages"] == msgs((U, "hi there"), (A, "hello"), (U, "bye"), (A, ""))
    assert res["extra"] == {"rejected": "\n\nHuman: hi there\n\nAssistant: go away"}
    assert render_hh_transcript(parse_hh_transcript(chosen)) == chosen
    odd = "\n\nHuman:no space\n\nAssistant: ok"  # not rebuilt exactly -> kept in extra
    assert "chosen" in ok({"chosen": odd})["extra"]


def test_declared_format_overrides_detection():
    rec = {"instruction": "Q", "response": "R", "output": "O"}
    assert detect_format(rec) == "dolly"
    assert ok(rec, format="alpaca")["messages"] == msgs((U, "Q"), (A, "O"))
    assert ok(rec, format="alpaca")["extra"] == {"response": "R"}
    assert reason({"conversations": []}, format="messages") == "missing_field"
    with pytest.raises(ValueError):
        canonicalize({"a": 1}, format="nope")


def test_role_map_and_unsupported_role():
    conv = [
        {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": '{"name": "w"}'},
        {"from": "observation", "value": '{"t": 3}'},
        {"from": "gpt", "value": "3 degrees"},
    ]
    assert reason({"conversations": conv}) == "unsupported_role"
    res = ok(
        {"conversations": conv}, role_map={"function_call": "assistant", "observation": "user"}
    )
    assert [m["role"] for m in res["messages"]] == [U, A, U, A]
    assert extract_turns(res["messages"]) == [
        ("weather?", '{"name": "w"}'),
        ('{"t": 3}', "3 degrees"),
    ]
    # role_map overrides a built-in alias
    res2 = ok(
        {"conversations": conv[:1] + [{"from": "gpt", "value": "x"}]}, role_map={"human": "user"}
    )
    assert res2["messages"][0]["role"] == U


def test_ids():
    assert record_id({"id": "abc"}) == "abc"
    assert record_id({"id": 7}) == "7"
    for bad in ("", "  ", None, True, 1.5, ["x"]):
        assert record_id({"id": bad}) is None
    assert record_id({"uid": "u"}, "uid") == "u"
    base = {"instruction": "q", "output": "a"}
    assert ok({**base, "id": "s"})["extra"] == {}  # a string id is the id column
    assert ok({**base, "id": 5}) == {
        "id": "5",
        "messages": msgs((U, "q"), (A, "a")),
        "format": "alpaca",
        "extra": {"id": 5},
    }  # int type kept
    assert ok({**base, "id": ""})["id"] is None and ok({**base, "id": ""})["extra"] == {"id": ""}


def test_extra_is_lossless():
    rec = {"instruction": "q", "input": "i", "output": "a", "meta": {"x": [1, None, "é"]}, "n": 1.5}
    assert ok(rec)["extra"] == {"meta": {"x": [1, None, "é"]}, "n": 1.5}


@pytest.mark.parametrize(
    "record, expected",
    [
        ([1, 2], "not_an_object"),
        ("text", "not_an_object"),
        ({"question": "q", "answer": "a"}, "unknown_format"),
        ({"text": "prompt only"}, "unknown_format"),
        ({"instruction": "q"}, "missing_field"),
        ({"instruction": "q", "output_1": "a", "output_2": "b"}, "missing_field"),
        ({"output": "a", "instruction": None}, "wrong_type"),
        ({"conversations": [{"value": "x"}]}, "missing_field"),
        ({"conversations": [{"from": "human"}]}, "missing_field"),
        ({"instruction": "q", "instances": []}, "missing_field"),
        ({"instruction": 3, "output": "a"}, "wrong_type"),
        ({"instruction": "q", "output": None}, "wrong_type"),
        ({"instruction": "q", "input": 5, "output": "a"}, "wrong_type"),
        ({"instruction": "q", "output": "a", "history": "x"}, "wrong_type"),
        ({"instruction": "q", "output": "a", "history": [["only one"]]}, "wrong_type"),
        ({"conversations": "hello"}, "wrong_type"),
        ({"conversations": ["hello"]}, "wrong_type"),
        ({"messages": [{"role": "user", "content": None}]}, "wrong_type"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
            "wrong_type",
        ),
        ({"messages": [{"role": 1, "content": "x"}]}, "wrong_type"),
        ({"conversations": []}, "empty_conversation"),
        ({"messages": [{"role": "system", "content": "s"}]}, "empty_conversation"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "empty_conversation"),
        ({"instruction": " \n\t", "output": "a"}, "empty_instruction"),
        ({"messages": msgs((U, "q"), (A, "a"), (U, "   "))}, "empty_instruction"),
        ({"messages": msgs((U, "q"), (U, "q2"), (A, "a"))}, "consecutive_user_turns"),
        ({"messages": msgs((U, "q"), (S, "s"), (U, "q2"))}, "consecutive_user_turns"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "unsupported_role"),
    ],
)
def test_reject_reasons(record, expected):
    assert reason(record) == expected


def test_extract_turns_rules():
    assert extract_turns([]) == []
    # system messages are not turns; a leading assistant message is skipped
    assert extract_turns(msgs((S, "s"), (A, "hi, I'm a bot"), (U, "q"), (A, "a"))) == [("q", "a")]
    # a final user message without a reply is a turn with response ""
    assert extract_turns(msgs((U, "q1"), (A, "a1"), (U, "q2"))) == [("q1", "a1"), ("q2", "")]
    # consecutive assistant messages after one user message form that turn's response
    assert extract_turns(msgs((U, "q"), (A, "part 1"), (A, "part 2"))) == [
        ("q", "part 1\n\npart 2")
    ]
    # works on (role, content) pairs and on Arrow-style dicts with None content
    assert extract_turns([("user", "q"), ("assistant", None)]) == [("q", "")]


def test_random_records_never_raise():
    import random

    rng = random.Random(7)
    atoms = [None, True, 0, 1.5, "", " ", "text", "human", "gpt", "tool", [], {}, ["a", "b"]]

    def value(depth=0):
        r = rng.random()
        if depth > 2 or r < 0.5:
            return rng.choice(atoms)
        if r < 0.75:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        keys = ["from", "value", "role", "content", "input", "output", "x"]
        return {rng.choice(keys): value(depth + 1) for _ in range(rng.randint(0, 3))}

    fields = ["id", "conversations", "messages", "instruction", "input", "output", "context",
              "response", "instances", "history", "system", "chosen", "rejected", "other"]  # fmt: skip
    templates = [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
        {"instruction": "q", "input": "i", "output": "a", "history": [["u", "v"]]},
        {"instruction": "q", "context": "c", "response": "r"},
        {"instruction": "q", "instances": [{"input": "", "output": "a"}]},
    ]

    def mutated():
        rec = json.loads(json.dumps(rng.choice(templates)))
        for _ in range(rng.randint(0, 2)):
            target = rec
            key = rng.choice(list(rec))
            if isinstance(rec[key], list) and rec[key] and rng.random() < 0.6:
                target = rng.choice(rec[key])
                if isinstance(target, dict):
                    key = rng.choice(list(target))
                else:
                    target, key = rec, key
            target[key] = value()
        return rec

    for k in range(3000):
        rec = mutated() if k % 2 else {f: value() for f in rng.sample(fields, rng.randint(0, 5))}
        res = canonicalize(rec, role_map={"tool": "assistant"} if rng.random() < 0.3 else None)
        if isinstance(res, Reject):
            assert re.fullmatch(r"[a-z_]+", res.reason)
            continue
        assert res["messages"] and all(
            m["role"] in ("system", "user", "assistant") for m in res["messages"]
        )
        assert all(isinstance(m["content"], str) for m in res["messages"])
        assert extract_turns(res["messages"])
        assert res["id"] is None or isinstance(res["id"], str)

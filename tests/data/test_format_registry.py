"""The registry of record shapes: one entry per shape, and the config's choices come from it."""

from __future__ import annotations

import dataclasses

import pytest

from deita_ray.config import InputConfig
from deita_ray.data.formats import (
    FORMATS,
    RECORD_FORMATS,
    RecordFormat,
    Reject,
    canonicalize,
    detect_format,
    register_format,
)
from deita_ray.job import describe_job, registered_names


def test_config_choices_are_the_registry():
    # config.py holds no registry name (a leaf): the job checks input.format against these.
    choices, doc = registered_names()["input.format"]
    assert choices == ("auto", *RECORD_FORMATS)
    assert {f.name: f for f in dataclasses.fields(InputConfig)}["format"].metadata[
        "choices"
    ] is None
    for shape in RECORD_FORMATS.values():  # the help text names how each one is detected
        assert f"{shape.detected_by} -> {shape.name}" in doc
    assert any(doc in line for line in describe_job())
    assert tuple(RECORD_FORMATS) == FORMATS
    assert set(FORMATS) == {"sharegpt", "messages", "alpaca", "dolly", "self_instruct", "hh"}


def test_detection_order_is_registration_order():
    both = {"conversations": [], "messages": [], "instruction": "q", "response": "a"}
    assert detect_format(both) == "sharegpt"
    both.pop("conversations")
    assert detect_format(both) == "messages"
    both.pop("messages")
    assert detect_format(both) == "dolly"


@pytest.fixture
def qa_format(monkeypatch):
    """A toy shape ``{"q": ..., "a": ...}`` registered for one test only."""
    monkeypatch.setattr("deita_ray.data.formats.RECORD_FORMATS", dict(RECORD_FORMATS))

    def convert(record, role_map):
        if not isinstance(record.get("q"), str) or not isinstance(record.get("a"), str):
            return Reject("wrong_type", "'q' and 'a' must be strings")
        return [
            {"role": "user", "content": record["q"]},
            {"role": "assistant", "content": record["a"]},
        ], {"q", "a"}

    return register_format(RecordFormat("qa", lambda r: "q" in r, convert, "q"))


def test_a_new_shape_is_one_registry_entry(qa_format):
    res = canonicalize({"q": "2+2?", "a": "4", "lang": "en"})
    assert res == {
        "id": None,
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        "format": "qa",
        "extra": {"lang": "en"},
    }
    assert canonicalize({"q": 1, "a": "4"}, format="qa") == Reject(
        "wrong_type", "'q' and 'a' must be strings"
    )
    # the converted messages are validated like every other shape's
    assert canonicalize({"q": " ", "a": "4"}).reason == "empty_instruction"
    with pytest.raises(ValueError, match="already registered"):
        register_format(qa_format)

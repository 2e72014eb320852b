"""``benchmarks/score.py --kinds``: the bare side's formulas on hand examples, and its token
sequences and prompts equal to what the stage's scorers send (tiny tokenizer, no engine)."""

from __future__ import annotations

import argparse
import importlib
import math
import os
from unittest import mock

import pytest

NAN = math.nan


@pytest.fixture(scope="module")
def bench():
    # The script sets the model benchmarks' env defaults at import: keep them out of the suite.
    with mock.patch.dict(os.environ):
        return importlib.import_module("benchmarks.score")


def test_perplexity_values_by_hand(bench):
    lp = [NAN, -1.0, -2.0, -9.0, -9.0, -3.0]
    got = bench.perplexity_values([(1, 3), None, (5, 6)], lp)
    # turn 0: (1 + 2) / 2; turn 1 empty; turn 2: 3 / 1; row: (1 + 2 + 3) / 3 tokens
    assert got == {"ppl_nll_turns": [1.5, None, 3.0], "ppl_nll": 2.0, "ppl_tokens": 3}
    empty = bench.perplexity_values([None], [NAN])
    assert empty == {"ppl_nll_turns": [None], "ppl_nll": None, "ppl_tokens": 0}


def test_ifd_values_by_hand(bench):
    # one turn: response at [2, 4) given the instruction; alone: prefix (1 token) + response
    got = bench.ifd_values([(2, 4)], [NAN, -9.0, -0.5, -0.5], [[NAN, -1.0, -1.0]], 1)
    assert got == {
        "ifd_turns": [0.5],
        "ifd_nll_cond_turns": [0.5],
        "ifd_nll_alone_turns": [1.0],
        "ifd": 0.5,
        "ifd_nll_cond": 0.5,
        "ifd_nll_alone": 1.0,
        "ifd_tokens": 2,
    }
    # two turns, token-weighted row ratio (3 + 1) / (2 + 2) = 1 >= max_ifd: row null, turns kept
    two = bench.ifd_values(
        [(1, 3), (4, 5)],
        [NAN, -1.0, -2.0, -7.0, -1.0],
        [[NAN, -1.0, -1.0], [NAN, -2.0]],
        1,
    )
    assert two["ifd_turns"] == [1.5, 0.5] and two["ifd"] is None
    assert two["ifd_nll_cond"] == pytest.approx(4 / 3) and two["ifd_tokens"] == 3


def test_flat_values_and_max_diff(bench):
    rows = [{"id": "a", "x_turns": [1.0, None], "x": 2.0}, {"id": "b", "x_turns": [3.0], "x": None}]
    got = bench.flat_values(rows, ("x_turns", "x"))
    assert got == {
        ("a", "x_turns:0"): 1.0,
        ("a", "x_turns:1"): None,
        ("a", "x"): 2.0,
        ("b", "x_turns:0"): 3.0,
        ("b", "x"): None,
    }
    assert bench.max_diff(got, dict(got)) == 0.0
    assert bench.max_diff(got, {**got, ("a", "x"): 2.5}) == 0.5
    assert bench.max_diff(got, {**got, ("b", "x"): 1.0}) == math.inf  # null on one side only
    assert bench.max_diff(got, {k: v for k, v in got.items() if k[0] == "a"}) == math.inf
    assert bench.null_rows({("a", "rating"): 1.0, ("b", "rating"): None}, "rating") == ["b"]


def test_parse_kinds(bench):
    assert bench.parse_kinds("perplexity, ifd,rating") == ("perplexity", "ifd", "rating")
    for bad in ("ppl", "deita_quality", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_kinds(bad)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The tiny tokenizer as built (adds BOS) and a copy that adds nothing (the kinds then start
    with its BOS token, as for SmolLM2)."""
    from tokenizers import processors

    from testing.tiny_models import build_tiny_tokenizer

    with_bos = build_tiny_tokenizer(tmp_path_factory.mktemp("tok_bos"))
    plain = build_tiny_tokenizer(tmp_path_factory.mktemp("tok_plain"))
    plain._tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert plain("a")["input_ids"] == plain("a", add_special_tokens=False)["input_ids"]
    assert with_bos("a")["input_ids"][0] == with_bos.bos_token_id
    return {"with_bos": with_bos, "plain": plain}


def _rows(canonical_table):
    return canonical_table(
        [
            {"instruction": "Give three tips.", "input": "", "output": "Eat, sleep, move."},
            {"instruction": "Say nothing.", "output": ""},
            {
                "conversations": [
                    {"from": "human", "value": "What is 2 + 2?"},
                    {"from": "gpt", "value": "4"},
                    {"from": "human", "value": "And 3 + 3?"},
                    {"from": "gpt", "value": "6, which is {not} a brace problem."},
                ]
            },
        ],
        "k",
    )


def _prepare(kind: str, tok, table):
    """The requests the stage's scorer of ``kind`` sends for ``table``."""
    from deita_ray.config import ModelConfig, ScorerConfig
    from deita_ray.data.formats import extract_turns
    from deita_ray.scorers import get_kind
    from deita_ray.scorers.base import BatchView

    k = get_kind(kind)
    spec = k.build_spec(ScorerConfig(kind=kind), ModelConfig(), "score.scorers[0]")
    spec = k.resolve_labels(spec, tok)
    turns = [extract_turns(m) for m in table["messages"].to_pylist()]
    view = BatchView(len(turns), turns, lambda *a: None, lambda i: True)
    return k.bind(spec, tok, 4096).prepare(view)


@pytest.mark.parametrize("tok_name", ["with_bos", "plain"])
def test_bare_sequences_are_the_scorers_requests(bench, tokenizers, canonical_table, tok_name):
    tok = tokenizers[tok_name]
    table = _rows(canonical_table)
    from deita_ray.scorers.perplexity import DEFAULT_TEMPLATE

    rendered = bench.render_rows(table, tok, DEFAULT_TEMPLATE)
    assert rendered[1].spans == [None]  # the empty response: no request
    ppl = _prepare("perplexity", tok, table)
    assert [(r.row, r.seq, r.start) for r in ppl] == [
        (i, r.seq, min(s[0] for s in r.spans if s)) for i, r in enumerate(rendered) if any(r.spans)
    ]
    ifd = {(r.row, r.turn): r.seq for r in _prepare("ifd", tok, table)}
    ours = {}
    for i, r in enumerate(rendered):
        if any(r.spans):
            ours[(i, -1)] = r.seq
            ours.update({(i, t): r.alone(t) for t, s in enumerate(r.spans) if s})
    assert ifd == ours


def test_bare_rating_prompts_are_the_scorers(bench, tokenizers, canonical_table):
    table = _rows(canonical_table)
    reqs = _prepare("rating", tokenizers["with_bos"], table)
    turns, prompts = bench.rating_prompts(table)
    assert [r.spec.text for r in reqs] == prompts
    assert [len(t) for t in turns] == [1, 1, 2]

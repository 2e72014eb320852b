"""The names a registry holds are checked by the registry (deita_ray/job.py), not by the config:
the messages and the --help-config lines are the ones config.py gave when it imported the
registries itself (recorded before the move, issue #27), and a bare config load no longer
needs the registries."""

from __future__ import annotations

import pytest

from deita_ray.config import ConfigError, load_config
from deita_ray.job import check_names, describe_job, load_job

M = {"path": "some/model", "backend": "hf"}
OTHER = {"path": "o/m", "backend": "hf"}

MESSAGES = [
    (
        {"input": {"format": "bogus"}},
        "input.format: 'bogus' is not allowed (allowed: auto, sharegpt, messages, self_instruct, dolly, alpaca, hh)",
    ),
    (
        {"export": {"formats": ["sharegpt", "bogus"]}},
        "export.formats: 'bogus' is not allowed (allowed: sharegpt, messages, alpaca)",
    ),
    (
        {"score": {"scorers": [{"kind": "bogus"}]}},
        "score.scorers[0].kind: 'bogus' is not allowed (allowed: deita_complexity, deita_quality, perplexity, ifd, rating, length)",
    ),
    (
        {"score": {"scorers": [{"kind": "length"}, {"kind": "nope", "model": M}]}},
        "score.scorers[1].kind: 'nope' is not allowed (allowed: deita_complexity, deita_quality, perplexity, ifd, rating, length)",
    ),
    (
        {"score": {"scorers": []}},
        "score.scorers: at least one scorer is required",
    ),
    (
        {"score": {"scorers": [{"kind": "perplexity", "model": M}]}},
        "select.score: 'evol_score' is not a row column the scorers write (evol_score needs a deita_complexity and a deita_quality scorer); allowed: ppl_nll, ppl, ppl_tokens",
    ),
    (
        {"select": {"score": "complexity * quality"}},
        "select.score: 'complexity' is not a row column the scorers write (the deita_complexity scorer writes it with columns: [turn, row]); allowed: evol_score",
    ),
    (
        {"select": {"score": "__import__('os')"}},
        "select.score: Call is not allowed: use column names, numbers, + - * /, unary minus and parentheses",
    ),
    (
        {"select": {"score": "evol_score ** 2"}},
        "select.score: Pow is not allowed: use column names, numbers, + - * /, unary minus and parentheses",
    ),
    (
        {"select": {"score": "evol_score +"}},
        "select.score: 'evol_score +' is not an expression (invalid syntax)",
    ),
    (
        {"select": {"score": "bogus_col"}},
        "select.score: 'bogus_col' is not a row column the scorers write; allowed: evol_score",
    ),
    (
        {
            "score": {
                "scorers": [
                    {"kind": "perplexity", "model": M},
                    {"kind": "perplexity", "model": OTHER},
                ]
            }
        },
        "score.scorers[1].name: column 'ppl_nll_turns' is also written by score.scorers[0]; give one of them another name",
    ),
]


@pytest.mark.parametrize(("data", "message"), MESSAGES)
def test_registry_names_fail_with_the_config_messages(data, message):
    with pytest.raises(ConfigError) as e:
        load_job(data={"demo_pool": True, **data})
    assert str(e.value) == message


@pytest.mark.parametrize(("data", "message"), MESSAGES)
def test_the_pipeline_checks_the_names_of_a_config_built_without_them(data, message):
    cfg = load_config(data={"demo_pool": True, **data})  # shapes and ranges only: no registry
    with pytest.raises(ConfigError) as e:
        check_names(cfg)
    assert str(e.value) == message


HELP_LINES = [
    "input.format (str, default 'auto'): Record shape. 'auto' detects it per record, the first match in this order: conversations -> sharegpt, messages -> messages, instruction+instances -> self_instruct, instruction+response -> dolly, instruction (+output) -> alpaca, chosen HH-RLHF transcript -> hh. [one of: auto, sharegpt, messages, self_instruct, dolly, alpaca, hh]",
    "score.scorers[].kind (str, default 'deita_complexity'): What it measures: deita_complexity / deita_quality (the paper's scorers), perplexity (NLL of each response given its instruction and history), ifd (NLL given the instruction / NLL alone), rating (a rubric prompt, expected value over N rating tokens), length (characters and tokens; no model, a CPU task). [one of: deita_complexity, deita_quality, perplexity, ifd, rating, length]",
    "export.formats (list, default ['sharegpt', 'messages']): Files to write under <output.dir>/export: 'sharegpt' (conversations from/value; LLaMA-Factory, FastChat, axolotl), 'messages' (OpenAI role/content; TRL, axolotl), 'alpaca' (instruction/input/output with system and history; LLaMA-Factory). [one of: sharegpt, messages, alpaca]",
]


def test_help_config_lists_the_registries_names():
    lines = describe_job()
    for expected in HELP_LINES:
        key = expected.split(" ", 1)[0]
        assert [line for line in lines if line.startswith(key + " ")] == [expected]

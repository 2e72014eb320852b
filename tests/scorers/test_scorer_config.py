"""score.scorers and select.score at config load: every bad entry fails naming its key."""

from __future__ import annotations

import pytest

from deita_ray.config import ConfigError
from deita_ray.job import describe_job, load_job
from deita_ray.scorers import (
    KIND_NAMES,
    cpu_scorers,
    evol_pair,
    get_kind,
    model_groups,
    resolve_scorers,
    row_columns,
)

M = {"path": "some/model", "backend": "hf"}
OTHER = {"path": "other/model", "backend": "hf"}


def _cfg(scorers, **select):
    data = {"demo_pool": True, "score": {"scorers": scorers}}
    if select:
        data["select"] = select
    return load_job(data=data)


def test_default_is_the_deita_pair_with_the_legacy_columns():
    cfg = load_job(data={"demo_pool": True})
    specs = resolve_scorers(cfg)
    assert [s.kind for s in specs] == ["deita_complexity", "deita_quality"]
    assert [s.columns for s in specs] == [
        {"turn": "complexity_scores"},
        {"turn": "quality_scores"},
    ]
    assert specs[0].model == cfg.score.complexity_model
    assert evol_pair(specs) == ("complexity_scores", "quality_scores")
    assert row_columns(specs) == ["evol_score"]
    assert cfg.select.score == "evol_score"
    assert len(model_groups(specs)) == 1  # equal model configs: one engine, one pool


def test_every_kind_is_registered_and_documented():
    for name in KIND_NAMES:
        kind = get_kind(name)
        assert kind.kind == name and kind.outputs
        assert all(o.doc for o in kind.outputs)
    lines = describe_job()
    assert any(line.startswith("score.scorers (list of ScorerConfig)") for line in lines)
    assert any(line.startswith("score.scorers[].kind (str") for line in lines)


def test_groups_columns_and_cheap_kinds():
    cfg = _cfg(
        [
            {"kind": "deita_complexity", "model": M, "columns": ["turn", "row"]},
            {"kind": "perplexity", "model": M},
            {"kind": "ifd", "model": OTHER, "name": "sf"},
            {"kind": "rating", "model": M, "name": "judge"},
            {"kind": "length"},
        ],
        score="complexity * judge - sf",
    )
    specs = resolve_scorers(cfg)
    groups = model_groups(specs)
    assert [[s.kind for s in g] for g in groups] == [
        ["deita_complexity", "perplexity", "rating"],
        ["ifd"],
    ]
    assert [s.kind for s in cpu_scorers(specs)] == ["length"]
    cols = row_columns(specs)
    assert "evol_score" not in cols  # no quality scorer
    assert {"complexity", "ppl", "ppl_nll", "sf", "sf_nll_cond", "judge"} <= set(cols)
    assert {"instruction_chars", "response_chars"} <= set(cols)
    assert "instruction_tokens" not in cols  # a length scorer without a model counts chars only
    assert specs[2].options["max_ifd"] == 1.0  # Superfiltering's threshold by default
    assert specs[3].options["rating_tokens"] == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize(
    ("scorers", "select", "message"),
    [
        (
            [{"kind": "rating", "model": M, "template": "Rate: {response}"}],
            {},
            "score.scorers[0].template: the template lacks the required field {instruction}",
        ),
        (
            [{"kind": "rating", "model": M, "template": "Rate {instruction} {answer}"}],
            {},
            "score.scorers[0].template: placeholder {answer} is not allowed",
        ),
        (
            [{"kind": "rating", "model": M, "template": "Rate {instruction!r}"}],
            {},
            "score.scorers[0].template: placeholder {instruction!r} is not allowed",
        ),
        (
            [{"kind": "perplexity", "model": M, "template": "{instruction} {response}"}],
            {},
            "score.scorers[0].template: placeholder {response} is not allowed",
        ),
        (
            [{"kind": "ifd", "model": M, "template": "{instruction"}],
            {},
            "score.scorers[0].template: not a valid template",
        ),
        (
            [{"kind": "deita_quality", "template": "{instruction}"}],
            {},
            "score.scorers[0].template: kind 'deita_quality' has a fixed prompt",
        ),
        ([{"kind": "perplexity"}], {}, "score.scorers[0].model: required for kind 'perplexity'"),
        (
            [{"kind": "perplexity", "model": M, "scale": 5}],
            {},
            "score.scorers[0].scale: not used by kind 'perplexity'",
        ),
        (
            [{"kind": "perplexity", "model": M, "columns": ["row", "bogus"]}],
            {},
            "score.scorers[0].columns: 'bogus' is not an output of kind 'perplexity'",
        ),
        (
            [{"kind": "perplexity", "model": M}, {"kind": "perplexity", "model": OTHER}],
            {},
            "score.scorers[1].name: column 'ppl_nll_turns' is also written by score.scorers[0]",
        ),
        (
            [{"kind": "rating", "model": M, "name": "rank"}],
            {"score": "rank"},
            "score.scorers[0].name: column 'rank' is reserved",
        ),
        (
            [{"kind": "rating", "model": M, "scale": 7}],
            {},
            "score.scorers[0].template: the default rubric is written for scale 5",
        ),
        (
            [{"kind": "rating", "model": M, "scale": 3, "rating_tokens": ["a", "b"]}],
            {},
            "score.scorers[0].scale: 3 but rating_tokens has 2 labels",
        ),
        (
            [{"kind": "rating", "model": M, "scale": 40, "template": "{instruction}"}],
            {},
            "score.scorers[0].scale: 40 must be in [2, 20]",
        ),
        (
            [{"kind": "length", "columns": ["response_tokens"]}],
            {},
            "score.scorers[0].columns: 'response_tokens' counts tokens and needs a model",
        ),
        ([{"kind": "bogus"}], {}, "score.scorers[0].kind: 'bogus' is not allowed"),
        ([], {}, "score.scorers: at least one scorer is required"),
        (
            [{"kind": "perplexity", "model": M}],
            {},
            "select.score: 'evol_score' is not a row column the scorers write (evol_score needs",
        ),
        (
            None,
            {"score": "complexity * quality"},
            "select.score: 'complexity' is not a row column the scorers write (the "
            "deita_complexity scorer writes it with columns: [turn, row])",
        ),
        (None, {"score": "__import__('os')"}, "select.score: Call is not allowed"),
        (None, {"score": "evol_score ** 2"}, "select.score: Pow is not allowed"),
    ],
)
def test_bad_scorer_configs_fail_at_load_naming_the_key(scorers, select, message):
    data = {"demo_pool": True}
    if scorers is not None:
        data["score"] = {"scorers": scorers}
    if select:
        data["select"] = select
    with pytest.raises(ConfigError) as e:
        load_job(data=data)
    assert message in str(e.value)


def test_rating_with_the_deita_quality_template_has_its_pieces():
    from deita_ray.templates import QUALITY_PIECES

    text = "{instruction}".join([QUALITY_PIECES[0], "{response}".join(QUALITY_PIECES[1:])])
    cfg = _cfg([{"kind": "rating", "model": M, "template": text, "scale": 6}], score="rating")
    spec = resolve_scorers(cfg)[0]
    assert spec.pieces == QUALITY_PIECES and spec.fields == ("instruction", "response")


def test_select_score_is_checked_only_when_select_runs():
    cfg = load_job(
        data={
            "demo_pool": True,
            "stages": ["ingest", "score"],
            "score": {"scorers": [{"kind": "perplexity", "model": M}]},
        }
    )
    assert cfg.select.score == "evol_score"  # unused: no select stage


def test_literal_braces_in_templates():
    template = 'JSON {{"q": "{instruction}"}}: '
    cfg = _cfg([{"kind": "rating", "model": M, "template": template}], score="rating")
    assert resolve_scorers(cfg)[0].pieces == ('JSON {"q": "', '"}: ')

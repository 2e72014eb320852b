"""The config tree: every shipped job loads, overrides are typed, bad values name the key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from deita_ray.config import (
    STAGES,
    ConfigError,
    PipelineConfig,
    config_hash,
    describe,
    load_config,
    parse_override,
)

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


def test_jobs_folder_has_the_documented_jobs():
    names = {p.name for p in JOBS}
    assert {"quickstart.yaml", "deita_6k.yaml", "deita_10k.yaml", "deita_dpo.yaml"} <= names


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_shipped_job_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.stages and all(s in STAGES for s in cfg.stages)


def test_paper_jobs_carry_the_paper_recipes():
    six = load_config(JOBS[0].parent / "deita_6k.yaml")
    assert (six.select.tau, six.select.budget) == (0.9, 6000)
    assert (six.sft.epochs, six.sft.global_batch_size, six.sft.learning_rate) == (6, 512, 2e-5)
    assert (six.sft.lr_scheduler, six.sft.warmup_ratio, six.sft.zero_stage) == ("cosine", 0.1, 2)
    assert six.sft.max_length == 2048 and six.sft.precision == "bf16"
    assert load_config(JOBS[0].parent / "deita_10k.yaml").select.budget == 10000
    dpo = load_config(JOBS[0].parent / "deita_dpo.yaml").dpo
    assert (dpo.beta, dpo.global_batch_size, dpo.learning_rate, dpo.epochs) == (0.1, 32, 5e-7, 9)
    assert (dpo.lr_scheduler, dpo.zero_stage, dpo.gradient_checkpointing) == ("linear", 3, True)


def test_every_field_is_documented():
    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp)

    walk(PipelineConfig)
    lines = describe()
    assert any(line.startswith("select.tau (float, default 0.9)") for line in lines)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(
        data={"input": {"paths": "pool.jsonl"}},
        overrides=[
            "select.budget=123",
            "select.tau=0.5",
            "stages=[ingest, score]",
            "ray.env_vars={OMP_NUM_THREADS: '1'}",
            "score.quality_model.backend=hf",
        ],
    )
    assert cfg.select.budget == 123 and cfg.select.tau == 0.5
    assert cfg.stages == ["ingest", "score"]
    assert cfg.input.paths == ["pool.jsonl"]  # a single path is a list of one
    assert cfg.ray.env_vars == {"OMP_NUM_THREADS": "1"}
    assert cfg.score.quality_model.backend == "hf"
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("select.budget=many", "select.budget: expected an integer, got 'many'"),
        ("select.budget=0", "select.budget: 0 must be > 0"),
        ("select.tau=1.5", "select.tau: 1.5 must be <= 1"),
        ("select.method=magic", "select.method: 'magic' is not allowed (allowed: deita, random"),
        ("select.bugdet=10", "unknown key 'select.bugdet' (select allows: method, tau, budget"),
        (
            "stages=[select, ingest]",
            "stages: ['select', 'ingest'] must be distinct and in pipeline order",
        ),
        ("stages=[ingest, train]", "stages: 'train' is not allowed (allowed: ingest, score, embed"),
        (
            "score.complexity_model.backend=onnx",
            "score.complexity_model.backend: 'onnx' is not allowed",
        ),
        ("score.digit_token_ids=[1, 2]", "score.digit_token_ids: [1, 2] must hold six ids"),
        ("sft.global_batch_size=10", "sft.global_batch_size: 10 must be a multiple of"),
        ("sft.zero_stage=4", "sft.zero_stage: 4 is not allowed (allowed: 0, 1, 2, 3)"),
        ("model.path=x", "unknown key 'model'"),
        ("select.tau", "expected KEY=VALUE"),
        ("score.trust=yes", "unknown key 'score.trust'"),
        (
            "embed.model.trust_remote_code=maybe",
            "embed.model.trust_remote_code: expected true or false",
        ),
        (
            "score.resources.custom_resources={CPU: 2}",
            "score.resources.custom_resources.CPU: not a custom resource",
        ),
        ("sft.custom_resources={trainer_node: 0}", "sft.custom_resources.trainer_node: 0.0 must"),
        ("output.rows_per_part=0", "output.rows_per_part: 0 must be > 0"),
    ],
)
def test_bad_values_fail_at_start_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(data={"input": {"paths": ["x.jsonl"]}}, overrides=[override])
    assert message in str(err.value)


def test_unknown_yaml_key_is_an_error(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("input:\n  paths: [a.jsonl]\n  formt: alpaca\n")
    with pytest.raises(ConfigError, match="unknown key 'input.formt'"):
        load_config(job)


def test_ingest_needs_input_and_dpo_needs_pairs():
    with pytest.raises(ConfigError, match="input.paths: required"):
        load_config(data={})
    with pytest.raises(ConfigError, match="dpo.paths: required"):
        load_config(data={"stages": ["dpo"]})


def test_sft_batch_larger_than_the_selection_fails_at_load():
    job = {"input": {"paths": ["x.jsonl"]}, "stages": ["ingest", "score", "embed", "select", "sft"]}
    with pytest.raises(ConfigError) as err:
        load_config(data=job, overrides=["select.budget=100", "sft.global_batch_size=128"])
    assert "sft.global_batch_size: 128 must be <= select.budget x sft.train_fraction = 100" in (
        str(err.value)
    )
    # one full step is enough, and without the select stage the selection's size is unknown
    assert load_config(data=job, overrides=["select.budget=128"]).select.budget == 128
    # the held-out share of the selection does not train
    with pytest.raises(ConfigError, match="select.budget x sft.train_fraction = 125"):
        load_config(data=job, overrides=["select.budget=128", "sft.train_fraction=0.98"])
    sft_only = {**job, "stages": ["sft"]}
    assert load_config(data=sft_only, overrides=["select.budget=100"]).stages == ["sft"]


def test_dpo_prompt_limit_below_the_sequence_limit():
    job = {"stages": ["dpo"], "dpo": {"paths": ["p.jsonl"]}}
    assert load_config(data=job).dpo.max_prompt_length == 512
    with pytest.raises(ConfigError, match="dpo.max_prompt_length: 512 must be < dpo.max_length"):
        load_config(data=job, overrides=["dpo.max_length=512"])
    with pytest.raises(ConfigError, match="dpo.truncation_mode"):
        load_config(data=job, overrides=["dpo.truncation_mode=middle"])
    # deita_dpo renders DPO pairs only: SFT does not accept it
    assert load_config(data=job, overrides=["dpo.template=deita_dpo"]).dpo.template == "deita_dpo"
    with pytest.raises(ConfigError, match="sft.template"):
        load_config(data=job, overrides=["sft.template=deita_dpo"])


def test_trust_remote_code_is_off_by_default():
    cfg = load_config(data={"input": {"paths": ["x"]}})
    models = [cfg.score.complexity_model, cfg.score.quality_model, cfg.embed.model]
    assert not any(m.trust_remote_code for m in models)
    assert not cfg.sft.trust_remote_code and not cfg.dpo.trust_remote_code


def test_config_hash_is_stable_and_sensitive():
    a = load_config(data={"input": {"paths": ["x"]}})
    b = load_config(data={"input": {"paths": ["x"]}})
    assert config_hash(a) == config_hash(b)
    c = load_config(data={"input": {"paths": ["x"]}}, overrides=["select.budget=7"])
    assert config_hash(a) != config_hash(c)

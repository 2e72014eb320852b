"""cluster/stage_inputs.py without network: the reference's UltraFeedback sampling (pure), the
download patterns (through huggingface_hub's own filter), the staged layout the paper jobs read,
and the offline check that staged weights satisfy the jobs' model preflight."""

from __future__ import annotations

import importlib.util
import random
import shutil
from pathlib import Path

import pytest
import yaml

from deita_ray.config import load_config
from deita_ray.preflight import folder_problem

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "stage_inputs.py"
SNAPSHOT = "fedcba9876543210fedcba9876543210fedcba98"


def _load_script():
    spec = importlib.util.spec_from_file_location("stage_inputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stage = _load_script()


def _reference_sample(data: list, datanum: str) -> list:
    """hkust-nlp/deita src/deita/data/sample_ultrafeedback.py (commit acec45c), its sampling
    lines verbatim in effect: seed the module RNG, sample indices, select them in that order."""
    state = random.getstate()
    try:
        random.seed(42)
        sample_indices = random.sample(range(len(data)), int(datanum))
        return [data[i] for i in sample_indices]  # data.select(sample_indices)
    finally:
        random.setstate(state)


# ---------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("size", [61966, 61135, 12345])
def test_sample_matches_the_reference(size):
    rows = [{"prompt_id": f"p{i}", "prompt": f"question {i}"} for i in range(size)]
    ours = stage.sample_rows(rows, 10_000, seed=42)
    assert ours == _reference_sample(rows, "10000")
    assert len({r["prompt_id"] for r in ours}) == 10_000
    # Sampled order, not file order: the reference writes the rows as random.sample drew them.
    assert [r["prompt_id"] for r in ours] != sorted(r["prompt_id"] for r in ours)


def test_sample_leaves_the_global_rng_alone():
    random.seed(7)
    expected = random.random()
    random.seed(7)
    stage.sample_indices(1000, 10)
    assert random.random() == expected


def test_sample_depends_on_the_split_size():
    """Why the UltraFeedback revision must be pinned: two published sizes of train_prefs."""
    a = stage.sample_indices(61966, 10_000)
    b = stage.sample_indices(61135, 10_000)
    assert a[:5] == b[:5] == [41905, 7296, 1639, 48598, 18024]  # CPython's Mersenne Twister
    assert a != b


def test_sample_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="cannot sample 11 of 10"):
        stage.sample_indices(10, 11)


# ---------------------------------------------------------------------------------------------
# Download patterns

MISTRAL_FILES = [
    ".gitattributes",
    "README.md",
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
]
LLAMA_BIN_FILES = [
    "config.json",
    "pytorch_model-00001-of-00003.bin",
    "pytorch_model-00002-of-00003.bin",
    "pytorch_model-00003-of-00003.bin",
    "pytorch_model.bin.index.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
V03_FILES = [
    "config.json",
    "consolidated.safetensors",
    "model-00001-of-00001.safetensors",
    "model.safetensors.index.json",
    "original/params.json",
    "original/consolidated.00.pth",
    "tokenizer.json",
    "tokenizer_config.json",
]


def _selected(files: list[str]) -> list[str]:
    """What snapshot_download fetches with those allow_patterns (huggingface_hub's filter)."""
    from huggingface_hub.utils import filter_repo_objects

    return sorted(filter_repo_objects(files, allow_patterns=stage.files_to_fetch(files)))


def test_files_to_fetch_are_one_copy_of_the_weights():
    got = _selected(MISTRAL_FILES)
    assert "model-00001-of-00002.safetensors" in got and "tokenizer.model" in got
    assert not any(f.endswith(".bin") for f in got), "both weight formats downloaded"
    assert {".gitattributes", "README.md"}.isdisjoint(got)

    got = _selected(LLAMA_BIN_FILES)
    assert [f for f in got if f.endswith(".bin")] == LLAMA_BIN_FILES[1:4]

    got = _selected(V03_FILES)
    assert "model-00001-of-00001.safetensors" in got
    assert "consolidated.safetensors" not in got and not any("original/" in f for f in got)


@pytest.mark.parametrize("files", [MISTRAL_FILES, LLAMA_BIN_FILES], ids=["safetensors", "bin"])
def test_what_the_patterns_fetch_passes_the_preflight(tmp_path, files):
    """The files selected for download make a folder that the jobs' preflight accepts."""
    import json

    for name in _selected(files):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        shards = sorted(f for f in files if f.endswith((".safetensors", ".bin")) and "-of-" in f)
        kind = ".safetensors" if index.startswith("model.") else ".bin"
        weight_map = {f"w{i}": s for i, s in enumerate(s for s in shards if s.endswith(kind))}
        if (tmp_path / index).exists():
            (tmp_path / index).write_text(json.dumps({"weight_map": weight_map}))
    assert folder_problem(tmp_path, trust_remote_code=False) is None


# ---------------------------------------------------------------------------------------------
# Layout and the jobs


def test_staged_paths_are_what_the_paper_jobs_read():
    paths = stage.staged_paths("/mnt/deita")
    for job in ("deita_6k.yaml", "deita_10k.yaml"):
        cfg = load_config(REPO / "jobs" / job)
        assert cfg.input.paths == [str(paths["pool"])], job
    dpo = load_config(REPO / "jobs" / "deita_dpo.yaml")
    assert str(paths["preferences"]) in dpo.dpo.paths
    assert dpo.dpo.beta and len(stage.PAPER_JOBS) == 3


def test_hf_home_is_the_one_the_pods_use():
    """The weights land where the Ray pods look for them (HF_HOME in the manifests)."""
    home = str(stage.staged_paths("/mnt/deita")["hf_home"])
    seen = set()
    for path in sorted((REPO / "cluster").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            text = yaml.safe_dump(doc or {})
            if "HF_HOME" in text:
                seen.add(path.name)
                assert f"value: {home}" in text, path.name
    assert {"raycluster.yaml", "stage-inputs.yaml"} <= seen


def test_hub_models_of_the_paper_jobs():
    models = stage.hub_models(stage.PAPER_JOBS)
    assert {
        "hkust-nlp/deita-complexity-scorer",
        "hkust-nlp/deita-quality-scorer",
        "mistralai/Mistral-7B-v0.1",
    } <= set(models)
    assert any(k.startswith("embed.model.path") for k in models["mistralai/Mistral-7B-v0.1"])
    # The DPO job's start model is the 6K job's output, a local folder: not downloaded.
    assert not any(name.startswith("/") for name in models)


def _model_files(folder: Path) -> Path:
    """The files a loadable model folder has (the preflight checks their presence)."""
    folder.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    return folder


def test_verify_offline_after_staging(tmp_path):
    """Empty cache: every hub model of the paper jobs is named. Staged (the cache layout
    snapshot_download writes, with refs/main): the preflight passes offline."""
    model = _model_files(tmp_path / "model")
    hf_cache = tmp_path / "hub"
    problems = stage.verify_offline(stage.PAPER_JOBS, hf_cache=str(hf_cache))
    models = stage.hub_models(stage.PAPER_JOBS)
    assert {p.split(" = ")[1].split(":")[0].strip("'") for p in problems} == set(models)
    assert all("HF_HUB_OFFLINE" in p for p in problems)
    for repo_id in models:
        repo_dir = hf_cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(model, repo_dir / "snapshots" / SNAPSHOT)
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(SNAPSHOT)
    assert stage.verify_offline(stage.PAPER_JOBS, hf_cache=str(hf_cache)) == []


def test_refuses_a_cache_outside_the_volume(tmp_path, capsys):
    """HF_HOME elsewhere would stage weights where no pod looks: stop before any download."""
    from huggingface_hub import constants

    if Path(constants.HF_HUB_CACHE).resolve().is_relative_to(tmp_path):
        pytest.skip("the test's HF cache is under tmp_path")
    assert stage.main(["--root", str(tmp_path)]) == 2
    assert "HF_HOME must be" in capsys.readouterr().err

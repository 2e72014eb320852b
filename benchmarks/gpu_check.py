"""GPU check: the project's GPU paths measured in one run of under 8 minutes on one H200.

Runs where only torch (CUDA), transformers, accelerate, safetensors, pyarrow and numpy are
installed: no Ray, no vLLM, no network. It imports only library modules that load none of
those, builds its model and data on the fly, and leaves the Ray and vLLM paths to the CPU
tests. DeepSpeed, which the ``deepspeed`` part needs, is installed from a wheel folder made
beforehand (``--wheels``, docs/gpu.md) when it is missing; without it that part is reported as
skipped, never as passed. ``--dry-run`` runs every part at tiny sizes on CPU
(tests/benchmarks), so that the script cannot rot between the rare GPU sessions.

Parts (``--part``; expected H200 times are estimates until a GPU has run it):

* ``selector`` (~90 s): :func:`select_diverse` on CUDA over a planted pool of 1M x 4096
  (budget 10K, tau 0.9: about 3 of 4 scanned rows are near-duplicates), end to end from a host
  array, with its own validity pass and ordering timed apart, against the bare similarity
  products it computes; its ids against the numpy path (exactly equal, or the run fails and no
  ratio is reported); then 100K x 1024 (budget 5K) on CUDA, torch CPU and numpy.
* ``score_embed`` (~70 s): a random LLaMA-architecture model of about 1B parameters in bf16
  on the ``hf`` backend: the score stage's batch function (:func:`score_table`, one prefill per
  prompt, digit logits) and the embed stage's (:class:`Embedder`) on 1,000 synthetic rows;
  tokens/s and MFU; DEITA's ways on the same model (one ``generate`` per prompt, on a sample
  of prompts; the batched last-token loop for embeddings).
* ``train`` (~40 s): the project's SFT step (assistant-only labels, gradient checkpointing,
  bf16 autocast, AdamW, clipping 1.0) on the same model with plain torch, sequences of 2048
  tokens; tokens/s and MFU.
* ``deepspeed`` (~60 s): the project's own DeepSpeed engine (``build_engine`` of
  deita_ray/training/loop.py, the function every Ray Train worker calls, here without Ray in a
  one-process group) on the same model with a ``use_gpu: true`` training config: the
  accelerator DeepSpeed picked, the engine's device and dtype, and a few optimizer steps (ZeRO-2,
  bf16, gradient accumulation 2) with the SFT step. A wrong accelerator fails it in minutes.

MFU = model FLOPs / seconds / peak. Model FLOPs per token: ``2 x N`` for the score and embed
passes (N = parameters of the decoder layers and final norm: the embedding is a lookup and the
LM head runs on one token per prompt) and ``6 x N`` for training (N = every parameter but the
embedding table; the recomputation of gradient checkpointing is not counted). Attention score
FLOPs are not counted. Peak: NVIDIA's dense bf16 figure, 989 TFLOP/s for the H200 and H100 SXM,
unless ``--peak-tflops`` says otherwise.

Prints one JSON line per part as soon as it finishes (a killed run still reports), writes the
JSON after every part to ``--out`` (default ``benchmarks/results/gpu_check.json``; a ``--part``
run updates its part in an existing file) and prints it whole at the end. Exit status 1 when a
part failed or an equality check did not hold.

Usage: ``PYTHONPATH=. python3 benchmarks/gpu_check.py [--part P] [--dry-run] [--wheels DIR]``
(docs/gpu.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, benchmarks/ is sys.path[0]: its select.py would shadow the stdlib module.
# Drop it and put the repository root there instead (for `benchmarks.select`, `deita_ray`).
# Every other import comes after this:
# ruff: noqa: E402
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ------------------------------------------------------------------------------------------
# The project's SFT step function, called as sft_step(engine, batch, device, config) and
# returning (loss, real tokens, extra metrics). THE line to repoint when training code moves:
from deita_ray.stages.sft import sft_step

# ------------------------------------------------------------------------------------------
# isort: split
import argparse
import datetime
import functools
import gc
import importlib
import json
import math
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks.select import ProductRecorder, planted_pool, replay_products
from deita_ray.config import ModelConfig, TrainingConfig
from deita_ray.data.formats import CANONICAL_SCHEMA, extract_turns
from deita_ray.data.rejects import REASON
from deita_ray.models.backend import load_backend
from deita_ray.scoring import expected_score, resolve_digit_ids
from deita_ray.selection.greedy import (
    candidate_order,
    normalize_rows,
    select_diverse,
    valid_rows,
)
from deita_ray.stages.embed import EMBEDDING, Embedder
from deita_ray.stages.score import SCORE_COLUMNS, score_table
from deita_ray.stages.sft import TokenizeSFT
from deita_ray.templates import complexity_prompt, quality_prompt, render_vicuna
from testing.synthetic_pool import WORDS
from testing.tiny_models import build_tiny_llama

REPO = Path(__file__).resolve().parents[1]
RESULT_PATH = REPO / "benchmarks" / "results" / "gpu_check.json"
DRY_RUN_PATH = Path(tempfile.gettempdir()) / "deita_gpu_check_dry_run.json"
PARTS = ("selector", "score_embed", "train", "deepspeed")
MAX_LEN = 2048
"""Context of the score and embed passes (the config's default ``max_model_len``)."""
EXPECTED_S = {"selector": 90, "score_embed": 70, "train": 40, "deepspeed": 60}
WHEELS_ENV = "DEITA_WHEELS"
DEFAULT_WHEELS = REPO / "benchmarks" / "wheels"
"""Where ``--wheels`` looks by default (ignored by git: wheels are never committed)."""
"""Expected seconds of each part on one H200 (estimates until measured)."""

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0}
"""Dense bf16 peak by GPU name (NVIDIA datasheets, SXM parts; PCIe H100s are lower)."""


@dataclass(frozen=True)
class Sizes:
    """Every size of a run: the full GPU run or the tiny CPU dry run."""

    sel_n: int
    sel_d: int
    sel_budget: int
    sel_check_prefix: int
    small_n: int
    small_d: int
    small_budget: int
    tau: float
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    rows: int
    ref_prompts: int
    ref_embed_batch: int
    hf_batch: int
    seq: int
    train_batch: int
    train_warmup: int
    train_steps: int
    ds_seq: int
    ds_micro: int
    ds_steps: int
    words: tuple[int, int, int, int]
    """(instruction min, max, response min, max) words of a synthetic scoring row."""


FULL = Sizes(
    sel_n=1_000_000,
    sel_d=4096,
    sel_budget=10_000,
    sel_check_prefix=100_000,
    small_n=100_000,
    small_d=1024,
    small_budget=5_000,
    tau=0.9,
    hidden=2048,
    layers=16,
    heads=32,
    intermediate=5632,
    vocab=32000,
    rows=1000,
    ref_prompts=150,
    ref_embed_batch=16,
    hf_batch=64,
    seq=2048,
    train_batch=16,
    train_warmup=2,
    train_steps=8,
    ds_seq=1024,
    ds_micro=4,
    ds_steps=4,
    words=(10, 60, 30, 200),
)

DRY = Sizes(
    sel_n=2000,
    sel_d=64,
    sel_budget=100,
    sel_check_prefix=1000,
    small_n=1000,
    small_d=32,
    small_budget=50,
    tau=0.9,
    hidden=128,
    layers=2,
    heads=2,  # head_dim 64, as the real model
    intermediate=256,
    vocab=1024,
    rows=8,
    ref_prompts=4,
    ref_embed_batch=4,
    hf_batch=4,
    seq=128,
    train_batch=2,
    train_warmup=1,
    train_steps=2,
    ds_seq=128,
    ds_micro=2,
    ds_steps=2,
    words=(5, 20, 10, 40),
)


def emit(obj: dict) -> None:
    """One JSON line on stdout, flushed (what a killed run leaves behind)."""
    print(json.dumps(obj, default=str), flush=True)


def r3(x: float) -> float:
    return round(float(x), 3)


class Device:
    """The torch device of a run and its synchronisation (CUDA kernels run asynchronously)."""

    def __init__(self, name: str):
        import torch

        self.torch = torch
        self.name = name
        self.is_cuda = name == "cuda"

    def sync(self) -> None:
        if self.is_cuda:
            self.torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.is_cuda:
            self.torch.cuda.empty_cache()

    def peak_memory_gib(self) -> float | None:
        if not self.is_cuda:
            return None
        return round(self.torch.cuda.max_memory_allocated() / 1024**3, 2)


# ------------------------------------------------------------------------------------------
# Machine facts


def commit_of_tree(given: str | None) -> str | None:
    """``--commit``, else ``$DEITA_COMMIT``, else git's HEAD when the tree is a checkout."""
    if given or os.environ.get("DEITA_COMMIT"):
        return given or os.environ["DEITA_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine_facts(dev: Device, commit: str | None) -> dict:
    import torch
    import transformers

    facts: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "device": dev.name,
    }
    if dev.is_cuda:
        prop = torch.cuda.get_device_properties(0)
        facts.update(
            gpu=prop.name,
            gpu_memory_gib=round(prop.total_memory / 1024**3, 1),
            gpu_multiprocessors=prop.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
    return facts


def peak_flops(dev: Device, given_tflops: float | None) -> tuple[float | None, str]:
    """Peak bf16 FLOP/s for MFU and where the figure comes from."""
    if given_tflops:
        return given_tflops * 1e12, f"--peak-tflops {given_tflops}"
    if dev.is_cuda:
        name = dev.torch.cuda.get_device_name(0)
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name and "PCIe" not in name:
                return tflops * 1e12, f"{key} dense bf16 datasheet peak, {tflops} TFLOP/s"
    return None, "unknown peak for this device: MFU not computed (give --peak-tflops)"


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    return round(flops / seconds / peak, 4) if peak and seconds > 0 else None


# ------------------------------------------------------------------------------------------
# Part 1: the selector


def picks_match(
    ours: np.ndarray, reference: np.ndarray, rank: np.ndarray, prefix: int
) -> tuple[bool, int]:
    """Whether a reference run on the first ``prefix`` rows of the scan order picked exactly
    the rows of ``ours`` that lie in that prefix, in the same order (the greedy's picks among
    the first rows of its order do not depend on the rows after them).

    Returns:
        (equal, number of picks compared).
    """
    expected = ours[rank[ours] < prefix]
    return bool(np.array_equal(expected, reference)), int(len(expected))


def time_select(emb, scores, tau: float, budget: int, device: str, dev: Device, **kw):
    """Seconds and result of one run; the result carries the run's product shapes (recorded
    by select.py's ProductRecorder hook) as ``product_shapes``."""
    rec = ProductRecorder()
    t = time.perf_counter()
    res = select_diverse(emb, scores, tau, budget, device=device, on_product=rec, **kw)
    dev.sync()
    seconds = time.perf_counter() - t
    res.product_shapes = rec.shapes
    return seconds, res


def bare_products(emb: np.ndarray, order: np.ndarray, shapes, dev: Device, reps: int) -> dict:
    """The products a run computed, replayed alone on the run's device (fastest of ``reps``)."""
    torch = dev.torch
    d = emb.shape[1]
    need = max((max(r, c) for r, c in shapes), default=1)
    xs = torch.from_numpy(normalize_rows(emb[order[:need]])).to(dev.name)
    torch.backends.cuda.matmul.allow_tf32 = False  # as the selector: IEEE fp32 products
    replay_products(xs, shapes, dev.sync)  # warm-up
    best = min(replay_products(xs, shapes, dev.sync) for _ in range(reps))
    gflop = sum(2.0 * r * c * d for r, c in shapes) / 1e9
    del xs
    return {
        "count": len(shapes),
        "gflop": round(gflop, 1),
        "seconds": round(best, 4),
        "tflops": round(gflop / 1e3 / best, 2) if best > 0 else None,
    }


def part_selector(sz: Sizes, dev: Device, log: Callable[[dict], None]) -> dict:
    """Selector on the device: expected ~90 s on one H200.

    About 15 s to draw the 1M x 4096 pool on the GPU and copy it to 16 GiB of host memory;
    2 x 2-4 s for the timed end-to-end runs (most of it the host-side validity pass over the
    whole pool); 3 s for that pass and the ordering timed apart; 5-15 s for the numpy run on
    the 100K-row prefix (16 cores); 100K x 1024 on CUDA, torch CPU and numpy, about 10 s.
    Memory: the pool is drawn on the GPU in 1 GiB chunks (about 6 GiB of GPU memory at most)
    straight into one float32 host array (16 GiB; about 18 GiB of host memory at the peak).
    """
    out: dict[str, Any] = {"tau": sz.tau}
    # Warm-up: CUDA context, cuBLAS handles and kernels (not timed).
    w_emb, w_scores = planted_pool(2048, 64, seed=9, device=dev.name)
    select_diverse(w_emb, w_scores, sz.tau, 64, device=dev.name)

    # 1. The large pool.
    n, d, m = sz.sel_n, sz.sel_d, sz.sel_budget
    t = time.perf_counter()
    emb, scores = planted_pool(n, d, device=dev.name)
    big: dict[str, Any] = {"n": n, "d": d, "budget": m, "pool_gen_s": r3(time.perf_counter() - t)}
    big["host_pool_gib"] = round(emb.nbytes / 1024**3, 2)
    runs = []
    for _ in range(2):
        s, res = time_select(emb, scores, sz.tau, m, dev.name, dev)
        runs.append(s)
    st = res.stats
    big["end_to_end_s"] = [r3(x) for x in runs]
    big["best_s"] = r3(min(runs))
    big["pool_stats"] = {
        k: st[k] for k in ("scanned", "selected", "rejected_for_similarity", "band_checks")
    }
    big["rejected_share_of_scanned"] = round(st["rejected_for_similarity"] / st["scanned"], 3)
    # The two whole-pool passes inside select_diverse, timed apart (host work).
    t = time.perf_counter()
    finite, _ = valid_rows(emb)
    big["inside_valid_rows_s"] = r3(time.perf_counter() - t)
    t = time.perf_counter()
    order = candidate_order(scores, np.arange(n), finite & ~np.isnan(scores))
    big["inside_candidate_order_s"] = r3(time.perf_counter() - t)
    big["bare_products"] = bare_products(emb, order, res.product_shapes, dev, reps=3)
    log({"selector_progress": "large pool timed", **big})

    # Exactness: numpy on the first rows of the scan order, in the same order (seq = position).
    prefix = order[: sz.sel_check_prefix]
    t = time.perf_counter()
    ref = select_diverse(emb[prefix], scores[prefix], sz.tau, m, seq=prefix, device="numpy")
    big["numpy_on_prefix_s"] = r3(time.perf_counter() - t)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    equal, compared = picks_match(res.indices, prefix[ref.indices], rank, len(prefix))
    equal = equal and compared > 0  # an empty comparison proves nothing
    big["ids_check"] = {
        "prefix_rows": len(prefix),
        "picks_compared": compared,
        "equal_to_numpy": equal,
    }
    if equal:
        big["ratios"] = {
            "best_over_bare_products": round(min(runs) / big["bare_products"]["seconds"], 2),
            "numpy_prefix_over_best": round(big["numpy_on_prefix_s"] / min(runs), 2),
        }
    big["goals"] = {"best_s": "< 2", "best_over_bare_products": "<= 1.3"}
    out["large"] = big
    del emb, scores, order, prefix, ref, res, rank
    dev.free()

    # 2. The CPU benchmark's size: the same pool kind on CUDA, torch CPU and numpy.
    n, d, m = sz.small_n, sz.small_d, sz.small_budget
    emb, scores = planted_pool(n, d, device=dev.name)
    small: dict[str, Any] = {"n": n, "d": d, "budget": m}
    times: dict[str, float] = {}
    ids: dict[str, np.ndarray] = {}
    for name in dict.fromkeys((dev.name, "cpu", "numpy")):
        best = math.inf
        for _ in range(2 if name == dev.name else 1):
            s, res = time_select(emb, scores, sz.tau, m, name, dev)
            best = min(best, s)
        times[name], ids[name] = best, res.indices
    small["seconds"] = {("torch_" + k if k != "numpy" else k): r3(v) for k, v in times.items()}
    small["selected"] = int(len(ids["numpy"]))
    equal_small = all(np.array_equal(ids["numpy"], v) for v in ids.values())
    small["ids_equal_across_devices"] = equal_small
    if equal_small and dev.is_cuda:
        small["ratios"] = {
            "torch_cpu_over_cuda": round(times["cpu"] / times["cuda"], 2),
            "numpy_over_cuda": round(times["numpy"] / times["cuda"], 2),
        }
    out["small"] = small
    out["ok"] = bool(equal and equal_small)
    return out


# ------------------------------------------------------------------------------------------
# The model and the synthetic rows shared by the model parts


def words(rng: random.Random, lo: int, hi: int) -> str:
    """A text of lo..hi words in sentences of up to 12 words."""
    k = rng.randint(lo, hi)
    out, i = [], 0
    while i < k:
        n = min(k - i, rng.randint(4, 12))
        out.append(" ".join(rng.choices(WORDS, k=n)).capitalize() + ".")
        i += n
    return " ".join(out)


def synthetic_rows(n: int, turns: int, lengths: tuple[int, int, int, int], seed: int) -> pa.Table:
    """Canonical rows (the ingest stage's schema) of ``turns`` user/assistant turns each."""
    rng = random.Random(seed)
    i0, i1, r0, r1 = lengths
    rows = []
    for k in range(n):
        msgs = []
        for _ in range(turns):
            msgs.append({"role": "user", "content": words(rng, i0, i1)})
            msgs.append({"role": "assistant", "content": words(rng, r0, r1)})
        rows.append(
            {
                "id": f"gpu_check:{k}",
                "seq": k,
                "messages": msgs,
                "source": "synthetic",
                "format": "messages",
                "extra": "{}",
            }
        )
    return pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA)


@dataclass
class ModelInfo:
    path: str
    params: int
    embedding_params: int
    lm_head_params: int
    build_s: float

    @property
    def body_params(self) -> int:
        """Decoder layers and final norm: the parameters every prompt token goes through."""
        return self.params - self.embedding_params - self.lm_head_params

    @property
    def train_params(self) -> int:
        """Every parameter but the embedding table (a lookup): the LM head runs on every
        token in training."""
        return self.params - self.embedding_params


def build_model(sz: Sizes, dev: Device, folder: str) -> ModelInfo:
    """A random LLaMA of the run's size with the project's on-the-fly tokenizer, saved in bf16."""
    from safetensors import safe_open

    t = time.perf_counter()
    path = build_tiny_llama(
        folder,
        hidden_size=sz.hidden,
        num_layers=sz.layers,
        num_heads=sz.heads,
        num_kv_heads=sz.heads,
        intermediate_size=sz.intermediate,
        vocab_size=sz.vocab,
        dtype="bfloat16",
        device=dev.name,
    )
    build_s = time.perf_counter() - t
    counts = {"all": 0, "embed": 0, "head": 0}
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                size = int(np.prod(st.get_slice(key).get_shape()))
                counts["all"] += size
                counts["embed"] += size if key.endswith("embed_tokens.weight") else 0
                counts["head"] += size if key.startswith("lm_head.") else 0
    return ModelInfo(str(path), counts["all"], counts["embed"], counts["head"], r3(build_s))


# ------------------------------------------------------------------------------------------
# Part 2: scoring and embedding on the hf backend


def counting(fn: Callable, stats: dict) -> Callable:
    """Wrap a backend's engine call to count the prompts and tokens it gets, and its time."""

    def wrapped(prompts, *args):
        stats["prompts"] += len(prompts)
        stats["tokens"] += sum(len(p) for p in prompts)
        t = time.perf_counter()
        out = fn(prompts, *args)
        stats["engine_s"] += time.perf_counter() - t
        return out

    return wrapped


def new_stats() -> dict:
    return {"prompts": 0, "tokens": 0, "engine_s": 0.0}


def reference_generate(model, tokenizer, prompts: list[str], digit_ids: list[int], new_tokens: int):
    """DEITA's scorer: one ``generate`` per prompt with the scores of the first new token
    (deita/selection/scorer/base.py: ``max_new_tokens=2``, ``output_scores=True``)."""
    import torch

    logits = np.empty((len(prompts), 6))
    tokens = 0
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(p, return_tensors="pt").to(model.device)
        tokens += ids.shape[1]
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=new_tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=tokenizer.eos_token_id,
            )
        logits[i] = out.scores[0][0, digit_ids].double().cpu().numpy()
    return logits, tokens


def reference_embed(model, tokenizer, texts: list[str], batch: int, max_len: int):
    """DEITA's embedder: batched forward of the causal LM sorted by length, right padding,
    ``output_hidden_states=True``, last real token of the last hidden state."""
    import torch

    tokenizer.padding_side = "right"
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.empty((len(texts), model.config.hidden_size))
    tokens = 0
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        enc = tokenizer(
            [texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        ).to(model.device)
        tokens += int(enc["attention_mask"].sum())
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states[-1]
        last = enc["attention_mask"].sum(1) - 1
        out[idx] = np.asarray(hs[torch.arange(len(idx)), last].float().tolist())
    return out, tokens


def part_score_embed(
    sz: Sizes, dev: Device, model: ModelInfo, peak: float | None, log: Callable[[dict], None]
) -> dict:
    """Score and embed passes in bf16: expected ~70 s on one H200.

    About 5 s per backend load; the score pass (2,000 prompts, ~1M tokens) 3-6 s; DEITA's
    per-prompt ``generate`` on 2 x 150 sampled prompts 10-20 s; the embed pass 2-4 s and
    DEITA's batched loop 3-6 s.
    """
    table = synthetic_rows(sz.rows, 1, sz.words, seed=1)
    cfg = ModelConfig(
        path=model.path,
        backend="hf",
        dtype="bfloat16",
        max_model_len=MAX_LEN,
        hf_batch_size=sz.hf_batch,
    )
    flops_per_token = 2.0 * model.body_params
    out: dict[str, Any] = {
        "rows": sz.rows,
        "hf_batch_size": sz.hf_batch,
        "dtype": "bfloat16",
        "flops_per_token": flops_per_token,
    }

    # Scoring: the score stage's batch function on the whole table (one engine call).
    t = time.perf_counter()
    backend = load_backend(cfg, model.path, "score")
    digit_ids = resolve_digit_ids(backend.tokenizer)
    # The score stage's batch function for the default DEITA pair (one engine call).
    scorer = functools.partial(score_table, backend=backend, digit_ids=digit_ids)

    load_s = time.perf_counter() - t
    scorer(table.slice(0, min(8, sz.rows)))  # warm-up (kernels, allocator), not timed
    stats = new_stats()
    backend.digit_logits = counting(backend.digit_logits, stats)
    dev.sync()
    t = time.perf_counter()
    scored = scorer(table)
    dev.sync()
    score_s = time.perf_counter() - t
    rejected = sum(r is not None for r in scored[REASON].to_pylist())
    score = {
        "backend_load_s": r3(load_s),
        "prompts": stats["prompts"],
        "prompt_tokens": stats["tokens"],
        "mean_prompt_tokens": round(stats["tokens"] / max(1, stats["prompts"]), 1),
        "pass_s": r3(score_s),
        "engine_s": r3(stats["engine_s"]),
        "tokens_per_s": round(stats["tokens"] / score_s, 1),
        "prompts_per_s": round(stats["prompts"] / score_s, 1),
        "mfu": mfu(flops_per_token * stats["tokens"], score_s, peak),
        "rows_rejected": rejected,
    }

    # DEITA's way on a sample of the same prompts (the same model object).
    keys, prompts = [], []
    for rid, msgs in zip(table["id"].to_pylist(), table["messages"].to_pylist(), strict=True):
        for t_i, (u, r) in enumerate(extract_turns(msgs)):
            keys += [(rid, "complexity", t_i), (rid, "quality", t_i)]
            prompts += [complexity_prompt(u), quality_prompt(u, r)]
    sample = np.sort(np.random.default_rng(0).choice(len(prompts), sz.ref_prompts, replace=False))
    tok = backend.tokenizer
    digits = resolve_digit_ids(tok)
    reference_generate(backend.model, tok, prompts[:2], digits, 1)  # warm-up
    ours = {
        (row["id"], kind, t_i): s
        for row in scored.select(["id", *SCORE_COLUMNS.values()]).to_pylist()
        for kind, col in SCORE_COLUMNS.items()
        for t_i, s in enumerate(row[col] or [])
    }
    refs = {}
    for new_tokens in (2, 1):
        dev.sync()
        t = time.perf_counter()
        logits, ref_tokens = reference_generate(
            backend.model, tok, [prompts[i] for i in sample], digits, new_tokens
        )
        dev.sync()
        ref_s = time.perf_counter() - t
        per_prompt = ref_s / len(sample)
        ref_scores = expected_score(logits)
        diffs = [
            abs(ours.get(keys[i], math.nan) - s) for i, s in zip(sample, ref_scores, strict=True)
        ]
        refs[f"max_new_tokens_{new_tokens}"] = {
            "prompts_timed": len(sample),
            "timed_s": r3(ref_s),
            "s_per_prompt": round(per_prompt, 5),
            "extrapolated_all_prompts_s": r3(per_prompt * len(prompts)),
            "tokens_per_s": round(ref_tokens / ref_s, 1),
            "mfu": mfu(flops_per_token * ref_tokens, ref_s, peak),
            "max_abs_score_diff_vs_ours": float(max(diffs)),
        }
    score["reference_per_sample"] = {
        "how": (
            "one generate per prompt as DEITA's scorer (max_new_tokens=2 as its code; 1 as the "
            "lower bound), on the same bf16 model object on the GPU (DEITA's hf path loads "
            "fp32 and never moves it to a GPU); timed on a random sample of the prompts and "
            "extrapolated per prompt"
        ),
        **refs,
    }
    score["ratios"] = {
        f"reference_{k}_over_ours": round(v["extrapolated_all_prompts_s"] / score_s, 1)
        for k, v in refs.items()
    }
    score["goal"] = "reference over ours >= 20"
    out["score"] = score
    log({"score_embed_progress": "score done", **score})
    backend.close()
    del scorer, backend
    dev.free()

    # Embedding: the embed stage's batch function on the same rows.
    t = time.perf_counter()
    embedder = Embedder(cfg, model.path, max_length=MAX_LEN)
    load_s = time.perf_counter() - t
    backend = embedder.backend
    embedder(table.slice(0, min(8, sz.rows)))  # warm-up
    stats = new_stats()
    backend.embed = counting(backend.embed, stats)
    dev.sync()
    t = time.perf_counter()
    embedded = embedder(table)
    dev.sync()
    embed_s = time.perf_counter() - t
    rejected = sum(r is not None for r in embedded[REASON].to_pylist())
    if rejected:
        raise RuntimeError(f"the embed stage rejected {rejected} of {sz.rows} rows")
    vectors = np.asarray(embedded[EMBEDDING].to_pylist(), dtype=np.float64)
    texts = [render_vicuna(m) for m in table["messages"].to_pylist()]
    tok = backend.tokenizer
    reference_embed(backend.model, tok, texts[:2], 2, MAX_LEN)  # warm-up
    dev.sync()
    t = time.perf_counter()
    ref_vec, ref_tokens = reference_embed(backend.model, tok, texts, sz.ref_embed_batch, MAX_LEN)
    dev.sync()
    ref_s = time.perf_counter() - t
    cos = np.sum(vectors * ref_vec, 1) / (
        np.linalg.norm(vectors, axis=1) * np.linalg.norm(ref_vec, axis=1)
    )
    out["embed"] = {
        "backend_load_s": r3(load_s),
        "rows": stats["prompts"],
        "tokens": stats["tokens"],
        "pass_s": r3(embed_s),
        "engine_s": r3(stats["engine_s"]),
        "tokens_per_s": round(stats["tokens"] / embed_s, 1),
        "mfu": mfu(flops_per_token * stats["tokens"], embed_s, peak),
        "rows_rejected": rejected,
        "reference_batched_loop": {
            "how": "DEITA's embedder loop: full causal LM forward, output_hidden_states, "
            f"batches of {sz.ref_embed_batch} sorted by length",
            "seconds": r3(ref_s),
            "tokens_per_s": round(ref_tokens / ref_s, 1),
            "min_cosine_vs_ours": float(np.min(cos)),
        },
        "ratios": {"reference_over_ours": round(ref_s / embed_s, 2)},
    }
    backend.close()
    del embedder, backend
    dev.free()
    out["peak_gpu_memory_gib"] = dev.peak_memory_gib()
    out["ok"] = bool(
        score["rows_rejected"] == 0
        and out["embed"]["rows_rejected"] == 0
        and np.isfinite(vectors).all()
    )
    return out


# ------------------------------------------------------------------------------------------
# Part 3: the SFT step


class TorchEngine:
    """Plain-torch stand-in for the DeepSpeed engine the project's step function is given.

    The step function calls ``engine(**inputs)`` (the forward pass, here under bf16
    autocast over fp32 weights); the worker loop calls ``engine.backward(loss)`` and
    ``engine.step()`` (deita_ray/training/loop.py), here ``loss.backward()``, gradient
    clipping at 1.0 and AdamW, as the project's DeepSpeed config does.
    """

    def __init__(self, model: Any, optimizer: Any, device: Any, clip: float = 1.0):
        import torch

        self.torch = torch
        self.module = model
        self.optimizer = optimizer
        self.device = device
        self.clip = clip

    def __call__(self, **inputs: Any) -> Any:
        with self.torch.autocast(device_type=self.device.type, dtype=self.torch.bfloat16):
            return self.module(**inputs)

    def backward(self, loss: Any) -> None:
        loss.backward()

    def step(self) -> None:
        self.torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def part_train(
    sz: Sizes, dev: Device, model: ModelInfo, peak: float | None, log: Callable[[dict], None]
) -> dict:
    """SFT steps with plain torch on one device: expected ~40 s on one H200.

    About 10 s to load the model in fp32 and tokenise 160 conversations of 2,048 tokens;
    2 warm-up and 8 timed steps of 16 x 2048 tokens, about 0.5-1 s each at 40 % MFU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tc = TrainingConfig()
    n_rows = sz.train_batch * (sz.train_warmup + sz.train_steps)
    # Conversations long enough to fill the sequence, labels on assistant tokens only.
    # Word counts for the on-the-fly tokenizer (about 4 tokens per word of these texts).
    lengths = (max(3, sz.seq // 40), max(6, sz.seq // 20), sz.seq // 8, sz.seq // 5)
    table = synthetic_rows(n_rows, 2, lengths, seed=2)
    t = time.perf_counter()
    tokenize = TokenizeSFT(model.path, "vicuna_v1.1", sz.seq)
    tokenized = tokenize(table)
    tokenize_s = time.perf_counter() - t
    rejected = [r for r in tokenized[REASON].to_pylist() if r is not None]
    if rejected:
        raise RuntimeError(f"SFT tokenisation rejected {len(rejected)} rows: {rejected[:3]}")
    lens = tokenized["num_tokens"].to_pylist()
    targets = tokenized["num_targets"].to_pylist()
    t = time.perf_counter()
    net = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).to(dev.name)
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.config.use_cache = False
    net.train()
    opt = torch.optim.AdamW(
        net.parameters(),
        lr=tc.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=tc.weight_decay,
        fused=dev.is_cuda,
    )
    engine = TorchEngine(net, opt, torch.device(dev.name))
    load_s = time.perf_counter() - t
    config = {"pad_id": int(tokenize.tokenizer.pad_token_id)}
    ids, labels = tokenized["input_ids"].to_pylist(), tokenized["labels"].to_pylist()

    def batch(k: int) -> dict:
        s = slice(k * sz.train_batch, (k + 1) * sz.train_batch)
        return {
            "input_ids": [np.asarray(x, np.int64) for x in ids[s]],
            "labels": [np.asarray(x, np.int64) for x in labels[s]],
        }

    losses, tokens, step_s = [], 0, []
    for k in range(sz.train_warmup + sz.train_steps):
        if k == sz.train_warmup:
            dev.sync()
            t_all = time.perf_counter()
        t = time.perf_counter()
        # As the worker loop: the step function, then backward and the optimizer step.
        loss, n_tokens, _ = sft_step(engine, batch(k), engine.device, config)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))  # a sync per step, as the worker loop's
        step_s.append(time.perf_counter() - t)
        if k >= sz.train_warmup:
            tokens += n_tokens
    dev.sync()
    timed_s = time.perf_counter() - t_all
    flops_per_token = 6.0 * model.train_params
    out = {
        "seq": sz.seq,
        "micro_batch": sz.train_batch,
        "warmup_steps": sz.train_warmup,
        "timed_steps": sz.train_steps,
        "rows_at_full_length": int(sum(x == sz.seq for x in lens)),
        "rows": len(lens),
        "target_share": round(sum(targets) / max(1, sum(lens)), 3),
        "tokenize_s": r3(tokenize_s),
        "load_s": r3(load_s),
        "timed_s": r3(timed_s),
        "step_s": [r3(x) for x in step_s],
        "tokens": tokens,
        "tokens_per_s": round(tokens / timed_s, 1),
        "flops_per_token": flops_per_token,
        "mfu": mfu(flops_per_token * tokens, timed_s, peak),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_gpu_memory_gib": dev.peak_memory_gib(),
        "setup": "fp32 weights, bf16 autocast, gradient checkpointing (non-reentrant), "
        "AdamW (fused on CUDA), grad clip 1.0, one micro-batch per optimizer step",
        "goal": "mfu >= 0.40 at seq 2048",
    }
    out["ok"] = bool(all(math.isfinite(x) for x in losses))
    del engine, net, opt
    dev.free()
    return out


# ------------------------------------------------------------------------------------------
# Part 4: the project's DeepSpeed engine


class PartSkipped(Exception):
    """A part that cannot run on this machine (reported as skipped, never as passed)."""


def wheel_requirements(wheel: Path) -> list[str]:
    """The unconditional requirements of a wheel (its METADATA's ``Requires-Dist`` lines without
    an environment marker or extra), as plain names."""
    import re
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    names = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:") and ";" not in line:
            names.append(re.split(r"[\s<>=!~\[(]", line.split(":", 1)[1].strip())[0])
    return names


def is_installed(name: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def ensure_deepspeed(wheels: Path | None) -> str:
    """Import deepspeed, installing it first from the wheel folder ``wheels`` when it is missing
    (``pip install --no-index --find-links``: no network). Returns how it was had.

    Raises:
        PartSkipped: it is not installed and cannot be installed from ``wheels``.
    """
    try:
        importlib.import_module("deepspeed")
        return "installed"
    except ImportError as e:
        missing = f"{type(e).__name__}: {e}"
    if wheels is None or not wheels.is_dir():
        raise PartSkipped(
            f"deepspeed cannot be imported ({missing}) and there is no wheel folder at "
            f"{wheels} to install it from (--wheels / ${WHEELS_ENV}; docs/gpu.md)"
        )
    found = sorted(wheels.glob("deepspeed-*.whl"))
    if not found:
        raise PartSkipped(
            f"deepspeed cannot be imported ({missing}); no deepspeed wheel in {wheels}"
        )
    # deepspeed itself without its dependencies (pip would re-resolve torch's own, which a
    # wheel folder of a few MB does not hold), then those of its plain requirements that this
    # environment lacks, resolved from the folder.
    needed = [r for r in wheel_requirements(found[-1]) if not is_installed(r)]
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels)]
    for cmd in ([*pip, "--no-deps", str(found[-1])], [*pip, *needed] if needed else None):
        if cmd is None:
            continue
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise PartSkipped(
                f"deepspeed could not be installed from {wheels} (python "
                f"{platform.python_version()}, {' '.join(cmd[4:])}): "
                f"{(done.stdout + done.stderr)[-1500:]}"
            )
    importlib.invalidate_caches()
    try:
        importlib.import_module("deepspeed")
    except ImportError as e:
        raise PartSkipped(f"deepspeed installed from {wheels} but not importable: {e}") from e
    return f"installed now from {wheels}"


def part_deepspeed(sz: Sizes, dev: Device, model: ModelInfo, how: str, workdir: str) -> dict:
    """The project's DeepSpeed engine on one device: expected ~60 s on one H200.

    Builds the engine with :func:`deita_ray.training.loop.build_engine` from the train loop
    config a Ray Train worker receives (:func:`train_loop_config`, ``use_gpu`` true on CUDA),
    in a one-process group instead of Ray Train's, and runs a few optimizer steps of the SFT
    step the way the worker loop does (``engine.backward``, ``engine.step``).
    """
    from deita_ray.training.loop import build_engine, single_process_group, train_loop_config
    from deita_ray.training.plan import plan_steps

    accum = 2
    t = TrainingConfig(
        use_gpu=dev.is_cuda,
        zero_stage=2,
        precision="auto",  # bf16 on GPU, fp32 on CPU: what the paper jobs get
        micro_batch_size=sz.ds_micro,
        global_batch_size=sz.ds_micro * accum,
        max_length=sz.ds_seq,
        gradient_checkpointing=True,
        learning_rate=1e-4,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        epochs=1.0,
    )
    rows = sz.ds_micro * accum * sz.ds_steps
    lengths = (max(3, sz.ds_seq // 40), max(6, sz.ds_seq // 20), sz.ds_seq // 8, sz.ds_seq // 5)
    tokenize = TokenizeSFT(model.path, "vicuna_v1.1", sz.ds_seq)
    tokenized = tokenize(synthetic_rows(rows, 2, lengths, seed=4))
    rejected = [r for r in tokenized[REASON].to_pylist() if r is not None]
    if rejected:
        raise RuntimeError(f"SFT tokenisation rejected {len(rejected)} rows: {rejected[:3]}")
    ids, labels = tokenized["input_ids"].to_pylist(), tokenized["labels"].to_pylist()
    plan = plan_steps(rows, t)
    config = train_loop_config(
        sft_step,
        t,
        model.path,
        plan,
        os.path.join(workdir, "checkpoints"),
        {"pad_id": int(tokenize.tokenizer.pad_token_id), "loss_weighting": "token"},
    )
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    out: dict[str, Any] = {"deepspeed": deepspeed.__version__, "deepspeed_from": how}
    losses, lrs, step_s = [], [], []
    with single_process_group():
        t0 = time.perf_counter()
        engine, scheduler, _ = build_engine(config)
        out["engine_s"] = r3(time.perf_counter() - t0)
        accelerator = get_accelerator().device_name()
        first = next(p for p in engine.module.parameters() if p.requires_grad)
        before = first.detach().float().cpu().clone()
        micro = 0
        for _ in range(plan.total_steps):
            t1 = time.perf_counter()
            step_loss = 0.0
            for _ in range(plan.grad_accum):
                s = slice(micro * sz.ds_micro, (micro + 1) * sz.ds_micro)
                batch = {
                    "input_ids": [np.asarray(x, np.int64) for x in ids[s]],
                    "labels": [np.asarray(x, np.int64) for x in labels[s]],
                }
                loss, _, _ = sft_step(engine, batch, engine.device, config)
                engine.backward(loss)
                lrs.append(float(scheduler.get_last_lr()[0]))
                engine.step()
                step_loss += float(loss.detach()) / plan.grad_accum
                micro += 1
            dev.sync()
            step_s.append(time.perf_counter() - t1)
            losses.append(step_loss)
        changed = float((first.detach().float().cpu() - before).abs().max())
        out.update(
            accelerator=accelerator,
            want_accelerator="cuda" if dev.is_cuda else "cpu",
            engine_device=str(engine.device),
            param_dtype=str(first.dtype),
            bf16=bool(config["ds_config"]["bf16"]["enabled"]),
            zero_stage=engine.zero_optimization_stage(),
            optimizer_steps=int(engine.global_steps),
            planned_steps=plan.total_steps,
            grad_accum=plan.grad_accum,
            micro_batch=sz.ds_micro,
            seq=sz.ds_seq,
            losses=losses,
            step_s=[r3(x) for x in step_s],
            max_weight_change=changed,
            peak_gpu_memory_gib=dev.peak_memory_gib(),
        )
        del engine, scheduler, first
    out["ok"] = bool(
        out["accelerator"] == out["want_accelerator"]
        and out["engine_device"].startswith(dev.name)
        and out["optimizer_steps"] == plan.total_steps
        and all(math.isfinite(x) for x in losses)
        and changed > 0
        and (out["param_dtype"] == "torch.bfloat16") == dev.is_cuda
    )
    out["goal"] = (
        "DeepSpeed on the accelerator of use_gpu, the planned optimizer steps, finite loss"
    )
    dev.free()
    return out


# ------------------------------------------------------------------------------------------
# Driver


def write_report(report: dict, path: Path) -> None:
    """Write the report atomically (a killed run leaves the last complete state)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def start_report(args: argparse.Namespace, out: Path) -> dict:
    """A fresh report, or for a single-part run the existing one (its other parts kept)."""
    if args.part != "all" and out.exists():
        try:
            report = json.loads(out.read_text())
            if isinstance(report.get("parts"), dict):
                return report
        except (OSError, ValueError):
            pass
    return {"check": "gpu_check", "parts": {}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", *PARTS), default="all")
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on CPU (the test suite runs this)"
    )
    ap.add_argument("--out", default=None, help="JSON path (default: see the module doc)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU")
    ap.add_argument("--commit", default=None, help="commit of the tree (default: git, if any)")
    ap.add_argument(
        "--wheels",
        default=None,
        help=f"wheel folder to install deepspeed from when it is missing (default: "
        f"${WHEELS_ENV}, else {DEFAULT_WHEELS.relative_to(REPO)}; docs/gpu.md)",
    )
    args = ap.parse_args(argv)
    wheels = Path(args.wheels or os.environ.get(WHEELS_ENV) or DEFAULT_WHEELS)

    out = Path(args.out) if args.out else (DRY_RUN_PATH if args.dry_run else RESULT_PATH)
    if args.dry_run and out.resolve() == RESULT_PATH.resolve():
        ap.error(f"a dry run never writes {RESULT_PATH}")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # stdout/stderr stay readable in a log tail
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("torch sees no CUDA GPU (use --dry-run for the CPU check)")
    sz = DRY if args.dry_run else FULL
    dev = Device("cpu" if args.dry_run else "cuda")
    peak, peak_how = peak_flops(dev, args.peak_tflops)
    parts = PARTS if args.part == "all" else (args.part,)

    report = start_report(args, out)
    report.update(
        mode="dry_run" if args.dry_run else "full",
        machine=machine_facts(dev, commit_of_tree(args.commit)),
        peak_bf16_flops=peak,
        peak_source=peak_how,
        sizes=asdict(sz),
        complete=False,
    )
    emit({"event": "start", "parts": parts, "expected_s": {p: EXPECTED_S[p] for p in parts}})
    t_run = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="deita_gpu_check_")
    model: ModelInfo | None = None
    ok = True
    try:
        for name in parts:
            t = time.perf_counter()
            try:
                # Before the model is built: a part that cannot run is skipped at once.
                ds_from = ensure_deepspeed(wheels) if name == "deepspeed" else ""
                if name != "selector" and model is None:
                    model = build_model(sz, dev, os.path.join(workdir, "model"))
                    report["model"] = {
                        **{k: v for k, v in asdict(model).items() if k != "path"},
                        "body_params": model.body_params,
                        "architecture": f"LLaMA, hidden {sz.hidden}, {sz.layers} layers, "
                        f"{sz.heads} heads, MLP {sz.intermediate}, vocab {sz.vocab}, "
                        "random weights",
                    }
                    emit({"event": "model", **report["model"]})
                if name == "selector":
                    entry = part_selector(sz, dev, emit)
                elif name == "score_embed":
                    entry = part_score_embed(sz, dev, model, peak, emit)
                elif name == "train":
                    entry = part_train(sz, dev, model, peak, emit)
                else:
                    entry = part_deepspeed(sz, dev, model, ds_from, workdir)
            except PartSkipped as e:  # not passed, not failed: said so
                entry = {"ok": None, "skipped": True, "reason": str(e)}
            except Exception as e:  # noqa: BLE001 - report it, run the next part
                entry = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
                entry["traceback"] = traceback.format_exc()[-4000:]
                dev.free()
            entry["seconds"] = r3(time.perf_counter() - t)
            entry["expected_s"] = EXPECTED_S[name]
            # Each part carries its run's facts: a --part run keeps the others' entries.
            entry["date_utc"] = report["machine"]["date_utc"]
            entry["commit"] = report["machine"]["commit"]
            if name not in ("selector", "deepspeed"):
                entry["peak_bf16_flops"] = peak
            entry["status"] = (
                "skipped" if entry.get("skipped") else ("passed" if entry.get("ok") else "failed")
            )
            ok = ok and (entry["status"] != "failed")
            report["parts"][name] = entry
            write_report(report, out)
            emit({"part": name, **entry})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["wall_s"] = r3(time.perf_counter() - t_run)
    report["complete"] = True
    statuses = {
        name: p.get("status") or ("passed" if p.get("ok") else "failed")
        for name, p in report["parts"].items()
    }
    report["ok"] = ok and all(st != "failed" for st in statuses.values())
    report["skipped"] = sorted(name for name, st in statuses.items() if st == "skipped")
    write_report(report, out)
    print(json.dumps(report, indent=1, default=str), flush=True)
    print(f"written to {out}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

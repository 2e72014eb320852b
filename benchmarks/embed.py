"""Benchmark: the ``embed`` stage vs the bare vLLM pooling engine and vs the reference way.

Same run, same Alpaca rows, same vicuna_v1.1 texts, measured one after the other:

- ``ours``: :func:`deita_ray.stages.embed.run_embed` (Ray Data + one actor + vLLM pooling
  runner), wall time from the read of ``ingest`` to the written ``embed`` folder, engine start
  included (Ray itself is started before the clock);
- ``bare``: one vLLM pooling ``LLM`` in this process, ``LLM.embed`` on the whole text list
  (engine start reported apart; the cold ratio adds it and the time a fresh process
  takes to import vLLM, which the stage's new actor pays too);
- ``reference``: HF batched forward in a plain loop, as DEITA's embedder does (batches of
  ``--ref-batch`` texts, right padding, ``output_hidden_states=True`` on the causal LM, last
  real token of the last hidden state);
- ``hf_batched``: our ``hf`` backend on the same rows.

All on ``--model`` (default: the embedded SmolLM2-135M) in fp32. Prints one JSON object with
times, rows/s, ratios and the lowest per-row cosine between methods.

Usage: ``python benchmarks/embed.py [--rows 500] [--quick] [--model PATH] [--data DIR]``
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, benchmarks/ is sys.path[0]: its select.py would shadow the stdlib module.
# Drop it and put the repository root there instead (for `benchmarks._common`, `deita_ray`).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os  # noqa: E402
import time  # noqa: E402

from benchmarks._common import (  # noqa: E402  (sets the env defaults before torch/vLLM load)
    KV_BYTES,
    MAX_LEN,
    alpaca_table,
    base_parser,
    emit,
    fresh_vllm_import_s,
    model_cfg,
    resolve_model,
    shared_data,
    time_stage,
)


def matrix(table, ids: list[str]):
    import numpy as np

    order = {rid: i for i, rid in enumerate(table["id"].to_pylist())}
    col = table["embedding"].combine_chunks()
    m = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1)
    return np.asarray(m[[order[i] for i in ids]], dtype=np.float64)


def bench_ours(path: str, table) -> tuple[float, object, dict]:
    from deita_ray.config import ActorPoolConfig, PipelineConfig
    from deita_ray.stages.embed import run_embed

    cfg = PipelineConfig()
    cfg.embed.model = model_cfg(path, "vllm")
    cfg.embed.max_length = MAX_LEN
    cfg.embed.resources = ActorPoolConfig(concurrency=1, num_cpus=1, batch_size=256)
    seconds, written, counts = time_stage("embed", run_embed, cfg, table)
    return seconds, matrix(written, table["id"].to_pylist()), counts


def bench_bare(path: str, texts: list[str]):
    import numpy as np
    from vllm import LLM
    from vllm.config import PoolerConfig

    t0 = time.perf_counter()
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=MAX_LEN,
        enforce_eager=True,
        kv_cache_memory_bytes=KV_BYTES,
        runner="pooling",
        convert="embed",
        pooler_config=PoolerConfig(pooling_type="LAST", use_activation=False),
    )
    start = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.embed(texts, use_tqdm=False)
    seconds = time.perf_counter() - t0
    emb = np.asarray([o.outputs.embedding for o in outs], dtype=np.float64)
    llm.llm_engine.engine_core.shutdown()
    return start, seconds, emb


def bench_reference(path: str, texts: list[str], batch: int):
    """DEITA's way: HF batched forward of the causal LM in a loop, last real token."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    t0 = time.perf_counter()
    for s in range(0, len(texts), batch):
        enc = tok(
            texts[s : s + batch],
            padding=True,
            truncation=True,
            max_length=MAX_LEN,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
        last = enc["attention_mask"].sum(1) - 1
        rows.append(out.hidden_states[-1][torch.arange(len(last)), last].double().numpy())
    return time.perf_counter() - t0, np.concatenate(rows)


def bench_hf_batched(path: str, table):
    from deita_ray.models.backend import load_backend
    from deita_ray.stages.embed import embed_table

    backend = load_backend(model_cfg(path, "hf"), path, "embed")
    t0 = time.perf_counter()
    out = embed_table(table, backend, MAX_LEN)
    return time.perf_counter() - t0, matrix(out, table["id"].to_pylist())


def min_cos(a, b) -> float:
    import numpy as np

    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--ref-batch", type=int, default=16, help="reference loop batch size")
    args = ap.parse_args()
    rows = 40 if args.quick else args.rows

    from transformers import AutoTokenizer

    from deita_ray.templates import render_vicuna

    path = resolve_model(args.model)
    table = alpaca_table(shared_data(args.data), rows)
    texts = [render_vicuna(m) for m in table["messages"].to_pylist()]
    tokens = sum(len(x) for x in AutoTokenizer.from_pretrained(path)(texts)["input_ids"])

    ours_s, ours, counts = bench_ours(path, table)
    bare_import = fresh_vllm_import_s()
    bare_start, bare_s, bare = bench_bare(path, texts)
    hf_s, hf = bench_hf_batched(path, table)
    ref_s, ref = bench_reference(path, texts, args.ref_batch)
    report = {
        "benchmark": "embed",
        "model": args.model,
        "dtype": "float32",
        "rows": rows,
        "tokens": tokens,
        "dim": int(ours.shape[1]),
        "cpus": os.cpu_count(),
        "counts": counts,
        "seconds": {
            "ours_stage": round(ours_s, 2),
            "bare_fresh_vllm_import": round(bare_import, 2),
            "bare_engine_start": round(bare_start, 2),
            "bare_embed": round(bare_s, 2),
            "hf_batched": round(hf_s, 2),
            "reference_loop": round(ref_s, 2),
        },
        "tokens_per_s": {
            "ours_stage": round(tokens / ours_s, 1),
            "bare_embed": round(tokens / bare_s, 1),
            "hf_batched": round(tokens / hf_s, 1),
            "reference_loop": round(tokens / ref_s, 1),
        },
        "ratios": {
            "ours_vs_bare_cold (goal >= 0.9)": round(
                (bare_import + bare_start + bare_s) / ours_s, 3
            ),
            "ours_vs_bare_embed_only": round(bare_s / ours_s, 3),
            "ours_vs_reference (goal >= 1.5)": round(ref_s / ours_s, 3),
            "bare_embed_vs_reference": round(ref_s / bare_s, 3),
            "hf_batched_vs_reference": round(ref_s / hf_s, 3),
        },
        "min_cosine": {
            "ours_vs_bare": min_cos(ours, bare),
            "ours_vs_reference": min_cos(ours, ref),
            "hf_batched_vs_reference": min_cos(hf, ref),
        },
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()

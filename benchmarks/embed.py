"""Benchmark: the ``embed`` stage vs the bare vLLM pooling engine and vs the reference way.

Same run, same Alpaca rows, same vicuna_v1.1 texts, measured in interleaved rounds (every
method once per round; each method's figure is its fastest round):

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

All on ``--model`` (default: the embedded SmolLM2-135M) in fp32. Every row's embedding must
agree (per-row cosine ours vs bare vLLM >= :data:`MIN_COS_BARE`, ours and the HF batched
forward vs the reference >= :data:`MIN_COS_REFERENCE`) and every row must be embedded, else
the run exits 1 and prints no ratio. Writes ``benchmarks/results/embed.json`` (times, tokens/s,
ratios, the lowest per-row cosines) and prints it.

Usage: ``python benchmarks/embed.py [--rows 500] [--quick] [--repeat N] [--model PATH] [--data DIR]``
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

from benchmarks._common import (  # noqa: E402
    KV_BYTES,
    MAX_LEN,
    Timed,
    alpaca_table,
    apply_model_env,
    base_parser,
    finish,
    fresh_vllm_import_s,
    interleaved,
    model_cfg,
    ratio,
    require,
    resolve_model,
    shared_data,
    time_stage,
)

apply_model_env()  # before anything loads torch or vLLM

NAME = "embed"
MIN_COS_BARE = 0.99999
"""Lowest per-row cosine allowed between the stage and the bare engine (measured 0.99999999)."""
MIN_COS_REFERENCE = 0.9999
"""Lowest per-row cosine allowed vs DEITA's HF loop (other kernels; measured 0.99999999)."""


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
    """Lowest per-row cosine between two embedding matrices of the same rows (-1 when the
    shapes differ)."""
    import numpy as np

    if a.shape != b.shape:
        return -1.0
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--ref-batch", type=int, default=16, help="reference loop batch size")
    args = ap.parse_args()
    rows = 40 if args.quick else args.rows
    repeat = args.repeat or (1 if args.quick else 3)

    from transformers import AutoTokenizer

    from deita_ray.templates import render_vicuna

    path = resolve_model(args.model)
    table = alpaca_table(shared_data(args.data), rows)
    texts = [render_vicuna(m) for m in table["messages"].to_pylist()]
    tokens = sum(len(x) for x in AutoTokenizer.from_pretrained(path)(texts)["input_ids"])
    load_start = list(os.getloadavg())

    def ours() -> Timed:
        seconds, emb, counts = bench_ours(path, table)
        return Timed(seconds, (emb, counts))

    def bare() -> Timed:
        imp = fresh_vllm_import_s()
        start, seconds, emb = bench_bare(path, texts)
        return Timed(
            imp + start + seconds, {"import": imp, "start": start, "embed": seconds, "e": emb}
        )

    rounds = interleaved(
        {
            "ours_stage": ours,
            "bare_cold": bare,
            "hf_batched": lambda: Timed(*bench_hf_batched(path, table)),
            "reference_loop": lambda: Timed(*bench_reference(path, texts, args.ref_batch)),
        },
        repeat,
    )
    ours_out = rounds["ours_stage"]["outputs"]
    bare_out = rounds["bare_cold"]["outputs"]
    refs = rounds["reference_loop"]["outputs"]
    cos = {
        "ours_vs_bare": min(min_cos(o[0], b["e"]) for o in ours_out for b in bare_out),
        "ours_vs_reference": min(min_cos(o[0], r) for o in ours_out for r in refs),
        "hf_batched_vs_reference": min(
            min_cos(h, r) for h in rounds["hf_batched"]["outputs"] for r in refs
        ),
    }
    counts = ours_out[0][1]
    require(
        NAME,
        {
            "every_row_embedded": all(o[1]["rows_out"] == rows for o in ours_out),
            "ours_equals_bare_engine": cos["ours_vs_bare"] >= MIN_COS_BARE,
            "ours_equals_reference": cos["ours_vs_reference"] >= MIN_COS_REFERENCE,
            "hf_batched_equals_reference": cos["hf_batched_vs_reference"] >= MIN_COS_REFERENCE,
        },
        {"min_cosine": cos, "limits": [MIN_COS_BARE, MIN_COS_REFERENCE], "counts": counts},
    )
    mins = {k: v["min_s"] for k, v in rounds.items()}
    part = {k: min(b[k] for b in bare_out) for k in ("import", "start", "embed")}
    ours_s, ref_s = mins["ours_stage"], mins["reference_loop"]
    report = {
        "quick": args.quick,
        "model": args.model,
        "dtype": "float32",
        "rows": rows,
        "tokens": tokens,
        "dim": int(ours_out[0][0].shape[1]),
        "rounds": repeat,
        "counts": counts,
        "seconds_min": {
            **{k: round(v, 2) for k, v in mins.items()},
            **{f"bare_{k}": round(v, 2) for k, v in part.items()},
        },
        "seconds_all_rounds": {k: v["runs_s"] for k, v in rounds.items()},
        "tokens_per_s": {
            "ours_stage": round(tokens / ours_s, 1),
            "bare_embed": round(tokens / part["embed"], 1),
            "hf_batched": round(tokens / mins["hf_batched"], 1),
            "reference_loop": round(tokens / ref_s, 1),
        },
        "ratios": {
            "ours_vs_bare_cold (goal >= 0.9)": ratio(mins["bare_cold"], ours_s, 3),
            "ours_vs_bare_embed_only": ratio(part["embed"], ours_s, 3),
            "ours_vs_reference (goal >= 1.5)": ratio(ref_s, ours_s, 3),
            "bare_embed_vs_reference": ratio(ref_s, part["embed"], 3),
            "hf_batched_vs_reference": ratio(ref_s, mins["hf_batched"], 3),
        },
        "min_cosine": cos,
        "machine": {"load_avg_at_start": load_start},
    }
    r = report["ratios"]
    report["readme"] = [
        {
            "setting": f"the same {rows} Alpaca rows, {args.model} fp32",
            "result": (
                f"stage at {r['ours_vs_bare_cold (goal >= 0.9)']}x the bare vLLM pooling engine "
                f"(cold, as above); {r['ours_vs_reference (goal >= 1.5)']}x DEITA's HF batched "
                f"loop; per-row cosine to bare vLLM >= {cos['ours_vs_bare']:.8f}, to the "
                f"reference >= {cos['ours_vs_reference']:.8f} (min of {repeat} interleaved rounds)"
            ),
        }
    ]
    finish(NAME, report, args.out)


if __name__ == "__main__":
    main()

"""Benchmark: the ``eval`` stage's likelihood pass vs the bare vLLM engine and a per-sample
transformers loop, on the same AlpacaEval rows and the same token sequences.

- ``ours``: :func:`deita_ray.stages.eval.run_eval` with ``metrics: [likelihood]`` (the set read
  by the pool reader, Ray Data + one actor + vLLM prompt log-probabilities), wall time from the
  read of the set to the written ``eval/<set>/likelihood`` folder, engine start included (Ray
  itself is started before the clock);
- ``bare``: one vLLM ``LLM`` in this process doing the same requests (``prompt_logprobs=0``,
  one request per row, one ``generate`` call); cold = a fresh process's vLLM import + engine
  start + the call, as the stage's new actor pays them;
- ``hf_loop``: one transformers forward per row (fp32, ``log_softmax`` over the answer
  positions), the way an evaluation script without batching does it (model load excluded).

Values must agree to 1e-4 (per-row mean NLL, ours vs bare and vs the loop): when they do not,
the script prints the differences, no ratio, and exits with status 1. Goals: ours >= 0.9x the
bare engine (cold), >= 1.5x the transformers loop.

Usage: ``python benchmarks/eval.py [--rows 200] [--quick] [--model PATH] [--data DIR]``;
writes ``benchmarks/results/eval.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, benchmarks/ is sys.path[0]: its select.py would shadow the stdlib module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from benchmarks._common import (  # noqa: E402  (sets the env defaults before torch/vLLM load)
    KV_BYTES,
    MAX_LEN,
    alpaca_table,
    base_parser,
    finish,
    fresh_vllm_import_s,
    model_cfg,
    require,
    resolve_model,
    shared_data,
    time_stage,
)

TOLERANCE = 1e-4
ALPACA_EVAL = "alpaca_eval/results/gpt4_1106_preview/model_outputs.json"


def sequences(path: str, records: list[dict]) -> tuple[list[list[int]], list[int]]:
    """The token sequences and answer starts every method scores (the stage's own rendering)."""
    from transformers import AutoTokenizer

    from deita_ray.evaluation import likelihood_texts, likelihood_tokens

    tok = AutoTokenizer.from_pretrained(path)
    seqs, starts = [], []
    for r in records:
        msgs = [
            {"role": "user", "content": r["instruction"]},
            {"role": "assistant", "content": r["output"]},
        ]
        p, f = likelihood_texts(msgs, "chat_template", tok)
        ids, start = likelihood_tokens(p, f, tok)
        seqs.append(ids)
        starts.append(start)
    return seqs, starts


def bench_ours(path: str, set_file: Path, rows: int, pool) -> tuple[float, list[float], dict]:
    import dataclasses

    from deita_ray.config import ActorPoolConfig, EvalSetConfig, PipelineConfig
    from deita_ray.stages.eval import run_eval

    cfg = PipelineConfig(stages=["eval"])
    cfg.eval.model = dataclasses.replace(model_cfg(path, "vllm"), path=path)
    cfg.eval.sets = [EvalSetConfig(name="ae", paths=[str(set_file)], format="alpaca", limit=rows)]
    cfg.eval.contamination_check = False
    cfg.eval.resources = ActorPoolConfig(concurrency=1, num_cpus=1, batch_size=64)
    seconds, written, counts = time_stage("eval", run_eval, cfg, pool)
    written = written.sort_by("seq")
    return seconds, written["nll_mean"].to_pylist(), counts


def bench_bare(path: str, seqs: list[list[int]], starts: list[int]) -> tuple[float, float, list]:
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=MAX_LEN,
        enforce_eager=True,
        kv_cache_memory_bytes=KV_BYTES,
        seed=0,
    )
    start = time.perf_counter() - t0
    sp = SamplingParams(
        max_tokens=1, temperature=0.0, prompt_logprobs=0, flat_logprobs=True, detokenize=False
    )
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], sp, use_tqdm=False)
    gen = time.perf_counter() - t0
    means = []
    for o, s, b in zip(outs, seqs, starts, strict=True):
        plp = o.prompt_logprobs
        vals = [plp.logprobs[plp.start_indices[j]] for j in range(b, len(s))]
        means.append(float(-np.sum(vals) / len(vals)))
    llm.llm_engine.engine_core.shutdown()
    return start, gen, means


def bench_hf_loop(path: str, seqs: list[list[int]], starts: list[int]) -> tuple[float, list]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    means = []
    t0 = time.perf_counter()
    for s, b in zip(seqs, starts, strict=True):
        ids = torch.tensor([s])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, b - 1 : len(s) - 1].float(), -1)
        tgt = ids[0, b:]
        means.append(float(-logp.gather(1, tgt[:, None]).sum() / len(tgt)))
    return time.perf_counter() - t0, means


def main() -> int:
    ap = base_parser(__doc__)
    ap.set_defaults(rows=200)
    args = ap.parse_args()
    rows = 24 if args.quick else args.rows

    path = resolve_model(args.model)
    data = shared_data(args.data)
    set_file = data / ALPACA_EVAL
    records = json.loads(set_file.read_text())[:rows]
    seqs, starts = sequences(path, records)
    if max(map(len, seqs)) > MAX_LEN - 1:
        raise SystemExit(f"a row is longer than {MAX_LEN - 1} tokens; lower --rows")

    ours_s, ours, counts = bench_ours(path, set_file, rows, alpaca_table(data, 1))
    bare_import = fresh_vllm_import_s()
    bare_start, bare_gen, bare = bench_bare(path, seqs, starts)
    hf_s, hf = bench_hf_loop(path, seqs, starts)

    diffs = {
        "ours_and_bare": max(abs(a - b) for a, b in zip(ours, bare, strict=True)),
        "ours_and_hf_loop": max(abs(a - b) for a, b in zip(ours, hf, strict=True)),
    }
    tokens = sum(len(s) for s in seqs)
    report = {
        "model": args.model,
        "dtype": "float32",
        "rows": rows,
        "tokens": tokens,
        "answer_tokens": sum(len(s) - b for s, b in zip(seqs, starts, strict=True)),
        "cpus": os.cpu_count(),
        "counts": counts,
        "max_abs_nll_mean_diff": diffs,
        "seconds": {
            "ours_stage": round(ours_s, 2),
            "bare_fresh_vllm_import": round(bare_import, 2),
            "bare_engine_start": round(bare_start, 2),
            "bare_generate": round(bare_gen, 2),
            "hf_loop": round(hf_s, 2),
        },
    }
    # Equal values first: a failed check prints no ratio, writes no result, exits 1.
    require("eval", {f"{k} <= {TOLERANCE}": v <= TOLERANCE for k, v in diffs.items()}, report)
    report["tokens_per_s"] = {
        "ours_stage": round(tokens / ours_s, 1),
        "bare_generate": round(tokens / bare_gen, 1),
        "hf_loop": round(tokens / hf_s, 1),
    }
    report["ratios"] = {
        "ours_vs_bare_cold (goal >= 0.9)": round((bare_import + bare_start + bare_gen) / ours_s, 3),
        "ours_vs_bare_generate_only": round(bare_gen / ours_s, 3),
        "ours_vs_hf_loop (goal >= 1.5)": round(hf_s / ours_s, 3),
    }
    report["quick"] = bool(args.quick)
    report["readme"] = readme_rows(report)
    finish("eval", report, args.out)
    return 0


def readme_rows(report: dict) -> list[dict]:
    """The README table's row, composed from the run's own numbers."""
    sec, ratios = report["seconds"], report["ratios"]
    diffs = report["max_abs_nll_mean_diff"]
    return [
        {
            "setting": (
                f"eval likelihood: {report['rows']} AlpacaEval GPT-4 Turbo answers "
                f"({report['tokens']} tokens), {report['model']} {report['dtype']}"
            ),
            "result": (
                f"stage {sec['ours_stage']} s: "
                f"{ratios['ours_vs_bare_cold (goal >= 0.9)']}x the bare vLLM engine cold "
                f"(import {sec['bare_fresh_vllm_import']} s + start {sec['bare_engine_start']} s"
                f" + generate {sec['bare_generate']} s; goal >= 0.9x), "
                f"{ratios['ours_vs_hf_loop (goal >= 1.5)']}x a per-row transformers loop "
                f"({sec['hf_loop']} s, model load excluded; goal >= 1.5x); largest per-row "
                f"NLL difference {diffs['ours_and_bare']:.1g} vs bare, "
                f"{diffs['ours_and_hf_loop']:.1g} vs the loop"
            ),
        }
    ]


if __name__ == "__main__":
    sys.exit(main())

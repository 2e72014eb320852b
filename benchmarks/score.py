"""Benchmark: the ``score`` stage vs the bare vLLM engine and vs the reference (DEITA) way.

Same run, same Alpaca rows, same prompts (complexity + quality of every row), measured in
interleaved rounds (every method once per round; each method's figure is its fastest round):

- ``ours``: :func:`deita_ray.stages.score.run_score` (Ray Data + one actor + vLLM), wall time
  from the read of ``ingest`` to the written ``score`` folder, engine start included (Ray
  itself is started before the clock);
- ``bare``: one vLLM ``LLM`` in this process, ``LLM.generate`` on the whole prompt list with
  the same sampling parameters (engine start reported apart; the cold ratio adds it and the
  time a fresh process takes to import vLLM, which the stage's new actor pays too);
- ``reference``: one HF ``generate(max_new_tokens=1, output_scores=True)`` call per prompt, as
  the DEITA scorer does, then the same formula on the six digit logits;
- ``hf_batched``: our ``hf`` backend (batched forward, right padding) on the same rows.

All on the model given by ``--model`` (default: the embedded SmolLM2-135M) in fp32. The scores
must agree (ours vs bare vLLM within :data:`TOL_BARE`, ours and the HF batched forward vs the
reference within :data:`TOL_REFERENCE`) and every row must be scored, else the run exits 1 and
prints no ratio. Writes ``benchmarks/results/score.json`` (times, prompts/s, ratios, the
largest score differences) and prints it.

Usage: ``python benchmarks/score.py [--rows 500] [--quick] [--repeat N] [--model PATH] [--data DIR]``
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

NAME = "score"
TOL_BARE = 1e-5
"""Largest score difference allowed between the stage and the bare engine (same engine, same
prompts; measured 0)."""
TOL_REFERENCE = 1e-3
"""Largest score difference allowed vs DEITA's per-sample HF generate (other kernels; measured
2.5e-5 on 500 rows)."""


def prompt_list(table) -> tuple[list[tuple[str, str]], list[str]]:
    """(row id, kind) keys and prompt strings: every turn's complexity and quality prompt."""
    from deita_ray.data.formats import extract_turns
    from deita_ray.templates import complexity_prompt, quality_prompt

    keys, prompts = [], []
    for rid, msgs in zip(table["id"].to_pylist(), table["messages"].to_pylist(), strict=True):
        for t, (u, r) in enumerate(extract_turns(msgs)):
            keys += [(rid, f"complexity_scores:{t}"), (rid, f"quality_scores:{t}")]
            prompts += [complexity_prompt(u), quality_prompt(u, r)]
    return keys, prompts


def table_scores(table) -> dict:
    out = {}
    for row in table.select(["id", "complexity_scores", "quality_scores"]).to_pylist():
        for col in ("complexity_scores", "quality_scores"):
            for t, s in enumerate(row[col]):
                out[(row["id"], f"{col}:{t}")] = s
    return out


def bench_ours(path: str, table, batch_size: int) -> tuple[float, dict, dict]:
    from deita_ray.config import ActorPoolConfig, PipelineConfig
    from deita_ray.stages.score import run_score

    cfg = PipelineConfig()
    cfg.score.complexity_model = model_cfg(path, "vllm")
    cfg.score.quality_model = model_cfg(path, "vllm")
    cfg.score.resources = ActorPoolConfig(concurrency=1, num_cpus=1, batch_size=batch_size)
    seconds, written, counts = time_stage("score", run_score, cfg, table)
    return seconds, table_scores(written), counts


def bench_bare(path: str, keys, prompts) -> tuple[float, float, dict]:
    from vllm import LLM, SamplingParams

    from deita_ray.models.vllm_backend import digit_logprobs
    from deita_ray.scoring import expected_score, resolve_digit_ids

    t0 = time.perf_counter()
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=MAX_LEN,
        enforce_eager=True,
        kv_cache_memory_bytes=KV_BYTES,
        logprobs_mode="processed_logprobs",
        seed=0,
    )
    start = time.perf_counter() - t0
    digits = resolve_digit_ids(llm.get_tokenizer())
    sp = SamplingParams(
        max_tokens=1, temperature=0, allowed_token_ids=digits, logprobs=6, detokenize=False
    )
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    gen = time.perf_counter() - t0
    scores = expected_score(digit_logprobs(outs, digits))
    llm.llm_engine.engine_core.shutdown()
    return start, gen, dict(zip(keys, scores.tolist(), strict=True))


def bench_reference(path: str, keys, prompts) -> tuple[float, dict]:
    """One ``generate`` call per prompt, as the DEITA scorer does (fp32, CPU)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deita_ray.scoring import expected_score, resolve_digit_ids

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    digits = resolve_digit_ids(tok)
    logits = np.empty((len(prompts), 6))
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=1,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=tok.eos_token_id,
            )
        logits[i] = out.scores[0][0, digits].double().numpy()
    seconds = time.perf_counter() - t0
    return seconds, dict(zip(keys, expected_score(logits).tolist(), strict=True))


def bench_hf_batched(path: str, table) -> tuple[float, dict]:
    from deita_ray.models.backend import load_backend
    from deita_ray.scoring import resolve_digit_ids
    from deita_ray.stages.score import score_table

    backend = load_backend(model_cfg(path, "hf"), path, "score")
    digits = resolve_digit_ids(backend.tokenizer)
    t0 = time.perf_counter()
    out = score_table(table, backend, digits)
    return time.perf_counter() - t0, table_scores(out)


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the same prompts (inf when the prompt sets differ)."""
    if a.keys() != b.keys():
        return float("inf")
    return max((abs(a[k] - b[k]) for k in a), default=0.0)


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--batch-size", type=int, default=256, help="rows per stage batch")
    args = ap.parse_args()
    rows = 40 if args.quick else args.rows
    repeat = args.repeat or (1 if args.quick else 3)

    path = resolve_model(args.model)
    table = alpaca_table(shared_data(args.data), rows)
    keys, prompts = prompt_list(table)
    load_start = list(os.getloadavg())

    def ours() -> Timed:
        seconds, scores, counts = bench_ours(path, table, args.batch_size)
        return Timed(seconds, (scores, counts))

    def bare() -> Timed:
        imp = fresh_vllm_import_s()
        start, gen, scores = bench_bare(path, keys, prompts)
        return Timed(imp + start + gen, {"import": imp, "start": start, "gen": gen, "s": scores})

    rounds = interleaved(
        {
            "ours_stage": ours,
            "bare_cold": bare,
            "hf_batched": lambda: Timed(*bench_hf_batched(path, table)),
            "reference_per_sample": lambda: Timed(*bench_reference(path, keys, prompts)),
        },
        repeat,
    )
    ours_out = rounds["ours_stage"]["outputs"]
    bare_out = rounds["bare_cold"]["outputs"]
    diffs = {
        "ours_vs_bare": max(max_diff(o[0], b["s"]) for o in ours_out for b in bare_out),
        "ours_vs_reference": max(
            max_diff(o[0], r) for o in ours_out for r in rounds["reference_per_sample"]["outputs"]
        ),
        "hf_batched_vs_reference": max(
            max_diff(h, r)
            for h in rounds["hf_batched"]["outputs"]
            for r in rounds["reference_per_sample"]["outputs"]
        ),
    }
    counts = ours_out[0][1]
    require(
        NAME,
        {
            "every_row_scored": all(o[1]["rows_out"] == rows for o in ours_out),
            "ours_equals_bare_engine": diffs["ours_vs_bare"] <= TOL_BARE,
            "ours_equals_reference": diffs["ours_vs_reference"] <= TOL_REFERENCE,
            "hf_batched_equals_reference": diffs["hf_batched_vs_reference"] <= TOL_REFERENCE,
        },
        {"max_abs_score_diff": diffs, "tolerances": [TOL_BARE, TOL_REFERENCE], "counts": counts},
    )
    n = len(prompts)
    mins = {k: v["min_s"] for k, v in rounds.items()}
    part = {k: min(b[k] for b in bare_out) for k in ("import", "start", "gen")}
    ours_s, ref_s = mins["ours_stage"], mins["reference_per_sample"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    report = {
        "quick": args.quick,
        "model": args.model,
        "dtype": "float32",
        "rows": rows,
        "prompts": n,
        "prompt_tokens": sum(len(x) for x in tok(prompts)["input_ids"]),
        "rounds": repeat,
        "counts": counts,
        "seconds_min": {
            **{k: round(v, 2) for k, v in mins.items()},
            **{f"bare_{k}": round(v, 2) for k, v in part.items()},
        },
        "seconds_all_rounds": {k: v["runs_s"] for k, v in rounds.items()},
        "prompts_per_s": {
            "ours_stage": round(n / ours_s, 2),
            "bare_generate": round(n / part["gen"], 2),
            "hf_batched": round(n / mins["hf_batched"], 2),
            "reference_per_sample": round(n / ref_s, 2),
        },
        "ratios": {
            "ours_vs_bare_cold (goal >= 0.9)": ratio(mins["bare_cold"], ours_s, 3),
            "ours_vs_bare_generate_only": ratio(part["gen"], ours_s, 3),
            "ours_vs_reference (goal >= 2)": ratio(ref_s, ours_s, 3),
            "bare_generate_vs_reference": ratio(ref_s, part["gen"], 3),
            "hf_batched_vs_reference": ratio(ref_s, mins["hf_batched"], 3),
        },
        "max_abs_score_diff": diffs,
        "machine": {"load_avg_at_start": load_start},
    }
    r = report["ratios"]
    report["readme"] = [
        {
            "setting": f"{rows} Alpaca rows ({n} prompts), {args.model} fp32",
            "result": (
                f"stage at {r['ours_vs_bare_cold (goal >= 0.9)']}x the bare vLLM engine (cold: "
                f"vLLM import, engine start and generate, for both); "
                f"{r['ours_vs_reference (goal >= 2)']}x DEITA's one-`generate`-per-sample scorer,"
                f" where bare vLLM itself is {r['bare_generate_vs_reference']}x; scores within "
                f"{diffs['ours_vs_bare']:.1g} of bare vLLM's and {diffs['ours_vs_reference']:.1g}"
                f" of the reference's (min of {repeat} interleaved rounds)"
            ),
        }
    ]
    finish(NAME, report, args.out)


if __name__ == "__main__":
    main()

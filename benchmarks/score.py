"""Benchmark: the ``score`` stage vs the bare vLLM engine and vs the reference (DEITA) way.

Same run, same Alpaca rows, same prompts (complexity + quality of every row), measured one
after the other on the same machine:

- ``ours``: :func:`deita_ray.stages.score.run_score` (Ray Data + one actor + vLLM), wall time
  from the read of ``ingest`` to the written ``score`` folder, engine start included (Ray
  itself is started before the clock);
- ``bare``: one vLLM ``LLM`` in this process, ``LLM.generate`` on the whole prompt list with
  the same sampling parameters (engine start reported apart; the cold ratio adds it and the
  time a fresh process takes to import vLLM, which the stage's new actor pays too);
- ``reference``: one HF ``generate(max_new_tokens=1, output_scores=True)`` call per prompt, as
  the DEITA scorer does, then the same formula on the six digit logits;
- ``hf_batched``: our ``hf`` backend (batched forward, right padding) on the same rows.

All on the model given by ``--model`` (default: the embedded SmolLM2-135M) in fp32. Prints one
JSON object with times, prompts/s, ratios and the largest score differences between methods.

``--kinds`` adds the registry's other scorer kinds (``perplexity``, ``ifd``, ``rating``,
``length``; ``all`` for every one), each run alone, side by side with the bare vLLM engine doing
the same requests (the requests the kind builds, sent by one ``LLM.generate``; cold for both:
fresh vLLM import, engine start and the requests), and the values the stage wrote compared with
those the same fold computes from the bare engine's answers. ``length`` runs no model: its
stage time and rows/s are reported alone.

Usage: ``python benchmarks/score.py [--rows 500] [--quick] [--model PATH] [--data DIR]
[--kinds deita,perplexity,ifd,rating,length | all]``
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


NEW_KINDS = ("perplexity", "ifd", "rating", "length")


def kind_cfg(path: str, kind: str, batch_size: int):
    """A score config with one scorer of ``kind`` on the benchmark model (vLLM, fp32)."""
    from deita_ray.config import ActorPoolConfig, PipelineConfig, ScorerConfig

    cfg = PipelineConfig()
    model = model_cfg(path, "vllm")
    cfg.score.scorers = [ScorerConfig(kind=kind, model=model)]
    if kind == "rating":
        cfg.score.scorers[0].scale = 5
    cfg.score.resources = ActorPoolConfig(concurrency=1, num_cpus=1, batch_size=batch_size)
    return cfg


def bare_kind(path: str, cfg, table) -> tuple[dict, dict]:
    """The kind's requests over the whole table on a bare vLLM engine; the same fold on its
    answers. Returns (seconds: import/start/requests, the kind's columns by row id)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from deita_ray.data.formats import extract_turns
    from deita_ray.models.vllm_backend import digit_logprobs, prompt_token_logprobs
    from deita_ray.scorers import get_kind, resolve_scorers
    from deita_ray.scorers.base import BatchView, LabelRequest
    from deita_ray.scoring import expected_score, fit_prompt

    seconds = {"fresh_vllm_import": fresh_vllm_import_s()}
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
    seconds["engine_start"] = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    spec = resolve_scorers(cfg)[0]
    kind = get_kind(spec.kind)
    spec = kind.resolve_labels(spec, tok)
    scorer = kind.bind(spec, tok, MAX_LEN - 1)
    turns = [extract_turns(m) for m in table["messages"].to_pylist()]
    view = BatchView(len(turns), turns, lambda *a: None, lambda i: True)
    reqs = scorer.prepare(view)
    t0 = time.perf_counter()
    if reqs and isinstance(reqs[0], LabelRequest):
        for r in reqs:
            r.ids, r.cut = fit_prompt(tok, r.spec, MAX_LEN - 1)
        labels = list(reqs[0].label_ids)
        sp = SamplingParams(
            max_tokens=1,
            temperature=0,
            allowed_token_ids=labels,
            logprobs=len(labels),
            detokenize=False,
        )
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=r.ids) for r in reqs], sp, use_tqdm=False
        )
        for r, v in zip(
            reqs, expected_score(digit_logprobs(outs, labels), len(labels)), strict=True
        ):
            r.score = float(v)
    else:
        sp = SamplingParams(
            max_tokens=1, temperature=0, prompt_logprobs=0, flat_logprobs=True, detokenize=False
        )
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=r.seq) for r in reqs], sp, use_tqdm=False
        )
        for r, o in zip(reqs, outs, strict=True):
            r.values = prompt_token_logprobs(o, r.seq, r.start)
    seconds["requests"] = time.perf_counter() - t0
    llm.llm_engine.engine_core.shutdown()
    columns, _ = scorer.finish(view, reqs)
    ids = table["id"].to_pylist()
    values = {name: dict(zip(ids, col.to_pylist(), strict=True)) for name, col in columns.items()}
    return seconds, values


def _diff(a, b) -> float:
    """Largest absolute difference of two values (numbers or per-turn lists; None == None)."""
    if isinstance(a, list) or isinstance(b, list):
        return max((_diff(x, y) for x, y in zip(a or [], b or [], strict=True)), default=0.0)
    if a is None or b is None:
        return 0.0 if a is b else float("inf")
    return abs(float(a) - float(b))


def bench_kind(path: str, kind: str, table, batch_size: int) -> dict:
    """One kind alone: the stage vs the bare engine, cold for both, and value agreement."""
    from deita_ray.stages.score import run_score

    cfg = kind_cfg(path, kind, batch_size)
    ours_s, written, counts = time_stage("score", run_score, cfg, table)
    out = {"counts": counts, "seconds": {"ours_stage": round(ours_s, 2)}}
    out["rows_per_s"] = {"ours_stage": round(table.num_rows / ours_s, 2)}
    if kind == "length":
        return out
    bare_s, bare = bare_kind(path, cfg, table)
    cold = sum(bare_s.values())
    out["seconds"].update({f"bare_{k}": round(v, 2) for k, v in bare_s.items()})
    rows = {r["id"]: r for r in written.to_pylist()}
    out["ratios"] = {
        "ours_vs_bare_cold (goal >= 0.9)": round(cold / ours_s, 3),
        "ours_vs_bare_requests_only": round(bare_s["requests"] / ours_s, 3),
    }
    out["max_abs_diff_vs_bare"] = {
        col: max(_diff(rows[i][col], v) for i, v in vals.items()) for col, vals in bare.items()
    }
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), "methods scored different prompts"
    return max(abs(a[k] - b[k]) for k in a)


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--batch-size", type=int, default=256, help="rows per stage batch")
    ap.add_argument(
        "--kinds",
        default="deita",
        help="comma list of deita, perplexity, ifd, rating, length, or 'all'",
    )
    args = ap.parse_args()
    rows = 40 if args.quick else args.rows
    kinds = ["deita", *NEW_KINDS] if args.kinds == "all" else args.kinds.split(",")
    unknown = [k for k in kinds if k not in ("deita", *NEW_KINDS)]
    if unknown:
        ap.error(f"--kinds: unknown {unknown}")

    path = resolve_model(args.model)
    table = alpaca_table(shared_data(args.data), rows)
    report: dict = {
        "benchmark": "score",
        "model": args.model,
        "dtype": "float32",
        "rows": rows,
        "cpus": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
    }
    if "deita" in kinds:
        report.update(bench_deita(path, table, rows, args.batch_size))
    for kind in kinds:
        if kind != "deita":
            report.setdefault("kinds", {})[kind] = bench_kind(path, kind, table, args.batch_size)
    report["load_average_at_end"] = list(os.getloadavg())
    emit(report, args.out)


def bench_deita(path: str, table, rows: int, batch_size: int) -> dict:
    """The DEITA pair: stage, bare engine, HF batched and DEITA's per-sample way."""
    keys, prompts = prompt_list(table)
    ours_s, ours, counts = bench_ours(path, table, batch_size)
    bare_import = fresh_vllm_import_s()
    bare_start, bare_gen, bare = bench_bare(path, keys, prompts)
    hf_s, hf = bench_hf_batched(path, table)
    ref_s, ref = bench_reference(path, keys, prompts)
    n = len(prompts)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return {
        "prompts": n,
        "prompt_tokens": sum(len(x) for x in tok(prompts)["input_ids"]),
        "counts": counts,
        "seconds": {
            "ours_stage": round(ours_s, 2),
            "bare_fresh_vllm_import": round(bare_import, 2),
            "bare_engine_start": round(bare_start, 2),
            "bare_generate": round(bare_gen, 2),
            "hf_batched": round(hf_s, 2),
            "reference_per_sample": round(ref_s, 2),
        },
        "prompts_per_s": {
            "ours_stage": round(n / ours_s, 2),
            "bare_generate": round(n / bare_gen, 2),
            "hf_batched": round(n / hf_s, 2),
            "reference_per_sample": round(n / ref_s, 2),
        },
        "ratios": {
            "ours_vs_bare_cold (goal >= 0.9)": round(
                (bare_import + bare_start + bare_gen) / ours_s, 3
            ),
            "ours_vs_bare_generate_only": round(bare_gen / ours_s, 3),
            "ours_vs_reference (goal >= 2)": round(ref_s / ours_s, 3),
            "bare_generate_vs_reference": round(ref_s / bare_gen, 3),
            "hf_batched_vs_reference": round(ref_s / hf_s, 3),
        },
        "max_abs_score_diff": {
            "ours_vs_bare": max_diff(ours, bare),
            "ours_vs_reference": max_diff(ours, ref),
            "hf_batched_vs_reference": max_diff(hf, ref),
        },
    }


if __name__ == "__main__":
    main()

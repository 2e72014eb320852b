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

With ``--kinds perplexity,ifd,rating`` (any of :data:`KINDS`) it measures the other model
kinds of the scorer registry instead, each on its own, on the same rows:

- ``ours``: ``run_score`` with ``score.scorers`` = that one kind on the model (Ray Data + one
  actor + vLLM, timed as above);
- ``bare``: one vLLM ``LLM`` in this process sending the same requests with vLLM's own API —
  for ``perplexity`` / ``ifd`` the prompt-log-probability requests (``prompt_logprobs=0``) on
  the same token sequences, built here as docs/scoring.md says the kinds build them (context
  prefix, ``{instruction}\\n`` + response per turn, the response alone after the prefix for
  IFD); for ``rating`` the default rubric's prompts and the label log-probabilities of "1".."5"
  — and the same formulas (mean NLL per response token, IFD = NLL given the instruction / NLL
  alone, the expected label value), computed here from vLLM's outputs, not by our scorers.

Both sides cold (the bare side adds the time a fresh process takes to import vLLM and its
engine start), one run each unless ``--repeat``, interleaved. Every row must be scored, none
truncated, and every value equal the bare engine's within :data:`TOL_KINDS`, else exit 1.
Writes ``benchmarks/results/score_kinds.json`` (per kind: times, ratio ``ours_vs_bare_cold``,
the largest value difference, requests and prompt tokens), never ``score.json``.

Usage: ``python benchmarks/score.py [--rows 500] [--quick] [--repeat N] [--model PATH] [--data DIR]
[--kinds perplexity,ifd,rating]``
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, benchmarks/ is sys.path[0]: its select.py would shadow the stdlib module.
# Drop it and put the repository root there instead (for `benchmarks._common`, `deita_ray`).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

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
NAME_KINDS = "score_kinds"
TOL_BARE = 1e-5
"""Largest score difference allowed between the stage and the bare engine (same engine, same
prompts; measured 0)."""
TOL_REFERENCE = 1e-3
"""Largest score difference allowed vs DEITA's per-sample HF generate (other kernels; measured
2.5e-5 on 500 rows)."""
TOL_KINDS = 1e-5
"""Largest value difference allowed between the stage and the bare engine for ``--kinds`` (same
engine, same requests; measured 0 for all three kinds on 40 rows)."""

KINDS: tuple[str, ...] = ("perplexity", "ifd", "rating")
"""What ``--kinds`` measures: the registry's model kinds besides the DEITA pair (the default
benchmark); ``length`` loads no model."""

KIND_COLUMNS: dict[str, tuple[str, ...]] = {
    "perplexity": ("ppl_nll_turns", "ppl_nll", "ppl_tokens"),
    "ifd": (
        "ifd_turns",
        "ifd_nll_cond_turns",
        "ifd_nll_alone_turns",
        "ifd",
        "ifd_nll_cond",
        "ifd_nll_alone",
        "ifd_tokens",
    ),
    "rating": ("rating_scores", "rating"),
}
"""Per kind, the stage's columns (default names) compared with the values computed here. Left
out: ``ppl`` = exp(``ppl_nll``), a function of a compared column."""

KIND_SCORED: dict[str, str] = {"perplexity": "ppl_nll", "ifd": "ifd_nll_cond", "rating": "rating"}
"""Per kind, the row column that is set on every scored row (``ifd`` itself is null where
IFD >= 1, by design)."""

Values = dict[tuple[str, str], Any]
"""``{(row id, column or column:turn): value}``: what both sides of a comparison produce."""


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


def flat_values(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> Values:
    """Per-row dicts (``id`` and ``columns``) as :data:`Values`; a list (one value per turn)
    gives one key per turn, ``column:t``."""
    out: Values = {}
    for row in rows:
        for col in columns:
            v = row[col]
            if isinstance(v, list):
                out.update({(row["id"], f"{col}:{t}"): x for t, x in enumerate(v)})
            else:
                out[(row["id"], col)] = v
    return out


def table_scores(table) -> Values:
    cols = ("complexity_scores", "quality_scores")
    return flat_values(table.select(["id", *cols]).to_pylist(), cols)


def bench_ours(path: str, table, batch_size: int) -> tuple[float, dict, dict]:
    from deita_ray.config import ActorPoolConfig, PipelineConfig
    from deita_ray.stages.score import run_score

    cfg = PipelineConfig()
    cfg.score.complexity_model = model_cfg(path, "vllm")
    cfg.score.quality_model = model_cfg(path, "vllm")
    cfg.score.resources = ActorPoolConfig(concurrency=1, num_cpus=1, batch_size=batch_size)
    seconds, written, counts = time_stage("score", run_score, cfg, table)
    return seconds, table_scores(written), counts


def bare_engine(path: str) -> tuple[Any, float]:
    """One vLLM ``LLM`` built as the stage's scoring actor builds it; (engine, seconds to
    start). vLLM is imported before the clock (a fresh import is timed apart)."""
    from vllm import LLM

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
    return llm, time.perf_counter() - t0


def bench_bare(path: str, keys, prompts) -> tuple[float, float, dict]:
    from vllm import SamplingParams

    from deita_ray.models.vllm_backend import digit_logprobs
    from deita_ray.scoring import expected_score, resolve_digit_ids

    llm, start = bare_engine(path)
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


def max_diff(a: Values, b: Values) -> float:
    """Largest absolute difference over the same keys (inf when the key sets differ, or a value
    is null on one side only)."""
    if a.keys() != b.keys():
        return float("inf")

    def diff(x: float | None, y: float | None) -> float:
        if x is None or y is None:
            return 0.0 if x is None and y is None else math.inf
        return abs(x - y)

    return max((diff(a[k], b[k]) for k in a), default=0.0)


# ------------------------------------------------------------------------------------------
# --kinds: perplexity, ifd, rating — the stage vs the bare engine doing the same requests


def bench_ours_kind(path: str, table, kind: str, batch_size: int) -> tuple[float, dict[str, Any]]:
    """The score stage with ``score.scorers`` = one ``kind`` scorer on the model; (seconds,
    its compared values, the stage counts and its truncated rows)."""
    from deita_ray.config import ActorPoolConfig, PipelineConfig, ScorerConfig
    from deita_ray.stages.score import run_score

    cfg = PipelineConfig()
    cfg.score.scorers = [ScorerConfig(kind=kind, model=model_cfg(path, "vllm"))]
    cfg.score.resources = ActorPoolConfig(concurrency=1, num_cpus=1, batch_size=batch_size)
    seconds, written, counts = time_stage("score", run_score, cfg, table)
    cols = KIND_COLUMNS[kind]
    return seconds, {
        "values": flat_values(written.select(["id", *cols]).to_pylist(), cols),
        "counts": counts,
        "truncated_rows": sum(bool(t) for t in written["truncated"].to_pylist()),
    }


def context_ids(tok: Any) -> list[int]:
    """What a ``perplexity`` / ``ifd`` sequence starts with (docs/scoring.md): the ids normal
    encoding puts before the text (LLaMA's BOS), else the BOS token, else the EOS token."""
    with_special = tok("x")["input_ids"]
    plain = tok("x", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    if n > 0:
        return list(with_special[:n])
    return [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]


@dataclass
class Rendered:
    """A row's token sequences as the ``perplexity`` / ``ifd`` kinds build them.

    Attributes:
        id: the row id.
        seq: the prefix, then per turn the context (the template filled with the instruction)
            and the response, up to the last response token.
        spans: per turn, ``[a, b)`` of its response tokens in ``seq`` (None: empty response).
        prefix: the context prefix (:func:`context_ids`); IFD's alone sequence is the prefix
            followed by the response's own tokens.
    """

    id: str
    seq: list[int]
    spans: list[tuple[int, int] | None]
    prefix: list[int]

    def alone(self, t: int) -> list[int]:
        a, b = self.spans[t]  # type: ignore[misc]
        return [*self.prefix, *self.seq[a:b]]


def render_rows(table, tok: Any, template: str) -> list[Rendered]:
    """Every row's :class:`Rendered`: pieces tokenized apart (no special tokens) and
    concatenated, so that a response has the same tokens in every sequence."""
    from deita_ray.data.formats import extract_turns

    prefix = context_ids(tok)
    rows = [extract_turns(m) for m in table["messages"].to_pylist()]
    turns = [t for row in rows for t in row]
    ctx = tok([template.format(instruction=u) for u, _ in turns], add_special_tokens=False)
    resp = tok([r for _, r in turns], add_special_tokens=False)
    out, k = [], 0
    for rid, row in zip(table["id"].to_pylist(), rows, strict=True):
        seq, spans = list(prefix), []
        for _ in row:
            seq += ctx["input_ids"][k]
            a = len(seq)
            seq += resp["input_ids"][k]
            spans.append((a, len(seq)) if len(seq) > a else None)
            k += 1
        end = max((s[1] for s in spans if s is not None), default=len(seq))
        out.append(Rendered(rid, seq[:end], spans, prefix))
    return out


def prompt_logprobs(llm: Any, seqs: list[list[int]]) -> list[list[float]]:
    """Per sequence, ``lp[j] = log p(seq[j] | seq[:j])`` (``lp[0]`` NaN: no context), from one
    ``generate`` call with the stage's request: ``prompt_logprobs=0`` gives each position the
    prompt token's own log-probability, ``max_tokens=1`` samples one token that is ignored."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(
        max_tokens=1, temperature=0.0, prompt_logprobs=0, flat_logprobs=True, detokenize=False
    )
    outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], sp, use_tqdm=False)
    lps = []
    for out, seq in zip(outs, seqs, strict=True):
        flat = out.prompt_logprobs  # FlatLogprobs: position j's entry at start_indices[j]
        lp = [math.nan]
        for j in range(1, len(seq)):
            a = flat.start_indices[j]
            if flat.token_ids[a] != seq[j]:
                raise RuntimeError(f"prompt log-probability at {j} is not for token {seq[j]}")
            lp.append(flat.logprobs[a])
        lps.append(lp)
    return lps


def nll_sum(lp: Sequence[float], a: int, b: int) -> float:
    """``-sum(lp[a:b])``: the negative log-likelihood of positions ``[a, b)``."""
    return -math.fsum(lp[a:b])


def perplexity_values(spans: Sequence[tuple[int, int] | None], lp: Sequence[float]) -> dict:
    """A row's ``perplexity`` columns: mean NLL per response token, per turn and over the row
    (token-weighted), and the response tokens scored."""
    turns: list[float | None] = []
    total, count = 0.0, 0
    for span in spans:
        if span is None:
            turns.append(None)
            continue
        s, m = nll_sum(lp, *span), span[1] - span[0]
        turns.append(s / m)
        total += s
        count += m
    return {
        "ppl_nll_turns": turns,
        "ppl_nll": total / count if count else None,
        "ppl_tokens": count,
    }


def ifd_values(
    spans: Sequence[tuple[int, int] | None],
    lp_cond: Sequence[float],
    lp_alone: Sequence[Sequence[float] | None],
    prefix_len: int,
    max_ifd: float = 1.0,
) -> dict:
    """A row's ``ifd`` columns: per turn and over the row (token-weighted), NLL given the
    instruction (``lp_cond``, the conditioned sequence), NLL of the response alone
    (``lp_alone[t]``, the prefix then the response) and their ratio; the row ratio is null
    when >= ``max_ifd`` (Superfiltering drops those rows)."""

    def ratio_or_none(num: float, den: float) -> float | None:
        return num / den if den else None

    per: dict[str, list] = {"ifd_turns": [], "ifd_nll_cond_turns": [], "ifd_nll_alone_turns": []}
    sum_c = sum_a = 0.0
    count = 0
    for span, alone in zip(spans, lp_alone, strict=True):
        if span is None or alone is None:
            for v in per.values():
                v.append(None)
            continue
        m = span[1] - span[0]
        sc, sa = nll_sum(lp_cond, *span), nll_sum(alone, prefix_len, len(alone))
        per["ifd_turns"].append(ratio_or_none(sc, sa))
        per["ifd_nll_cond_turns"].append(sc / m)
        per["ifd_nll_alone_turns"].append(sa / m)
        sum_c, sum_a, count = sum_c + sc, sum_a + sa, count + m
    row = ratio_or_none(sum_c, sum_a) if count else None
    return {
        **per,
        "ifd": row if row is not None and row < max_ifd else None,
        "ifd_nll_cond": sum_c / count if count else None,
        "ifd_nll_alone": sum_a / count if count else None,
        "ifd_tokens": count,
    }


def mean_or_none(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def bare_perplexity(llm: Any, table) -> tuple[list[dict], list[list[int]]]:
    """Rows' ``perplexity`` values from one prompt-log-probability request per row (rows with
    no response token send none); (rows, the requests' token sequences)."""
    from deita_ray.scorers.perplexity import DEFAULT_TEMPLATE

    rendered = render_rows(table, llm.get_tokenizer(), DEFAULT_TEMPLATE)
    sent = [r for r in rendered if any(r.spans)]
    lps = dict(zip((r.id for r in sent), prompt_logprobs(llm, [r.seq for r in sent]), strict=True))
    rows = [{"id": r.id, **perplexity_values(r.spans, lps.get(r.id, []))} for r in rendered]
    return rows, [r.seq for r in sent]


def bare_ifd(llm: Any, table) -> tuple[list[dict], list[list[int]]]:
    """Rows' ``ifd`` values: per row the conditioned request (as ``perplexity``) and one request
    per non-empty response alone, all in one ``generate`` call; (rows, the requests' token
    sequences)."""
    from deita_ray.scorers.perplexity import DEFAULT_TEMPLATE

    rendered = render_rows(table, llm.get_tokenizer(), DEFAULT_TEMPLATE)
    seqs: list[list[int]] = []
    where: dict[tuple[str, int], int] = {}  # (row id, turn or -1 for the conditioned) -> request
    for r in rendered:
        if not any(r.spans):
            continue
        where[(r.id, -1)] = len(seqs)
        seqs.append(r.seq)
        for t, span in enumerate(r.spans):
            if span is not None:
                where[(r.id, t)] = len(seqs)
                seqs.append(r.alone(t))
    lps = prompt_logprobs(llm, seqs)

    def lp(rid: str, t: int) -> list[float] | None:
        return lps[where[(rid, t)]] if (rid, t) in where else None

    rows = [
        {
            "id": r.id,
            **ifd_values(
                r.spans,
                lp(r.id, -1) or [],
                [lp(r.id, t) for t in range(len(r.spans))],
                len(r.prefix),
            ),
        }
        for r in rendered
    ]
    return rows, seqs


def rating_prompts(table) -> tuple[list[list[tuple[str, str]]], list[str]]:
    """Every row's turns, and every turn's prompt: the default rubric filled with the turn's
    instruction and response (no history), in row then turn order."""
    from deita_ray.data.formats import extract_turns
    from deita_ray.scorers.rating import DEFAULT_TEMPLATE

    rows = [extract_turns(m) for m in table["messages"].to_pylist()]
    prompts = [DEFAULT_TEMPLATE.format(instruction=u, response=r) for row in rows for u, r in row]
    return rows, prompts


def bare_rating(llm: Any, table) -> tuple[list[dict], list[list[int]]]:
    """Rows' ``rating`` values: every turn's default-rubric prompt, the log-probabilities of the
    labels "1".."5" after it (processed, i.e. after the allowed-token mask) and their expected
    value, one ``generate`` call as the DEITA pair's bare side; (rows, the prompts' token ids)."""
    import numpy as np
    from vllm import SamplingParams

    from deita_ray.scorers.rating import DEFAULT_SCALE
    from deita_ray.scoring import expected_score, resolve_label_ids

    labels = [str(k) for k in range(1, DEFAULT_SCALE + 1)]
    ids = resolve_label_ids(llm.get_tokenizer(), labels)
    sp = SamplingParams(
        max_tokens=1, temperature=0, allowed_token_ids=ids, logprobs=len(ids), detokenize=False
    )
    rows, prompts = rating_prompts(table)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    z = np.array([[o.outputs[0].logprobs[0][t].logprob for t in ids] for o in outs])
    scores = expected_score(z, len(ids)).tolist()
    out, k = [], 0
    for rid, row in zip(table["id"].to_pylist(), rows, strict=True):
        turn = scores[k : k + len(row)]
        k += len(row)
        out.append({"id": rid, "rating_scores": turn, "rating": mean_or_none(turn)})
    return out, [list(o.prompt_token_ids) for o in outs]


BARE_KINDS: dict[str, Callable[[Any, Any], tuple[list[dict], list[list[int]]]]] = {
    "perplexity": bare_perplexity,
    "ifd": bare_ifd,
    "rating": bare_rating,
}


def bench_bare_kind(path: str, table, kind: str) -> dict[str, Any]:
    """The bare engine doing ``kind``'s requests on ``table`` (tokenization, requests and
    formula timed together; engine start apart)."""
    llm, start = bare_engine(path)
    t0 = time.perf_counter()
    rows, seqs = BARE_KINDS[kind](llm, table)
    seconds = time.perf_counter() - t0
    llm.llm_engine.engine_core.shutdown()
    return {
        "start": start,
        "requests": seconds,
        "values": flat_values(rows, KIND_COLUMNS[kind]),
        "work": {
            "requests": len(seqs),
            "prompt_tokens": sum(len(s) for s in seqs),
            "longest": max((len(s) for s in seqs), default=0),
        },
    }


def null_rows(values: Values, kind: str) -> list[str]:
    """Ids of the rows whose :data:`KIND_SCORED` column is null, sorted."""
    return sorted(rid for (rid, col), v in values.items() if col == KIND_SCORED[kind] and v is None)


def parse_kinds(text: str) -> tuple[str, ...]:
    """``--kinds``: comma-separated names from :data:`KINDS`."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(
            f"--kinds: {', '.join(bad) or 'none given'} (allowed: {', '.join(KINDS)})"
        )
    return kinds


def main_kinds(args: argparse.Namespace) -> None:
    """The ``--kinds`` benchmark (module docstring)."""
    from deita_ray.data.formats import extract_turns

    kinds: tuple[str, ...] = args.kinds
    rows = 40 if args.quick else args.rows
    repeat = args.repeat or 1  # the measure: cold, one run each
    path = resolve_model(args.model)
    table = alpaca_table(shared_data(args.data), rows)
    load_start = list(os.getloadavg())

    def ours(kind: str) -> Callable[[], Timed]:
        return lambda: Timed(*bench_ours_kind(path, table, kind, args.batch_size))

    def bare(kind: str) -> Callable[[], Timed]:
        def run() -> Timed:
            imp = fresh_vllm_import_s()
            out = bench_bare_kind(path, table, kind)
            return Timed(imp + out["start"] + out["requests"], {"import": imp, **out})

        return run

    sides: dict[str, Callable[[], Timed]] = {}
    for kind in kinds:
        sides[f"ours_{kind}"] = ours(kind)
        sides[f"bare_{kind}"] = bare(kind)
    rounds = interleaved(sides, repeat)

    # Rows with only empty responses have no token to score: perplexity and ifd give them
    # nulls (docs/scoring.md), not a reject; a rating prompt still rates them.
    no_response = sorted(
        rid
        for rid, msgs in zip(table["id"].to_pylist(), table["messages"].to_pylist(), strict=True)
        if not any(r for _, r in extract_turns(msgs))
    )
    checks: dict[str, bool] = {}
    facts: dict[str, Any] = {"tolerance": TOL_KINDS, "rows_without_response": no_response}
    for kind in kinds:
        ours_out = rounds[f"ours_{kind}"]["outputs"]
        bare_out = rounds[f"bare_{kind}"]["outputs"]
        diff = max(max_diff(o["values"], b["values"]) for o in ours_out for b in bare_out)
        may_be_null = [] if kind == "rating" else no_response
        checks[f"{kind}_every_row_scored"] = all(
            o["counts"]["rows_out"] == rows and null_rows(o["values"], kind) == may_be_null
            for o in ours_out
        )
        checks[f"{kind}_no_row_truncated"] = all(
            o["truncated_rows"] == 0 for o in ours_out
        ) and all(b["work"]["longest"] <= MAX_LEN - 1 for b in bare_out)
        checks[f"{kind}_equals_bare_engine"] = diff <= TOL_KINDS
        facts[kind] = {
            "max_abs_value_diff": diff,
            "counts": ours_out[0]["counts"],
            "null_rows": null_rows(ours_out[0]["values"], kind),
            "truncated_rows": ours_out[0]["truncated_rows"],
            "work": bare_out[0]["work"],
        }
    require(NAME_KINDS, checks, facts)

    report: dict[str, Any] = {
        "quick": args.quick,
        "script": "score.py --kinds",
        "model": args.model,
        "dtype": "float32",
        "rows": rows,
        "rounds": repeat,
        "tolerance": TOL_KINDS,
        "rows_without_response": no_response,
        "kinds": {},
        "readme": [],
        "machine": {"load_avg_at_start": load_start},
    }
    for kind in kinds:
        ours_r, bare_r = rounds[f"ours_{kind}"], rounds[f"bare_{kind}"]
        part = {k: min(b[k] for b in bare_r["outputs"]) for k in ("import", "start", "requests")}
        ours_s, bare_s = ours_r["min_s"], bare_r["min_s"]
        work = facts[kind]["work"]
        entry = {
            "requests": work["requests"],
            "prompt_tokens": work["prompt_tokens"],
            "counts": facts[kind]["counts"],
            "seconds_min": {
                "ours_stage": round(ours_s, 2),
                "bare_cold": round(bare_s, 2),
                **{f"bare_{k}": round(v, 2) for k, v in part.items()},
            },
            "seconds_all_rounds": {"ours_stage": ours_r["runs_s"], "bare_cold": bare_r["runs_s"]},
            "ratios": {
                "ours_vs_bare_cold (goal >= 0.9)": ratio(bare_s, ours_s, 3),
                "ours_vs_bare_requests_only": ratio(part["requests"], ours_s, 3),
            },
            "max_abs_value_diff": facts[kind]["max_abs_value_diff"],
        }
        report["kinds"][kind] = entry
        runs = "one run each" if repeat == 1 else f"min of {repeat} interleaved rounds"
        report["readme"].append(
            {
                "setting": (
                    f"`--kinds {kind}`: {rows} Alpaca rows ({work['requests']} engine requests, "
                    f"{work['prompt_tokens']} prompt tokens), {args.model} fp32"
                ),
                "result": (
                    f"stage at {entry['ratios']['ours_vs_bare_cold (goal >= 0.9)']}x the bare "
                    f"vLLM engine doing the same requests (cold for both: vLLM import, engine "
                    f"start, requests; {runs}); largest difference from the bare engine's "
                    f"values {entry['max_abs_value_diff']:.1g} (allowed {TOL_KINDS:g})"
                ),
            }
        )
    finish(NAME_KINDS, report, args.out)


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--batch-size", type=int, default=256, help="rows per stage batch")
    ap.add_argument(
        "--kinds",
        type=parse_kinds,
        default=(),
        help=f"measure these scorer kinds instead of the DEITA pair ({','.join(KINDS)})",
    )
    args = ap.parse_args()
    if args.kinds:
        main_kinds(args)
        return
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

"""What the eval stage and the study compute, as pure functions (no Ray, no engine, no files):
eval rows from records, the contamination key, the likelihood rendering, the bootstrap, the
judge prompts and verdicts; and a study's statistics -- the paired difference of each arm from
random selection with row, draw and training-seed noise, Holm's correction, the minimal
detectable effect, the two-level bootstrap, the length adjustment, the style flags and the
design formula ``--plan`` uses (numpy only: Student's t is computed here).

The definitions are those of docs/evaluation.md:

- Reference-answer likelihood of a model on a row (prompt messages, reference answer A):
  ``p`` = the rendering of the prompt messages with the generation prompt, ``f`` = the
  rendering of the prompt messages plus ``[assistant: A]``; ``f`` must start with ``p`` (else
  the row is rejected, ``template_not_prefix``); the answer is ``f[len(p):]`` (end-of-turn
  tokens included). Tokens: ``p`` and the answer are tokenised separately and concatenated, the
  way SFT tokenises its segments (:func:`deita_ray.training.render.encode_segments`), so the
  evaluated tokens are the ones a fine-tuned model was trained to predict.
- Aggregates over rows: the token-weighted mean NLL (sum of NLL / sum of answer tokens), the
  mean of per-row means, each with a percentile bootstrap 95% interval over rows (fixed seed).
- Judge verdicts follow FastChat's formats (``[[rating]]``, ``[[A]]``/``[[B]]``/``[[C]]``); an
  output that does not parse keeps a reason and is never counted as a tie or a score.
- A study's verdicts: :func:`paired_comparison` (docs/evaluation.md, "How the study decides").

Example:
    >>> normalize_prompt("  Give   three TIPS\\n")
    'give three tips'
    >>> parse_rating("Good. Rating: [[7]]")
    (7.0, None)
    >>> parse_verdict("... [[B]]")
    ('B', None)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deita_ray.data.formats import Reject, canonicalize

# ---------------------------------------------------------------------------------------------
# Eval rows from records


@dataclass
class EvalRow:
    """One evaluation item: the conversation whose last message is the reference answer."""

    id: str
    seq: int
    messages: list[dict]
    source: str


def eval_row(record: Any, fmt: str, row_id: str, seq: int, source: str) -> EvalRow | Reject:
    """A pool-shaped record -> an eval row (prompt messages + reference answer), or why not.

    The record is canonicalised like a pool row; the last message must be a non-empty
    assistant message (the reference) preceded by a user message.
    """
    res = canonicalize(record, format=fmt)
    if isinstance(res, Reject):
        return res
    msgs = res["messages"]
    if not msgs or msgs[-1]["role"] != "assistant":
        return Reject("no_reference_answer", "the last message is not an assistant answer")
    if not msgs[-1]["content"].strip():
        return Reject("empty_reference_answer", "the reference answer is empty")
    if not any(m["role"] == "user" for m in msgs[:-1]):
        return Reject("empty_conversation", "no user message before the reference answer")
    return EvalRow(res["id"] or row_id, seq, msgs, source)


MT_BENCH_TURN_SHIFT = 4
"""An MT-Bench row's ``seq`` is ``question record seq << 4 | turn`` (turns < 16)."""


def reference_turns(records: Iterable[tuple[Any, str]]) -> tuple[dict[str, list[str]], list]:
    """FastChat reference answers -> ``{question_id: [answer per turn]}`` and bad records.

    Args:
        records: ``(parsed record or None, raw text)`` of the reference files.

    Returns:
        The answers by question id (as text; the first occurrence wins) and
        ``[(raw, reason, detail)]`` for records that do not have that shape.
    """
    out: dict[str, list[str]] = {}
    bad = []
    for obj, raw in records:
        try:
            qid = obj["question_id"]
            turns = obj["choices"][0]["turns"]
            if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                raise TypeError("turns is not a list of strings")
        except (KeyError, IndexError, TypeError) as e:
            bad.append((raw, "bad_reference", f"{type(e).__name__}: {e}"[:300]))
            continue
        out.setdefault(str(qid), turns)
    return out, bad


def mt_bench_rows(record: Any, seq: int, source: str, references: Mapping[str, list[str]]):
    """One MT-Bench question -> one eval row per turn (turn k's prompt holds the earlier turns
    with their reference answers), or a Reject for the whole question."""
    if not isinstance(record, dict):
        return Reject("not_an_object", "record is not an object")
    qid, turns = record.get("question_id"), record.get("turns")
    if qid is None or not isinstance(turns, list) or not turns:
        return Reject("missing_field", "an mt_bench question needs question_id and turns")
    if not all(isinstance(t, str) and t.strip() for t in turns):
        return Reject("wrong_type", "turns must be non-empty strings")
    refs = references.get(str(qid))
    if refs is None:
        return Reject("no_reference_answer", f"no reference answer for question_id {qid}")
    if len(refs) < len(turns) or not all(r.strip() for r in refs[: len(turns)]):
        return Reject("no_reference_answer", f"question_id {qid}: a turn has no reference")
    rows, msgs = [], []
    for k, (q, a) in enumerate(zip(turns, refs, strict=False)):
        msgs = [*msgs, {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append(
            EvalRow(f"mt_bench:{qid}:t{k + 1}", (seq << MT_BENCH_TURN_SHIFT) | k, msgs, source)
        )
    return rows


def prompt_of(messages: Sequence[Mapping]) -> str:
    """The last user message before the reference answer (the question a judge sees)."""
    users = [m["content"] for m in messages[:-1] if m["role"] == "user"]
    return users[-1] if users else ""


# ---------------------------------------------------------------------------------------------
# Contamination

_SPACE = re.compile(r"\s+")


def normalize_prompt(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace runs collapsed to one space, stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def prompt_key(text: str) -> bytes:
    """A 16-byte digest of the normalised text (what the pool side keeps in memory)."""
    return hashlib.blake2b(normalize_prompt(text).encode("utf-8"), digest_size=16).digest()


def user_keys(messages: Iterable[Mapping]) -> list[bytes]:
    """Keys of every non-empty user message of a conversation."""
    return [prompt_key(m["content"]) for m in messages if m["role"] == "user" and m["content"]]


# ---------------------------------------------------------------------------------------------
# Likelihood rendering


class RenderError(ValueError):
    """A row cannot be rendered for the likelihood (the reason goes to rejects)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def likelihood_texts(messages: list[dict], template: str, tokenizer: Any) -> tuple[str, str]:
    """``(p, f)`` of the likelihood definition for a conversation ending in the reference.

    Raises:
        RenderError: ``template_not_prefix`` when ``f`` does not start with ``p``;
            ``template_error`` when the template cannot render the messages.
    """
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    full = [*prompt, {"role": "assistant", "content": messages[-1]["content"]}]
    if template == "vicuna_v1.1":
        from deita_ray.templates import vicuna_segments

        try:
            segs = vicuna_segments(full)
        except ValueError as e:
            raise RenderError("template_error", str(e)) from None
        p = "".join(text for text, _ in segs[:-1])  # ... "ASSISTANT: "
        f = "".join(text for text, _ in segs)
    elif template == "chat_template":
        try:
            p = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            f = tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=False)
        except Exception as e:  # noqa: BLE001 - a template may raise anything (jinja)
            raise RenderError("template_error", f"{type(e).__name__}: {e}"[:500]) from None
    else:
        raise ValueError(f"unknown template {template!r}")
    if not f.startswith(p):
        raise RenderError(
            "template_not_prefix",
            "the rendering with the answer does not start with the rendering with the "
            "generation prompt",
        )
    return p, f


def likelihood_tokens(p: str, f: str, tokenizer: Any) -> tuple[list[int], int]:
    """Token ids of ``p`` + the answer ``f[len(p):]`` and the index of the first answer token."""
    from deita_ray.training.render import encode_segments

    enc = encode_segments([[(p, False), (f[len(p) :], True)]], tokenizer, 1 << 62)[0]
    start = next((i for i, lab in enumerate(enc.labels) if lab != -100), len(enc.labels))
    return enc.input_ids, start


def generation_prompt(prompt: list[dict], template: str, tokenizer: Any) -> str:
    """``p``: what a model continues to answer the last user turn of ``prompt`` (greedy
    generation renders its prompts exactly as the likelihood does).

    Raises:
        RenderError: as :func:`likelihood_texts`.
    """
    return likelihood_texts([*prompt, {"role": "assistant", "content": ""}], template, tokenizer)[0]


# ---------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_means(
    values: np.ndarray,
    weights: np.ndarray | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean (weighted: sum(v*w)/sum(w)) and a percentile bootstrap 95% interval over rows.

    Args:
        values: one value per row (for a token-weighted mean NLL: the row's mean NLL).
        weights: per-row weights (answer tokens), or None for the plain mean.
        resamples: bootstrap resamples.
        seed: generator seed (the same rows and seed give the same interval).

    Returns:
        ``{"mean", "ci95": [lo, hi], "n"}`` (``mean`` None when there is no row).
    """
    v = np.asarray(values, np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64)
    n = len(v)
    if n == 0:
        return {"mean": None, "ci95": [None, None], "n": 0}
    mean = float((v * w).sum() / w.sum())
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // n)  # bound the index matrix's memory
    for lo in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - lo), n))
        means[lo : lo + len(idx)] = (v[idx] * w[idx]).sum(1) / w[idx].sum(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": mean, "ci95": [float(lo), float(hi)], "n": n}


def likelihood_summary(
    nll_sum: np.ndarray, tokens: np.ndarray, resamples: int, seed: int
) -> dict[str, Any]:
    """Token-weighted and per-row mean NLL with their bootstrap intervals."""
    nll_sum = np.asarray(nll_sum, np.float64)
    tokens = np.asarray(tokens, np.float64)
    per_row = nll_sum / np.maximum(tokens, 1)
    tok = bootstrap_means(per_row, tokens, resamples, seed)
    row = bootstrap_means(per_row, None, resamples, seed)
    return {
        "rows": int(len(per_row)),
        "tokens": int(tokens.sum()),
        "nll_token_mean": tok["mean"],
        "nll_token_mean_ci95": tok["ci95"],
        "nll_row_mean": row["mean"],
        "nll_row_mean_ci95": row["ci95"],
        "resamples": resamples,
        "seed": seed,
    }


# ---------------------------------------------------------------------------------------------
# Judge prompts and verdicts


@dataclass(frozen=True)
class JudgePrompt:
    """One FastChat judge prompt (``judge_prompts.jsonl`` line)."""

    name: str
    type: str
    system_prompt: str
    prompt_template: str

    @property
    def fields(self) -> set[str]:
        import string

        return {f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f}


METRIC_KEYS = {
    # metric -> (value key, interval key, lower is better) in the eval stage's per-set summary
    "likelihood": ("nll_token_mean", "nll_token_mean_ci95", True),
    "judge_single": ("rating_mean", "rating_mean_ci95", False),
    "judge_pairwise": ("win_rate", "win_rate_ci95", False),
}
"""Each eval metric's headline value and its bootstrap 95% interval (the study's table, the
report's evaluation part)."""

SINGLE_FIELDS = {"question", "answer", "ref_answer_1"}
PAIR_FIELDS = {"question", "answer_a", "answer_b", "ref_answer_1"}


def load_judge_prompt(path: str, name: str, kind: str) -> JudgePrompt:
    """The prompt ``name`` of a judge_prompts.jsonl file, checked for ``kind`` (single/pairwise).

    Raises:
        ValueError: the file lacks the name, the type differs, or the template needs fields a
            single-turn row cannot fill (FastChat's multi-turn prompts).
    """
    found = None
    names = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            obj = json.loads(line)
            names.append(obj.get("name"))
            if obj.get("name") == name:
                found = obj
    if found is None:
        raise ValueError(f"judge prompt {name!r} not in {path} (has: {', '.join(map(str, names))})")
    prompt = JudgePrompt(
        name, found["type"], found.get("system_prompt", ""), found["prompt_template"]
    )
    if prompt.type != kind:
        raise ValueError(f"judge prompt {name!r} is of type {prompt.type!r}, expected {kind!r}")
    allowed = SINGLE_FIELDS if kind == "single" else PAIR_FIELDS
    if not prompt.fields <= allowed:
        raise ValueError(
            f"judge prompt {name!r} needs fields {sorted(prompt.fields - allowed)}, which a "
            f"single-turn row does not have (allowed: {sorted(allowed)})"
        )
    return prompt


def judge_messages(prompt: JudgePrompt, **fields: str) -> list[dict]:
    """The judge conversation: the prompt's system text, then its template filled in."""
    text = prompt.prompt_template.format(**{k: fields.get(k, "") for k in prompt.fields})
    msgs = [{"role": "system", "content": prompt.system_prompt}] if prompt.system_prompt else []
    return [*msgs, {"role": "user", "content": text}]


_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def parse_rating(
    text: str, low: float = 1.0, high: float = 10.0
) -> tuple[float | None, str | None]:
    """FastChat's ``[[rating]]`` (``[rating]`` as its fallback) -> (rating, None) or (None, why).

    Reasons: ``no_rating``, ``ambiguous_rating`` (several different ratings),
    ``rating_out_of_range``.
    """
    found = _RATING.findall(text) or _RATING_BACKUP.findall(text)
    if not found:
        return None, "no_rating"
    values = {float(x) for x in found}
    if len(values) > 1:
        return None, "ambiguous_rating"
    value = values.pop()
    if not low <= value <= high:
        return None, "rating_out_of_range"
    return value, None


def parse_verdict(text: str) -> tuple[str | None, str | None]:
    """``[[A]]`` / ``[[B]]`` / ``[[C]]`` -> (verdict, None) or (None, ``no_verdict`` /
    ``ambiguous_verdict``)."""
    found = set(_VERDICT.findall(text))
    if not found:
        return None, "no_verdict"
    if len(found) > 1:
        return None, "ambiguous_verdict"
    return found.pop(), None


def pairwise_outcome(first: str | None, second: str | None) -> str:
    """Outcome for the evaluated model from both orders (model is A first, B second).

    ``win`` / ``loss`` only when both orders agree, ``tie`` when both say C, else
    ``inconsistent``. Both verdicts must have parsed (the caller checks).
    """
    if first == "A" and second == "B":
        return "win"
    if first == "B" and second == "A":
        return "loss"
    if first == "C" and second == "C":
        return "tie"
    return "inconsistent"


# ---------------------------------------------------------------------------------------------
# Student's t (numpy only: the package does not depend on scipy)


def _lgamma(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.lgamma, otypes=[np.float64])(x)


def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The continued fraction of the incomplete beta function (modified Lentz), elementwise."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, 1000):
        m2 = 2.0 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1.0 + aa / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            delta = d * c
            h = h * delta
        if np.all(np.abs(delta - 1.0) < 1e-15):
            break
    return h


def betainc(a: Any, b: Any, x: Any) -> np.ndarray:
    """The regularised incomplete beta function I_x(a, b), elementwise (a, b > 0)."""
    a, b, x = (np.asarray(v, np.float64) for v in np.broadcast_arrays(a, b, x))
    inside = (x > 0) & (x < 1)
    xi = np.where(inside, x, 0.5)
    swap = xi > (a + 1.0) / (a + b + 2.0)
    aa, bb, xx = np.where(swap, b, a), np.where(swap, a, b), np.where(swap, 1.0 - xi, xi)
    log_front = _lgamma(aa + bb) - _lgamma(aa) - _lgamma(bb) + aa * np.log(xx) + bb * np.log1p(-xx)
    val = np.exp(log_front) * _betacf(aa, bb, xx) / aa
    val = np.where(swap, 1.0 - val, val)
    return np.where(inside, val, np.where(x <= 0, 0.0, 1.0))


_NORMAL = statistics.NormalDist()
_T_NORMAL_DF = 1e7
"""Degrees of freedom beyond which t is the standard normal (to 1e-7)."""


def t_sf(t: Any, df: Any) -> np.ndarray:
    """P(T > t) for Student's t with ``df`` degrees of freedom (``inf``: the normal)."""
    t, df = (np.asarray(v, np.float64) for v in np.broadcast_arrays(t, df))
    big = df >= _T_NORMAL_DF
    dfs = np.where(big, 1.0, df)
    tail = 0.5 * betainc(dfs / 2.0, 0.5, dfs / (dfs + t * t))
    tail = np.where(t >= 0, tail, 1.0 - tail)
    normal = np.vectorize(lambda v: 1.0 - _NORMAL.cdf(v), otypes=[np.float64])(t)
    return np.where(big, normal, tail)


def _t_pdf(t: np.ndarray, df: np.ndarray) -> np.ndarray:
    return np.exp(
        _lgamma((df + 1) / 2)
        - _lgamma(df / 2)
        - 0.5 * np.log(df * math.pi)
        - (df + 1) / 2 * np.log1p(t * t / df)
    )


def t_ppf(p: Any, df: Any) -> np.ndarray:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``inf``: the normal).

    Newton's method on the upper tail from the normal quantile: the tail is convex in t > 0,
    so the iterates rise monotonically to the root (no overshoot).

    Example:
        >>> round(float(t_ppf(0.975, 4)), 4)
        2.7764
    """
    p, df = (np.asarray(v, np.float64) for v in np.broadcast_arrays(p, df))
    shape = p.shape
    p, df = p.ravel(), df.ravel()
    if np.any((p <= 0) | (p >= 1) | ~(df > 0)):
        raise ValueError("t_ppf needs 0 < p < 1 and df > 0")
    q = np.minimum(p, 1.0 - p)  # upper-tail probability of |quantile|
    z = np.vectorize(lambda v: -_NORMAL.inv_cdf(v), otypes=[np.float64])(q)
    big = df >= _T_NORMAL_DF
    dfs = np.where(big, 1.0, df)
    t = np.where(big, z, np.maximum(z, 0.0))
    live = ~big & (q < 0.5)
    for _ in range(200):
        if not live.any():
            break
        g = t_sf(t[live], dfs[live]) - q[live]
        step = g / _t_pdf(t[live], dfs[live])
        t[live] = t[live] + step
        done = np.abs(step) <= 1e-12 * np.maximum(1.0, t[live])
        idx = np.flatnonzero(live)
        live[idx[done]] = False
    return np.where(p < 0.5, -t, t).reshape(shape)


# ---------------------------------------------------------------------------------------------
# A study's statistics: paired differences from random, with row, draw and seed noise
#
# The definitions are those of docs/evaluation.md ("How the study decides"). In short, for an
# eval set with rows i (answer tokens t_i), training seeds k and random draws r:
#   d_ik  = NLL_sum(arm, i, k) - mean_r NLL_sum(random_r, i, k)
#   Delta = sum_ik d_ik / (K sum_i t_i)                    (NLL/token; < 0: the arm is better)
# Its standard error adds three parts, each estimated from the study's own runs:
#   SE^2  = V_row / n  +  s2_draw / R  +  c_K * s2_seed
# V_row: the per-row variance of the linearised paired difference (prompt-to-prompt), s2_draw:
# the variance between random draws' seed-mean NLL/token, s2_seed: the training-seed (run)
# variance pooled over every selection trained on several seeds (two-way residual, so effects
# shared by a seed cancel as the pairing does), c_K = 1/K for a balanced design. Degrees of
# freedom by Welch-Satterthwaite; intervals and p-values from Student's t; Holm across the
# family of arms; MDE = (t_{df, 1-alpha/(2m)} + t_{df, power}) * SE. A two-level bootstrap
# (rows, training seeds and random draws resampled together) gives P(arm < random) and a
# percentile interval beside the t interval.

VERDICTS = ("better", "worse", "equivalent", "inconclusive")


def holm(p: Any, alpha: float) -> dict[str, np.ndarray]:
    """Holm's step-down correction of the p-values ``p`` (one per hypothesis).

    Returns ``adjusted`` (Holm-adjusted p-values), ``rejected`` (adjusted <= alpha) and
    ``level``: the two-sided level each hypothesis is tested at, alpha / (m - j + 1) for the
    j-th smallest p-value up to the first that is not rejected; from there on every hypothesis
    gets that first failing level, so an interval at its level excludes 0 exactly when the
    hypothesis is rejected.

    Example:
        >>> holm([0.01, 0.04, 0.03], 0.05)["rejected"].tolist()
        [True, False, False]
    """
    p = np.asarray(p, np.float64)
    m = len(p)
    out = {"adjusted": np.ones(m), "rejected": np.zeros(m, bool), "level": np.full(m, alpha)}
    if m == 0:
        return out
    order = np.argsort(p, kind="stable")
    ps = p[order]
    steps = alpha / (m - np.arange(m))
    ok = ps <= steps
    first_fail = m if ok.all() else int(np.argmin(ok))
    rank = np.arange(m)
    out["adjusted"][order] = np.minimum(1.0, np.maximum.accumulate(ps * (m - rank)))
    out["rejected"][order] = rank < first_fail
    out["level"][order] = steps[np.minimum(rank, first_fail)] if first_fail < m else steps
    return out


def satterthwaite(coefs: Sequence[float], variances: Sequence[float], dfs: Sequence[float]):
    """``(var, df)`` of sum_j c_j v_j, each v_j an estimate with df_j degrees of freedom
    (Welch-Satterthwaite; a part with df_j = inf or c_j v_j = 0 adds no uncertainty)."""
    terms = [c * v for c, v in zip(coefs, variances, strict=True)]
    var = float(sum(terms))
    denom = sum(t * t / d for t, d in zip(terms, dfs, strict=True) if t > 0 and math.isfinite(d))
    df = var * var / denom if denom > 0 else math.inf
    return var, df


def _counts(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``size`` bootstrap resamples of n items, as counts (each row sums to n)."""
    idx = rng.integers(0, n, size=(size, n))
    flat = (idx + n * np.arange(size)[:, None]).ravel()
    return np.bincount(flat, minlength=size * n).reshape(size, n).astype(np.float64)


def _wsums(W: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``W @ X.T`` for a few rows of X, one matrix-vector product each (a threaded matrix
    product stalls on a busy machine; these do not)."""
    return np.stack([W @ x for x in X], axis=1) if len(X) else np.empty((len(W), 0))


def _random_block(done: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The random draws and training seeds whose runs all finished: the largest full block
    (draws x seeds), by runs, then by draws (a failed random run costs its draw or its seed,
    whichever keeps more runs)."""
    R, K = done.shape
    best = (np.zeros(R, bool), np.zeros(K, bool))
    best_key = (0, 0)
    if K <= 12:
        masks = [np.array([(s >> j) & 1 for j in range(K)], bool) for s in range(1, 1 << K)]
    else:  # many seeds: all of them, or each alone
        masks = [np.ones(K, bool), *np.eye(K, dtype=bool)]
    for seeds in masks:
        draws = done[:, seeds].all(axis=1)
        key = (int(draws.sum()) * int(seeds.sum()), int(draws.sum()))
        if key > best_key:
            best, best_key = (draws, seeds), key
    return best


def paired_comparison(
    arms: Mapping[str, np.ndarray],
    random: np.ndarray,
    tokens: np.ndarray,
    base: np.ndarray | None = None,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every arm of a study against random selection on one eval set (docs/evaluation.md).

    Args:
        arms: arm name -> ``(K, n)`` NLL sums per training seed and eval row; a row of NaN
            marks a run that did not finish (left out, and counted).
        random: ``(R, K, n)`` NLL sums of the random draws (rows of NaN: missing runs).
        tokens: ``(n,)`` answer tokens per row (the same rows, in the same order, everywhere).
        base: ``(n,)`` NLL sums of the untrained base model, or None.
        alpha: family-wise error rate (Holm across ``arms``).
        power: the power at which the minimal detectable effect (MDE) is stated.
        resamples, seed: the two-level bootstrap (rows, training seeds and random draws).

    Returns:
        JSON-ready: ``random`` (draws and seeds used, their mean NLL/token and each draw's
        deviation), ``variance`` (between draws and between training seeds, with degrees of
        freedom), ``base`` (the untrained model's difference from random, or None), ``family``
        (arms in the Holm family) and ``arms``: per arm ``delta``, ``se``, ``df``, ``ci95``
        (t, uncorrected), ``p``, ``p_holm``, ``level``, ``ci`` (the Holm-corrected interval the
        verdict reads), ``mde``, ``verdict``, ``reason``, ``p_better`` and ``ci95_bootstrap``
        (the bootstrap), ``gap_fraction``, ``seeds`` and ``draws`` (the runs it rests on),
        ``row_var``.
    """
    tok = np.asarray(tokens, np.float64)
    rnd = np.asarray(random, np.float64)
    if rnd.ndim != 3 or rnd.shape[2] != len(tok):
        raise ValueError(f"random must be (draws, seeds, rows={len(tok)}), got {rnd.shape}")
    R, K, n = rnd.shape
    T = float(tok.sum())
    out: dict[str, Any] = {
        "rows": n,
        "tokens": int(T),
        "alpha": alpha,
        "power": power,
        "resamples": resamples,
        "seed": seed,
    }

    # The random yardstick: the largest block of finished draws x seeds.
    draws, seeds = _random_block(np.isfinite(rnd).all(axis=2))
    Rp, Kp = int(draws.sum()), int(seeds.sum())
    seed_idx = np.flatnonzero(seeds)
    col = {int(k): j for j, k in enumerate(seed_idx)}  # training seed -> column of the block
    rr = rnd[np.ix_(draws, seeds)]  # (R', K', n)
    run_means = rr.sum(axis=2) / T if T > 0 else np.zeros((Rp, Kp))
    draw_means = run_means.mean(axis=1) if Kp else np.zeros(Rp)
    rand_mean = float(run_means.mean()) if Rp and Kp else None
    out["random"] = {
        "draws": Rp,
        "draws_total": R,
        "seeds": Kp,
        "seeds_total": K,
        "runs": Rp * Kp,
        "draw_index": np.flatnonzero(draws).tolist(),
        "seed_index": seed_idx.tolist(),
        "nll_token_mean": rand_mean,
        "draw_deltas": (draw_means - rand_mean).tolist() if rand_mean is not None else [],
    }
    blocker = None
    if n < 2 or T <= 0:
        blocker = f"only {n} eval row(s) in common"
    elif Rp < 2:
        blocker = f"fewer than 2 random draws ({Rp} finished on common training seeds)"

    A: dict[str, np.ndarray] = {}
    arm_seeds: dict[str, np.ndarray] = {}
    for name, vals in arms.items():
        v = np.asarray(vals, np.float64)
        if v.shape != (K, n):
            raise ValueError(f"arm {name!r} must be (seeds={K}, rows={n}), got {v.shape}")
        A[name] = v
        arm_seeds[name] = np.flatnonzero(np.isfinite(v).all(axis=1) & seeds)

    # Variances. Between draws: of a draw's seed-mean NLL/token. Between training seeds: the
    # two-way (selection x seed) residual pooled over every selection finished on all the
    # block's seeds (the random draws and such arms), so what a seed shifts for every
    # selection cancels, as it does in the paired difference.
    s2_draw = float(draw_means.var(ddof=1)) if Rp >= 2 else None
    rows_tab = [run_means] + [
        (A[nm][seed_idx].sum(axis=1) / T)[None] for nm in A if len(arm_seeds[nm]) == Kp
    ]
    tab = np.concatenate(rows_tab) if Kp else np.empty((0, 0))
    S = len(tab)
    seed_df = (S - 1) * (Kp - 1) if S else 0
    if seed_df > 0 and blocker is None:
        resid = tab - tab.mean(1, keepdims=True) - tab.mean(0, keepdims=True) + tab.mean()
        s2_seed, seed_assumed = float((resid**2).sum() / seed_df), False
    else:
        # One training seed: a run's training noise cannot be told from a draw's; assume
        # (conservatively) that an arm's run varies as much as a whole random run does.
        s2_seed, seed_df, seed_assumed = s2_draw, max(Rp - 1, 0), True
    out["variance"] = {
        "draw": s2_draw,
        "draw_df": max(Rp - 1, 0),
        "seed": s2_seed,
        "seed_df": seed_df,
        "seed_assumed": seed_assumed,
        "draw_component": (
            None
            if s2_draw is None or s2_seed is None
            else max(0.0, s2_draw - (0.0 if seed_assumed else s2_seed / Kp))
        ),
        "selections_pooled": 0 if seed_assumed else S,
    }

    def point(vals: np.ndarray, k_idx: np.ndarray, trained: bool) -> dict[str, Any]:
        """Delta, its SE and df for one arm on training seeds ``k_idx`` (indices into K)."""
        cols = np.array([col[int(k)] for k in k_idx], int)
        Ka = len(k_idx)
        dbar = (vals[k_idx] - rr[:, cols, :].mean(axis=0)).mean(axis=0)  # (n,): d_i
        delta = float(dbar.sum() / T)
        z = dbar - delta * tok  # linearised: Delta = sum d_i / sum t_i
        row_term = float(n / (n - 1) * (z * z).sum() / T**2)
        c_draw = 1.0 / Rp
        c_seed = (1.0 / Ka if trained else 0.0) + 1.0 / (Rp * Ka) - 1.0 / (Rp * Kp)
        if seed_assumed:
            var, df = satterthwaite([1.0, c_draw + c_seed], [row_term, s2_draw], [n - 1, Rp - 1])
        else:
            var, df = satterthwaite(
                [1.0, c_draw, c_seed], [row_term, s2_draw, s2_seed], [n - 1, Rp - 1, seed_df]
            )
        return {
            "nll_token_mean": float(vals[k_idx].sum() / (Ka * T)),
            "delta": delta,
            "se": math.sqrt(var),
            "df": df,
            "row_var": row_term * n,
            "seeds": Ka,
            "seed_index": [int(k) for k in k_idx],
            "draws": Rp,
        }

    per_arm: dict[str, dict[str, Any]] = {}
    for name in A:
        if blocker is not None:
            per_arm[name] = {"verdict": "inconclusive", "reason": blocker}
        elif len(arm_seeds[name]) == 0:
            per_arm[name] = {
                "verdict": "inconclusive",
                "reason": "no finished run of this arm on the random draws' training seeds",
            }
        else:
            per_arm[name] = point(A[name], arm_seeds[name], trained=True)
    out["base"] = None
    base_vals = None
    if base is not None and blocker is None:
        b = np.asarray(base, np.float64)
        if b.shape != (n,) or not np.isfinite(b).all():
            out["base"] = {"reason": "the base model has no value on some common row"}
        else:
            base_vals = np.broadcast_to(b, (K, n))
            out["base"] = point(base_vals, seed_idx, trained=False)

    # The two-level bootstrap: rows and random draws resampled once for every arm, an arm's
    # training seeds with it (its random reference takes the same seeds: the pairs stay).
    dists: dict[str, np.ndarray] = {}
    if resamples > 0 and blocker is None:
        rng = np.random.default_rng(seed)
        W = _counts(rng, n, resamples)  # (B, n)
        Wt = W @ tok
        V = _counts(rng, Rp, resamples)  # (B, R')
        WR = _wsums(W, rr.reshape(Rp * Kp, n)).reshape(resamples, Rp, Kp)
        ref_b = (V[:, :, None] * WR).sum(axis=1) / Rp  # (B, K'): resampled random reference
        todo = [(nm, A[nm], arm_seeds[nm]) for nm in A if "delta" in per_arm[nm]]
        if base_vals is not None:
            todo.append(("\0base", base_vals, seed_idx))
        for nm, vals, k_idx in todo:
            cols = np.array([col[int(k)] for k in k_idx], int)
            U = _counts(rng, len(k_idx), resamples)  # (B, Ka)
            WA = _wsums(W, vals[k_idx])  # (B, Ka)
            dists[nm] = (U * (WA - ref_b[:, cols])).sum(axis=1) / (len(k_idx) * Wt)

    def describe_boot(r: dict[str, Any], dist: np.ndarray | None) -> None:
        """P(arm < random) and the percentile interval. With a handful of seeds and draws
        the bootstrap's spread falls short of the variance decomposition's (resampling K
        values keeps (K - 1)/K of their variance, and one seed none): P(arm < random) is read
        from the bootstrap's shape rescaled to the decomposition's SE; the raw values are
        kept beside it."""
        if dist is None:
            return
        sd = float(dist.std())
        r["bootstrap_sd"] = sd
        r["p_better_raw"] = float((dist < 0).mean())
        r["ci95_bootstrap"] = [float(x) for x in np.percentile(dist, [2.5, 97.5])]
        scaled = r["delta"] + (dist - dist.mean()) * (r["se"] / sd) if sd > 0 else dist
        r["p_better"] = float((scaled < 0).mean())

    if out["base"] is not None and "delta" in out["base"]:
        bse, bdf = out["base"]["se"], out["base"]["df"]
        q = float(t_ppf(0.975, bdf)) * bse if bse > 0 else 0.0
        out["base"]["ci95"] = [out["base"]["delta"] - q, out["base"]["delta"] + q]
        describe_boot(out["base"], dists.get("\0base"))

    # Tests: t with Satterthwaite df, Holm across the family, the MDE, the verdicts.
    for r in per_arm.values():
        if "delta" in r and not r["se"] > 0:
            r.update(verdict="inconclusive", reason="no variance: every run gave the same values")
    family = [nm for nm, r in per_arm.items() if "delta" in r and r["se"] > 0]
    m = len(family)
    out["family"] = m
    if m:
        delta = np.array([per_arm[nm]["delta"] for nm in family])
        se = np.array([per_arm[nm]["se"] for nm in family])
        df = np.array([per_arm[nm]["df"] for nm in family])
        p = np.minimum(1.0, 2.0 * t_sf(np.abs(delta) / se, df))
        h = holm(p, alpha)
        probs = [1 - h["level"] / 2, np.full(m, 0.975), np.full(m, 1 - alpha / (2 * m))]
        q_level, q95, q_mde = t_ppf(np.concatenate(probs), np.tile(df, 3)).reshape(3, m)
        q_power = t_ppf(np.full(m, power), df)
        gap = (out["base"] or {}).get("delta")
        for j, nm in enumerate(family):
            r = per_arm[nm]
            d, s = r["delta"], r["se"]
            lo, hi = d - q_level[j] * s, d + q_level[j] * s
            mde = float((q_mde[j] + q_power[j]) * s)
            r.update(
                ci95=[float(d - q95[j] * s), float(d + q95[j] * s)],
                p=float(p[j]),
                p_holm=float(h["adjusted"][j]),
                level=float(h["level"][j]),
                ci=[float(lo), float(hi)],
                mde=mde,
                gap_fraction=float(-d / gap) if gap else None,
            )
            if h["rejected"][j]:
                r.update(verdict="better" if d < 0 else "worse", reason=None)
            elif -mde < lo and hi < mde:
                r.update(verdict="equivalent", reason=None)
            else:
                r.update(
                    verdict="inconclusive",
                    reason=(
                        f"the corrected interval [{lo:.4f}, {hi:.4f}] holds 0 and reaches "
                        f"beyond ±MDE {mde:.4f}"
                    ),
                )
            describe_boot(r, dists.get(nm))
    out["arms"] = per_arm
    return out


def design_se(
    row_var: Any,
    draw_var: Any,
    seed_var: Any,
    rows: Any,
    draws: Any,
    seeds: Any,
    selections: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Standard error and degrees of freedom of an arm's Delta in a design (vectorised).

    Args:
        row_var: per-row variance V of the linearised paired difference (``row_var`` of
            :func:`paired_comparison`): the rows contribute V / rows.
        draw_var: variance of a random draw's selection effect (``draw_component``).
        seed_var: variance of one training run about its selection's mean (``seed``).
        rows, draws, seeds: the design: eval rows n, random draws R, training seeds K.
        selections: trained selections in the study (arms + R; the seed variance's pool).

    SE^2 = V/n + (draw_var + seed_var/K)/R + seed_var/K with K >= 2, the parts' degrees of
    freedom n - 1, R - 1 and (selections - 1)(K - 1), combined by Welch-Satterthwaite; with
    K = 1 the study cannot tell the two run variances apart and counts an arm's run as a whole
    random run: SE^2 = V/n + (draw_var + seed_var)(1/R + 1), df from R - 1 (as
    :func:`paired_comparison` does).
    """
    V, a, e, n, R, K, S = np.broadcast_arrays(
        *(
            np.asarray(x, np.float64)
            for x in (row_var, draw_var, seed_var, rows, draws, seeds, selections)
        )
    )
    row = V / n
    one = K < 2
    draw_part = np.where(one, (a + e) * (1 / R + 1), (a + e / K) / R)
    seed_part = np.where(one, 0.0, e / K)
    var = row + draw_part + seed_part
    seed_df = np.where(one, np.inf, (S - 1) * (K - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = row**2 / (n - 1) + draw_part**2 / (R - 1) + seed_part**2 / seed_df
        df = np.where(denom > 0, var**2 / denom, np.inf)
    return np.sqrt(var), df


def design_mde(
    row_var: Any,
    draw_var: Any,
    seed_var: Any,
    rows: Any,
    draws: Any,
    seeds: Any,
    selections: Any,
    *,
    family: int,
    alpha: float = 0.05,
    power: float = 0.8,
) -> np.ndarray:
    """The minimal detectable |Delta| of a design: (t_{df, 1 - alpha/(2 m)} + t_{df, power}) x
    SE (:func:`design_se`), m = ``family`` (Holm's first step tests at alpha / m, so an effect
    this large is found with at least ``power`` whatever the other arms do)."""
    se, df = design_se(row_var, draw_var, seed_var, rows, draws, seeds, selections)
    df = np.minimum(df, _T_NORMAL_DF)
    q = t_ppf(np.broadcast_to(1 - alpha / (2 * family), df.shape), df)
    return (q + t_ppf(np.broadcast_to(power, df.shape), df)) * se


def length_adjusted(
    arms: Mapping[str, Mapping[str, Any]],
    lengths: Mapping[str, float],
    draw_deltas: Sequence[float],
    draw_lengths: Sequence[float],
) -> dict[str, Any]:
    """Each arm's Delta with the part its selection's answer length explains removed.

    Across the study's selections -- every arm with a Delta and every random draw (its
    deviation from the random mean) -- an ordinary least-squares line Delta = b0 + b (L - L_r),
    with L a selection's mean response characters and L_r the random draws' mean. An arm's
    length-adjusted difference is Delta - b (L - L_r): what is left once "picks longer (or
    shorter) answers than random" is priced at the study's own rate b. Its standard error adds
    b's: SE_adj^2 = SE^2 + (L - L_r)^2 SE_b^2 (df by Welch-Satterthwaite). b also absorbs any
    quality effect that goes with length across these arms; with fewer than 3 selections or
    no spread in length there is no line.

    Args:
        arms: name -> a :func:`paired_comparison` arm entry (``delta``, ``se``, ``df``).
        lengths: name -> the selection's mean response characters.
        draw_deltas, draw_lengths: each random draw's deviation from the random mean, and its
            selection's mean response characters.

    Returns:
        ``slope_per_1k_chars``, its ``slope_se``, ``points``, ``r2``, ``reference_chars`` and
        per arm ``delta``, ``se``, ``ci95`` (or a ``reason`` when there is no line).
    """
    pts = [
        (float(a["delta"]), float(lengths[nm]), nm)
        for nm, a in arms.items()
        if "delta" in a and lengths.get(nm) is not None and math.isfinite(lengths[nm])
    ]
    draws = [
        (float(d), float(L))
        for d, L in zip(draw_deltas, draw_lengths, strict=True)
        if L is not None and math.isfinite(L)
    ]
    if not draws:
        return {"reason": "no random draw has a selection length", "arms": {}}
    ref = float(np.mean([L for _, L in draws]))
    y = np.array([d for d, _, _ in pts] + [d for d, _ in draws])
    x = np.array([L for _, L, _ in pts] + [L for _, L in draws]) - ref
    n = len(y)
    sxx = float(((x - x.mean()) ** 2).sum())
    if n < 3 or sxx <= 0:
        return {"reason": "fewer than 3 selections, or all of one length", "arms": {}}
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    resid = y - y.mean() - slope * (x - x.mean())
    s2 = float((resid**2).sum() / (n - 2))
    slope_var = s2 / sxx
    sst = float(((y - y.mean()) ** 2).sum())
    out: dict[str, Any] = {
        "slope_per_1k_chars": slope * 1000,
        "slope_se": math.sqrt(slope_var) * 1000,
        "points": n,
        "r2": 1 - float((resid**2).sum()) / sst if sst > 0 else None,
        "reference_chars": ref,
        "arms": {},
    }
    for d, L, nm in pts:
        a = arms[nm]
        dx = L - ref
        var, df = satterthwaite([1.0, dx * dx], [a["se"] ** 2, slope_var], [a["df"], n - 2])
        adj = d - slope * dx
        q = float(t_ppf(0.975, min(df, _T_NORMAL_DF))) * math.sqrt(var) if var > 0 else 0.0
        out["arms"][nm] = {
            "delta": adj,
            "se": math.sqrt(var),
            "ci95": [adj - q, adj + q],
            "length_part": slope * dx,
        }
    return out


def style_effects(
    per_set: Mapping[str, Mapping[str, Mapping[str, Any]]],
    reference_tokens: Mapping[str, float],
) -> dict[str, dict[str, Any]]:
    """Per arm: where it beats random and where it loses to it, by reference style.

    An arm ``wins`` on a set when its uncorrected 95% interval of Delta lies below 0 and
    ``loses`` when it lies above. ``style_effect`` is True when it both wins and loses; the
    ``direction`` says whether the sets it wins on have longer references (mean answer tokens)
    than those it loses on (``long references``), shorter ones (``short references``), or
    neither. ``sign_flip`` marks point values of both signs (resolved or not).

    Args:
        per_set: set -> arm -> a :func:`paired_comparison` arm entry.
        reference_tokens: set -> mean answer tokens per row of its references.
    """
    out: dict[str, dict[str, Any]] = {}
    names = {nm for arms in per_set.values() for nm in arms}
    for nm in sorted(names):
        wins, loses, signs = [], [], set()
        deltas = {}
        for sname, arms in per_set.items():
            a = arms.get(nm) or {}
            if "ci95" not in a:
                continue
            deltas[sname] = a["delta"]
            signs.add(a["delta"] < 0)
            if a["ci95"][1] < 0:
                wins.append(sname)
            elif a["ci95"][0] > 0:
                loses.append(sname)
        direction = None
        if wins and loses:
            w = [reference_tokens[s] for s in wins]
            lo = [reference_tokens[s] for s in loses]
            if min(w) > max(lo):
                direction = "long references"
            elif max(w) < min(lo):
                direction = "short references"
            else:
                direction = "neither length"
        out[nm] = {
            "delta": deltas,
            "wins": wins,
            "loses": loses,
            "style_effect": bool(wins and loses),
            "direction": direction,
            "sign_flip": len(signs) > 1,
        }
    return out

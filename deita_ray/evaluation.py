"""What the eval stage computes, as pure functions (no Ray, no engine): eval rows from records,
the contamination key, the likelihood rendering, the bootstrap, the judge prompts and verdicts.

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
import re
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

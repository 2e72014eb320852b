"""Pure scoring helpers shared by every backend: the one score formula, digit token ids, and
fitting a prompt into the model context by truncating its text fields (never the template).

Example:
    >>> import numpy as np
    >>> float(expected_score(np.zeros((1, 6)))[0])
    3.5
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deita_ray.templates import COMPLEXITY_PIECES, QUALITY_PIECES, interleave

DIGITS: tuple[str, ...] = ("1", "2", "3", "4", "5", "6")


def expected_score(digit_logits: np.ndarray, n_labels: int = len(DIGITS)) -> np.ndarray:
    """The DEITA score: ``sum_k k * softmax(z)_k`` over the six digit logits (docs/scoring.md).

    Works on raw logits and on log-probabilities alike (softmax is shift-invariant), so the hf
    backend (logits) and the vllm backend (processed log-probabilities) share this formula. The
    ``rating`` scorer uses it with its own number of labels (values 1..N).

    Args:
        digit_logits: ``(n, n_labels)`` logits or log-probabilities of the label tokens
            ("1".."6" for DEITA), in order.
        n_labels: number of labels N (6 for the DEITA scorers).

    Returns:
        ``(n,)`` float64 scores in [1, N].
    """
    z = np.asarray(digit_logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != n_labels:
        raise ValueError(f"expected shape (n, {n_labels}), got {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return p @ np.arange(1, n_labels + 1, dtype=np.float64)


class DigitTokenError(ValueError):
    """A label (digit 1..6 for DEITA) is not a single token of the scorer's tokenizer, or a bad
    override."""


def resolve_label_ids(
    tokenizer: Any,
    labels: Sequence[str],
    override: Sequence[int] | None = None,
    override_key: str = "score.digit_token_ids",
    what: str = "digit",
) -> list[int]:
    """Token ids of label strings (the digits "1".."6" for DEITA), or a checked override.

    A label is looked up as a vocabulary entry first (LLaMA: "1" -> 29896, although encoding
    the text "1" gives a space token first), else by encoding it without special tokens, which
    must give exactly one token.

    Args:
        tokenizer: an HF tokenizer.
        labels: the label strings, in value order (label k has value k + 1).
        override: ids to use instead (checked: one distinct id per label, in the vocabulary).
        override_key: the config key of the override, for messages.
        what: what a label is called in messages ("digit", "rating token").

    Raises:
        DigitTokenError: a label is not a single token, or the override is not one distinct
            in-vocabulary id per label.
    """
    vocab_size = len(tokenizer)
    n = len(labels)
    if override is not None:
        ids = [int(i) for i in override]
        if len(ids) != n or len(set(ids)) != n or not all(0 <= i < vocab_size for i in ids):
            raise DigitTokenError(
                f"{override_key}={list(override)!r} must be {n} distinct ids in [0, {vocab_size})"
            )
        return ids
    vocab = tokenizer.get_vocab()
    ids = []
    for d in labels:
        if d in vocab:
            ids.append(int(vocab[d]))
            continue
        enc = tokenizer.encode(d, add_special_tokens=False)
        if len(enc) != 1 or enc[0] == tokenizer.unk_token_id:
            raise DigitTokenError(
                f"{what} {d!r} is not a single token of this tokenizer (encodes to {enc}); set "
                f"{override_key} to the {n} ids of {', '.join(repr(x) for x in labels)}"
            )
        ids.append(int(enc[0]))
    if len(set(ids)) != n:
        raise DigitTokenError(f"{what} tokens are not distinct: {ids}")
    return ids


def resolve_digit_ids(tokenizer: Any, override: Sequence[int] | None = None) -> list[int]:
    """Token ids of "1".."6" for a tokenizer, or a checked override (``score.digit_token_ids``).

    Raises:
        DigitTokenError: a digit is not a single token, or the override is not six distinct
            ids inside the vocabulary.
    """
    return resolve_label_ids(tokenizer, DIGITS, override)


@dataclass(frozen=True)
class PromptSpec:
    """A scorer prompt as template pieces around text fields (``len(pieces) == len(fields)+1``)."""

    pieces: tuple[str, ...]
    fields: tuple[str, ...]

    @property
    def text(self) -> str:
        return interleave(self.pieces, self.fields)


def complexity_spec(instruction: str) -> PromptSpec:
    """The complexity prompt of an instruction, as pieces and fields."""
    return PromptSpec(COMPLEXITY_PIECES, (instruction,))


def quality_spec(instruction: str, output: str) -> PromptSpec:
    """The quality prompt of an (instruction, output) pair, as pieces and fields."""
    return PromptSpec(QUALITY_PIECES, (instruction, output))


class PromptTooLong(ValueError):
    """Even with empty text fields the template does not fit the token budget."""


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def _prefix_chars(tokenizer: Any, text: str, n_tokens: int) -> str:
    """The longest prefix of ``text`` made of its first ``n_tokens`` tokens (cut at a character
    boundary via offsets when the tokenizer has them)."""
    if n_tokens <= 0:
        return ""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    ids = enc["input_ids"]
    if n_tokens >= len(ids):
        return text
    if tokenizer.is_fast:
        return text[: enc["offset_mapping"][n_tokens - 1][1]]
    return tokenizer.decode(ids[:n_tokens]).rstrip("\ufffd")


def water_fill(lengths: Sequence[int], budget: int) -> list[int]:
    """Per-field token caps: shorten the longest fields first until ``sum <= budget``.

    >>> water_fill([10, 100], 50)
    [10, 40]
    """
    if sum(lengths) <= budget:
        return list(lengths)
    budget = max(budget, 0)
    lo, hi = 0, max(lengths)
    while lo < hi:  # largest cap c with sum(min(l, c)) <= budget
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    caps = [min(n, lo) for n in lengths]
    # Hand leftover tokens to the fields in order (keeps the total at the budget).
    spare = budget - sum(caps)
    for i, n in enumerate(lengths):
        if spare <= 0:
            break
        if n > caps[i]:
            caps[i] += 1
            spare -= 1
    return caps


def fit_prompt(
    tokenizer: Any, spec: PromptSpec, max_tokens: int, ids: list[int] | None = None
) -> tuple[list[int], bool]:
    """Token ids of a prompt (BOS as in normal encoding), truncated to ``max_tokens``.

    If the prompt is too long, its text fields are cut (keeping their beginnings, the longest
    field first) and the prompt re-rendered, so the template stays intact.

    Args:
        tokenizer: an HF tokenizer.
        spec: the prompt.
        max_tokens: token budget of the whole prompt.
        ids: the prompt's token ids if already computed (saves a tokenizer call).

    Returns:
        ``(token_ids, truncated)``.

    Raises:
        PromptTooLong: the template alone does not fit.
    """
    if ids is None:
        ids = _encode(tokenizer, spec.text)
    if len(ids) <= max_tokens:
        return ids, False
    empty = _encode(tokenizer, interleave(spec.pieces, [""] * len(spec.fields)))
    if len(empty) > max_tokens:
        raise PromptTooLong(
            f"the prompt template alone has {len(empty)} tokens > budget {max_tokens}"
        )
    lengths = [len(tokenizer(f, add_special_tokens=False)["input_ids"]) for f in spec.fields]
    room = max_tokens - len(empty)
    # Token counts of pieces are not additive at boundaries: shrink the room until it fits.
    for _ in range(16):
        caps = water_fill(lengths, room)
        fields = [_prefix_chars(tokenizer, f, c) for f, c in zip(spec.fields, caps, strict=True)]
        out = _encode(tokenizer, interleave(spec.pieces, fields))
        if len(out) <= max_tokens:
            return out, True
        room = max(0, room - max(1, len(out) - max_tokens))
    raise PromptTooLong(f"could not fit the prompt into {max_tokens} tokens")

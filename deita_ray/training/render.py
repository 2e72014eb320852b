"""Conversations -> token ids with exact label masks, and the batches a worker trains on.

Masking contract: a conversation is rendered as a list of text segments, each flagged as a
*target* (carries loss) or not: vicuna_v1.1 (:func:`deita_ray.templates.vicuna_segments`), the
tokenizer's own chat template (:func:`chat_template_segments`), or the DEITA DPO script's
layout (:func:`deita_ray.templates.deita_dpo_segments`). Segments are tokenised one by one and
concatenated, so the mask is exact by construction: the labels that are not
:data:`IGNORE_INDEX` are the tokens of the target texts, nothing else. See docs/training.md.

Nothing here imports a training method, Ray or torch at import time; the Ray Data tokenising
actors of the methods derive from :class:`TokenizingStage` and run through
:func:`map_tokenize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from deita_ray.config import TrainingConfig
from deita_ray.models.backend import load_tokenizer

IGNORE_INDEX = -100
"""Label of every token that carries no loss (prompt, system, template, padding)."""

TEMPLATES_WITHOUT_BOS = ("deita_dpo",)
"""Renderings tokenised without the tokenizer's BOS prefix (the DEITA DPO script's TRL 0.7.2
tokenisation adds no special tokens)."""


class TemplateError(ValueError):
    """A conversation cannot be rendered with exact masks (the reason goes to rejects)."""


# ---------------------------------------------------------------------------------------------
# Rendering


def chat_template_segments(messages: list[dict], tokenizer: Any) -> list[tuple[str, bool]]:
    """Split the tokenizer's chat-template rendering into (text, is_target) segments.

    The text of assistant message ``i`` is what rendering ``messages[: i + 1]`` adds to the
    rendering of ``messages[:i]`` with the generation prompt; it holds the content and the
    template's end marker. Whatever follows the tokenizer's EOS token inside it (e.g. a newline
    after ``<|im_end|>``) is not a target; without an EOS there, trailing whitespace after the
    end marker is not a target either.

    Raises:
        TemplateError: the template is not incremental (a prefix of the conversation does not
            render to a prefix of the full text), so exact masks are impossible.
    """

    def render(msgs: list[dict], gen: bool) -> str:
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    eos = tokenizer.eos_token or ""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = render(msgs[:i], True)
        after = render(msgs[: i + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise TemplateError("chat template is not incremental; masks would be inexact")
        target, tail = after[len(before) :], ""
        content = m["content"]
        cut = target.rfind(eos, len(content)) if eos else -1
        if cut >= 0:
            target, tail = target[: cut + len(eos)], target[cut + len(eos) :]
        elif target.startswith(content):
            # No EOS in the template: the end marker is what follows the content, minus
            # trailing whitespace (layout between messages, not something to predict).
            marker = target[len(content) :]
            target, tail = content + marker.rstrip(), marker[len(marker.rstrip()) :]
        segments += [(before[len(done) :], False), (target, True), (tail, False)]
        done = after
    full = render(msgs, False)
    if not full.startswith(done):
        raise TemplateError("chat template is not incremental; masks would be inexact")
    segments.append((full[len(done) :], False))
    return [(t, tgt) for t, tgt in segments if t]


def render_segments(
    messages: list[dict], template: str, tokenizer: Any = None
) -> list[tuple[str, bool]]:
    """Render a conversation as (text, is_target) segments with the configured template."""
    from deita_ray import templates

    if template == "vicuna_v1.1":
        return list(templates.vicuna_segments(messages))
    if template == "deita_dpo":
        return list(templates.deita_dpo_segments(messages))
    if template == "chat_template":
        return chat_template_segments(messages, tokenizer)
    raise ValueError(f"unknown template {template!r}")


def only_last_target(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Keep the target flag only on the last assistant segment (DPO: the response)."""
    last = max((i for i, (_, t) in enumerate(segments) if t), default=-1)
    return [(text, tgt and i == last) for i, (text, tgt) in enumerate(segments)]


def check_template(t: TrainingConfig, model_path: str, stage: str) -> None:
    """Fail at start (not row by row) when ``template: chat_template`` has no template."""
    if (
        t.template == "chat_template"
        and not load_tokenizer(model_path, t.trust_remote_code).chat_template
    ):
        raise ValueError(
            f"{stage}.template: 'chat_template' but the tokenizer of {model_path} has none "
            "(use vicuna_v1.1)"
        )


# ---------------------------------------------------------------------------------------------
# Tokenising


def special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts in front of a plain encoding (usually ``[bos]``, or nothing)."""
    with_sp = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_sp) - len(without)
    if n > 0 and with_sp[n:] == without:
        return list(with_sp[:n])
    return []


def start_ids(segments: list[tuple[str, bool]], tokenizer: Any, template: str) -> list[int]:
    """The special ids a rendering starts with: the tokenizer's BOS prefix, unless the
    template adds none or the rendering already starts with the BOS text."""
    if template in TEMPLATES_WITHOUT_BOS:
        return []
    bos_text = tokenizer.bos_token or None
    if bos_text and segments and segments[0][0].startswith(bos_text):
        return []
    return special_prefix(tokenizer)


def tokenize_segments(
    segments_batch: list[list[tuple[str, bool]]], tokenizer: Any
) -> list[list[list[int]]]:
    """The ids of every segment (no special tokens), one tokenizer call for the whole batch."""
    flat = [text for segs in segments_batch for text, _ in segs]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, k = [], 0
    for segs in segments_batch:
        out.append(ids[k : k + len(segs)])
        k += len(segs)
    return out


def labelled(
    segments: list[tuple[str, bool]], pieces: list[list[int]]
) -> tuple[list[int], list[int]]:
    """Concatenate segment ids; labels are the ids of target segments, -100 elsewhere."""
    input_ids: list[int] = []
    labels: list[int] = []
    for (_, target), piece in zip(segments, pieces, strict=True):
        input_ids += piece
        labels += piece if target else [IGNORE_INDEX] * len(piece)
    return input_ids, labels


@dataclass
class Encoded:
    """One tokenised example."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def encode_segments(
    segments_batch: list[list[tuple[str, bool]]],
    tokenizer: Any,
    max_length: int,
    template: str = "vicuna_v1.1",
) -> list[Encoded]:
    """Tokenise rendered conversations segment by segment (one tokenizer call for the batch).

    The special prefix (BOS) is prepended, without loss, as :func:`start_ids` says. Sequences
    are cut to ``max_length`` tokens, keeping the beginning.
    """
    out = []
    for segs, pieces in zip(
        segments_batch, tokenize_segments(segments_batch, tokenizer), strict=True
    ):
        prefix = start_ids(segs, tokenizer, template)
        ids, labels = labelled(segs, pieces)
        input_ids = prefix + ids
        labels = [IGNORE_INDEX] * len(prefix) + labels
        truncated = len(input_ids) > max_length
        out.append(Encoded(input_ids[:max_length], labels[:max_length], truncated))
    return out


class TokenizingStage:
    """Base of the tokenising Ray Data stages of the training methods: the tokenizer, the
    rendering template and the token limit, from a training section's options."""

    def __init__(
        self, model_path: str, template: str, max_length: int, trust_remote_code: bool = False
    ):
        self.template = template
        self.max_length = max_length
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)


def map_tokenize(
    ds: Any,
    stage: type[TokenizingStage],
    model_path: str,
    t: TrainingConfig,
    batch_size: int,
    **constructor_kwargs: Any,
) -> Any:
    """``ds.map_batches(stage)`` on one single-CPU actor, built with ``t``'s template options
    (plus the stage's own ``constructor_kwargs``)."""
    from deita_ray.runtime import map_batches_kwargs

    return ds.map_batches(
        stage,
        fn_constructor_kwargs={
            "model_path": model_path,
            "template": t.template,
            "max_length": t.max_length,
            "trust_remote_code": t.trust_remote_code,
            **constructor_kwargs,
        },
        batch_format="pyarrow",
        **map_batches_kwargs(1, num_cpus=1, batch_size=batch_size),
    )


# ---------------------------------------------------------------------------------------------
# Batches


def pad_batch(sequences: list[Any], pad: int) -> np.ndarray:
    """Right-pad integer sequences to the longest one (int64 matrix)."""
    n = max((len(s) for s in sequences), default=0)
    out = np.full((len(sequences), n), pad, dtype=np.int64)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
    return out


def collate(input_ids: list[Any], labels: list[Any], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded ``input_ids``, ``labels`` (-100 on padding) and ``attention_mask``."""
    ids = pad_batch(input_ids, pad_id)
    lab = pad_batch(labels, IGNORE_INDEX)
    mask = pad_batch([np.ones(len(s), dtype=np.int64) for s in input_ids], 0)
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}

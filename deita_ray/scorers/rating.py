"""``rating``: direct scoring by a model prompted with a rubric.

The model reads a rubric template filled with each turn's ``{instruction}`` (required) and
``{response}`` (optional) and the turn's score is the expected value over the log-probabilities
of the N rating tokens after the prompt: ``sum_k k * softmax(z)_k`` with ``z`` the logits of the
labels "1".."N" (``scale: N``) or of ``rating_tokens`` (label k has value k), exactly the DEITA
scorers' formula and code path, so a ``rating`` with the DEITA quality template and scale 6
equals ``deita_quality``. Label ids come from the tokenizer (a label that is not a single token
fails at start, naming it; ``token_ids`` overrides them). One prefill per turn, no history;
a prompt too long for the model is cut inside its text fields and flagged.

Columns (``name`` defaults to ``rating``):
  - ``turn`` -> ``rating_scores`` (list<double>, one per turn);
  - ``row`` -> ``rating``: mean over the row's turns;
  - ``truncated`` -> ``rating_truncated`` (bool).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from deita_ray.scorers.base import ScorerKind, ScorerSpec
from deita_ray.scorers.deita import LabelKind, label_outputs

DEFAULT_SCALE = 5

DEFAULT_TEMPLATE = (
    "Rate the response to the instruction below on a scale of 1 to 5, where 1 means unhelpful, "
    "wrong or off-topic and 5 means correct, complete, clear and helpful. Answer with one digit."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n{response}\n\n### Rating (1-5): "
)
"""The rubric when the entry sets no ``template`` (written for scale 5)."""

MAX_LABELS = 20
"""vLLM returns at most 20 log-probabilities per token by default (``max_logprobs``)."""


class RatingKind(LabelKind):
    kind = "rating"
    default_name = "rating"
    outputs = label_outputs("rating", extra_default=True)
    options = ("scale", "rating_tokens", "token_ids")
    template_fields = ("instruction", "response")
    required_fields = ("instruction",)
    default_template = DEFAULT_TEMPLATE

    def check(self, spec: ScorerSpec, digit_token_ids: Sequence[int] | None) -> ScorerSpec:
        from deita_ray.config import ConfigError  # noqa: PLC0415

        opts = dict(spec.options)
        tokens = opts.get("rating_tokens")
        scale = opts.get("scale")
        if tokens is not None:
            if scale is not None and scale != len(tokens):
                raise ConfigError(
                    f"{spec.key}.scale: {scale} but rating_tokens has {len(tokens)} labels"
                )
            if len(set(tokens)) != len(tokens):
                raise ConfigError(f"{spec.key}.rating_tokens: {tokens!r} are not distinct")
            scale = len(tokens)
        scale = DEFAULT_SCALE if scale is None else scale
        if not 2 <= scale <= MAX_LABELS:
            raise ConfigError(f"{spec.key}.scale: {scale} must be in [2, {MAX_LABELS}]")
        if tokens is None:
            tokens = [str(k) for k in range(1, scale + 1)]
            if scale != DEFAULT_SCALE and spec.pieces == _default_pieces():
                raise ConfigError(
                    f"{spec.key}.template: the default rubric is written for scale "
                    f"{DEFAULT_SCALE}; give your own template for scale {scale}"
                )
        ids = opts.get("token_ids")
        if ids is not None and len(ids) != scale:
            raise ConfigError(
                f"{spec.key}.token_ids: {ids!r} must hold {scale} ids (one per label)"
            )
        opts.update(scale=scale, rating_tokens=list(tokens))
        return dataclasses.replace(spec, options=opts)

    def label_strings(self, spec: ScorerSpec) -> tuple[str, ...]:
        return tuple(spec.options["rating_tokens"])

    def override_key(self, spec: ScorerSpec) -> tuple[str, str]:
        return f"{spec.key}.token_ids", "rating token"


def _default_pieces() -> tuple[str, ...]:
    from deita_ray.scorers.base import parse_template  # noqa: PLC0415

    return parse_template(DEFAULT_TEMPLATE, ("instruction", "response"), (), "rating")[0]


KINDS: dict[str, ScorerKind] = {"rating": RatingKind()}

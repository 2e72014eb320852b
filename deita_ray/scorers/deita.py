"""The DEITA scorers, ``deita_complexity`` and ``deita_quality``, and the label-score machinery
they share with ``rating``.

A label scorer renders one prompt per turn (template pieces around the turn's text fields),
reads the model's next-token distribution over N label tokens after it (one prefill, never
decoding) and scores the turn with the expected label value ``sum_k k * softmax(z)_k``
(:func:`deita_ray.scoring.expected_score`). A prompt longer than the model's context is cut
inside its text fields (longest field first, keeping beginnings), never inside the template,
and the row is flagged ``truncated``.

``deita_complexity``: the paper's complexity prompt on each turn's instruction alone (no
history), labels "1".."6" (``score.digit_token_ids`` overrides their ids).
  - ``turn`` -> ``complexity_scores`` (list<double>, one per turn; written by default);
  - ``row`` -> ``complexity``: mean over the turns (off by default: ``columns: [turn, row]``);
  - ``truncated`` -> ``complexity_truncated`` (off by default; the stage's ``truncated`` column
    always ORs it in).

``deita_quality``: the paper's quality prompt on each turn's (instruction, response), same
columns with ``quality``. When both run, the stage also writes ``evol_score`` =
``sum_i complexity_i * quality_i`` over turns. Model: the entry's ``model``, else
``score.complexity_model`` / ``score.quality_model``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from deita_ray.scorers.base import FLAG, ROW, TURN, BoundScorer, LabelRequest, Output, ScorerKind

if TYPE_CHECKING:
    from deita_ray.scorers.base import BatchView, Requests, ScorerSpec


def label_outputs(label: str, extra_default: bool) -> tuple[Output, ...]:
    """The outputs of a label scorer (row mean and flag on by default iff ``extra_default``)."""
    return (
        Output("turn", "scores", TURN, doc=f"{label} of each turn (expected label value)"),
        Output("row", "", ROW, default=extra_default, doc=f"mean {label} over the row's turns"),
        Output(
            "truncated",
            "truncated",
            FLAG,
            "bool",
            default=extra_default,
            doc="a prompt of the row was cut inside its text fields to fit the context",
        ),
    )


class LabelScorer(BoundScorer):
    """Per turn, one prompt whose label distribution gives the turn's score."""

    def __init__(self, kind: ScorerKind, spec: ScorerSpec, tokenizer: Any, budget: int):
        super().__init__(kind, spec, tokenizer, budget)
        from deita_ray.scoring import PromptSpec  # noqa: PLC0415

        self.prompt = PromptSpec
        assert spec.label_ids is not None, "label ids are resolved on the driver"
        self.label_ids = spec.label_ids

    def prepare(self, view: BatchView) -> Requests:
        reqs: Requests = []
        for i, turns in enumerate(view.turns):
            if turns is None:
                continue
            for t, (instruction, response) in enumerate(turns):
                text = {"instruction": instruction, "response": response}
                spec = self.prompt(self.spec.pieces, tuple(text[f] for f in self.spec.fields))
                reqs.append(LabelRequest(i, t, spec, self.label_ids))
        return reqs

    def finish(self, view: BatchView, requests: list) -> tuple[dict, list[bool]]:
        turn: list[list[float] | None] = [None] * view.n
        cut = [False] * view.n
        for r in requests:
            cut[r.row] = cut[r.row] or r.cut
            if not view.is_live(r.row):
                continue
            if turn[r.row] is None:
                turn[r.row] = [None] * len(view.turns[r.row] or ())
            turn[r.row][r.turn] = r.score
        live = [view.is_live(i) and turn[i] is not None for i in range(view.n)]
        values = {
            "turn": [turn[i] if live[i] else None for i in range(view.n)],
            "row": [sum(turn[i]) / len(turn[i]) if live[i] else None for i in range(view.n)],
            "truncated": [cut[i] if view.is_live(i) else None for i in range(view.n)],
        }
        return self.arrays(values), cut


class LabelKind(ScorerKind):
    """A kind scored by the expected value over label tokens (DEITA, rating)."""

    has_labels = True
    scorer = LabelScorer
    labels: tuple[str, ...] = ("1", "2", "3", "4", "5", "6")

    def label_strings(self, spec: ScorerSpec) -> tuple[str, ...]:
        return self.labels

    def resolve_labels(self, spec: ScorerSpec, tokenizer: Any) -> ScorerSpec:
        from deita_ray.scoring import resolve_label_ids  # noqa: PLC0415

        override_key, what = self.override_key(spec)
        ids = resolve_label_ids(
            tokenizer, self.label_strings(spec), spec.options.get("token_ids"), override_key, what
        )
        return spec.with_labels(ids)

    def override_key(self, spec: ScorerSpec) -> tuple[str, str]:
        return "score.digit_token_ids", "digit"


class DeitaKind(LabelKind):
    """``deita_complexity`` / ``deita_quality``: the paper's fixed prompts, labels 1..6."""

    def __init__(self, kind: str, name: str, pieces: tuple[str, ...], fields: tuple[str, ...]):
        self.kind = kind
        self.default_name = name
        self.outputs = label_outputs(name, extra_default=False)
        self._pieces = pieces
        self._fields = fields

    def check(self, spec: ScorerSpec, digit_token_ids: Sequence[int] | None) -> ScorerSpec:
        import dataclasses  # noqa: PLC0415

        if "turn" not in spec.columns:
            from deita_ray.config import ConfigError  # noqa: PLC0415

            raise ConfigError(f"{spec.key}.columns: {self.kind} always writes 'turn'")
        options = {"token_ids": None if digit_token_ids is None else list(digit_token_ids)}
        return dataclasses.replace(spec, pieces=self._pieces, fields=self._fields, options=options)


def _deita_kinds() -> dict[str, ScorerKind]:
    from deita_ray.templates import COMPLEXITY_PIECES, QUALITY_PIECES  # noqa: PLC0415

    return {
        "deita_complexity": DeitaKind(
            "deita_complexity", "complexity", COMPLEXITY_PIECES, ("instruction",)
        ),
        "deita_quality": DeitaKind(
            "deita_quality", "quality", QUALITY_PIECES, ("instruction", "response")
        ),
    }


KINDS: dict[str, ScorerKind] = _deita_kinds()

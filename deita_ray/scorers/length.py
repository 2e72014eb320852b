"""``length``: instruction and response lengths, in characters and (with a tokenizer) tokens.

No model runs: the scorer is a Ray Data CPU task, never a model actor. ``model`` is optional;
when given, only its tokenizer is loaded (in the task) to count tokens (no special tokens).
Characters are Unicode code points, as the ``instruction_length`` / ``response_length``
selection baselines count them.

Columns (``name`` defaults to empty: the columns carry no prefix; with a name ``n`` they are
``n_instruction_chars`` ...). Row values are sums over the row's turns (a turn is a user
message and the assistant message after it; system messages are not counted):
  - ``instruction_chars``, ``response_chars`` (int64, written by default);
  - ``instruction_tokens``, ``response_tokens`` (int64; by default when ``model`` is set);
  - ``instruction_chars_turns``, ``response_chars_turns``, ``instruction_tokens_turns``,
    ``response_tokens_turns`` (list<int64>, one per turn; off by default).

The selection baselines ``instruction_length`` / ``response_length`` rank by
``instruction_chars`` / ``response_chars`` of the first ``length`` scorer when one ran.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from deita_ray.scorers.base import ROW, TURN, BoundScorer, Output, ScorerKind

if TYPE_CHECKING:
    from deita_ray.scorers.base import BatchView, ScorerSpec

TOKEN_OUTPUTS = (
    "instruction_tokens",
    "response_tokens",
    "instruction_tokens_turns",
    "response_tokens_turns",
)


class LengthScorer(BoundScorer):
    def prepare(self, view: BatchView) -> list:
        return []

    def finish(self, view: BatchView, requests: list) -> tuple[dict, list[bool]]:
        n = view.n
        live = [i for i in range(n) if view.turns[i] is not None and view.is_live(i)]
        texts = {"instruction": [], "response": []}
        for i in live:
            for instruction, response in view.turns[i]:  # type: ignore[union-attr]
                texts["instruction"].append(instruction)
                texts["response"].append(response)
        vals = self.nulls(view, [o.key for o in self.kind.outputs])
        for part in ("instruction", "response"):
            counts = {"chars": [len(x) for x in texts[part]]}
            if self.tokenizer is not None and texts[part]:
                ids = self.tokenizer(texts[part], add_special_tokens=False)["input_ids"]
                counts["tokens"] = [len(x) for x in ids]
            k = 0
            for i in live:
                m = len(view.turns[i])  # type: ignore[arg-type]
                for unit, values in counts.items():
                    vals[f"{part}_{unit}_turns"][i] = values[k : k + m]
                    vals[f"{part}_{unit}"][i] = sum(values[k : k + m])
                k += m
        return self.arrays(vals), [False] * n


class LengthKind(ScorerKind):
    kind = "length"
    scorer = LengthScorer
    default_name = ""
    uses_model = False
    outputs = tuple(
        Output(
            f"{part}_{unit}{turns}",
            f"{part}_{unit}{turns}",
            TURN if turns else ROW,
            "int64",
            default=not turns,
            doc=f"{part} {unit}" + (" per turn" if turns else ", summed over turns"),
        )
        for turns in ("", "_turns")
        for part in ("instruction", "response")
        for unit in ("chars", "tokens")
    )

    def build_spec(self, sc, model, key, digit_token_ids=None) -> ScorerSpec:  # type: ignore[override]
        from deita_ray.config import ConfigError  # noqa: PLC0415

        spec = super().build_spec(sc, model, key, digit_token_ids)
        tokens = [k for k in spec.columns if k in TOKEN_OUTPUTS]
        if model is None and sc.columns is not None and tokens:
            raise ConfigError(
                f"{key}.columns: {tokens[0]!r} counts tokens and needs a model (its tokenizer)"
            )
        if model is None:
            columns = {k: v for k, v in spec.columns.items() if k not in TOKEN_OUTPUTS}
            spec = dataclasses.replace(spec, columns=columns)
        return spec


KINDS: dict[str, ScorerKind] = {"length": LengthKind()}

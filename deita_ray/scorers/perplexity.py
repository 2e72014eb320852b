"""``perplexity``: how well a model predicts each response given its instruction and history.

Rendering: the row's special prefix (the tokenizer's BOS as normal encoding adds it; a
tokenizer that adds none uses its BOS, else its EOS token, as GPT-2 does), then for every turn
the template filled with the turn's instruction (default ``"{instruction}\\n"``, Superfiltering's
plain prompt) followed by the turn's response. Pieces are tokenized separately and concatenated,
so a response has the same tokens wherever it appears (``ifd`` relies on this). One prefill per
row gives ``log p(token | everything before it)`` for every response token of every turn
(:meth:`~deita_ray.models.backend.Backend.token_logprobs`, fp32 log-softmax).

Columns (``name`` defaults to ``ppl``):
  - ``turn_nll`` -> ``ppl_nll_turns`` (list<double>): mean negative log-likelihood per response
    token of each turn (null for an empty response, or a turn cut off entirely);
  - ``nll`` -> ``ppl_nll``: token-weighted mean over all scored response tokens of the row;
  - ``row`` -> ``ppl``: ``exp(ppl_nll)``, the row's response perplexity;
  - ``tokens`` -> ``ppl_tokens`` (int64): response tokens scored;
  - ``truncated`` -> ``ppl_truncated`` (bool).

Too long for the model: the rendering is cut at the model's token budget (keeping the
beginning); response tokens past it are not scored, turns that start past it get a null value,
and the row is flagged ``ppl_truncated`` (and ``truncated``). A row none of whose response
tokens fit is rejected with reason ``prompt_too_long``. A row whose responses are all empty gets
nulls (nothing to score; not a reject).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deita_ray.scorers.base import FLAG, ROW, TURN, BoundScorer, LogprobRequest, Output, ScorerKind

if TYPE_CHECKING:
    from deita_ray.scorers.base import BatchView, Requests, ScorerSpec

DEFAULT_TEMPLATE = "{instruction}\n"
"""Superfiltering's plain prompt (``PROMPT_DICT_NONE``): the instruction and a newline."""

SCORED_TOKENS = (
    Output("tokens", "tokens", ROW, "int64", doc="response tokens scored"),
    Output("truncated", "truncated", FLAG, "bool", doc="response tokens past the budget"),
)
"""The last outputs of every :class:`ConversationScorer` kind (:meth:`ConversationScorer.close`
writes them)."""


def context_prefix(tokenizer: Any) -> list[int]:
    """Token ids a sequence starts with: what normal encoding puts before the text (BOS), else
    the BOS token, else the EOS token (GPT-2's document separator), so that the first response
    token always has a context.

    Raises:
        ValueError: the tokenizer has none of them.
    """
    from deita_ray.training.render import special_prefix  # noqa: PLC0415

    ids = special_prefix(tokenizer)
    if ids:
        return ids
    for tok_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return [int(tok_id)]
    raise ValueError("the tokenizer has no BOS or EOS token to start a sequence with")


@dataclass
class Layout:
    """A row's conditioned sequence (cut to the budget) and where each turn's response is.

    Attributes:
        seq: prefix + (context, response) per turn, ending at the last scored response token.
        spans: per turn, the ``[a, b)`` positions of its scored response tokens in ``seq``, or
            None (empty response, or cut off entirely).
        cut: response tokens were dropped to fit the budget.
    """

    seq: list[int]
    spans: list[tuple[int, int] | None]
    cut: bool

    @property
    def start(self) -> int:
        return min(a for a, _ in (s for s in self.spans if s is not None))

    def response(self, t: int) -> list[int]:
        a, b = self.spans[t]  # type: ignore[misc]
        return self.seq[a:b]


class ConversationScorer(BoundScorer):
    """Renders rows for token-log-probability kinds and folds NLLs (perplexity, ifd)."""

    def __init__(self, kind: ScorerKind, spec: ScorerSpec, tokenizer: Any, budget: int):
        super().__init__(kind, spec, tokenizer, budget)
        self.prefix = context_prefix(tokenizer)

    def layouts(self, view: BatchView) -> dict[int, Layout]:
        """Layouts of the live rows (rejecting rows with no response token in the budget)."""
        from deita_ray.templates import interleave  # noqa: PLC0415

        rows = [i for i, turns in enumerate(view.turns) if turns is not None]
        contexts, responses = [], []
        for i in rows:
            for instruction, response in view.turns[i]:  # type: ignore[union-attr]
                contexts.append(interleave(self.spec.pieces, [instruction]))
                responses.append(response)
        tok = self.tokenizer
        ctx_ids = tok(contexts, add_special_tokens=False)["input_ids"] if contexts else []
        resp_ids = tok(responses, add_special_tokens=False)["input_ids"] if responses else []
        out: dict[int, Layout] = {}
        k = 0
        for i in rows:
            seq = list(self.prefix)
            spans: list[tuple[int, int] | None] = []
            for _ in view.turns[i]:  # type: ignore[union-attr]
                seq.extend(ctx_ids[k])
                a = len(seq)
                seq.extend(resp_ids[k])
                spans.append((a, len(seq)) if len(seq) > a else None)
                k += 1
            kept = [
                None if s is None or s[0] >= self.budget else (s[0], min(s[1], self.budget))
                for s in spans
            ]
            cut = kept != spans
            if not any(kept):
                if any(spans):
                    first = next(s for s in spans if s is not None)[0]
                    view.reject(
                        i,
                        "prompt_too_long",
                        f"{self.spec.key} ({self.spec.kind}): the first response starts at token "
                        f"{first}, past the model's budget of {self.budget} tokens",
                    )
                continue  # nothing to score: null values
            end = max(b for _, b in (s for s in kept if s is not None))
            out[i] = Layout(seq[:end], kept, cut)
        return out

    @staticmethod
    def nll(values: Any, layout: Layout, t: int) -> tuple[float, int]:
        """(sum of -log p, tokens) of turn ``t``'s scored response tokens."""
        a, b = layout.spans[t]  # type: ignore[misc]
        lo = a - layout.start
        part = values[lo : lo + (b - a)]
        return -math.fsum(float(v) for v in part), b - a

    def start(self, view: BatchView, keys: Sequence[str]) -> tuple[dict[str, list], list[bool]]:
        """Null values of ``keys`` and ``truncated``, and per row whether its layout was cut
        (after :meth:`layouts`, in :meth:`finish`)."""
        cut = [False] * view.n
        for i, lay in self._layouts.items():
            cut[i] = lay.cut
        return self.nulls(view, (*keys, "truncated")), cut

    def close(
        self, view: BatchView, vals: dict[str, list], cut: list[bool], turn_keys: Sequence[str]
    ) -> tuple[dict, list[bool]]:
        """The columns: every live row with turns gets its ``truncated`` flag, and one whose
        responses are all empty a null per turn (``turn_keys``) and 0 tokens."""
        for i in range(view.n):
            if view.is_live(i) and view.turns[i] is not None:
                vals["truncated"][i] = cut[i]
                if vals[turn_keys[0]][i] is None:  # all responses empty: one null per turn
                    for k in turn_keys:
                        vals[k][i] = [None] * len(view.turns[i])  # type: ignore[arg-type]
                    vals["tokens"][i] = 0
        return self.arrays(vals), cut


class PerplexityScorer(ConversationScorer):
    def prepare(self, view: BatchView) -> Requests:
        self._layouts = self.layouts(view)
        return [LogprobRequest(i, -1, lay.seq, lay.start) for i, lay in self._layouts.items()]

    def finish(self, view: BatchView, requests: list) -> tuple[dict, list[bool]]:
        vals, cut = self.start(view, ("turn_nll", "nll", "row", "tokens"))
        for r in requests:
            i = r.row
            if not view.is_live(i):
                continue
            lay = self._layouts[i]
            turn_nll: list[float | None] = []
            total, count = 0.0, 0
            for t, span in enumerate(lay.spans):
                if span is None:
                    turn_nll.append(None)
                    continue
                s, m = self.nll(r.values, lay, t)
                turn_nll.append(s / m)
                total += s
                count += m
            vals["turn_nll"][i] = turn_nll
            vals["nll"][i] = total / count
            vals["row"][i] = math.exp(total / count)
            vals["tokens"][i] = count
        return self.close(view, vals, cut, ("turn_nll",))


class PerplexityKind(ScorerKind):
    kind = "perplexity"
    scorer = PerplexityScorer
    default_name = "ppl"
    outputs = (
        Output("turn_nll", "nll_turns", TURN, doc="mean NLL per response token, per turn"),
        Output("nll", "nll", ROW, doc="token-weighted mean NLL over the row's response tokens"),
        Output("row", "", ROW, doc="exp(nll): the row's response perplexity"),
        *SCORED_TOKENS,
    )
    template_fields = ("instruction",)
    required_fields = ("instruction",)
    default_template = DEFAULT_TEMPLATE


KINDS: dict[str, ScorerKind] = {"perplexity": PerplexityKind()}

"""``ifd``: instruction-following difficulty (Li et al. 2024; Superfiltering's filter).

IFD = (mean NLL per token of the response given the instruction) / (mean NLL per token of the
response alone), same model, same response tokens. Two kinds of prefill: the conditioned one is
the ``perplexity`` rendering (special prefix, then per turn the template filled with the
instruction — default ``"{instruction}\\n"`` — and the response; one prefill per row, history
included for later turns); the alone one is the special prefix followed by the response's own
tokens (one prefill per turn). A low IFD means the instruction makes the response much easier to
predict; an IFD near or above 1 means it does not help.

Rows with IFD >= ``max_ifd`` (default 1.0): Superfiltering (``code_ifd/select_data.py``,
``filter_threash=1``) drops them before ranking, as samples whose instruction does not help the
model predict the response (misaligned pairs). Here the row column ``ifd`` is null for them,
so no selection ranks them (they count as ``missing_score``); the two losses stay in
``ifd_nll_cond`` / ``ifd_nll_alone`` and the per-turn columns keep every raw ratio
(``select.score: ifd_nll_cond / ifd_nll_alone`` ranks by the unfiltered ratio). ``max_ifd:
.inf`` keeps every ratio.

Columns (``name`` defaults to ``ifd``):
  - ``turn`` -> ``ifd_turns`` (list<double>): each turn's ratio (raw, never filtered);
  - ``turn_nll_cond`` -> ``ifd_nll_cond_turns``, ``turn_nll_alone`` -> ``ifd_nll_alone_turns``;
  - ``row`` -> ``ifd``: ``ifd_nll_cond / ifd_nll_alone``, null when >= ``max_ifd``;
  - ``nll_cond`` -> ``ifd_nll_cond``, ``nll_alone`` -> ``ifd_nll_alone``: token-weighted means
    over all the row's scored response tokens;
  - ``ppl_ratio`` -> ``ifd_ppl_ratio``: ``exp(nll_cond) / exp(nll_alone)``, Superfiltering's
    ``ifd_ppl`` (same threshold rule; off by default);
  - ``tokens`` -> ``ifd_tokens`` (int64), ``truncated`` -> ``ifd_truncated`` (bool).

Differences from Superfiltering's script, on purpose: the response is tokenized once and the
same tokens are scored in both conditions (the script re-tokenizes the joined text), and the
alone condition scores every response token after the special prefix (the script's GPT-2 run
has no BOS and skips the first token). Too long for the model: as ``perplexity`` (the scored
response tokens are the same in both conditions).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from deita_ray.scorers.base import ROW, TURN, LogprobRequest, Output, ScorerKind
from deita_ray.scorers.perplexity import SCORED_TOKENS, ConversationScorer, PerplexityKind

if TYPE_CHECKING:
    from deita_ray.scorers.base import BatchView, Requests, ScorerSpec

DEFAULT_MAX_IFD = 1.0


class IFDScorer(ConversationScorer):
    def prepare(self, view: BatchView) -> Requests:
        self._layouts = self.layouts(view)
        reqs: Requests = []
        p = len(self.prefix)
        for i, lay in self._layouts.items():
            reqs.append(LogprobRequest(i, -1, lay.seq, lay.start))
            for t, span in enumerate(lay.spans):
                if span is not None:
                    reqs.append(LogprobRequest(i, t, [*self.prefix, *lay.response(t)], p))
        return reqs

    def finish(self, view: BatchView, requests: list) -> tuple[dict, list[bool]]:
        keys = ("turn", "turn_nll_cond", "turn_nll_alone", "row", "nll_cond", "nll_alone")
        vals, cut = self.start(view, (*keys, "ppl_ratio", "tokens"))
        cond = {r.row: r for r in requests if r.turn < 0}
        alone = {(r.row, r.turn): r for r in requests if r.turn >= 0}
        max_ifd = self.spec.options.get("max_ifd")
        for i, lay in self._layouts.items():
            if not view.is_live(i):
                continue
            per: dict[str, list] = {"turn": [], "turn_nll_cond": [], "turn_nll_alone": []}
            sum_c = sum_a = 0.0
            count = 0
            for t, span in enumerate(lay.spans):
                if span is None:
                    for k in per:
                        per[k].append(None)
                    continue
                sc, m = self.nll(cond[i].values, lay, t)
                sa = -math.fsum(float(v) for v in alone[(i, t)].values)
                per["turn_nll_cond"].append(sc / m)
                per["turn_nll_alone"].append(sa / m)
                per["turn"].append(_ratio(sc, sa))
                sum_c += sc
                sum_a += sa
                count += m
            for k, v in per.items():
                vals[k][i] = v
            ratio = _ratio(sum_c, sum_a)
            keep = ratio is not None and ratio < max_ifd
            vals["row"][i] = ratio if keep else None
            vals["nll_cond"][i] = sum_c / count
            vals["nll_alone"][i] = sum_a / count
            ppl = math.exp(sum_c / count - sum_a / count)
            vals["ppl_ratio"][i] = ppl if keep else None
            vals["tokens"][i] = count
        return self.close(view, vals, cut, ("turn", "turn_nll_cond", "turn_nll_alone"))


def _ratio(num: float, den: float) -> float | None:
    """``num / den``, or None where it is not a finite number (a zero alone loss)."""
    if den == 0:
        return None
    r = num / den
    return r if math.isfinite(r) else None


class IFDKind(PerplexityKind):
    """Perplexity's prompt and layout, scored in two conditions."""

    kind = "ifd"
    scorer = IFDScorer
    default_name = "ifd"
    options = ("max_ifd",)
    outputs = (
        Output("turn", "turns", TURN, doc="IFD of each turn (raw ratio)"),
        Output("turn_nll_cond", "nll_cond_turns", TURN, doc="per turn: NLL given instruction"),
        Output("turn_nll_alone", "nll_alone_turns", TURN, doc="per turn: NLL of response alone"),
        Output("row", "", ROW, doc="nll_cond / nll_alone; null when >= max_ifd"),
        Output("nll_cond", "nll_cond", ROW, doc="token-weighted mean NLL given the instruction"),
        Output("nll_alone", "nll_alone", ROW, doc="token-weighted mean NLL of responses alone"),
        Output("ppl_ratio", "ppl_ratio", ROW, default=False, doc="Superfiltering's ifd_ppl"),
        *SCORED_TOKENS,
    )

    def check(self, spec: ScorerSpec, digit_token_ids: Sequence[int] | None) -> ScorerSpec:
        opts = dict(spec.options)
        if opts.get("max_ifd") is None:
            opts["max_ifd"] = DEFAULT_MAX_IFD
        return dataclasses.replace(spec, options=opts)


KINDS: dict[str, ScorerKind] = {"ifd": IFDKind()}

"""The ``likelihood`` metric: per row the NLL of the reference answer given the prompt (one
prefill per row, prompt log-probabilities), and its mean with a bootstrap interval."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from deita_ray.config import ModelConfig, PipelineConfig
from deita_ray.data.rejects import RejectMarks
from deita_ray.data.sink import rejects_dir, stage_dir
from deita_ray.evaluation import likelihood_summary, likelihood_texts, likelihood_tokens
from deita_ray.progress import count_rows
from deita_ray.stages.eval.passes import (
    NAME,
    ModelCallable,
    read_folder,
    reason_counts,
    run_model_pass,
)

# ---------------------------------------------------------------------------------------------
# Ray Data callable (one model per actor)


def likelihood_table(batch: pa.Table, backend: Any, template: str) -> pa.Table:
    """Per row: prompt and answer token counts, the answer's summed and mean NLL (fp32 log-
    probabilities from the engine, summed in float64), or a reject mark.

    Reasons: ``template_error``, ``template_not_prefix``, ``empty_answer``, ``too_long``
    (prompt + answer beyond the engine's context), ``engine_error``, ``non_finite``.
    """
    rows = batch.to_pylist()
    n = len(rows)
    tok = backend.tokenizer
    marks = RejectMarks(n)

    def reject(i: int, reason: str, detail: str) -> None:
        marks.reject(i, reason, detail, {"id": rows[i]["id"], "messages": rows[i]["messages"]})

    seqs: list[list[int]] = []
    starts: list[int] = []
    live: list[int] = []
    prompt_tokens = [0] * n
    answer_tokens = [0] * n
    from deita_ray.evaluation import RenderError

    for i, row in enumerate(rows):
        try:
            p, f = likelihood_texts(row["messages"], template, tok)
        except RenderError as e:
            reject(i, e.reason, str(e))
            continue
        ids, start = likelihood_tokens(p, f, tok)
        prompt_tokens[i], answer_tokens[i] = start, len(ids) - start
        if start >= len(ids):
            reject(i, "empty_answer", "the answer renders to no token")
        elif len(ids) > backend.max_prompt_tokens:
            reject(
                i, "too_long", f"{len(ids)} tokens > {backend.max_prompt_tokens} the engine accepts"
            )
        else:
            seqs.append(ids)
            starts.append(start)
            live.append(i)
    nll_sum: list[float | None] = [None] * n
    if live:
        values, errors = backend.token_logprobs(seqs, starts)
        for k, i in enumerate(live):
            if errors[k] is not None:
                reject(i, "engine_error", errors[k])
                continue
            v = np.asarray(values[k], np.float64)
            if not np.isfinite(v).all():
                reject(i, "non_finite", "a log-probability is not finite")
                continue
            nll_sum[i] = float(-v.sum())
    out = pa.table(
        {
            "id": batch["id"],
            "seq": batch["seq"],
            "source": batch["source"],
            "prompt_tokens": pa.array(prompt_tokens, pa.int32()),
            "answer_tokens": pa.array(answer_tokens, pa.int32()),
            "nll_sum": pa.array(nll_sum, pa.float64()),
            "nll_mean": pa.array(
                [None if s is None else s / answer_tokens[i] for i, s in enumerate(nll_sum)],
                pa.float64(),
            ),
        }
    )
    return marks.attach(out)


class LikelihoodScorer(ModelCallable):
    """Ray Data callable: :func:`likelihood_table` with one model (loaded for prefill)."""

    def __init__(
        self, model_cfg: ModelConfig, model_path: str, template: str, progress: Any = None
    ):
        super().__init__(model_cfg, model_path, progress)
        self.template = template

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = likelihood_table(batch, self.backend, self.template)
        count_rows(self.progress, batch.num_rows)
        return out


# ---------------------------------------------------------------------------------------------
# The metric


def likelihood_metric(
    cfg: PipelineConfig, out_dir: str, sname: str, rows: pa.Table, model: tuple
) -> dict:
    key = f"{NAME}/{sname}/likelihood"
    run_model_pass(cfg, rows, LikelihoodScorer, model, out_dir, key, template=cfg.eval.template)
    got = read_folder(stage_dir(out_dir, key), ["seq", "nll_sum", "answer_tokens"])
    nll = got["nll_sum"].to_numpy() if got is not None else np.empty(0)
    tokens = got["answer_tokens"].to_numpy() if got is not None else np.empty(0)
    out = likelihood_summary(nll, tokens, cfg.eval.bootstrap_resamples, cfg.eval.seed)
    out["failed_by_reason"] = reason_counts(rejects_dir(out_dir, key))
    return out

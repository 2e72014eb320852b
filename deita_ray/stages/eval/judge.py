"""Generation and judging: greedy answers of the evaluated model (:class:`Generator`), then
the judge model (:class:`JudgeModel`) grades each one (``judge_single``) or compares it with
``eval.judge.compare_to`` in both orders (``judge_pairwise``)."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deita_ray.config import ModelConfig, PipelineConfig
from deita_ray.data.rejects import RejectMarks
from deita_ray.data.sink import rejects_dir, stage_dir
from deita_ray.evaluation import bootstrap_means, generation_prompt
from deita_ray.progress import count_rows
from deita_ray.stages.eval import passes

# ---------------------------------------------------------------------------------------------
# Ray Data callables (one model per actor)


def _prompt_ids(text: str, tokenizer: Any) -> list[int]:
    from deita_ray.training.render import encode_segments

    return encode_segments([[(text, False)]], tokenizer, 1 << 62)[0].input_ids


def generate_texts(
    backend: Any, conversations: list[list[dict]], template: str, max_new_tokens: int
) -> tuple[list[str | None], list[str | None], list[str | None]]:
    """Greedy answers to each conversation's last user turn: ``(texts, reasons, details)``."""
    from deita_ray.evaluation import RenderError

    n = len(conversations)
    texts: list[str | None] = [None] * n
    reasons: list[str | None] = [None] * n
    details: list[str | None] = [None] * n
    prompts, budgets, live = [], [], []
    for i, msgs in enumerate(conversations):
        try:
            if template == "judge":
                p = backend.tokenizer.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=True
                )
            else:
                p = generation_prompt(msgs, template, backend.tokenizer)
        except RenderError as e:
            reasons[i], details[i] = e.reason, str(e)
            continue
        except Exception as e:  # noqa: BLE001 - a judge's chat template may raise anything
            reasons[i], details[i] = "template_error", f"{type(e).__name__}: {e}"[:500]
            continue
        ids = _prompt_ids(p, backend.tokenizer)
        room = backend.cfg.max_model_len - len(ids)
        if room < 1:
            reasons[i] = "too_long"
            details[i] = (
                f"prompt of {len(ids)} tokens leaves no room in {backend.cfg.max_model_len}"
            )
            continue
        prompts.append(ids)
        budgets.append(min(max_new_tokens, room))
        live.append(i)
    if live:
        outs, errors = backend.generate(prompts, budgets)
        for k, i in enumerate(live):
            if errors[k] is not None:
                reasons[i], details[i] = "engine_error", errors[k]
            else:
                texts[i] = outs[k]
    return texts, reasons, details


class Generator(passes.ModelCallable):
    """Ray Data callable: greedy generations of the evaluated model for each eval row.

    Output columns: ``id``, ``seq``, ``source``, ``prompt`` (the last user message),
    ``reference`` (the reference answer), ``output`` and the reject marks.
    """

    task = "generate"

    def __init__(
        self,
        model_cfg: ModelConfig,
        model_path: str,
        template: str,
        max_new_tokens: int,
        progress: Any = None,
    ):
        super().__init__(model_cfg, model_path, progress)
        self.template = template
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        from deita_ray.evaluation import prompt_of

        rows = batch.to_pylist()
        convs = [r["messages"][:-1] for r in rows]
        texts, reasons, details = generate_texts(
            self.backend, convs, self.template, self.max_new_tokens
        )
        marks = RejectMarks(len(rows))
        for i, reason in enumerate(reasons):
            if reason is not None:
                marks.reject(i, reason, details[i], rows[i])
        out = pa.table(
            {
                "id": batch["id"],
                "seq": batch["seq"],
                "source": batch["source"],
                "prompt": [prompt_of(r["messages"]) for r in rows],
                "reference": [r["messages"][-1]["content"] for r in rows],
                "output": pa.array(texts, pa.large_string()),
            }
        )
        count_rows(self.progress, batch.num_rows)
        return marks.attach(out)


class JudgeModel(passes.ModelCallable):
    """Ray Data callable: the judge's greedy output for each judge conversation.

    Input columns: ``seq``, ``judge_messages`` (JSON text); output: the input plus
    ``judge_output`` and ``judge_error`` (an engine or template failure; never a verdict).
    """

    task = "generate"

    def __init__(
        self, model_cfg: ModelConfig, model_path: str, max_tokens: int, progress: Any = None
    ):
        super().__init__(model_cfg, model_path, progress)
        self.max_tokens = max_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        convs = [json.loads(x) for x in batch["judge_messages"].to_pylist()]
        texts, reasons, details = generate_texts(self.backend, convs, "judge", self.max_tokens)
        errors = [None if r is None else f"{r}: {d}" for r, d in zip(reasons, details, strict=True)]
        count_rows(self.progress, batch.num_rows)
        return batch.append_column(
            "judge_output", pa.array(texts, pa.large_string())
        ).append_column("judge_error", pa.array(errors, pa.string()))


# ---------------------------------------------------------------------------------------------
# The metrics


def generations(cfg: PipelineConfig, out_dir: str, sname: str, rows: pa.Table, model: tuple):
    """The evaluated model's greedy answers (``eval/<set>/generations``), made once."""
    key = f"{passes.NAME}/{sname}/generations"
    kwargs = {"template": cfg.eval.template, "max_new_tokens": cfg.eval.max_new_tokens}
    passes.run_model_pass(cfg, rows, Generator, model, out_dir, key, **kwargs)
    return passes.read_folder(stage_dir(out_dir, key))


def _opponents(cfg: PipelineConfig, sname: str, gen: pa.Table) -> dict[str, str]:
    """Opponent answer per row id: the reference, or another output dir's generations."""
    if cfg.eval.judge.compare_to == "reference":
        return dict(zip(gen["id"].to_pylist(), gen["reference"].to_pylist(), strict=True))
    other = os.path.join(
        os.path.expanduser(cfg.eval.judge.compare_to), passes.NAME, sname, "generations"
    )
    t = passes.read_folder(other, ["id", "seq", "output"])
    if t is None:
        raise FileNotFoundError(
            f"eval.judge.compare_to: no generations for set {sname!r} in {other}"
        )
    return dict(zip(t["id"].to_pylist(), t["output"].to_pylist(), strict=True))


def _judge_pass(cfg: PipelineConfig, out_dir: str, key: str, table: pa.Table) -> pa.Table | None:
    if table.num_rows and passes.to_finish(table, out_dir, key):
        from deita_ray.models.registry import resolve_model_path

        jm = cfg.eval.judge.model
        path = resolve_model_path(jm.path, cfg.cache_dir)
        passes.run_pass(
            table,
            JudgeModel,
            {"model_cfg": jm, "model_path": path, "max_tokens": cfg.eval.judge.max_tokens},
            cfg.eval.judge.resources,
            jm,
            out_dir,
            key,
        )
    return passes.read_folder(stage_dir(out_dir, key))


def judge_single_metric(cfg: PipelineConfig, out_dir: str, sname: str, gen: pa.Table) -> dict:
    from deita_ray.evaluation import judge_messages, load_judge_prompt, parse_rating

    prompt = load_judge_prompt(cfg.eval.judge.prompts, cfg.eval.judge.single_prompt, "single")
    ok = gen.filter(pc.is_valid(gen["output"])) if gen.num_rows else gen
    table = pa.table(
        {
            "id": ok["id"],
            "seq": ok["seq"],
            "judge_messages": [
                json.dumps(judge_messages(prompt, question=q, answer=a, ref_answer_1=r))
                for q, a, r in zip(
                    ok["prompt"].to_pylist(),
                    ok["output"].to_pylist(),
                    ok["reference"].to_pylist(),
                    strict=True,
                )
            ],
        }
    )
    got = _judge_pass(cfg, out_dir, f"{passes.NAME}/{sname}/judge_single", table)
    ratings: list[float] = []
    failed: Counter = Counter()
    for out, err in zip(
        got["judge_output"].to_pylist() if got is not None else [],
        got["judge_error"].to_pylist() if got is not None else [],
        strict=True,
    ):
        if err is not None:
            failed["judge_error"] += 1
            continue
        value, why = parse_rating(out)
        if why:
            failed[why] += 1
        else:
            ratings.append(value)
    failed.update({f"generation_{k}": v for k, v in _gen_failures(out_dir, sname).items()})
    b = bootstrap_means(np.asarray(ratings), None, cfg.eval.bootstrap_resamples, cfg.eval.seed)
    return {
        "prompt": prompt.name,
        "judge": cfg.eval.judge.model.path,
        "rated": len(ratings),
        "rating_mean": b["mean"],
        "rating_mean_ci95": b["ci95"],
        "failed_by_reason": dict(failed),
    }


def _gen_failures(out_dir: str, sname: str) -> dict[str, int]:
    return passes.reason_counts(rejects_dir(out_dir, f"{passes.NAME}/{sname}/generations"))


def judge_pairwise_metric(cfg: PipelineConfig, out_dir: str, sname: str, gen: pa.Table) -> dict:
    from deita_ray.evaluation import (
        judge_messages,
        load_judge_prompt,
        pairwise_outcome,
        parse_verdict,
    )

    prompt = load_judge_prompt(cfg.eval.judge.prompts, cfg.eval.judge.pairwise_prompt, "pairwise")
    opp = _opponents(cfg, sname, gen)
    ids, seqs, msgs = [], [], []
    failed: Counter = Counter()
    for rid, seq, q, a, r in zip(
        gen["id"].to_pylist(),
        gen["seq"].to_pylist(),
        gen["prompt"].to_pylist(),
        gen["output"].to_pylist(),
        gen["reference"].to_pylist(),
        strict=True,
    ):
        if a is None:
            continue
        b = opp.get(rid)
        if b is None:
            failed["no_opponent"] += 1
            continue
        # Order 0: the model is assistant A; order 1: the model is assistant B.
        for order, (x, y) in enumerate(((a, b), (b, a))):
            ids.append(rid)
            seqs.append(seq * 2 + order)
            msgs.append(
                json.dumps(
                    judge_messages(prompt, question=q, answer_a=x, answer_b=y, ref_answer_1=r)
                )
            )
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "seq": pa.array(seqs, pa.int64()),
            "judge_messages": msgs,
        }
    )
    got = _judge_pass(cfg, out_dir, f"{passes.NAME}/{sname}/judge_pairwise", table)
    verdicts: dict[str, dict[int, tuple]] = {}
    if got is not None:
        for rid, seq, out, err in zip(
            got["id"].to_pylist(),
            got["seq"].to_pylist(),
            got["judge_output"].to_pylist(),
            got["judge_error"].to_pylist(),
            strict=True,
        ):
            verdicts.setdefault(rid, {})[seq % 2] = (
                (None, "judge_error") if err is not None else parse_verdict(out)
            )
    outcomes: Counter = Counter()
    scores: list[float] = []
    wins: list[float] = []
    for per in verdicts.values():
        (v0, why0), (v1, why1) = per.get(0, (None, "missing")), per.get(1, (None, "missing"))
        if why0 or why1:
            failed[why0 or why1] += 1
            continue
        o = pairwise_outcome(v0, v1)
        outcomes[o] += 1
        wins.append(1.0 if o == "win" else 0.0)
        scores.append({"win": 1.0, "loss": 0.0}.get(o, 0.5))
    failed.update({f"generation_{k}": v for k, v in _gen_failures(out_dir, sname).items()})
    w = bootstrap_means(np.asarray(wins), None, cfg.eval.bootstrap_resamples, cfg.eval.seed)
    s = bootstrap_means(np.asarray(scores), None, cfg.eval.bootstrap_resamples, cfg.eval.seed)
    return {
        "prompt": prompt.name,
        "judge": cfg.eval.judge.model.path,
        "compare_to": cfg.eval.judge.compare_to,
        "judged": len(wins),
        "outcomes": {k: outcomes.get(k, 0) for k in ("win", "loss", "tie", "inconsistent")},
        "win_rate": w["mean"],
        "win_rate_ci95": w["ci95"],
        "score": s["mean"],
        "score_ci95": s["ci95"],
        "failed_by_reason": dict(failed),
    }

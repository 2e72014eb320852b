"""Scorer validation: does a scorer agree with a strong judge, or does it only reward length?

Runs the job's scorers (``score.scorers`` of a job config) over preference pairs — a chosen and
a rejected response to the same prompt — and reports, for every row score the scorers write
(and any ``--score`` expression), the pairwise accuracy: the fraction of pairs with
``score(chosen) > score(rejected)``, a tie counting one half. Accuracy is given overall and in
buckets of the length ratio ``chars(chosen) / chars(rejected)`` (< 0.8, 0.8-1.25, > 1.25),
beside the accuracy of the length-only scorer (longer response wins) on exactly the same pairs:
a scorer whose accuracy collapses to the length baseline's within buckets is mostly measuring
length. A score where lower is better (perplexity, NLL) shows an accuracy below 0.5; use
``--score -ppl`` for its mirror.

Pair sources (any mix, each a repeated option):

- ``--pairs FILE``: the DPO formats the project reads (``prompt``/``chosen``/``rejected`` as
  strings or message lists, LLaMA-Factory's ShareGPT preference shape, HH-RLHF transcripts;
  :func:`deita_ray.stages.dpo.parse_pair`);
- ``--alpaca-eval-annotations FILE``: AlpacaEval annotations (``instruction``, ``output_1``,
  ``output_2``, ``preference`` 1 or 2; ties and missing preferences are skipped, counted);
- ``--alpaca-eval-outputs CHOSEN REJECTED``: two models' ``model_outputs.json`` on the same
  instructions, the first model's answer taken as the chosen one.

The pairs become two canonical rows each (``<pair id>/chosen``, ``<pair id>/rejected``: the
prompt plus one response), written as ``<out>/ingest`` and scored by the real score stage on
a Ray cluster (``ray:`` of the config), so truncation, rejects and throughput are the stage's.
Writes ``<out>/validation.json`` and ``<out>/plots/scorer_validation.png``.

Example::

    python -m deita_ray.validate_scorer --config jobs/quickstart.yaml --out outputs/validate \\
        --set 'score.scorers=[{kind: deita_quality, columns: [turn, row]}]' \\
        --alpaca-eval-outputs ../shared/data/alpaca_eval/results/gpt4_1106_preview/model_outputs.json \\
            ../shared/data/alpaca_eval/results/text_davinci_003/model_outputs.json --limit 60
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from deita_ray.config import ConfigError, PipelineConfig
from deita_ray.job import load_job

BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("< 0.8", -math.inf, 0.8),
    ("0.8-1.25", 0.8, 1.25),
    ("> 1.25", 1.25, math.inf),
)
"""Length-ratio buckets ``chars(chosen) / chars(rejected)``: [lo, hi) except the middle one,
which includes both ends (0.8 and 1.25 are 'about the same length')."""

REPORT = "validation.json"
PLOT = "scorer_validation.png"


@dataclass(frozen=True)
class Pair:
    """One preference pair: the prompt messages and the two responses."""

    pair_id: str
    prompt: list[dict]
    chosen: str
    rejected: str


def bucket_of(ratio: float) -> str:
    """The bucket label of a chars ratio chosen/rejected."""
    if 0.8 <= ratio <= 1.25:
        return BUCKETS[1][0]
    return BUCKETS[0][0] if ratio < 0.8 else BUCKETS[2][0]


# ---------------------------------------------------------------------------------------------
# Reading pairs


def _records(path: str) -> Iterator[tuple[int, Any, str | None]]:
    """(index, parsed record or None, error) of every record of a JSON / JSONL(.gz) / Parquet
    file, read with the project's pool reader (Ray must be initialised)."""
    from deita_ray.data.read import read_pool  # noqa: PLC0415

    ds = read_pool(path).select_columns(["record", "index", "error", "detail"])
    for row in sorted(ds.take_all(), key=lambda r: r["index"]):
        if row["error"] is not None:
            yield row["index"], None, f"{row['error']}: {row['detail']}"
            continue
        try:
            yield row["index"], json.loads(row["record"]), None
        except ValueError as e:
            yield row["index"], None, f"bad_json: {e}"


def dpo_pairs(paths: Sequence[str], skipped: Counter) -> Iterator[Pair]:
    """Pairs from preference files in the DPO formats (:func:`deita_ray.stages.dpo.parse_pair`)."""
    from deita_ray.data.read import expand_paths, file_stem  # noqa: PLC0415
    from deita_ray.stages.dpo import PairError, parse_pair  # noqa: PLC0415

    for path in expand_paths(list(paths)):
        for i, record, error in _records(path):
            if error is not None:
                skipped[error.split(":")[0]] += 1
                continue
            try:
                prompt, chosen, rejected = parse_pair(record)
            except PairError as e:
                skipped[e.reason] += 1
                continue
            yield Pair(f"{file_stem(path)}:{i}", prompt, chosen, rejected)


def _checked(pair_id: str, record: dict, skipped: Counter) -> Pair | None:
    from deita_ray.stages.dpo import PairError, parse_pair  # noqa: PLC0415

    try:
        prompt, chosen, rejected = parse_pair(record)
    except PairError as e:
        skipped[e.reason] += 1
        return None
    return Pair(pair_id, prompt, chosen, rejected)


def alpaca_eval_annotation_pairs(paths: Sequence[str], skipped: Counter) -> Iterator[Pair]:
    """Pairs from AlpacaEval annotations: the judge's preferred output is the chosen one."""
    from deita_ray.data.read import file_stem  # noqa: PLC0415

    for path in paths:
        stem = f"{os.path.basename(os.path.dirname(os.path.dirname(path)))}-{file_stem(path)}"
        for i, rec, error in _records(path):
            if error is not None:
                skipped[error.split(":")[0]] += 1
                continue
            try:
                pref = float(rec.get("preference"))
            except (TypeError, ValueError):
                pref = math.nan
            if pref not in (1.0, 2.0):
                skipped["no_preference"] += 1  # ties (1.5), 0 and missing verdicts
                continue
            outs = (rec.get("output_1"), rec.get("output_2"))
            chosen, rejected = (outs[0], outs[1]) if pref == 1.0 else (outs[1], outs[0])
            record = {"prompt": rec.get("instruction"), "chosen": chosen, "rejected": rejected}
            pair = _checked(f"{stem}:{i}", record, skipped)
            if pair is not None:
                yield pair


def alpaca_eval_output_pairs(
    chosen_path: str, rejected_path: str, skipped: Counter
) -> Iterator[Pair]:
    """Pairs from two models' AlpacaEval outputs on the same instructions (the first model's
    answer is the chosen one); records are matched by position and must share the instruction."""
    chosen = [r for _, r, _ in _records(chosen_path)]
    rejected = [r for _, r, _ in _records(rejected_path)]
    if len(chosen) != len(rejected):
        raise ValueError(
            f"{chosen_path} has {len(chosen)} records, {rejected_path} {len(rejected)}: not the "
            "same instruction set"
        )
    name = os.path.basename(os.path.dirname(chosen_path)) or "outputs"
    for i, (c, r) in enumerate(zip(chosen, rejected, strict=True)):
        if not isinstance(c, dict) or not isinstance(r, dict):
            skipped["bad_record"] += 1
            continue
        if c.get("instruction") != r.get("instruction"):
            skipped["instruction_mismatch"] += 1
            continue
        record = {
            "prompt": c.get("instruction"),
            "chosen": c.get("output"),
            "rejected": r.get("output"),
        }
        pair = _checked(f"{name}:{i}", record, skipped)
        if pair is not None:
            yield pair


def pair_rows(pairs: Sequence[Pair]) -> Any:
    """Two canonical rows per pair (chosen first), seq in that order."""
    import pyarrow as pa  # noqa: PLC0415

    from deita_ray.data.formats import CANONICAL_SCHEMA  # noqa: PLC0415

    rows = []
    for k, p in enumerate(pairs):
        for j, (side, text) in enumerate((("chosen", p.chosen), ("rejected", p.rejected))):
            rows.append(
                {
                    "id": f"{p.pair_id}/{side}",
                    "seq": 2 * k + j,
                    "messages": [*p.prompt, {"role": "assistant", "content": text}],
                    "source": p.pair_id.rsplit(":", 1)[0],
                    "format": "pair",
                    "extra": "{}",
                }
            )
    return pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Accuracy


def _win(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def pairwise_accuracy(
    chosen: Sequence[float], rejected: Sequence[float], ratios: Sequence[float]
) -> dict[str, Any]:
    """Accuracy (ties = 1/2) overall and per length-ratio bucket, of pairs with finite scores.

    Returns:
        ``{"accuracy", "n", "prefers_chosen", "ties", "buckets": {label: {"accuracy", "n"}}}``
        (accuracy None where a bucket is empty).
    """
    wins: dict[str, list[float]] = {label: [] for label, _, _ in BUCKETS}
    all_wins: list[float] = []
    for a, b, r in zip(chosen, rejected, ratios, strict=True):
        w = _win(a, b)
        all_wins.append(w)
        wins[bucket_of(r)].append(w)

    def acc(ws: list[float]) -> float | None:
        return round(sum(ws) / len(ws), 6) if ws else None

    return {
        "accuracy": acc(all_wins),
        "n": len(all_wins),
        "prefers_chosen": sum(1 for w in all_wins if w == 1.0),
        "ties": sum(1 for w in all_wins if w == 0.5),
        "buckets": {k: {"accuracy": acc(v), "n": len(v)} for k, v in wins.items()},
    }


def score_accuracies(table: Any, pairs: Sequence[Pair], scores: Sequence[str]) -> dict[str, Any]:
    """Per score (column or expression): its accuracy and the length baseline's, on the pairs
    where both rows were scored and the score is finite for both."""
    from deita_ray.selection.score_expr import parse  # noqa: PLC0415

    ids = table["id"].to_pylist()
    pos = {rid: i for i, rid in enumerate(ids)}
    out: dict[str, Any] = {}
    for text in scores:
        expr = parse(text)
        if any(n not in table.column_names for n in expr.names):
            continue
        values = expr.evaluate({n: table[n] for n in expr.names})
        sc, sr, ratios, lc, lr = [], [], [], [], []
        for p in pairs:
            i, j = pos.get(f"{p.pair_id}/chosen"), pos.get(f"{p.pair_id}/rejected")
            if (
                i is None
                or j is None
                or not (math.isfinite(values[i]) and math.isfinite(values[j]))
            ):
                continue
            sc.append(float(values[i]))
            sr.append(float(values[j]))
            lc.append(len(p.chosen))
            lr.append(len(p.rejected))
            ratios.append(len(p.chosen) / len(p.rejected))
        out[text] = {
            **pairwise_accuracy(sc, sr, ratios),
            "length_baseline": pairwise_accuracy(lc, lr, ratios),
        }
    return out


def plot_validation(result: dict, plots_dir: str) -> str:
    """Grouped bars: per score, its accuracy overall and per length bucket, and the length
    baseline (hatched; one bar when every score was compared on the same pairs). Scores that
    tie on every pair (e.g. instruction lengths: both rows share the prompt) are left out of
    the plot (they are in the JSON). The dashed line is chance."""
    from deita_ray.report.plots import figure, save_png  # noqa: PLC0415

    groups = ["overall", *[label for label, _, _ in BUCKETS]]

    def values(src: dict) -> list[float]:
        vals = [src["accuracy"]] + [src["buckets"][g]["accuracy"] for g in groups[1:]]
        return [v if v is not None else 0.0 for v in vals]

    bars: list[tuple[str, dict, str | None]] = []
    baselines: list[dict] = []
    for name, r in result["scores"].items():
        if r["n"] and r["ties"] == r["n"]:
            continue
        bars.append((name, r, None))
        if r["length_baseline"] not in baselines:
            baselines.append(r["length_baseline"])
    for k, base in enumerate(baselines):
        label = "length only" if len(baselines) == 1 else f"length only ({k + 1})"
        bars.append((label, base, "//"))
    fig = figure(max(7.0, 1.2 * len(groups) * max(1, len(bars)) ** 0.5), 4.6)
    ax = fig.subplots()
    width = 0.8 / max(1, len(bars))
    for k, (label, src, hatch) in enumerate(bars):
        xs = [g - 0.4 + (k + 0.5) * width for g in range(len(groups))]
        ax.bar(xs, values(src), width, label=label, hatch=hatch, edgecolor="black", linewidth=0.4)
    first = bars[0][1] if bars else {"n": 0, "buckets": {g: {"n": 0} for g in groups[1:]}}
    ns = [first["n"]] + [first["buckets"][g]["n"] for g in groups[1:]]
    ticks = ["all pairs", *[f"chars ratio {g}" for g in groups[1:]]]
    ax.set_xticks(range(len(groups)), [f"{t}\n(n={n})" for t, n in zip(ticks, ns, strict=True)])
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("pairwise accuracy (ties = 1/2)")
    ax.set_title(f"Scorers on {result['pairs']} preference pairs (ratio = chosen / rejected)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_png(fig, plots_dir, PLOT)


# ---------------------------------------------------------------------------------------------
# Running


def validate(
    cfg: PipelineConfig, pairs: Sequence[Pair], out_dir: str, scores: Sequence[str] = ()
) -> dict[str, Any]:
    """Score the pairs with the job's scorers (Ray initialised) and compute the accuracies.

    Returns:
        The report: pairs, the score stage's counts and throughput, per score the accuracy
        overall and per bucket and the length baseline on the same pairs.
    """
    import pyarrow.dataset as pds  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    from deita_ray.pipeline import clear_stage_outputs  # noqa: PLC0415
    from deita_ray.scorers import resolve_scorers, row_columns  # noqa: PLC0415
    from deita_ray.stages.score import run_score  # noqa: PLC0415

    if not pairs:
        raise ValueError("no usable preference pairs")
    for stage in ("ingest", "score"):
        clear_stage_outputs(out_dir, stage)
    os.makedirs(os.path.join(out_dir, "ingest"), exist_ok=True)
    pq.write_table(pair_rows(pairs), os.path.join(out_dir, "ingest", "part-00000.parquet"))
    t0 = time.time()
    result = run_score(cfg, out_dir)
    table = pds.dataset(os.path.join(out_dir, "score"), format="parquet").to_table()
    names = list(dict.fromkeys([*row_columns(resolve_scorers(cfg)), *scores]))
    return {
        "pairs": len(pairs),
        "scorers": [
            {"kind": s.kind, "name": s.name, "model": s.model.path if s.model else None}
            for s in resolve_scorers(cfg)
        ],
        "score_stage": {
            "counts": result.counts.to_dict(),
            "seconds": round(time.time() - t0, 2),
            "throughput": result.metrics.get("throughput"),
        },
        "buckets": [label for label, _, _ in BUCKETS],
        "scores": score_accuracies(table, pairs, names),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m deita_ray.validate_scorer",
        description="Pairwise accuracy of the job's scorers on preference pairs, overall and "
        "per length-ratio bucket, beside the length-only baseline.",
    )
    ap.add_argument("--config", required=True, help="job YAML (its score.scorers and ray)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", required=True, help="output folder (ingest/, score/, report)")
    ap.add_argument("--pairs", action="append", default=[], help="DPO-format preference file")
    ap.add_argument("--alpaca-eval-annotations", action="append", default=[], metavar="FILE")
    ap.add_argument(
        "--alpaca-eval-outputs",
        nargs=2,
        action="append",
        default=[],
        metavar=("CHOSEN", "REJECTED"),
        help="two models' model_outputs.json; the first model's answers are the chosen ones",
    )
    ap.add_argument("--limit", type=int, default=None, help="use the first N pairs")
    ap.add_argument(
        "--score",
        action="append",
        default=[],
        help="also report this column or expression (e.g. '-ppl'); default: every row column",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = [*args.overrides, f"output.dir={args.out}", "stages=[score]"]
        cfg = load_job(args.config, overrides)
        from deita_ray.selection.score_expr import ScoreExpressionError, parse  # noqa: PLC0415

        for text in args.score:
            try:
                parse(text)
            except ScoreExpressionError as e:
                raise ConfigError(f"--score {text!r}: {e}") from None
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from deita_ray.runtime import init_ray  # noqa: PLC0415

    init_ray(cfg.ray)  # the pair files are read by the project's reader, on Ray
    skipped: Counter = Counter()
    pairs: list[Pair] = []
    pairs += dpo_pairs(args.pairs, skipped) if args.pairs else []
    pairs += alpaca_eval_annotation_pairs(args.alpaca_eval_annotations, skipped)
    for chosen, rejected in args.alpaca_eval_outputs:
        pairs += alpaca_eval_output_pairs(chosen, rejected, skipped)
    if args.limit is not None:
        pairs = pairs[: args.limit]
    if not pairs:
        print(f"no usable preference pairs (skipped: {dict(skipped)})", file=sys.stderr)
        return 2
    out_dir = os.path.abspath(os.path.expanduser(args.out))
    report = validate(cfg, pairs, out_dir, args.score)
    report["skipped_records"] = dict(skipped)
    report["plot"] = os.path.join("plots", plot_validation(report, os.path.join(out_dir, "plots")))
    with open(os.path.join(out_dir, REPORT), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: report[k] for k in ("pairs", "scores", "plot")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scorer validation on preference pairs: the accuracy definition (ties = 1/2, chars-ratio
buckets), the pair readers on the real AlpacaEval / DPO files, and the CLI end to end on the
tiny model through the real score stage."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pds
import pytest

from deita_ray.validate_scorer import (
    alpaca_eval_annotation_pairs,
    alpaca_eval_output_pairs,
    bucket_of,
    dpo_pairs,
    main,
    pairwise_accuracy,
)


def test_accuracy_counts_ties_as_half_and_buckets_by_chars_ratio():
    chosen = [3.0, 1.0, 2.0, 5.0, 4.0]
    rejected = [1.0, 2.0, 2.0, 1.0, 1.0]
    ratios = [0.5, 0.8, 1.25, 1.26, 2.0]
    got = pairwise_accuracy(chosen, rejected, ratios)
    assert got["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1 + 1) / 5)
    assert (got["n"], got["prefers_chosen"], got["ties"]) == (5, 3, 1)
    assert got["buckets"] == {
        "< 0.8": {"accuracy": 1.0, "n": 1},
        "0.8-1.25": {"accuracy": 0.25, "n": 2},  # both ends belong to the middle bucket
        "> 1.25": {"accuracy": 1.0, "n": 2},
    }
    assert [bucket_of(r) for r in (0.79, 0.8, 1.0, 1.25, 1.2500001)] == [
        "< 0.8",
        "0.8-1.25",
        "0.8-1.25",
        "0.8-1.25",
        "> 1.25",
    ]
    assert pairwise_accuracy([], [], [])["accuracy"] is None


def test_pair_readers_on_the_real_files(ray_local, shared_data: Path):
    results = shared_data / "alpaca_eval/results"
    skipped: Counter = Counter()
    ann = results / "zephyr-7b-beta/alpaca_eval_gpt4/annotations.json"
    pairs = list(alpaca_eval_annotation_pairs([str(ann)], skipped))
    records = json.loads(ann.read_text())
    first = records[0]
    assert float(first["preference"]) == 1.0 and pairs[0].chosen == first["output_1"]
    assert pairs[0].prompt == [{"role": "user", "content": first["instruction"]}]
    assert skipped["no_preference"] == 3  # two missing verdicts and one 0
    assert len(pairs) + sum(skipped.values()) == len(records)

    skipped = Counter()
    out = list(
        alpaca_eval_output_pairs(
            str(results / "gpt4_1106_preview/model_outputs.json"),
            str(results / "text_davinci_003/model_outputs.json"),
            skipped,
        )
    )
    gpt4 = json.loads((results / "gpt4_1106_preview/model_outputs.json").read_text())
    assert len(out) + sum(skipped.values()) == 805
    assert out[0].chosen == gpt4[0]["output"] and out[0].pair_id == "gpt4_1106_preview:0"

    skipped = Counter()
    dpo = list(dpo_pairs([str(shared_data / "llama_factory/dpo_en_demo.json")], skipped))
    assert len(dpo) + sum(skipped.values()) == 300 and len(dpo) > 250
    hh = list(dpo_pairs([str(shared_data / "hh_rlhf/harmless-base/test.jsonl.gz")], Counter()))
    assert len(hh) > 2000 and hh[0].prompt[-1]["role"] == "user"


def test_cli_end_to_end_on_the_tiny_model(ray_local, shared_data: Path, tiny_llama, tmp_path):
    """20 GPT-4 Turbo vs text-davinci-003 pairs through the real score stage: the report's
    accuracies equal the ones recomputed here from the written scores."""
    import yaml

    results = shared_data / "alpaca_eval/results"
    model = {
        "path": str(tiny_llama),
        "backend": "hf",
        "dtype": "float32",
        "max_model_len": 512,
        "hf_batch_size": 8,
    }
    job = {
        "ray": {"num_cpus": 2},
        "score": {
            "scorers": [
                {"kind": "deita_quality", "model": model, "columns": ["turn", "row"]},
                {"kind": "perplexity", "model": model},
                {"kind": "length"},
            ],
            "resources": {"concurrency": 1, "num_cpus": 1, "batch_size": 16},
        },
    }
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(job))
    out = tmp_path / "validate"
    rc = main(
        [
            "--config",
            str(cfg_path),
            "--out",
            str(out),
            "--alpaca-eval-outputs",
            str(results / "gpt4_1106_preview/model_outputs.json"),
            str(results / "text_davinci_003/model_outputs.json"),
            "--limit",
            "20",
            "--score=-ppl_nll",
        ]
    )
    assert rc == 0
    report = json.loads((out / "validation.json").read_text())
    assert (out / report["plot"]).stat().st_size > 10_000
    assert report["pairs"] == 20
    assert {"quality", "ppl", "ppl_nll", "-ppl_nll", "response_chars"} <= set(report["scores"])
    table = pds.dataset(str(out / "score"), format="parquet").to_table()
    rows = {r["id"]: r for r in table.to_pylist()}
    gpt4 = json.loads((results / "gpt4_1106_preview/model_outputs.json").read_text())[:20]
    dav = json.loads((results / "text_davinci_003/model_outputs.json").read_text())[:20]
    wins, n = 0.0, 0
    for k in range(20):
        c, r = (
            rows.get(f"gpt4_1106_preview:{k}/chosen"),
            rows.get(f"gpt4_1106_preview:{k}/rejected"),
        )
        if c is None or r is None:
            continue
        n += 1
        wins += 1.0 if c["quality"] > r["quality"] else 0.5 if c["quality"] == r["quality"] else 0
    q = report["scores"]["quality"]
    assert q["n"] == n and q["accuracy"] == pytest.approx(wins / n)
    # the length-only baseline on the same pairs, and the length scorer's own column, agree
    longer = sum(len(gpt4[k]["output"]) > len(dav[k]["output"]) for k in range(20)) / 20
    assert report["scores"]["response_chars"]["accuracy"] == pytest.approx(longer)
    assert report["scores"]["response_chars"]["length_baseline"]["accuracy"] == pytest.approx(
        longer
    )
    flipped = report["scores"]["-ppl_nll"]["accuracy"] + report["scores"]["ppl_nll"]["accuracy"]
    assert flipped == pytest.approx(1.0)  # no ties: the mirror score has the mirror accuracy
    assert sum(b["n"] for b in q["buckets"].values()) == q["n"]


def test_cli_bad_inputs_exit_2(ray_local, tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("score: {scorers: [{kind: rating, model: {path: m}, template: 'no field'}]}\n")
    assert main(["--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "score.scorers[0].template" in capsys.readouterr().err
    cfg.write_text("{}\n")
    assert main(["--config", str(cfg), "--out", str(tmp_path / "o"), "--score", "a.b"]) == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "x", "chosen": "same", "rejected": "same"}\n')
    assert main(["--config", str(cfg), "--out", str(tmp_path / "o"), "--pairs", str(empty)]) == 2
    assert "identical_responses" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_deita_quality_on_the_first_30_alpaca_eval_pairs(
    ray_local, shared_data: Path, smollm2_path, tmp_path
):
    """The reference point: SmolLM2 with the DEITA quality template prefers GPT-4 Turbo's
    answer over text-davinci-003's for 24 of the first 30 AlpacaEval instructions (46 of 60),
    while the length-only scorer prefers it for 29: all but one pair have a ratio > 1.25."""
    results = shared_data / "alpaca_eval/results"
    repo = Path(__file__).resolve().parents[2]
    rc = main(
        [
            "--config",
            str(repo / "jobs/quickstart.yaml"),
            "--out",
            str(tmp_path / "v"),
            "--set",
            "score.scorers=[{kind: deita_quality, columns: [turn, row]}]",
            "--alpaca-eval-outputs",
            str(results / "gpt4_1106_preview/model_outputs.json"),
            str(results / "text_davinci_003/model_outputs.json"),
            "--limit",
            "30",
        ]
    )
    assert rc == 0
    q = json.loads((tmp_path / "v/validation.json").read_text())["scores"]["quality"]
    assert (q["n"], q["prefers_chosen"], q["ties"]) == (30, 24, 0)
    assert q["length_baseline"]["prefers_chosen"] == 29
    assert q["buckets"]["> 1.25"]["n"] == 29

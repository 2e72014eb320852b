"""Live progress (deita_ray/progress.py, pipeline.StageProgress): the counter actor's phases and
lines, and a real job (ingest -> score -> embed -> select -> sft -> eval on the tiny LLaMA,
through ``pipeline.run``) whose log shows the model stages' rows as their batches finish and the
training's optimizer steps with their loss."""

from __future__ import annotations

import json
import logging
import re

import pytest

from deita_ray.progress import ProgressCounter, rows_line, step_line

ROWS = 24
EVAL_ROWS = 8


def test_counter_says_loading_until_the_first_batch_then_rows_and_an_eta():
    c = ProgressCounter()
    snap = c.poll()
    assert not snap["started"] and snap["rows"] == 0
    assert re.fullmatch(r"stage score: loading model \(\d+ s\)", rows_line("score", snap, 40))
    c.add(5)
    c.add(5)
    # 10 rows counted now, 10 more written by an interrupted earlier run.
    line = rows_line("score", c.poll(), 40, done_before=10)
    assert re.fullmatch(r"stage score: 20/40 rows \(50\.0%\), \d+\.\d rows/s(, ETA .+)?", line)
    # Retried batches count again: never more than the total.
    c.add(100)
    assert rows_line("score", c.poll(), 40, 10).startswith("stage score: 40/40 rows (100.0%)")
    # No known total (a stage without input folder): rows and rate only.
    assert re.fullmatch(r"stage x: 115 rows, \d+\.\d rows/s", rows_line("x", c.poll(), None, 5))
    # A phase of its own (an eval pass) with its total and the rows finished before.
    c.begin("alpaca/likelihood", 30, 6)
    snap = c.poll()
    assert rows_line("eval", snap, 999).startswith("stage eval: alpaca/likelihood: loading model")
    c.add(4)
    assert rows_line("eval", c.poll(), 999).startswith(
        "stage eval: alpaca/likelihood: 10/30 rows (33.3%)"
    )


def test_counter_keeps_step_one_every_nth_and_the_last_step_for_the_driver():
    c = ProgressCounter(every_steps=2)
    for n in range(1, 6):
        c.step({"step": n, "loss": 2.0 / n, "lr": 1e-4, "tokens_per_s": 300.0, "seconds": 1.0}, 5)
    snap = c.poll()
    assert snap["started"]
    assert [r["step"] for r in snap["steps"]] == [1, 2, 4, 5]
    assert c.poll()["steps"] == []  # handed out once
    line = step_line("sft", snap["steps"][1])
    assert re.fullmatch(
        r"stage sft: step 2/5 \(40\.0%\), loss 1\.0000, lr 1\.00e-04, 300 tokens/s, ETA .+", line
    )
    assert step_line("sft", snap["steps"][-1]).endswith("ETA 0 s")  # the last step
    # A restarted worker group goes back to its checkpoint's step: counted afresh.
    c.step({"step": 3, "loss": 0.5, "lr": 1e-4, "tokens_per_s": 300.0, "seconds": 1.0}, 5)
    assert c.last_step["step"] == 3 and c.last_step["eta_s"] == pytest.approx(2.0)


def _pool_rows() -> list[dict]:
    return [
        {"instruction": f"Add {i} and {i + 1}, then explain the sum.", "output": f"{2 * i + 1}."}
        for i in range(ROWS)
    ]


@pytest.fixture(scope="module")
def job_log(ray_local, tiny_llama, tmp_path_factory):
    """A whole job on the tiny LLaMA through ``pipeline.run``, its ``deita_ray`` log lines
    collected: score and embed in batches of 2 rows (12 batches each), the eval likelihood pass
    in 4 batches, progress lines every 0.05 s, and each of SFT's optimizer steps logged."""
    from deita_ray import pipeline
    from deita_ray.config import load_config

    work = tmp_path_factory.mktemp("progress_job")
    pool = work / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in _pool_rows()))
    held_out = work / "held_out.json"
    held_out.write_text(
        json.dumps(
            [{"instruction": f"Name colour {i}.", "output": "Blue."} for i in range(EVAL_ROWS)]
        )
    )
    tiny = {"path": str(tiny_llama), "backend": "hf", "dtype": "float32", "max_model_len": 256}
    actors = {"concurrency": 1, "num_cpus": 1, "batch_size": 2}
    cfg = load_config(
        data={
            "stages": ["ingest", "score", "embed", "select", "sft", "eval"],
            "input": {"paths": [str(pool)]},
            "output": {
                "dir": str(work / "out"),
                "rows_per_part": 4,
                "progress_every_s": 0.05,
                "progress_every_steps": 1,
            },
            "score": {"complexity_model": tiny, "quality_model": tiny, "resources": actors},
            "embed": {"model": tiny, "max_length": 128, "resources": actors},
            "select": {"method": "score", "budget": 8},
            "sft": {
                "model": str(tiny_llama),
                "epochs": 2,
                "global_batch_size": 4,
                "micro_batch_size": 2,
                "max_length": 128,
                "precision": "fp32",
                "num_workers": 1,
                "cpus_per_worker": 1,
            },
            "eval": {
                "sets": [{"name": "held", "paths": [str(held_out)]}],
                "template": "vicuna_v1.1",
                "model": {"backend": "hf", "dtype": "float32", "max_model_len": 256},
                "resources": actors,
            },
        }
    )
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("deita_ray")
    handler, level = Collect(level=logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        report = pipeline.run(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return report, lines


@pytest.mark.slow
def test_model_stages_log_rows_done_as_batches_finish(job_log):
    report, lines = job_log
    for stage in ("score", "embed"):
        total = report["stages"][stage]["rows_in"]
        assert total == ROWS
        # Written while the stage ran, before its "done" line: the per-batch counts (the
        # stage writes parts of 4 rows, so counting the rows on disk could show them too, but
        # never "loading model" or an ETA).
        mine = lines[: next(i for i, x in enumerate(lines) if x.startswith(f"stage {stage}: done"))]
        got = [
            re.fullmatch(
                rf"stage {stage}: (\d+)/{total} rows \(\d+\.\d%\), \d+\.\d rows/s, ETA .+", x
            )
            for x in mine
        ]
        counts = [int(m.group(1)) for m in got if m]
        assert counts and max(counts) > 0, [x for x in mine if x.startswith(f"stage {stage}:")]
        assert counts == sorted(counts) and max(counts) <= total
    # The model actors take seconds to start: the score stage said so first.
    assert any(re.fullmatch(r"stage score: loading model \(\d+ s\)", x) for x in lines)


@pytest.mark.slow
def test_training_logs_each_step_with_its_loss(job_log):
    report, lines = job_log
    sft = report["stages"]["sft"]["metrics"]
    steps = sft["steps"]
    assert steps >= 2  # 8 selected rows, batches of 4, 2 epochs
    step = re.compile(
        r"stage sft: step (\d+)/(\d+) \(\d+\.\d%\), loss (\d+\.\d{4}), lr \S+, "
        r"\d+ tokens/s, ETA .+"
    )
    got = [m for m in (step.fullmatch(x) for x in lines) if m]
    assert [int(m.group(1)) for m in got] == list(range(1, steps + 1))
    assert {int(m.group(2)) for m in got} == {steps}
    # The logged loss is the step's loss in the training history.
    assert [float(m.group(3)) for m in got] == pytest.approx(sft["loss"], abs=1e-4)
    assert any(re.fullmatch(r"stage sft: loading model \(\d+ s\)", x) for x in lines)


@pytest.mark.slow
def test_eval_logs_each_pass_as_a_phase_of_its_own(job_log):
    report, lines = job_log
    assert report["stages"]["eval"]["metrics"]["sets"]["held"]["rows"] == EVAL_ROWS
    phase = re.compile(
        rf"stage eval: held/likelihood: (\d+)/{EVAL_ROWS} rows \(\d+\.\d%\), \d+\.\d rows/s.*"
    )
    counts = [int(m.group(1)) for m in (phase.fullmatch(x) for x in lines) if m]
    assert counts and max(counts) > 0 and counts == sorted(counts)
    assert any(
        re.fullmatch(r"stage eval: held/likelihood: loading model \(\d+ s\)", x) for x in lines
    )

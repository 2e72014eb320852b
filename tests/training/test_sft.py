"""SFT under real Ray Train (2 CPU workers) + real DeepSpeed on a tiny LLaMA: the loss falls,
ZeRO-2 and ZeRO-3 run, the final folder loads in transformers and in the vLLM CPU engine, and a
run that loses a worker resumes from its last checkpoint and makes the same number of steps.
Two training runs in all (the ZeRO-3 one is also the one that loses a worker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deita_ray.config import PipelineConfig
from deita_ray.templates import render_vicuna
from deita_ray.training.loop import FAIL_AT_STEP_ENV, FAIL_FLAG_ENV, TRAINER_STATE


def selection_rows() -> list[dict]:
    """A small fixed 'selection' (the select stage's columns), single- and multi-turn."""
    rows = []
    for i in range(15):
        msgs = [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"The answer is {2 * i}."},
        ]
        if i % 3 == 0:
            msgs += [
                {"role": "user", "content": "Are you sure?"},
                {"role": "assistant", "content": "Yes, I am sure."},
            ]
        rows.append(
            {
                "id": f"r{i}",
                "rank": i,
                "evol_score": 10.0 - i / 10,
                "max_sim": 0.1,
                "messages": msgs,
                "source": "handmade",
            }
        )
    # A row whose only answer lies beyond max_length: it must go to rejects, not vanish.
    rows.append(
        {
            "id": "too_long",
            "rank": 15,
            "evol_score": 1.0,
            "max_sim": 0.2,
            "messages": [
                {"role": "user", "content": "word " * 300},
                {"role": "assistant", "content": "ok"},
            ],
            "source": "handmade",
        }
    )
    return rows


def make_job(tmp: Path, model: Path, zero_stage: int, **over) -> tuple[PipelineConfig, str]:
    out = tmp / f"out_z{zero_stage}"
    (out / "select").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(selection_rows()), out / "select" / "part-0.parquet")
    cfg = PipelineConfig()
    t = cfg.sft
    t.model, t.num_workers, t.cpus_per_worker = str(model), 2, 1.0
    t.micro_batch_size, t.global_batch_size, t.max_length = 2, 4, 128
    t.epochs, t.learning_rate, t.warmup_ratio, t.lr_scheduler = 2.0, 3e-3, 0.1, "cosine"
    t.zero_stage, t.checkpoint_every_steps, t.max_failures = zero_stage, 2, 1
    for k, v in over.items():
        setattr(t, k, v)
    return cfg, str(out)


def test_chat_template_without_template_fails_at_start(tiny_llama):
    from deita_ray.training.render import check_template

    cfg = PipelineConfig()
    check_template(cfg.sft, str(tiny_llama), "sft")  # vicuna_v1.1: nothing to check
    cfg.sft.template = "chat_template"
    with pytest.raises(ValueError, match="sft.template"):
        check_template(cfg.sft, str(tiny_llama), "sft")


def test_sequence_weighting_equals_micro_batch_one_with_accumulation(tiny_llama):
    """'sequence': the loss of a micro-batch is the mean of its conversations' own losses, the
    average that micro-batches of one with gradient accumulation give (the DEITA recipe);
    'token' is transformers' mean over all target tokens of the batch."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from deita_ray.models.backend import load_tokenizer
    from deita_ray.stages.sft import TokenizeSFT, sft_step

    rows = selection_rows()[:4]
    tok = TokenizeSFT(str(tiny_llama), "vicuna_v1.1", max_length=128)(pa.Table.from_pylist(rows))
    ids, labels = tok["input_ids"].to_pylist(), tok["labels"].to_pylist()
    assert len({len(x) for x in ids}) > 1  # conversations of different lengths
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    config = {"pad_id": load_tokenizer(str(tiny_llama)).pad_token_id}

    def loss(rows_ids, rows_labels, weighting):
        batch = {"input_ids": rows_ids, "labels": rows_labels}
        with torch.no_grad():
            value, n_tokens, extra = sft_step(
                model, batch, "cpu", {**config, "loss_weighting": weighting}
            )
        assert n_tokens == sum(len(x) for x in rows_ids) and extra == {}
        return float(value)

    singles = np.array([loss([i], [lab], "token") for i, lab in zip(ids, labels, strict=True)])
    targets = np.array([sum(x != -100 for x in lab[1:]) for lab in labels])
    assert loss(ids, labels, "sequence") == pytest.approx(singles.mean(), rel=1e-5)
    assert loss(ids, labels, "token") == pytest.approx(
        (singles * targets).sum() / targets.sum(), rel=1e-5
    )
    assert loss(ids, labels, "sequence") != pytest.approx(loss(ids, labels, "token"), rel=1e-4)


def test_training_rows_come_back_in_the_split_order(ray_local, tmp_path):
    """Tokenised parts are written in any order; training reads them in the split's order."""
    from deita_ray.stages.sft import ORDER, training_dataset

    parts = []
    for k, order in enumerate(([3, 0, 4], [2, 1])):
        table = pa.table(
            {
                "id": [f"r{o}" for o in order],
                ORDER: pa.array(order, pa.int64()),
                "input_ids": [[o, o] for o in order],
                "labels": [[-100, o] for o in order],
            }
        )
        parts.append(str(tmp_path / f"part-{k}.parquet"))
        pq.write_table(table, parts[-1])
    rows = training_dataset(parts, block_rows=2).take_all()
    assert [list(r["input_ids"]) for r in rows] == [[o, o] for o in range(5)]
    assert set(rows[0]) == {"input_ids", "labels"}


def test_sft_step_imports_without_ray_or_deepspeed():
    """benchmarks/gpu_check.py imports the step on a machine without Ray."""
    code = (
        "import sys\n"
        "from deita_ray.stages.sft import sft_step\n"
        "print(sorted(m for m in ('ray', 'deepspeed', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def sft_zero2(ray_local, tiny_llama, tmp_path_factory):
    from deita_ray.stages.sft import run_sft

    cfg, out = make_job(tmp_path_factory.mktemp("sft2"), tiny_llama, zero_stage=2)
    return cfg, out, run_sft(cfg, out)


@pytest.mark.slow
def test_sft_zero2_loss_falls_and_counts_balance(sft_zero2):
    _, out, res = sft_zero2
    c = res.counts
    assert (c.rows_in, c.rows_out, c.rejected_by_reason) == (16, 15, {"no_target_tokens": 1})
    c.check("sft")
    m = res.metrics
    # 15 rows -> 7 per worker -> 3 micro batches of 2 -> 3 steps per epoch, 2 epochs
    assert m["plan"]["steps_per_epoch"] == 3 and m["steps"] == 6 == m["optimizer_steps"]
    assert m["examples"] == 6 * 4 and m["tokens"] > 0 and m["tokens_per_s"] > 0
    loss = m["loss"]
    assert len(loss) == 6 and all(x == x for x in loss)
    assert max(loss[-2:]) < 0.6 * loss[0], loss
    assert m["lr"][0] == 0.0 and m["lr"][1] == pytest.approx(3e-3)  # 1 warmup step, then peak
    rejects = pq.read_table(os.path.join(out, "rejects", "sft")).to_pylist()
    assert [(r["id"], r["reason"]) for r in rejects] == [("too_long", "no_target_tokens")]
    assert "word word" in rejects[0]["raw"]
    # Checkpoints were due at steps 2 and 4; once the final model was written they were deleted
    # with their optimizer state (tests/faults/test_training_resume.py sees them mid-run).
    assert not os.path.exists(os.path.join(out, "checkpoints"))
    assert not os.path.exists(os.path.join(out, "sft", "checkpoints"))
    final = set(os.listdir(os.path.join(out, "sft", "final")))
    assert {"model.safetensors", "config.json", TRAINER_STATE} <= final
    assert "deepspeed" not in final and not any(n.startswith(".uploaded") for n in final)
    assert m["steps_run"] == 6 and m["resumed_from_step"] is None


CHECK_VLLM = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    llm = LLM(sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256,
              gpu_memory_utilization=0.05)
    out = llm.generate([sys.argv[2]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    print("RESULT" + json.dumps(list(out[0].outputs[0].token_ids)))
"""


def greedy_transformers(path: str, prompt: str, n: int = 8) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return new


@pytest.mark.slow
def test_final_model_loads_in_transformers_and_vllm(sft_zero2, tmp_path):
    from safetensors import safe_open

    _, out, res = sft_zero2
    final = res.metrics["final_model"]
    assert final == os.path.join(out, "sft", "final")
    names = set(os.listdir(final))
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".pt", ".bin")) for n in names)
    with safe_open(os.path.join(final, "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in set(f.keys())
    # The model ships the rendering it was trained on (vicuna_v1.1), not its base's template:
    # apply_chat_template of the saved tokenizer gives exactly the training text.
    from transformers import AutoTokenizer

    from deita_ray.templates import vicuna_segments

    saved = AutoTokenizer.from_pretrained(final)
    for row in selection_rows()[:4]:
        trained = "".join(text for text, _ in vicuna_segments(row["messages"]))
        assert saved.apply_chat_template(row["messages"], tokenize=False) == trained
    prompt = render_vicuna([{"role": "user", "content": "What is 3 plus 3?"}]) + "ASSISTANT: "
    want = greedy_transformers(final, prompt)
    script = tmp_path / "check_vllm.py"
    script.write_text(CHECK_VLLM)
    env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, str(script), final, prompt],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT") :])
    assert got == want  # same weights, same greedy continuation in both engines


@pytest.mark.slow
def test_zero3_run_that_loses_a_worker_resumes_with_the_same_steps(
    sft_zero2, ray_local, tiny_llama, tmp_path, monkeypatch
):
    """ZeRO-3 + gradient checkpointing, the paper's SFT settings (epoch remainder carried over,
    every conversation weighing the same, a held-out split), and the last worker dies after
    step 3 (once): Ray Train restarts the group from the step-2 checkpoint (partitioned
    optimizer state included) and the run ends with as many optimizer steps, and the same lr
    schedule, as the unbroken run.

    14 of the 16 selected rows train (train_fraction 0.9); 2 workers x 3 micro-batches of 2 an
    epoch, 2 micro-batches a step: with 'carry' step 2 spans the first epoch's end, and the
    restart resumes in the middle of the second epoch."""
    from transformers import AutoModelForCausalLM

    from deita_ray.stages.sft import run_sft

    _, _, unbroken = sft_zero2
    flag = tmp_path / "failed_once.json"
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "3")  # checkpoints at 2, 4: resume from step 2
    monkeypatch.setenv(FAIL_FLAG_ENV, str(flag))
    cfg, out = make_job(
        tmp_path,
        tiny_llama,
        zero_stage=3,
        gradient_checkpointing=True,
        global_batch_size=8,
        epochs=6.0,
        epoch_remainder="carry",
        loss_weighting="sequence",
        train_fraction=0.9,
    )
    res = run_sft(cfg, out)
    assert flag.exists(), "the injected failure did not happen"
    assert json.loads(flag.read_text())["step"] == 3
    m, u = res.metrics, unbroken.metrics
    assert m["held_out"] == 2 and len(m["held_out_ids"]) == 2 and m["selected"] == 16
    assert res.counts.rows_in == 14
    assert m["plan"]["micro_per_epoch"] == 3 and m["plan"]["grad_accum"] == 2
    assert m["restarts"] == 1 and m["resumed_from_step"] == 2
    assert m["steps"] == m["optimizer_steps"] == u["steps"] == u["optimizer_steps"] == 6
    assert len(m["loss"]) == 6 and m["loss"][-1] < 0.6 * m["loss"][0]
    assert m["lr"] == pytest.approx(u["lr"])  # the schedule continued where it stopped
    assert m["examples"] == 6 * 8
    # The gathered ZeRO-3 weights are the trained ones: same shapes, other values.
    start = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).state_dict()
    final = AutoModelForCausalLM.from_pretrained(m["final_model"]).state_dict()
    assert set(start) == set(final)
    assert all(final[k].shape == start[k].shape for k in start)
    assert any(float((final[k] - start[k]).abs().max()) > 1e-4 for k in start)

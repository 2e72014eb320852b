"""DPO: the loss against its closed form, policy == reference gives log 2, the pair shapes
(including LLaMA-Factory's dpo_en_demo.json), response-only masks, TRL's order of truncation,
the DEITA DPO script's rendering, the pool's id scheme, and a real 2-worker Ray Train +
DeepSpeed ZeRO-3 run whose reward margin rises."""

from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deita_ray.config import PipelineConfig
from deita_ray.data.read import id_prefixes
from deita_ray.data.rejects import REASON
from deita_ray.models.backend import load_tokenizer
from deita_ray.stages.dpo import (
    PairError,
    PreparePairs,
    ReferenceLogProbs,
    dpo_loss,
    parse_pair,
    reward_accuracy,
    truncate_pair,
)
from deita_ray.templates import VICUNA_SYSTEM
from deita_ray.training.render import IGNORE_INDEX


def test_loss_matches_the_closed_form():
    import torch

    pc = torch.tensor([-10.0, -3.5, -7.25, -1.0], dtype=torch.float64)
    pr = torch.tensor([-12.0, -2.0, -7.25, -9.0], dtype=torch.float64)
    rc = torch.tensor([-11.0, -3.0, -6.0, -4.0], dtype=torch.float64)
    rr = torch.tensor([-11.5, -2.5, -8.0, -2.0], dtype=torch.float64)
    beta = 0.1
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta)
    want = []
    for i in range(4):
        x = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        want.append(math.log1p(math.exp(-x)))  # -log sigmoid(x)
    assert float(loss) == pytest.approx(sum(want) / 4, rel=1e-12)
    np.testing.assert_allclose(cr.numpy(), beta * (pc - rc).numpy())
    np.testing.assert_allclose(rj.numpy(), beta * (pr - rr).numpy())
    assert reward_accuracy((cr - rj).numpy()) == 0.5  # margins: +0.15, -0.2, -0.325, +1.1


def test_reward_accuracy_counts_ties_as_half():
    assert reward_accuracy([0.0, 0.0]) == 0.5
    assert reward_accuracy([1.0, -1.0, 0.0, 2.0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


PAIRS = [
    {"prompt": "Say the number 1.", "chosen": "The number is 1.", "rejected": "No."},
    {  # LLaMA-Factory shape: conversations + chosen/rejected {from, value}
        "conversations": [
            {"from": "system", "value": "Be exact."},
            {"from": "human", "value": "Hi?"},
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "Count to 3."},
        ],
        "chosen": {"from": "gpt", "value": "1 2 3"},
        "rejected": {"from": "gpt", "value": "3 2 1"},
    },
    {  # UltraFeedback-binarized shape: prompt string, full conversations as responses
        "prompt": "Name a colour.",
        "chosen": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ],
        "rejected": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Seven."},
        ],
    },
    {  # HH-RLHF transcripts
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.",
    },
]


def test_parse_pair_shapes():
    p, c, r = parse_pair(PAIRS[0])
    assert (p, c, r) == (
        [{"role": "user", "content": "Say the number 1."}],
        "The number is 1.",
        "No.",
    )
    p, c, r = parse_pair(PAIRS[1])
    assert [m["role"] for m in p] == ["system", "user", "assistant", "user"]
    assert (c, r) == ("1 2 3", "3 2 1")
    p, c, r = parse_pair(PAIRS[2])
    assert p == [{"role": "user", "content": "Name a colour."}] and (c, r) == ("Blue.", "Seven.")
    p, c, r = parse_pair(PAIRS[3])
    assert p == [{"role": "user", "content": "Hi"}]
    assert (c, r) == ("Hello, how can I help?", "Go away.")


@pytest.mark.parametrize(
    "record,reason",
    [
        ({"prompt": "x", "chosen": "same", "rejected": "same"}, "identical_responses"),
        ({"prompt": "x", "chosen": " ", "rejected": "b"}, "empty_response"),
        ({"prompt": "x", "chosen": "a"}, "bad_pair"),
        (
            {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
            "bad_pair",
        ),
        (
            {"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            "bad_pair",
        ),
        (
            {"chosen": "\n\nHuman: A\n\nAssistant: a", "rejected": "\n\nHuman: B\n\nAssistant: b"},
            "bad_pair",
        ),
        ([1, 2], "bad_pair"),
    ],
)
def test_parse_pair_rejects(record, reason):
    with pytest.raises(PairError) as e:
        parse_pair(record)
    assert e.value.reason == reason


def test_dpo_en_demo_pairs_all_parse(shared_data):
    records = json.loads((shared_data / "llama_factory" / "dpo_en_demo.json").read_text())
    parsed = [parse_pair(r) for r in records]
    assert len(parsed) == 300
    assert sum(p[0][0]["role"] == "system" for p in parsed) == 80
    assert all(p[-1]["role"] == "user" for p, _, _ in parsed)
    assert all(
        c == r["chosen"]["value"] and j == r["rejected"]["value"]
        for (_, c, j), r in zip(parsed, records, strict=True)
    )


def read_rows(records: list, sources: list[str] | None = None) -> pa.Table:
    """What read_pool hands the stage (record JSON text, source, index, seq, error, detail)."""
    n = len(records)
    return pa.table(
        {
            "record": [json.dumps(r) for r in records],
            "source": sources or ["/data/pairs.json"] * n,
            "index": list(range(n)),
            "seq": list(range(n)),
            "error": [None] * n,
            "detail": [None] * n,
        }
    )


def test_prepared_pairs_mask_only_the_response(tiny_llama, shared_data):
    demo = json.loads((shared_data / "llama_factory" / "dpo_en_demo.json").read_text())
    records = [*PAIRS, demo[0]]
    stage = PreparePairs(str(tiny_llama), "vicuna_v1.1", max_length=8192)
    out = stage(read_rows(records)).to_pylist()
    assert not any(r["truncated"] for r in out)
    tok = load_tokenizer(str(tiny_llama))
    assert [r[REASON] for r in out] == [None] * len(records)
    assert out[4]["id"] == "pairs:4"
    for row, rec in zip(out, records, strict=True):
        _, chosen, rejected = parse_pair(rec)
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            kept = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
            assert tok.decode(kept, clean_up_tokenization_spaces=False) == text + "</s>"
            first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
            assert all(lab != IGNORE_INDEX for lab in labels[first:])  # one run, at the end


def test_prepared_pairs_reject_reasons(tiny_llama):
    blank = {"prompt": " ", "chosen": "a", "rejected": "b"}
    rows = read_rows([blank, {"prompt": "x", "chosen": "s", "rejected": "s"}, PAIRS[0]])
    rows = rows.set_column(4, "error", pa.array([None, None, "invalid_json"], pa.string()))
    stage = PreparePairs(str(tiny_llama), "vicuna_v1.1", max_length=128, max_prompt_length=64)
    out = stage(rows).to_pylist()
    assert [r[REASON] for r in out] == ["bad_pair", "identical_responses", "invalid_json"]
    assert "empty_instruction" in out[0]["_reject_detail"]  # the pool's message rules
    assert all(r["_raw"] for r in out)


def test_truncation_cuts_the_prompt_first_then_the_responses():
    """TRL 0.7.2's DPODataCollatorWithPadding.tokenize_batch_element (trl/trainer/utils.py)."""
    p = list(range(100, 130))  # 30 prompt tokens
    c, r = ([1] * 8, [1] * 8), ([2] * 5, [2] * 5)
    # Fits: nothing changes.
    assert truncate_pair(p, c, r, max_length=38, max_prompt_length=10) == (p, c, r, False)
    # prompt + longer response (8) = 38 > 37: the prompt keeps its last 10 tokens, and then
    # fits, so the responses are whole.
    assert truncate_pair(p, c, r, 37, 10) == (p[-10:], c, r, True)
    assert truncate_pair(p, c, r, 37, 10, "keep_start") == (p[:10], c, r, True)
    # Still too long after the prompt cut: both responses keep max_length - max_prompt_length.
    long_c = (list(range(50)), list(range(50)))
    got_p, got_c, got_r, cut = truncate_pair(p, long_c, r, 40, 10)
    assert cut and got_p == p[-10:] and got_c == (list(range(30)), list(range(30)))
    assert got_r == r  # shorter than 30 already
    # The cut response length does not depend on how short the prompt became.
    short_p = p[:4]
    got_p, got_c, _, _ = truncate_pair(short_p, long_c, r, 40, 10)
    assert got_p == short_p and len(got_c[0]) == 30


def test_long_prompt_keeps_its_end_and_the_whole_response(tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    prompt = " ".join(f"w{i}" for i in range(300))
    rec = {"prompt": prompt, "chosen": "The end.", "rejected": "No."}
    stage = PreparePairs(str(tiny_llama), "vicuna_v1.1", max_length=128, max_prompt_length=64)
    row = stage(read_rows([rec])).to_pylist()[0]
    assert row[REASON] is None and row["truncated"]
    ids, labels = row["chosen_input_ids"], row["chosen_labels"]
    n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
    assert n_prompt == 64 and len(ids) <= 128
    text = tok.decode(ids[:n_prompt], clean_up_tokenization_spaces=False)
    assert text.endswith("w299 ASSISTANT: ") and "A chat" not in text  # keep_end
    kept = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(kept, clean_up_tokenization_spaces=False) == "The end.</s>"


def test_deita_dpo_rendering_is_the_reference_text(tiny_llama):
    """hkust-nlp/deita, src/deita/alignment/dpo_train.py: prompt = system + " " + "user: " +
    prompt + " ", response = "assistant: " + text + "</s>"; TRL 0.7.2 tokenises them without
    special tokens and appends EOS to each response, whose tokens all carry the loss."""
    tok = load_tokenizer(str(tiny_llama))
    rec = PAIRS[2]  # UltraFeedback-binarized shape
    stage = PreparePairs(str(tiny_llama), "deita_dpo", max_length=512, max_prompt_length=256)
    row = stage(read_rows([rec])).to_pylist()[0]
    assert row[REASON] is None and not row["truncated"]
    want_prompt = tok(f"{VICUNA_SYSTEM} user: Name a colour. ", add_special_tokens=False)
    for side, text in (("chosen", "Blue."), ("rejected", "Seven.")):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        want_resp = tok(f"assistant: {text}</s>", add_special_tokens=False)["input_ids"]
        assert ids == want_prompt["input_ids"] + want_resp + [tok.eos_token_id]
        assert ids[0] != tok.bos_token_id
        n_prompt = len(want_prompt["input_ids"])
        assert labels == [IGNORE_INDEX] * n_prompt + ids[n_prompt:]


def test_pair_ids_follow_the_pool_scheme(tiny_llama):
    """Own ids are kept; synthesized ids use ingest's prefixes, so two preference files with the
    same name in different folders do not collide."""
    files = ["/data/a/prefs.jsonl", "/data/b/prefs.jsonl"]
    records = [PAIRS[0], PAIRS[0], {**PAIRS[0], "id": "own-7"}]
    stage = PreparePairs(
        str(tiny_llama),
        "vicuna_v1.1",
        max_length=256,
        max_prompt_length=64,
        id_prefixes=id_prefixes(files),
    )
    rows = read_rows(records, sources=[files[0], files[1], files[1]])
    rows = rows.set_column(2, "index", pa.array([0, 0, 1], pa.int64()))
    out = stage(rows).to_pylist()
    assert [r["id"] for r in out] == ["a/prefs:0", "b/prefs:0", "own-7"]
    assert [r[REASON] for r in out] == [None] * 3


def test_policy_equal_to_reference_gives_log2(tiny_llama):
    import torch

    stage = PreparePairs(str(tiny_llama), "vicuna_v1.1", max_length=512, max_prompt_length=256)
    pairs = stage(read_rows(PAIRS))
    ref = ReferenceLogProbs(
        str(tiny_llama), pad_id=load_tokenizer(str(tiny_llama)).pad_token_id, batch_rows=3
    )
    scored = ref(pairs).to_pylist()
    rc = torch.tensor([r["ref_chosen_logp"] for r in scored])
    rr = torch.tensor([r["ref_rejected_logp"] for r in scored])
    assert bool((rc < 0).all()) and bool((rr < 0).all())
    # The batch size of the pass does not change a sequence's log-prob (padding is masked).
    one = ReferenceLogProbs(str(tiny_llama), pad_id=ref.pad_id, batch_rows=1)(pairs).to_pylist()
    np.testing.assert_allclose([r["ref_chosen_logp"] for r in one], rc.numpy(), atol=1e-4)
    loss, cr, rj = dpo_loss(rc.clone(), rr.clone(), rc, rr, beta=0.1)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
    assert reward_accuracy((cr - rj).numpy()) == 0.5


@pytest.mark.slow
def test_run_dpo_raises_the_margin(ray_local, tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from deita_ray.stages.dpo import run_dpo
    from deita_ray.training.render import collate
    from deita_ray.training.tensors import sequence_logps

    records = [
        {
            "prompt": f"Say the number {i}.",
            "chosen": f"The number is {i}.",
            "rejected": f"No way, {i}!",
        }
        for i in range(8)
    ]
    records += [
        PAIRS[1],
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"prompt": "only a prompt"},
    ]
    # Two preference files of the same name in different folders: their ids must not collide.
    for folder, part in (("a", records[:6]), ("b", records[6:])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "pairs.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in part) + ("{not json\n" if folder == "b" else "")
        )
    cfg = PipelineConfig()
    t = cfg.dpo
    t.model, t.paths, t.num_workers, t.cpus_per_worker = (
        str(tiny_llama),
        [str(tmp_path / "a" / "pairs.jsonl"), str(tmp_path / "b" / "pairs.jsonl")],
        2,
        1.0,
    )
    t.micro_batch_size, t.global_batch_size, t.max_length, t.epochs = 2, 4, 128, 2.0
    t.max_prompt_length = 64
    t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.beta = 1e-3, "linear", 0.1, 0.1
    t.zero_stage, t.gradient_checkpointing = 3, True  # the paper's DPO recipe shape
    out = str(tmp_path / "out")
    res = run_dpo(cfg, out)
    c = res.counts
    assert c.rows_in == 12 and c.rows_out == 9
    assert c.rejected_by_reason == {"identical_responses": 1, "bad_pair": 1, "invalid_json": 1}
    m = res.metrics
    assert m["steps"] == m["optimizer_steps"] == 4
    assert m["loss"][0] == pytest.approx(math.log(2), abs=1e-4)  # policy starts == reference
    assert abs(m["reward_margin"][0]) < 1e-4
    assert m["reward_margin"][-1] > 0.1 and m["reward_accuracy"][-1] > 0.5
    assert m["loss"][-1] < m["loss"][0]
    # Reference log-probs were stored once with the pairs, and equal the start model's.
    parts = sorted(glob.glob(os.path.join(out, "dpo", "part-*.parquet")))
    stored = pa.concat_tables([pq.read_table(p) for p in parts]).to_pylist()
    assert len(stored) == 9 and all(r["ref_chosen_logp"] < 0 for r in stored)
    assert sorted(r["id"] for r in stored) == sorted(
        [f"a/pairs:{i}" for i in range(6)] + ["b/pairs:0", "b/pairs:1", "b/pairs:2"]
    )
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    pad = load_tokenizer(str(tiny_llama)).pad_token_id
    b = collate([r["chosen_input_ids"] for r in stored], [r["chosen_labels"] for r in stored], pad)
    with torch.no_grad():
        logits = model(
            input_ids=torch.as_tensor(b["input_ids"]),
            attention_mask=torch.as_tensor(b["attention_mask"]),
        ).logits
    direct = sequence_logps(logits, torch.as_tensor(b["labels"])).numpy()
    np.testing.assert_allclose([r["ref_chosen_logp"] for r in stored], direct, atol=1e-3)
    assert os.path.isfile(os.path.join(m["final_model"], "model.safetensors"))
    assert m["final_model"] == os.path.join(out, "dpo", "final")
    rejects = pq.read_table(os.path.join(out, "rejects", "dpo")).to_pylist()
    assert sorted(r["reason"] for r in rejects) == [
        "bad_pair",
        "identical_responses",
        "invalid_json",
    ]
    assert sorted(r["id"] for r in rejects) == ["b/pairs:3", "b/pairs:4", "b/pairs:5"]
    bad_json = next(r for r in rejects if r["reason"] == "invalid_json")
    assert bad_json["range_end"] > bad_json["range_start"] >= 0  # located in its file

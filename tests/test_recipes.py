"""The paper jobs (jobs/deita_6k.yaml, deita_10k.yaml, deita_dpo.yaml) against the reference
code: every recipe setting equals the value of the DEITA scripts, with the reference file named
next to it; the step counts, the train split, the DeepSpeed optimizer settings and the DPO text
are the ones those scripts produce. The differences that remain are listed in
docs/training.md ("The paper's recipes")."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from deita_ray.config import load_config

JOBS = Path(__file__).resolve().parents[1] / "jobs"

DEITA = "hkust-nlp/deita"
SFT_SH = f"{DEITA}: examples/train/sft.sh"
SFT_PY = f"{DEITA}: src/deita/alignment/train.py"
DPO_SH = f"{DEITA}: examples/train/dpo.sh"
DPO_PY = f"{DEITA}: src/deita/alignment/dpo_train.py"
FILTER_SH = f"{DEITA}: examples/pipelines/filter_datasets.sh"
EMBED_PY = f"{DEITA}: examples/pipelines/embed_datasets.py"
README = f"{DEITA}: README.md"
# Versions pinned in hkust-nlp/deita: requirements.txt (transformers==4.36.0, trl==0.7.2).
HF_ARGS = "huggingface/transformers v4.36.0: src/transformers/training_args.py (defaults)"
HF_TRAINER = "huggingface/transformers v4.36.0: src/transformers/trainer.py (_inner_training_loop)"
TRL_UTILS = "huggingface/trl v0.7.2: trl/trainer/utils.py (DPODataCollatorWithPadding)"

# (config key, reference value, reference file, what the reference says)
SELECTION = [
    (
        "score.complexity_model.path",
        "hkust-nlp/deita-complexity-scorer",
        README,
        "Scorers: deita-complexity-scorer",
    ),
    ("score.quality_model.path", "hkust-nlp/deita-quality-scorer", README, "deita-quality-scorer"),
    ("embed.model.path", "mistralai/Mistral-7B-v0.1", EMBED_PY, "--model_name_or_path default"),
    ("embed.max_length", 2048, EMBED_PY, "--max_length default 2048"),
    ("select.method", "deita", FILTER_SH, "combined_filter.py"),
    ("select.tau", 0.9, FILTER_SH, "THETA=0.9"),
]
SFT = [
    ("sft.model", "mistralai/Mistral-7B-v0.1", SFT_SH, 'MODELPATH="mistralai/Mistral-7B-v0.1"'),
    ("sft.template", "vicuna_v1.1", SFT_SH, '--conv_template "vicuna_v1.1" --mask_user True'),
    ("sft.max_length", 2048, SFT_SH, "--model_max_length 2048"),
    ("sft.epochs", 6.0, SFT_SH, "--num_train_epochs 6"),
    ("sft.global_batch_size", 512, SFT_SH, "TOTALBSZ=512"),
    ("sft.micro_batch_size", 1, SFT_SH, "BSZPERDEV=1"),
    ("sft.loss_weighting", "sequence", SFT_SH, "BSZPERDEV=1: one conversation per loss"),
    ("sft.learning_rate", 2e-5, SFT_SH, "--learning_rate 2e-5"),
    ("sft.lr_scheduler", "cosine", SFT_SH, '--lr_scheduler_type "cosine"'),
    ("sft.warmup_ratio", 0.1, SFT_SH, "--warmup_ratio 0.1"),
    ("sft.precision", "bf16", SFT_SH, "--bf16 True"),
    ("sft.zero_stage", 2, SFT_SH, "--deepspeed .../deepspeed_config_zero2_no_offload.json"),
    ("sft.gradient_checkpointing", False, SFT_SH, "not set (TrainingArguments default)"),
    ("sft.train_fraction", 0.98, SFT_PY, "split = int(len(perm) * 0.98)"),
    ("sft.split_seed", 0, SFT_PY, "np.random.seed(0)"),
    ("sft.epoch_remainder", "carry", HF_TRAINER, "total_batched_samples % grad_accum"),
    ("sft.weight_decay", 0.0, HF_ARGS, "weight_decay=0.0"),
    ("sft.seed", 42, HF_ARGS, "seed=42"),
]
DPO = [
    ("dpo.beta", 0.1, DPO_SH, "--beta 0.1"),
    ("dpo.template", "deita_dpo", DPO_PY, 'preprocess: "user: " / "assistant: "'),
    ("dpo.max_length", 2048, DPO_PY, "DPOTrainer(..., max_length = 2048)"),
    ("dpo.max_prompt_length", 512, DPO_PY, "DPOTrainer(..., max_prompt_length = 512)"),
    ("dpo.truncation_mode", "keep_end", TRL_UTILS, 'truncation_mode: str = "keep_end"'),
    ("dpo.epochs", 9.0, DPO_SH, "DPOEPOCH=9"),
    ("dpo.global_batch_size", 32, DPO_SH, "TOTALBSZ=32"),
    ("dpo.micro_batch_size", 1, DPO_SH, "BSZPERDEV=1"),
    ("dpo.learning_rate", 5e-7, DPO_SH, "--learning_rate 5e-7"),
    ("dpo.lr_scheduler", "linear", DPO_SH, '--lr_scheduler_type "linear"'),
    ("dpo.warmup_ratio", 0.1, DPO_SH, "--warmup_ratio 0.1"),
    ("dpo.precision", "bf16", DPO_SH, "--bf16 True"),
    # dpo.sh names src/deita/ds_configs/stage3_no_offloading_accelerate.json, which the
    # repository does not contain: the stage is taken from its name.
    ("dpo.zero_stage", 3, DPO_SH, "--deepspeed .../stage3_no_offloading_accelerate.json"),
    ("dpo.gradient_checkpointing", True, DPO_SH, "--gradient_checkpointing True"),
    ("dpo.epoch_remainder", "carry", HF_TRAINER, "total_batched_samples % grad_accum"),
    ("dpo.weight_decay", 0.0, HF_ARGS, "weight_decay=0.0"),
    ("dpo.seed", 42, HF_ARGS, "seed=42"),
]
RECIPES = {
    "deita_6k.yaml": [
        *SELECTION,
        ("select.budget", 6000, SFT_SH, 'DATAPATH="hkust-nlp/deita-6k-v0"'),
        *SFT,
    ],
    "deita_10k.yaml": [
        *SELECTION,
        ("select.budget", 10000, README, "deita-10k-v0"),
        *SFT,
    ],
    "deita_dpo.yaml": DPO,
}
CASES = [(job, *setting) for job, settings in RECIPES.items() for setting in settings]


def job(name: str):
    return load_config(JOBS / name)


def value_of(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize(
    "job_file,key,reference,source,says", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES]
)
def test_each_recipe_setting_equals_the_reference(job_file, key, reference, source, says):
    got = value_of(job(job_file), key)
    assert got == pytest.approx(reference) if isinstance(reference, float) else got == reference, (
        f"{job_file} {key} = {got!r}, but {source} has {reference!r} ({says})"
    )


def test_dpo_starts_from_the_sft_model_of_the_6k_job():
    """dpo.sh: MODELPATH="/PATH/TO/SFT_MODEL"; the paper's DPO model starts from the 6K one."""
    dpo, sft = job("deita_dpo.yaml"), job("deita_6k.yaml")
    assert dpo.dpo.model == f"{sft.output.dir}/sft/final"
    assert dpo.output.dir == sft.output.dir  # one report covers SFT and DPO


def reference_steps(rows: int, workers: int, micro: int, accum: int, epochs: float) -> dict:
    """transformers 4.36's Trainer arithmetic: the DistributedSampler pads every rank to
    ceil(rows / workers); steps per epoch = len(dataloader) // grad_accum; max_steps =
    ceil(epochs x that); warmup = ceil(warmup_ratio x max_steps)."""
    batches = math.ceil(math.ceil(rows / workers) / micro)
    per_epoch = max(1, batches // accum)
    total = math.ceil(epochs * per_epoch)
    return {"batches": batches, "per_epoch": per_epoch, "total": total}


@pytest.mark.parametrize(
    "job_file,section,rows",
    [
        ("deita_6k.yaml", "sft", int(6000 * 0.98)),  # deita-6k-v0, 98 % split
        ("deita_10k.yaml", "sft", int(10000 * 0.98)),
        ("deita_dpo.yaml", "dpo", 10000),  # sample_ultrafeedback.py: random.sample of 10,000
    ],
)
def test_step_counts_equal_the_reference_trainer(job_file, section, rows):
    from deita_ray.training.plan import plan_steps

    t = getattr(job(job_file), section)
    plan = plan_steps(rows, t)
    ref = reference_steps(rows, t.num_workers, t.micro_batch_size, plan.grad_accum, t.epochs)
    assert plan.grad_accum * t.micro_batch_size * t.num_workers == t.global_batch_size
    assert (plan.steps_per_epoch, plan.total_steps) == (ref["per_epoch"], ref["total"])
    assert plan.warmup_steps == math.ceil(t.warmup_ratio * ref["total"])
    assert plan.micro_per_epoch == ref["batches"]  # nothing dropped: remainders carry over
    # 6K: 66 steps (7 warmup); 10K: 114 (12); DPO: 2,808 (281).
    want = {"deita_6k.yaml": 66, "deita_10k.yaml": 114, "deita_dpo.yaml": 2808}[job_file]
    assert plan.total_steps == want


@pytest.mark.parametrize("job_file,section", [("deita_6k.yaml", "sft"), ("deita_dpo.yaml", "dpo")])
def test_optimizer_settings_equal_the_reference(job_file, section):
    """The DeepSpeed configs of the scripts fill "auto" from TrainingArguments (HF_ARGS):
    AdamW betas (0.9, 0.999), eps 1e-8, max_grad_norm 1.0."""
    from deita_ray.training.plan import deepspeed_config, plan_steps

    t = getattr(job(job_file), section)
    ds = deepspeed_config(t, plan_steps(10000, t))
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW"
    assert (params["betas"], params["eps"], params["weight_decay"]) == ([0.9, 0.999], 1e-8, 0.0)
    assert params["lr"] == t.learning_rate and ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == t.zero_stage


def test_train_split_is_the_reference_permutation():
    """SFT_PY: np.random.seed(0); perm = np.random.permutation(len(raw_data)); the first
    int(len * 0.98) train, in that order."""
    from deita_ray.stages.sft import training_order

    cfg = job("deita_6k.yaml").sft
    saved = np.random.get_state()
    try:
        np.random.seed(0)
        perm = np.random.permutation(6000)
    finally:
        np.random.set_state(saved)
    split = int(len(perm) * 0.98)
    train, held = training_order(6000, cfg.train_fraction, cfg.split_seed)
    assert train.tolist() == perm[:split].tolist() and held.tolist() == perm[split:].tolist()
    assert (len(train), len(held)) == (5880, 120)


def test_dpo_text_is_the_reference_preprocess():
    """DPO_PY preprocess(): prompt = conv.system + conv.sep + messages[0]["role"] + ": " +
    prompt + conv.sep; chosen = chosen[1]["role"] + ": " + chosen[1]["content"] + conv.sep2,
    with conv = vicuna_v1.1 of src/deita/alignment/conversation.py."""
    from deita_ray.stages.dpo import parse_pair, split_response
    from deita_ray.training.render import only_last_target, render_segments

    system = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions."
    )
    sample = {  # HuggingFaceH4/ultrafeedback_binarized train_prefs shape
        "prompt": "Name a colour.",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "chosen": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ],
        "rejected": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Seven, maybe."},
        ],
    }
    want_prompt = system + " " + sample["messages"][0]["role"] + ": " + sample["prompt"] + " "
    prompt, chosen, rejected = parse_pair(sample)
    template = job("deita_dpo.yaml").dpo.template
    for text, side in ((chosen, "chosen"), (rejected, "rejected")):
        conv = prompt + [{"role": "assistant", "content": text}]
        got_prompt, response = split_response(only_last_target(render_segments(conv, template)))
        ref = sample[side][1]
        assert got_prompt == want_prompt
        assert response == [(ref["role"] + ": " + ref["content"] + "</s>", True)]

"""The step plan, learning-rate schedules and DeepSpeed config (training/plan.py), and the
per-sequence log-probabilities of training/tensors.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deita_ray.config import TrainingConfig
from deita_ray.training.plan import deepspeed_config, lr_factor, plan_steps


def test_plan_steps_and_accumulation():
    t = TrainingConfig(
        global_batch_size=8, micro_batch_size=2, num_workers=2, epochs=3.0, warmup_ratio=0.1
    )
    p = plan_steps(37, t)  # 18 rows per worker -> 9 micro batches -> 4 steps of accumulation 2
    assert (p.grad_accum, p.steps_per_epoch, p.total_steps, p.warmup_steps) == (2, 4, 12, 2)
    t.max_steps = 5
    assert plan_steps(37, t).total_steps == 5
    with pytest.raises(ValueError, match="cannot fill"):
        plan_steps(7, t)
    t.global_batch_size = 6
    with pytest.raises(ValueError, match="multiple"):
        plan_steps(100, t)


def test_epoch_remainder_drop_or_carry():
    """DEITA's 6K recipe on 8 workers: 5,880 rows (the 98 % split), micro-batch 1, 512 per
    step -> 735 micro-batches per worker per epoch, 11 steps of 64, 66 steps in 6 epochs.
    'drop' feeds 704 micro-batches an epoch and skips 31; 'carry' feeds all 735, so steps span
    epoch ends, as transformers' Trainer (4.36) accumulated for the reference run."""
    t = TrainingConfig(global_batch_size=512, micro_batch_size=1, num_workers=8, epochs=6.0)
    drop = plan_steps(5880, t)
    assert (drop.grad_accum, drop.steps_per_epoch, drop.total_steps) == (64, 11, 66)
    assert drop.micro_per_epoch == 11 * 64 == 704
    t.epoch_remainder = "carry"
    carry = plan_steps(5880, t)
    assert (carry.steps_per_epoch, carry.total_steps, carry.micro_per_epoch) == (11, 66, 735)
    # 66 steps x 64 = 4,224 micro-batches: five whole epochs (3,675) and 549 of the sixth.
    assert divmod(carry.total_steps * carry.grad_accum, carry.micro_per_epoch) == (5, 549)
    assert carry.warmup_steps == drop.warmup_steps == 7  # ceil(0.1 x 66), as transformers


def test_lr_schedules_match_the_closed_forms():
    total, warm = 10, 2
    assert [lr_factor(s, total, warm, "cosine") for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    for s in range(warm, total + 1):
        prog = (s - warm) / (total - warm)
        assert lr_factor(s, total, warm, "cosine") == pytest.approx(
            0.5 * (1 + math.cos(math.pi * prog))
        )
        assert lr_factor(s, total, warm, "linear") == pytest.approx(1 - prog)
        assert lr_factor(s, total, warm, "constant") == 1.0


def test_deepspeed_config_from_training_config():
    t = TrainingConfig(
        global_batch_size=512,
        micro_batch_size=4,
        num_workers=8,
        zero_stage=2,
        use_gpu=True,
        learning_rate=2e-5,
        weight_decay=0.0,
    )
    plan = plan_steps(6000, t)
    c = deepspeed_config(t, plan)
    assert c["gradient_accumulation_steps"] == 16 == plan.grad_accum
    assert c["train_batch_size"] == 512 and c["train_micro_batch_size_per_gpu"] == 4
    assert c["bf16"]["enabled"] and c["optimizer"]["type"] == "AdamW"
    assert c["zero_optimization"] == {"stage": 2}
    t_cpu = TrainingConfig(zero_stage=3, global_batch_size=4, micro_batch_size=2, num_workers=2)
    c = deepspeed_config(t_cpu, plan_steps(8, t_cpu))
    assert not c["bf16"]["enabled"] and c["optimizer"]["params"]["torch_adam"]
    assert c["zero_optimization"]["stage"] == 3
    assert c["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


def test_sequence_logps_sums_only_labelled_tokens():
    import torch

    from deita_ray.training.tensors import sequence_logps

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[-100, 2, 3, -100], [-100, -100, -100, 5]])
    lp = torch.log_softmax(logits, -1)
    want = [lp[0, 0, 2] + lp[0, 1, 3], lp[1, 2, 5]]
    got = sequence_logps(logits, labels)
    np.testing.assert_allclose(got.numpy(), torch.stack(want).numpy(), rtol=1e-6)

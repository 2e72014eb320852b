"""Torch helpers for the methods' step functions: a collated batch onto the device, and
per-sequence log-probabilities of the labelled tokens. torch is imported inside the functions
(and nothing here needs Ray), so a step function can be imported and run without a cluster.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deita_ray.training.render import IGNORE_INDEX


def to_torch(batch: dict[str, np.ndarray], device: Any) -> dict[str, Any]:
    """Every array of a collated batch as a tensor on ``device``."""
    import torch

    return {k: torch.as_tensor(v).to(device) for k, v in batch.items()}


def shifted_token_logps(logits: Any, labels: Any) -> tuple[Any, Any]:
    """log p(label) of every next-token prediction (fp32), and the mask of labelled positions.

    Position ``t`` of the result scores ``labels[:, t + 1]`` from ``logits[:, t]``.
    """
    import torch

    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp, mask


def sequence_logps(logits: Any, labels: Any) -> Any:
    """Sum of log p(label) over the tokens whose label is not -100, per sequence (fp32)."""
    logp, mask = shifted_token_logps(logits, labels)
    return (logp * mask).sum(-1)

"""Evaluation objectives f(theta, x) per test sample, from logits (..., N, C) and labels (N,)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample(logits: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
    """One objective per test sample: logits (..., N, C), y (N,) -> (..., N).

    loss: cross-entropy; margin: correct-class logit minus the best other logit;
    correct: 1.0 where the argmax is the label, else 0.0.
    """
    if name == "loss":
        lsm = F.log_softmax(logits, -1)
        return -lsm.gather(-1, y.expand(*logits.shape[:-1])[..., None]).squeeze(-1)
    if name == "margin":
        true = logits.gather(-1, y.expand(*logits.shape[:-1])[..., None]).squeeze(-1)
        other = logits.masked_fill(F.one_hot(y, logits.shape[-1]).bool(), float("-inf"))
        return true - other.max(-1).values
    if name == "correct":
        return (logits.argmax(-1) == y).to(logits.dtype)
    raise ValueError(f"unknown objective {name}")


def all_objectives(logits: torch.Tensor, y: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """(..., N, C) -> (n_objectives, ..., N) in the order of names."""
    return torch.stack([per_sample(logits, y, n) for n in names])

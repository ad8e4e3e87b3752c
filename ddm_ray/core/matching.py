"""Gradient-matching distances used by synset distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddm_ray.core.models import Params


def layer_cos_distance(a: Params, b: Params) -> torch.Tensor:
    """sum over parameter tensors k of 1 - cos(a_k, b_k); tensors (U, *shape) -> (U,)."""
    first = next(iter(a.values()))
    total = torch.zeros(first.shape[0], device=first.device, dtype=first.dtype)
    for k in a:
        total = total + (1 - F.cosine_similarity(a[k].flatten(1), b[k].flatten(1), dim=1))
    return total


def reverse_matching_distance(syn_grad: Params, real_grad: Params) -> torch.Tensor:
    """Distance between -syn_grad (the synset's descent direction) and real_grad, per unit (U,).

    Zero when the synthetic gradient is exactly the reverse of the real one (any positive scale),
    2 per tensor when they point the same way.
    """
    return layer_cos_distance({k: -v for k, v in syn_grad.items()}, real_grad)

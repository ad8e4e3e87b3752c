"""Synsets and the fast-learn step: fine-tuning the final model on synthetic samples.

A synset for U units with IPC samples each is three tensors:
  x:      (U, IPC, *input_shape)  synthetic inputs
  logits: (U, IPC, C)             soft-label logits (the label is softmax(logits))
  weight: (U, IPC)                per-sample loss weight (sign and scale of the step)
  scale:  (U, IPC, L) or None     optional per-sample step scale of each of the L parameter
                                  tensors (a per-layer learning rate that travels with the sample)

The fast-learn step from theta with `steps` steps of size `lr` descends
    L(theta; S) = sum_j weight_j * CE(f(theta, x_j), softmax(logits_j)),
with tensor k of the gradient taken as sum_j scale_{j,k} * weight_j * grad_k CE_j when scales exist.
Removing a set of units descends the sum of their synsets' losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from ddm_ray.core.models import Network, Params


@dataclass
class Synset:
    """Synthetic samples for a contiguous set of units (see module docstring for shapes)."""

    unit_ids: torch.Tensor  # (U,) int64
    x: torch.Tensor
    logits: torch.Tensor
    weight: torch.Tensor
    scale: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.unit_ids.numel())

    def select(self, rows: torch.Tensor | slice) -> Synset:
        return Synset(
            self.unit_ids[rows], self.x[rows], self.logits[rows], self.weight[rows],
            None if self.scale is None else self.scale[rows],
        )

    @staticmethod
    def concat(parts: list[Synset]) -> Synset:
        scales = [p.scale for p in parts]
        if any(s is None for s in scales) and not all(s is None for s in scales):
            raise ValueError("cannot concatenate synsets with and without step scales")
        return Synset(
            torch.cat([p.unit_ids for p in parts]),
            torch.cat([p.x for p in parts]),
            torch.cat([p.logits for p in parts]),
            torch.cat([p.weight for p in parts]),
            None if scales[0] is None else torch.cat(scales),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, torch.Tensor]:
        d = {"unit_ids": self.unit_ids, "x": self.x, "logits": self.logits, "weight": self.weight}
        if self.scale is not None:
            d["scale"] = self.scale
        return d

    @staticmethod
    def from_dict(d: dict[str, torch.Tensor]) -> Synset:
        return Synset(d["unit_ids"], d["x"], d["logits"], d["weight"], d.get("scale"))


def synset_loss(
    net: Network, params: Params, x: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Weighted soft-label cross-entropy of one synset: x (m, ...), logits (m, C), weight (m,)."""
    out = net.logits(params, x)
    ce = -(F.softmax(logits, -1) * F.log_softmax(out, -1)).sum(-1)
    return (weight * ce).sum()


def fast_learn(
    net: Network,
    params: Params,
    x: torch.Tensor,
    logits: torch.Tensor,
    weight: torch.Tensor,
    steps: int,
    lr: float,
    scale: torch.Tensor | None = None,
) -> Params:
    """`steps` descent steps of size lr from params on one synset (m samples). Differentiable.

    scale (m, L), if given, scales each sample's gradient of each of the L parameter tensors.
    """
    if scale is None:
        g_fn = grad(lambda p: synset_loss(net, p, x, logits, weight))
    else:
        keys = list(params)

        def one(p: Params, xi: torch.Tensor, zi: torch.Tensor, wi: torch.Tensor) -> torch.Tensor:
            return synset_loss(net, p, xi[None], zi[None], wi[None])

        per_sample = vmap(grad(one), in_dims=(None, 0, 0, 0))

        def g_fn(p: Params) -> Params:
            g = per_sample(p, x, logits, weight)  # (m, *shape) per tensor
            return {k: torch.tensordot(scale[:, i], g[k], dims=1) for i, k in enumerate(keys)}

    p = params
    for _ in range(steps):
        g = g_fn(p)
        p = {k: p[k] - lr * g[k] for k in p}
    return p

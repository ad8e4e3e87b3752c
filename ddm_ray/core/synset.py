"""Synsets and the fast-learn step: fine-tuning the final model on synthetic samples.

The synsets of U units share one pool of M synthetic samples; each unit weighs every sample:
  x:      (M, *input_shape)  synthetic inputs
  label:  (M, C)             soft labels (probability vectors; one-hot for hard labels)
  weight: (U, M)             per-unit loss weight of each sample (0: not in that unit's synset)

Unit u's synset is {(x_j, label_j, weight[u, j]) : weight[u, j] != 0}. Fast-learning it from theta
takes `steps` descent steps of size lr on

    L_u(theta) = sum_j weight[u, j] * CE(f(theta, x_j), label_j),

and removing a set of units descends the sum of their losses, i.e. uses the summed weight rows, so
synsets compose by adding weights. Weights carry sign and magnitude: a negative weight is ascent on
that sample. Per-unit synsets (the paper's IPC samples per unit) are the special case where each
unit owns its own IPC columns; the basis synsets of `core.distill` share all M probe samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from ddm_ray.core.models import Network, Params, flatten, unflatten


@dataclass
class Synset:
    """Synthetic samples and per-unit weights (see the module docstring for shapes)."""

    unit_ids: torch.Tensor  # (U,) int64
    x: torch.Tensor
    label: torch.Tensor
    weight: torch.Tensor

    def __len__(self) -> int:
        return int(self.unit_ids.numel())

    def select(self, rows: torch.Tensor | slice) -> Synset:
        """The synsets of some units; the sample pool is shared, not copied."""
        return Synset(self.unit_ids[rows], self.x, self.label, self.weight[rows])

    def compact(self) -> Synset:
        """The same synsets with the samples no unit uses dropped (what an online block ships)."""
        used = (self.weight != 0).any(0)
        if bool(used.all()):
            return self
        return Synset(self.unit_ids, self.x[used], self.label[used], self.weight[:, used])

    @staticmethod
    def concat(parts: list[Synset]) -> Synset:
        """Units of several synsets in order; their sample pools are stacked (block weights)."""
        m = sum(int(p.x.shape[0]) for p in parts)
        weight = torch.zeros(sum(len(p) for p in parts), m, dtype=parts[0].weight.dtype)
        r = c = 0
        for p in parts:
            weight[r : r + len(p), c : c + p.x.shape[0]] = p.weight
            r, c = r + len(p), c + int(p.x.shape[0])
        return Synset(
            torch.cat([p.unit_ids for p in parts]),
            torch.cat([p.x for p in parts]),
            torch.cat([p.label for p in parts]),
            weight,
        )

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"unit_ids": self.unit_ids, "x": self.x, "label": self.label, "weight": self.weight}

    @staticmethod
    def from_dict(d: dict[str, torch.Tensor]) -> Synset:
        """From `to_dict`'s form (keys `SYNSET_KEYS`)."""
        return Synset(d["unit_ids"], d["x"], d["label"], d["weight"])

    def check(self, input_shape: tuple[int, ...], num_classes: int) -> str | None:
        """A one-line reason when the tensors do not fit a model of this shape, else None."""
        m = self.x.shape[0]
        if tuple(self.x.shape[1:]) != tuple(input_shape):
            return f"synthetic inputs have shape {tuple(self.x.shape[1:])}, the model takes {tuple(input_shape)}"
        if tuple(self.label.shape) != (m, num_classes):
            return f"labels have shape {tuple(self.label.shape)}, expected {(m, num_classes)}"
        if tuple(self.weight.shape) != (len(self), m):
            return f"weights have shape {tuple(self.weight.shape)}, expected {(len(self), m)}"
        for name, t in (("inputs", self.x), ("labels", self.label), ("weights", self.weight)):
            if not bool(torch.isfinite(t).all()):
                return f"synset {name} hold non-finite values"
        return None


SYNSET_KEYS = ("unit_ids", "x", "label", "weight")


def synset_loss(
    net: Network, params: Params, x: torch.Tensor, label: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Weighted soft-label cross-entropy: x (m, ...), label (m, C), weight (m,)."""
    out = net.logits(params, x)
    ce = -(label * torch.log_softmax(out, -1)).sum(-1)
    return (weight * ce).sum()


def fast_learn(
    net: Network,
    params: Params,
    x: torch.Tensor,
    label: torch.Tensor,
    weight: torch.Tensor,
    steps: int,
    lr: float,
) -> Params:
    """`steps` descent steps of size lr from params on one synset (m samples). Differentiable."""
    g_fn = grad(lambda p: synset_loss(net, p, x, label, weight))
    p = params
    for _ in range(steps):
        g = g_fn(p)
        p = {k: p[k] - lr * g[k] for k in p}
    return p


def pool_gradients(
    net: Network, params: Params, x: torch.Tensor, label: torch.Tensor, chunk: int = 256,
) -> torch.Tensor:
    """(m, P): every pool sample's soft-label cross-entropy gradient at params (x (m, ...), label
    (m, C)), a chunk of samples at a time (memory: m x P out, chunk x P activations' gradients)."""
    like = params
    flat = flatten(params)

    def one(pf: torch.Tensor, xi: torch.Tensor, li: torch.Tensor) -> torch.Tensor:
        return -(li * torch.log_softmax(net.logits(unflatten(pf, like), xi[None])[0], -1)).sum()

    g_fn = vmap(grad(one), in_dims=(None, 0, 0))
    return torch.cat([g_fn(flat, x[i : i + chunk], label[i : i + chunk]) for i in range(0, x.shape[0], chunk)])


def one_step_moves(
    net: Network,
    params: Params,
    x: torch.Tensor,
    label: torch.Tensor,
    weight: torch.Tensor,
    lr: float,
    chunk: int = 256,
    grads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Moves (B, P) of one fast-learn step for B weight rows (B, m) on one shared sample pool.

    One step is linear in the weights: delta_b = -lr * sum_j weight[b, j] * grad CE_j(params), so
    the per-sample gradients are computed once per chunk of samples and reused by every row
    (memory: chunk x P at a time), or taken from `grads` (m, P) = `pool_gradients(...)` when the
    caller holds them: then the moves are one matrix product, -lr * weight @ grads."""
    if grads is not None:
        return -lr * (weight.to(grads.dtype) @ grads)
    flat = flatten(params)
    out = torch.zeros(weight.shape[0], flat.numel(), dtype=flat.dtype, device=flat.device)
    for i in range(0, x.shape[0], chunk):
        g = pool_gradients(net, params, x[i : i + chunk], label[i : i + chunk], chunk)  # (c, P)
        out.addmm_(weight[:, i : i + chunk].to(g.dtype), g, alpha=-lr)
    return out

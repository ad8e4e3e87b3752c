"""Unrolled-SGD leave-one-out targets in a k-dimensional subspace, for every unit at once.

The forward unroll (`core.displacement`, Hara et al. 2019) propagates each unit's displacement
D_u = theta_{-u} - theta_final through training: one Hessian-vector product per unit per step.
Only its coordinates c_u = V^T D_u in the probe subspace V (P, k) are needed, and those come from
the adjoint (reverse-mode) recursion at a cost independent of the number of units U: propagate the
k directions backwards through the trajectory and, at each step, add every unit's term from the
per-sample gradients of that step's batch.

With s_t(u) = (1/B) sum_{i in u, i in batch t} grad l_i(theta_t), H'_t = H_t + wd I (batch Hessian)
and the forward recursion (momentum mu, plain SGD when mu = 0)

    V_{t+1} = mu V_t + H'_t D_t - s_t(u),   D_{t+1} = D_t - lr V_{t+1},   D_0 = V_0 = 0,

the adjoint state (A, B) (both (P, k)) starts at (V, 0) after the last step and, for t = T-1 .. 0:

    Z = lr A - B;   c_u += Z^T s_t(u);   A <- A - H'_t Z;   B <- -mu Z.

Cost per step: k HVPs on the batch plus one per-sample-gradient pass over it, whatever U is.
The parameters theta_t are recomputed epoch by epoch from the per-epoch checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, jvp, vmap

from ddm_ray.config import TrainConfig
from ddm_ray.core.models import Network, Params, flatten, unflatten
from ddm_ray.core.probe import per_sample_grads
from ddm_ray.core.training import Trajectory, batch_loss, batch_schedule, replay_epoch


def _batch_hvp(
    net: Network, theta: Params, xb: torch.Tensor, yb: torch.Tensor, nominal: int, chunk: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Z (k, P) -> H_t Z (k, P): Hessian of the batch loss at theta, vmapped over rows."""
    flat = flatten(theta)
    g_fn = grad(lambda pf: batch_loss(net, unflatten(pf, theta), xb, yb, nominal))

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return jvp(g_fn, (flat,), (v,))[1]

    return lambda z: vmap(hvp, chunk_size=chunk)(z)


def adjoint_unrolled(
    net: Network,
    traj: Trajectory,
    x: torch.Tensor,
    y: torch.Tensor,
    unit_of: torch.Tensor,
    num_units: int,
    cfg: TrainConfig,
    directions: torch.Tensor,
    unroll_epochs: int | None = None,
    chunk: int = 64,
    on_epoch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """c (U, k) = V^T D_u for every unit, with V = directions (P, k).

    x (N, ...), y (N,) the training data in training order; unit_of (N,) each sample's unit in
    [0, U), or -1 for samples in no unit. With unroll_epochs set, only the last that many epochs
    contribute (earlier removals are treated as absorbed, as in the forward unroll).
    on_epoch(epochs_done) is called after each epoch of the backward pass (progress).
    """
    n = x.shape[0]
    dev = x.device
    schedule = batch_schedule(n, cfg)
    first = 0 if unroll_epochs is None else max(0, cfg.epochs - unroll_epochs)
    a = directions.T.contiguous()  # (k, P): rows are directions
    b = torch.zeros_like(a)
    c = torch.zeros(num_units + 1, a.shape[0], dtype=a.dtype, device=dev)  # last row: no unit
    unit_of = torch.where(unit_of < 0, num_units, unit_of).to(dev)
    for done, epoch in enumerate(range(cfg.epochs - 1, first - 1, -1)):
        thetas = replay_epoch(net, traj, x, y, cfg, epoch)
        for batch, theta in zip(reversed(schedule[epoch]), reversed(thetas), strict=True):
            batch = batch.to(dev)
            nominal = batch.numel()
            z = cfg.lr * a - b  # (k, P)
            xb, yb = x[batch], y[batch]
            g = per_sample_grads(net, theta, xb, yb)  # (b, P)
            c.index_add_(0, unit_of[batch], (g @ z.T) / nominal)
            hz = _batch_hvp(net, theta, xb, yb, nominal, chunk)(z)
            if cfg.weight_decay:
                hz = hz + cfg.weight_decay * z
            a = a - hz
            b = -cfg.momentum * z if cfg.momentum > 0 else b
        if on_epoch is not None:
            on_epoch(done + 1)
    return c[:num_units]

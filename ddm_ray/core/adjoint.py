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

Cost per step: k forward-over-reverse passes on the batch (each gives one HVP and the k-th
column of every sample's directional derivative at once), whatever U is.
The parameters theta_t are recomputed epoch by epoch from the per-epoch checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from ddm_ray.config import TrainConfig
from ddm_ray.core.models import Network, Params, unflatten
from ddm_ray.core.training import Trajectory, batch_schedule, replay_epoch


def _hvp_and_directional(
    net: Network, theta: Params, xb: torch.Tensor, yb: torch.Tensor, nominal: int, chunk: int
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Z (k, P) -> (H_t Z (k, P), Z G_t^T / B (k, b)) in ONE forward-over-reverse pass per direction.

    The batch loss is the sum of per-sample losses l_i / B; differentiating it with the per-sample
    losses as auxiliary output and pushing a tangent z through gives both the Hessian-vector
    product and every sample's directional derivative grad l_i . z / B, so no per-sample gradient
    matrix (b x P) is ever formed."""

    def loss_and_terms(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
        per = F.cross_entropy(net.logits(p, xb), yb, reduction="none") / nominal
        return per.sum(), per

    g_fn = grad(loss_and_terms, has_aux=True)

    def both(t: Params) -> tuple[Params, torch.Tensor]:
        _, (hz, dper) = jvp(g_fn, (theta,), (t,))
        return hz, dper

    def run(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hz, dper = vmap(both, chunk_size=chunk)(unflatten(z, theta))
        return torch.cat([v.reshape(z.shape[0], -1) for v in hz.values()], 1), dper

    return run


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
    chunk: int = 128,
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
            hz, dper = _hvp_and_directional(net, theta, x[batch], y[batch], nominal, chunk)(z)
            c.index_add_(0, unit_of[batch], dper.T)  # s_t(u) . z for every unit at once
            if cfg.weight_decay:
                hz = hz + cfg.weight_decay * z
            a = a - hz
            b = -cfg.momentum * z if cfg.momentum > 0 else b
        if on_epoch is not None:
            on_epoch(done + 1)
    return c[:num_units]

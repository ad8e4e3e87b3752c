"""SGD training with a fixed data order, keeping a parameter trajectory.

The same loop serves the target model and exact leave-one-out retraining: removed samples are
dropped from the batches they would have been in, every batch keeps its position, and the batch
loss is the summed cross-entropy of the kept samples divided by the nominal batch size. So a
retraining differs from the original run only by the removed data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import grad

from ddm_ray.config import TrainConfig
from ddm_ray.core.models import Network, Params

# hook(step, params_t, batch_idx (b,), velocity_t or None) is called at theta_t before its update.
StepHook = Callable[[int, Params, torch.Tensor, "Params | None"], None]


@dataclass
class Trajectory:
    """Checkpoints theta_0 (init), theta_1..theta_E (end of each epoch).

    velocities[e] is the momentum buffer at checkpoint e (None for plain SGD), so any epoch can be
    replayed exactly from its checkpoint (`replay_epoch`).
    """

    checkpoints: list[Params]
    steps_per_epoch: int
    velocities: list[Params] | None = None

    @property
    def final(self) -> Params:
        return self.checkpoints[-1]


def batch_schedule(n: int, cfg: TrainConfig) -> list[list[torch.Tensor]]:
    """Per epoch, the list of batches of sample indices (a seeded permutation split by B)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    return [list(torch.randperm(n, generator=gen).split(cfg.batch_size)) for _ in range(cfg.epochs)]


def batch_loss(
    net: Network, params: Params, x: torch.Tensor, y: torch.Tensor, nominal: int
) -> torch.Tensor:
    """Summed cross-entropy over the batch divided by the nominal batch size. x: (b, ...), y: (b,)."""
    return F.cross_entropy(net.logits(params, x), y, reduction="sum") / nominal


def train(
    net: Network,
    params0: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    keep: torch.Tensor | None = None,
    hook: StepHook | None = None,
    start_epoch_hook: int = 0,
    on_epoch: Callable[[int], None] | None = None,
) -> Trajectory:
    """Train from `params0` on x (N, ...), y (N,) with samples where keep (N,) is False removed.

    `hook` is called at every step of epochs >= start_epoch_hook with the pre-update parameters;
    on_epoch(epochs_done) after every epoch (progress; it sees nothing of the training state).
    """
    n = x.shape[0]
    keep = torch.ones(n, dtype=torch.bool) if keep is None else keep.cpu()
    params = {k: v.clone() for k, v in params0.items()}
    velocity: Params | None = (
        {k: torch.zeros_like(v) for k, v in params.items()} if cfg.momentum > 0 else None
    )
    g_fn = grad(lambda p, xb, yb, nom: batch_loss(net, p, xb, yb, nom))
    checkpoints = [{k: v.clone() for k, v in params.items()}]
    velocities = None if velocity is None else [{k: v.clone() for k, v in velocity.items()}]
    schedule = batch_schedule(n, cfg)
    step = 0
    for epoch, batches in enumerate(schedule):
        for batch in batches:
            idx = batch[keep[batch]]
            if hook is not None and epoch >= start_epoch_hook:
                hook(step, params, batch, velocity)
            params, velocity = sgd_step(g_fn, params, velocity, x, y, idx, batch.numel(), cfg)
            step += 1
        checkpoints.append({k: v.clone() for k, v in params.items()})
        if velocities is not None and velocity is not None:
            velocities.append({k: v.clone() for k, v in velocity.items()})
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return Trajectory(checkpoints=checkpoints, steps_per_epoch=len(schedule[0]), velocities=velocities)


def sgd_step(
    g_fn: Callable[..., Params],
    params: Params,
    velocity: Params | None,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    nominal: int,
    cfg: TrainConfig,
) -> tuple[Params, Params | None]:
    """One (momentum) SGD step on the samples idx (b,) of a batch of nominal size. Returns new
    (params, velocity); the inputs are not modified."""
    if idx.numel() > 0:
        g = g_fn(params, x[idx], y[idx], nominal)
    else:
        g = {k: torch.zeros_like(v) for k, v in params.items()}
    new_p: Params = {}
    new_v: Params | None = None if velocity is None else {}
    with torch.no_grad():
        for k in params:
            gk = g[k] + cfg.weight_decay * params[k] if cfg.weight_decay else g[k]
            if velocity is not None and new_v is not None:
                new_v[k] = cfg.momentum * velocity[k] + gk
                gk = new_v[k]
            new_p[k] = params[k] - cfg.lr * gk
    return new_p, new_v


def replay_epoch(
    net: Network, traj: Trajectory, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, epoch: int
) -> list[Params]:
    """The pre-update parameters theta_t of every step of `epoch`, recomputed from its checkpoint.

    Same code path as `train`, so the replayed parameters equal the original run's."""
    schedule = batch_schedule(x.shape[0], cfg)
    params = {k: v.clone() for k, v in traj.checkpoints[epoch].items()}
    velocity = None
    if cfg.momentum > 0:
        if traj.velocities is None:
            raise ValueError("replaying a momentum run needs the trajectory's velocities")
        velocity = {k: v.clone() for k, v in traj.velocities[epoch].items()}
    g_fn = grad(lambda p, xb, yb, nom: batch_loss(net, p, xb, yb, nom))
    out = []
    for batch in schedule[epoch]:
        out.append(params)
        params, velocity = sgd_step(g_fn, params, velocity, x, y, batch.to(x.device), batch.numel(), cfg)
    return out


def retrain_without(
    net: Network, params0: Params, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, removed: torch.Tensor
) -> Params:
    """Exact leave-out retraining: the same init, seed and data order with the samples where
    removed (N,) is True dropped from their batches. The final parameters."""
    return train(net, params0, x, y, cfg, keep=~removed.cpu()).final

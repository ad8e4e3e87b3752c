"""Synset distillation.

Two families, chosen by `DistillConfig.method`:

* ``basis`` (default). Offline, every unit's counterfactual displacement D_u = theta_{-u} -
  theta_final is estimated only through its coordinates c_u (k,) in the probe subspace V (P, k)
  (`core.probe`): by unrolled SGD (`core.adjoint`, or the per-unit forward unroll), by an influence
  function in the subspace (`core.targets`), or a blend. The synset of u is then the shared pool of
  probe samples with weights w_u (M,) solved in closed form so that ONE descent step of the online
  lr from theta_final moves the model by V diag(lam / (lam + ridge lam_max)) c_u: exactly the
  (shrunk) projection of the target on the subspace. Weights may be negative (ascent on that
  sample); nothing is fitted iteratively, so distillation is a matrix product per unit.
* ``soft_label`` / ``literal``: the paper's reverse gradient matching over the trajectory, IPC
  samples per unit initialised from its members. Pick checkpoints t < t+s and make
  -grad L(theta_{t+s}; S) match grad L(theta_t; D_u) by the summed per-layer (1 - cosine)
  distance. ``literal`` keeps hard labels equal to the unit's class, ``soft_label`` learns the
  label logits too. Each unit's step is then scaled to the norm of the real unit's gradient at the
  final model. Kept for comparison: both measure far below ``basis`` (docs/method.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from ddm_ray.config import DistillConfig
from ddm_ray.core.matching import reverse_matching_distance
from ddm_ray.core.models import Network, Params
from ddm_ray.core.probe import ProbeBasis
from ddm_ray.core.synset import Synset, synset_loss
from ddm_ray.core.training import Trajectory


# ---- basis synsets ------------------------------------------------------------------------------
def basis_synset(basis: ProbeBasis, unit_ids: torch.Tensor, c: torch.Tensor, lr: float, ridge: float, num_classes: int) -> Synset:
    """Synsets over the probe pool for targets c (U, k): weights (U, M), hard labels."""
    weight = basis.weights_for(c, lr, ridge)
    label = F.one_hot(basis.y.cpu(), num_classes).to(basis.x.dtype)
    return Synset(unit_ids.cpu(), basis.x.cpu(), label, weight.cpu())


# ---- paper-style reverse gradient matching (per-unit samples) -----------------------------------
def init_synset(
    members: list[torch.Tensor], x: torch.Tensor, ipc: int, seed: int
) -> torch.Tensor:
    """IPC samples per unit from real members (cycled if a unit is smaller): (U, IPC, *shape)."""
    gen = torch.Generator().manual_seed(seed)
    xs = []
    for m in members:
        order = m[torch.randperm(m.numel(), generator=gen).to(m.device)]
        pick = order[torch.arange(ipc, device=m.device) % order.numel()]
        xs.append(x[pick])
    return torch.stack(xs).clone()


def _unit_grads(
    net: Network, params: Params, x: torch.Tensor, y: torch.Tensor, unit_of: torch.Tensor, u: int
) -> Params:
    """Per-unit summed CE gradients at params: (U, *shape). unit_of indexes 0..u-1 locally."""

    def one(p: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net.logits(p, xi[None]), yi[None], reduction="sum")

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return {
        k: torch.zeros((u, *v.shape[1:]), device=v.device, dtype=v.dtype).index_add_(0, unit_of, v)
        for k, v in per.items()
    }


def distill_class(
    net: Network,
    traj: Trajectory,
    class_index: int,
    unit_ids: list[int],
    members: list[torch.Tensor],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    cfg: DistillConfig,
) -> Synset:
    """Reverse gradient matching (soft_label / literal) for one class's units.

    members[i] (n_i,) are the training indices of unit unit_ids[i]. Returns a Synset whose pool
    holds IPC samples per unit (unit i owns columns i*IPC .. (i+1)*IPC - 1)."""
    torch.manual_seed(cfg.seed + class_index)
    lo, hi = float(x_train.min()), float(x_train.max())
    u, ipc, c = len(unit_ids), cfg.ipc, net.num_classes
    dev = x_train.device
    x = init_synset(members, x_train, ipc, cfg.seed + class_index).requires_grad_(True)
    logits = torch.zeros(u, ipc, c, device=dev)
    logits[:, :, class_index] = 4.0
    learn_labels = cfg.method == "soft_label"
    logits.requires_grad_(learn_labels)
    weight = torch.full((u, ipc), 1.0 / ipc, device=dev)
    idx = torch.cat(members)
    local = torch.cat([torch.full((m.numel(),), i, dtype=torch.long, device=dev) for i, m in enumerate(members)])
    x_real, y_real = x_train[idx], y_train[idx]
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    last = len(traj.checkpoints) - 1
    opt = torch.optim.Adam([x] + ([logits] if learn_labels else []), lr=cfg.lr)

    def syn_grad(p: Params, xu: torch.Tensor, zu: torch.Tensor, wu: torch.Tensor) -> Params:
        return grad(lambda q: synset_loss(net, q, xu, torch.softmax(zu, -1), wu))(p)

    for _ in range(cfg.steps):
        t = int(torch.randint(0, max(1, last), (1,), generator=gen))
        s = int(torch.randint(1, cfg.max_gap, (1,), generator=gen)) if cfg.max_gap > 1 else 1
        real = _unit_grads(net, traj.checkpoints[t], x_real, y_real, local, u)
        sg = vmap(syn_grad, in_dims=(None, 0, 0, 0))(traj.checkpoints[min(last, t + s)], x, logits, weight)
        loss = reverse_matching_distance(sg, real).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
    x, logits = x.detach(), logits.detach()
    # scale each unit's step to the norm of the real unit's gradient at the final model (a
    # magnitude only: the sign of the step stays what the matching made it)
    final = traj.final
    with torch.no_grad():
        real = _unit_grads(net, final, x_real, y_real, local, u)
        sg = vmap(syn_grad, in_dims=(None, 0, 0, 0))(final, x, logits, weight)
        a = torch.cat([v.flatten(1) for v in sg.values()], 1)
        b = torch.cat([v.flatten(1) for v in real.values()], 1) / max(1, x_real.shape[0])
        weight = weight * (b.norm(dim=1) / a.norm(dim=1).clamp_min(1e-30))[:, None]
    block = torch.block_diag(*weight.cpu())  # (U, U*IPC): unit i owns its IPC columns
    return Synset(
        torch.tensor(unit_ids, dtype=torch.long),
        x.reshape(u * ipc, *x.shape[2:]).cpu(),
        torch.softmax(logits, -1).reshape(u * ipc, c).cpu(),
        block,
    )

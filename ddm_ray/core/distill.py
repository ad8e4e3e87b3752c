"""Synset distillation for one class shard.

Two families, chosen by `DistillConfig.method`:

* ``displacement`` (default): reverse gradient matching against the unit's counterfactual
  displacement D_u = theta_{-u} - theta_final, estimated offline by unrolled SGD
  (`core.displacement`). The synset is fitted so that the online fast-learn step from the final
  model moves the parameters by D_u:  minimise  1 - cos(delta_S, D_u) + (|delta_S|/|D_u| - 1)^2,
  with delta_S = fast_learn(theta_final, S) - theta_final. For a single online step that is
  matching -lr * grad L(theta_final; S) to D_u, i.e. the synset's descent gradient is the reverse
  of the displacement. ``DistillConfig.match = "fisher"`` fits the same target in an empirical-
  Fisher metric instead (D_u's effect on the losses of probe training samples), which measured
  far more faithful on digits (Pearson vs exact LOO 0.80 against 0.47).
* ``soft_label`` / ``literal``: the paper's reverse gradient matching over the trajectory. Pick
  checkpoints t < t+s and make -grad L(theta_{t+s}; S) match grad L(theta_t; D_u) by the summed
  per-layer (1 - cosine) distance. ``literal`` keeps hard labels equal to the unit's class,
  ``soft_label`` learns the label logits too. The step size of the online fast-learn step is then
  fitted by least squares to the real unit's gradient at the final model (no retraining used).

`distill_class` is the plain function the engine runs per class shard.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from ddm_ray.config import DistillConfig, OnlineConfig
from ddm_ray.core.matching import reverse_matching_distance
from ddm_ray.core.models import Network, Params, flatten
from ddm_ray.core.synset import Synset, fast_learn, synset_loss
from ddm_ray.core.training import Trajectory


def init_synset(
    unit_ids: list[int],
    members: list[torch.Tensor],
    x: torch.Tensor,
    class_index: int,
    num_classes: int,
    ipc: int,
    seed: int,
) -> Synset:
    """Initialise IPC samples per unit from real members (cycled if a unit is smaller than IPC)."""
    gen = torch.Generator().manual_seed(seed)
    xs = []
    for m in members:
        order = m[torch.randperm(m.numel(), generator=gen)]
        pick = order[torch.arange(ipc) % order.numel()]
        xs.append(x[pick])
    u = len(unit_ids)
    dev = x.device
    logits = torch.zeros(u, ipc, num_classes, device=dev)
    logits[:, :, class_index] = 4.0
    return Synset(
        unit_ids=torch.tensor(unit_ids, dtype=torch.long),
        x=torch.stack(xs).clone(),
        logits=logits,
        weight=torch.full((u, ipc), 1.0 / ipc, device=dev),
    )


def _probe_metric(
    net: Network,
    final: Params,
    x_probe: torch.Tensor,
    y_probe: torch.Tensor,
    target: torch.Tensor,
    rank: int,
    norm_power: float,
) -> torch.Tensor:
    """A (P, k) projection whose squared norm is the empirical-Fisher metric of the probe set.

    Rows of G (n, P) are the probes' per-sample loss gradients at the final model, so G v is the
    first-order change of every probe's loss under the parameter move v. Each row is divided by
    (std over the shard's units of G_i . target_u) ** norm_power so that probes with small effects
    still count, and G is compressed to its top `rank` right singular directions (via the n x n
    Gram matrix): returns Q with v @ Q ~ the rank-k coordinates of G v.
    """

    def one(p: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net.logits(p, xi[None]), yi[None])

    per = vmap(grad(one), in_dims=(None, 0, 0))(final, x_probe, y_probe)
    g = torch.cat([v.reshape(v.shape[0], -1) for v in per.values()], 1)  # (n, P)
    if norm_power > 0 and target.shape[0] > 1:
        sd = (target @ g.T).std(0).clamp_min(1e-12)
        g = g / sd[:, None] ** norm_power
    gram = (g.double() @ g.double().T)  # float64: a reproducible eigendecomposition
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    k = min(rank, g.shape[0])
    keep = evecs[:, -k:] * (evals[-k:].clamp_min(0) > 1e-12 * evals[-1].clamp_min(1e-30))
    return (g.double().T @ keep).to(g.dtype)  # (P, k): v @ Q = U_k^T G v = S_k V_k^T v


def _fit_displacement(
    net: Network,
    final: Params,
    syn: Synset,
    target: torch.Tensor,
    cfg: DistillConfig,
    online: OnlineConfig,
    lo: float,
    hi: float,
    probe: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Synset:
    """Fit syn so that fast_learn(final, syn_u) - final ~= target[u]; target (U, P).

    With ``cfg.match == "parameter"`` the distance is 1 - cos + (relative norm - 1)^2 in parameter
    space. With ``"fisher"`` both moves are first mapped by the probe metric (`_probe_metric`) and
    the distance is the relative squared error |Q^T (delta_S - D_u)|^2 / |Q^T D_u|^2: what is fitted
    is the displacement's effect on the losses of real samples, not its raw parameter vector.
    """
    x = syn.x.clone()
    logits = syn.logits.clone()
    weight = syn.weight.clone()
    theta0 = flatten(final)

    def delta(xu: torch.Tensor, zu: torch.Tensor, wu: torch.Tensor) -> torch.Tensor:
        p = fast_learn(net, final, xu, zu, wu, online.steps, online.lr)
        return flatten(p) - theta0

    batched = vmap(delta)
    if cfg.match == "fisher":
        if probe is None:
            raise ValueError("fisher matching needs probe samples")
        q = _probe_metric(net, final, probe[0], probe[1], target, cfg.probe_rank, cfg.probe_norm)
        tgt = target @ q
    else:
        q = None
        tgt = target
    tnorm = tgt.norm(dim=1).clamp_min(1e-12)

    def project(d: torch.Tensor) -> torch.Tensor:
        return d if q is None else d @ q

    def rescale(w: torch.Tensor, by_norm: bool) -> torch.Tensor:
        # per unit, scale (and sign) of the step: exact for one online step, which is linear in w
        with torch.no_grad():
            a = project(batched(x, logits, w))
            dot = (a * tgt).sum(1)
            if by_norm:
                alpha = torch.where(dot < 0, -1.0, 1.0) * tnorm / a.norm(dim=1).clamp_min(1e-30)
            else:
                alpha = dot / (a * a).sum(1).clamp_min(1e-30)
            return w * alpha[:, None]

    if cfg.match == "fisher" and online.steps == 1:
        weight = rescale(weight, by_norm=True)
    x.requires_grad_(True)
    logits.requires_grad_(True)
    weight.requires_grad_(True)
    opt = torch.optim.Adam([x, logits, weight], lr=cfg.lr)
    for _ in range(cfg.steps):
        a = project(batched(x, logits, weight))  # (U, P) or (U, k)
        if q is None:
            cos = F.cosine_similarity(a, tgt, dim=1)
            loss = ((1 - cos) + (a.norm(dim=1) / tnorm - 1) ** 2).sum()
        else:
            loss = (((a - tgt) ** 2).sum(1) / tnorm**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
    x, logits, weight = x.detach(), logits.detach(), weight.detach()
    if online.steps == 1 and cfg.layer_scales:
        scale = _layer_scales(net, final, x, logits, weight, online.lr, project, tgt)
        return Synset(syn.unit_ids, x, logits, weight, scale)
    if online.steps == 1:
        weight = rescale(weight, by_norm=False)
    return Synset(syn.unit_ids, x, logits, weight)


def _layer_scales(
    net: Network,
    final: Params,
    x: torch.Tensor,
    logits: torch.Tensor,
    weight: torch.Tensor,
    lr: float,
    project: Callable[[torch.Tensor], torch.Tensor],
    tgt: torch.Tensor,
) -> torch.Tensor:
    """Per unit, the least-squares step scale of each parameter tensor: (U, IPC, L).

    One online step moves tensor k by -lr * g_k(S_u); with a scale a_{u,k} per tensor the move is
    sum_k a_{u,k} delta_{u,k}, linear in a. Solve min_a |project(sum_k a_k delta_k) - tgt_u|^2 for
    each unit (L unknowns) and give every sample of the unit the same scales, so synsets of
    several units still compose by concatenation.
    """
    keys = list(final)
    sizes = [final[k].numel() for k in keys]

    def delta(xu: torch.Tensor, zu: torch.Tensor, wu: torch.Tensor) -> torch.Tensor:
        g = grad(lambda p: synset_loss(net, p, xu, zu, wu))(final)
        return torch.cat([(-lr * g[k]).reshape(-1) for k in keys])

    with torch.no_grad():
        d = vmap(delta)(x, logits, weight)  # (U, P)
        blocks = torch.split(d, sizes, dim=1)
        u = d.shape[0]
        cols = []
        for i, b in enumerate(blocks):  # layer i's move alone, zero elsewhere
            full = torch.zeros_like(d)
            start = sum(sizes[:i])
            full[:, start : start + b.shape[1]] = b
            cols.append(project(full))
        a = torch.stack(cols, dim=2)  # (U, k, L)
        # normal equations in float64 (then rounded to float32): reproducible to the bit, unlike
        # an LAPACK least-squares driver whose float32 result depends on memory alignment
        a64, t64 = a.double(), tgt.double()
        ata = a64.transpose(1, 2) @ a64  # (U, L, L)
        ridge = 1e-9 * ata.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)
        ata = ata + ridge[:, None, None] * torch.eye(len(keys), dtype=torch.float64, device=a.device)
        atb = (a64.transpose(1, 2) @ t64[:, :, None])[:, :, 0]
        sol = torch.linalg.solve(ata, atb).to(x.dtype)  # (U, L)
        sol = torch.nan_to_num(sol, nan=0.0, posinf=0.0, neginf=0.0)
    return sol[:, None, :].expand(u, x.shape[1], len(keys)).clone()


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


def _fit_reverse_matching(
    net: Network,
    traj: Trajectory,
    syn: Synset,
    x_real: torch.Tensor,
    y_real: torch.Tensor,
    local_unit: torch.Tensor,
    cfg: DistillConfig,
    online: OnlineConfig,
    learn_labels: bool,
    lo: float,
    hi: float,
) -> Synset:
    x = syn.x.clone().requires_grad_(True)
    logits = syn.logits.clone().requires_grad_(learn_labels)
    weight = syn.weight
    u = len(syn)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    last = len(traj.checkpoints) - 1
    params_list = [x] + ([logits] if learn_labels else [])
    opt = torch.optim.Adam(params_list, lr=cfg.lr)

    def syn_grad(p: Params, xu: torch.Tensor, zu: torch.Tensor, wu: torch.Tensor) -> Params:
        return grad(lambda q: synset_loss(net, q, xu, zu, wu))(p)

    for _ in range(cfg.steps):
        t = int(torch.randint(0, max(1, last), (1,), generator=gen))
        s = int(torch.randint(1, cfg.max_gap, (1,), generator=gen)) if cfg.max_gap > 1 else 1
        t2 = min(last, t + s)
        real = _unit_grads(net, traj.checkpoints[t], x_real, y_real, local_unit, u)
        sg = vmap(syn_grad, in_dims=(None, 0, 0, 0))(traj.checkpoints[t2], x, logits, weight)
        loss = reverse_matching_distance(sg, real).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
    x, logits = x.detach(), logits.detach()
    # scale each unit's step to the norm of the real unit's gradient at the final model (a
    # magnitude only: the sign of the step stays what the matching made it).
    final = traj.final
    with torch.no_grad():
        real = _unit_grads(net, final, x_real, y_real, local_unit, u)
        sg = vmap(syn_grad, in_dims=(None, 0, 0, 0))(final, x, logits, weight)
        a = torch.cat([v.flatten(1) for v in sg.values()], 1)
        b = torch.cat([v.flatten(1) for v in real.values()], 1) / max(1, x_real.shape[0])
        alpha = b.norm(dim=1) / a.norm(dim=1).clamp_min(1e-30)
        weight = weight * alpha[:, None]
    return Synset(syn.unit_ids, x, logits, weight)


def _probe_samples(
    members: list[torch.Tensor],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    n: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shard's own members plus a seeded random draw of other training samples, n in all
    (at least all members)."""
    own = torch.cat(members).cpu()
    mask = torch.ones(x_train.shape[0], dtype=torch.bool)
    mask[own] = False
    others = torch.nonzero(mask).flatten()
    gen = torch.Generator().manual_seed(seed + 1_000_033)
    extra = others[torch.randperm(others.numel(), generator=gen)[: max(0, n - own.numel())]]
    idx = torch.cat([own, extra]).to(x_train.device)
    return x_train[idx], y_train[idx]


def distill_class(
    net: Network,
    traj: Trajectory,
    class_index: int,
    unit_ids: list[int],
    members: list[torch.Tensor],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    cfg: DistillConfig,
    online: OnlineConfig,
    displacement: torch.Tensor | None,
) -> Synset:
    """Distill the synsets of one class's units.

    members[i] (n_i,) are the training indices of unit unit_ids[i]; displacement (U_class, P) is
    the offline target for the ``displacement`` method (None otherwise). Returns a Synset over
    unit_ids in the given order.
    """
    torch.manual_seed(cfg.seed + class_index)
    lo, hi = float(x_train.min()), float(x_train.max())
    syn = init_synset(
        unit_ids, members, x_train, class_index, net.num_classes, cfg.ipc, cfg.seed + class_index
    )
    if cfg.method == "displacement":
        if displacement is None:
            raise ValueError("displacement method needs the unrolled displacement")
        probe = None
        if cfg.match == "fisher":
            probe = _probe_samples(
                members, x_train, y_train, cfg.probe_samples, cfg.seed + class_index
            )
        return _fit_displacement(
            net, traj.final, syn, displacement, cfg, online, lo, hi, probe=probe
        )
    idx = torch.cat(members)
    local = torch.cat(
        [torch.full((m.numel(),), i, dtype=torch.long, device=x_train.device) for i, m in enumerate(members)]
    )
    return _fit_reverse_matching(
        net,
        traj,
        syn,
        x_train[idx],
        y_train[idx],
        local,
        cfg,
        online,
        learn_labels=cfg.method == "soft_label",
        lo=lo,
        hi=hi,
    )

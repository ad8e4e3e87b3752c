"""Training stability: the top Hessian eigenvalue along the trajectory against SGD's limit.

Gradient descent with step lr on a quadratic of curvature lambda is stable only while
lr * lambda < 2; heavy-ball momentum mu widens the limit to 2 (1 + mu) / lr. Past it, training
runs at the "edge of stability" and leave-one-out effects become chaotic: exact retraining under
another seed no longer agrees with itself, and no first-order estimate can follow. The check
costs `iters` Hessian-vector products on `samples` training samples per checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.func import grad, jvp

from ddm_ray.config import TrainConfig
from ddm_ray.core.models import Network, Params, flatten, unflatten


def stability_limit(cfg: TrainConfig) -> float:
    """The largest stable curvature for (momentum) SGD: 2 (1 + momentum) / lr (weight decay
    adds to the curvature, so it is counted in the eigenvalue, not here)."""
    return 2.0 * (1.0 + cfg.momentum) / cfg.lr


def top_eigenvalue(
    net: Network, params: Params, x: torch.Tensor, y: torch.Tensor, weight_decay: float, iters: int, seed: int,
) -> float:
    """The largest-magnitude eigenvalue of the Hessian of the mean loss on x (n, ...), y (n,)
    (plus weight decay) at params, by power iteration with HVPs; its sign is kept."""
    flat = flatten(params)
    g_fn = grad(lambda pf: F.cross_entropy(net.logits(unflatten(pf, params), x), y))
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(flat.numel(), generator=gen).to(flat)
    v = v / v.norm()
    lam = 0.0
    for _ in range(iters):
        hv = jvp(g_fn, (flat,), (v,))[1] + weight_decay * v
        lam = float(v @ hv)
        n = float(hv.norm())
        if n == 0.0 or n != n:
            break
        v = hv / n
    return lam


def stability_report(
    net: Network, checkpoints: list[Params], x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
    points: int = 3, samples: int = 512, iters: int = 12,
) -> dict[str, Any]:
    """Top eigenvalue at `points` evenly spaced checkpoints (the last always), on a seeded
    sample of the training data, against `stability_limit`; `unstable` when any exceeds it.
    Returns JSON-ready figures and, when unstable, a one-line warning."""
    n = x.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed + 77)
    pick = torch.randperm(n, generator=gen)[: min(samples, n)].to(x.device)
    xs, ys = x[pick], y[pick]
    last = len(checkpoints) - 1
    epochs = sorted({round(last * (i + 1) / points) for i in range(points)} | {last})
    eig = [top_eigenvalue(net, checkpoints[e], xs, ys, cfg.weight_decay, iters, cfg.seed + e) for e in epochs]
    limit = stability_limit(cfg)
    worst = max(abs(e) for e in eig)
    report: dict[str, Any] = {
        "epochs": epochs,
        "top_eigenvalue": [round(e, 4) for e in eig],
        "limit": round(limit, 4),
        "limit_rule": "2 (1 + momentum) / lr",
        "max_ratio": round(worst / limit, 4),
        "samples": int(pick.numel()),
        "unstable": worst > limit,
    }
    if report["unstable"]:
        report["warning"] = (
            f"training ran past its stability limit (top Hessian eigenvalue {worst:.3g} > 2(1+momentum)/lr = "
            f"{limit:.3g}): leave-one-out effects are dominated by chaotic training, so exact retraining "
            f"under another seed will disagree with itself; lower --lr for an audit that describes the data"
        )
    return report

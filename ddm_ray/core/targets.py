"""Offline leave-one-out targets in the probe subspace: c (U, k) = V^T D_u for every unit.

* unrolled: unrolled SGD influence (Hara et al. 2019) over the whole trajectory, by the adjoint
  recursion (`core.adjoint`, cost flat in U) or the per-unit forward unroll
  (`core.displacement`, cost linear in U; cheaper while U < k). Both give the same c.
* influence: D_u ~ (1/N) (H + damping)^{-1} G_u at theta_final (G_u the unit's summed loss
  gradient, H the Hessian of the mean training loss plus weight decay), with H restricted to the
  subspace: H_V = V^T H V (k x k, k Hessian-vector products over the training set), inverted
  through its eigendecomposition with |eigenvalue| + damping * max|eigenvalue| (saddle-free: a
  trained network's H has negative directions, where a plain damped inverse blows up). So
  c_u = (|H_V| + damping)^{-1} V^T G_u / N: k HVPs and one per-sample-gradient pass in all.
* blend: w * unrolled + (1 - w) * influence, or (default) fitted: non-negative lengths of the
  unrolled and influence pieces fitted by least squares to V^T D of a few exactly retrained units
  (`fit_target`). The adjoint may cover only the k_u leading directions; the influence target
  covers all k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from ddm_ray.config import TrainConfig
from ddm_ray.core.displacement import unrolled_displacement
from ddm_ray.core.models import Network, Params, flatten, unflatten
from ddm_ray.core.probe import per_sample_grads


@dataclass
class InfluencePieces:
    """What the influence target needs: h (k, k) = V^T H V and g (U, k) = V^T G_u / N."""

    h: torch.Tensor
    g: torch.Tensor


def projected_hessian(
    net: Network, final: Params, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, weight_decay: float,
    data_chunk: int = 2048, dir_chunk: int = 32, progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """V^T H V (k, k) for the mean training loss (plus weight decay) at final; v (P, k).

    The HVPs run over the training data in chunks (memory: dir_chunk x data_chunk activations);
    `progress(n)` is called after every n HVPs of one data chunk (k per chunk in all)."""
    flat = flatten(final)
    n = x.shape[0]
    vt = v.T.contiguous()  # (k, P)
    hv = torch.zeros_like(vt)
    for i in range(0, n, data_chunk):
        xb, yb = x[i : i + data_chunk], y[i : i + data_chunk]
        g_fn = grad(lambda pf, xb=xb, yb=yb: F.cross_entropy(net.logits(unflatten(pf, final), xb), yb, reduction="sum") / n)

        def hvp(t: torch.Tensor, g_fn=g_fn) -> torch.Tensor:  # noqa: ANN001
            return jvp(g_fn, (flat,), (t,))[1]

        for j in range(0, vt.shape[0], dir_chunk):
            hv[j : j + dir_chunk] += vmap(hvp)(vt[j : j + dir_chunk])
            if progress is not None:
                progress(min(dir_chunk, vt.shape[0] - j))
    if weight_decay:
        hv += weight_decay * vt
    h = v.T @ hv.T
    return 0.5 * (h + h.T)


def projected_ggn(
    net: Network, final: Params, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, weight_decay: float,
    samples: int, seed: int, chunk: int = 256, progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """V^T G V (k, k): the Gauss-Newton matrix of the mean training loss (plus weight decay) at
    final, on a seeded draw of at most `samples` training samples; v (P, k).

    For softmax cross-entropy G = E_i J_i^T (diag p_i - p_i p_i^T) J_i = E_i sum_c p_ic g_ic g_ic^T,
    g_ic the loss gradient of sample i with label c, so it is C per-sample-gradient passes and no
    Hessian-vector product: on a ConvNet, where a vmapped HVP runs its convolutions as grouped
    ones, a few times cheaper than `projected_hessian` at the same samples. Positive semi-definite,
    and equal to the Hessian for a model linear in its parameters. The labels y are not used (the
    model's own probabilities weigh the classes). `progress(n)` after every n per-sample gradients
    (C x samples in all)."""
    n = x.shape[0]
    m = min(samples, n)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 31_337))[:m].sort().values.to(x.device)
    xs = x[idx]
    k = v.shape[1]
    g = torch.zeros(k, k, dtype=torch.float64, device=v.device)
    for i in range(0, m, chunk):
        xb = xs[i : i + chunk]
        with torch.no_grad():
            p = torch.softmax(net.logits(final, xb), dim=1)  # (b, C)
        for c in range(p.shape[1]):
            gc = (per_sample_grads(net, final, xb, torch.full((xb.shape[0],), c, dtype=torch.long, device=x.device),
                                   chunk=chunk) @ v).double()  # (b, k)
            g += (gc * p[:, c : c + 1].double()).T @ gc
            if progress is not None:
                progress(int(xb.shape[0]))
    g = g / m
    if weight_decay:
        g += weight_decay * (v.T @ v).double()
    return (0.5 * (g + g.T)).to(v.dtype)


def hessian_work(n: int, k: int, data_chunk: int = 2048) -> int:
    """How many progress counts `projected_hessian` makes: k per data chunk."""
    return k * -(-n // data_chunk)


def unit_gradients_projected(
    net: Network, final: Params, x: torch.Tensor, y: torch.Tensor, unit_of: torch.Tensor, num_units: int,
    v: torch.Tensor, chunk: int = 512, progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(U, k): V^T G_u / N, G_u the summed loss gradient of unit u's samples (unit_of -1: none);
    `progress(n)` after every n samples."""
    n = x.shape[0]
    out = torch.zeros(num_units + 1, v.shape[1], dtype=v.dtype, device=v.device)
    idx = torch.where(unit_of < 0, num_units, unit_of).to(v.device)
    for i in range(0, n, chunk):
        g = per_sample_grads(net, final, x[i : i + chunk], y[i : i + chunk])
        out.index_add_(0, idx[i : i + chunk], g @ v)
        if progress is not None:
            progress(min(chunk, n - i))
    return out[:num_units] / n


def influence_pieces(
    net: Network, final: Params, x: torch.Tensor, y: torch.Tensor, unit_of: torch.Tensor, num_units: int,
    v: torch.Tensor, weight_decay: float, progress: Callable[[int], None] | None = None,
    curvature: str = "hessian", samples: int = 512, seed: int = 0,
) -> InfluencePieces:
    """V^T H V (or V^T G V, curvature "ggn": `projected_ggn` on `samples` samples) and V^T G_u / N;
    `progress(n)` counts `curvature_work` then N samples."""
    if curvature == "ggn":
        h = projected_ggn(net, final, x, y, v, weight_decay, samples, seed, progress=progress)
    elif curvature == "hessian":
        h = projected_hessian(net, final, x, y, v, weight_decay, progress=progress)
    else:
        raise ValueError(f"unknown curvature {curvature!r}")
    return InfluencePieces(h, unit_gradients_projected(net, final, x, y, unit_of, num_units, v, progress=progress))


def curvature_work(curvature: str, n: int, k: int, num_classes: int, samples: int) -> int:
    """How many progress counts the curvature of `influence_pieces` makes."""
    return num_classes * min(samples, n) if curvature == "ggn" else hessian_work(n, k)


def influence_target(pieces: InfluencePieces, damping: float) -> torch.Tensor:
    """c (U, k) = (|H_V| + damping * max|eig|)^{-1} g, solved in float64 (k x k only)."""
    lam, q = torch.linalg.eigh(pieces.h.double())
    inv = 1.0 / (lam.abs() + damping * lam.abs().max().clamp_min(1e-30))
    return (((pieces.g.double() @ q) * inv[None, :]) @ q.T).to(pieces.g.dtype)


def forward_unrolled_projected(
    net: Network, params0: Params, x: torch.Tensor, y: torch.Tensor, unit_of: torch.Tensor, units: range,
    cfg: TrainConfig, v: torch.Tensor, unroll_epochs: int | None = None,
) -> torch.Tensor:
    """(len(units), k): V^T D_u for the units in `units`, by the forward per-unit unroll."""
    local = torch.full_like(unit_of, len(units))
    inside = (unit_of >= units.start) & (unit_of < units.stop)
    local[inside] = unit_of[inside] - units.start
    d = unrolled_displacement(net, params0, x, y, local.to(x.device), len(units) + 1, cfg, unroll_epochs)
    flat = torch.cat([t.flatten(1) for t in d.values()], 1)[: len(units)]
    return flat @ v


def blend(unrolled: torch.Tensor | None, influence: torch.Tensor | None, weight: float) -> torch.Tensor:
    """weight * unrolled + (1 - weight) * influence, or whichever is given."""
    if unrolled is None and influence is None:
        raise ValueError("no target to blend")
    if influence is None:
        return unrolled  # type: ignore[return-value]
    if unrolled is None:
        return influence
    return weight * unrolled + (1 - weight) * influence


def target_features(
    unrolled: torch.Tensor | None, influence: torch.Tensor | None, lead_rank: int | None = None
) -> list[torch.Tensor]:
    """The pieces a fitted target combines, each (U, k): the unrolled coordinates (zero beyond
    the k_u = lead_rank leading directions the adjoint ran on; default all), the influence
    coordinates on those leading directions, and the influence coordinates on the rest. Pieces
    that are all zero are left out."""
    if unrolled is None and influence is None:
        raise ValueError("no target to fit")
    if influence is None:
        return [unrolled]  # type: ignore[list-item]
    if unrolled is None:
        return [influence]
    k = unrolled.shape[1]
    lead = torch.arange(k, device=unrolled.device) < (k if lead_rank is None else lead_rank)  # (k,)
    pieces = [unrolled, influence * lead[None, :], influence * ~lead[None, :]]
    return [p for p in pieces if bool((p != 0).any())]


def fit_target(
    features: list[torch.Tensor], exact: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative coefficients a (n_features,) such that sum_i a_i features_i[rows] is closest
    (least squares over every coordinate) to exact (len(rows), k) = V^T D_u of exactly retrained
    units. Returns (a, the fitted target for every unit (U, k)).

    Each piece points the right way but at its own wrong length (unrolled SGD about half of
    V^T D on real MNIST, a damped influence function a fifth): a few exact retrainings measure the
    lengths. Non-negative, so a piece is never flipped; solved over every subset of pieces in
    float64 (at most 3 pieces: 8 tiny solves), the best residual wins."""
    a_cols = torch.stack([f[rows].flatten() for f in features], 1).double()  # (n k, F)
    b = exact.flatten().double()
    n_f = a_cols.shape[1]
    best, best_res = torch.zeros(n_f, dtype=torch.float64), float(b @ b)
    for mask in range(1, 2**n_f):
        cols = [i for i in range(n_f) if mask >> i & 1]
        sub = a_cols[:, cols]
        gram = sub.T @ sub
        gram = gram + 1e-9 * gram.diagonal().mean().clamp_min(1e-300) * torch.eye(len(cols), dtype=gram.dtype)
        sol = torch.linalg.solve(gram, sub.T @ b)
        if not bool(torch.isfinite(sol).all()) or bool((sol < 0).any()):
            continue
        res = float(((sub @ sol - b) ** 2).sum())
        if res < best_res - 1e-12 * max(1.0, best_res):
            best_res = res
            best = torch.zeros(n_f, dtype=torch.float64)
            best[cols] = sol
    if not bool((best > 0).any()):  # nothing fits (no signal in the calibration units): unscaled first piece
        best[0] = 1.0
    coef = best.to(features[0].dtype)
    return coef, sum(c * f for c, f in zip(coef, features, strict=True))  # type: ignore[return-value]

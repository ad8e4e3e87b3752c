"""Linear datamodels over unit-removal masks and the linear datamodeling score (LDS).

A mask m (U,) bool marks the units removed from training. A linear datamodel predicts
f(theta_m, x) ~= w_x . m + b_x for every test sample x; W (U, N_test) is then an attribution
matrix. LDS (Park et al. 2023): for held-out masks m_j with true outputs f(theta_{m_j}, x), the
Spearman correlation across j between predicted and true outputs, averaged over x.
"""

from __future__ import annotations

import torch

from ddm_ray.core.metrics import nanmean, spearman


def random_masks(n_masks: int, n_units: int, alpha: float, seed: int) -> torch.Tensor:
    """(n_masks, n_units) bool: each unit removed with probability alpha, at least one per mask."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(n_masks, n_units, generator=gen) < alpha
    empty = ~masks.any(1)
    if empty.any():
        masks[empty, torch.randint(n_units, (int(empty.sum()),), generator=gen)] = True
    return masks


def fit_datamodel(masks: torch.Tensor, outputs: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge fit of outputs (M, N) ~= masks (M, U) @ W + b; the intercept is not penalised.

    Returns W (U, N) and b (N,), float64. ridge is scaled by M (penalty ridge * M * |W|^2).
    """
    a = masks.double()
    y = outputs.double()
    a_mean, y_mean = a.mean(0), y.mean(0)
    ac, yc = a - a_mean, y - y_mean
    u = a.shape[1]
    gram = ac.T @ ac + ridge * a.shape[0] * torch.eye(u, dtype=torch.float64, device=a.device)
    w = torch.linalg.solve(gram, ac.T @ yc)
    b = y_mean - a_mean @ w
    return w, b


def predict(w: torch.Tensor, b: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Datamodel outputs for masks (M, U): (M, N)."""
    return masks.double() @ w.double() + b.double()


def additive_prediction(loo: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Predicted change for masks (M, U) from leave-one-out rows loo (U, N): sum of removed rows."""
    return masks.double() @ loo.double()


def lds(pred: torch.Tensor, actual: torch.Tensor) -> float:
    """Linear datamodeling score: Spearman over masks (dim 0) per test sample, averaged. (M, N) each."""
    return nanmean(spearman(pred, actual, dim=0))

"""Agreement metrics between predicted and ground-truth attributions (pure torch/numpy)."""

from __future__ import annotations

import torch
from scipy.stats import rankdata


def _rank(v: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank) along the last dim, float64."""
    return torch.from_numpy(rankdata(v.detach().double().cpu().numpy(), axis=-1)).to(v.device)


def pearson(a: torch.Tensor, b: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Pearson correlation over all entries (dim None) or along `dim`. NaN where a side is constant."""
    a, b = a.double(), b.double()
    if dim is None:
        a, b, dim = a.flatten(), b.flatten(), 0
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    den = (a.pow(2).sum(dim) * b.pow(2).sum(dim)).sqrt()
    num = (a * b).sum(dim)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))


def spearman(a: torch.Tensor, b: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Spearman rank correlation (average ranks for ties), over all entries or along `dim`."""
    if dim is None:
        return pearson(_rank(a.flatten()), _rank(b.flatten()))
    a_t, b_t = a.movedim(dim, -1), b.movedim(dim, -1)
    return pearson(_rank(a_t), _rank(b_t), dim=-1)


def nanmean(v: torch.Tensor) -> float:
    """Mean ignoring NaN; NaN if all are NaN."""
    ok = ~torch.isnan(v)
    return float(v[ok].mean()) if ok.any() else float("nan")


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of scores (n,) for binary labels (n,): P(score_pos > score_neg), ties count 1/2.

    Mann-Whitney form with average ranks. NaN when either class is empty.
    """
    s = scores.double().flatten()
    pos = labels.flatten().bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _rank(s)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_k(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of positives among the k highest scores (stable order on ties). NaN if k < 1."""
    if k < 1:
        return float("nan")
    k = min(k, scores.numel())
    order = torch.sort(scores.double().flatten(), descending=True, stable=True).indices[:k]
    return float(labels.flatten().bool()[order].double().mean())


def agreement(pred: torch.Tensor, exact: torch.Tensor, per_test_key: str = "per_test") -> dict[str, float]:
    """Pearson and Spearman of pred vs exact (units, test samples): over all pairs, and the mean
    over test samples of the correlation across units (keys `pearson_<per_test_key>`, ...)."""
    return {
        "pearson": float(pearson(pred, exact)),
        "spearman": float(spearman(pred, exact)),
        f"pearson_{per_test_key}": nanmean(pearson(pred, exact, dim=0)),
        f"spearman_{per_test_key}": nanmean(spearman(pred, exact, dim=0)),
    }

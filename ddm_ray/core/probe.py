"""The probe subspace: the parameter directions in which a removal's effect is measured.

A removal's effect on the test objectives is, to first order, grad f(x) . D_u for every test
sample x, so the directions that matter are the ones the *test* samples' gradients span: a
displacement projected on them keeps every test sample's first-order change. The probe pool is
therefore, by default, a capped class-stratified draw of the test samples (`probe_pool` "test";
"train" draws training samples as before, "both" stacks the two). Measured on a real 28x28 MNIST
sample (MLP, 76 units, exact D projected and evaluated): test pool 0.92 / 0.61 Pearson /
Spearman of Δ loss at k = 128, training pool 0.79 / 0.36 (docs/method.md).

The M pool samples (the *probes*) give per-sample loss gradients at the final model, G (M, P). Each row is divided by its norm ** `norm_power` (so that
a few high-loss samples do not own the subspace), and the top-k right singular vectors of that
matrix form an orthonormal basis V (P, k), computed from the M x M Gram matrix:

    G_n = diag(|g_i|^-p) G,   G_n G_n^T = U diag(lam) U^T,   V = G_n^T U_k diag(lam_k^-1/2).

Every offline target (unrolled SGD, influence) is computed only as its coordinates c_u = V^T D_u
(k per unit), and a unit's synset reproduces the move V c_u exactly by one descent step on the
probe samples with per-unit weights (`ProbeBasis.weights_for`), because V's columns are
combinations of the probes' own gradients.

Memory: G is held once in float32 (M x P); only the M x M Gram matrix goes to float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from ddm_ray.core.models import Network, Params, flatten, unflatten


@dataclass
class ProbeBasis:
    """Probe samples and the orthonormal subspace their gradients span.

    index (M_train,) training indices of the training probes and test_index (M_test,) test
    positions of the test probes, M = M_train + M_test; x (M, *input_shape), y (M,) the pool,
    training probes first; v (P, k) orthonormal directions; coef (M, k) with v = G^T coef (G the
    raw per-sample gradients, (M, P)); lam (k,) the Gram eigenvalues kept (descending); energy
    the fraction of the (normalised) gradients' squared norm the k directions hold.
    """

    index: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    v: torch.Tensor
    coef: torch.Tensor
    lam: torch.Tensor
    test_index: torch.Tensor | None = None
    energy: float = float("nan")

    @property
    def rank(self) -> int:
        return int(self.v.shape[1])

    def weights_for(self, c: torch.Tensor, lr: float, ridge: float) -> torch.Tensor:
        """Per-unit loss weights (U, M) of the probes such that one descent step of size lr on
        sum_i w_ui CE(f(theta, x_i), y_i) from the final model moves theta by
        V diag(lam / (lam + ridge * lam_max)) c_u, for targets c (U, k).

        The ridge shrinks only the directions the probes barely span, which keeps the weights
        (and the rounding of the online step) bounded; ridge 0 reproduces V c_u exactly.
        """
        shrink = self.lam / (self.lam + ridge * self.lam[0])
        return -(c * shrink) @ self.coef.T / lr


def per_sample_grads(net: Network, params: Params, x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Flat per-sample cross-entropy gradients at params: x (n, ...), y (n,) -> (n, P) float32."""
    like = params
    flat = flatten(params)

    def one(pf: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net.logits(unflatten(pf, like), xi[None]), yi[None], reduction="sum")

    g_fn = vmap(grad(one), in_dims=(None, 0, 0))
    return torch.cat([g_fn(flat, x[i : i + chunk], y[i : i + chunk]) for i in range(0, x.shape[0], chunk)])


def select_probes(y: torch.Tensor, num_classes: int, total: int, seed: int) -> torch.Tensor:
    """A seeded, class-stratified draw of at most `total` training indices (ascending).

    Classes get equal shares (a class with fewer samples gives all it has, and the rest is spread
    over the others), so small classes are represented whatever the class balance."""
    gen = torch.Generator().manual_seed(seed + 1_000_033)
    y = y.cpu()
    pools = [torch.nonzero(y == c).flatten() for c in range(num_classes)]
    pools = [p[torch.randperm(p.numel(), generator=gen)] for p in pools]
    take = [0] * num_classes
    left = min(total, int(y.numel()))
    open_ = [c for c in range(num_classes) if pools[c].numel() > 0]
    while left > 0 and open_:
        share = max(1, left // len(open_))
        for c in list(open_):
            add = min(share, pools[c].numel() - take[c], left)
            take[c] += add
            left -= add
            if take[c] >= pools[c].numel():
                open_.remove(c)
            if left == 0:
                break
    return torch.sort(torch.cat([pools[c][: take[c]] for c in range(num_classes)])).values


POOLS = ("test", "train", "both")


def probe_pool(
    y_train: torch.Tensor, y_test: torch.Tensor, num_classes: int, total: int, seed: int, pool: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, test positions) of the probe pool: at most `total` class-stratified
    samples from each source the pool names ("test", "train" or "both")."""
    if pool not in POOLS:
        raise ValueError(f"unknown probe pool {pool!r}")
    empty = torch.zeros(0, dtype=torch.int64)
    train = select_probes(y_train, num_classes, total, seed) if pool in ("train", "both") else empty
    test = select_probes(y_test, num_classes, total, seed + 1) if pool in ("test", "both") else empty
    return train, test


def probe_basis(
    net: Network,
    final: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    index: torch.Tensor,
    rank: int,
    norm_power: float = 0.5,
    rel_eig_floor: float = 1e-7,
    energy: float | None = None,
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    test_index: torch.Tensor | None = None,
) -> ProbeBasis:
    """Build the probe subspace at the final model from the pool: the training probes
    x[index], y[index] followed by the test probes x_test[test_index], y_test[test_index].

    rank: at most this many directions; fewer when the Gram spectrum falls below
    rel_eig_floor * largest eigenvalue (numerically absent directions are never kept), and,
    with `energy` set, the fewest that hold that fraction of the normalised gradients' energy.
    """
    dev = x.device
    index = index.to(dev)
    xp, yp = x[index], y[index]
    if test_index is not None and test_index.numel() > 0:
        if x_test is None or y_test is None:
            raise ValueError("test probes need x_test and y_test")
        test_index = test_index.to(dev)
        xp, yp = torch.cat([xp, x_test[test_index]]), torch.cat([yp, y_test[test_index]])
    if xp.shape[0] == 0:
        raise ValueError("the probe pool is empty")
    g = per_sample_grads(net, final, xp, yp)  # (M, P) float32
    norms = g.norm(dim=1).clamp_min(1e-12)
    scale = norms.pow(-norm_power) if norm_power > 0 else torch.ones_like(norms)
    gram = (g @ g.T).double() * (scale.double()[:, None] * scale.double()[None, :])  # (M, M)
    gram = 0.5 * (gram + gram.T)
    lam, u = torch.linalg.eigh(gram)  # ascending
    lam, u = lam.flip(0), u.flip(1)
    # eigenvectors are defined up to sign: fix it so results do not depend on the LAPACK path
    sign = torch.where(u.gather(0, u.abs().argmax(0, keepdim=True))[0] < 0, -1.0, 1.0).to(u.dtype)
    u = u * sign[None, :]
    keep = int(min(rank, int((lam > rel_eig_floor * lam[0].clamp_min(1e-300)).sum())))
    share = lam.clamp_min(0).cumsum(0) / lam.clamp_min(0).sum().clamp_min(1e-300)  # (M,) captured energy
    if energy is not None:
        keep = min(keep, int((share < energy).sum()) + 1)
    keep = max(keep, 1)
    lam_k, u_k = lam[:keep], u[:, :keep]
    coef = (u_k * scale.double()[:, None] / lam_k.clamp_min(1e-300).sqrt()[None, :])  # (M, k)
    v = (g.T @ coef.to(g.dtype))  # (P, k) = G_n^T U_k lam^-1/2
    return ProbeBasis(
        index=index.cpu(), x=xp, y=yp, v=v, coef=coef.to(g.dtype), lam=lam_k.to(g.dtype),
        test_index=None if test_index is None else test_index.cpu(), energy=float(share[keep - 1]),
    )

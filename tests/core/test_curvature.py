"""The influence target's curvature in the probe subspace: the Gauss-Newton matrix against the Hessian."""

from __future__ import annotations

import torch

from ddm_ray.config import ModelConfig
from ddm_ray.core.models import Network, flatten, unflatten
from ddm_ray.core.targets import curvature_work, influence_pieces, projected_ggn, projected_hessian


def _setup(hidden: tuple[int, ...], n: int = 40, k: int = 5):
    torch.manual_seed(0)
    net = Network(ModelConfig(arch="mlp", hidden=hidden), (1, 3, 3), 4)
    params = {name: t + 0.3 * torch.randn_like(t) for name, t in net.init_params(0).items()}
    x, y = torch.randn(n, 1, 3, 3), torch.randint(0, 4, (n,))
    p = flatten(params).numel()
    v = torch.linalg.qr(torch.randn(p, k, dtype=torch.float64))[0].float()
    return net, params, x, y, v


def test_the_gauss_newton_matrix_is_the_hessian_of_a_model_linear_in_its_parameters():
    net, params, x, y, v = _setup(hidden=())
    h = projected_hessian(net, params, x, y, v, weight_decay=1e-3)
    g = projected_ggn(net, params, x, y, v, weight_decay=1e-3, samples=10_000, seed=0, chunk=16)
    assert torch.allclose(g, h, rtol=1e-4, atol=1e-6), (g - h).abs().max()


def test_the_gauss_newton_matrix_of_an_mlp_is_the_jacobian_formula_and_not_its_hessian():
    net, params, x, y, v = _setup(hidden=(8,))
    h = projected_hessian(net, params, x, y, v, weight_decay=0.0)
    g = projected_ggn(net, params, x, y, v, weight_decay=0.0, samples=10_000, seed=0)
    flat = flatten(params)
    jac = torch.autograd.functional.jacobian(lambda pf: net.logits(unflatten(pf, params), x), flat)  # (n, C, P)
    p = torch.softmax(net.logits(params, x), 1).detach()
    jv = jac @ v  # (n, C, k)
    want = torch.einsum("nck,ncd,nde->ke", jv, torch.diag_embed(p) - p[:, :, None] * p[:, None, :], jv) / x.shape[0]
    assert torch.allclose(g, want, rtol=1e-4, atol=1e-7), (g - want).abs().max()
    assert torch.allclose(g, g.T) and float(torch.linalg.eigvalsh(g.double()).min()) > -1e-7
    assert not torch.allclose(g, h, rtol=1e-3, atol=1e-6)  # not the Hessian: the residual term is left out


def test_the_sampled_gauss_newton_matrix_is_seeded_and_counts_its_passes():
    net, params, x, y, v = _setup(hidden=(8,))
    a = projected_ggn(net, params, x, y, v, 0.0, samples=16, seed=3)
    assert torch.equal(a, projected_ggn(net, params, x, y, v, 0.0, samples=16, seed=3))
    assert not torch.equal(a, projected_ggn(net, params, x, y, v, 0.0, samples=16, seed=4))
    seen: list[int] = []
    unit_of = torch.arange(x.shape[0]) % 3
    pieces = influence_pieces(net, params, x, y, unit_of, 3, v, 0.0, progress=seen.append,
                              curvature="ggn", samples=16, seed=3)
    assert torch.equal(pieces.h, a) and pieces.g.shape == (3, v.shape[1])
    assert sum(seen) == curvature_work("ggn", x.shape[0], v.shape[1], 4, 16) + x.shape[0]

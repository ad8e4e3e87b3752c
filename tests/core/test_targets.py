"""Influence target in the probe subspace against a dense closed form; blending."""

import torch
import torch.nn.functional as F
from torch.func import hessian

from ddm_ray.config import ModelConfig, TrainConfig
from ddm_ray.core.models import Network, flatten, unflatten
from ddm_ray.core.probe import per_sample_grads
from ddm_ray.core.targets import InfluencePieces, blend, influence_pieces, influence_target
from ddm_ray.core.training import train
from tests.conftest import blobs


def test_full_rank_subspace_influence_equals_dense_saddle_free_influence():
    x, y = blobs(40, dim=3, classes=2)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    net = Network(ModelConfig(hidden=(3,)), (3,), 2)
    wd = 0.01
    final = train(net, net.init_params(0), x, y, TrainConfig(epochs=3, batch_size=10, lr=0.3)).final
    theta = flatten(final)
    p = theta.numel()
    unit_of = torch.arange(40) % 5
    v = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(1)).double())[0].float()
    pieces = influence_pieces(net, final, x, y, unit_of, 5, v, wd)
    c = influence_target(pieces, damping=0.01)

    def loss(pf: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net.logits(unflatten(pf, final), x), y) + 0.5 * wd * pf.pow(2).sum()

    h = hessian(loss)(theta).double()
    lam, q = torch.linalg.eigh(0.5 * (h + h.T))
    inv = q @ torch.diag(1 / (lam.abs() + 0.01 * lam.abs().max())) @ q.T
    g = torch.zeros(5, p).index_add_(0, unit_of, per_sample_grads(net, final, x, y)) / 40
    expected = (g.double() @ inv) @ v.double()
    torch.testing.assert_close(c.double(), expected, rtol=2e-3, atol=1e-6)


def test_blend_weights_and_single_targets():
    a, b = torch.ones(2, 3), torch.zeros(2, 3)
    torch.testing.assert_close(blend(a, b, 0.25), torch.full((2, 3), 0.25))
    assert blend(a, None, 0.5) is a and blend(None, b, 0.5) is b
    pieces = InfluencePieces(torch.diag(torch.tensor([2.0, -4.0])), torch.tensor([[2.0, 4.0]]))
    torch.testing.assert_close(influence_target(pieces, 0.0), torch.tensor([[1.0, 1.0]]))  # |eig|


def test_fit_target_recovers_known_lengths_and_never_flips_a_piece():
    from ddm_ray.core.targets import fit_target, target_features

    gen = torch.Generator().manual_seed(0)
    unrolled = torch.randn(12, 6, generator=gen)
    unrolled[:, 4:] = 0  # the adjoint ran on the 4 leading directions
    influence = torch.randn(12, 6, generator=gen)
    feats = target_features(unrolled, influence, lead_rank=4)
    assert len(feats) == 3 and bool((feats[1][:, 4:] == 0).all()) and bool((feats[2][:, :4] == 0).all())
    exact = 0.5 * feats[0] + 2.0 * feats[1] + 3.0 * feats[2]
    rows = torch.tensor([0, 3, 5, 7])
    coef, c = fit_target(feats, exact[rows], rows)
    torch.testing.assert_close(coef, torch.tensor([0.5, 2.0, 3.0]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(c, exact, atol=1e-4, rtol=1e-4)  # every unit, not only the fitted rows
    # a piece that points the wrong way gets length 0, never a negative one
    coef, _ = fit_target(feats, (0.5 * feats[0] - 2.0 * feats[1] + 3.0 * feats[2])[rows], rows)
    assert bool((coef >= 0).all()) and float(coef[1]) == 0.0, coef


def test_fit_target_with_one_piece_and_nothing_to_fit():
    from ddm_ray.core.targets import fit_target, target_features

    influence = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    feats = target_features(None, influence)
    coef, c = fit_target(feats, 4.0 * influence[:2], torch.tensor([0, 1]))
    torch.testing.assert_close(coef, torch.tensor([4.0]))
    coef, c = fit_target(feats, torch.zeros(2, 3), torch.tensor([0, 1]))  # no signal: unscaled piece
    torch.testing.assert_close(c, influence)

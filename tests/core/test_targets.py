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

"""Distillation: basis synsets reproduce their target exactly; paper-style methods stay finite."""

import pytest
import torch

from ddm_ray.config import DistillConfig, ModelConfig, TrainConfig
from ddm_ray.core.distill import basis_synset, distill_class
from ddm_ray.core.models import Network, flatten
from ddm_ray.core.probe import probe_basis, select_probes
from ddm_ray.core.synset import one_step_moves
from ddm_ray.core.training import train
from tests.conftest import blobs


def _trained(n=48, dim=6, classes=2, epochs=2):
    x, y = blobs(n, dim=dim, classes=classes)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    net = Network(ModelConfig(hidden=(8,)), (dim,), classes)
    tc = TrainConfig(epochs=epochs, batch_size=12, lr=0.1)
    p0 = net.init_params(0)
    return x, y, net, tc, p0, train(net, p0, x, y, tc)


@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_basis_synset_one_step_reproduces_the_shrunk_projection(ridge):
    x, y, net, _tc, _p0, traj = _trained()
    idx = select_probes(y, 2, 30, seed=0)
    basis = probe_basis(net, traj.final, x, y, idx, rank=12)
    c = torch.randn(5, basis.rank)
    syn = basis_synset(basis, torch.arange(5), c, lr=0.2, ridge=ridge, num_classes=2)
    assert syn.x.shape == (30, 6) and syn.label.shape == (30, 2) and syn.weight.shape == (5, 30)
    move = one_step_moves(net, traj.final, syn.x, syn.label, syn.weight, 0.2)
    shrink = basis.lam / (basis.lam + ridge * basis.lam[0])
    torch.testing.assert_close(move, (c * shrink) @ basis.v.T, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("method", ["soft_label", "literal"])
def test_paper_methods_give_finite_per_unit_synsets(method):
    x, y, net, _tc, _p0, traj = _trained()
    unit_of = y * 2 + (torch.arange(48) % 4 >= 2).long()  # 2 units per class
    cfg = DistillConfig(method=method, ipc=3, steps=5, max_gap=2)
    members = [torch.nonzero(unit_of == u).flatten() for u in (2, 3)]
    syn = distill_class(net, traj, 1, [2, 3], members, x, y, cfg)
    assert syn.x.shape == (6, 6) and syn.label.shape == (6, 2) and syn.weight.shape == (2, 6)
    assert syn.unit_ids.tolist() == [2, 3]
    assert bool((syn.weight[0, 3:] == 0).all()) and bool((syn.weight[1, :3] == 0).all())
    assert syn.check((6,), 2) is None
    torch.testing.assert_close(syn.label.sum(-1), torch.ones(6))
    assert float(syn.x.min()) >= float(x.min()) - 1e-6 and float(syn.x.max()) <= float(x.max()) + 1e-6
    assert float(flatten(traj.final).abs().sum()) > 0

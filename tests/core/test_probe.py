"""The probe subspace: stratified capped draw, orthonormal directions from the probes' gradients."""

import torch

from ddm_ray.config import ModelConfig, TrainConfig
from ddm_ray.core.models import Network
from ddm_ray.core.probe import per_sample_grads, probe_basis, select_probes
from ddm_ray.core.training import train
from tests.conftest import blobs


def test_select_probes_is_stratified_capped_and_seeded():
    y = torch.tensor([0] * 50 + [1] * 5 + [2] * 45)
    idx = select_probes(y, 3, 30, seed=3)
    assert idx.numel() == 30 and idx.unique().numel() == 30
    counts = torch.bincount(y[idx], minlength=3).tolist()
    assert counts[1] == 5 and abs(counts[0] - counts[2]) <= 1  # the small class gives all it has
    assert torch.equal(idx, select_probes(y, 3, 30, seed=3))
    assert not torch.equal(idx, select_probes(y, 3, 30, seed=4))
    assert select_probes(y, 3, 1000, seed=0).numel() == 100  # capped by the data


def test_basis_is_orthonormal_and_spans_the_probe_gradients():
    x, y = blobs(60, dim=5, classes=3)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    net = Network(ModelConfig(hidden=(6,)), (5,), 3)
    final = train(net, net.init_params(0), x, y, TrainConfig(epochs=2, batch_size=10, lr=0.2)).final
    idx = select_probes(y, 3, 24, seed=0)
    b = probe_basis(net, final, x, y, idx, rank=10)
    assert b.v.shape[1] == b.rank == 10 and b.coef.shape == (24, 10)
    torch.testing.assert_close(b.v.T @ b.v, torch.eye(10), atol=2e-4, rtol=0)
    assert bool((b.lam[:-1] >= b.lam[1:]).all())
    g = per_sample_grads(net, final, x[idx], y[idx])
    torch.testing.assert_close(g.T @ b.coef, b.v, rtol=1e-4, atol=1e-5)
    # the top direction carries most of the normalised probes' energy
    full = probe_basis(net, final, x, y, idx, rank=24)
    assert full.rank <= 24 and float(full.lam[0]) >= float(full.lam[-1])

"""The adjoint replay gives the same subspace targets as the per-unit forward unroll."""

import pytest
import torch

from ddm_ray.config import ModelConfig, TrainConfig
from ddm_ray.core.adjoint import adjoint_unrolled
from ddm_ray.core.models import Network
from ddm_ray.core.targets import forward_unrolled_projected
from ddm_ray.core.training import replay_epoch, train
from tests.conftest import blobs


@pytest.mark.parametrize(
    "cfg,unroll",
    [
        (TrainConfig(epochs=3, batch_size=12, lr=0.1), None),
        (TrainConfig(epochs=3, batch_size=12, lr=0.05, momentum=0.6, weight_decay=0.01), None),
        (TrainConfig(epochs=3, batch_size=16, lr=0.1, seed=2), 2),
    ],
)
def test_adjoint_equals_forward_unroll(cfg, unroll):
    x, y = blobs(50, dim=6, classes=3)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    net = Network(ModelConfig(hidden=(7,)), (6,), 3)
    p0 = net.init_params(1)
    traj = train(net, p0, x, y, cfg)
    unit_of = torch.arange(50) % 7
    unit_of[:4] = -1  # samples in no unit
    p = sum(v.numel() for v in p0.values())
    v = torch.linalg.qr(torch.randn(p, 9, generator=torch.Generator().manual_seed(0)))[0]
    c_adj = adjoint_unrolled(net, traj, x, y, unit_of, 7, cfg, v, unroll_epochs=unroll)
    c_fwd = forward_unrolled_projected(net, p0, x, y, unit_of, range(0, 7), cfg, v, unroll_epochs=unroll)
    assert c_adj.shape == (7, 9)
    torch.testing.assert_close(c_adj, c_fwd, rtol=1e-3, atol=1e-6)
    assert float(c_adj.abs().max()) > 0
    part = forward_unrolled_projected(net, p0, x, y, unit_of, range(2, 5), cfg, v, unroll_epochs=unroll)
    torch.testing.assert_close(part, c_fwd[2:5], rtol=1e-3, atol=1e-6)


def test_replay_reproduces_the_training_run():
    x, y = blobs(40, dim=4, classes=2)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    net = Network(ModelConfig(hidden=(5,)), (4,), 2)
    cfg = TrainConfig(epochs=2, batch_size=10, lr=0.1, momentum=0.5)
    traj = train(net, net.init_params(0), x, y, cfg)
    seen = []
    train(net, net.init_params(0), x, y, cfg, hook=lambda s, p, b, v: seen.append({k: t.clone() for k, t in p.items()}))
    replayed = replay_epoch(net, traj, x, y, cfg, 1)
    assert len(replayed) == traj.steps_per_epoch
    for a, b in zip(replayed, seen[traj.steps_per_epoch :], strict=True):
        for k in a:
            assert torch.equal(a[k], b[k])

"""Unrolled displacement agrees with exact retraining where the linearisation holds."""

import torch

from ddm_ray.config import ModelConfig, TrainConfig
from ddm_ray.core.displacement import unrolled_displacement
from ddm_ray.core.metrics import pearson
from ddm_ray.core.models import Network, flatten
from ddm_ray.core.training import train
from tests.conftest import blobs


def test_displacement_matches_retraining_direction():
    x, y = blobs(60, dim=6, classes=2)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    net = Network(ModelConfig(hidden=(8,)), (6,), 2)
    cfg = TrainConfig(epochs=3, batch_size=12, lr=0.05, momentum=0.5, seed=0)
    p0 = net.init_params(0)
    unit_of = torch.arange(60) % 6  # 6 units of 10 samples
    d = unrolled_displacement(net, p0, x, y, unit_of, 6, cfg)
    final = flatten(train(net, p0, x, y, cfg).final)
    for u in range(6):
        exact = flatten(train(net, p0, x, y, cfg, keep=unit_of != u).final) - final
        pred = torch.cat([v[u].flatten() for v in d.values()])
        assert float(pearson(pred, exact)) > 0.95
        assert 0.7 < float(pred.norm() / exact.norm()) < 1.3

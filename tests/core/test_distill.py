"""Every distillation method yields finite synsets of the right shape on a tiny model."""

import pytest
import torch

from ddm_ray.config import DistillConfig, ModelConfig, OnlineConfig, TrainConfig
from ddm_ray.core.displacement import unrolled_displacement
from ddm_ray.core.distill import distill_class
from ddm_ray.core.models import Network
from ddm_ray.core.training import train
from tests.conftest import blobs


@pytest.mark.parametrize(
    "method,match", [("displacement", "fisher"), ("displacement", "parameter"), ("soft_label", "fisher"), ("literal", "fisher")]
)
def test_methods_give_finite_synsets(method, match):
    x, y = blobs(48, dim=6, classes=2)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    net = Network(ModelConfig(hidden=(8,)), (6,), 2)
    tc = TrainConfig(epochs=2, batch_size=12, lr=0.1)
    p0 = net.init_params(0)
    traj = train(net, p0, x, y, tc)
    unit_of = y * 2 + (torch.arange(48) % 4 >= 2).long()  # 2 units per class
    cfg = DistillConfig(method=method, match=match, ipc=3, steps=5, max_gap=2, probe_samples=20)
    d = unrolled_displacement(net, p0, x, y, unit_of, 4, tc)
    flat = torch.cat([v.flatten(1) for v in d.values()], 1)
    members = [torch.nonzero(unit_of == u).flatten() for u in (2, 3)]
    syn = distill_class(net, traj, 1, [2, 3], members, x, y, cfg, OnlineConfig(), flat[2:4])
    assert syn.x.shape == (2, 3, 6) and syn.logits.shape == (2, 3, 2) and syn.weight.shape == (2, 3)
    assert syn.unit_ids.tolist() == [2, 3]
    for t in (syn.x, syn.logits, syn.weight) + (() if syn.scale is None else (syn.scale,)):
        assert torch.isfinite(t).all()
    assert float(syn.x.min()) >= float(x.min()) - 1e-6 and float(syn.x.max()) <= float(x.max()) + 1e-6

import torch

from ddm_ray.config import ModelConfig, TrainConfig
from ddm_ray.core.models import Network
from ddm_ray.core.training import batch_schedule, train
from tests.conftest import blobs


def _setup(momentum: float = 0.0, wd: float = 0.0):
    x, y = blobs(90, dim=8)
    net = Network(ModelConfig(hidden=(12,)), (8,), 3)
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.2, momentum=momentum, weight_decay=wd, seed=3)
    return net, torch.from_numpy(x), torch.from_numpy(y), cfg


def test_retraining_with_empty_removal_is_bit_for_bit():
    for momentum, wd in [(0.0, 0.0), (0.9, 1e-3)]:
        net, x, y, cfg = _setup(momentum, wd)
        p0 = net.init_params(cfg.seed)
        a = train(net, p0, x, y, cfg)
        b = train(net, net.init_params(cfg.seed), x, y, cfg, keep=torch.ones(len(x), dtype=torch.bool))
        for k in a.final:
            assert torch.equal(a.final[k], b.final[k]), k
        assert len(a.checkpoints) == cfg.epochs + 1
        assert not torch.equal(a.final["head.weight"], p0["head.weight"])


def test_removal_changes_the_model_and_keeps_the_order():
    net, x, y, cfg = _setup()
    p0 = net.init_params(cfg.seed)
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[:5] = False
    a = train(net, p0, x, y, cfg).final
    b = train(net, p0, x, y, cfg, keep=keep).final
    assert not torch.equal(a["head.weight"], b["head.weight"])
    # same seed -> same batches; the schedule does not depend on what is removed
    s1, s2 = batch_schedule(len(x), cfg), batch_schedule(len(x), cfg)
    assert all(torch.equal(u, v) for e1, e2 in zip(s1, s2, strict=True) for u, v in zip(e1, e2, strict=True))


def test_init_is_seeded():
    net, *_ = _setup()
    a, b, c = net.init_params(1), net.init_params(1), net.init_params(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_on_epoch_hears_every_epoch_and_changes_nothing():
    net, x, y, cfg = _setup(0.9, 1e-3)
    seen: list[int] = []
    a = train(net, net.init_params(cfg.seed), x, y, cfg, on_epoch=seen.append)
    b = train(net, net.init_params(cfg.seed), x, y, cfg)
    assert seen == list(range(1, cfg.epochs + 1))
    assert all(torch.equal(a.final[k], b.final[k]) for k in a.final)

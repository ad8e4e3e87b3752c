"""Training stability: power iteration against a dense Hessian, and the limit 2 (1 + mu) / lr."""

import torch
import torch.nn.functional as F
from torch.func import hessian

from ddm_ray.config import ModelConfig, TrainConfig
from ddm_ray.core.models import Network, flatten, unflatten
from ddm_ray.core.stability import stability_limit, stability_report, top_eigenvalue
from ddm_ray.core.training import train
from tests.conftest import blobs


def _setup():
    x, y = blobs(60, dim=3, classes=3)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    net = Network(ModelConfig(hidden=(4,)), (3,), 3)
    traj = train(net, net.init_params(0), x, y, TrainConfig(epochs=4, batch_size=20, lr=0.3))
    return net, traj, x, y


def test_power_iteration_finds_the_largest_eigenvalue():
    net, traj, x, y = _setup()
    final = traj.final
    h = hessian(lambda pf: F.cross_entropy(net.logits(unflatten(pf, final), x), y))(flatten(final))
    eig = torch.linalg.eigvalsh(0.5 * (h + h.T))
    top = float(eig[eig.abs().argmax()])
    got = top_eigenvalue(net, final, x, y, 0.0, iters=200, seed=0)
    assert abs(got - top) <= 0.02 * abs(top), (got, top)


def test_limit_counts_momentum_and_the_report_warns_past_it():
    assert stability_limit(TrainConfig(lr=0.1)) == 20.0
    assert abs(stability_limit(TrainConfig(lr=0.1, momentum=0.9)) - 38.0) < 1e-9
    net, traj, x, y = _setup()
    calm = stability_report(net, traj.checkpoints, x, y, TrainConfig(epochs=4, lr=0.3))
    assert calm["unstable"] is False and "warning" not in calm
    assert calm["epochs"][-1] == 4 and len(calm["top_eigenvalue"]) == len(calm["epochs"])
    worst = max(abs(e) for e in calm["top_eigenvalue"])
    # the same checkpoints judged for a learning rate whose limit is below the curvature
    hot = stability_report(net, traj.checkpoints, x, y, TrainConfig(epochs=4, lr=4.0 / worst))
    assert hot["unstable"] is True and "stability limit" in hot["warning"] and hot["max_ratio"] > 1

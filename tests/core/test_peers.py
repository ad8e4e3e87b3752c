"""Every peer runs on a tiny model, returns (n_obj, U, N_test), and gets an obvious case right.

The obvious case: a unit whose samples are the only ones of a distinctive pattern. Removing it
raises the test loss of test samples with that pattern, so every method must predict a positive
loss change there (and correlate positively with exact retraining overall).
"""

import pytest
import torch

from ddm_ray.config import ModelConfig, TrainConfig
from ddm_ray.core import peers
from ddm_ray.core.metrics import pearson
from ddm_ray.core.models import Network, flatten
from ddm_ray.core.objectives import all_objectives
from ddm_ray.core.training import train

NAMES = ("loss", "margin", "correct")


@pytest.fixture(scope="module")
def tiny():
    gen = torch.Generator().manual_seed(0)
    n, d, c = 90, 6, 3
    y = torch.arange(n) % c
    centres = torch.eye(c, d) * 2
    x = centres[y] + 0.3 * torch.randn(n, d, generator=gen)
    # unit 0 holds the class-0 samples carrying a private feature (dim 5); others: 2 units per class
    unit_of = (y * 2 + (torch.arange(n) // c) % 2).long()
    x[unit_of == 0, 5] += 3.0
    x_test = torch.cat([centres[:1] + torch.tensor([[0, 0, 0, 0, 0, 3.0]]), centres]).repeat(2, 1)
    x_test = x_test + 0.1 * torch.randn(x_test.shape, generator=gen)
    y_test = torch.tensor([0, 0, 1, 2] * 2)
    net = Network(ModelConfig(hidden=(8,)), (d,), c)
    cfg = TrainConfig(epochs=15, batch_size=30, lr=0.3)
    p0 = net.init_params(0)
    traj = train(net, p0, x, y, cfg)
    label = torch.arange(c).repeat_interleave(2)
    inp = peers.PeerInputs(net, p0, traj, x, y, unit_of, label, cfg, x_test, y_test, NAMES)
    units = [0, 1, 2, 3, 4, 5]
    base = inp.base_objectives()
    exact = torch.stack(
        [all_objectives(net.logits(train(net, p0, x, y, cfg, keep=unit_of != u).final, x_test), y_test, NAMES) - base
         for u in units], 1,
    )
    return inp, units, exact


RUNNERS = {
    "class_indicator": lambda i, u: peers.class_indicator(i, u),
    "gradient_ascent": lambda i, u: peers.gradient_ascent(i, u),
    "gradient_ascent_3": lambda i, u: peers.gradient_ascent(i, u, steps=3),
    "tracin": lambda i, u: peers.tracin(i, u),
    "influence_damped": lambda i, u: peers.influence(i, u, damping=0.1),
    "influence_abs_linear": lambda i, u: peers.influence(i, u, damping=0.05, mode="linear", curvature="abs"),
    "influence_cg": lambda i, u: peers.influence(i, u, damping=0.5, max_exact=0, cg_iters=50),
    "unrolled": lambda i, u: peers.unrolled(i, u),
    "unrolled_linear": lambda i, u: peers.unrolled(i, u, mode="linear"),
}


@pytest.mark.parametrize("name", list(RUNNERS))
def test_peer_shape_and_sign(tiny, name):
    inp, units, exact = tiny
    r = RUNNERS[name](inp, units)
    assert r.deltas.shape == (3, len(units), inp.x_test.shape[0])
    assert torch.isfinite(r.deltas).all()
    assert r.offline_seconds >= 0 and r.online_seconds >= 0
    # the distinctive test samples (positions 0 and 4) lose when unit 0 goes
    assert exact[0, 0, [0, 4]].min() > 0
    assert r.deltas[0, 0, [0, 4]].min() > 0, name
    assert float(pearson(r.deltas[0], exact[0])) > 0.2, name


def test_hessian_matches_autograd(tiny):
    inp = tiny[0]
    h = peers.hessian(inp, chunk=17)
    ref = torch.autograd.functional.hessian(peers._mean_loss_fn(inp), flatten(inp.final))
    torch.testing.assert_close(h, ref, rtol=1e-4, atol=1e-6)


def test_conjugate_gradient_solves_spd():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a = a @ a.T + 6 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    x = peers.conjugate_gradient(lambda v: v @ a, b, iters=50, tol=1e-12)
    torch.testing.assert_close(x @ a, b)


def test_linearised_loss_matches_finite_difference(tiny):
    inp = tiny[0]
    disp = 1e-3 * torch.randn(2, flatten(inp.final).numel(), generator=torch.Generator().manual_seed(2))
    lin = peers.displacement_objectives(inp, disp, "linear")
    ev = peers.displacement_objectives(inp, disp, "eval")
    torch.testing.assert_close(lin[:2], ev[:2], rtol=0.05, atol=2e-5)

"""Batched online evaluation agrees with the one-by-one reference (MLP and ConvNet)."""

import pytest
import torch

from ddm_ray.config import ModelConfig
from ddm_ray.core.metrics import pearson
from ddm_ray.core.models import Network
from ddm_ray.core.objectives import per_sample
from ddm_ray.core.online import choose_online_batch, evaluate_units, evaluate_units_loop
from ddm_ray.core.synset import Synset, pool_gradients


@pytest.mark.parametrize("arch,shape", [("mlp", (16,)), ("convnet", (1, 6, 5))])
@pytest.mark.parametrize("steps", [1, 3])
def test_batched_equals_loop(arch, shape, steps):
    torch.manual_seed(0)
    net = Network(ModelConfig(arch=arch, hidden=(10,), conv_channels=(3, 4), fc_width=8), shape, 4)
    final = net.init_params(0)
    u, m = 7, 5
    weight = torch.randn(u, m) * (torch.rand(u, m) > 0.3)  # signed, some samples unused per unit
    weight[:, 4] = 0  # a sample no unit uses
    syn = Synset(
        unit_ids=torch.arange(u),
        x=torch.rand(m, *shape),
        label=torch.softmax(torch.randn(m, 4), -1),
        weight=weight,
    )
    x_test, y_test = torch.rand(11, *shape), torch.randint(0, 4, (11,))
    names = ("loss", "margin", "correct")
    ref = evaluate_units_loop(net, final, syn, x_test, y_test, names, steps, 0.5)
    for b in (1, 3, 64):
        got = evaluate_units(net, final, syn, x_test, y_test, names, steps, 0.5, batch=b)
        assert got.shape == (3, u, 11)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    if steps == 1:  # the moves from the pool's gradients, computed once: one matrix product
        grads = pool_gradients(net, final, syn.x, syn.label)
        assert grads.shape == (m, sum(t.numel() for t in final.values()))
        for b in (1, 3):
            got = evaluate_units(net, final, syn, x_test, y_test, names, steps, 0.5, batch=b, pool_grads=grads)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert ref[0].abs().sum() > 0  # the fine-tune moved the model


def test_objectives_on_hand_computed_logits():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 2])
    torch.testing.assert_close(per_sample(logits, y, "margin"), torch.tensor([1.0, -2.0]))
    torch.testing.assert_close(per_sample(logits, y, "correct"), torch.tensor([1.0, 0.0]))
    expected = -torch.log_softmax(logits, -1)[torch.arange(2), y]
    torch.testing.assert_close(per_sample(logits, y, "loss"), expected)


def _setup_mlp(u=9):
    torch.manual_seed(1)
    net = Network(ModelConfig(hidden=(12,)), (8,), 3)
    final = net.init_params(0)
    syn = Synset(torch.arange(u), torch.rand(6, 8), torch.softmax(torch.randn(6, 3), -1), torch.randn(u, 6))
    return net, final, syn, torch.rand(13, 8), torch.randint(0, 3, (13,))


def test_test_chunking_and_bf16():
    net, final, syn, xt, yt = _setup_mlp()
    names = ("loss", "margin")
    ref = evaluate_units(net, final, syn, xt, yt, names, 1, 0.3, batch=4)
    got = evaluate_units(net, final, syn, xt, yt, names, 1, 0.3, batch=4, test_chunk=5)
    torch.testing.assert_close(got, ref)
    low = evaluate_units(net, final, syn, xt, yt, names, 1, 0.3, batch=4, precision="bf16")
    assert low.dtype == torch.float32 and low.shape == ref.shape
    assert float(pearson(low, ref)) > 0.9  # bf16 changes the numbers, not the picture


def test_batch_choice_grows_with_memory_and_stays_bounded():
    net, final, *_ = _setup_mlp()
    small = choose_online_batch(net, final, 1000, 4, 1, 1 << 20)
    big = choose_online_batch(net, final, 1000, 4, 1, 1 << 30)
    assert 1 <= small[0] < big[0] <= 1024
    assert 1 <= small[1] <= 1000 and big[1] <= 1000
    assert choose_online_batch(net, final, 1000, 4, 1, 1) == (1, 1)


def test_one_step_moves_are_linear_in_weights_and_compose():
    """One step is -lr * weights @ per-sample gradients: equal to fast_learn, additive over units,
    and a per-unit synset pool (concat) gives each unit only its own samples."""
    from ddm_ray.core.models import flatten
    from ddm_ray.core.synset import fast_learn, one_step_moves

    net, final, syn, xt, yt = _setup_mlp(u=3)
    moves = one_step_moves(net, final, syn.x, syn.label, syn.weight, 0.3, chunk=4)
    for u in range(3):
        ref = flatten(fast_learn(net, final, syn.x, syn.label, syn.weight[u], 1, 0.3)) - flatten(final)
        torch.testing.assert_close(moves[u], ref, rtol=1e-4, atol=1e-6)
    both = one_step_moves(net, final, syn.x, syn.label, syn.weight[:2].sum(0, keepdim=True), 0.3)
    torch.testing.assert_close(both[0], moves[0] + moves[1], rtol=1e-4, atol=1e-6)
    pooled = Synset.concat([syn.select(slice(0, 1)), syn.select(slice(1, 3))])
    assert pooled.x.shape[0] == 2 * syn.x.shape[0] and pooled.weight.shape == (3, 12)
    assert bool((pooled.weight[0, 6:] == 0).all()) and bool((pooled.weight[1:, :6] == 0).all())
    names = ("loss",)
    torch.testing.assert_close(
        evaluate_units(net, final, pooled, xt, yt, names, 1, 0.3, batch=2),
        evaluate_units(net, final, syn, xt, yt, names, 1, 0.3, batch=3),
        rtol=1e-4, atol=1e-5,
    )
    assert Synset.from_dict(pooled.to_dict()).check((8,), 3) is None
    bad = Synset(syn.unit_ids, syn.x, syn.label, syn.weight.clone())
    bad.weight[0, 0] = float("nan")
    assert "non-finite" in (bad.check((8,), 3) or "")
    assert "shape" in (syn.check((9,), 3) or "")


def test_convnet_on_cpu_runs_one_unit_per_pass():
    net = Network(ModelConfig(arch="convnet", conv_channels=(3, 4), fc_width=8), (1, 6, 6), 3)
    b, chunk = choose_online_batch(net, net.init_params(0), 50, 2, 1, 1 << 30)
    assert b == 1 and chunk == 50

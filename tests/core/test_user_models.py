"""User models named `package.module:factory`: loading, refusals with one line, seeded init and
penultimate features through the last linear layer."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from ddm_ray.config import ModelConfig
from ddm_ray.core.models import Network
from ddm_ray.errors import ConfigError

MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def gn_cnn(input_shape, num_classes):
        c, h, w = input_shape
        return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * h * w, 16), nn.ReLU(), nn.Linear(16, num_classes))

    def with_bn(input_shape, num_classes):
        c, h, w = input_shape
        return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(),
                             nn.Linear(4 * h * w, num_classes))

    def wrong_width(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes + 1))

    def not_a_module(input_shape, num_classes):
        return 3

    class Holder:
        @staticmethod
        def build(input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))
    """
)


@pytest.fixture()
def usermod(tmp_path, monkeypatch):
    name = f"ddm_user_models_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.fixture()
def write_module(tmp_path, monkeypatch):
    """write_module(prefix, source) -> an importable module name holding `source`."""
    names: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(prefix: str, source: str) -> str:
        name = f"{prefix}_{abs(hash(str(tmp_path))) % 10**8}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_user_factory_builds_a_functional_network(usermod):
    net = Network(ModelConfig(arch=f"{usermod}:gn_cnn"), (1, 4, 4), 3)
    p0, p0_again, p1 = net.init_params(0), net.init_params(0), net.init_params(1)
    assert all(torch.equal(p0[k], p0_again[k]) for k in p0)
    assert any(not torch.equal(p0[k], p1[k]) for k in p0)
    x = torch.randn(5, 1, 4, 4)
    assert net.logits(p0, x).shape == (5, 3)
    assert net.features(p0, x).shape == (5, 16)  # the input of the last nn.Linear
    assert Network(ModelConfig(arch=f"{usermod}:Holder.build"), (2, 2), 2).logits(
        Network(ModelConfig(arch=f"{usermod}:Holder.build"), (2, 2), 2).init_params(0), torch.zeros(1, 2, 2)
    ).shape == (1, 2)


@pytest.mark.parametrize(
    "factory,match",
    [
        ("with_bn", "is BatchNorm2d.*use GroupNorm or LayerNorm"),
        ("wrong_width", r"expected \(2, 3\) logits"),
        ("not_a_module", "returned int, not a torch.nn.Module"),
        ("missing", "has no attribute missing"),
    ],
)
def test_unusable_user_models_are_refused_in_one_line(usermod, factory, match):
    with pytest.raises(ConfigError, match=match) as e:
        Network(ModelConfig(arch=f"{usermod}:{factory}"), (1, 4, 4), 3)
    assert "\n" not in str(e.value)


def test_unimportable_module_names_the_fix():
    with pytest.raises(ConfigError, match="cannot import no_such_module_xyz.*working directory or on PYTHONPATH"):
        Network(ModelConfig(arch="no_such_module_xyz:build"), (4,), 2)


def test_model_reference_syntax_is_checked():
    with pytest.raises(ConfigError, match="package.module:factory"):
        ModelConfig(arch="resnet")


def test_a_forward_that_vmap_cannot_take_is_refused_before_training(write_module):
    name = write_module("ddm_branchy", """
        from torch import nn

        class Branchy(nn.Module):
            def __init__(self, d, c):
                super().__init__()
                self.lin = nn.Linear(d, c)

            def forward(self, x):
                x = x.flatten(1)
                if x.abs().sum() > 0:  # data-dependent control flow
                    x = x * 2
                return self.lin(x)

        def build(shape, c):
            return Branchy(int(shape[0]), c)
        """)
    with pytest.raises(ConfigError, match="per-sample gradients.*data-dependent control flow"):
        Network(ModelConfig(arch=f"{name}:build"), (4,), 2)


def test_penultimate_features_follow_the_forward_order(write_module):
    name = write_module("ddm_head_first", """
        from torch import nn

        class HeadFirst(nn.Module):
            def __init__(self, d, c):
                super().__init__()
                self.head = nn.Linear(8, c)  # defined first, called last
                self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, 8), nn.ReLU())

            def forward(self, x):
                return self.head(self.body(x))

        def build(shape, c):
            return HeadFirst(int(shape[0]), c)
        """)
    net = Network(ModelConfig(arch=f"{name}:build"), (5,), 3)
    p = net.init_params(0)
    x = torch.randn(4, 5)
    assert net.features(p, x).shape == (4, 8)
    assert torch.allclose(net.features(p, x), torch.relu(x @ p["body.1.weight"].T + p["body.1.bias"]))

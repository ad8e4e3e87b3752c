"""The networks attributed: an MLP and a small ConvNet (conv-conv-fc), used functionally.

Parameters travel as a `Params` dict (name -> tensor) so that training, unrolled influence and
batched online fine-tuning (`torch.func.vmap`) all share one forward: `Network.logits`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from ddm_ray.config import ModelConfig
from ddm_ray.errors import ConfigError

Params = dict[str, torch.Tensor]


class _MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class _ConvNet(nn.Module):
    def __init__(
        self, shape: Sequence[int], channels: Sequence[int], fc: int, num_classes: int
    ) -> None:
        super().__init__()
        c, h, w = shape
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Flatten(),
        )
        h2, w2 = math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2)
        self.body.append(nn.Linear(c2 * h2 * w2, fc))
        self.body.append(nn.ReLU())
        self.head = nn.Linear(fc, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Network:
    """A functional view of a module: `logits(params, x)` with x of shape (N, *input_shape)."""

    def __init__(self, cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> None:
        self.cfg = cfg
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        if cfg.arch == "mlp":
            self.module: nn.Module = _MLP(math.prod(self.input_shape), cfg.hidden, num_classes)
        elif cfg.arch == "convnet":
            if len(self.input_shape) != 3:
                raise ConfigError(
                    f"convnet needs image inputs C,H,W (--input-shape), got shape {self.input_shape}"
                )
            self.module = _ConvNet(self.input_shape, cfg.conv_channels, cfg.fc_width, num_classes)
        else:  # pragma: no cover - ModelConfig validates
            raise ConfigError(f"unknown model {cfg.arch}")
        self.module.requires_grad_(False)

    def init_params(self, seed: int) -> Params:
        """Fresh parameters from PyTorch's default init under `seed` (same seed, same tensors)."""
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        for m in self.module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        torch.random.set_rng_state(gen_state)
        return {k: v.detach().clone() for k, v in self.module.named_parameters()}

    def logits(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """(N, *input_shape) -> (N, num_classes)."""
        return functional_call(self.module, params, (x,))

    def features(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, (N, *input_shape) -> (N, width)."""
        body = {k[len("body.") :]: v for k, v in params.items() if k.startswith("body.")}
        return functional_call(self.module.body, body, (x,))  # type: ignore[arg-type]


def flatten(params: Params) -> torch.Tensor:
    """Params -> (P,) vector in the dict's key order."""
    return torch.cat([v.reshape(-1) for v in params.values()])


def unflatten(vec: torch.Tensor, like: Params) -> Params:
    """(..., P) -> Params with the shapes of `like`, leading dims kept."""
    out: Params = {}
    i = 0
    lead = vec.shape[:-1]
    for k, v in like.items():
        n = v.numel()
        out[k] = vec[..., i : i + n].reshape(*lead, *v.shape)
        i += n
    return out


def num_params(params: Params) -> int:
    return sum(v.numel() for v in params.values())

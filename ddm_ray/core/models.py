"""The networks attributed, used functionally: the built-in MLP and small ConvNet (conv-conv-fc),
or the user's own `torch.nn.Module` named `package.module:factory`.

Parameters travel as a `Params` dict (name -> tensor) so that training, unrolled influence and
batched online fine-tuning (`torch.func.vmap`) all share one forward: `Network.logits`.

A user factory is called as `factory(input_shape, num_classes)` and must return a module mapping
(N, *input_shape) to (N, num_classes). The module is used in eval mode (dropout off) and must not
keep running statistics: BatchNorm is refused (its batch statistics tie samples together, so
per-sample gradients and leave-one-out replays are not those of the trained network); GroupNorm
and LayerNorm work.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ddm_ray.config import MAX_PARAMETERS, ModelConfig
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


def load_factory(ref: str) -> Callable[..., nn.Module]:
    """`package.module:factory` -> the callable, importable from the working directory or
    PYTHONPATH; ConfigError with one line when it is not there."""
    module_name, _, attr = ref.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"--model {ref}: cannot import {module_name} ({e}); put it in the working directory or on PYTHONPATH"
        ) from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing
        raise ConfigError(f"--model {ref}: importing {module_name} failed ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--model {ref}: {module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"--model {ref}: {attr} is not callable")
    return obj  # type: ignore[return-value]


def _build_user_module(ref: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    factory = load_factory(ref)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            module = factory(input_shape, num_classes)
        except Exception as e:  # noqa: BLE001 - the user's factory failed
            raise ConfigError(f"--model {ref}: factory{(input_shape, num_classes)} failed ({type(e).__name__}: {e})") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"--model {ref}: the factory returned {type(module).__name__}, not a torch.nn.Module")
    return module


def check_user_module(ref: str, module: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Refuse what a functional, per-sample replay cannot reproduce, with one line."""
    for name, m in module.named_modules():
        kind = type(m).__name__
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(
                f"--model {ref}: layer {name or '(root)'!r} is {kind}, whose batch statistics tie samples together "
                "and whose running statistics change outside the parameters; use GroupNorm or LayerNorm"
            )
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            raise ConfigError(f"--model {ref}: {name} is {kind} with running statistics; use GroupNorm or LayerNorm")
        if isinstance(m, nn.modules.lazy.LazyModuleMixin):
            raise ConfigError(f"--model {ref}: {name} is a lazy module ({kind}); give its sizes explicitly")
    if not any(True for _ in module.parameters()):
        raise ConfigError(f"--model {ref}: the module has no parameters")
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, *input_shape))
    except Exception as e:  # noqa: BLE001 - the user's forward failed
        raise ConfigError(
            f"--model {ref}: forward on inputs of shape (N, {', '.join(map(str, input_shape))}) failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"--model {ref}: the module returns {shape} for 2 samples, expected (2, {num_classes}) logits")
    # per-sample gradients (torch.func.vmap over grad), as the probe subspace and the online stage
    # take them: data-dependent control flow or .item() in forward fail here, not after training
    from torch.func import grad, vmap

    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(module, p, (x[None],)), y[None])

    try:
        vmap(grad(loss), in_dims=(None, 0, 0))(params, torch.randn(2, *input_shape), torch.zeros(2, dtype=torch.long))
    except Exception as e:  # noqa: BLE001 - what the user's forward does under vmap
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(
            f"--model {ref}: per-sample gradients (torch.func.vmap) fail on this module ({type(e).__name__}: "
            f"{first[:200]}); avoid data-dependent control flow and .item() in forward"
        ) from None


def builtin_parameters(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> int | None:
    """The parameter count of a built-in model, computed without building it (None for a user
    model, or a ConvNet on inputs that are not C,H,W)."""
    if cfg.arch == "mlp":
        widths = [math.prod(input_shape), *cfg.hidden, num_classes]
        return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
    if cfg.arch == "convnet" and len(input_shape) == 3:
        c, h, w = input_shape
        c1, c2 = cfg.conv_channels
        flat = c2 * math.ceil(math.ceil(h / 2) / 2) * math.ceil(math.ceil(w / 2) / 2)
        return (c * c1 * 9 + c1) + (c1 * c2 * 9 + c2) + (flat * cfg.fc_width + cfg.fc_width) + (
            cfg.fc_width * num_classes + num_classes)
    return None


class Network:
    """A functional view of a module: `logits(params, x)` with x of shape (N, *input_shape)."""

    def __init__(self, cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> None:
        self.cfg = cfg
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        count = builtin_parameters(cfg, self.input_shape, self.num_classes)
        if count is not None and count > MAX_PARAMETERS:
            raise ConfigError(
                f"the {cfg.arch} would have {count:,} parameters for inputs of shape {self.input_shape}; at most "
                f"{MAX_PARAMETERS:,}: choose smaller --hidden / --conv-channels / --fc-width"
            )
        if cfg.arch == "mlp":
            self.module: nn.Module = _MLP(math.prod(self.input_shape), cfg.hidden, num_classes)
        elif cfg.arch == "convnet":
            if len(self.input_shape) != 3:
                raise ConfigError(
                    f"convnet needs image inputs C,H,W (--input-shape), got shape {self.input_shape}"
                )
            self.module = _ConvNet(self.input_shape, cfg.conv_channels, cfg.fc_width, num_classes)
        else:
            self.module = _build_user_module(cfg.arch, self.input_shape, self.num_classes, seed=0)
            self.module.eval()
            check_user_module(cfg.arch, self.module, self.input_shape, self.num_classes)
        self.module.requires_grad_(False)
        self._feature_layer: nn.Module | None = None

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the architecture: parameter names and shapes, and for a user model
        the source file of its module (an edited model must not resume or validate a run)."""
        import hashlib

        h = hashlib.sha256()
        for k, v in self.module.named_parameters():
            h.update(f"{k}:{tuple(v.shape)};".encode())
        if self.cfg.is_user_model:
            mod = sys.modules.get(self.cfg.arch.partition(":")[0])
            path = getattr(mod, "__file__", None)
            if path and os.path.exists(path):
                with open(path, "rb") as f:
                    h.update(f.read())
        return h.hexdigest()[:16]

    def init_params(self, seed: int) -> Params:
        """Fresh parameters under `seed` (same seed, same tensors): PyTorch's default init for the
        built-in models; the user's factory called under that seed for a user model."""
        if self.cfg.is_user_model:
            fresh = _build_user_module(self.cfg.arch, self.input_shape, self.num_classes, seed)
            return {k: v.detach().clone() for k, v in fresh.named_parameters()}
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
        """Penultimate activations, (N, *input_shape) -> (N, width): the input of the linear layer
        the forward calls last (for the built-in models, the output of their body)."""
        if hasattr(self.module, "body") and hasattr(self.module, "head") and not self.cfg.is_user_model:
            body = {k[len("body.") :]: v for k, v in params.items() if k.startswith("body.")}
            return functional_call(self.module.body, body, (x,))  # type: ignore[arg-type]
        linears = [m for m in self.module.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError(f"--unit-features penultimate needs a final nn.Linear in {self.cfg.arch}; use input")
        captured: list[torch.Tensor] = []  # inputs of the linear layers in the order forward calls them
        handles = [m.register_forward_pre_hook(lambda _m, args: captured.append(args[0])) for m in linears]
        try:
            self.logits(params, x)
        finally:
            for h in handles:
                h.remove()
        return captured[-1].reshape(x.shape[0], -1)


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

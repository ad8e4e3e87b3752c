"""Online stage: leave-one-out rows from synsets, for a block of units at once.

For each unit u in the block: theta_{-u} = fast_learn(theta_final, S_u) and
    delta_u(x) = f(theta_{-u}, x) - f(theta_final, x)
for every test sample x and objective f. The block is evaluated in one batched pass
(`torch.func.vmap` over units, chunked by `batch`); `evaluate_units_loop` is the one-by-one
reference the batched path must agree with.
"""

from __future__ import annotations

import torch
from torch.func import vmap

from ddm_ray.core.models import Network, Params
from ddm_ray.core.objectives import all_objectives
from ddm_ray.core.synset import Synset, fast_learn


def _test_logits(net: Network, params: Params, x_test: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([net.logits(params, x_test[i : i + chunk]) for i in range(0, len(x_test), chunk)])


def base_objectives(
    net: Network, final: Params, x_test: torch.Tensor, y_test: torch.Tensor, names: tuple[str, ...]
) -> torch.Tensor:
    """f(theta_final, x) for every objective: (n_obj, N_test)."""
    with torch.no_grad():
        return all_objectives(_test_logits(net, final, x_test, 4096), y_test, names)


def evaluate_units(
    net: Network,
    final: Params,
    syn: Synset,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    names: tuple[str, ...],
    steps: int,
    lr: float,
    batch: int = 64,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deltas for every unit of syn: returns (n_obj, U, N_test) float32.

    Units are processed `batch` at a time: B parameter copies are fine-tuned and run over the test
    set together.
    """
    if base is None:
        base = base_objectives(net, final, x_test, y_test, names)

    def one(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        p = fast_learn(net, final, x, z, w, steps, lr)
        return net.logits(p, x_test)

    batched = vmap(one)
    out = []
    with torch.no_grad():
        for i in range(0, len(syn), batch):
            part = syn.select(slice(i, i + batch))
            logits = batched(part.x, part.logits, part.weight)  # (b, N, C)
            out.append(all_objectives(logits, y_test, names) - base[:, None, :])
    return torch.cat(out, dim=1).float()


def evaluate_units_loop(
    net: Network,
    final: Params,
    syn: Synset,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    names: tuple[str, ...],
    steps: int,
    lr: float,
) -> torch.Tensor:
    """The one-by-one reference for `evaluate_units`: (n_obj, U, N_test)."""
    base = base_objectives(net, final, x_test, y_test, names)
    rows = []
    for u in range(len(syn)):
        p = fast_learn(net, final, syn.x[u], syn.logits[u], syn.weight[u], steps, lr)
        with torch.no_grad():
            rows.append(all_objectives(net.logits(p, x_test), y_test, names) - base)
    return torch.stack(rows, dim=1).float()

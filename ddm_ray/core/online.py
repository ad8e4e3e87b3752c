"""Online stage: leave-one-out rows from synsets, for a block of units at once.

For each unit u in the block: theta_{-u} = fast_learn(theta_final, S_u) and
    delta_u(x) = f(theta_{-u}, x) - f(theta_final, x)
for every test sample x and objective f. The block is evaluated in batched passes (B units at a
time); `evaluate_units_loop` is the one-by-one reference the batched path must agree with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.func import vmap

from ddm_ray.core.models import Network, Params, flatten, unflatten
from ddm_ray.core.objectives import all_objectives
from ddm_ray.core.synset import Synset, fast_learn, one_step_moves


def _test_logits(net: Network, params: Params, x_test: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([net.logits(params, x_test[i : i + chunk]) for i in range(0, len(x_test), chunk)])


def base_objectives(
    net: Network, final: Params, x_test: torch.Tensor, y_test: torch.Tensor, names: tuple[str, ...]
) -> torch.Tensor:
    """f(theta_final, x) for every objective: (n_obj, N_test)."""
    with torch.no_grad():
        return all_objectives(_test_logits(net, final, x_test, 4096), y_test, names)


PRECISIONS = ("fp32", "tf32", "bf16")
MOVE_GROUP = 64  # units whose one-step moves share one per-sample-gradient pass


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """fp32: exact float32; tf32: TF32 matmuls/convolutions on CUDA (no-op on CPU);
    bf16: autocast to bfloat16 (CUDA or CPU). Deltas are always returned in float32."""
    if precision == "fp32":
        yield
    elif precision == "tf32":
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    elif precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        raise ValueError(f"unknown precision {precision}")


def activation_numel(net: Network, params: Params, sample: torch.Tensor) -> int:
    """Sum of the output sizes of every module for one sample (1, *input_shape)."""
    total = 0

    def hook(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() if isinstance(out, torch.Tensor) else 0

    leaves = [m for m in net.module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            net.logits(params, sample)
    finally:
        for h in handles:
            h.remove()
    return total


def choose_online_batch(
    net: Network, params: Params, n_test: int, samples: int, steps: int, budget_bytes: int, cap: int = 1024
) -> tuple[int, int]:
    """(B, test_chunk) that fit `budget_bytes`, float32 throughout.

    Half the budget holds B fine-tuned parameter copies with their gradients (P * (2 * steps + 2)
    per unit) and the synsets' saved activations; the other half holds the test forward pass of
    B models over `test_chunk` samples (B * test_chunk * A * 2, A = activations per sample).
    """
    p = sum(v.numel() for v in params.values())
    device = next(iter(params.values())).device
    sample = torch.zeros(1, *net.input_shape, device=device)
    a = activation_numel(net, params, sample)
    # one step: a unit costs its move (the shared per-sample gradients are chunked separately);
    # more steps fine-tune a copy per unit on the `samples` of its synset with saved activations
    per_unit = 4 * (p * (2 * steps + 2) + (samples * a * 4 * steps if steps > 1 else 0))
    b = int(max(1, min(cap, (budget_bytes // 2) // max(1, per_unit))))
    if device.type == "cpu" and any(isinstance(m, torch.nn.Conv2d) for m in net.module.modules()):
        # vmapped convolutions run as grouped convolutions, which CPU kernels do slowly:
        # bench/online_batch.py measured B=64 at 0.53x the rows/s of B=1 for the ConvNet
        b = 1
    chunk = int(max(1, min(n_test, (budget_bytes // 2) // max(1, 8 * a * b))))
    return b, chunk


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on the device (CUDA: free device memory; CPU: available system memory)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with ray[default]
        return 2 * 1024**3


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
    precision: str = "fp32",
    test_chunk: int | None = None,
    pool_grads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deltas for every unit of syn: returns (n_obj, U, N_test) float32.

    pool_grads (M, P): the per-sample gradients of syn's M samples at final
    (`core.synset.pool_gradients`), when the caller holds them for many calls: the one-step moves
    are then one matrix product per group, with no gradient pass.

    Units are processed `batch` at a time, each batch on the samples its units use. One online
    step (the default) is linear in the weights, so the B moves come from one per-sample-gradient
    pass over those samples (`one_step_moves`); more steps fine-tune B parameter copies together
    (vmapped). The B models then run over the test set in one vmapped forward per test chunk.
    The base objectives f(theta_final, x) are computed in float32 whatever the precision.
    """
    if base is None:
        base = base_objectives(net, final, x_test, y_test, names)
    n_test = x_test.shape[0]
    chunk = test_chunk or n_test
    theta = flatten(final)
    forward = vmap(lambda pf, xs: net.logits(unflatten(pf, final), xs), in_dims=(0, None))
    # one-step moves come from one per-sample-gradient pass over the samples a group of units uses,
    # so groups are at least MOVE_GROUP units even where the forward runs one unit at a time
    group = max(batch, MOVE_GROUP) if steps == 1 else batch
    out = []
    with torch.no_grad():
        for g0 in range(0, len(syn), group):
            part = syn.select(slice(g0, g0 + group))
            part = part if steps == 1 and pool_grads is not None else part.compact()
            with precision_context(precision, x_test.device):
                if steps == 1:
                    tuned_all = theta[None, :] + one_step_moves(net, final, part.x, part.label, part.weight, lr,
                                                                grads=pool_grads)
            for i in range(0, len(part), batch):
                cols = []
                with precision_context(precision, x_test.device):
                    if steps == 1:
                        tuned = tuned_all[i : i + batch]
                    else:
                        tune = vmap(lambda w, xs, ls: flatten(fast_learn(net, final, xs, ls, w, steps, lr)),
                                    in_dims=(0, None, None))
                        tuned = tune(part.weight[i : i + batch], part.x, part.label)  # (b, P)
                    for j in range(0, n_test, chunk):
                        logits = forward(tuned, x_test[j : j + chunk])  # (b, n, C)
                        cols.append(all_objectives(logits.float(), y_test[j : j + chunk], names))
                out.append(torch.cat(cols, dim=-1) - base[:, None, :])
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
        p = fast_learn(net, final, syn.x, syn.label, syn.weight[u], steps, lr)
        with torch.no_grad():
            rows.append(all_objectives(net.logits(p, x_test), y_test, names) - base)
    return torch.stack(rows, dim=1).float()

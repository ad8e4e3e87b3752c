"""What an audit will cost, said before it is spent: DDM's distillation in trainings against exact
leave-one-out retraining of every unit (`--method exact`), and the break-even number of units.

Both methods train the model once and check its stability; `--method exact` then retrains once per
unit, DDM distils once (a cost that does not grow with the number of units U) and runs the online
stage (about 1% of a training per unit, left out here). So DDM is the cheaper one above
U = its distillation in trainings: the break-even number of units.

One training is T = epochs x ceil(N / batch) SGD steps at the rate `time_kernels` times on this
device: a warm retraining, what `--method exact` pays per unit. (The run's `train_and_units`
stage also pays one-off start-up, the first torch.func call's imports and k-means: on digits
2.1 s against 0.22 s for the training itself, so dividing by it understates distillation ~10x.)

The estimate counts what `ddm_ray.distillation` runs for the basis method, each piece from
kernels timed on one training batch at the final model:

* subspace: per-sample gradients of the M probes;
* influence (blend and influence targets): the projected Hessian, k directions over the N
  training samples at the adjoint's rate per direction, and N per-sample gradients;
* unrolled, adjoint solver: every step of the unrolled epochs replayed (one SGD step) plus one
  adjoint step (a fused forward-over-reverse pass) over the k_u adjoint directions; forward
  solver: a training plus, per unrolled step, a per-sample-gradient pass and U + 1 HVPs;
* calibration (blend with fitted lengths): min(calibration units, U) exact retrainings.

k is the most directions the subspace may keep, min(probe rank, M); the energy rule often keeps
fewer (digits: 96 of 256), so the unrolled and influence pieces are upper estimates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad

from ddm_ray.config import RunConfig
from ddm_ray.core.adjoint import _hvp_and_directional
from ddm_ray.core.models import Network, flatten
from ddm_ray.core.probe import per_sample_grads
from ddm_ray.core.training import batch_loss, sgd_step
from ddm_ray.distillation import (
    calibration_count,
    fitted_pieces,
    has_convolutions,
    unrolled_rank_for,
    unrolled_solver,
)
from ddm_ray.offline import Offline

ADJOINT_CHUNK = 128  # the adjoint's vmap chunk of directions (`core.adjoint.adjoint_unrolled`)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _interleaved_seconds(
    kernels: dict[str, tuple[Callable[[], Any], int]], dev: torch.device, min_total_s: float = 0.5, rounds: int = 5,
) -> dict[str, float]:
    """Mean seconds per call of each kernel {name: (fn, calls per round)}, each called once untimed
    first (warm-up), then timed in interleaved rounds until min_total_s or `rounds` rounds: on a
    shared machine every kernel sees the same contention, so their ratios hold."""
    for fn, _n in kernels.values():
        fn()
    _sync(dev)
    spent = dict.fromkeys(kernels, 0.0)
    calls = dict.fromkeys(kernels, 0)
    for _ in range(rounds):
        for name, (fn, n) in kernels.items():
            t0 = time.perf_counter()
            for _i in range(n):
                fn()
            _sync(dev)
            spent[name] += time.perf_counter() - t0
            calls[name] += n
        if sum(spent.values()) >= min_total_s:
            break
    return {name: spent[name] / calls[name] for name in kernels}


def probe_count(cfg: RunConfig, n_train: int, n_test: int) -> int:
    """M: the most probes the pool draws (`core.probe.probe_pool`)."""
    d = cfg.distill
    return (min(d.probe_samples, n_train) if d.probe_pool != "test" else 0) + (
        min(d.probe_samples, n_test) if d.probe_pool != "train" else 0)


def subspace_ranks(
    cfg: RunConfig, n_train: int, n_test: int, n_params: int, convolutions: bool = False,
) -> tuple[int, int]:
    """(k, k_u): the most directions the subspace may keep and the adjoint's share of them."""
    k = max(1, min(cfg.distill.probe_rank, probe_count(cfg, n_train, n_test), n_params))
    return k, unrolled_rank_for(cfg.distill, k, convolutions)


def time_kernels(cfg: RunConfig, off: Offline, device: str = "cpu") -> dict[str, float]:
    """Seconds of the kernels distillation repeats, on one training batch at the final model: an
    SGD step (what a training and the adjoint's replay repeat), a per-sample-gradient pass, and
    one step of the adjoint (`core.adjoint.adjoint_unrolled`) over `directions` directions (k_u,
    or k for the influence target alone). A plain function an executor runs where the offline
    stage runs (`Executor.call`)."""
    ds, dev = off.dataset, torch.device(device)
    net = Network(cfg.model, ds.input_shape, ds.num_classes)
    net.module.to(dev)
    theta = {k: v.to(dev) for k, v in off.traj.final.items()}
    n_params = int(flatten(theta).numel())
    b = min(cfg.train.batch_size, int(ds.y_train.numel()))
    xb, yb = ds.x_train[:b].to(dev), ds.y_train[:b].to(dev)
    idx = torch.arange(b, device=dev)
    g_fn = grad(lambda p, xs, ys, nom: batch_loss(net, p, xs, ys, nom))
    convs = has_convolutions(net)
    k, ku = subspace_ranks(cfg, int(ds.y_train.numel()), int(ds.y_test.numel()), n_params, convs)
    if cfg.distill.target != "influence" and ku > 0:
        r = ku  # the adjoint's own pass
    elif cfg.distill.curvature == "hessian":
        r = min(k, ADJOINT_CHUNK)  # the projected Hessian's HVPs run at the same rate per direction
    else:
        r = 2  # nothing runs HVPs (the Gauss-Newton curvature): a token pass, not the cost of a real one

    a = torch.randn(r, n_params, generator=torch.Generator().manual_seed(0)).to(dev) / n_params**0.5
    b_state, c = torch.zeros_like(a), torch.zeros(b, r, device=dev)
    lr = cfg.train.lr

    def adjoint_step(rows: int) -> None:  # one step of the adjoint's backward loop, as it runs there
        z = lr * a[:rows] - b_state[:rows]
        hz, dper = _hvp_and_directional(net, theta, xb, yb, b, ADJOINT_CHUNK)(z)
        c[:, :rows].index_add_(0, idx, dper.T)
        _ = a[:rows] - hz

    adjoint_step(min(2, r))  # the first vmapped pass imports torch.func's lazy modules: not timed
    t = _interleaved_seconds({
        "step_s": (lambda: sgd_step(g_fn, theta, None, xb, yb, idx, b, cfg.train), 10),
        "per_sample_s": (lambda: per_sample_grads(net, theta, xb, yb), 1),
        "adjoint_step_s": (lambda: adjoint_step(r), 1),
    }, dev)
    return {"batch": float(b), **t, "adjoint_directions": float(r), "convolutions": float(convs),
            "num_classes": float(ds.num_classes)}


def break_even_units(distill_trainings: float) -> int:
    """The fewest units at which DDM's whole run costs less than retraining every unit exactly:
    U > distillation in trainings (both train once; the online stage is left out)."""
    return max(1, math.ceil(distill_trainings))


def training_seconds(cfg: RunConfig, n_train: int, kernels: dict[str, float]) -> float:
    """One warm training: T SGD steps at the timed rate (what exact retraining pays per unit)."""
    return cfg.train.epochs * math.ceil(n_train / cfg.train.batch_size) * kernels["step_s"]


def estimate_cost(
    cfg: RunConfig, n_train: int, n_test: int, n_units: int, n_params: int, kernels: dict[str, float],
) -> dict[str, Any]:
    """DDM's distillation in trainings, estimated from `time_kernels`' figures (see the module
    docstring for what it counts), with the break-even number of units; JSON-ready."""
    d, t = cfg.distill, cfg.train
    spe = math.ceil(n_train / t.batch_size)
    steps = t.epochs * spe
    step_s, ps_s = kernels["step_s"], kernels["per_sample_s"]
    adjoint_s = kernels["adjoint_step_s"]
    rate = adjoint_s / max(1.0, kernels["adjoint_directions"])  # one direction on one batch
    one = training_seconds(cfg, n_train, kernels)
    convs = bool(kernels.get("convolutions", 0.0))
    k, ku = subspace_ranks(cfg, n_train, n_test, n_params, convs)
    m = probe_count(cfg, n_train, n_test)
    seconds: dict[str, float] = {"subspace": math.ceil(m / t.batch_size) * ps_s}
    if d.target in ("influence", "blend"):
        if d.curvature == "ggn":  # C per-sample-gradient passes over the curvature's samples
            curv = int(kernels.get("num_classes", 10)) * math.ceil(min(d.curvature_samples, n_train) / t.batch_size) * ps_s
        else:
            curv = spe * k * rate
        seconds["influence"] = curv + spe * ps_s
    solver = None
    if d.target != "influence" and ku > 0:
        unrolled = t.epochs if d.unroll_epochs is None else min(d.unroll_epochs, t.epochs)
        solver = unrolled_solver(d.target_solver, n_units, ku)
        if solver == "adjoint":
            seconds["unrolled"] = unrolled * spe * (step_s + (adjoint_s if ku == kernels["adjoint_directions"]
                                                              else ku * rate))
        else:
            seconds["unrolled"] = steps * step_s + unrolled * spe * (ps_s + (n_units + 1) * rate)
    if d.target == "blend" and d.blend_weight is None:
        pieces = fitted_pieces(ku > 0)  # a blend target here: unrolled unless the adjoint has no directions
        seconds["calibration"] = calibration_count(n_units, d.calibration_units, pieces) * steps * step_s
    total = sum(seconds.values())
    trainings = total / one
    return {
        "distill_trainings": round(trainings, 2),
        "break_even_units": break_even_units(trainings),
        "distill_seconds": round(total, 2),
        "training_seconds": round(one, 3),
        "pieces_trainings": {name: round(s / one, 3) for name, s in seconds.items()},
        "directions_at_most": k,
        "unrolled_directions_at_most": None if solver is None else ku,
        "solver": solver,
        "kernels_seconds": {name: round(v, 6) for name, v in kernels.items()},
        "counts": "distillation only (subspace, influence, unrolled target, calibration retrainings), at the most "
                  "directions the subspace may keep; not training or the stability check (both methods run "
                  "them) nor the online stage",
    }


def cost_lines(estimate: dict[str, Any], n_units: int, method: str) -> tuple[str, str | None]:
    """(the estimate's log line, a warning when the other method is the cheaper one, else None)."""
    d, be = estimate["distill_trainings"], estimate["break_even_units"]
    pieces = ", ".join(f"{n} {v:.1f}" for n, v in estimate["pieces_trainings"].items())
    line = (f"cost estimate: DDM's distillation about {d:.1f} trainings ({pieces}; at most "
            f"{estimate['directions_at_most']} directions), exact retraining 1 training per unit: "
            f"break-even at about {be} units; this run has {n_units}")
    if method == "ddm" and n_units < be:
        return line, (f"warning: {n_units} units is below the break-even of about {be} units: exact leave-one-out "
                      "retraining is cheaper here (and exact); rerun with --method exact")
    if method == "exact" and n_units > be:
        return line, (f"note: {n_units} units is above the break-even of about {be} units: --method ddm would be "
                      "cheaper (check its fidelity with ddm-ray validate)")
    return line, None

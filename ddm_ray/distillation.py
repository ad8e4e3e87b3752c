"""Distillation, wherever its shards run: the probe subspace, the leave-one-out targets, the
blend calibration and the synsets (the math is in `ddm_ray.core`).

`distill_synsets` drives it; shards (`Shard`: probe-direction ranges for the adjoint, unit ranges
for the forward unroll, class ranges for the paper-style methods) run through an executor's
`distill`, and every finished piece can be saved and reloaded for resume.

Progress (`engine.progress`): the driver counts finished pieces (shards, or classes for the
paper-style methods, whose shards hand out a piece per class) with rate and ETA; inside a shard,
wherever it runs, the adjoint reports the epochs of its backward pass, and the blend calibration
its exact retrainings. The forward unroll reports only when its shard is done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ddm_ray.config import RunConfig
from ddm_ray.core.adjoint import adjoint_unrolled
from ddm_ray.core.distill import basis_synset, distill_class
from ddm_ray.core.metrics import pearson, spearman
from ddm_ray.core.models import Network, Params, flatten
from ddm_ray.core.online import base_objectives, evaluate_units
from ddm_ray.core.probe import ProbeBasis, probe_basis, select_probes
from ddm_ray.core.synset import Synset
from ddm_ray.core.targets import (
    InfluencePieces,
    blend,
    forward_unrolled_projected,
    influence_pieces,
    influence_target,
)
from ddm_ray.core.training import Trajectory, retrain_without
from ddm_ray.engine.progress import Progress
from ddm_ray.errors import NonFiniteError
from ddm_ray.offline import Offline

T = TypeVar("T")
_log = logging.getLogger(__name__)


@dataclass
class DistillJob:
    """Everything a distillation shard needs; shipped once to each worker.

    directions (P, k): the probe subspace V (basis method), None for per-class methods."""

    cfg: RunConfig
    input_shape: tuple[int, ...]
    num_classes: int
    params0: Params
    traj: Trajectory
    x_train: torch.Tensor
    y_train: torch.Tensor
    unit_of: torch.Tensor
    unit_label: torch.Tensor
    directions: torch.Tensor | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class Shard:
    """One piece of distillation work, named by what it covers (so its file name is fixed).

    kind "columns": the unrolled target's probe directions lo..hi-1 for every unit (adjoint);
    kind "units": the unrolled target of units lo..hi-1 (forward unroll);
    kind "classes": the per-unit synsets of the classes lo..hi-1 (soft_label / literal)."""

    kind: str
    lo: int
    hi: int

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.lo:06d}-{self.hi:06d}"


def split_range(n: int, parts: int, min_size: int = 1) -> list[tuple[int, int]]:
    """[0, n) in at most `parts` contiguous, near-equal ranges of at least min_size each."""
    parts = max(1, min(parts, n // max(1, min_size) or 1, n or 1))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def plan_shards(cfg: RunConfig, num_units: int, num_classes: int, rank: int, workers: int) -> list[Shard]:
    """The distillation shards for `workers` actors (any number: none is tied to a class)."""
    d = cfg.distill
    if d.method != "basis":
        return [Shard("classes", a, b) for a, b in split_range(num_classes, workers)]
    if d.target == "influence":
        return []
    if unrolled_solver(d.target_solver, num_units, rank) == "adjoint":
        # a shard replays training once for its directions: keep >= 8 directions per replay
        return [Shard("columns", a, b) for a, b in split_range(rank, workers, min_size=8)]
    return [Shard("units", a, b) for a, b in split_range(num_units, workers)]


def unrolled_solver(choice: str, num_units: int, rank: int) -> str:
    """auto: the forward unroll costs one HVP per unit and step plus a per-sample-gradient pass, the
    adjoint one fused pass per direction; measured on 2 CPU cores (MLP, P = 21k, batch 100), the
    forward unroll is the cheaper only below about half as many units as directions."""
    if choice != "auto":
        return choice
    return "forward" if 2 * num_units < rank else "adjoint"


def distill_shard(job: DistillJob, shard: Shard) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """One shard in, its finished pieces out as (key, tensors), yielded as each finishes."""
    cfg = job.cfg
    dev = torch.device(job.device)
    net = Network(cfg.model, job.input_shape, job.num_classes)
    net.module.to(dev)
    x, y = job.x_train.to(dev), job.y_train.to(dev)
    traj = Trajectory(
        [{n: t.to(dev) for n, t in p.items()} for p in job.traj.checkpoints], job.traj.steps_per_epoch,
        None if job.traj.velocities is None else [{n: t.to(dev) for n, t in p.items()} for p in job.traj.velocities],
    )
    if shard.kind == "classes":  # a piece per class: the driver counts them as they arrive
        for c in range(shard.lo, shard.hi):
            uids = torch.nonzero(job.unit_label == c).flatten().tolist()
            members = [torch.nonzero(job.unit_of == u).flatten().to(dev) for u in uids]
            syn = distill_class(net, traj, c, uids, members, x, y, cfg.distill)
            yield f"class-{c:06d}", syn.to_dict()
        return
    if job.directions is None:
        raise ValueError(f"shard {shard.key} needs the probe subspace")
    v = job.directions.to(dev)
    n_units = int(job.unit_label.numel())
    if shard.kind == "columns":
        unroll = cfg.distill.unroll_epochs
        epochs = cfg.train.epochs if unroll is None else max(0, min(unroll, cfg.train.epochs))
        with Progress(epochs, what=f"distill {shard.key} (adjoint)", unit="epochs", logger=_log) as bar:
            c = adjoint_unrolled(
                net, traj, x, y, job.unit_of.to(dev), n_units, cfg.train, v[:, shard.lo : shard.hi],
                cfg.distill.unroll_epochs, on_epoch=bar.set,
            )
    elif shard.kind == "units":
        c = forward_unrolled_projected(
            net, {n: t.to(dev) for n, t in job.params0.items()}, x, y, job.unit_of.to(dev),
            range(shard.lo, shard.hi), cfg.train, v, cfg.distill.unroll_epochs,
        )
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}")
    yield shard.key, {"c": c.cpu()}


def assemble_unrolled(shards: list[Shard], pieces: dict[str, dict[str, torch.Tensor]], num_units: int, rank: int) -> torch.Tensor:
    """c (U, k) from the finished column or unit shards."""
    c = torch.zeros(num_units, rank)
    for sh in shards:
        part = pieces[sh.key]["c"]
        if sh.kind == "columns":
            c[:, sh.lo : sh.hi] = part
        else:
            c[sh.lo : sh.hi] = part
    return c


DistillFn = Callable[[DistillJob, list[Shard]], Iterator[tuple[str, dict[str, torch.Tensor]]]]


LoadPiece = Callable[[str], "dict[str, torch.Tensor] | None"]


SavePiece = Callable[[str, dict[str, torch.Tensor]], None]


def memory_estimate(cfg: RunConfig, off: Offline, rank: int, shards: list[Shard]) -> str:
    """What distillation holds at its peak (float32 bytes), logged before it starts."""
    p = int(flatten(off.traj.final).numel())
    m = min(cfg.distill.probe_samples, int(off.dataset.y_train.numel()))
    subspace = 4 * (2 * m * p + p * rank) + 8 * m * m
    widest = max((sh.hi - sh.lo for sh in shards if sh.kind == "columns"), default=0)
    units = max((sh.hi - sh.lo for sh in shards if sh.kind == "units"), default=0)
    shard = 4 * p * (3 * widest + 2 * (units + 1) + off.traj.steps_per_epoch + cfg.train.batch_size)
    return f"distill memory estimate: {subspace / 2**20:.0f} MiB (subspace), {shard / 2**20:.0f} MiB per shard"


def subspace_of(cfg: RunConfig, off: Offline, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The probe subspace, and the influence target's pieces when the target needs them, computed
    on `device`; CPU tensors out."""
    d, ds = cfg.distill, off.dataset
    dev = torch.device(device)
    net = Network(cfg.model, ds.input_shape, ds.num_classes)
    net.module.to(dev)
    final = {k: v.to(dev) for k, v in off.traj.final.items()}
    x, y = ds.x_train.to(dev), ds.y_train.to(dev)
    index = select_probes(ds.y_train, ds.num_classes, d.probe_samples, d.seed)
    basis = probe_basis(net, final, x, y, index, d.probe_rank, d.probe_norm)
    state = {"index": basis.index, "v": basis.v, "coef": basis.coef, "lam": basis.lam}
    if d.target in ("influence", "blend"):
        pieces = influence_pieces(
            net, final, x, y, off.units.unit_of.to(dev), off.units.num_units, basis.v, cfg.train.weight_decay,
        )
        state.update({"h": pieces.h, "g": pieces.g})
    return {k: v.cpu() for k, v in state.items()}


def call_here(fn: Callable[..., T], *args: Any) -> T:
    """Run fn(*args, device="cpu") in this process: the default `call` of `distill_synsets`."""
    return fn(*args, device="cpu")


def _check_piece(key: str, piece: dict[str, torch.Tensor]) -> None:
    for name, t in piece.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"distill: non-finite {name} in {key}; lower --lr or normalise the inputs")


BLEND_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def calibration_units(num_units: int, n: int, seed: int) -> list[int]:
    """A seeded sample of n units (ascending), the same for every run of a config."""
    gen = torch.Generator().manual_seed(seed + 4_242)
    return sorted(torch.randperm(num_units, generator=gen)[: min(n, num_units)].tolist())


def exact_loss_deltas(cfg: RunConfig, off: Offline, units: list[int], device: str = "cpu") -> torch.Tensor:
    """Exact leave-one-out Δ test loss of `units` by retraining: (len(units), N_test), CPU."""
    ds, dev = off.dataset, torch.device(device)
    net = Network(cfg.model, ds.input_shape, ds.num_classes)
    net.module.to(dev)
    p0 = {k: v.to(dev) for k, v in off.params0.items()}
    x, y, xt, yt = ds.x_train.to(dev), ds.y_train.to(dev), ds.x_test.to(dev), ds.y_test.to(dev)
    base = base_objectives(net, {k: v.to(dev) for k, v in off.traj.final.items()}, xt, yt, ("loss",))[0]
    rows = []
    with Progress(len(units), what="blend calibration", unit="retrainings", logger=_log) as bar:
        for u in units:
            p = retrain_without(net, p0, x, y, cfg.train, off.units.unit_of == u)
            rows.append(base_objectives(net, p, xt, yt, ("loss",))[0] - base)
            bar.update(1)
    return torch.stack(rows).cpu()


def calibrate_blend(
    cfg: RunConfig, off: Offline, basis: ProbeBasis, unrolled: torch.Tensor, influence: torch.Tensor,
    call: Callable[..., Any],
) -> tuple[float, dict[str, float]]:
    """The unrolled weight of BLEND_GRID whose rows agree best with exact retraining of a few
    seeded units (mean of Pearson and Spearman of Δ test loss); ties go to the unrolled side.

    The influence target assumes a converged model; the unrolled target models the run that
    happened. Which mix is more faithful depends on the model, so it is measured, not assumed."""
    d, ds = cfg.distill, off.dataset
    units = calibration_units(off.units.num_units, d.calibration_units, d.seed)
    exact = call(exact_loss_deltas, cfg, off, units)
    idx = torch.tensor(units)
    scores: dict[str, float] = {}
    for w in BLEND_GRID:
        syn = basis_synset(basis, idx, blend(unrolled[idx], influence[idx], w), cfg.online.lr, d.ridge, ds.num_classes)
        got = evaluate_units(off.net, off.traj.final, syn, ds.x_test, ds.y_test, ("loss",), 1, cfg.online.lr)[0]
        p, s = float(pearson(got, exact)), float(spearman(got, exact))
        scores[str(w)] = round(0.5 * (p + s), 6) if p == p and s == s else -2.0
    best = max(BLEND_GRID, key=lambda w: (round(scores[str(w)], 3), w))
    return best, scores


def distill_synsets(
    cfg: RunConfig,
    off: Offline,
    distill: DistillFn,
    n_shards: int,
    load: LoadPiece | None = None,
    save: SavePiece | None = None,
    log: Callable[[str], None] | None = None,
    timings: dict[str, float] | None = None,
    info: dict[str, Any] | None = None,
    call: Callable[..., Any] = call_here,
) -> Synset:
    """Every unit's synset. Shards run through `distill` (an executor's); finished pieces are
    saved with `save` and, on resume, reloaded with `load` instead of being recomputed. `info`
    receives what was done (method, target, solver, subspace rank, shards) for the manifest.
    `call(fn, *args)` runs the one-process subspace stage (an executor's: on a GPU when there is one)."""
    ds, d = off.dataset, cfg.distill
    log = log or _log.info
    load = load or (lambda key: None)
    save = save or (lambda key, piece: None)
    basis = pieces = None
    if d.method == "basis":
        state = load("subspace")
        if state is None:
            t0 = time.perf_counter()
            log(f"distill: probe subspace ({d.probe_samples} probe samples, rank {d.probe_rank})")
            state = call(subspace_of, cfg, off)
            _check_piece("subspace", state)
            save("subspace", state)
            if timings is not None:
                timings["distill_subspace"] = round(time.perf_counter() - t0, 3)  # part of "distill"
            log(f"distill: probe subspace in {time.perf_counter() - t0:.1f}s")
        index = state["index"]
        basis = ProbeBasis(index, ds.x_train[index], ds.y_train[index], state["v"], state["coef"], state["lam"])
        pieces = InfluencePieces(state["h"], state["g"]) if "h" in state else None
    rank = 0 if basis is None else basis.rank
    shards = plan_shards(cfg, off.units.num_units, ds.num_classes, rank, n_shards)
    if info is not None:
        info.update({"method": d.method, "shards": len(shards)})
        if basis is not None:
            info.update({"target": d.target, "probe_samples": int(basis.index.numel()), "probe_rank": rank,
                         "solver": None if d.target == "influence"
                         else unrolled_solver(d.target_solver, off.units.num_units, rank)})
    log(memory_estimate(cfg, off, rank, shards) + f"; {len(shards)} shard(s)")
    have = {sh.key: got for sh in shards if (got := load(sh.key)) is not None}
    missing = [sh for sh in shards if sh.key not in have]
    if missing:
        job = DistillJob(
            cfg, ds.input_shape, ds.num_classes, off.params0, off.traj, ds.x_train, ds.y_train,
            off.units.unit_of, off.units.label, None if basis is None else basis.v,
        )
        classes = all(sh.kind == "classes" for sh in missing)
        pieces_due = sum(sh.hi - sh.lo for sh in missing) if classes else len(missing)
        with Progress(pieces_due, what="distill", unit="classes" if classes else "shards", logger=_log) as bar:
            for key, piece in distill(job, missing):
                _check_piece(key, piece)
                save(key, piece)
                have[key] = piece
                bar.update(1)
    if basis is None:
        syn = Synset.concat([Synset.from_dict(have[f"class-{c:06d}"]) for c in range(ds.num_classes)])
        order = torch.argsort(syn.unit_ids)
        syn = Synset(syn.unit_ids[order], syn.x, syn.label, syn.weight[order])
    else:
        unrolled = assemble_unrolled(shards, have, off.units.num_units, rank) if d.target != "influence" else None
        influence = None if pieces is None else influence_target(pieces, d.influence_damping)
        weight = d.blend_weight
        if d.target == "blend" and weight is None and unrolled is not None and influence is not None:
            t0 = time.perf_counter()
            log(f"distill: calibrating the blend on {d.calibration_units} exact retrainings")
            weight, scores = calibrate_blend(cfg, off, basis, unrolled, influence, call)
            log(f"blend calibrated on {d.calibration_units} exact retrainings: unrolled weight {weight}")
            if info is not None:
                info.update({"blend_weight": weight, "blend_calibration": scores})
            if timings is not None:
                timings["distill_calibration"] = round(time.perf_counter() - t0, 3)  # part of "distill"
        c = blend(unrolled, influence, 1.0 if weight is None else weight)
        syn = basis_synset(basis, torch.arange(off.units.num_units), c, cfg.online.lr, d.ridge, ds.num_classes)
    problem = syn.check(ds.input_shape, ds.num_classes)
    if problem is not None:
        raise NonFiniteError(f"distill: {problem}; lower --lr or normalise the inputs")
    return syn

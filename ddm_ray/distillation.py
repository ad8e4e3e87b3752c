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

from ddm_ray.config import DistillConfig, RunConfig
from ddm_ray.core.adjoint import adjoint_unrolled
from ddm_ray.core.distill import basis_synset, distill_class
from ddm_ray.core.metrics import pearson, spearman
from ddm_ray.core.models import Network, Params, flatten
from ddm_ray.core.online import base_objectives, evaluate_units
from ddm_ray.core.probe import ProbeBasis, probe_basis, probe_pool
from ddm_ray.core.synset import Synset
from ddm_ray.core.targets import (
    InfluencePieces,
    blend,
    curvature_work,
    fit_target,
    forward_unrolled_projected,
    influence_pieces,
    influence_target,
    target_features,
)
from ddm_ray.core.training import Trajectory, retrain_without
from ddm_ray.data import Dataset
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
    if d.target == "influence" or rank == 0:  # no unrolled target (unrolled rank 0: no adjoint)
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
    d, ds = cfg.distill, off.dataset
    m = (min(d.probe_samples, int(ds.y_train.numel())) if d.probe_pool != "test" else 0) + (
        min(d.probe_samples, int(ds.y_test.numel())) if d.probe_pool != "train" else 0)
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
    index, test_index = probe_pool(ds.y_train, ds.y_test, ds.num_classes, d.probe_samples, d.seed, d.probe_pool)
    basis = probe_basis(net, final, x, y, index, d.probe_rank, d.probe_norm, energy=d.probe_energy,
                        x_test=ds.x_test.to(dev), y_test=ds.y_test.to(dev), test_index=test_index)
    state = {"index": basis.index, "test_index": test_index, "v": basis.v, "coef": basis.coef, "lam": basis.lam,
             "energy": torch.tensor(basis.energy)}
    if d.target in ("influence", "blend"):
        n = int(y.shape[0])
        curv = d.curvature
        work = curvature_work(curv, n, basis.rank, ds.num_classes, d.curvature_samples)
        what = ("Hessian-vector products" if curv == "hessian" else "Gauss-Newton per-sample gradients")
        with Progress(work + n, what=f"distill: influence ({what}, then unit gradients)", unit="passes",
                      logger=_log) as bar:
            pieces = influence_pieces(
                net, final, x, y, off.units.unit_of.to(dev), off.units.num_units, basis.v, cfg.train.weight_decay,
                progress=bar.update, curvature=curv, samples=d.curvature_samples, seed=d.seed,
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


def _subspace_problem(state: dict[str, Any], target: str, n_params: int, ds: Dataset) -> str | None:
    """A one-line reason when a reloaded subspace piece is not `subspace_of`'s for this model and
    data (keys, shapes, finite values), else None."""
    need = ("index", "v", "coef", "lam") + (("h", "g") if target in ("influence", "blend") else ())
    missing = [k for k in need if not isinstance(state.get(k), torch.Tensor)]
    if missing:
        return f"no {', '.join(missing)}"
    v, index = state["v"], state["index"]
    if v.ndim != 2 or v.shape[0] != n_params or v.shape[1] < 1:
        return f"directions of shape {tuple(v.shape)}, the model has {n_params} parameters"
    n_train = int(ds.y_train.numel())
    if index.dtype != torch.int64 or index.ndim != 1 or (index.numel() and not 0 <= int(index.min()) <= int(index.max()) < n_train):
        return "probe indices do not fit the training data"
    k = int(v.shape[1])
    if "h" in state and (tuple(state["h"].shape) != (k, k) or state["g"].ndim != 2 or state["g"].shape[1] != k):
        return "influence pieces do not fit the directions"
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"non-finite {name}"
    return None


def _shard_problem(sh: Shard, piece: dict[str, Any], num_units: int, urank: int) -> str | None:
    """A one-line reason when a reloaded target shard does not have the shape `distill_shard`
    gives it, else None (class shards are checked as synsets)."""
    if sh.kind == "classes":
        return None
    c = piece.get("c")
    want = (num_units, sh.hi - sh.lo) if sh.kind == "columns" else (sh.hi - sh.lo, urank)
    if not isinstance(c, torch.Tensor) or tuple(c.shape) != want:
        return f"no target of shape {want}"
    if not bool(torch.isfinite(c).all()):
        return "non-finite target"
    return None


SCALE_CALIBRATION_UNITS = 4


def fitted_pieces(has_unrolled: bool) -> int:
    """How many lengths `calibrate_target` fits: 3 with an unrolled target (unrolled; influence on
    the adjoint's directions; influence on the rest), 1 with the influence target alone."""
    return 3 if has_unrolled else 1


def calibration_units(num_units: int, n: int, seed: int, pieces: int = 3) -> list[int]:
    """A seeded sample of `calibration_count` units (ascending), the same for every run of a
    config (a smaller count takes a prefix of the same draw)."""
    gen = torch.Generator().manual_seed(seed + 4_242)
    return sorted(torch.randperm(num_units, generator=gen)[: calibration_count(num_units, n, pieces)].tolist())


def calibration_count(num_units: int, n: int, pieces: int = 3) -> int:
    """How many units `calibration_units` retrains: n, at most a quarter of them (at least 2),
    and at most SCALE_CALIBRATION_UNITS when the target has one piece: one length is a scale
    (it moves no correlation, only the rows' size), and 4 units measure it (on the digits
    ConvNet, 4, 8 and 16 units gave Pearson 0.787, 0.791, 0.782)."""
    if pieces <= 1:
        n = min(n, SCALE_CALIBRATION_UNITS)
    return min(n, max(2, num_units // 4), num_units)


def exact_loss_deltas(
    cfg: RunConfig, off: Offline, units: list[int], directions: torch.Tensor, device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact leave-one-out of `units` by retraining: their Δ test loss (len(units), N_test) and the
    coordinates V^T D_u (len(units), k) of each exact displacement on directions V (P, k); CPU."""
    ds, dev = off.dataset, torch.device(device)
    net = Network(cfg.model, ds.input_shape, ds.num_classes)
    net.module.to(dev)
    p0 = {k: v.to(dev) for k, v in off.params0.items()}
    final = {k: v.to(dev) for k, v in off.traj.final.items()}
    x, y, xt, yt = ds.x_train.to(dev), ds.y_train.to(dev), ds.x_test.to(dev), ds.y_test.to(dev)
    base = base_objectives(net, final, xt, yt, ("loss",))[0]
    v = directions.to(dev)
    rows, coords = [], []
    with Progress(len(units), what="blend calibration", unit="retrainings", logger=_log) as bar:
        for u in units:
            p = retrain_without(net, p0, x, y, cfg.train, off.units.unit_of == u)
            rows.append(base_objectives(net, p, xt, yt, ("loss",))[0] - base)
            coords.append((flatten(p) - flatten(final)) @ v)
            bar.update(1)
    return torch.stack(rows).cpu(), torch.stack(coords).cpu()


CONV_UNROLLED_RANK = 32


def unrolled_rank_of(d: DistillConfig, net: Network, rank: int) -> int:
    """How many leading directions of the rank-k subspace the adjoint runs on: `unrolled_rank`,
    or by default all k for a model without convolutions and CONV_UNROLLED_RANK with them: a
    vmapped convolution runs as a grouped one, about 2 training steps per direction and step."""
    return unrolled_rank_for(d, rank, has_convolutions(net))


def has_convolutions(net: Network) -> bool:
    return any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in net.module.modules())


def unrolled_rank_for(d: DistillConfig, rank: int, convolutions: bool) -> int:
    """`unrolled_rank_of` for a model that has (or has not) convolutions."""
    if d.unrolled_rank is not None:
        return min(rank, d.unrolled_rank)
    return min(rank, CONV_UNROLLED_RANK) if convolutions else rank


def calibrate_target(
    cfg: RunConfig, off: Offline, basis: ProbeBasis, unrolled: torch.Tensor | None, influence: torch.Tensor,
    call: Callable[..., Any],
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The target of every unit (U, k) with the lengths of its pieces fitted to a few seeded units
    retrained exactly (`core.targets.fit_target` against their V^T D), and what was fitted: the
    coefficients and, on those units, the agreement of the fitted rows with exact Δ test loss.

    Each estimate points the right way at its own wrong length (the unrolled one about half of
    V^T D on real MNIST, the damped influence one a fifth), and which mix is more faithful
    depends on the model and on how converged it is, so it is measured, not assumed."""
    d, ds = cfg.distill, off.dataset
    features = target_features(unrolled, influence, unrolled_rank_of(d, off.net, basis.rank))
    units = calibration_units(off.units.num_units, d.calibration_units, d.seed, fitted_pieces(unrolled is not None))
    exact, coords = call(exact_loss_deltas, cfg, off, units, basis.v)
    idx = torch.tensor(units)
    coef, c = fit_target(features, coords, idx)
    syn = basis_synset(basis, idx, c[idx], cfg.online.lr, d.ridge, ds.num_classes)
    got = evaluate_units(off.net, off.traj.final, syn, ds.x_test, ds.y_test, ("loss",), 1, cfg.online.lr)[0]
    p, s = float(pearson(got, exact)), float(spearman(got, exact))
    names = (["unrolled", "influence_on_unrolled_directions", "influence_on_the_rest"][: len(features)]
             if unrolled is not None else ["influence"])
    return c, {
        "blend_fit": {n: round(float(a), 6) for n, a in zip(names, coef, strict=True)},
        "blend_calibration": {"units": units, "pearson": round(p, 6) if p == p else None,
                              "spearman": round(s, 6) if s == s else None},
    }


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
    n_params = int(flatten(off.traj.final).numel())
    if d.method == "basis":
        state = load("subspace")
        if state is not None and (problem := _subspace_problem(state, d.target, n_params, ds)) is not None:
            log(f"resume: recomputing the probe subspace ({problem})")
            state = None
        if state is None:
            t0 = time.perf_counter()
            log(f"distill: probe subspace (pool {d.probe_pool}, at most {d.probe_samples} samples per source, "
                f"rank <= {d.probe_rank})")
            state = call(subspace_of, cfg, off)
            _check_piece("subspace", state)
            save("subspace", state)
            if timings is not None:
                timings["distill_subspace"] = round(time.perf_counter() - t0, 3)  # part of "distill"
            log(f"distill: probe subspace in {time.perf_counter() - t0:.1f}s")
        index, test_index = state["index"], state.get("test_index", torch.zeros(0, dtype=torch.int64))
        basis = ProbeBasis(
            index, torch.cat([ds.x_train[index], ds.x_test[test_index]]),
            torch.cat([ds.y_train[index], ds.y_test[test_index]]), state["v"], state["coef"], state["lam"],
            test_index, float(state["energy"]) if "energy" in state else float("nan"),
        )
        log(f"distill: probe subspace of rank {basis.rank} ({basis.energy:.3f} of the probe gradients' energy)")
        pieces = InfluencePieces(state["h"], state["g"]) if "h" in state else None
    rank = 0 if basis is None else basis.rank
    urank = unrolled_rank_of(d, off.net, rank)  # the adjoint's leading directions
    shards = plan_shards(cfg, off.units.num_units, ds.num_classes, urank, n_shards)
    if info is not None:
        info.update({"method": d.method, "shards": len(shards)})
        if basis is not None:
            info.update({"target": d.target, "probe_pool": d.probe_pool,
                         "probe_samples": int(basis.x.shape[0]), "probe_rank": rank,
                         "probe_energy": round(basis.energy, 6),
                         "unrolled_rank": None if d.target == "influence" else urank,
                         "solver": None if d.target == "influence" or urank == 0
                         else unrolled_solver(d.target_solver, off.units.num_units, urank)})
            if d.target != "unrolled":
                info["curvature"] = d.curvature
    log(memory_estimate(cfg, off, rank, shards) + f"; {len(shards)} shard(s)")
    have = {}
    for sh in shards:
        if (got := load(sh.key)) is None:
            continue
        if (problem := _shard_problem(sh, got, off.units.num_units, urank)) is not None:
            log(f"resume: recomputing distillation piece {sh.key} ({problem})")
            continue
        have[sh.key] = got
    missing = [sh for sh in shards if sh.key not in have]
    if missing:
        job = DistillJob(
            cfg, ds.input_shape, ds.num_classes, off.params0, off.traj, ds.x_train, ds.y_train,
            off.units.unit_of, off.units.label, None if basis is None else basis.v[:, :urank].contiguous(),
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
        unrolled = None
        if d.target != "influence" and urank > 0:
            unrolled = torch.zeros(off.units.num_units, rank)
            unrolled[:, :urank] = assemble_unrolled(shards, have, off.units.num_units, urank)
        influence = None if pieces is None else influence_target(pieces, d.influence_damping)
        if d.target == "blend" and d.blend_weight is None and influence is not None:
            t0 = time.perf_counter()
            n_cal = calibration_count(off.units.num_units, d.calibration_units, fitted_pieces(unrolled is not None))
            log(f"distill: fitting the targets' lengths on {n_cal} exact retrainings")
            c, fitted = calibrate_target(cfg, off, basis, unrolled, influence, call)
            log(f"targets fitted on {n_cal} exact retrainings: {fitted['blend_fit']} "
                f"(Δ loss on those units: pearson {fitted['blend_calibration']['pearson']}, "
                f"spearman {fitted['blend_calibration']['spearman']})")
            if info is not None:
                info.update(fitted)
            if timings is not None:
                timings["distill_calibration"] = round(time.perf_counter() - t0, 3)  # part of "distill"
        else:
            c = blend(unrolled, influence, 1.0 if d.blend_weight is None else d.blend_weight)
        syn = basis_synset(basis, torch.arange(off.units.num_units), c, cfg.online.lr, d.ridge, ds.num_classes)
    problem = syn.check(ds.input_shape, ds.num_classes)
    if problem is not None:
        raise NonFiniteError(f"distill: {problem}; lower --lr or normalise the inputs")
    return syn

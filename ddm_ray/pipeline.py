"""The DDM pipeline as plain functions, independent of where they execute.

offline: load data -> train with a trajectory -> units -> distill synsets per class shard
online:  blocks of units -> leave-one-out rows -> one Parquet part per block

An executor (`ddm_ray.engine`) decides where `distill_shard` and `run_block` run: in-process
(`LocalExecutor`) or as Ray actors and tasks. The driver never holds the attribution matrix.
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import torch

import ddm_ray
from ddm_ray.config import ExecConfig, RunConfig
from ddm_ray.core.adjoint import adjoint_unrolled
from ddm_ray.core.distill import basis_synset, distill_class
from ddm_ray.core.metrics import pearson, spearman
from ddm_ray.core.models import Network, Params, flatten
from ddm_ray.core.objectives import all_objectives
from ddm_ray.core.online import (
    available_memory_bytes,
    base_objectives,
    choose_online_batch,
    evaluate_units,
)
from ddm_ray.core.probe import ProbeBasis, probe_basis, select_probes
from ddm_ray.core.synset import Synset
from ddm_ray.core.targets import (
    InfluencePieces,
    blend,
    forward_unrolled_projected,
    influence_pieces,
    influence_target,
)
from ddm_ray.core.training import Trajectory, retrain_without, train
from ddm_ray.core.units import Units, make_units
from ddm_ray.data import Dataset, load_dataset
from ddm_ray.errors import InputError, NonFiniteError, RunStateError
from ddm_ray.store.lease import LEASE, Lease
from ddm_ray.store.run_store import TEST_INDEX_SCHEMA, UNITS_SCHEMA, RunStore, part_name

FORMAT_VERSION = 2  # 2: shared-pool synsets (artifacts/synset.pt), distillation pieces
T = TypeVar("T")


# ---- shared context ---------------------------------------------------------------------------
@dataclass
class Offline:
    """What the offline stage produces (and a resumed run reloads)."""

    dataset: Dataset
    net: Network
    params0: Params
    traj: Trajectory
    units: Units


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


@dataclass
class OnlineJob:
    """Everything an online block needs; put into the object store once."""

    cfg: RunConfig
    input_shape: tuple[int, ...]
    num_classes: int
    final: Params
    x_test: torch.Tensor
    y_test: torch.Tensor
    pool_x: torch.Tensor  # (M, *input_shape): the synsets' shared samples
    pool_label: torch.Tensor  # (M, C)
    store_url: str
    storage_options: dict[str, str] = field(default_factory=dict)
    online_batch: int | None = None  # None: chosen per worker from free device memory
    device: str = "cpu"


@dataclass(frozen=True)
class Block:
    """A contiguous range of units [first, last]; its synsets travel as their weight rows."""

    first: int
    last: int

    @property
    def part(self) -> str:
        return part_name(self.first, self.last)


# ---- plain stage functions ----------------------------------------------------------------------
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
    if shard.kind == "classes":
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
        c = adjoint_unrolled(
            net, traj, x, y, job.unit_of.to(dev), n_units, cfg.train, v[:, shard.lo : shard.hi],
            cfg.distill.unroll_epochs,
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


def online_batch_for(job: OnlineJob, net: Network, final: Params) -> tuple[int, int | None]:
    """(units per batched pass, test samples per forward chunk): --online-batch if given, else the
    largest that fits a quarter of the free memory of the worker's device."""
    n_test = int(job.x_test.shape[0])
    budget = available_memory_bytes(torch.device(job.device)) // 4
    pool = int(job.pool_x.shape[0])
    auto_b, chunk = choose_online_batch(net, final, n_test, pool, job.cfg.online.steps, budget)
    return (job.online_batch or auto_b), (None if chunk >= n_test else chunk)


@dataclass
class OnlineContext:
    """What every block of one online job shares: the network, the final weights, the test set and
    the synsets' sample pool on the device, and the base objectives. Built once per process."""

    net: Network
    final: Params
    x_test: torch.Tensor
    y_test: torch.Tensor
    pool_x: torch.Tensor
    pool_label: torch.Tensor
    base: torch.Tensor
    batch: tuple[int, int | None] | None = None  # (units per pass, test chunk), chosen on first use


def online_context(job: OnlineJob) -> OnlineContext:
    dev = torch.device(job.device)
    net = Network(job.cfg.model, job.input_shape, job.num_classes)
    net.module.to(dev)
    final = {k: v.to(dev) for k, v in job.final.items()}
    x_test, y_test = job.x_test.to(dev), job.y_test.to(dev)
    base = base_objectives(net, final, x_test, y_test, job.cfg.online.objectives)
    return OnlineContext(net, final, x_test, y_test, job.pool_x.to(dev), job.pool_label.to(dev), base)


def evaluate_block(job: OnlineJob, block: Block, weight: torch.Tensor, ctx: OnlineContext | None = None) -> pa.Table:
    """Leave-one-out rows for the units of a block: one row per (unit, objective).

    weight (B, M): the block's synset weight rows over the job's sample pool.
    ctx: the job's shared state from `online_context(job)`; built here when not given."""
    cfg = job.cfg
    ctx = ctx or online_context(job)
    unit_ids = torch.arange(block.first, block.last + 1)
    syn = Synset(unit_ids, ctx.pool_x, ctx.pool_label, weight.to(ctx.pool_x.device))
    names = cfg.online.objectives
    if ctx.batch is None:
        ctx.batch = online_batch_for(job, ctx.net, ctx.final)
    batch, chunk = ctx.batch
    deltas = evaluate_units(
        ctx.net, ctx.final, syn, ctx.x_test, ctx.y_test, names, cfg.online.steps, cfg.online.lr,
        batch=batch, base=ctx.base, precision=cfg.online.precision, test_chunk=chunk,
    ).cpu()  # (n_obj, U, N)
    if not bool(torch.isfinite(deltas).all()):
        raise NonFiniteError(
            f"online: non-finite deltas for units {block.first}-{block.last}; the synsets or the model "
            "diverged (lower --lr or --online-lr, or normalise the inputs)"
        )
    n_obj, n_units, n_test = deltas.shape
    unit_col = np.repeat(unit_ids.numpy(), n_obj)
    obj_col = np.tile(np.array(names, dtype=object), n_units)
    flat = deltas.permute(1, 0, 2).reshape(-1).numpy().astype(np.float32)
    offsets = np.arange(0, n_units * n_obj * n_test + 1, n_test, dtype=np.int32)
    delta_col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()))
    return pa.table({"unit_id": pa.array(unit_col, pa.int64()), "objective": pa.array(obj_col, pa.string()), "delta": delta_col})


def run_block(job: OnlineJob, block: Block, weight: torch.Tensor, ctx: OnlineContext | None = None) -> int:
    """Evaluate one block and write its Parquet part; returns the number of rows written."""
    table = evaluate_block(job, block, weight, ctx)
    RunStore(job.store_url, job.storage_options).write_part(block.first, block.last, table)
    return table.num_rows


class Executor(Protocol):
    """Where shards and blocks run. Implementations live in ddm_ray.engine."""

    def distill(
        self, job: DistillJob, shards: list[Shard]
    ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]: ...

    def evaluate(
        self, job: OnlineJob, blocks: list[tuple[Block, torch.Tensor]]
    ) -> Iterator[tuple[Block, int]]: ...

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args, device=...) where one-process heavy work belongs (training, k-means, the
        probe subspace): a GPU worker when the cluster has GPUs, else this process."""
        ...

    def describe(self) -> dict[str, Any]: ...


# ---- offline stage ------------------------------------------------------------------------------
def train_and_units(cfg: RunConfig, dataset: Dataset, device: str = "cpu") -> tuple[Params, Trajectory, Units]:
    """Train with a trajectory and split the classes into units, on `device`; CPU tensors out."""
    dev = torch.device(device)
    net = Network(cfg.model, dataset.input_shape, dataset.num_classes)
    net.module.to(dev)
    params0 = {k: v.to(dev) for k, v in net.init_params(cfg.train.seed).items()}
    x, y = dataset.x_train.to(dev), dataset.y_train.to(dev)
    traj = train(net, params0, x, y, cfg.train)
    if not all(bool(torch.isfinite(v).all()) for v in traj.final.values()):
        raise NonFiniteError(
            "training: the model diverged (non-finite parameters); lower --lr or normalise the inputs"
        )
    if cfg.units.features == "penultimate":
        with torch.no_grad():
            feats = net.features(traj.final, x)
    else:
        feats = x.reshape(x.shape[0], -1)
    units = make_units(
        feats, dataset.y_train, dataset.num_classes, cfg.units.clusters_per_class,
        cfg.units.kmeans_iters, cfg.units.seed, class_names=dataset.classes,
    )

    def cpu(p: Params) -> Params:
        return {k: v.cpu() for k, v in p.items()}

    traj = Trajectory(
        [cpu(p) for p in traj.checkpoints], traj.steps_per_epoch,
        None if traj.velocities is None else [cpu(p) for p in traj.velocities],
    )
    return cpu(params0), traj, units


def train_offline(cfg: RunConfig, dataset: Dataset, device: str = "cpu") -> Offline:
    """The offline stage's first half (see `train_and_units`) as an `Offline`."""
    params0, traj, units = train_and_units(cfg, dataset, device)
    return Offline(dataset, Network(cfg.model, dataset.input_shape, dataset.num_classes), params0, traj, units)


def units_table(off: Offline) -> pa.Table:
    ids = off.dataset.train_ids
    rows_members = [ids[off.units.members(u)].tolist() for u in range(off.units.num_units)]
    return pa.table(
        {
            "unit_id": pa.array(range(off.units.num_units), pa.int64()),
            "label": pa.array([off.dataset.classes[int(c)] for c in off.units.label], pa.int64()),
            "sample_ids": pa.array(rows_members, pa.list_(pa.int64())),
            "level": pa.array(["cluster"] * off.units.num_units, pa.string()),
        },
        schema=UNITS_SCHEMA,
    )


def test_index_table(dataset: Dataset) -> pa.Table:
    n = dataset.test_ids.numel()
    return pa.table(
        {"position": pa.array(range(n), pa.int64()), "test_id": pa.array(dataset.test_ids.tolist(), pa.int64())},
        schema=TEST_INDEX_SCHEMA,
    )


def versions() -> dict[str, str]:
    out = {
        "ddm_ray": ddm_ray.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "python": platform.python_version(),
    }
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def data_fingerprint(ds: Dataset) -> str:
    """sha256 (16 hex) of the loaded inputs, labels and ids of both splits."""
    h = hashlib.sha256()
    for t in (ds.x_train, ds.y_train, ds.train_ids, ds.x_test, ds.y_test, ds.test_ids):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    h.update(repr(ds.classes).encode())
    return h.hexdigest()[:16]


# ---- distillation, wherever its shards run ----------------------------------------------------------
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
    with torch.no_grad():
        base = all_objectives(net.logits({k: v.to(dev) for k, v in off.traj.final.items()}, xt), yt, ("loss",))[0]
    rows = []
    for u in units:
        p = retrain_without(net, p0, x, y, cfg.train, off.units.unit_of == u)
        with torch.no_grad():
            rows.append(all_objectives(net.logits(p, xt), yt, ("loss",))[0] - base)
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
    log = log or (lambda msg: None)
    load = load or (lambda key: None)
    save = save or (lambda key, piece: None)
    basis = pieces = None
    if d.method == "basis":
        state = load("subspace")
        if state is None:
            t0 = time.perf_counter()
            state = call(subspace_of, cfg, off)
            _check_piece("subspace", state)
            save("subspace", state)
            if timings is not None:
                timings["distill_subspace"] = round(time.perf_counter() - t0, 3)  # part of "distill"
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
        for key, piece in distill(job, missing):
            _check_piece(key, piece)
            save(key, piece)
            have[key] = piece
            log(f"distilled {key} ({len(have)}/{len(shards)})")
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


# ---- the run -------------------------------------------------------------------------------------
def _check_out(store: RunStore, cfg: RunConfig, resume: bool) -> dict[str, Any] | None:
    if not store.exists(RunStore.MANIFEST):
        if resume:
            raise RunStateError(f"{store.url}: nothing to resume (no manifest.json)")
        if [n for n in store.list("") if n != LEASE]:
            # a run deletes only what a manifest of its own says it wrote: never a stranger's files
            raise RunStateError(
                f"{store.url} is not empty and holds no ddm-ray run; choose an empty or new --out"
            )
        return None
    manifest = store.read_json(RunStore.MANIFEST)
    other = manifest.get("config_hash") if isinstance(manifest, dict) else None
    if other != cfg.hash():
        raise RunStateError(
            f"{store.url} holds a run of another config (hash {other}, this one is {cfg.hash()}); "
            "choose another --out or remove it"
        )
    return manifest


class Run:
    """Drives one run: offline stage, online stage, manifest. Used by the CLI and jobs/."""

    def __init__(
        self, cfg: RunConfig, exe: ExecConfig, out: str, executor: Executor, log: Any = None,
        progress: Callable[[int, int], Any] | None = None,
    ) -> None:
        """progress(total_rows, rows_already_done) -> object with update(rows) and close()."""
        self.cfg, self.exe, self.executor = cfg, exe, executor
        self.store = RunStore(out, exe.storage_options)
        self.log = log or (lambda msg: None)
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.manifest: dict[str, Any] = {}
        self.online_batch: int | None = exe.online_batch
        self.fingerprint: str | None = None
        self.distillation: dict[str, Any] = {}
        self.part_records: dict[str, Any] = {}  # part name -> rows, sha256, bytes (once complete)

    def _stage(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.perf_counter() - t0, 3)
        self.log(f"{name}: {self.timings[name]:.1f}s")

    def _write_manifest(self, status: str, counts: dict[str, int]) -> None:
        self.manifest = {
            "format": FORMAT_VERSION,
            "status": status,
            "config": self.cfg.to_dict(),
            "config_hash": self.cfg.hash(),
            "data_fingerprint": self.fingerprint,
            "versions": versions(),
            "timings_seconds": self.timings,
            "counts": counts,
            "parts": self.part_records,
            "distillation": self.distillation,
            "execution": {
                "engine": self.exe.engine,
                "online_batch": self.online_batch,
                "online_batch_mode": "fixed" if self.exe.online_batch else "auto (free memory)",
                "block_units": self.exe.block_units,
                **self.executor.describe(),
            },
        }
        self.store.write_json(RunStore.MANIFEST, self.manifest)

    def _load(self) -> Dataset:
        """Load and check the data before anything is written to the output folder."""
        t0 = time.perf_counter()
        dataset = load_dataset(self.cfg.data, self.exe.storage_options)
        k = self.cfg.units.clusters_per_class
        counts = torch.bincount(dataset.y_train, minlength=dataset.num_classes)
        small = [(dataset.classes[c], int(n)) for c, n in enumerate(counts) if n < k]
        if small:
            label, n = small[0]
            raise InputError(
                f"class {label} has {n} training samples, fewer than --clusters-per-class {k}"
            )
        self._stage("load_data", t0)
        return dataset

    def _offline(self, dataset: Dataset, resume: bool) -> Offline:
        if resume and self.store.exists(RunStore.MODEL):
            state = self.store.read_torch(RunStore.MODEL)
            net = Network(self.cfg.model, dataset.input_shape, dataset.num_classes)
            traj = Trajectory(state["checkpoints"], int(state["steps_per_epoch"]), state.get("velocities"))
            units = Units(unit_of=state["unit_of"], label=state["unit_label"])
            self.log("resume: reusing the trained model and units")
            return Offline(dataset, net, state["params0"], traj, units)
        t0 = time.perf_counter()
        params0, traj, units = self.executor.call(train_and_units, self.cfg, dataset)
        off = Offline(dataset, Network(self.cfg.model, dataset.input_shape, dataset.num_classes), params0, traj, units)
        self._stage("train_and_units", t0)
        # the tables first: a resume that finds the model takes the tables as written too
        self.store.write_table(RunStore.UNITS, units_table(off))
        self.store.write_table(RunStore.TEST_INDEX, test_index_table(dataset))
        self.store.write_torch(
            RunStore.MODEL,
            {
                "params0": off.params0,
                "checkpoints": off.traj.checkpoints,
                "steps_per_epoch": off.traj.steps_per_epoch,
                **({} if off.traj.velocities is None else {"velocities": off.traj.velocities}),
                "unit_of": off.units.unit_of,
                "unit_label": off.units.label,
                "classes": torch.tensor(dataset.classes),
            },
        )
        return off

    def _verified_parts(self, expected: set[str], rows_of: dict[str, int]) -> set[str]:
        """On resume: the parts whose bytes match their checksum record; every other file in
        attribution/ (damaged, unfinished, another block size, a killed writer's temp file) and its
        record are removed so that the block is recomputed."""
        done = set()
        for name in self.store.list(RunStore.ATTRIBUTION):
            problem = "not a part of this run" if name not in expected else None
            if problem is None:
                problem = self.store.part_problem(name, self.store.part_record(name), rows_of[name])
            if problem is None:
                done.add(name)
                continue
            self.log(f"resume: recomputing {name} ({problem})")
            self.store.remove(f"{RunStore.ATTRIBUTION}/{name}")
            self.store.remove(f"{RunStore.CHECKSUMS}/{name}.json")
        return done

    def _synsets(self, off: Offline, resume: bool, n_shards: int) -> Synset:
        ds = off.dataset
        t0 = time.perf_counter()
        if resume and self.store.exists(RunStore.SYNSET):
            syn = Synset.from_dict(self.store.read_torch(RunStore.SYNSET))
            problem = syn.check(ds.input_shape, ds.num_classes)
            if problem is None and len(syn) == off.units.num_units:
                return syn
            self.log(f"resume: recomputing the synsets ({problem or 'unit count differs'})")

        def load(key: str) -> dict[str, torch.Tensor] | None:
            name = RunStore.distill_piece(key)
            return self.store.read_torch(name) if resume and self.store.exists(name) else None

        def save(key: str, piece: dict[str, torch.Tensor]) -> None:
            self.store.write_torch(RunStore.distill_piece(key), piece)

        syn = distill_synsets(
            self.cfg, off, self.executor.distill, n_shards, load, save, self.log, self.timings, self.distillation,
            call=self.executor.call,
        )
        self.store.write_torch(RunStore.SYNSET, syn.to_dict())
        self._stage("distill", t0)
        return syn

    def execute(self, n_shards: int = 1) -> dict[str, Any]:
        """The whole run, holding the output folder's lease (a second writer is refused)."""
        with Lease(self.store, log=self.log):
            return self._execute(n_shards)

    def _execute(self, n_shards: int) -> dict[str, Any]:
        t_all = time.perf_counter()
        previous = _check_out(self.store, self.cfg, self.exe.resume)
        resume = self.exe.resume and previous is not None
        dataset = self._load()
        self.fingerprint = data_fingerprint(dataset)
        if resume and previous is not None and previous.get("data_fingerprint") not in (None, self.fingerprint):
            raise RunStateError(
                f"{self.store.url}: the data changed since this run started (fingerprint "
                f"{previous.get('data_fingerprint')} vs {self.fingerprint}); rerun without --resume"
            )
        # not complete before anything is deleted: a crash in between leaves a resumable run
        self._write_manifest("running", {})
        if not resume and previous is not None:  # a rerun of this config: only files it wrote
            self.store.remove(RunStore.ATTRIBUTION)
            self.store.remove(RunStore.CHECKSUMS)
            self.store.remove("artifacts")
            self.store.remove(RunStore.VALIDATION)
        off = self._offline(dataset, resume)
        syn = self._synsets(off, resume, n_shards)
        n_units = off.units.num_units
        names = self.cfg.online.objectives
        bs = self.exe.block_units
        blocks = [Block(i, min(i + bs, n_units) - 1) for i in range(0, n_units, bs)]
        expected = {b.part for b in blocks}
        rows_of = {b.part: (b.last - b.first + 1) * len(names) for b in blocks}
        done = self._verified_parts(expected, rows_of) if resume else set()
        todo = [(b, syn.weight[b.first : b.last + 1].clone()) for b in blocks if b.part not in done]
        job = OnlineJob(
            self.cfg, off.dataset.input_shape, off.dataset.num_classes, off.traj.final,
            off.dataset.x_test, off.dataset.y_test, syn.x, syn.label, self.store.url, self.exe.storage_options,
            online_batch=self.exe.online_batch,
        )
        if self.online_batch is None and n_units:
            # what a worker on this machine's device picks (GPU workers size from their own memory)
            self.online_batch = online_batch_for(job, off.net, off.traj.final)[0]
        t0 = time.perf_counter()
        rows = 0
        units_left = sum(b.last - b.first + 1 for b, _ in todo)
        bar = self.progress(n_units * len(names), (n_units - units_left) * len(names)) if self.progress else None
        try:
            for _block, n in self.executor.evaluate(job, todo):
                rows += n
                if bar is not None:
                    bar.update(n)
        finally:
            if bar is not None:
                bar.close()
        self._stage("online", t0)
        records = {name: self.store.part_record(name) for name in sorted(expected)}
        bad = {n: p for n, r in records.items() if (p := self.store.part_problem(n, r, rows_of[n])) is not None}
        if bad:
            name, problem = next(iter(bad.items()))
            raise RunStateError(
                f"{self.store.url}: {len(bad)} attribution part(s) not written correctly ({name}: {problem}); "
                "rerun with --resume"
            )
        self.part_records = records
        self.timings["total"] = round(time.perf_counter() - t_all, 3)
        counts = {
            "units": n_units,
            "test_samples": int(off.dataset.test_ids.numel()),
            "train_samples": int(off.dataset.train_ids.numel()),
            "classes": off.dataset.num_classes,
            "objectives": len(names),
            "rows": n_units * len(names),
            "parts": len(expected),
            "rows_computed_this_session": rows,
            "parameters": int(flatten(off.traj.final).numel()),
        }
        self._write_manifest("complete", counts)
        return self.manifest

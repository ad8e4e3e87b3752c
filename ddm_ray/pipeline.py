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
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

import ddm_ray
from ddm_ray.config import ExecConfig, RunConfig
from ddm_ray.core.displacement import unrolled_displacement
from ddm_ray.core.distill import distill_class
from ddm_ray.core.models import Network, Params, flatten
from ddm_ray.core.online import (
    available_memory_bytes,
    base_objectives,
    choose_online_batch,
    evaluate_units,
)
from ddm_ray.core.synset import Synset
from ddm_ray.core.training import Trajectory, train
from ddm_ray.core.units import Units, make_units
from ddm_ray.data import Dataset, load_dataset
from ddm_ray.errors import InputError, RunStateError
from ddm_ray.store.run_store import TEST_INDEX_SCHEMA, UNITS_SCHEMA, RunStore, part_name

FORMAT_VERSION = 1


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
    """Everything a class shard needs; shipped once to each worker."""

    cfg: RunConfig
    input_shape: tuple[int, ...]
    num_classes: int
    params0: Params
    traj: Trajectory
    x_train: torch.Tensor
    y_train: torch.Tensor
    unit_of: torch.Tensor
    clusters_per_class: int
    device: str = "cpu"


@dataclass
class OnlineJob:
    """Everything an online block needs; put into the object store once."""

    cfg: RunConfig
    input_shape: tuple[int, ...]
    num_classes: int
    final: Params
    x_test: torch.Tensor
    y_test: torch.Tensor
    store_url: str
    storage_options: dict[str, str] = field(default_factory=dict)
    online_batch: int | None = None  # None: chosen per worker from free device memory
    device: str = "cpu"


@dataclass(frozen=True)
class Block:
    """A contiguous range of units [first, last] with their synsets."""

    first: int
    last: int

    @property
    def part(self) -> str:
        return part_name(self.first, self.last)


# ---- plain stage functions ----------------------------------------------------------------------
def distill_shard(job: DistillJob, class_indices: list[int]) -> Iterator[tuple[int, Synset]]:
    """One class shard in, its synsets out (yielded class by class as each finishes)."""
    cfg = job.cfg
    dev = torch.device(job.device)
    net = Network(cfg.model, job.input_shape, job.num_classes)
    net.module.to(dev)
    k = job.clusters_per_class
    x, y = job.x_train.to(dev), job.y_train.to(dev)
    traj = Trajectory([{n: t.to(dev) for n, t in p.items()} for p in job.traj.checkpoints], job.traj.steps_per_epoch)
    shard_units = [c * k + i for c in class_indices for i in range(k)]
    disp_flat = None
    if cfg.distill.method == "displacement":
        # replay training once for this shard's units only; other samples map to a dummy unit
        local = torch.full_like(job.unit_of, len(shard_units))
        for j, u in enumerate(shard_units):
            local[job.unit_of == u] = j
        disp = unrolled_displacement(
            net,
            {n: t.to(dev) for n, t in job.params0.items()},
            x,
            y,
            local.to(dev),
            len(shard_units) + 1,
            cfg.train,
            cfg.distill.unroll_epochs,
        )
        disp_flat = torch.cat([v.flatten(1) for v in disp.values()], 1)[: len(shard_units)]
    for ci, c in enumerate(class_indices):
        uids = list(range(c * k, c * k + k))
        members = [torch.nonzero(job.unit_of == u).flatten().to(dev) for u in uids]
        target = disp_flat[ci * k : (ci + 1) * k] if disp_flat is not None else None
        syn = distill_class(net, traj, c, uids, members, x, y, cfg.distill, cfg.online, target)
        yield c, Synset.from_dict({n: t.detach().cpu() for n, t in syn.to_dict().items()})


def online_batch_for(job: OnlineJob, net: Network, final: Params, ipc: int) -> tuple[int, int | None]:
    """(units per batched pass, test samples per forward chunk): --online-batch if given, else the
    largest that fits a quarter of the free memory of the worker's device."""
    n_test = int(job.x_test.shape[0])
    budget = available_memory_bytes(torch.device(job.device)) // 4
    auto_b, chunk = choose_online_batch(net, final, n_test, ipc, job.cfg.online.steps, budget)
    return (job.online_batch or auto_b), (None if chunk >= n_test else chunk)


@dataclass
class OnlineContext:
    """What every block of one online job shares: the network, the final weights and the test set
    on the device, and the base objectives. Built once per process (driver or worker), not per block."""

    net: Network
    final: Params
    x_test: torch.Tensor
    y_test: torch.Tensor
    base: torch.Tensor
    batches: dict[int, tuple[int, int | None]] = field(default_factory=dict)  # ipc -> (batch, chunk)


def online_context(job: OnlineJob) -> OnlineContext:
    dev = torch.device(job.device)
    net = Network(job.cfg.model, job.input_shape, job.num_classes)
    net.module.to(dev)
    final = {k: v.to(dev) for k, v in job.final.items()}
    x_test, y_test = job.x_test.to(dev), job.y_test.to(dev)
    base = base_objectives(net, final, x_test, y_test, job.cfg.online.objectives)
    return OnlineContext(net, final, x_test, y_test, base)


def evaluate_block(job: OnlineJob, syn: Synset, ctx: OnlineContext | None = None) -> pa.Table:
    """Leave-one-out rows for the units of syn: one row per (unit, objective).

    ctx: the job's shared state from `online_context(job)`; built here when not given."""
    cfg = job.cfg
    ctx = ctx or online_context(job)
    dev = torch.device(job.device)
    syn_d = Synset.from_dict({n: t.to(dev) for n, t in syn.to_dict().items()})
    names = cfg.online.objectives
    ipc = int(syn.x.shape[1])
    if ipc not in ctx.batches:
        ctx.batches[ipc] = online_batch_for(job, ctx.net, ctx.final, ipc)
    batch, chunk = ctx.batches[ipc]
    deltas = evaluate_units(
        ctx.net, ctx.final, syn_d, ctx.x_test, ctx.y_test, names, cfg.online.steps, cfg.online.lr,
        batch=batch, base=ctx.base, precision=cfg.online.precision, test_chunk=chunk,
    ).cpu()  # (n_obj, U, N)
    n_obj, n_units, n_test = deltas.shape
    unit_col = np.repeat(syn.unit_ids.numpy(), n_obj)
    obj_col = np.tile(np.array(names, dtype=object), n_units)
    flat = deltas.permute(1, 0, 2).reshape(-1).numpy().astype(np.float32)
    offsets = np.arange(0, n_units * n_obj * n_test + 1, n_test, dtype=np.int32)
    delta_col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()))
    return pa.table({"unit_id": pa.array(unit_col, pa.int64()), "objective": pa.array(obj_col, pa.string()), "delta": delta_col})


def run_block(job: OnlineJob, block: Block, syn: Synset, ctx: OnlineContext | None = None) -> int:
    """Evaluate one block and write its Parquet part; returns the number of rows written."""
    table = evaluate_block(job, syn, ctx)
    RunStore(job.store_url, job.storage_options).write_part(block.first, block.last, table)
    return table.num_rows


class Executor(Protocol):
    """Where shards and blocks run. Implementations live in ddm_ray.engine."""

    def distill(self, job: DistillJob, shards: list[list[int]]) -> Iterator[tuple[int, Synset]]: ...

    def evaluate(
        self, job: OnlineJob, blocks: list[tuple[Block, Synset]]
    ) -> Iterator[tuple[Block, int]]: ...

    def describe(self) -> dict[str, Any]: ...


# ---- offline stage ------------------------------------------------------------------------------
def train_offline(cfg: RunConfig, dataset: Dataset) -> Offline:
    net = Network(cfg.model, dataset.input_shape, dataset.num_classes)
    params0 = net.init_params(cfg.train.seed)
    traj = train(net, params0, dataset.x_train, dataset.y_train, cfg.train)
    if cfg.units.features == "penultimate":
        with torch.no_grad():
            feats = net.features(traj.final, dataset.x_train)
    else:
        feats = dataset.x_train.reshape(dataset.x_train.shape[0], -1)
    units = make_units(
        feats, dataset.y_train, dataset.num_classes, cfg.units.clusters_per_class,
        cfg.units.kmeans_iters, cfg.units.seed, class_names=dataset.classes,
    )
    return Offline(dataset, net, params0, traj, units)


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


def shard_classes(class_sizes: list[int], n_shards: int) -> list[list[int]]:
    """Balance classes over shards by sample count (largest first onto the lightest shard)."""
    n_shards = max(1, min(n_shards, len(class_sizes)))
    loads = [0] * n_shards
    shards: list[list[int]] = [[] for _ in range(n_shards)]
    for c in sorted(range(len(class_sizes)), key=lambda c: (-class_sizes[c], c)):
        i = min(range(n_shards), key=lambda j: (loads[j], j))
        shards[i].append(c)
        loads[i] += class_sizes[c]
    return [sorted(s) for s in shards if s]


# ---- the run -------------------------------------------------------------------------------------
def _check_out(store: RunStore, cfg: RunConfig, resume: bool) -> dict[str, Any] | None:
    if not store.exists(RunStore.MANIFEST):
        if resume:
            raise RunStateError(f"{store.url}: nothing to resume (no manifest.json)")
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
            traj = Trajectory(state["checkpoints"], int(state["steps_per_epoch"]))
            units = Units(unit_of=state["unit_of"], label=state["unit_label"])
            self.log("resume: reusing the trained model and units")
            return Offline(dataset, net, state["params0"], traj, units)
        t0 = time.perf_counter()
        off = train_offline(self.cfg, dataset)
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
                "unit_of": off.units.unit_of,
                "unit_label": off.units.label,
                "classes": torch.tensor(dataset.classes),
            },
        )
        return off

    def _synsets(self, off: Offline, resume: bool, n_shards: int) -> Synset:
        k = self.cfg.units.clusters_per_class
        c_count = off.dataset.num_classes
        have: dict[int, Synset] = {}
        if resume:
            for c in range(c_count):
                name = RunStore.synset_name(c)
                if self.store.exists(name):
                    have[c] = Synset.from_dict(self.store.read_torch(name))
        missing = [c for c in range(c_count) if c not in have]
        t0 = time.perf_counter()
        if missing:
            sizes = [int((off.dataset.y_train == c).sum()) for c in missing]
            shards = [[missing[i] for i in s] for s in shard_classes(sizes, n_shards)]
            job = DistillJob(
                self.cfg, off.dataset.input_shape, c_count, off.params0, off.traj,
                off.dataset.x_train, off.dataset.y_train, off.units.unit_of, k,
            )
            for c, syn in self.executor.distill(job, shards):
                self.store.write_torch(RunStore.synset_name(c), syn.to_dict())
                have[c] = syn
                self.log(f"distilled class {off.dataset.classes[c]} ({len(have)}/{c_count})")
        self._stage("distill", t0)
        return Synset.concat([have[c] for c in range(c_count)])

    def execute(self, n_shards: int = 1) -> dict[str, Any]:
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
        if not resume:
            self.store.remove(RunStore.ATTRIBUTION)
            self.store.remove("artifacts")
            self.store.remove(RunStore.VALIDATION)
        self._write_manifest("running", {})
        off = self._offline(dataset, resume)
        syn = self._synsets(off, resume, n_shards)
        n_units = off.units.num_units
        names = self.cfg.online.objectives
        bs = self.exe.block_units
        blocks = [Block(i, min(i + bs, n_units) - 1) for i in range(0, n_units, bs)]
        present = set(self.store.list(RunStore.ATTRIBUTION)) if resume else set()
        expected = {b.part for b in blocks}
        stale = present - expected
        done = present & expected
        if stale:  # parts of another block size or temporary files of a killed writer: drop them
            for name in stale:
                self.store.remove(f"{RunStore.ATTRIBUTION}/{name}")
        todo = [(b, syn.select(slice(b.first, b.last + 1))) for b in blocks if b.part not in done]
        job = OnlineJob(
            self.cfg, off.dataset.input_shape, off.dataset.num_classes, off.traj.final,
            off.dataset.x_test, off.dataset.y_test, self.store.url, self.exe.storage_options,
            online_batch=self.exe.online_batch,
        )
        if self.online_batch is None and n_units:
            # what a worker on this machine's device picks (GPU workers size from their own memory)
            self.online_batch = online_batch_for(job, off.net, off.traj.final, int(syn.x.shape[1]))[0]
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
        parts = set(self.store.parts())
        if parts != expected:
            raise RunStateError(f"{self.store.url}: {len(expected - parts)} attribution parts missing after the online stage")
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

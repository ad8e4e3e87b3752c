"""The online stage as plain functions: blocks of units -> leave-one-out rows -> one Parquet part
per block. An executor decides where `run_block` runs; the driver never holds the matrix.

A job is an `OnlineJob` (DDM: one descent step on each unit's synset) or an `ExactJob`
(`--method exact`: each unit retrained exactly by `core.training.retrain_without`); both write
the same rows (`rows_table`) into the same parts, so resume and every reader treat them alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ddm_ray.config import RunConfig
from ddm_ray.core.models import Network, Params, flatten
from ddm_ray.core.online import (
    available_memory_bytes,
    base_objectives,
    choose_online_batch,
    evaluate_units,
    precision_context,
)
from ddm_ray.core.synset import Synset, pool_gradients
from ddm_ray.core.training import retrain_without
from ddm_ray.errors import NonFiniteError
from ddm_ray.store.lease import owner_guard
from ddm_ray.store.run_store import RunStore, part_name


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
    lease: dict[str, Any] | None = None  # the driver's lease token: parts are written only while it holds


@dataclass(frozen=True)
class Block:
    """A contiguous range of units [first, last]; its synsets travel as their weight rows."""

    first: int
    last: int

    @property
    def part(self) -> str:
        return part_name(self.first, self.last)


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
    pool_grads: torch.Tensor | None = None  # (M, P) the pool's gradients at final, made on first use


def pool_gradients_for(job: OnlineJob, ctx: OnlineContext) -> torch.Tensor | None:
    """The pool's per-sample gradients at final, once per process, when the online step is one
    step and they take at most an eighth of the device's free memory; else None (each group of
    units then recomputes them)."""
    if job.cfg.online.steps != 1:
        return None
    m, p = int(ctx.pool_x.shape[0]), int(flatten(ctx.final).numel())
    if m * p * 4 > available_memory_bytes(torch.device(job.device)) // 8:
        return None
    with precision_context(job.cfg.online.precision, ctx.pool_x.device):
        return pool_gradients(ctx.net, ctx.final, ctx.pool_x, ctx.pool_label)


def _on_device(job: OnlineJob | ExactJob) -> tuple[Network, Params, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(network, final weights, x_test, y_test, base objectives) on the job's device."""
    dev = torch.device(job.device)
    net = Network(job.cfg.model, job.input_shape, job.num_classes)
    net.module.to(dev)
    final = {k: v.to(dev) for k, v in job.final.items()}
    x_test, y_test = job.x_test.to(dev), job.y_test.to(dev)
    return net, final, x_test, y_test, base_objectives(net, final, x_test, y_test, job.cfg.online.objectives)


def online_context(job: OnlineJob) -> OnlineContext:
    net, final, x_test, y_test, base = _on_device(job)
    dev = torch.device(job.device)
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
        ctx.pool_grads = pool_gradients_for(job, ctx)
    batch, chunk = ctx.batch
    deltas = evaluate_units(
        ctx.net, ctx.final, syn, ctx.x_test, ctx.y_test, names, cfg.online.steps, cfg.online.lr,
        batch=batch, base=ctx.base, precision=cfg.online.precision, test_chunk=chunk, pool_grads=ctx.pool_grads,
    ).cpu()  # (n_obj, U, N)
    if not bool(torch.isfinite(deltas).all()):
        raise NonFiniteError(
            f"online: non-finite deltas for units {block.first}-{block.last}; the synsets or the model "
            "diverged (lower --lr or --online-lr, or normalise the inputs)"
        )
    return rows_table(unit_ids, names, deltas)


def rows_table(unit_ids: torch.Tensor, names: tuple[str, ...], deltas: torch.Tensor) -> pa.Table:
    """The attribution rows of a block: deltas (n_obj, U, N) for units unit_ids (U,) -> one row
    per (unit, objective) with its delta list over the N test samples."""
    n_obj, n_units, n_test = deltas.shape
    unit_col = np.repeat(unit_ids.numpy(), n_obj)
    obj_col = np.tile(np.array(names, dtype=object), n_units)
    flat = deltas.permute(1, 0, 2).reshape(-1).numpy().astype(np.float32)
    offsets = np.arange(0, n_units * n_obj * n_test + 1, n_test, dtype=np.int32)
    delta_col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()))
    return pa.table({"unit_id": pa.array(unit_col, pa.int64()), "objective": pa.array(obj_col, pa.string()), "delta": delta_col})


# ---- --method exact: every unit retrained ---------------------------------------------------------
@dataclass
class ExactJob:
    """Everything an exact leave-one-out block needs (`--method exact`); put into the object store once."""

    cfg: RunConfig
    input_shape: tuple[int, ...]
    num_classes: int
    params0: Params
    final: Params
    x_train: torch.Tensor
    y_train: torch.Tensor
    unit_of: torch.Tensor  # (N,) each training sample's unit
    x_test: torch.Tensor
    y_test: torch.Tensor
    store_url: str
    storage_options: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    lease: dict[str, Any] | None = None  # the driver's lease token: parts are written only while it holds


@dataclass
class ExactContext:
    """What every exact block of one job shares: network, init, data on the device, base objectives."""

    net: Network
    params0: Params
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    base: torch.Tensor


def exact_context(job: ExactJob) -> ExactContext:
    net, _final, x_test, y_test, base = _on_device(job)
    dev = torch.device(job.device)
    return ExactContext(net, {k: v.to(dev) for k, v in job.params0.items()}, job.x_train.to(dev),
                        job.y_train.to(dev), x_test, y_test, base)


def exact_block(job: ExactJob, block: Block, ctx: ExactContext | None = None) -> pa.Table:
    """Exact leave-one-out rows for the units of a block: each unit retrained from the run's init
    with the same seed and data order, its samples dropped (`core.training.retrain_without`),
    then f(theta_{-u}, x) - f(theta, x) on every test sample, for every objective."""
    ctx = ctx or exact_context(job)
    names = job.cfg.online.objectives
    unit_ids = torch.arange(block.first, block.last + 1)
    rows = []
    for u in unit_ids.tolist():
        p = retrain_without(ctx.net, ctx.params0, ctx.x_train, ctx.y_train, job.cfg.train, job.unit_of == u)
        rows.append(base_objectives(ctx.net, p, ctx.x_test, ctx.y_test, names) - ctx.base)
    deltas = torch.stack(rows, 1).cpu()  # (n_obj, U, N)
    if not bool(torch.isfinite(deltas).all()):
        raise NonFiniteError(
            f"exact: non-finite deltas for units {block.first}-{block.last}; retraining diverged "
            "(lower --lr or normalise the inputs)"
        )
    return rows_table(unit_ids, names, deltas)


def block_context(job: OnlineJob | ExactJob) -> OnlineContext | ExactContext:
    """The state every block of `job` shares, built once per process."""
    return exact_context(job) if isinstance(job, ExactJob) else online_context(job)


def run_block(
    job: OnlineJob | ExactJob, block: Block, weight: torch.Tensor | None,
    ctx: OnlineContext | ExactContext | None = None,
) -> int:
    """Evaluate one block and write its Parquet part; returns the number of rows written.

    weight: the block's synset weight rows (OnlineJob); None for an ExactJob.
    ctx: `block_context(job)`, built here when not given."""
    if isinstance(job, ExactJob):
        table = exact_block(job, block, ctx if isinstance(ctx, ExactContext) else None)
    else:
        if weight is None:
            raise ValueError(f"online block {block.part} needs its synset weight rows")
        table = evaluate_block(job, block, weight, ctx if isinstance(ctx, OnlineContext) else None)
    store = RunStore(job.store_url, job.storage_options)
    if job.lease is not None:
        owner_guard(store, job.lease)
    store.write_part(block.first, block.last, table, job.lease)
    return table.num_rows

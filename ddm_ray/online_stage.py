"""The online stage as plain functions: blocks of units -> leave-one-out rows -> one Parquet part
per block. An executor decides where `run_block` runs; the driver never holds the matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ddm_ray.config import RunConfig
from ddm_ray.core.models import Network, Params
from ddm_ray.core.online import (
    available_memory_bytes,
    base_objectives,
    choose_online_batch,
    evaluate_units,
)
from ddm_ray.core.synset import Synset
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
    store = RunStore(job.store_url, job.storage_options)
    if job.lease is not None:
        owner_guard(store, job.lease)
    store.write_part(block.first, block.last, table, job.lease)
    return table.num_rows

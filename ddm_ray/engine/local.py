"""In-process executor: runs shards and blocks one after another in the driver."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from ddm_ray.distillation import DistillJob, Shard, distill_shard
from ddm_ray.engine import faults
from ddm_ray.online_stage import Block, ExactJob, OnlineJob, block_context, run_block

T = TypeVar("T")


class LocalExecutor:
    """The serial path: no Ray. Used by tests, benchmarks and `--engine local`."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def distill(self, job: DistillJob, shards: list[Shard]) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        job.device = self.device
        for shard in shards:
            yield from distill_shard(job, shard)

    def evaluate(
        self, job: OnlineJob | ExactJob, blocks: list[tuple[Block, torch.Tensor | None]]
    ) -> Iterator[tuple[Block, int]]:
        job.device = self.device
        ctx = block_context(job) if blocks else None  # shared by every block, as on each Ray worker
        for block, weight in blocks:
            faults.before_block(block.first, block.last)  # test-only hook, inert in normal runs
            yield block, run_block(job, block, weight, ctx)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(*args, device=self.device)

    def describe(self) -> dict[str, Any]:
        return {"executor": "local", "device": self.device}

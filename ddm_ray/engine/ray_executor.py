"""Ray executor: class shards on distillation actors, online blocks as tasks with backpressure.

Distillation: one actor per shard (one per GPU with `num_gpus=1`, or CPU actors), each a thin
wrapper over the plain `ShardDistiller`; the driver pulls synsets class by class, so each class is
written to the store as soon as it finishes. Online: one task per block of units, the job put into
the object store once, at most `max_in_flight` tasks pending (`ray.wait`), retried on failure.
Each task writes its own Parquet part and returns only a row count.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import ray

from ddm_ray.core.synset import Synset
from ddm_ray.engine import faults
from ddm_ray.engine.placement import Placement
from ddm_ray.pipeline import Block, DistillJob, OnlineJob, distill_shard, run_block

TASK_MAX_RETRIES = 3


class ShardDistiller:
    """Plain class: distils one shard of classes on `device`, handing out one class per `next`."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._it: Iterator[tuple[int, Synset]] | None = None

    def start(self, job: DistillJob, shard: list[int]) -> None:
        job.device = self.device  # explicit: never inferred from CUDA_VISIBLE_DEVICES
        self._it = distill_shard(job, shard)

    def next(self) -> tuple[int, Synset] | None:
        """The next finished class of the shard, or None when the shard is done."""
        assert self._it is not None, "start() first"
        return next(self._it, None)


class DistillActor(ShardDistiller):
    """The actor: ShardDistiller plus what only Ray knows."""

    def gpu_ids(self) -> list[Any]:
        return list(ray.get_gpu_ids())


def online_block_task(job: OnlineJob, block: Block, syn: Synset) -> int:
    """One online block as a Ray task; job.device was set explicitly by the driver."""
    faults.before_block(block.first, block.last)  # test-only hook, inert in normal runs
    return run_block(job, block, syn)


class RayExecutor:
    """Runs distillation on one actor per shard and online blocks as Ray tasks."""

    def __init__(self, placement: Placement, max_in_flight: int | None = None, task_slots: int | None = None) -> None:
        self.placement = placement
        self.task_slots = max(1, task_slots or placement.actors)
        self.max_in_flight = max_in_flight or 2 * self.task_slots
        self.actor_gpu_ids: dict[int, list[Any]] = {}  # class -> GPU ids of the actor that distilled it
        self.retried_blocks = 0

    def distill(self, job: DistillJob, shards: list[list[int]]) -> Iterator[tuple[int, Synset]]:
        p = self.placement
        actor_cls = ray.remote(num_cpus=1, num_gpus=p.actor_gpus)(DistillActor)
        job_ref = ray.put(job)
        actors = [actor_cls.remote(p.device) for _ in shards]
        try:
            gpu_ids = ray.get([a.gpu_ids.remote() for a in actors])
            ray.get([a.start.remote(job_ref, s) for a, s in zip(actors, shards, strict=True)])
            pending = {a.next.remote(): i for i, a in enumerate(actors)}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    item = ray.get(ref)
                    if item is None:
                        ray.kill(actors[i])
                        continue
                    pending[actors[i].next.remote()] = i
                    self.actor_gpu_ids[item[0]] = gpu_ids[i]
                    yield item
        finally:
            for a in actors:
                ray.kill(a)

    def evaluate(self, job: OnlineJob, blocks: list[tuple[Block, Synset]]) -> Iterator[tuple[Block, int]]:
        p = self.placement
        task = ray.remote(
            num_cpus=p.task_cpus, num_gpus=p.task_gpus, max_retries=TASK_MAX_RETRIES, retry_exceptions=True
        )(online_block_task)
        job.device = p.device
        job_ref = ray.put(job)  # weights and test data enter the object store once
        todo = deque(blocks)
        in_flight: dict[Any, Block] = {}
        while todo or in_flight:
            while todo and len(in_flight) < self.max_in_flight:
                b, syn = todo.popleft()
                in_flight[task.remote(job_ref, b, syn)] = b
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                yield in_flight.pop(ref), ray.get(ref)

    def describe(self) -> dict[str, Any]:
        return {"executor": "ray", "task_slots": self.task_slots, "max_in_flight": self.max_in_flight,
                **self.placement.describe()}

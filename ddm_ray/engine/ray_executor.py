"""Ray executor: class shards on distillation actors, online blocks as tasks with backpressure."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ray

from ddm_ray.core.synset import Synset
from ddm_ray.pipeline import Block, DistillJob, OnlineJob, distill_shard, run_block


class _Distiller:
    """Plain class behind the distillation actor: one shard of classes at a time."""

    def __init__(self, device: str) -> None:
        self.device = device

    def distill(self, job: DistillJob, shard: list[int]) -> list[tuple[int, Synset]]:
        job.device = self.device
        return list(distill_shard(job, shard))


def _run_block_task(job: OnlineJob, block: Block, syn: Synset) -> int:
    return run_block(job, block, syn)


class RayExecutor:
    """Runs distillation on one actor per shard and online blocks as Ray tasks."""

    def __init__(self, num_workers: int, max_in_flight: int | None = None, device: str = "cpu") -> None:
        self.num_workers = max(1, num_workers)
        self.max_in_flight = max_in_flight or 2 * self.num_workers
        self.device = device

    def distill(self, job: DistillJob, shards: list[list[int]]) -> Iterator[tuple[int, Synset]]:
        actor_cls = ray.remote(num_cpus=1)(_Distiller)
        job_ref = ray.put(job)
        actors = [actor_cls.remote(self.device) for _ in shards]
        pending = {a.distill.remote(job_ref, s): a for a, s in zip(actors, shards, strict=True)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                yield from ray.get(ref)
        for a in actors:
            ray.kill(a)

    def evaluate(self, job: OnlineJob, blocks: list[tuple[Block, Synset]]) -> Iterator[tuple[Block, int]]:
        task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=True)(_run_block_task)
        job_ref = ray.put(job)
        todo = list(blocks)
        in_flight: dict[Any, Block] = {}
        while todo or in_flight:
            while todo and len(in_flight) < self.max_in_flight:
                b, syn = todo.pop(0)
                in_flight[task.remote(job_ref, b, syn)] = b
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                yield in_flight.pop(ref), ray.get(ref)

    def describe(self) -> dict[str, Any]:
        return {"executor": "ray", "workers": self.num_workers, "max_in_flight": self.max_in_flight}

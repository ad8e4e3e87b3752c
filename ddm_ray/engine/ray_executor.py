"""Ray executor: distillation shards on actors, online blocks as tasks with backpressure.

Distillation: one actor per shard (one per GPU with `num_gpus=1`, or CPU actors), each a thin
wrapper over the plain `ShardDistiller`; shards cover probe directions, unit ranges or classes
(`pipeline.plan_shards`), so any number of actors is used. The driver pulls finished pieces one by
one and writes each to the store as soon as it arrives. Online: one task per block of units, the job put into
the object store once, at most `max_in_flight` tasks pending (`ray.wait`), retried on failure.
Each task writes its own Parquet part and returns only a row count. `--method exact` fans out the
same way: one task per block of exact retrainings (an `ExactJob`).

Warm workers: `warm_up()` (called when the run starts) pre-starts one task worker per online slot,
importing torch and this package while the driver trains and the actors distil; those tasks take no
resources and hold their workers until the online stage opens the gate (Ray reaps idle workers
beyond one per CPU while the actors run). Each worker builds the job's shared state (network,
weights, test data, base objectives) once and reuses it for every block it runs.

Progress: the driver counts finished distillation pieces and online blocks itself; work inside an
actor or a GPU `call` task (a shard's epochs, training, calibration retrainings) logs its own
progress on that worker with the driver's logging level, and Ray forwards the worker's stderr to
the driver (prefixed with the actor or task name).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import ray
import torch

from ddm_ray.distillation import DistillJob, Shard, distill_shard
from ddm_ray.engine import faults
from ddm_ray.engine.placement import Placement
from ddm_ray.engine.progress import configure_worker_logging, logging_level
from ddm_ray.online_stage import (
    Block,
    ExactContext,
    ExactJob,
    OnlineContext,
    OnlineJob,
    block_context,
    run_block,
)

TASK_MAX_RETRIES = 3
ACTOR_RESTARTS = 2  # a distillation shard whose actor dies is restarted on a new actor this often
T = TypeVar("T")
WARM_HOLD_S = 3600.0  # a warm task gives its worker back after this long even if no online stage opens the gate


class ShardDistiller:
    """Plain class: distils one shard on `device`, handing out one finished piece per `next`."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._it: Iterator[tuple[str, dict[str, torch.Tensor]]] | None = None
        self._error: BaseException | None = None

    def start(self, job: DistillJob, shard: Shard, threads: int = 1) -> None:
        try:
            torch.set_num_threads(threads)
            job.device = self.device  # explicit: never inferred from CUDA_VISIBLE_DEVICES
            self._it = distill_shard(job, shard)
        except Exception as e:  # noqa: BLE001  reported by the next call, which the driver awaits
            self._error = e

    def next(self) -> tuple[str, dict[str, torch.Tensor]] | None:
        """The next finished piece of the shard, or None when the shard is done."""
        if self._error is not None:
            raise self._error
        if self._it is None:
            raise RuntimeError("distillation shard not started")
        return next(self._it, None)


class DistillActor(ShardDistiller):
    """The actor: ShardDistiller plus what only Ray knows."""

    def start(self, job: DistillJob, shard: Shard, threads: int = 1, log_level: int = logging.WARNING) -> None:
        faults.before_shard(shard.key)  # test-only hook, inert in normal runs
        configure_worker_logging(log_level)  # the shard's progress reaches the driver's stderr
        super().start(job, shard, threads)

    def gpu_ids(self) -> list[Any]:
        return list(ray.get_gpu_ids())


# one online (or exact) job per worker process: (object ref hex, job, its shared state)
_WORKER_JOB: tuple[str, OnlineJob | ExactJob, OnlineContext | ExactContext] | None = None


def _job_context(job_ref: ray.ObjectRef) -> tuple[OnlineJob | ExactJob, OnlineContext | ExactContext]:
    global _WORKER_JOB
    key = job_ref.hex()
    if _WORKER_JOB is None or _WORKER_JOB[0] != key:
        _WORKER_JOB = None  # drop the previous job before fetching the next
        job = ray.get(job_ref)
        _WORKER_JOB = (key, job, block_context(job))
    return _WORKER_JOB[1], _WORKER_JOB[2]


def online_block_task(
    job_box: list[ray.ObjectRef], block: Block, weight: torch.Tensor | None, threads: int = 1
) -> int:
    """One online block (or, for an ExactJob, one block of exact retrainings) as a Ray task;
    job.device was set explicitly by the driver.

    job_box: [ref of the OnlineJob], boxed so Ray passes the ref instead of the value and each
    worker deserialises the job (and builds its shared state) once, not once per block."""
    faults.before_block(block.first, block.last)  # test-only hook, inert in normal runs
    torch.set_num_threads(threads)
    job, ctx = _job_context(job_box[0])
    return run_block(job, block, weight, ctx)


def _gpu_call(fn: Callable[..., Any], device: str, log_level: int, *args: Any) -> tuple[Any, list[Any]]:
    """A `call` as a Ray task on a GPU worker; also says which GPUs it held. Progress of the work
    (training epochs, calibration retrainings) is logged on the worker, whose stderr Ray forwards."""
    configure_worker_logging(log_level)
    return fn(*args, device=device), list(ray.get_gpu_ids())


class _Gate:
    """Holds the warm tasks until the online stage begins."""

    def __init__(self) -> None:
        self._open = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._open.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    async def open(self) -> None:
        self._open.set()


def warm_process(threads: int) -> None:
    """What the first block of a fresh process would pay for: importing this module already imported
    torch and the pipeline; a first vmapped gradient imports torch.func's lazy modules (torch._dynamo,
    ~2 s on a busy core)."""
    torch.set_num_threads(threads)
    x = torch.ones(2, 3)
    torch.func.vmap(torch.func.grad(lambda v: (v * v).sum()))(x)


def _warm_task(gate: Any, threads: int, hold_s: float) -> int:
    """Runs on a fresh task worker, then holds it until the online stage begins."""
    warm_process(threads)
    ray.get(gate.wait.remote(hold_s))
    return os.getpid()


class RayExecutor:
    """Runs distillation on one actor per shard and online blocks as Ray tasks."""

    def __init__(self, placement: Placement, max_in_flight: int | None = None, task_slots: int | None = None) -> None:
        self.placement = placement
        self.task_slots = max(1, task_slots or placement.actors)
        self.max_in_flight = max_in_flight or 2 * self.task_slots
        self.actor_gpu_ids: dict[str, list[Any]] = {}  # piece key -> GPU ids of the actor that made it
        self.retried_blocks = 0
        self.actor_restarts = 0
        self.call_gpu_ids: list[list[Any]] = []  # GPU ids held by each `call` task
        self._gate: Any = None
        self._warm: list[Any] = []

    def _threads(self) -> int:
        return max(1, int(self.placement.task_cpus))

    def warm_up(self, hold_s: float = WARM_HOLD_S) -> None:
        """Best effort: start one warm task worker per online slot on the nodes that can run online
        tasks (CPU or GPU nodes alive now), holding it until `evaluate` opens the gate."""
        if self._gate is not None:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        p = self.placement
        key, per = ("GPU", p.task_gpus) if p.task_gpus else ("CPU", p.task_cpus)
        self._gate = ray.remote(num_cpus=0)(_Gate).remote()
        warm = ray.remote(num_cpus=0, max_retries=0)(_warm_task)
        left = self.task_slots
        for node in ray.nodes():
            n = min(left, int(node.get("Resources", {}).get(key, 0) // per)) if node.get("Alive") else 0
            for _ in range(n):
                strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=True)
                self._warm.append(warm.options(scheduling_strategy=strategy).remote(self._gate, self._threads(), hold_s))
            left -= n

    def release(self) -> None:
        """Open the gate: warm tasks return and their (warm) workers go idle for the online tasks."""
        if self._gate is None:
            return
        try:
            ray.get(self._gate.open.remote(), timeout=10)
            ray.wait(self._warm, num_returns=len(self._warm), timeout=10)
        except ray.exceptions.RayError:
            pass
        finally:
            try:
                ray.kill(self._gate)
            except Exception:  # noqa: BLE001  best effort: the runtime may already be gone
                pass
            self._gate, self._warm = None, []

    def distill(self, job: DistillJob, shards: list[Shard]) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """One actor per shard; an actor that dies (a preempted spot worker) is replaced and its
        shard restarted, up to ACTOR_RESTARTS times per shard. Pieces already received are not
        yielded twice."""
        p = self.placement
        actor_cls = ray.remote(num_cpus=1, num_gpus=p.actor_gpus)(DistillActor)
        job_ref = ray.put(job)
        actors: dict[int, Any] = {}
        gpu_ids: dict[int, list[Any]] = {}
        restarts = dict.fromkeys(range(len(shards)), 0)
        seen: set[str] = set()

        def launch(i: int) -> Any:
            """A fresh actor on shard i; its first piece's ref (calls on an actor run in order, so
            a death in start surfaces there, where the loop below restarts the shard)."""
            actors[i] = actor_cls.remote(p.device)
            gpu_ids[i] = ray.get(actors[i].gpu_ids.remote())
            actors[i].start.remote(job_ref, shards[i], self._threads(), logging_level())
            return actors[i].next.remote()

        try:
            pending = {launch(i): i for i in range(len(shards))}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        item = ray.get(ref)
                    except ray.exceptions.RayActorError:
                        if restarts[i] >= ACTOR_RESTARTS:
                            raise
                        restarts[i] += 1
                        self.actor_restarts += 1
                        pending[launch(i)] = i
                        continue
                    if item is None:
                        ray.kill(actors[i])
                        continue
                    pending[actors[i].next.remote()] = i
                    if item[0] in seen:
                        continue
                    seen.add(item[0])
                    self.actor_gpu_ids[item[0]] = gpu_ids[i]
                    yield item
        finally:
            for a in actors.values():
                ray.kill(a)

    def evaluate(
        self, job: OnlineJob | ExactJob, blocks: list[tuple[Block, torch.Tensor | None]]
    ) -> Iterator[tuple[Block, int]]:
        p = self.placement
        task = ray.remote(
            num_cpus=p.task_cpus, num_gpus=p.task_gpus, max_retries=TASK_MAX_RETRIES, retry_exceptions=True
        )(online_block_task)
        job.device = p.device
        job_ref = ray.put(job)  # weights and test data enter the object store once
        self.release()  # warm workers go idle now, just before the first online task
        todo = deque(blocks)
        in_flight: dict[Any, Block] = {}
        threads = self._threads()
        while todo or in_flight:
            while todo and len(in_flight) < self.max_in_flight:
                b, weight = todo.popleft()
                in_flight[task.remote([job_ref], b, weight, threads)] = b
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                yield in_flight.pop(ref), ray.get(ref)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """On a GPU cluster: one task holding a GPU (training, k-means and the probe subspace then
        run there, not on the driver's CPU). Without GPUs: in the driver, which is a CPU like any."""
        p = self.placement
        if not p.actor_gpus:
            return fn(*args, device=p.device)
        task = ray.remote(num_cpus=1, num_gpus=p.actor_gpus, max_retries=TASK_MAX_RETRIES)(_gpu_call)
        result, gpu_ids = ray.get(task.remote(fn, p.device, logging_level(), *args))
        self.call_gpu_ids.append(gpu_ids)
        return result

    def describe(self) -> dict[str, Any]:
        return {"executor": "ray", "task_slots": self.task_slots, "max_in_flight": self.max_in_flight,
                **self.placement.describe()}

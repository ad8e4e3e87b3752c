"""Fan-out for validation and benchmark work: the same function over items, serially or as Ray tasks.

Used for exact retrainings and distillation shards. With engine "ray" every item is one task with
num_cpus=1 (torch limited to one thread inside it). `FanOut` starts a local Ray runtime on entry
when none is running (or joins RAY_ADDRESS) and stops only a runtime it started
(`engine.runtime.ray_runtime`). Results come back in the order of the items; `on_done` hears of
each item as it finishes (in the driver), which is how progress of fanned-out work is reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _one_thread_call(fn: Callable[..., Any], shared: Any, item: Any, log_level: int) -> Any:
    import torch

    from ddm_ray.engine.progress import configure_worker_logging

    configure_worker_logging(log_level)  # progress inside the task reaches the driver's stderr
    torch.set_num_threads(1)
    return fn(shared, item)


class FanOut:
    """`map(fn, shared, items)` -> [fn(shared, item) ...] in order, local or on Ray tasks."""

    def __init__(self, engine: str, num_cpus: int | None = None) -> None:
        if engine not in ("ray", "local"):
            raise ValueError(f"engine must be ray or local, got {engine!r}")
        self.engine, self.num_cpus = engine, num_cpus
        self._runtime: contextlib.ExitStack | None = None

    def __enter__(self) -> FanOut:
        if self.engine == "ray":
            from ddm_ray.engine.runtime import ray_runtime

            self._runtime = contextlib.ExitStack()
            self._runtime.enter_context(ray_runtime(None, self.num_cpus))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None

    def map(
        self, fn: Callable[[Any, T], R], shared: Any, items: Sequence[T], on_done: Callable[[int], None] | None = None
    ) -> list[R]:
        """[fn(shared, item) for item in items]; on_done(i) after item i finished (any order on Ray)."""
        if self.engine == "local" or len(items) <= 1:
            out = []
            for i, it in enumerate(items):
                out.append(fn(shared, it))
                if on_done is not None:
                    on_done(i)
            return out
        import ray

        from ddm_ray.engine.progress import logging_level

        task = ray.remote(num_cpus=1, max_retries=2)(_one_thread_call)
        ref = ray.put(shared)
        refs = [task.remote(fn, ref, it, logging_level()) for it in items]
        index = {r: i for i, r in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # a failed task raises here, as soon as it fails
            if on_done is not None:
                on_done(index[done[0]])
        return ray.get(refs)

    def describe(self) -> dict[str, Any]:
        if self.engine == "ray":
            import ray

            return {"engine": "ray", "cpus": int(ray.cluster_resources().get("CPU", 0))}
        return {"engine": "local"}

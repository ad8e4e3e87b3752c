"""Fan-out for benchmark work: the same function over items, serially or as Ray tasks.

Used for exact retrainings and distillation shards. With engine "ray" every item is one task with
num_cpus=1 (torch limited to one thread inside it). `FanOut` starts a local Ray runtime on entry
when none is running (or joins RAY_ADDRESS) and stops only a runtime it started.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _one_thread_call(fn: Callable[..., Any], shared: Any, item: Any) -> Any:
    import torch

    torch.set_num_threads(1)
    return fn(shared, item)


class FanOut:
    """`map(fn, shared, items)` -> [fn(shared, item) ...] in order, local or on Ray tasks."""

    def __init__(self, engine: str, num_cpus: int | None = None) -> None:
        if engine not in ("ray", "local"):
            raise ValueError(f"engine must be ray or local, got {engine!r}")
        self.engine, self.num_cpus, self._started = engine, num_cpus, False

    def __enter__(self) -> FanOut:
        if self.engine == "ray":
            from ddm_ray.engine.runtime import start_or_join

            self._started = start_or_join(None, self.num_cpus)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def map(self, fn: Callable[[Any, T], R], shared: Any, items: Sequence[T]) -> list[R]:
        if self.engine == "local" or len(items) <= 1:
            return [fn(shared, it) for it in items]
        import ray

        task = ray.remote(num_cpus=1, max_retries=2)(_one_thread_call)
        ref = ray.put(shared)
        return ray.get([task.remote(fn, ref, it) for it in items])

    def describe(self) -> dict[str, Any]:
        if self.engine == "ray":
            import ray

            return {"engine": "ray", "cpus": int(ray.cluster_resources().get("CPU", 0))}
        return {"engine": "local"}

"""The only layer that imports Ray: executors for distillation and online evaluation."""

from __future__ import annotations

import os
from typing import Any

from ddm_ray.config import ExecConfig, RunConfig


def run_with_engine(cfg: RunConfig, exe: ExecConfig, out: str, address: str | None = None, log: Any = None) -> dict[str, Any]:
    """Run the pipeline on the engine exe.engine names; returns the final manifest."""
    from ddm_ray.pipeline import Run

    if exe.engine == "local":
        from ddm_ray.engine.local import LocalExecutor

        return Run(cfg, exe, out, LocalExecutor(), log=log).execute(n_shards=1)

    import ray

    from ddm_ray.engine.ray_executor import RayExecutor

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = False
    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS")
        if addr:
            ray.init(address=addr, log_to_driver=True)
        else:
            ray.init(
                num_cpus=exe.num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                object_store_memory=200 * 1024 * 1024,
                logging_level="ERROR",
            )
        started = True
    try:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        executor = RayExecutor(workers, exe.max_in_flight, device="cpu")
        return Run(cfg, exe, out, executor, log=log).execute(n_shards=workers)
    finally:
        if started:
            ray.shutdown()

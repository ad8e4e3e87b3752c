"""The only layer that imports Ray: executors for distillation and online evaluation."""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Any

from ddm_ray.config import ExecConfig, RunConfig
from ddm_ray.errors import DDMError, brief


class EngineError(DDMError):
    """Distributed execution failed (a task exhausted its retries, an actor died, no cluster)."""


def _local_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda but torch sees no CUDA device; use --device auto or cpu")
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def _progress_factory(enabled: bool) -> Any:
    if not enabled:
        return None
    from ddm_ray.engine.progress import Progress

    return lambda total, done, what="online": Progress(total, done, what=what, unit="rows")


def run_with_engine(
    cfg: RunConfig, exe: ExecConfig, out: str, address: str | None = None, log: Any = None, progress: bool = False
) -> dict[str, Any]:
    """Run the pipeline on the engine exe.engine names; returns the final manifest.

    address: a Ray cluster to join; default RAY_ADDRESS when set (as inside `ray job submit`),
    else a fresh local runtime is started for this run and stopped afterwards (`engine.runtime`).
    progress: show online progress (a bar on a terminal, log lines otherwise). Every stage reports
    progress through the `ddm_ray` loggers (`engine.progress`), silent unless logging is configured
    for INFO (the CLI does; --quiet does not).
    """
    from ddm_ray.pipeline import Run

    bar = _progress_factory(progress)
    if exe.engine == "local":
        from ddm_ray.engine.local import LocalExecutor

        return Run(cfg, exe, out, LocalExecutor(_local_device(exe.device)), log=log, progress=bar).execute(n_shards=1)

    from ddm_ray.engine.runtime import choose_ray_auth

    choose_ray_auth(address)  # before Ray is imported (it reads the mode once)
    import ray

    from ddm_ray.engine.placement import plan_placement
    from ddm_ray.engine.ray_executor import RayExecutor
    from ddm_ray.engine.runtime import ray_runtime, user_module_env
    from ddm_ray.store.fs import with_env_options

    # workers do not share the driver's environment: its S3 settings travel with the job
    exe = dataclasses.replace(exe, storage_options=with_env_options(out, exe.storage_options))
    staging = tempfile.TemporaryDirectory(prefix="ddm-ray-modules-")
    env = user_module_env(cfg.model.arch, staging.name) if cfg.model.is_user_model else None
    with staging, ray_runtime(address, exe.num_cpus, log, exe.connect_timeout_s, local_niceness_zero=True,
                              runtime_env=env):
        res = ray.cluster_resources()
        placement = plan_placement(exe.device, res.get("GPU", 0), res.get("CPU", 1))
        slots = placement.actors if placement.task_gpus else max(1, int(res.get("CPU", 1)))
        executor = RayExecutor(placement, exe.max_in_flight, task_slots=slots)
        if log:
            log(f"ray: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs -> device {placement.device}, "
                f"{placement.actors} distillation actor(s), {executor.max_in_flight} online tasks in flight")
        executor.warm_up()  # task workers import torch while the driver trains and the actors distil
        try:
            return Run(cfg, exe, out, executor, log=log, progress=bar).execute(n_shards=placement.actors)
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, DDMError):  # a task's own one-line error (a lost lease, NaN rows): as it is
                raise type(cause)(str(cause)) from None
            raise EngineError(f"Ray execution failed ({brief(e)}); rerun with --resume to finish") from None
        finally:
            executor.release()

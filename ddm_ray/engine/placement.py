"""Where work goes: a pure decision from the requested device and the cluster's resources.

No Ray imports here, so the decision is testable without a cluster (and without CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

from ddm_ray.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    """Resources per distillation actor / online task and the torch device they use.

    device: the torch device set explicitly inside every actor and task ("cuda" or "cpu").
    actors: number of distillation actors (one per GPU, or one per CPU when no GPUs are used).
    actor_gpus / task_gpus: `num_gpus` requested by each actor / online task (0 on CPU).
    """

    device: str
    actors: int
    actor_gpus: float
    task_gpus: float
    task_cpus: float = 1.0

    def describe(self) -> dict[str, object]:
        return {"device": self.device, "distill_actors": self.actors, "actor_gpus": self.actor_gpus,
                "task_gpus": self.task_gpus}


def plan_placement(device: str, cluster_gpus: float, cluster_cpus: float) -> Placement:
    """Decide placement for `--device auto|cuda|cpu` given the cluster's total GPUs and CPUs.

    auto: GPUs when the cluster has any, else CPU actors with device "cpu".
    cuda: GPUs, and an error when the cluster has none (an autoscaling cluster reports its
      GPU workers only once they are up; use auto or start a GPU worker first).
    cpu:  CPU actors and tasks, even on a GPU cluster.
    """
    gpus = int(cluster_gpus)
    if device == "cuda" and gpus < 1:
        raise ConfigError("--device cuda but the Ray cluster has no GPUs; use --device auto or cpu")
    if device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    if device != "cpu" and gpus >= 1:
        return Placement(device="cuda", actors=gpus, actor_gpus=1.0, task_gpus=1.0)
    return Placement(device="cpu", actors=max(1, int(cluster_cpus)), actor_gpus=0.0, task_gpus=0.0)

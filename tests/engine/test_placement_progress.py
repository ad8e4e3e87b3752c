"""Pure decisions of the engine: placement from the cluster's resources, progress output."""

from __future__ import annotations

import io

import pytest

from ddm_ray.engine.placement import plan_placement
from ddm_ray.engine.progress import Progress
from ddm_ray.errors import ConfigError
from ddm_ray.pipeline import shard_classes


def test_auto_uses_one_actor_per_gpu_when_the_cluster_has_gpus() -> None:
    p = plan_placement("auto", cluster_gpus=4, cluster_cpus=16)
    assert (p.device, p.actors, p.actor_gpus, p.task_gpus) == ("cuda", 4, 1.0, 1.0)


def test_auto_without_gpus_runs_cpu_actors_with_device_cpu() -> None:
    p = plan_placement("auto", cluster_gpus=0, cluster_cpus=3)
    assert (p.device, p.actors, p.actor_gpus, p.task_gpus) == ("cpu", 3, 0.0, 0.0)


def test_cpu_is_honoured_on_a_gpu_cluster_and_cuda_needs_gpus() -> None:
    assert plan_placement("cpu", 2, 8).device == "cpu"
    assert plan_placement("cuda", 1, 8).device == "cuda"
    with pytest.raises(ConfigError, match="no GPUs"):
        plan_placement("cuda", 0, 8)


def test_class_shards_balance_sample_counts() -> None:
    sizes = [50, 40, 30, 30, 20, 10]
    shards = shard_classes(sizes, 2)
    loads = sorted(sum(sizes[c] for c in s) for s in shards)
    assert sorted(c for s in shards for c in s) == list(range(6))
    assert loads == [90, 90]


def test_progress_log_lines_when_not_a_terminal() -> None:
    t = [0.0]
    out = io.StringIO()
    p = Progress(total=100, done=20, stream=out, interval_s=10, tty=False, clock=lambda: t[0])
    t[0] = 5.0
    p.update(10)  # first update always prints
    t[0] = 6.0
    p.update(10)  # within the interval: silent
    t[0] = 20.0
    p.update(60)  # complete: prints
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "30/100 rows (30%)" in lines[0] and "2.0 rows/s" in lines[0] and "ETA 00:35" in lines[0]
    assert "100/100 rows (100%)" in lines[1] and "ETA 00:00" in lines[1]


def test_progress_bar_on_a_terminal_redraws_one_line() -> None:
    out = io.StringIO()
    p = Progress(total=10, stream=out, tty=True, clock=iter([0.0, 1.0, 2.0, 3.0]).__next__)
    p.update(5)
    p.close()
    text = out.getvalue()
    assert text.startswith("\r[") and text.endswith("\n") and "5/10 rows" in text

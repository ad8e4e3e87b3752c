"""Pure decisions of the engine: placement from the cluster's resources, progress output."""

from __future__ import annotations

import io
import logging
import re

import pytest

from ddm_ray.config import DistillConfig, OnlineConfig, RunConfig
from ddm_ray.distillation import plan_shards, split_range, unrolled_solver
from ddm_ray.engine.placement import plan_placement
from ddm_ray.engine.progress import Progress, configure_logging
from ddm_ray.errors import ConfigError


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


def test_split_range_covers_once_with_near_equal_parts():
    for n, parts, min_size in [(10, 3, 1), (128, 7, 8), (5, 9, 1), (20, 4, 8), (1, 4, 1)]:
        ranges = split_range(n, parts, min_size)
        covered = [i for a, b in ranges for i in range(a, b)]
        assert covered == list(range(n))
        sizes = [b - a for a, b in ranges]
        assert len(ranges) <= parts and max(sizes) - min(sizes) <= 1
        assert len(ranges) == 1 or min(sizes) >= min_size


def test_shards_use_any_number_of_workers_and_follow_the_solver():
    cfg = RunConfig()  # basis, blend, auto solver
    assert unrolled_solver("auto", 50, 128) == "forward" and unrolled_solver("auto", 1000, 128) == "adjoint"
    cols = plan_shards(cfg, 1000, 10, 128, 13)
    assert {s.kind for s in cols} == {"columns"} and len(cols) == 13
    assert [i for s in cols for i in range(s.lo, s.hi)] == list(range(128))
    units = plan_shards(cfg, 50, 10, 128, 3)
    assert {s.kind for s in units} == {"units"} and sum(s.hi - s.lo for s in units) == 50
    assert len({s.key for s in cols + units}) == len(cols) + len(units)
    assert plan_shards(RunConfig(distill=DistillConfig(target="influence")), 80, 10, 128, 4) == []
    paper = RunConfig(distill=DistillConfig(method="literal"), online=OnlineConfig(steps=2))
    assert [(s.kind, s.lo, s.hi) for s in plan_shards(paper, 80, 10, 0, 4)][0][0] == "classes"


def _capture(name: str) -> tuple[logging.Logger, list[str]]:
    lines: list[str] = []
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger.addHandler(Keep())
    return logger, lines


def test_progress_log_lines_when_not_a_terminal() -> None:
    t = [0.0]
    logger, lines = _capture("ddm_ray.test.progress_lines")
    p = Progress(total=100, done=20, logger=logger, interval_s=10, tty=False, clock=lambda: t[0])
    t[0] = 5.0
    p.update(10)  # first update always logs
    t[0] = 6.0
    p.update(10)  # within the interval: silent
    t[0] = 20.0
    p.update(60)  # complete: logs
    p.close()
    assert len(lines) == 2
    assert lines[0].startswith("online: ") and "30/100 rows (30%)" in lines[0]
    assert "2.0 rows/s" in lines[0] and "ETA 00:35" in lines[0]
    assert "100/100 rows (100%)" in lines[1] and "ETA 00:00" in lines[1]


def test_progress_names_the_stage_and_its_unit_and_slow_rates() -> None:
    t = [0.0]
    logger, lines = _capture("ddm_ray.test.progress_units")
    with Progress(30, what="train", unit="epochs", logger=logger, tty=False, clock=lambda: t[0]) as p:
        t[0] = 10.0
        p.set(1)
    assert lines == ["train: 1/30 epochs (3%), 0.1 epochs/s, ETA 04:50"]


def test_progress_is_silent_when_its_logger_is_not_enabled() -> None:
    logger, lines = _capture("ddm_ray.test.progress_quiet")
    logger.setLevel(logging.WARNING)
    out = io.StringIO()
    for tty in (False, True):
        with Progress(5, logger=logger, stream=out, tty=tty) as p:
            p.update(5)
    assert lines == [] and out.getvalue() == ""


def test_progress_bar_on_a_terminal_redraws_one_line() -> None:
    out = io.StringIO()
    logger, lines = _capture("ddm_ray.test.progress_bar")
    p = Progress(total=10, logger=logger, stream=out, tty=True, clock=iter([0.0, 1.0, 2.0, 3.0, 4.0]).__next__)
    p.update(5)
    p.close()
    text = out.getvalue()
    assert text.startswith("\r[") and text.endswith("\n") and "5/10 rows" in text and lines == []


def test_log_lines_go_to_stderr_in_the_run_format(capsys) -> None:
    configure_logging(logging.INFO)
    try:
        logging.getLogger("ddm_ray.test.format").info("hello")
        configure_logging(logging.INFO)  # a second call replaces the handler: still one line
        logging.getLogger("ddm_ray.test.format").info("again")
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 2 and re.fullmatch(r"\[ddm-ray \d\d:\d\d:\d\d\] hello", err[0])
        configure_logging(logging.WARNING)  # --quiet
        logging.getLogger("ddm_ray.test.format").info("hidden")
        assert capsys.readouterr().err == ""
    finally:
        configure_logging(logging.WARNING)

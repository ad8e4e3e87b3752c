"""Pure decisions of the engine: placement from the cluster's resources, progress output."""

from __future__ import annotations

import io
import logging
import re

import numpy as np
import pytest

from ddm_ray.config import DistillConfig, OnlineConfig, RunConfig
from ddm_ray.distillation import plan_shards, split_range, unrolled_solver
from ddm_ray.engine.placement import plan_placement
from ddm_ray.engine.progress import Progress, RateEstimate, configure_logging, eta_from_samples
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
    assert lines == ["train: 1/30 epochs (3%), 0.1 epochs/s, ETA estimating"]  # one epoch: too early to say


def _steady(times: list[float]) -> list[tuple[float, float]]:
    """(timestamp, work done) samples: one unit of work finished at each time, from a start at 0."""
    return [(0.0, 0.0), *((t, float(i + 1)) for i, t in enumerate(times))]


def test_eta_is_exact_at_a_steady_rate_and_silent_until_warmed_up() -> None:
    samples = _steady([1.0 * i for i in range(1, 31)])  # 1 unit/s, 30 in all
    assert eta_from_samples(samples[:6], total=30) == pytest.approx(25.0)  # 5 done at t=5
    assert eta_from_samples(samples[:3], total=30) is None  # 2 units: not yet
    assert eta_from_samples(samples, total=30) == 0.0
    fast = [(0.0, 0.0), (0.5, 100.0), (1.0, 200.0)]  # plenty of work, but under 2 s
    assert eta_from_samples(fast, total=1000) is None
    assert eta_from_samples([*fast, (2.0, 400.0)], total=1000) == pytest.approx(3.0)
    assert eta_from_samples([(0.0, 0.0), (5.0, 0.0)], total=10) is None  # nothing done yet


def test_a_slow_start_does_not_inflate_the_eta() -> None:
    # the case: a 30 s stage whose first unit took 10 s (start-up), then 1 s each
    times = [10.0 + i for i in range(30)]
    samples = _steady(times)
    for k in range(3, 30):
        truth = times[-1] - times[k - 1]
        naive = (30 - k) / (k / times[k - 1])  # the session average: what the bar said before
        eta = eta_from_samples(samples[: k + 1], total=30)
        assert eta == pytest.approx(truth, rel=1e-6), k
        assert naive > 1.3 * truth or k > 20


def test_the_eta_follows_a_change_of_pace_and_rides_out_jitter() -> None:
    # 20 units at 1/s, then 4 s each: within two time constants the rate is the new one
    times = [float(i) for i in range(1, 21)]
    times += [times[-1] + 4.0 * i for i in range(1, 31)]
    samples = _steady(times)
    rates = {}
    for k in (20, 25, 35):
        est = RateEstimate()
        for (t0, d0), (t1, d1) in zip(samples[:k], samples[1 : k + 1], strict=True):
            est = est.step(d1 - d0, t1 - t0)
        rates[k] = est.rate()
    assert rates[20] == pytest.approx(1.0) and 0.25 < rates[25] < rates[20]
    assert rates[35] == pytest.approx(0.25, rel=0.3)
    # alternating 1.5 s and 0.5 s intervals: after a few, the ETA stays within 10% (+1 s) of the
    # truth and falls over every slow-fast pair
    times = list(np.cumsum([0.5 if i % 2 else 1.5 for i in range(60)]))
    samples = _steady(times)
    etas = [eta_from_samples(samples[: k + 1], total=60) for k in range(8, 59)]
    truths = [times[-1] - times[k - 1] for k in range(8, 59)]
    assert all(abs(e - t) <= 0.1 * t + 1.0 for e, t in zip(etas, truths, strict=True))
    assert all(etas[i + 2] < etas[i] for i in range(len(etas) - 2))


def test_progress_says_the_smoothed_eta() -> None:
    t = [0.0]
    logger, lines = _capture("ddm_ray.test.progress_smooth")
    with Progress(30, what="stage", unit="steps", logger=logger, interval_s=0, tty=False, clock=lambda: t[0]) as p:
        for i in range(6):
            t[0] = 10.0 + i  # start-up 10 s, then 1 s per step
            p.update(1)
    assert lines[1].endswith("ETA estimating") and lines[2].endswith("1.0 steps/s, ETA 00:27")
    assert lines[-1] == "stage: 6/30 steps (20%), 1.0 steps/s, ETA 00:24"


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

"""What a run shows while it works: log lines through the `ddm_ray` logger and progress of the
long stages (training epochs, distillation, online rows, exact retrainings).

* Log lines: every module logs to `logging.getLogger(__name__)` (the `ddm_ray` hierarchy). Nothing
  is printed until someone configures it: the CLI and jobs/ call `configure_logging` once
  (stderr, `[ddm-ray HH:MM:SS] message`, INFO, or WARNING with --quiet); a library user configures
  `logging` as they like. Ray workers get the same configuration from `configure_worker_logging`,
  and Ray forwards their stderr to the driver, prefixed with the actor or task name.
* Progress: `Progress(what, total, unit=...)` counts work done. On a terminal (stderr is a TTY) it
  redraws one bar line; otherwise it logs a line with rate and ETA at most every `interval_s`
  seconds, plus the final one. `ray job logs` captures the driver's stderr, which is not a
  terminal, so jobs get log lines. A Progress whose logger is not enabled for INFO is silent, so
  progress never costs anything in quiet or unconfigured runs, and it never changes results.
* ETA: from an exponentially weighted rate (`RateEstimate`: work and time both decayed with
  time constant `ETA_TAU_S`, so a change of pace shows within about that long), leaving out the
  first interval (start-up: worker launch, first compilation) once a later one exists; no ETA is
  said ("ETA estimating") before `ETA_MIN_ITEMS` units of work and `ETA_MIN_SECONDS` are done.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

ROOT = "ddm_ray"
FORMAT = "[ddm-ray %(asctime)s] %(message)s"
DATEFMT = "%H:%M:%S"
DEFAULT_INTERVAL_S = 5.0
ETA_TAU_S = 30.0  # time constant of the rate's exponential weights
ETA_MIN_ITEMS = 3  # no ETA before this much work ...
ETA_MIN_SECONDS = 2.0  # ... and this long

_log = logging.getLogger(__name__)
_bar: Progress | None = None  # the bar drawn on the terminal now, if any


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or inf
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _fmt_rate(rate: float) -> str:
    return f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"


@dataclass(frozen=True)
class RateEstimate:
    """An exponentially weighted rate of work, updated interval by interval (pure: `step`
    returns a new estimate). `work` and `time` are the decayed sums of the intervals after the
    first; the first (start-up) interval is kept apart and used only while it is the only one.
    `items` and `elapsed` are the plain totals (for the ETA's warm-up rule)."""

    work: float = 0.0
    time: float = 0.0
    first_work: float = 0.0
    first_time: float = 0.0
    items: float = 0.0
    elapsed: float = 0.0

    def step(self, dn: float, dt: float, tau_s: float = ETA_TAU_S) -> RateEstimate:
        """dn more units of work done in dt more seconds."""
        dt = max(0.0, dt)
        if self.first_work <= 0:  # still in the first interval: until the first work is done
            return RateEstimate(0.0, 0.0, self.first_work + dn, self.first_time + dt, self.items + dn, self.elapsed + dt)
        decay = math.exp(-dt / tau_s)
        return RateEstimate(self.work * decay + dn, self.time * decay + dt, self.first_work, self.first_time,
                            self.items + dn, self.elapsed + dt)

    def rate(self) -> float:
        """Units of work per second (0.0 before any work)."""
        if self.time > 0 and self.work > 0:
            return self.work / self.time
        if self.time > 0 or self.first_time > 0:  # one interval, or later ones that did nothing yet
            return (self.work + self.first_work) / (self.time + self.first_time)
        return 0.0

    def eta(self, left: float, min_items: float = ETA_MIN_ITEMS, min_seconds: float = ETA_MIN_SECONDS) -> float | None:
        """Seconds to do `left` more units at the smoothed rate; 0 when nothing is left; None
        (not known yet) before min_items units and min_seconds seconds, or at a rate of 0."""
        if left <= 0:
            return 0.0
        r = self.rate()
        if self.items < min_items or self.elapsed < min_seconds or r <= 0:
            return None
        return left / r


def eta_from_samples(
    samples: Iterable[tuple[float, float]], total: float, tau_s: float = ETA_TAU_S,
    min_items: float = ETA_MIN_ITEMS, min_seconds: float = ETA_MIN_SECONDS,
) -> float | None:
    """The ETA after a series of (timestamp in seconds, work done so far) samples, the first one
    being the start: what `Progress` says after the same updates (see `RateEstimate`)."""
    it = iter(samples)
    t_prev, done_prev = next(it)
    est = RateEstimate()
    for t, done in it:
        est = est.step(done - done_prev, t - t_prev, tau_s)
        t_prev, done_prev = t, done
    return est.eta(total - done_prev, min_items, min_seconds)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a record arrives (pytest and Ray swap it), and
    clears and redraws a progress bar around the record so that the two never share a line."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:  # StreamHandler.__init__ assigns it
        pass

    def emit(self, record: logging.LogRecord) -> None:
        bar = _bar
        if bar is not None and bar.stream is sys.stderr:
            sys.stderr.write("\r\x1b[K")
        super().emit(record)
        if bar is not None and bar.stream is sys.stderr:
            bar.draw()


def configure_logging(level: int = logging.INFO) -> None:
    """The `ddm_ray` logger writes `[ddm-ray HH:MM:SS] message` lines to stderr at `level` (and
    above). Idempotent: a second call replaces the first's handler and level."""
    logger = logging.getLogger(ROOT)
    for h in list(logger.handlers):
        if isinstance(h, _StderrHandler):
            logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def logging_level() -> int:
    """The driver's effective level for `ddm_ray` (shipped to Ray workers with their work)."""
    return logging.getLogger(ROOT).getEffectiveLevel()


def configure_worker_logging(level: int) -> None:
    """In a Ray worker: log as the driver does (Ray forwards the worker's stderr to the driver).
    Does nothing when the driver is quiet or when this process is already configured."""
    logger = logging.getLogger(ROOT)
    if level > logging.INFO or any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    configure_logging(level)


class Progress:
    """Counts work of one stage; rate and ETA are over the work done in this session, smoothed
    (`RateEstimate`).

    what: the stage's name at the start of every line; total: units of work in all; done: units
    already done before (a resumed run); unit: the work's name (plural), e.g. "epochs".
    logger: where log lines go (default `ddm_ray.engine.progress`); stream: where the terminal bar
    goes (default stderr); tty: draw a bar instead of log lines (default: stream is a terminal).
    enabled: default whether logger is enabled for INFO (quiet and unconfigured runs show nothing).
    """

    def __init__(
        self,
        total: int,
        done: int = 0,
        what: str = "online",
        unit: str = "rows",
        logger: logging.Logger | None = None,
        stream: TextIO | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        enabled: bool | None = None,
    ) -> None:
        self.total, self.done, self.what, self.unit = total, done, what, unit
        self.logger = logger or _log
        self.stream = stream or sys.stderr
        self.enabled = self.logger.isEnabledFor(logging.INFO) if enabled is None else enabled
        self.tty = _isatty(self.stream) if tty is None else tty
        self.interval_s = 0.2 if self.tty else interval_s
        self.clock = clock
        self.t0 = clock()
        self.session = 0
        self.estimate = RateEstimate()
        self._t_prev = self.t0
        self._last = -float("inf")
        self._closed = False

    def rate(self) -> float:
        """The smoothed rate (units of work per second) of this session."""
        return self.estimate.rate()

    def line(self) -> str:
        left = max(0, self.total - self.done)
        eta = self.estimate.eta(left)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.what}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
                f"{_fmt_rate(self.rate())} {self.unit}/s, ETA {'estimating' if eta is None else _fmt_eta(eta)}")

    def update(self, n: int = 1) -> None:
        """n more units of work are done."""
        self.done += n
        self.session += n
        if not self.enabled:
            return
        now = self.clock()
        self.estimate = self.estimate.step(n, now - self._t_prev)
        self._t_prev = now
        if now - self._last >= self.interval_s or self.done >= self.total:
            self._last = now
            self._emit()

    def set(self, done: int) -> None:
        """`done` units of work are done in all (for callbacks that report a running count)."""
        self.update(done - self.done)

    def _emit(self) -> None:
        global _bar
        if not self.tty:
            self.logger.info(self.line())
            return
        _bar = self
        self.draw()

    def draw(self) -> None:
        """Redraw the bar line on the terminal."""
        width = 24
        filled = min(width, int(width * self.done / self.total)) if self.total else width
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.line()}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        """End of the stage: a terminal bar is finished with a newline."""
        global _bar
        if self._closed:
            return
        self._closed = True
        if self.enabled and self.tty:
            self.draw()
            self.stream.write("\n")
            self.stream.flush()
        if _bar is self:
            _bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False

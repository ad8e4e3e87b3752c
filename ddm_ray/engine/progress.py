"""Progress of the online stage: a one-line bar on a terminal, periodic log lines otherwise.

`ray job logs` captures the driver's stderr, which is not a terminal, so jobs get log lines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or inf
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Counts rows of the online stage; rows/s and ETA are over rows computed in this session.

    total: rows the run has in all; done: rows already present (a resumed run).
    """

    def __init__(
        self,
        total: int,
        done: int = 0,
        stream: TextIO | None = None,
        interval_s: float = 10.0,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.done = total, done
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval_s = interval_s if not self.tty else 0.2
        self.clock = clock
        self.t0 = clock()
        self.session_rows = 0
        self._last = -float("inf")

    def rate(self) -> float:
        dt = self.clock() - self.t0
        return self.session_rows / dt if dt > 0 else 0.0

    def line(self) -> str:
        r = self.rate()
        left = self.total - self.done
        eta = left / r if r > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"online: {self.done}/{self.total} rows ({pct:.0f}%), {r:.1f} rows/s, ETA {_fmt_eta(eta)}"

    def update(self, rows: int) -> None:
        self.done += rows
        self.session_rows += rows
        now = self.clock()
        if now - self._last >= self.interval_s or self.done >= self.total:
            self._last = now
            self._emit()

    def _emit(self) -> None:
        if self.tty:
            width = 24
            filled = int(width * self.done / self.total) if self.total else width
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.line()}\x1b[K")
        else:
            self.stream.write(f"[ddm-ray {time.strftime('%H:%M:%S')}] {self.line()}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self._emit()
            self.stream.write("\n")
            self.stream.flush()

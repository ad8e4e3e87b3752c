"""TEST-ONLY fault injection for the online stage. Inert unless its environment variables are set.

DDM_RAY_TEST_FAIL_ONCE_DIR=<folder>: the first attempt of each block creates a marker file there
  and raises `InjectedFault`; later attempts (a Ray retry) find the marker and proceed.
DDM_RAY_TEST_BLOCK_DELAY_S=<seconds>: sleep before each block (to interrupt a run mid-stage).
"""

from __future__ import annotations

import os
import time

FAIL_ONCE_ENV = "DDM_RAY_TEST_FAIL_ONCE_DIR"
DELAY_ENV = "DDM_RAY_TEST_BLOCK_DELAY_S"


class InjectedFault(RuntimeError):
    """Raised by the test-only hook; never raised in normal runs."""


def before_block(first: int, last: int) -> None:
    delay = os.environ.get(DELAY_ENV)
    if delay:
        time.sleep(float(delay))
    folder = os.environ.get(FAIL_ONCE_ENV)
    if folder:
        marker = os.path.join(folder, f"failed-{first}-{last}")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        raise InjectedFault(f"injected failure of block {first}-{last} (test hook {FAIL_ONCE_ENV})")

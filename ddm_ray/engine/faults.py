"""TEST-ONLY fault injection for the online stage. Inert unless its environment variables are set.

DDM_RAY_TEST_FAULTS_DIR=<folder>: a file `fail-<first unit>` in that folder makes the next attempt
  of the block starting at that unit raise `InjectedFault` once (the attempt deletes the file, so a
  Ray retry proceeds). Set it before workers start; create the files whenever a test needs a fault.
DDM_RAY_TEST_BLOCK_DELAY_S=<seconds>: sleep before each block (to interrupt a run mid-stage).
"""

from __future__ import annotations

import os
import time

FAULTS_DIR_ENV = "DDM_RAY_TEST_FAULTS_DIR"
DELAY_ENV = "DDM_RAY_TEST_BLOCK_DELAY_S"


class InjectedFault(RuntimeError):
    """Raised by the test-only hook; never raised in normal runs."""


def fail_file(folder: str, first: int) -> str:
    return os.path.join(folder, f"fail-{first}")


def before_block(first: int, last: int) -> None:
    delay = os.environ.get(DELAY_ENV)
    if delay:
        time.sleep(float(delay))
    folder = os.environ.get(FAULTS_DIR_ENV)
    if folder:
        try:
            os.remove(fail_file(folder, first))  # atomic: exactly one attempt consumes the fault
        except FileNotFoundError:
            return
        raise InjectedFault(f"injected failure of block {first}-{last} (test hook {FAULTS_DIR_ENV})")


def die_file(folder: str, shard_key: str) -> str:
    return os.path.join(folder, f"die-{shard_key}")


def before_shard(shard_key: str) -> None:
    """Test hook: the distillation actor's process exits once (as a preempted worker would)
    when a die-<shard key> file is in the faults folder; inert otherwise."""
    folder = os.environ.get(FAULTS_DIR_ENV)
    if not folder:
        return
    try:
        os.remove(die_file(folder, shard_key))
    except FileNotFoundError:
        return
    os._exit(1)

"""Starting or joining a Ray runtime: the one place that calls `ray.init`.

* An address given (`--address`, else RAY_ADDRESS as inside `ray job submit`): join that cluster,
  after checking within `connect_timeout_s` that something answers there, so an unreachable
  address fails with one line instead of hanging.
* No address: start a fresh local runtime for this run only (`address="local"`), never whatever
  `ray start` left registered in Ray's temp folder, and stop it afterwards.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from urllib.parse import urlparse

from ddm_ray.errors import DDMError

DEFAULT_CONNECT_TIMEOUT_S = 30.0
LOCAL_OBJECT_STORE_BYTES = 200 * 1024 * 1024


class ClusterError(DDMError):
    """No Ray cluster could be started or reached."""


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: the given address, else RAY_ADDRESS, else None (start a local one)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of "host:port", "ray://host:port" or "http://host:port"; None for "auto"."""
    if address in ("auto", "local"):
        return None
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or parsed.port is None:
        raise ClusterError(f"Ray address {address!r} is not host:port (or ray://host:port, http://host:port)")
    return parsed.hostname, parsed.port


def check_reachable(address: str, timeout_s: float) -> None:
    """Raise ClusterError when nothing accepts a TCP connection at address within timeout_s."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} within {timeout_s:g}s ({e.__class__.__name__}: {e}); "
            "check --address / RAY_ADDRESS or raise --connect-timeout"
        ) from None


def start_or_join(
    address: str | None = None,
    num_cpus: int | None = None,
    log: Callable[[str], None] | None = None,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    local_niceness_zero: bool = False,
) -> bool:
    """Make sure this process is connected to Ray; returns True if it started a local runtime
    (which the caller then shuts down)."""
    # Ray reads its auth mode once, at import. Ray 2.60 binds its local runtime to every interface
    # (it resolves 127.0.0.1 to the node's address), so a runtime we start gets token auth unless
    # the user chose a mode or Ray was imported before we could choose; a cluster we join keeps
    # the mode it was started with (disabled unless the user says so). `cli.choose_ray_auth` makes
    # the same choice before any import.
    target = cluster_address(address)
    imported = "ray" in sys.modules
    os.environ.setdefault("RAY_AUTH_MODE", "disabled" if (target or imported) else "token")
    import ray

    log = log or (lambda msg: None)
    if ray.is_initialized():
        return False
    try:
        if target:
            probe = address if address not in (None, "auto") else os.environ.get("RAY_ADDRESS")
            if probe:
                check_reachable(probe, connect_timeout_s)
            ray.init(address=address or "auto", log_to_driver=True, logging_level="ERROR")
            log(f"ray: joined the cluster at {target}")
            return False
        if local_niceness_zero:
            # the runtime exists only for this run: its workers are the run, so they get the
            # driver's priority instead of Ray's default nice 15
            os.environ.setdefault("RAY_worker_niceness", "0")
        cpus = num_cpus or os.cpu_count() or 1
        ray.init(
            address="local", num_cpus=cpus, include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level="ERROR",
        )
        log(f"ray: started a local runtime for this run ({cpus} CPUs, auth {os.environ['RAY_AUTH_MODE']}); "
            "--address joins a cluster instead")
        return True
    except ClusterError:
        raise
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(f"cannot start or reach Ray ({target or 'local'}): {first}") from None

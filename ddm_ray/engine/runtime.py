"""Starting or joining a Ray runtime: the one place that calls `ray.init`.

* An address given (`--address`, else RAY_ADDRESS as inside `ray job submit`): join that cluster,
  after checking within `connect_timeout_s` that something answers there, so an unreachable
  address fails with one line instead of hanging.
* No address: start a fresh local runtime for this run only (`address="local"`), never whatever
  `ray start` left registered in Ray's temp folder, and stop it afterwards.

`choose_ray_auth` is the one place that decides RAY_AUTH_MODE; `ray_runtime` is the one way a run,
`ddm-ray validate` and the benchmarks start (or join) Ray and stop what they started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse

from ddm_ray.errors import DDMError

DEFAULT_CONNECT_TIMEOUT_S = 30.0
LOCAL_OBJECT_STORE_BYTES = 200 * 1024 * 1024
_log = logging.getLogger(__name__)


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


def choose_ray_auth(address: str | None = None) -> str:
    """Decide RAY_AUTH_MODE (unless the user set it) and return it; call before Ray is imported,
    which reads it once. Ray 2.60 binds the local runtime it starts to every interface (it resolves
    127.0.0.1 to the node's address), so a runtime this process starts for itself gets token auth;
    a cluster it joins (an address given, or RAY_ADDRESS as inside `ray job submit`) keeps auth
    disabled unless the user says otherwise, and so does a process that imported Ray already (too
    late to choose). The CLI and jobs/ call it first thing; `start_or_join` calls it again."""
    if "RAY_AUTH_MODE" not in os.environ:
        joining = cluster_address(address) is not None
        os.environ["RAY_AUTH_MODE"] = "disabled" if joining or "ray" in sys.modules else "token"
    _forwarded_logs_env()
    return os.environ["RAY_AUTH_MODE"]


def _forwarded_logs_env() -> None:
    """How the driver prints what workers log (progress of shards and GPU tasks): Ray must not
    merge ddm-ray's lines as repeats (read at import), nor colour them when stderr is no terminal."""
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"\[ddm-ray ")
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def inside_submitted_job() -> bool:
    """True in the driver of a `ray job submit` job (its runtime env, --working-dir included, is
    already the job's)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def user_module_env(model_ref: str, staging: str) -> dict[str, Any] | None:
    """The runtime env that ships a user model's top-level module to a cluster's workers
    (`py_modules`), or None when it is not found locally. A single-file module is staged in
    `staging` as a package of the same name (Ray ships packages and folders)."""
    import importlib.util
    import shutil

    top = model_ref.partition(":")[0].split(".")[0]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        return None
    if spec.submodule_search_locations:  # a package: ship its folder
        return {"py_modules": [list(spec.submodule_search_locations)[0]]}
    package = os.path.join(staging, top)
    os.makedirs(package, exist_ok=True)
    shutil.copyfile(spec.origin, os.path.join(package, "__init__.py"))
    return {"py_modules": [package]}


def start_or_join(
    address: str | None = None,
    num_cpus: int | None = None,
    log: Callable[[str], None] | None = None,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    local_niceness_zero: bool = False,
    runtime_env: dict[str, Any] | None = None,
) -> bool:
    """Make sure this process is connected to Ray; returns True if it started a local runtime
    (which the caller then shuts down: `ray_runtime` does both). runtime_env goes with a cluster
    joined from outside a submitted job (a local runtime's workers import from the driver's
    working directory and PYTHONPATH already; a job's were given by `ray job submit`)."""
    target = cluster_address(address)
    choose_ray_auth(address)
    import ray

    log = log or _log.info
    if ray.is_initialized():
        return False
    try:
        if target:
            probe = address if address not in (None, "auto") else os.environ.get("RAY_ADDRESS")
            if probe:
                check_reachable(probe, connect_timeout_s)
            env = runtime_env if runtime_env and not inside_submitted_job() else None
            with _keep_sigterm_handler():
                ray.init(address=address or "auto", log_to_driver=True, logging_level="ERROR",
                         **({"runtime_env": env} if env else {}))
            log(f"ray: joined the cluster at {target}" + (f" (shipping {env})" if env else ""))
            return False
        if local_niceness_zero:
            # the runtime exists only for this run: its workers are the run, so they get the
            # driver's priority instead of Ray's default nice 15
            os.environ.setdefault("RAY_worker_niceness", "0")
        cpus = num_cpus or os.cpu_count() or 1
        with _keep_sigterm_handler():
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


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """ray.init installs SIGTERM handlers of its own (an exit without a word); a Python handler
    that was there before (the CLI's: one line, lease released, resumable) is put back."""
    import signal
    import threading

    before = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def ray_runtime(
    address: str | None = None,
    num_cpus: int | None = None,
    log: Callable[[str], None] | None = None,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    local_niceness_zero: bool = False,
    runtime_env: dict[str, Any] | None = None,
) -> Iterator[bool]:
    """Connected to Ray inside the block (`start_or_join`); a local runtime started here is stopped
    on the way out, a cluster joined or a runtime already running is left as it was. Yields
    whether it started one."""
    started = start_or_join(address, num_cpus, log, connect_timeout_s, local_niceness_zero, runtime_env)
    try:
        yield started
    finally:
        if started:
            import ray

            ray.shutdown()

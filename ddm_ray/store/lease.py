"""A lease on a run folder: at most one writer at a time, on local disk and on object stores.

The lease is `<out>/lease.json` = {owner, pid, host, heartbeat (unix s), ttl_s}. A run takes it
before it touches anything, renews the heartbeat from a background thread every ttl/4 seconds and
removes it when it ends. Another run finds a live lease and is refused with one line; a lease whose
heartbeat is older than its ttl, or whose holder process on this host no longer exists (kill -9),
is taken over.

Taking it is race-safe without a lock service: write the lease, wait `settle_s`, read it back and
proceed only if it is still ours (object stores give read-after-write consistency, so of two runs
that both wrote, exactly one reads its own owner back). Local folders create the file exclusively.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from ddm_ray.errors import RunStateError, StorageError

LEASE = "lease.json"


def _holder_gone(held: dict[str, Any]) -> bool:
    """True when the lease was taken on this host by a process that no longer exists (killed):
    then it is stale at once, without waiting for its heartbeat to age."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(held.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


class Lease:
    """Hold `store`'s folder for this process (use as a context manager)."""

    def __init__(self, store: Any, ttl_s: float = 60.0, settle_s: float = 1.0, log: Any = None) -> None:
        self.store, self.ttl_s, self.settle_s = store, ttl_s, settle_s
        self.owner = uuid.uuid4().hex
        self.log = log or (lambda msg: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(),
                "heartbeat": time.time(), "ttl_s": self.ttl_s}

    def _read(self) -> dict[str, Any] | None:
        if not self.store.exists(LEASE):
            return None
        try:
            rec = json.loads(self.store.read_bytes(LEASE))
        except (StorageError, ValueError):
            return None  # unreadable (half-written by a killed holder): treat as stale
        return rec if isinstance(rec, dict) and "owner" in rec else None

    def _create_local(self, path: str) -> bool:
        """Exclusive create of a local lease; False when one exists."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
        return True

    def acquire(self) -> None:
        held = self._read()
        if held is not None and held.get("owner") != self.owner:
            age = time.time() - float(held.get("heartbeat", 0))
            if age < float(held.get("ttl_s", self.ttl_s)) and not _holder_gone(held):
                raise RunStateError(
                    f"{self.store.url} is in use by another run (pid {held.get('pid')} on {held.get('host')}, "
                    f"heartbeat {age:.0f}s ago); wait for it or choose another --out"
                )
            self.log(f"taking over a stale lease (pid {held.get('pid')} on {held.get('host')}, {age:.0f}s old)")
        if self.store.local and held is None:
            os.makedirs(self.store.root, exist_ok=True)
            if not self._create_local(self.store.path(LEASE)):
                return self.acquire()  # someone created it between our read and our create
        else:  # object store, or taking over a stale lease: write, settle, read back
            self.store.write_json(LEASE, self._record())
            time.sleep(self.settle_s)
            now = self._read()
            if now is None or now.get("owner") != self.owner:
                other = now or {}
                raise RunStateError(
                    f"{self.store.url} is in use by another run (pid {other.get('pid')} on {other.get('host')}); "
                    "wait for it or choose another --out"
                )
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.store.write_json(LEASE, self._record())
            except StorageError:
                pass  # transient; the next beat retries well within the ttl

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            held = self._read()
            if held is not None and held.get("owner") == self.owner:
                self.store.remove(LEASE)
        except StorageError:
            pass  # best effort: an unremoved lease expires after its ttl

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

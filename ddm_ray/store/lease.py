"""A lease on a run folder: at most one writer at a time, on local disk and on object stores.

The lease is `<out>/lease.json` = {owner, pid, host, heartbeat (unix s), ttl_s}. A run takes it
before it touches anything, renews the heartbeat from a background thread every ttl/4 seconds and
removes it when it ends. Another run finds a live lease and is refused with one line; a lease whose
heartbeat is older than its ttl, or whose holder process on this host no longer exists (kill -9),
is taken over.

Taking it is race-safe without a lock service: write the lease, wait `settle_s`, read it back and
proceed only if it is still ours (object stores give read-after-write consistency, so of two runs
that both wrote, exactly one reads its own owner back). Local folders create the file exclusively
and whole (a complete temporary file hard-linked to the lease name).

Fencing: a holder stalled past its ttl (SIGSTOP, a VM pause, a long GC, a network partition)
may find its lease taken over when it continues. So every write and removal through the run's
store, and every heartbeat, first checks that the lease still names this holder (`Lease.check`,
`owner_guard` for workers), and a holder that lost it stops with one line (`LeaseLost`) instead
of writing beside the taker. The holder's token (owner, generation) is recorded in every part's
checksum record and in the manifest; a manifest rewritten under another token since this run
last wrote it is refused. Only a lease this run still holds is released. What remains is the
window between a check and the write it guards (no conditional writes are used).

A `lease.json` that is not a lease (another tool's, or the user's own file) is refused with one
line and never taken over or removed; an empty or half-written lease of our format (a holder
killed between creating and writing it, as older versions could leave) is stale.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from typing import Any

from ddm_ray.errors import RunStateError, StorageError

LEASE = "lease.json"
STALE: dict[str, Any] = {"stale": True}  # what _read gives for an empty or half-written lease of ours
_ATTEMPTS = 20  # exclusive creates lost to another starting run before giving up
_FIELDS = {"owner": str, "pid": int, "host": str, "heartbeat": (int, float), "ttl_s": (int, float)}


def is_lease_file(name: str) -> bool:
    """The lease, or the hidden temporary file a local run creates it from (for a moment)."""
    return name == LEASE or (name.startswith(f".{LEASE}.") and name.endswith(".tmp"))


def parse_lease(raw: bytes, where: str) -> dict[str, Any]:
    """A lease record from its bytes; STALE for an empty file or a prefix of our own format (a
    holder killed between creating the file and writing it); RunStateError (one line) for
    anything else: a file of another tool, or the user's own, which is never taken over."""
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        return STALE
    try:
        rec = json.loads(text)
    except ValueError:
        rec = None
        if _ours_cut_short(text):
            return STALE
    if isinstance(rec, dict) and all(
        isinstance(rec.get(k), t) and not isinstance(rec.get(k), bool) for k, t in _FIELDS.items()
    ) and all(math.isfinite(float(rec[k])) for k in ("heartbeat", "ttl_s")) and (
        isinstance(rec.get("generation", 0), int) and not isinstance(rec.get("generation"), bool)
    ):
        return rec
    raise RunStateError(
        f"{where} is not a ddm-ray lease (expected the fields {', '.join(_FIELDS)}); it is not ours to take over "
        "or remove: move it away or choose another --out"
    )


def _ours_cut_short(text: str) -> bool:
    """True for the start of a lease as this module writes it, cut short: compact JSON (created
    locally; older versions wrote it in place) or indented with sorted keys (write_json)."""
    for head in ('{"owner": "', '{\n  "heartbeat": '):
        if text.startswith(head) or head.startswith(text):
            return True
    return False


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


class LeaseLost(RunStateError):
    """Another run took this run's lease over (it was stalled past the ttl): stop writing."""


def owner_guard(store: Any, token: dict[str, Any]) -> None:
    """Fence `store` (a worker's view of the run folder) with the driver's lease token: every
    write and removal other than of the lease first checks that the lease still names its owner."""

    def guard(rel: str) -> None:
        if is_lease_file(rel.rsplit("/", 1)[-1]):
            return
        raw = store.read_bytes(LEASE) if store.exists(LEASE) else b""
        try:
            held = parse_lease(raw, f"{store.url}/{LEASE}")
        except RunStateError:
            held = STALE
        if held is STALE or held.get("owner") != token["owner"]:
            raise LeaseLost(f"{store.url}: this run lost its lease to another run (pid {held.get('pid')} on "
                            f"{held.get('host')}); stopping without writing more (that run finishes the folder)")

    store.guard = guard


class Lease:
    """Hold `store`'s folder for this process (use as a context manager)."""

    def __init__(self, store: Any, ttl_s: float = 60.0, settle_s: float = 1.0, log: Any = None) -> None:
        self.store, self.ttl_s, self.settle_s = store, ttl_s, settle_s
        self.owner = uuid.uuid4().hex  # the fencing token: unique to this holding
        self.generation = 1  # one more than the lease taken over (for people reading lease.json)
        self.log = log or (lambda msg: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the lease is no longer ours, once a check found out
        self._guarded = False

    def _record(self) -> dict[str, Any]:
        return {"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(),
                "heartbeat": time.time(), "ttl_s": self.ttl_s, "generation": self.generation}

    @property
    def token(self) -> dict[str, Any]:
        """What every part record and the manifest carry: who wrote them, under which holding."""
        return {"owner": self.owner, "generation": self.generation}

    def check(self) -> None:
        """Before every write and every heartbeat: LeaseLost (one line) unless the lease is still
        ours. A holder stalled past its ttl (SIGSTOP, a VM pause, a partition) whose lease another
        run took over stops here instead of writing beside that run."""
        if self.lost is None:
            held = self._read_quietly()
            if held is None or held is STALE or held.get("owner") != self.owner:
                other = held if isinstance(held, dict) and held is not STALE else {}
                self.lost = (f"{self.store.url}: this run lost its lease to another run (pid {other.get('pid')} on "
                             f"{other.get('host')}), which took it over while this one was stalled past the "
                             f"{self.ttl_s:g}s lease; stopping without writing more (that run finishes the folder)")
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def guard(self, store: Any) -> None:
        """Make every write and removal through `store` (other than of the lease) check first."""
        store.guard = lambda rel: None if is_lease_file(rel.rsplit("/", 1)[-1]) else self.check()

    def _read(self) -> dict[str, Any] | None:
        """The lease held now: None when there is none; STALE for an empty or half-written lease
        of ours (a holder killed while creating it); RunStateError for a file that is not a lease."""
        if not self.store.exists(LEASE):
            return None
        try:
            raw = self.store.read_bytes(LEASE)
        except StorageError:
            if not self.store.exists(LEASE):
                return None  # released between the two calls
            raise
        return parse_lease(raw, f"{self.store.url}/{LEASE}")

    def _read_quietly(self) -> dict[str, Any] | None:
        """_read for release and read-back: a foreign or unreadable file counts as not ours."""
        try:
            return self._read()
        except (RunStateError, StorageError):
            return None

    def _create_local(self, path: str) -> bool:
        """Exclusive create of a local lease, whole: the record is written to a temporary file
        that is then hard-linked to the lease name (which fails when one exists), so no reader
        ever sees a half-written lease of this version. False when one exists."""
        tmp = os.path.join(os.path.dirname(path), f".{LEASE}.{self.owner}.tmp")
        with open(tmp, "w") as f:
            json.dump(self._record(), f)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
        return True

    def acquire(self) -> None:
        for _ in range(_ATTEMPTS):
            if self._try_acquire():
                self._thread = threading.Thread(target=self._beat, daemon=True)
                self._thread.start()
                return
        raise RunStateError(f"{self.store.url}: the lease kept changing hands while this run tried to take it; "
                            "another run is starting there: wait for it or choose another --out")

    def _try_acquire(self) -> bool:
        """True once the lease is ours; False when another run created it between our read and
        our create (try again); RunStateError when a live holder has it."""
        held = self._read()
        if held is STALE:
            self.log("taking over an empty or half-written lease (its holder was killed while creating it)")
        elif held is not None and held.get("owner") != self.owner:
            self.generation = int(held.get("generation", 0)) + 1
            age = time.time() - float(held["heartbeat"])
            if age < float(held["ttl_s"]) and not _holder_gone(held):
                raise RunStateError(
                    f"{self.store.url} is in use by another run (pid {held.get('pid')} on {held.get('host')}, "
                    f"heartbeat {age:.0f}s ago); wait for it or choose another --out"
                )
            self.log(f"taking over a stale lease (pid {held.get('pid')} on {held.get('host')}, {age:.0f}s old)")
        if self.store.local and held is None:
            os.makedirs(self.store.root, exist_ok=True)
            return self._create_local(self.store.path(LEASE))
        # object store, or taking over a stale lease: write, settle, read back
        self.store.write_json(LEASE, self._record())
        time.sleep(self.settle_s)
        now = self._read_quietly()
        if now is None or now is STALE or now.get("owner") != self.owner:
            other = now if isinstance(now, dict) and now is not STALE else {}
            raise RunStateError(
                f"{self.store.url} is in use by another run (pid {other.get('pid')} on {other.get('host')}); "
                "wait for it or choose another --out"
            )
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.check()
                self.store.write_json(LEASE, self._record())
            except LeaseLost:
                return  # never renew a lease another run holds; the next write stops this run
            except StorageError:
                pass  # transient; the next beat retries well within the ttl

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            held = self._read_quietly()
            if self.lost is None and held is not None and held is not STALE and held.get("owner") == self.owner:
                self.store.remove(LEASE)  # release only a lease this run still holds
        except StorageError:
            pass  # best effort: an unremoved lease expires after its ttl

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

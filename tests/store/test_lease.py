"""The run-folder lease: one writer at a time on local folders and S3 (moto), stale leases taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ddm_ray.errors import RunStateError
from ddm_ray.store.lease import LEASE, Lease
from ddm_ray.store.run_store import RunStore
from tests.engine.conftest import AWS_ENV

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3_url(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[str]:
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    for k, v in AWS_ENV.items():
        monkeypatch_module.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="leases")
    monkeypatch_module.setenv("AWS_ENDPOINT_URL", endpoint)
    yield "s3://leases/run"
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _store(url: str) -> RunStore:
    if url.startswith("s3://"):
        import os

        return RunStore(url, {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    return RunStore(url)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_holder_is_refused_until_release(tmp_path, where, request):
    url = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_url") + "-a"
    store = _store(url)
    first = Lease(store, ttl_s=30, settle_s=0.2)
    first.acquire()
    try:
        with pytest.raises(RunStateError, match="in use by another run"):
            Lease(_store(url), ttl_s=30, settle_s=0.2).acquire()
        rec = json.loads(store.read_bytes(LEASE))
        assert rec["owner"] == first.owner and {"pid", "host", "heartbeat", "ttl_s"} <= set(rec)
    finally:
        first.release()
    assert not store.exists(LEASE)
    with Lease(_store(url), ttl_s=30, settle_s=0.2):
        pass


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_stale_lease_is_taken_over_and_heartbeats_renew(tmp_path, where, request):
    url = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_url") + "-b"
    store = _store(url)
    store.write_json(LEASE, {"owner": "dead", "pid": 1, "host": "gone", "heartbeat": time.time() - 600, "ttl_s": 60})
    lease = Lease(store, ttl_s=0.8, settle_s=0.2)
    lease.acquire()
    try:
        t0 = json.loads(store.read_bytes(LEASE))["heartbeat"]
        time.sleep(0.6)
        assert json.loads(store.read_bytes(LEASE))["heartbeat"] > t0, "the heartbeat renews the lease"
    finally:
        lease.release()


def test_two_runs_started_together_exactly_one_proceeds(tmp_path):
    out = str(tmp_path / "shared")
    base = [sys.executable, "-m", "ddm_ray.cli", "run", "--engine", "local", "--quiet", "--max-train", "300",
            "--epochs", "3", "--clusters-per-class", "2", "--out", out]
    a = subprocess.Popen([*base, "--seed", "0"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    b = subprocess.Popen([*base, "--seed", "1"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (a, b)]
    codes = sorted(rc for rc, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for rc, err in results if rc != 0).strip().splitlines()
    assert len(loser) == 1 and ("in use by another run" in loser[0] or "another config" in loser[0]), loser
    winner_seed = 0 if results[0][0] == 0 else 1
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["train"]["seed"] == winner_seed
    assert not (Path(out) / LEASE).exists()


def test_a_lease_of_a_dead_local_process_is_taken_over_at_once(tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = RunStore(str(tmp_path / "run"))
    store.write_json(LEASE, {"owner": "killed", "pid": dead.pid, "host": socket.gethostname(),
                             "heartbeat": time.time(), "ttl_s": 60})
    with Lease(store, ttl_s=60, settle_s=0.1) as lease:
        assert json.loads(store.read_bytes(LEASE))["owner"] == lease.owner


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("content", [b'{"a": 1}', b"[1, 2]", b"my notes\n", b'{"owner": 7, "pid": 1, "host": "h", '
                                     b'"heartbeat": 1.0, "ttl_s": 60}'])
def test_a_foreign_lease_file_is_refused_with_one_line_and_left_alone(tmp_path, where, content, request):
    url = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_url") + f"-f{abs(hash(content))}"
    store = _store(url)
    store.write_bytes(LEASE, content)
    with pytest.raises(RunStateError, match="is not a ddm-ray lease") as e:
        Lease(store, ttl_s=30, settle_s=0.1).acquire()
    assert "\n" not in str(e.value)
    assert store.read_bytes(LEASE) == content, "never taken over or removed"


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("content", [b"", b"  \n", b'{"owner": "4f1c', b'{"owner": "4f1c2", "pid": 12'])
def test_an_empty_or_half_written_lease_is_stale(tmp_path, where, content, request):
    url = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_url") + f"-h{abs(hash(content))}"
    store = _store(url)
    store.write_bytes(LEASE, content)
    messages: list[str] = []
    with Lease(store, ttl_s=30, settle_s=0.1, log=messages.append) as lease:
        assert json.loads(store.read_bytes(LEASE))["owner"] == lease.owner
    assert not store.exists(LEASE) and any("half-written" in m for m in messages)


def test_a_run_into_a_folder_with_a_foreign_lease_is_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE).write_text('{"a": 1}')
    r = subprocess.run([sys.executable, "-m", "ddm_ray.cli", "run", "--engine", "local", "--quiet", "--max-train", "200",
                        "--epochs", "1", "--clusters-per-class", "1", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "not a ddm-ray lease" in lines[0], r.stderr[-2000:]
    assert "RecursionError" not in r.stderr and (out / LEASE).read_text() == '{"a": 1}'
    assert sorted(os.listdir(out)) == [LEASE]


def test_a_local_lease_is_never_seen_half_written(tmp_path):
    """Created whole (a hard link of a complete file): a reader racing the creator never sees it
    empty, and the temporary file it is made from does not make the folder look like a stranger's."""
    store = RunStore(str(tmp_path / "run"))
    with Lease(store, ttl_s=30, settle_s=0.1) as lease:
        assert json.loads(store.read_bytes(LEASE))["owner"] == lease.owner
        assert store.list("") == [LEASE]


FENCE_RUN = ["run", "--engine", "local", "--quiet", "--max-train", "300", "--max-test", "60", "--epochs", "2",
             "--clusters-per-class", "2", "--hidden", "16", "--distill-steps", "5", "--block-units", "2",
             "--lease-ttl", "2"]


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_stalled_holder_and_its_taker_exactly_one_completes(tmp_path, where, request):
    """A holder stopped (SIGSTOP) past its lease's ttl, a taker that resumes the folder, then the
    holder continued (SIGCONT): the holder finds it lost the lease before its next write and stops
    with one line; the taker completes; the lease is released once, by the run that holds it."""
    import signal

    from ddm_ray.engine import faults

    url = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_url") + "-fence"
    store = _store(url)
    env = {**os.environ, faults.DELAY_ENV: "0.6", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "RAY_AUTH_MODE": "disabled"}
    env.pop(faults.FAULTS_DIR_ENV, None)

    def start(*extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "ddm_ray.cli", *FENCE_RUN, "--out", url, *extra], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def holder_pid() -> int | None:
        try:
            return int(json.loads(store.read_bytes(LEASE))["pid"])
        except Exception:  # noqa: BLE001 - absent or being replaced
            return None

    def written_by(generation: int) -> set[str]:
        recs = {n: store.part_record(n) for n in store.parts()}
        return {n for n, r in recs.items() if r and r.get("lease", {}).get("generation") == generation}

    a = start()
    b = None
    try:
        _wait(lambda: a.poll() is not None or any(store.part_record(n) for n in store.parts()), 240, "a first part")
        assert a.poll() is None, a.communicate()[1][-2000:]
        os.kill(a.pid, signal.SIGSTOP)
        time.sleep(3)  # past the 2 s ttl: the lease is stale
        b = start("--resume")
        _wait(lambda: b.poll() is not None or holder_pid() == b.pid, 120, "the taker to hold the lease")
        assert b.poll() is None, b.communicate()[1][-2000:]
        before = written_by(1)  # the parts the stopped holder had finished
        os.kill(a.pid, signal.SIGCONT)
        ra, (_, err_a) = a.wait(timeout=120), a.communicate()
        rb, (_, err_b) = b.wait(timeout=240), b.communicate()
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
    assert rb == 0, err_b[-2000:]
    lines = err_a.strip().splitlines()
    assert ra == 2 and len(lines) == 1 and "lost its lease" in lines[0], err_a[-2000:]
    m = store.read_json("manifest.json")
    assert m["status"] == "complete" and m["counts"]["rows"] == 60
    assert not store.exists(LEASE)
    assert m["lease"]["generation"] == 2 and set(m["parts"]) == set(store.parts())
    assert written_by(1) <= before, "the continued holder wrote no part after losing its lease"
    assert written_by(2) and written_by(1) | written_by(2) == set(store.parts())

"""`ray job submit` of jobs/audit.py against a local `ray start --head` cluster and moto S3."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ddm_ray.store.run_store import RunStore
from tests.engine.conftest import AWS_ENV, TINY, free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _ray_cli() -> list[str]:
    exe = shutil.which("ray")
    return [exe] if exe else [sys.executable, "-m", "ray.scripts.scripts"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, moto_s3: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Dashboard address of a local head node (2 CPUs) and the env to talk to it."""
    port, dash = free_port(), free_port()
    tmp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, **AWS_ENV, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "RAY_ADDRESS": f"127.0.0.1:{port}"}
    env.pop("DDM_RAY_TEST_FAULTS_DIR", None)
    start = [*_ray_cli(), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0", "--port", str(port),
             "--dashboard-port", str(dash), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--object-store-memory", str(200 * 1024 * 1024), "--temp-dir", str(tmp), "--disable-usage-stats"]
    # --block in its own session: teardown stops exactly this head (never `ray stop`, which would
    # stop every Ray process on the machine)
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    env["RAY_ADDRESS"] = address
    try:
        _wait_for_dashboard(address, head)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of this head left in its process group
        except ProcessLookupError:
            pass
        head.wait(timeout=30)


def _wait_for_dashboard(address: str, head: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {address} did not come up")


def _submit(env: dict[str, str], address: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    runtime_env = {"env_vars": {k: env[k] for k in (*AWS_ENV, "OMP_NUM_THREADS")}}
    cmd = [*_ray_cli(), "job", "submit", "--address", address, "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--", "python", "jobs/audit.py", *args]
    deadline = time.monotonic() + 120
    while True:  # the head's job agent may come up a little after the dashboard
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent to submit job" not in r.stderr + r.stdout or time.monotonic() > deadline:
            return r
        time.sleep(3)


def test_audit_job_writes_a_complete_run_to_s3(cluster: tuple[str, dict[str, str]], moto_s3: str) -> None:
    address, env = cluster
    r = _submit(env, address, ["--out", "s3://ddm/job-run", "--storage-option", f"endpoint_url={moto_s3}",
                               "--device", "auto", *[t for t in TINY if t != "--quiet"]])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "complete: 20 units x" in r.stdout
    store = RunStore("s3://ddm/job-run", {"endpoint_url": moto_s3, **{
        "key": "testing", "secret": "testing", "region": "us-east-1"}})
    manifest = store.read_json(RunStore.MANIFEST)
    assert manifest["status"] == "complete" and manifest["execution"]["device"] == "cpu"
    assert len(store.parts()) == manifest["counts"]["parts"]


def test_bad_input_job_exits_non_zero(cluster: tuple[str, dict[str, str]]) -> None:
    address, env = cluster
    r = _submit(env, address, ["--dataset", "parquet", "--out", "s3://ddm/bad", "--quiet"])
    assert r.returncode != 0
    assert "ddm-ray: error: dataset parquet needs --train and --test" in r.stdout + r.stderr

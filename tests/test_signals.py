"""SIGTERM (what `timeout`, `ray job stop` and orchestrators send) is handled like SIGINT: one
line, the lease released, and the run resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddm_ray.cli import main
from ddm_ray.engine import faults
from ddm_ray.store.lease import LEASE
from ddm_ray.store.run_store import RunStore

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["--epochs", "2", "--distill-steps", "5", "--max-train", "300", "--max-test", "60",
            "--clusters-per-class", "4", "--block-units", "4", "--hidden", "16", "--min-unit-size", "1",
            "--quiet"]


def _start(out: Path, engine: str) -> subprocess.Popen[str]:
    env = {**os.environ, faults.DELAY_ENV: "0.5", "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(REPO)}
    env.pop(faults.FAULTS_DIR_ENV, None)
    return subprocess.Popen([sys.executable, "-m", "ddm_ray.cli", "run", "--engine", engine, "--out", str(out),
                             *(["--num-cpus", "1"] if engine == "ray" else []), *SETTINGS],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _terminate_mid_online(proc: subprocess.Popen[str], out: Path) -> tuple[int, str]:
    parts = out / "attribution"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if parts.exists() and [p for p in parts.iterdir() if p.suffix == ".parquet"]:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be terminated"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_sigterm_mid_run_is_one_line_releases_the_lease_and_resumes(tmp_path, engine):
    out = tmp_path / "run"
    rc, err = _terminate_mid_online(_start(out, engine), out)
    lines = err.strip().splitlines()
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert lines == ["ddm-ray: terminated (SIGTERM); rerun with --resume to finish"], err[-2000:]
    assert not (out / LEASE).exists(), "the lease is released"
    store = RunStore(str(out))
    assert store.read_json(RunStore.MANIFEST)["status"] == "running"
    assert main(["run", "--engine", "local", "--resume", "--out", str(out), *SETTINGS]) == 0
    m = store.read_json(RunStore.MANIFEST)
    assert m["status"] == "complete" and 0 < m["counts"]["rows_computed_this_session"] < m["counts"]["rows"]

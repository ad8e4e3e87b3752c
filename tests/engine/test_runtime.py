"""Starting or joining Ray: unreachable addresses fail fast with one line; a stale local cluster
registered in Ray's temp folder is never picked up by a run without an address."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ddm_ray.engine.fanout import FanOut
from ddm_ray.engine.runtime import ClusterError, check_reachable, choose_ray_auth
from tests.engine.conftest import TINY, free_port

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddm_ray.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_check_reachable_fails_fast_and_names_the_address() -> None:
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=f"127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ClusterError, match="not host:port"):
        check_reachable("nonsense", timeout_s=1)
    check_reachable("auto", timeout_s=1)  # resolved by Ray itself


def test_one_decision_of_the_auth_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert choose_ray_auth("10.0.0.1:6379") == "disabled"  # joining a cluster
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert choose_ray_auth(None) == "token"  # a runtime of its own, chosen before Ray is imported
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert choose_ray_auth(None) == "disabled"  # the user's choice stands
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert choose_ray_auth(None) == "disabled"  # inside `ray job submit`


def test_local_fan_out_keeps_order_and_reports_each_item() -> None:
    done: list[int] = []
    with FanOut("local") as fan:
        assert fan.map(lambda k, v: k * v, 3, [1, 2, 5], on_done=done.append) == [3, 6, 15]
    assert done == [0, 1, 2]


def test_unreachable_address_is_one_line_and_bounded(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    port = free_port()
    t0 = time.monotonic()
    r = _run(["run", *TINY, "--address", f"127.0.0.1:{port}", "--connect-timeout", "3",
              "--out", str(tmp_path / "o")], env, timeout=60)
    assert r.returncode != 0 and time.monotonic() - t0 < 45
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot reach the Ray cluster" in err[0], r.stderr


@pytest.mark.slow
def test_a_stale_cluster_address_file_is_ignored_and_the_own_runtime_uses_auth() -> None:
    tmp = tempfile.mkdtemp(prefix="ddm", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        # no RAY_AUTH_MODE: the runtime a run starts for itself is protected by token auth
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        env.update({"RAY_TMPDIR": tmp, "OMP_NUM_THREADS": "1"})
        out = os.path.join(tmp, "out")
        r = _run(["run", *[a for a in TINY if a != "--quiet"], "--num-cpus", "2", "--device", "cpu",
                  "--out", out], env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "started a local runtime" in r.stderr and "auth token" in r.stderr
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_user_model_module_is_staged_for_a_cluster(tmp_path, monkeypatch):
    from ddm_ray.engine.runtime import user_module_env

    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "single_file_models.py").write_text("def build(s, c):\n    return None\n")
    (tmp_path / "work" / "pkg_models").mkdir()
    (tmp_path / "work" / "pkg_models" / "__init__.py").write_text("")
    (tmp_path / "work" / "pkg_models" / "nets.py").write_text("def build(s, c):\n    return None\n")
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    staging = tmp_path / "staging"
    env = user_module_env("single_file_models:build", str(staging))
    assert env == {"py_modules": [str(staging / "single_file_models")]}
    assert (staging / "single_file_models" / "__init__.py").read_text().startswith("def build")
    assert user_module_env("pkg_models.nets:build", str(staging)) == {
        "py_modules": [str(tmp_path / "work" / "pkg_models")]}
    assert user_module_env("no_such_module_anywhere:build", str(staging)) is None

"""The Ray engine end to end on one shared local runtime (2 CPUs, 2 logical GPUs, no CUDA touched):
S3 output on moto, GPU pinning and class sharding, retried tasks, --method exact, kill -9 then --resume.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ddm_ray.cli import build_parser, configs_from_args, main
from ddm_ray.engine import faults, run_with_engine
from ddm_ray.engine.placement import Placement
from ddm_ray.engine.ray_executor import RayExecutor
from ddm_ray.pipeline import Run
from ddm_ray.store.run_store import RunStore
from tests.engine.conftest import AWS_ENV, TINY

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One Ray runtime for the module; yields the folder of the test-only fault hook."""
    fault_dir = tmp_path_factory.mktemp("faults")
    os.environ[faults.FAULTS_DIR_ENV] = str(fault_dir)  # inherited by the workers Ray starts
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             logging_level="ERROR", log_to_driver=False)
    yield fault_dir
    ray.shutdown()
    os.environ.pop(faults.FAULTS_DIR_ENV, None)


def configs(*extra: str):
    a = build_parser().parse_args(["run", *TINY, "--device", "cpu", *extra])
    return configs_from_args(a)


def rows(url: str, storage_options: dict[str, str] | None = None) -> dict[tuple[int, str], list[float]]:
    store = RunStore(url, storage_options)
    out: dict[tuple[int, str], list[float]] = {}
    for name in store.parts():
        t = store.read_table(f"{RunStore.ATTRIBUTION}/{name}").to_pydict()
        for u, o, d in zip(t["unit_id"], t["objective"], t["delta"], strict=True):
            assert (u, o) not in out, f"duplicate row {(u, o)}"
            out[(u, o)] = d
    return out


def test_run_to_s3_on_moto_read_back_with_pyarrow(ray_runtime: Path, moto_s3: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    cfg, exe = configs("--storage-option", f"endpoint_url={moto_s3}", "--block-units", "4")
    manifest = run_with_engine(cfg, exe, "s3://ddm/run1")
    assert manifest["status"] == "complete" and manifest["execution"]["executor"] == "ray"

    import pyarrow.fs as pafs

    host = moto_s3.split("://", 1)[1]
    s3 = pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1")
    table = pq.read_table("ddm/run1/attribution", filesystem=s3)
    n_units, n_test = manifest["counts"]["units"], manifest["counts"]["test_samples"]
    assert table.num_rows == n_units * 3 == 60
    keys = set(zip(table["unit_id"].to_pylist(), table["objective"].to_pylist(), strict=True))
    assert len(keys) == table.num_rows
    assert {len(d) for d in table["delta"].to_pylist()} == {n_test}
    files = {i.path for i in s3.get_file_info(pafs.FileSelector("ddm/run1", recursive=True))}
    assert "ddm/run1/manifest.json" in files and "ddm/run1/artifacts/synset.pt" in files


@pytest.mark.parametrize("solver,kind", [("adjoint", "columns"), ("forward", "units")])
def test_distill_shards_spread_over_actors_pinned_to_logical_gpus(ray_runtime: Path, tmp_path: Path,
                                                                 solver: str, kind: str) -> None:
    cfg, exe = configs("--target-solver", solver, "--probe-rank", "32")
    # what plan_placement picks on a 2-GPU cluster, but torch stays on CPU (no CUDA here)
    placement = Placement(device="cpu", actors=2, actor_gpus=1.0, task_gpus=1.0)
    executor = RayExecutor(placement, task_slots=2)
    manifest = Run(cfg, exe, str(tmp_path / "run"), executor).execute(n_shards=placement.actors)
    assert manifest["status"] == "complete"
    assert len(executor.actor_gpu_ids) == 2 and all(k.startswith(kind) for k in executor.actor_gpu_ids)
    gpus = [ids for ids in executor.actor_gpu_ids.values()]
    assert all(len(ids) == 1 for ids in gpus), "each distillation actor holds exactly one GPU"
    assert len({str(ids[0]) for ids in gpus}) == 2, "two actors on two distinct GPUs"
    # training + k-means, the stability check, the cost estimate's timed kernels, the probe subspace
    # and the calibration's exact retrainings: each ran as a task holding one GPU
    assert len(executor.call_gpu_ids) == 5 and all(len(ids) == 1 for ids in executor.call_gpu_ids)
    local = tmp_path / "local"
    assert main(["run", *TINY, "--engine", "local", "--target-solver", solver, "--probe-rank", "32",
                 "--out", str(local)]) == 0
    got, want = rows(str(tmp_path / "run")), rows(str(local))
    assert set(got) == set(want)
    worst = max(
        max(abs(a - b) for a, b in zip(got[k], want[k], strict=True)) / (max(abs(b) for b in want[k]) + 1e-12)
        for k in want
    )
    assert worst <= 1e-4, f"ray and local engines disagree by {worst:.2e} (relative)"


def test_a_distillation_actor_that_dies_is_replaced_and_its_shard_rerun(ray_runtime: Path, tmp_path: Path) -> None:
    cfg, exe = configs("--target-solver", "forward", "--probe-rank", "32")
    Path(faults.die_file(str(ray_runtime), "units-000000-000010")).touch()
    placement = Placement(device="cpu", actors=2, actor_gpus=0.0, task_gpus=0.0)
    executor = RayExecutor(placement, task_slots=2)
    manifest = Run(cfg, exe, str(tmp_path / "run"), executor).execute(n_shards=2)
    assert not list(ray_runtime.iterdir()), "the injected actor death fired"
    assert executor.actor_restarts == 1 and manifest["status"] == "complete"
    assert len(rows(str(tmp_path / "run"))) == 60


def test_a_task_that_fails_once_is_retried_and_the_run_completes(ray_runtime: Path, tmp_path: Path) -> None:
    fault_dir = ray_runtime
    for first in (0, 8):
        Path(faults.fail_file(str(fault_dir), first)).touch()
    cfg, exe = configs("--block-units", "4")
    manifest = run_with_engine(cfg, exe, str(tmp_path / "run"))
    assert not list(fault_dir.iterdir()), "both injected faults fired"
    assert manifest["status"] == "complete"
    assert len(rows(str(tmp_path / "run"))) == 60


def test_exact_method_runs_one_task_per_unit_and_equals_the_local_engine(ray_runtime: Path, tmp_path: Path) -> None:
    cfg, exe = configs("--method", "exact")
    manifest = run_with_engine(cfg, exe, str(tmp_path / "ray"))
    assert manifest["status"] == "complete" and manifest["method"] == "exact"
    assert manifest["execution"]["executor"] == "ray" and manifest["execution"]["block_units"] == 1
    assert manifest["counts"]["parts"] == manifest["counts"]["units"] == 20
    assert manifest["cost_estimate"]["break_even_units"] >= 1
    assert main(["run", *TINY, "--engine", "local", "--method", "exact", "--out", str(tmp_path / "local")]) == 0
    got, want = rows(str(tmp_path / "ray")), rows(str(tmp_path / "local"))
    assert set(got) == set(want) and len(got) == 60
    worst = max(
        max(abs(a - b) for a, b in zip(got[k], want[k], strict=True)) / (max(abs(b) for b in want[k]) + 1e-12)
        for k in want
    )
    assert worst <= 1e-4, f"ray and local exact retraining disagree by {worst:.2e} (relative)"


@pytest.mark.slow
def test_kill_9_mid_online_then_resume_gives_exactly_once_rows(ray_runtime: Path, tmp_path: Path) -> None:
    settings = ["--epochs", "3", "--distill-steps", "20", "--max-train", "400", "--clusters-per-class", "8",
                "--block-units", "8", "--device", "cpu", "--min-unit-size", "1", "--quiet"]
    out = tmp_path / "killed"
    env = {**os.environ, faults.DELAY_ENV: "0.4", "OMP_NUM_THREADS": "1"}
    env.pop(faults.FAULTS_DIR_ENV, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddm_ray.cli", "run", "--engine", "local", "--out", str(out), *settings],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    parts_dir = out / "attribution"
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if parts_dir.exists() and len([p for p in parts_dir.iterdir() if p.suffix == ".parquet"]) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    store = RunStore(str(out))
    assert store.read_json(RunStore.MANIFEST)["status"] == "running"
    # the parts a resume keeps: written and recorded (a kill between a part and its checksum record
    # leaves a part the resume recomputes)
    n_parts_before = sum(store.part_problem(n, store.part_record(n), 8 * 3) is None for n in store.parts())
    assert 1 <= n_parts_before < 10

    # resume on the Ray engine (a different engine than the interrupted run; rows must not change)
    assert main(["run", "--engine", "ray", "--resume", "--out", str(out), *settings]) == 0
    resumed = store.read_json(RunStore.MANIFEST)
    assert resumed["status"] == "complete"
    assert resumed["counts"]["rows_computed_this_session"] == (10 - n_parts_before) * 8 * 3
    assert all(".tmp-" not in n for n in store.list(RunStore.ATTRIBUTION))

    ref = tmp_path / "uninterrupted"
    assert main(["run", "--engine", "local", "--out", str(ref), *settings]) == 0
    got, want = rows(str(out)), rows(str(ref))
    assert len(got) == 80 * 3 and set(got) == set(want)
    assert all(got[k] == want[k] for k in want), "resumed rows equal an uninterrupted run's rows"

"""`--method exact` end to end on digits (local engine), and the cost estimate with its break-even line."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from ddm_ray.cli import main
from ddm_ray.config import OnlineConfig, RunConfig
from ddm_ray.cost import break_even_units, cost_lines, estimate_cost
from ddm_ray.engine import faults
from ddm_ray.engine.faults import InjectedFault
from ddm_ray.store.run_store import ATTRIBUTION_SCHEMA, RunStore

# digits, 300 training samples, 20 units of about 15 samples: each retraining is 9 SGD steps
DIGITS = ["--dataset", "digits", "--max-train", "300", "--max-test", "120", "--epochs", "3",
          "--clusters-per-class", "2", "--engine", "local"]
OBJECTIVES = ("loss", "margin", "correct")


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _rows(out: Path) -> dict[tuple[int, str], list[float]]:
    table = pq.read_table(out / "attribution")  # every part, read back with pyarrow
    assert table.schema.equals(ATTRIBUTION_SCHEMA)
    rows: dict[tuple[int, str], list[float]] = {}
    for u, o, d in zip(table["unit_id"].to_pylist(), table["objective"].to_pylist(), table["delta"].to_pylist(),
                       strict=True):
        assert (u, o) not in rows, f"duplicate row {(u, o)}"
        rows[(u, o)] = d
    return rows


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A complete --method exact run and what it logged on stderr."""
    out = tmp_path_factory.mktemp("exact") / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # the ddm_ray log lines go to whatever sys.stderr is
        assert main(["run", *DIGITS, "--method", "exact", "--out", str(out)]) == 0
    return out, err.getvalue()


def test_exact_run_writes_the_output_contract(exact_run: tuple[Path, str]) -> None:
    out, log = exact_run
    m = _manifest(out)
    assert m["status"] == "complete" and m["method"] == "exact" and m["config"]["online"]["method"] == "exact"
    n_units = m["counts"]["units"]
    assert n_units == 20 and m["counts"]["rows"] == 3 * n_units
    assert m["execution"]["block_units"] == 1 and m["counts"]["parts"] == n_units  # one retraining per task
    assert len(m["parts"]) == n_units and "exact" in m["timings_seconds"] and "distill" not in m["timings_seconds"]
    assert not (out / "artifacts" / "synset.pt").exists() and not (out / "artifacts" / "distill").exists()
    rows = _rows(out)
    assert set(rows) == {(u, o) for u in range(n_units) for o in OBJECTIVES}
    assert {len(d) for d in rows.values()} == {120}
    est = m["cost_estimate"]
    assert est["distill_trainings"] > 0 and est["break_even_units"] == break_even_units(est["distill_trainings"])
    # the estimate before the work, and the measured cost of the retrainings after it
    assert "cost estimate: DDM's distillation about" in log and f"break-even at about {est['break_even_units']} units" in log
    assert "cost: exact retraining took" in log


def test_exact_rows_equal_validates_exact_retraining(exact_run: tuple[Path, str]) -> None:
    from ddm_ray.core.models import Network
    from ddm_ray.core.objectives import all_objectives
    from ddm_ray.core.online import base_objectives
    from ddm_ray.data import load_dataset
    from ddm_ray.engine.fanout import FanOut
    from ddm_ray.validate import RetrainJob, retrain_logits

    out, _ = exact_run
    cfg = RunConfig.from_dict(_manifest(out)["config"])
    ds = load_dataset(cfg.data, {})
    state = RunStore(str(out)).read_torch(RunStore.MODEL)
    net = Network(cfg.model, ds.input_shape, ds.num_classes)
    units = [0, 13]
    job = RetrainJob(cfg, ds.input_shape, ds.num_classes, state["params0"], ds.x_train, ds.y_train, ds.x_test)
    keeps = torch.stack([state["unit_of"] != u for u in units])
    with FanOut("local") as fan:
        logits, _ = retrain_logits(fan, job, keeps, chunk=1)
    base = base_objectives(net, state["checkpoints"][-1], ds.x_test, ds.y_test, OBJECTIVES)
    want = all_objectives(logits, ds.y_test, OBJECTIVES) - base[:, None, :]  # (n_obj, units, N)
    rows = _rows(out)
    for i, u in enumerate(units):
        for j, o in enumerate(OBJECTIVES):
            got = torch.tensor(rows[(u, o)])
            assert torch.allclose(got, want[j, i], atol=1e-5, rtol=1e-5), (u, o, float((got - want[j, i]).abs().max()))
    assert float(want[0].abs().max()) > 0, "the removals move the test loss"


def test_readers_on_an_exact_run(exact_run: tuple[Path, str], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = exact_run
    assert main(["inspect", "--out", str(out), "--unit", "4", "--top", "2"]) == 0
    assert "unit 4" in capsys.readouterr().out
    assert main(["validate", str(out), "--engine", "local", "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--method exact" in err[0] and "nothing to validate" in err[0], err
    report = tmp_path / "report"
    assert main(["report", str(out), "--report-out", str(report), "--max-tests", "2"]) == 0
    assert 'id="exact-rows"' in (report / "index.html").read_text()


def test_exact_resume_after_an_interruption_loses_and_repeats_no_row(
    exact_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, _ = exact_run
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    monkeypatch.setenv(faults.FAULTS_DIR_ENV, str(fault_dir))
    (Path(faults.fail_file(str(fault_dir), 7))).touch()  # the block of unit 7 fails: units 0..6 are written
    out = tmp_path / "run"
    with pytest.raises(InjectedFault):
        main(["run", *DIGITS, "--method", "exact", "--quiet", "--out", str(out)])
    m = _manifest(out)
    assert m["status"] == "running"
    assert sorted(p.name for p in (out / "attribution").iterdir()) == [
        f"part-{u:09d}-{u:09d}.parquet" for u in range(7)]
    assert main(["run", *DIGITS, "--method", "exact", "--quiet", "--resume", "--out", str(out)]) == 0
    m = _manifest(out)
    assert m["status"] == "complete" and m["counts"]["rows_computed_this_session"] == (20 - 7) * 3
    assert _rows(out) == _rows(ref), "resumed rows equal an uninterrupted run's"
    names = sorted(p.name for p in (ref / "attribution").iterdir())
    assert sorted(p.name for p in (out / "attribution").iterdir()) == names
    assert all((out / "attribution" / n).read_bytes() == (ref / "attribution" / n).read_bytes() for n in names)


def test_ddm_below_break_even_warns_and_suggests_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ddm"
    assert main(["run", *DIGITS, "--clusters-per-class", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    m = _manifest(out)
    est, n_units = m["cost_estimate"], m["counts"]["units"]
    assert m["method"] == "ddm" and n_units == 10
    assert f"break-even at about {est['break_even_units']} units; this run has {n_units}" in err
    # 10 units against 2 calibration retrainings (a quarter of the units at most) plus an adjoint
    # over every direction at every step
    assert est["pieces_trainings"]["calibration"] == 2.0 and est["pieces_trainings"]["unrolled"] > 2
    assert est["break_even_units"] > n_units
    warning = [line for line in err.splitlines() if "below the break-even" in line]
    assert len(warning) == 1 and "--method exact" in warning[0] and f"{n_units} units" in warning[0]
    # the measured line, in trainings, after the distillation
    assert "cost: distillation took" in err and f"estimated {est['distill_trainings']:.1f})" in err
    assert m["distillation"]["distill_trainings"] > 0


def test_the_estimate_counts_what_the_config_runs_and_the_break_even_rule() -> None:
    kernels = {"batch": 100.0, "step_s": 0.001, "per_sample_s": 0.004, "adjoint_step_s": 0.05,
               "adjoint_directions": 256.0}
    cfg = RunConfig()
    est = estimate_cost(cfg, 1200, 597, 71, 9000, kernels)
    # one training = 30 epochs x 12 steps at 1 ms; with 71 units < k/2 the forward unroll is cheaper
    # than the adjoint: a training plus 360 x (a per-sample pass + 72 directions at 50/256 ms)
    assert est["training_seconds"] == pytest.approx(0.36)
    assert est["pieces_trainings"]["unrolled"] == pytest.approx((0.36 + 360 * (0.004 + 72 * 0.05 / 256)) / 0.36, abs=1e-3)
    many = estimate_cost(cfg, 1200, 597, 300, 9000, kernels)  # the adjoint: 360 x (1 + 50) ms = 51 trainings
    assert many["pieces_trainings"]["unrolled"] == pytest.approx(51.0)
    assert est["pieces_trainings"]["calibration"] == pytest.approx(16.0)
    assert set(est["pieces_trainings"]) == {"subspace", "influence", "unrolled", "calibration"}
    assert est["directions_at_most"] == 256 and est["unrolled_directions_at_most"] == 256
    assert est["break_even_units"] == break_even_units(est["distill_trainings"]) == 37
    # a model with convolutions: the adjoint on 32 directions only, 32/256 of the cost per step
    conv = estimate_cost(cfg, 1200, 597, 71, 9000, {**kernels, "convolutions": 1.0})
    assert conv["unrolled_directions_at_most"] == 32
    assert conv["pieces_trainings"]["unrolled"] == pytest.approx(30 * 12 * (0.001 + 0.05 / 8) / 0.36, abs=1e-3)
    # the cheap recipe asked for: no adjoint, the Gauss-Newton curvature on 512 samples (10 classes
    # x 6 per-sample batches) plus the unit gradients (12 batches), and one length on 4 units
    cheap = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, unrolled_rank=0, curvature="ggn"))
    conv0 = estimate_cost(cheap, 1200, 597, 71, 9000, {**kernels, "convolutions": 1.0, "num_classes": 10.0})
    assert conv0["unrolled_directions_at_most"] is None and "unrolled" not in conv0["pieces_trainings"]
    assert conv0["pieces_trainings"]["influence"] == pytest.approx((10 * 6 + 12) * 0.004 / 0.36, abs=1e-3)
    assert conv0["pieces_trainings"]["calibration"] == pytest.approx(4.0)
    assert conv0["distill_trainings"] < conv["distill_trainings"] / 4

    fixed = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, target="unrolled"))
    assert set(estimate_cost(fixed, 1200, 597, 71, 9000, kernels)["pieces_trainings"]) == {"subspace", "unrolled"}
    line, advice = cost_lines(est, 71, "ddm")
    assert "break-even at about 37 units; this run has 71" in line and advice is None
    _, advice = cost_lines(est, 10, "ddm")
    assert advice is not None and "below the break-even" in advice and "--method exact" in advice
    _, advice = cost_lines(est, 10, "exact")
    assert advice is None
    _, advice = cost_lines(est, 500, "exact")
    assert advice is not None and "--method ddm would be cheaper" in advice
    assert break_even_units(0.2) == 1 and break_even_units(12.0) == 12 and break_even_units(12.01) == 13


def test_method_is_hashed_and_a_ddm_config_keeps_its_hash() -> None:
    ddm = RunConfig()
    exact = dataclasses.replace(ddm, online=OnlineConfig(method="exact"))
    assert ddm.hash() != exact.hash()
    d = ddm.to_dict()
    assert d["online"]["method"] == "ddm"
    del d["online"]["method"]  # the config as hashed before the field existed
    assert ddm.hash() == hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]
    assert RunConfig.from_dict(exact.to_dict()).hash() == exact.hash()


def test_the_benchmarks_refuse_exact_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bench in ("fidelity", "scaling"):
        assert main(["bench", bench, "--method", "exact", "--out", str(tmp_path / bench)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--method exact does not apply" in err[0], err
    assert not (tmp_path / "fidelity").exists()

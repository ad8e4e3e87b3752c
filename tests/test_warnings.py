"""Warnings a run's own figures call for (ddm_ray/advice.py), at the top of the report and in the
CLI: training past its stability limit, a run dearer than retraining every unit, poor fidelity."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ddm_ray.advice import run_warnings
from tests.conftest import TINY_RUN

STABLE = {"unstable": False, "max_ratio": 0.2}
UNSTABLE = {"unstable": True, "max_ratio": 1.3, "warning": "training ran past its stability limit (top Hessian ...)"}


def _manifest(units: int = 100, trainings: float = 4.0, stability: dict | None = None) -> dict:
    return {"counts": {"units": units}, "distillation": {"distill_trainings": trainings}, "stability": stability or STABLE}


def _validation(pearson: float, ceiling: float | None = None, speedup: float = 3.0) -> dict:
    return {"pearson": pearson, "spearman": pearson, "units_total": 100, "end_to_end_speedup": speedup,
            "noise_ceiling": None if ceiling is None else {"pearson": ceiling, "spearman": ceiling, "seeds": [1]}}


def test_each_warning_and_its_threshold():
    assert run_warnings(_manifest()) == []
    assert run_warnings(_manifest(), _validation(0.9)) == []
    assert run_warnings(_manifest(), _validation(0.9, ceiling=0.85)) == []  # above the ceiling
    (w,) = run_warnings(_manifest(stability=UNSTABLE))
    assert w.startswith("training ran past its stability limit")
    (w,) = run_warnings(_manifest(units=6, trainings=6.2))  # 6.2 trainings of distillation against 6 retrainings
    assert "cost more than retraining every unit" in w and "6.2 trainings" in w and "all 6 units" in w
    assert "--method exact" in w
    assert run_warnings(_manifest(units=7, trainings=6.2)) == []
    # a measured speed-up overrides the estimate, either way
    assert run_warnings(_manifest(units=6, trainings=6.2), _validation(0.9, speedup=1.5)) == []
    (w,) = run_warnings(_manifest(), _validation(0.9, speedup=0.2))
    assert "5.0x the time retraining all 100 units takes" in w
    (w,) = run_warnings(_manifest(), _validation(0.49))
    assert w.startswith("fidelity against exact retraining is poor: Pearson 0.49")
    (w,) = run_warnings(_manifest(), _validation(0.8, ceiling=0.9))
    assert "below the noise ceiling (0.90" in w and "Pearson 0.80" in w
    assert len(run_warnings(_manifest(units=6, trainings=9, stability=UNSTABLE), _validation(0.3, 0.9, 0.5))) == 3
    # a --method exact run is exact retraining: neither cost nor fidelity applies
    exact = {**_manifest(units=6, trainings=9, stability=UNSTABLE), "method": "exact"}
    assert [w[:25] for w in run_warnings(exact, _validation(0.3, 0.9, 0.5))] == ["training ran past its sta"]
    # validate's own output has no manifest: its validation.json carries the stability figures
    assert run_warnings({}, {**_validation(0.9), "stability": UNSTABLE})[0].startswith("training ran past")


@pytest.fixture(scope="module")
def unstable_run(tmp_path_factory) -> Path:
    """3 units (one cluster per class) trained with lr 8: past the stability limit, and usually
    dearer than retraining its 3 units (the blend calibration alone retrains them)."""
    from tests.conftest import blobs, write_parquet

    d = tmp_path_factory.mktemp("warn")
    x, y = blobs(120, seed=0)
    xt, yt = blobs(30, seed=1)
    write_parquet(str(d / "train.parquet"), x, y)
    write_parquet(str(d / "test.parquet"), xt, yt)
    args = list(TINY_RUN)
    args[args.index("--clusters-per-class") + 1] = "1"
    p = subprocess.run([sys.executable, "-m", "ddm_ray.cli", "run", "--train", str(d / "train.parquet"), "--test",
                        str(d / "test.parquet"), "--out", str(d / "run"), *args, "--lr", "8"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    (d / "run-stdout.txt").write_text(p.stdout)
    return d / "run"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddm_ray.cli", *args], capture_output=True, text=True, timeout=600)


def test_run_report_and_validate_warn(unstable_run: Path):
    manifest = json.loads((unstable_run / "manifest.json").read_text())
    assert manifest["stability"]["unstable"] and manifest["counts"]["units"] == 3
    expected = run_warnings(manifest)
    assert expected[0].startswith("training ran past its stability limit")
    # the cost in trainings is measured (timings), so whether it tops 3 retrainings is the run's own figure
    dearer = manifest["distillation"]["distill_trainings"] >= 3
    assert len(expected) == 1 + dearer
    assert not dearer or expected[1].startswith("this run cost more than retraining every unit exactly")
    out = (unstable_run.parent / "run-stdout.txt").read_text()
    assert [line for line in out.splitlines() if line.startswith("warning: ")] == [f"warning: {w}" for w in expected]

    r = _cli("report", str(unstable_run))
    assert r.returncode == 0 and r.stdout.strip() == str(unstable_run / "report" / "index.html")
    assert [line for line in r.stderr.splitlines() if "warning" in line] == [f"ddm-ray: warning: {w}" for w in expected]
    page = (unstable_run / "report" / "index.html").read_text()
    box = re.search(r'<div class="warning" id="warnings">(.*?)</div>', page).group(1)
    assert page.index('id="warnings"') < page.index('id="summary"')  # at the top of the page
    assert box.count("<li>") == len(expected) and "stability limit" in box
    assert ("cost more than retraining" in box) == dearer

    v = _cli("validate", str(unstable_run), "--engine", "local")
    assert v.returncode == 0, v.stderr
    validation = json.loads((unstable_run / "validation.json").read_text())
    after = run_warnings(manifest, validation)
    assert after[0] == expected[0]
    assert [line for line in v.stdout.splitlines() if line.startswith("warning: ")] == [
        f"warning: {w}" for w in run_warnings({}, validation)]
    assert (validation["pearson"] < 0.5) == any(w.startswith("fidelity against exact retraining is poor") for w in after)
    assert _cli("report", str(unstable_run)).returncode == 0
    page = (unstable_run / "report" / "index.html").read_text()
    box = re.search(r'<div class="warning" id="warnings">(.*?)</div>', page).group(1)
    assert box.count("<li>") == len(after)


def test_a_run_without_warnings_has_no_box():
    from ddm_ray.report import _warnings

    assert _warnings([]) == "" and 'id="warnings"' in _warnings(["x"])

"""Readers never import code or open data because a run folder's manifest says so (`ddm_ray.readers`).

A planted manifest (config and config_hash rewritten, as anyone who can write the folder can)
names a user factory whose module sits in the run folder and in the caller's working directory:
validate, report, inspect and open_run must not import it. Data locations come from the caller,
checked against the run's data fingerprint; the manifest's own locations are named before use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddm_ray.cli import main
from ddm_ray.config import RunConfig
from ddm_ray.errors import RunStateError
from tests.conftest import TINY_RUN, blobs, write_parquet

REPO = Path(__file__).resolve().parents[1]
EVIL = """\
import pathlib
pathlib.Path({marker!r}).write_text("module imported")


def build(input_shape, num_classes):
    pathlib.Path({marker!r} + ".factory").write_text("factory called")
    raise SystemExit(3)
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[str, str, str]:
    d = tmp_path_factory.mktemp("readers")
    x, y = blobs(120, seed=0)
    xt, yt = blobs(30, seed=1)
    tr = write_parquet(str(d / "train.parquet"), x, y, np.arange(1000, 1120))
    te = write_parquet(str(d / "test.parquet"), xt, yt)
    out = str(d / "run")
    assert main(["run", "--train", tr, "--test", te, "--out", out, *TINY_RUN]) == 0
    return out, tr, te


def plant(run: str, dest: Path, **edits: dict) -> str:
    """A copy of run whose manifest config has `edits` ({section: {field: value}}), re-hashed."""
    shutil.copytree(run, dest)
    path = dest / "manifest.json"
    m = json.loads(path.read_text())
    for section, fields in edits.items():
        m["config"][section].update(fields)
    m["config_hash"] = RunConfig.from_dict(m["config"]).hash()
    path.write_text(json.dumps(m))
    return str(dest)


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ddm_ray.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_planted_user_factory_is_never_imported(run_dir, tmp_path):
    run, _, _ = run_dir
    marker = str(tmp_path / "MARKER")
    evil = plant(run, tmp_path / "evil", model={"arch": "evilmod:build"})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for where in (Path(evil), cwd):
        (where / "evilmod.py").write_text(EVIL.format(marker=marker))
    r = _cli(cwd, "validate", evil, "--engine", "local", "--units", "1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("ddm-ray: error:") and "--model evilmod:build" in lines[0]
    r = _cli(Path(evil), "validate", ".", "--engine", "local", "--units", "1", "--quiet")  # run folder = cwd
    assert r.returncode == 2 and "never imports code" in r.stderr
    for cmd in (["report", evil, "--max-tests", "2", "--quiet"], ["inspect", evil, "--unit", "0"]):
        r = _cli(cwd, *cmd)
        assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", f"import ddm_ray; ddm_ray.open_run({evil!r}).matrix('loss')"],
                       cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not os.path.exists(marker) and not os.path.exists(marker + ".factory")

    from ddm_ray.validate import validate_run

    with pytest.raises(RunStateError, match="never imports code"):
        validate_run(evil, 1, 0, {}, engine="local")
    assert "evilmod" not in sys.modules
    # the caller names another factory than the run's: refused before anything is imported
    r = _cli(cwd, "validate", evil, "--engine", "local", "--model", "othermod:build")
    assert r.returncode == 2 and "trained with --model evilmod:build" in r.stderr and not os.path.exists(marker)


def test_the_caller_gives_the_user_model_and_it_is_checked(tmp_path, monkeypatch):
    mods = tmp_path / "work"
    mods.mkdir()
    (mods / "tinymods.py").write_text(
        "from torch import nn\n\n\ndef build(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 8), nn.ReLU(), nn.Linear(8, num_classes))\n")
    monkeypatch.chdir(mods)
    monkeypatch.syspath_prepend(str(mods))
    out = str(tmp_path / "run")
    assert main(["run", "--max-train", "150", "--max-test", "30", "--model", "tinymods:build", "--out", out,
                 *TINY_RUN]) == 0
    assert main(["validate", out, "--model", "tinymods:build", "--units", "2", "--engine", "local", "--quiet"]) == 0
    assert json.loads(Path(out, "validation.json").read_text())["units_validated"] == 2
    assert main(["validate", out, "--model", "mlp", "--engine", "local"]) == 2  # not the run's model


def test_data_come_from_the_caller_or_the_manifest_with_one_line(run_dir, tmp_path, capsys):
    run, tr, te = run_dir
    x, y = blobs(60, seed=5)
    other = write_parquet(str(tmp_path / "elsewhere.parquet"), x, y)
    planted = plant(run, tmp_path / "planted", data={"train": other, "test": other})
    capsys.readouterr()
    # fallback: the manifest's location is named in one line before it is opened; not the run's data
    assert main(["validate", planted, "--units", "1", "--engine", "local", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and f"--train {other} --test {other}" in err[0] and "manifest records" in err[0], err
    assert "not the run's data" in err[1] and err[1].startswith("ddm-ray: error:")
    # the caller's own locations: no fallback line, checked against the fingerprint, accepted
    assert main(["validate", planted, "--train", tr, "--test", te, "--units", "1", "--engine", "local",
                 "--quiet"]) == 0
    assert "manifest records" not in capsys.readouterr().err
    # the caller's locations that are not the run's data: refused
    assert main(["validate", run, "--train", other, "--test", other, "--units", "1", "--engine", "local"]) == 2
    assert "not the run's data" in capsys.readouterr().err
    assert main(["validate", run, "--train", tr, "--units", "1", "--engine", "local"]) == 2
    assert "both --train and --test" in capsys.readouterr().err
    # report: the fallback line, then no pictures from data that are not the run's
    index = Path(tmp_path / "rep")
    assert main(["report", planted, "--report-out", str(index), "--max-tests", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("manifest records") == 1 and other in err
    assert "not the run&#x27;s data" in (index / "index.html").read_text()
    assert main(["report", planted, "--report-out", str(index), "--train", tr, "--test", te, "--max-tests", "1",
                 "--quiet"]) == 0
    assert "manifest records" not in capsys.readouterr().err and "not drawn" not in (index / "index.html").read_text()

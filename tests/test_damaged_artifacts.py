"""Damaged or planted torch artifacts (model.pt, synset.pt, distillation pieces): one line for a
reader, recomputed by `--resume` with identical rows (issue 17, item 7)."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from ddm_ray.cli import main
from ddm_ray.errors import DamagedArtifactError
from ddm_ray.store.run_store import RunStore
from tests.conftest import TINY_RUN


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


DAMAGE = {
    "cut short": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "not torch": lambda b: b"PAR1 this is some other file",
    "flipped bytes": lambda b: b[:100] + bytes(x ^ 0xFF for x in b[100:300]) + b[300:],
    "arbitrary pickle": lambda b: _saved({"checkpoints": argparse.Namespace(a=1)}),
    "foreign keys": lambda b: _saved({"a": torch.zeros(3)}),
    "a list": lambda b: _saved([torch.zeros(3)]),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One complete tiny run and its data; each test copies the run folder."""
    import numpy as np

    from tests.conftest import blobs, write_parquet

    d = tmp_path_factory.mktemp("damaged")
    x, y = blobs(120, seed=0)
    xt, yt = blobs(30, seed=1)
    tr = write_parquet(str(d / "train.parquet"), x, y, np.arange(1000, 1120))
    te = write_parquet(str(d / "test.parquet"), xt, yt)
    out = d / "run"
    assert main(["run", "--train", tr, "--test", te, "--out", str(out), *TINY_RUN]) == 0
    return out, tr, te


def _copy(made, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(made[0], out)
    return out


def _rows(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (out / "attribution").iterdir()}


def _resume(made, out: Path, capsys) -> tuple[int, list[str]]:
    """`run --resume` with its stage lines shown (TINY_RUN is quiet): (rc, its log lines)."""
    capsys.readouterr()
    args = [a for a in TINY_RUN if a != "--quiet"]
    rc = main(["run", "--train", made[1], "--test", made[2], "--out", str(out), *args, "--resume"])
    return rc, capsys.readouterr().err.splitlines()


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddm-ray: error:"), err
    assert "weights_only" not in err[0] and "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_read_torch_refuses_any_damage_in_one_line(tmp_path, how):
    store = RunStore(str(tmp_path))
    good = _saved({"params0": {"w": torch.ones(2)}, "checkpoints": []})
    store.write_bytes("artifacts/model.pt", DAMAGE[how](good))
    with pytest.raises(DamagedArtifactError) as e:
        store.read_torch("artifacts/model.pt", ("params0", "checkpoints"))
    msg = str(e.value)
    assert "\n" not in msg and "damaged or not a ddm-ray artifact" in msg and "model.pt" in msg
    assert "weights_only" not in msg


@pytest.mark.parametrize("how", ["cut short", "arbitrary pickle", "foreign keys"])
def test_validate_refuses_a_damaged_model_in_one_line(made, tmp_path, capsys, how):
    out = _copy(made, tmp_path)
    model = out / "artifacts" / "model.pt"
    model.write_bytes(DAMAGE[how](model.read_bytes()))
    capsys.readouterr()
    assert main(["validate", str(out), "--units", "1", "--engine", "local", "--quiet",
                 "--train", made[1], "--test", made[2]]) == 2
    line = _one_line(capsys)
    assert "model.pt" in line and "--resume" in line


def test_validate_refuses_another_models_state_in_one_line(made, tmp_path, capsys):
    """A readable model.pt whose tensors do not fit the run's model (names or shapes)."""
    out = _copy(made, tmp_path)
    model = out / "artifacts" / "model.pt"
    state = torch.load(model, weights_only=True)
    state["params0"] = {k: torch.zeros(3) for k in state["params0"]}
    model.write_bytes(_saved(state))
    capsys.readouterr()
    assert main(["validate", str(out), "--units", "1", "--engine", "local", "--quiet",
                 "--train", made[1], "--test", made[2]]) == 2
    assert "params0 does not fit the model" in _one_line(capsys)


@pytest.mark.parametrize("how", ["cut short", "not torch", "arbitrary pickle", "foreign keys", "wrong shapes"])
def test_resume_retrains_a_damaged_model_and_everything_made_from_it(made, tmp_path, capsys, how):
    out = _copy(made, tmp_path)
    before = _rows(out)
    model = out / "artifacts" / "model.pt"
    if how == "wrong shapes":
        state = torch.load(model, weights_only=True)
        state["unit_of"] = state["unit_of"][:-5]
        model.write_bytes(_saved(state))
    else:
        model.write_bytes(DAMAGE[how](model.read_bytes()))
    rc, said = _resume(made, out, capsys)
    assert rc == 0
    assert any("resume: retraining the model (artifacts/model.pt" in s for s in said), said
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["counts"]["rows_computed_this_session"] > 0
    assert _rows(out) == before, "the recomputed rows equal the original ones"
    torch.load(model, weights_only=True)  # a sound model.pt again


@pytest.mark.parametrize("how", ["cut short", "arbitrary pickle", "foreign keys"])
def test_resume_recomputes_a_damaged_synset(made, tmp_path, capsys, how):
    out = _copy(made, tmp_path)
    before = _rows(out)
    syn = out / "artifacts" / "synset.pt"
    syn.write_bytes(DAMAGE[how](syn.read_bytes()))
    rc, said = _resume(made, out, capsys)
    assert rc == 0
    assert any("resume: recomputing the synsets" in s for s in said), said
    assert _rows(out) == before


@pytest.mark.parametrize("piece", ["subspace", "target shard"])
@pytest.mark.parametrize("how", ["cut short", "foreign keys"])
def test_resume_recomputes_a_damaged_distillation_piece(made, tmp_path, capsys, piece, how):
    out = _copy(made, tmp_path)
    before = _rows(out)
    (out / "artifacts" / "synset.pt").unlink()  # so that distillation reloads its pieces
    path = next(p for p in sorted((out / "artifacts" / "distill").iterdir()) if (p.stem == "subspace") == (piece == "subspace"))
    path.write_bytes(DAMAGE[how](path.read_bytes()))
    rc, said = _resume(made, out, capsys)
    assert rc == 0
    assert any("resume: recomputing" in s and (path.stem in s or "probe subspace" in s) for s in said), said
    assert _rows(out) == before

"""`ddm-ray validate RUN --noise-seeds N`: the noise ceiling in validation.json and on stdout;
the training-stability figures in the manifest."""

from __future__ import annotations

import json

from ddm_ray.cli import main
from tests.conftest import TINY_RUN


def test_noise_ceiling_and_stability(tmp_path, tiny_parquet, capsys):
    tr, te = tiny_parquet
    out = str(tmp_path / "run")
    assert main(["run", "--train", tr, "--test", te, *TINY_RUN, "--out", out]) == 0
    with open(f"{out}/manifest.json") as f:
        manifest = json.load(f)
    st = manifest["stability"]
    assert st["limit"] == 2.0 / 0.1 and st["unstable"] is (st["max_ratio"] > 1)
    assert len(st["top_eigenvalue"]) == len(st["epochs"]) and st["epochs"][-1] == 3
    assert manifest["distillation"]["distill_trainings"] > 0
    capsys.readouterr()
    assert main(["validate", out, "--units", "3", "--engine", "local", "--noise-seeds", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    with open(f"{out}/validation.json") as f:
        v = json.load(f)
    nc = v["noise_ceiling"]
    assert len(nc["seeds"]) == 1 and nc["seeds"][0] != 0
    assert -1 <= nc["pearson"] <= 1 and -1 <= nc["spearman"] <= 1
    assert f"pearson {nc['pearson']:.3f}" in printed and "noise ceiling" in printed
    assert v["units_validated"] == 3 and v["stability"] == st
    assert main(["report", out]) == 0
    page = open(f"{out}/report/index.html").read()
    assert "noise ceiling (1 seed(s))" in page and "Training stability" in page
    # off by default, and refused out of range
    assert main(["validate", "--out", out, "--units", "2", "--engine", "local", "--quiet"]) == 0
    with open(f"{out}/validation.json") as f:
        assert json.load(f)["noise_ceiling"] is None
    assert main(["validate", out, "--noise-seeds", "-1", "--engine", "local"]) != 0
    assert main(["validate", out, "--out", str(tmp_path / "other"), "--engine", "local"]) != 0

"""A tiny end-to-end `ddm-ray bench fidelity` on a user Parquet dataset (local engine, < 60 s)."""

import json
import os

from ddm_ray.cli import main
from tests.conftest import TINY_RUN


def test_bench_fidelity_end_to_end(tiny_parquet, tmp_path, capsys):
    tr, te = tiny_parquet
    out = str(tmp_path / "bench")
    args = [
        "bench", "fidelity", "--dataset", "parquet", "--train", tr, "--test", te, *TINY_RUN,
        "--hidden", "6", "--masks", "6", "--fit-masks", "12", "--random-repeats", "1",
        "--remove-fractions", "0.1,0.5", "--noise-fraction", "0.2", "--out", out,
    ]
    assert main(args) == 0
    r = json.load(open(os.path.join(out, "fidelity.json")))
    assert {"config", "config_hash", "bench", "counts", "fidelity", "datamodel", "removal", "label_noise",
            "timings_seconds", "plots"} <= set(r)
    for name in ("ddm", "gradient_ascent", "tracin", "influence", "influence_linear", "influence_damped",
                 "unrolled", "unrolled_linear", "class_indicator"):
        for obj in ("loss", "margin", "correct"):
            assert {"pearson", "spearman", "pearson_per_test", "spearman_per_test"} <= set(r["fidelity"][name][obj])
        assert {"online_s_per_unit", "offline_s_per_unit"} == set(r["fidelity"][name]["cost"])
    assert r["counts"]["units_scored"] == r["counts"]["units_total"] == 6
    assert r["datamodel"]["masks"] == 6 and "ddm_direct" in r["datamodel"]["lds"]
    assert set(r["removal"]["accuracy"]) == {"ddm", "exact_retraining", "random"}
    assert {"auc", "precision_at_k"} <= set(r["label_noise"]["ranking"]["ddm"])
    for f in r["plots"].values():
        assert os.path.getsize(os.path.join(out, f)) > 0
    report = open(os.path.join(out, "report.md")).read()
    assert "| ddm |" in report and "LDS" in report
    assert "fidelity.json" in capsys.readouterr().out


def test_bench_options_shrink_work(tiny_parquet, tmp_path):
    tr, te = tiny_parquet
    out = str(tmp_path / "b2")
    args = [
        "bench", "fidelity", "--dataset", "parquet", "--train", tr, "--test", te, *TINY_RUN,
        "--units", "3", "--masks", "0", "--skip-quality", "--peers", "gradient_ascent", "--no-plots", "--out", out,
    ]
    assert main(args) == 0
    r = json.load(open(os.path.join(out, "fidelity.json")))
    assert r["counts"]["units_scored"] == 3
    assert set(r["fidelity"]) == {"ddm", "gradient_ascent", "exact_retraining"}
    assert "datamodel" not in r and "removal" not in r


def test_bench_bad_option_is_one_line_error(tiny_parquet, tmp_path, capsys):
    tr, te = tiny_parquet
    args = ["bench", "fidelity", "--dataset", "parquet", "--train", tr, "--test", te, *TINY_RUN,
            "--peers", "nonsense", "--out", str(tmp_path / "b3")]
    assert main(args) == 2
    assert "unknown peers" in capsys.readouterr().err

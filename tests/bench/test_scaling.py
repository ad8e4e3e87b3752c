"""A tiny end-to-end `ddm-ray bench scaling` (local engine): figures, JSON and plot for each U."""

import json
import os

from ddm_ray.cli import main


def test_bench_scaling_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "scaling")
    args = [
        "bench", "scaling", "--engine", "local", "--quiet", "--epochs", "2", "--hidden", "8",
        "--unit-counts", "10,20", "--synthetic-train", "300", "--synthetic-test", "40",
        "--synthetic-features", "6", "--validate-units", "3", "--probe-rank", "16", "--out", out,
    ]
    assert main(args) == 0
    r = json.load(open(os.path.join(out, "scaling.json")))
    assert [row["units"] for row in r["rows"]] == [10, 20]
    for row in r["rows"]:
        s = row["seconds"]
        assert s["whole_run"] == s["offline"] + s["online"] > 0
        assert row["retrain_all_seconds"] == row["units"] * row["retrain_seconds_per_unit"]
        assert row["end_to_end_speedup"] > 0 and row["peak_rss_mib"] > 0
        assert -1 <= row["pearson"] <= 1 and row["validated_units"] == 3
        assert row["distillation"]["method"] == "basis" and row["distillation"]["probe_rank"] <= 16
    assert r["offline_ratio_largest_to_smallest"] > 0
    assert os.path.getsize(os.path.join(out, r["plot"])) > 0
    assert "| U |" in capsys.readouterr().out


def test_bench_scaling_refuses_unit_counts_below_the_classes(tmp_path, capsys):
    args = ["bench", "scaling", "--unit-counts", "5", "--out", str(tmp_path / "s")]
    assert main(args) == 2
    assert "number of classes" in capsys.readouterr().err

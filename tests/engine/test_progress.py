"""Every stage reports progress on stderr (log lines with rate and ETA when stderr is not a
terminal), --quiet prints none, and progress never changes what a run writes."""

from __future__ import annotations

import logging
import os
import re

from ddm_ray.cli import main
from ddm_ray.engine.progress import configure_logging
from tests.conftest import TINY_RUN

LINE = re.compile(r"^\[ddm-ray \d\d:\d\d:\d\d\] (.*)$")


def _progress_lines(err: str, stage: str) -> list[str]:
    """Messages of the log lines of `stage` that carry a count, a rate and an ETA."""
    out = []
    for line in err.splitlines():
        m = LINE.match(line)
        if m and m.group(1).startswith(stage) and re.search(r"\d+/\d+ \w+ \(\d+%\), [\d.e-]+ \w+/s, ETA", line):
            out.append(m.group(1))
    return out


def test_every_stage_reports_progress_and_quiet_prints_none(tmp_path, tiny_parquet, capsys) -> None:
    tr, te = tiny_parquet
    loud = [a for a in TINY_RUN if a != "--quiet"]
    base = ["run", "--dataset", "parquet", "--train", tr, "--test", te]
    try:
        assert main([*base, *loud, "--out", str(tmp_path / "loud")]) == 0
        err = capsys.readouterr().err
        train = _progress_lines(err, "train:")
        assert train and train[-1].startswith("train: 3/3 epochs (100%)"), err
        assert _progress_lines(err, "distill"), err
        assert re.match(r"blend calibration: (\d+)/\1 retrainings", _progress_lines(err, "blend calibration:")[-1]), err
        online = _progress_lines(err, "online:")
        assert online and online[-1].startswith("online: 18/18 rows (100%)"), err
        assert any(LINE.match(x) and "units: k-means" in x for x in err.splitlines()), err
        assert "\r" not in err  # not a terminal: no bar

        assert main(["validate", "--out", str(tmp_path / "loud"), "--units", "2", "--engine", "local"]) == 0
        err = capsys.readouterr().err
        assert _progress_lines(err, "validate: exact retraining:")[-1].startswith(
            "validate: exact retraining: 2/2 units (100%)"), err

        assert main([*base, *TINY_RUN, "--out", str(tmp_path / "quiet")]) == 0
        # --quiet: warnings only (this tiny run is below DDM's break-even number of units)
        quiet = capsys.readouterr().err.splitlines()
        assert all("] warning: " in x for x in quiet) and any("--method exact" in x for x in quiet), quiet
        assert main(["validate", "--out", str(tmp_path / "quiet"), "--train", tr, "--test", te, "--units", "2",
                     "--engine", "local", "--quiet"]) == 0
        assert capsys.readouterr().err == ""
        # without the caller's data, the one line naming the manifest's locations shows under --quiet too
        assert main(["validate", "--out", str(tmp_path / "quiet"), "--units", "2", "--engine", "local", "--quiet"]) == 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "reading the run's data from the locations its manifest records" in err[0], err
    finally:
        configure_logging(logging.WARNING)

    names = sorted(os.listdir(tmp_path / "loud" / "attribution"))
    assert names == sorted(os.listdir(tmp_path / "quiet" / "attribution"))
    for rel in ["units.parquet", "test_index.parquet", *(f"attribution/{n}" for n in names)]:
        assert (tmp_path / "loud" / rel).read_bytes() == (tmp_path / "quiet" / rel).read_bytes(), rel

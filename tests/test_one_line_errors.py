"""One line, never a traceback: manifests that do not fit the schema readers rely on (no config,
mistyped values, part names with path pieces), `--out /`, and sizes past their upper bound."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddm_ray.cli import main
from ddm_ray.config import ExecConfig, ModelConfig, RunConfig, UnitConfig
from ddm_ray.errors import ConfigError, RunStateError
from tests.conftest import TINY_RUN, blobs, write_parquet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("schema")
    x, y = blobs(120, seed=0)
    xt, yt = blobs(30, seed=1)
    tr = write_parquet(str(d / "train.parquet"), x, y, np.arange(1000, 1120))
    te = write_parquet(str(d / "test.parquet"), xt, yt)
    out = str(d / "run")
    assert main(["run", "--train", tr, "--test", te, "--out", out, *TINY_RUN]) == 0
    return out


def _edited(run: str, dest: Path, edit) -> str:
    shutil.copytree(run, dest)
    m = json.loads((dest / "manifest.json").read_text())
    edit(m)
    (dest / "manifest.json").write_text(json.dumps(m))
    return str(dest)


def _set(path: str, value):
    def edit(m):
        *keys, last = path.split(".")
        node = m
        for k in keys:
            node = node[k]
        node[last] = value
        if path.startswith("config."):
            try:
                m["config_hash"] = RunConfig.from_dict(m["config"]).hash()
            except Exception:  # noqa: BLE001 - a value from_dict refuses: the hash stays as it was
                pass
    return edit


def _one_line(capsys, match: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("ddm-ray: error:")]
    assert len(errors) == 1 and errors == err[-1:] and match in errors[0], err
    assert not any("Traceback" in line for line in err)


READERS = [
    ["inspect", "{run}", "--unit", "0"],
    ["report", "{run}", "--max-tests", "1", "--quiet"],
    ["validate", "{run}", "--units", "1", "--engine", "local", "--quiet"],
]


@pytest.mark.parametrize(
    "name,edit,match",
    [
        ("no config", lambda m: m.pop("config"), "no 'config'"),
        ("config not a table", _set("config", [1, 2]), "config: expected a table"),
        ("epochs a string", _set("config.train.epochs", "5"), "config.train.epochs: expected an integer, got '5'"),
        ("objectives a string", _set("config.online.objectives", "loss"), "config.online.objectives: expected a list"),
        ("hidden a number", _set("config.model.hidden", 16), "config.model.hidden: expected a list of integers"),
        ("section a list", _set("config.online", ["loss"]), "config.online: expected a table"),
        ("counts a string", _set("counts.units", "6"), "counts.units: expected an integer"),
        ("timings a string", _set("timings_seconds.online", "fast"), "timings_seconds.online: expected a number"),
        ("stability mistyped", _set("stability.top_eigenvalue", 5), "stability.top_eigenvalue: expected a list"),
        ("parts a list", _set("parts", ["part-000000000-000000005.parquet"]), "parts: expected a table"),
        ("status a number", _set("status", 1), "status: expected a string"),
    ],
)
def test_manifests_that_do_not_fit_are_one_line_for_every_reader(run_dir, tmp_path, capsys, name, edit, match):
    planted = _edited(run_dir, tmp_path / "run", edit)
    for cmd in READERS:
        capsys.readouterr()
        assert main([a.replace("{run}", planted) for a in cmd]) == 2, (name, cmd)
        _one_line(capsys, match)
    import ddm_ray

    with pytest.raises(RunStateError, match="manifest.json: "):
        ddm_ray.open_run(planted)


@pytest.mark.parametrize("part", ["../evil.parquet", "../../outside/part-000000000-000000005.parquet",
                                  "sub/part-000000000-000000005.parquet", "part-000000000-000000005.parquet/.."])
def test_part_names_with_path_pieces_are_refused_before_anything_is_read(run_dir, tmp_path, capsys, part):
    def edit(m):
        (name, rec), = m["parts"].items()
        m["parts"] = {part: rec}

    planted = Path(_edited(run_dir, tmp_path / "run", edit))
    (real,) = sorted((planted / "attribution").iterdir())
    shutil.copy(real, planted / "evil.parquet")  # the same bytes outside attribution/: checksums would match
    for cmd in READERS:
        capsys.readouterr()
        assert main([a.replace("{run}", str(planted)) for a in cmd]) == 2
        _one_line(capsys, "is not an attribution part name")


def test_the_root_as_out_is_one_line(capsys, tmp_path):
    for argv in (["run", "--out", "/", *TINY_RUN], ["inspect", "/", "--unit", "0"], ["report", "/"],
                 ["validate", "/", "--engine", "local"]):
        assert main(argv) == 2, argv
        _one_line(capsys, "the root of a file system or store cannot be a run folder")
    r = subprocess.run([sys.executable, "-m", "ddm_ray.cli", "run", "--out", "/", "--engine", "local", "--quiet"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "root" in r.stderr


@pytest.mark.parametrize(
    "args,match",
    [
        (["--hidden", "200000000"], "hidden widths must be in [1, 16384]"),
        (["--hidden", "16384,16384"], "parameters"),  # each width allowed, the model too large together
        (["--model", "convnet", "--input-shape", "1,8,8", "--fc-width", "1000000000"], "fc width must be in"),
        (["--model", "convnet", "--input-shape", "1,8,8", "--conv-channels", "4,100000"], "conv widths"),
        (["--kmeans-iters", "1000000000"], "k-means iterations must be in [1, 100000]"),
        (["--online-batch", "1000000000"], "online batch must be in [1, 65536]"),
        (["--block-units", "1000000000"], "block units must be in"),
        (["--max-in-flight", "1000000000"], "max in flight must be in"),
        (["--num-cpus", "1000000000"], "num cpus must be in"),
        (["--distill-steps", "1000000000"], "distill steps must be in"),
        (["--max-gap", "1000000000"], "max gap must be in"),
        (["--unroll-epochs", "1000000000"], "unroll epochs must be in"),
        (["--min-unit-size", "100000000000"], "min unit size must be in"),
        (["--max-train", "100000000000"], "max_train must be in"),
        (["--connect-timeout", "1e12"], "connect timeout must be in"),
    ],
)
def test_size_options_have_upper_bounds(tmp_path, capsys, args, match):
    out = tmp_path / "out"
    assert main(["run", "--out", str(out), *TINY_RUN, *args]) == 2
    _one_line(capsys, match)
    assert not (out / "manifest.json").exists() or json.loads((out / "manifest.json").read_text())["status"] != "complete"


def test_bounds_live_in_the_configs_so_the_api_gets_them_too():
    with pytest.raises(ConfigError, match="hidden widths"):
        ModelConfig(hidden=(200_000_000,))
    with pytest.raises(ConfigError, match="fc width"):
        ModelConfig(arch="convnet", fc_width=1_000_000_000)
    with pytest.raises(ConfigError, match="k-means iterations"):
        UnitConfig(kmeans_iters=10**9)
    with pytest.raises(ConfigError, match="online batch"):
        ExecConfig(online_batch=10**9)
    import ddm_ray

    with pytest.raises(ConfigError, match="hidden widths"):
        ddm_ray.audit("train.parquet", "test.parquet", hidden=(200_000_000,), engine="local")


def test_an_error_quoting_a_planted_value_stays_one_line(run_dir, tmp_path, capsys):
    planted = _edited(run_dir, tmp_path / "run", _set("config.data.train", "evil\nsecond line\x1b[2J"))
    assert main(["run", "--out", planted, *TINY_RUN]) == 2  # another config: the message quotes the value
    _one_line(capsys, "another config")
    capsys.readouterr()
    assert main(["run", "--out", planted, *TINY_RUN]) == 2
    assert "\x1b" not in capsys.readouterr().err

"""`ddm_ray.audit` inputs: model references, in-memory arrays and their cache, one-line refusals.
(The whole audit from Python runs in tests/test_user_audit.py through the README snippet.)"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ddm_ray.audit_run import _columns, _model_ref, _write_arrays, audit_options
from ddm_ray.errors import ConfigError, InputError


def factory(input_shape, num_classes):  # a module-level factory: importable by name
    return torch.nn.Linear(int(np.prod(input_shape)), num_classes)


def test_model_references():
    assert _model_ref("mlp") == "mlp"
    assert _model_ref(factory) == "tests.test_audit_run:factory"
    with pytest.raises(ConfigError, match="module level of an importable module"):
        _model_ref(lambda s, c: None)


def test_arrays_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("DDM_RAY_CACHE", str(tmp_path))
    x = np.random.default_rng(0).normal(size=(6, 1, 2, 3))
    y = np.array(["a", "b"] * 3)
    path, shape = _write_arrays(_columns((x, y), "train"), "train")
    again, _ = _write_arrays(_columns((torch.from_numpy(x), y), "train"), "train")
    other, _ = _write_arrays(_columns((x, y[::-1].copy()), "train"), "train")
    assert path == again != other and shape == (1, 2, 3)
    t = pq.read_table(path).to_pydict()
    assert t["y"] == y.tolist()
    np.testing.assert_allclose(np.asarray(t["x"]), x.reshape(6, -1), rtol=1e-6)


@pytest.mark.parametrize(
    "data,match",
    [
        ((np.zeros((3, 2)), np.zeros(2)), "do not have the 3 rows of x"),
        ({"x": np.zeros((3, 2))}, "needs keys 'x' and 'y'"),
        (42, "expected a Parquet path/URL"),
        ((np.zeros((0, 2)), np.zeros(0)), "no rows"),
    ],
)
def test_bad_arrays_are_one_line_errors(data, match):
    with pytest.raises(InputError, match=match):
        _columns(data, "train")


def test_audit_options_lists_the_run_options():
    opts = audit_options()
    assert {"epochs", "units_from", "x_column", "model", "engine", "resume"} <= set(opts)


@pytest.mark.parametrize(
    "options,match",
    [({"epochs": "5"}, "epochs: expected an integer"), ({"hidden": 64}, "hidden: expected a list of integers"),
     ({"epoch": 5}, "unknown option 'epoch'")],
)
def test_audit_options_are_type_checked_before_anything_runs(tmp_path, options, match):
    import ddm_ray

    with pytest.raises(ConfigError, match=match):
        ddm_ray.audit(str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"), out=str(tmp_path / "o"), **options)
    assert not (tmp_path / "o").exists()


def test_numpy_option_values_are_plain_values():
    from ddm_ray.cli.options import build_configs, coerce, options

    opts = {o.dest: o for o in options()}
    given = {"epochs": coerce(opts["epochs"], np.int64(7), "epochs"),
             "hidden": coerce(opts["hidden"], np.array([16, 8]), "hidden")}
    cfg, _ = build_configs(given)
    assert cfg.train.epochs == 7 and cfg.model.hidden == (16, 8) and isinstance(cfg.hash(), str)

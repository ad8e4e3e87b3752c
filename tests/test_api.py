"""`ddm_ray.open_run`: the attribution matrix and drill-down from Python, read through verified parts."""

import numpy as np
import pyarrow.parquet as pq
import pytest

import ddm_ray
from ddm_ray.cli import main
from ddm_ray.errors import InputError, RunStateError, StorageError
from tests.conftest import TINY_RUN


def test_open_run_matrix_and_top_units(tmp_path, tiny_parquet):
    tr, te = tiny_parquet
    out = str(tmp_path / "run")
    assert main(["run", "--train", tr, "--test", te, "--out", out, *TINY_RUN, "--block-units", "4"]) == 0
    run = ddm_ray.open_run(out)
    unit_ids, test_ids, delta = run.matrix("loss")
    assert unit_ids.tolist() == list(range(6)) and test_ids.tolist() == list(range(30))
    assert delta.shape == (6, 30) and delta.dtype == np.float32
    rows = pq.read_table(f"{out}/attribution").to_pydict()
    for u, o, d in zip(rows["unit_id"], rows["objective"], rows["delta"], strict=True):
        if o == "loss":
            np.testing.assert_array_equal(delta[u], np.asarray(d, dtype=np.float32))
    top = run.top_units(test_id=7, k=2)
    col = delta[:, 7]
    assert [u for u, _ in top["helpful"]] == np.argsort(-col)[:2].tolist()  # loss: removal raises it
    assert [u for u, _ in top["harmful"]] == np.argsort(col)[:2].tolist()
    margin_top = run.top_units(test_id=7, k=1, objective="margin")["helpful"][0]
    assert margin_top[1] == float(run.matrix("margin")[2][:, 7].min())  # margin: removal lowers it
    assert run.units().num_rows == 6 and run.manifest["status"] == "complete"
    with pytest.raises(InputError, match="objective"):
        run.matrix("accuracy")
    with pytest.raises(InputError, match="not in this run's test set"):
        run.top_units(test_id=999)
    part = sorted((tmp_path / "run" / "attribution").iterdir())[0]
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(StorageError, match="checksum"):
        run.matrix("loss")


def test_open_run_refuses_what_is_not_a_complete_run(tmp_path):
    with pytest.raises(RunStateError, match="no run here"):
        ddm_ray.open_run(str(tmp_path))


def test_readme_python_snippet_runs(tmp_path, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## From Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    out = str(tmp_path / "ddm-out")
    assert main(["run", "--out", out, "--engine", "local", "--quiet", "--max-train", "300", "--epochs", "3",
                 "--clusters-per-class", "2"]) == 0
    capsys.readouterr()
    scope: dict = {}
    exec(compile(code.replace("./ddm-out", out), "README", "exec"), scope)
    printed = capsys.readouterr().out.split()
    run = ddm_ray.open_run(out)
    first_test = int(run.test_index().column("test_id")[0].as_py())
    best_unit, best_delta = scope["top"]["helpful"][0]
    assert printed[0] == str(first_test) and scope["delta"].shape == (20, 597)
    assert best_delta == float(scope["delta"][:, 0].max())
    assert int(printed[-1]) == len(run.units().to_pydict()["sample_ids"][best_unit]) > 0

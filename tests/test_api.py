"""`ddm_ray.open_run`: the attribution matrix and drill-down from Python, read through verified parts;
the README's Python snippet and its pyarrow and DuckDB queries, run against a real run."""

import re
from pathlib import Path

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


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks(heading: str) -> list[str]:
    """The ```python blocks of one README section (from `## heading` to the next `## `)."""
    text = README.read_text()
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A small complete run on digits: 20 units x 597 test samples."""
    out = str(tmp_path_factory.mktemp("api") / "ddm-out")
    assert main(["run", "--out", out, "--engine", "local", "--quiet", "--max-train", "300", "--epochs", "3",
                 "--clusters-per-class", "2"]) == 0
    return out


def run_readme_block(code: str, out: str) -> dict:
    scope: dict = {}
    exec(compile(code.replace("./ddm-out", out), "README", "exec"), scope)
    return scope


def test_readme_python_snippet_runs(digits_run, capsys):
    (code,) = readme_blocks("From Python")
    capsys.readouterr()
    scope = run_readme_block(code, digits_run)
    printed = capsys.readouterr().out.split()
    run = ddm_ray.open_run(digits_run)
    first_test = int(run.test_index().column("test_id")[0].as_py())
    best_unit, best_delta = scope["top"]["helpful"][0]
    assert printed[0] == str(first_test) and scope["delta"].shape == (20, 597)
    assert best_delta == float(scope["delta"][:, 0].max())
    assert int(printed[-1]) == len(run.units().to_pydict()["sample_ids"][best_unit]) > 0


def test_long_members_and_test_context(digits_run):
    run = ddm_ray.open_run(digits_run)
    long = run.long()
    assert long.schema.names == ["unit_id", "test_id", "objective", "delta"]
    assert long.num_rows == 20 * 597 * len(run.objectives)
    for objective in run.objectives:
        unit_ids, test_ids, delta = run.matrix(objective)
        one = run.long(objective)
        assert set(one.column("objective").to_pylist()) == {objective}
        np.testing.assert_array_equal(one.column("unit_id").to_numpy(), np.repeat(unit_ids, len(test_ids)))
        np.testing.assert_array_equal(one.column("test_id").to_numpy(), np.tile(test_ids, len(unit_ids)))
        np.testing.assert_array_equal(one.column("delta").to_numpy(), delta.reshape(-1))
    units = run.units().to_pydict()
    m = run.members(7)
    assert m["sample_ids"] == units["sample_ids"][7] and m["size"] == len(m["sample_ids"]) > 0
    assert m["label"] == units["label"][7]
    index = run.test_index().to_pylist()
    ctx = run.test_context(index[5]["test_id"])
    assert ctx == index[5] and ctx["position"] == 5
    unit_ids, test_ids, delta = run.matrix("loss")
    moved = run.top_tests(7, k=3)
    assert [t for t, _ in moved["helped"]] == test_ids[np.argsort(-delta[7], kind="stable")[:3]].tolist()
    assert moved["hurt"][0][1] == float(delta[7].min())
    with pytest.raises(InputError, match="unit 99 is not in this run"):
        run.members(99)
    with pytest.raises(InputError, match="not in this run's test set"):
        run.test_context(-5)
    with pytest.raises(InputError, match="objective"):
        run.long("accuracy")


def test_readme_queries_match_the_matrix(digits_run):
    """The pyarrow and DuckDB queries of the README give AuditRun's numbers (positions and signs)."""
    pyarrow_code, duckdb_code = readme_blocks("Querying the run folder (pyarrow, DuckDB)")
    run = ddm_ray.open_run(digits_run)
    unit_ids, test_ids, delta = run.matrix("loss")
    index = run.test_index().to_pylist()
    worst_wrong = max((r for r in index if not r["correct"]), key=lambda r: r["loss"])["test_id"]
    expected = run.top_units(worst_wrong, k=5, objective="loss")["helpful"]
    assert expected[0][1] > 0  # loss: the most helpful unit's removal raises the loss

    scope = run_readme_block(pyarrow_code, digits_run)
    np.testing.assert_array_equal(scope["unit_ids"], unit_ids)
    np.testing.assert_array_equal(scope["test_ids"], test_ids)
    np.testing.assert_array_equal(scope["delta"], delta)
    assert scope["helped"] == expected

    duckdb = pytest.importorskip("duckdb")
    scope = run_readme_block(duckdb_code, digits_run)
    assert [(int(u), float(d)) for u, d in scope["helped"]] == expected
    con = scope["con"]
    got = con.sql("""SELECT d.unit_id, d.delta FROM deltas d JOIN test_index t USING (test_id)
                     WHERE d.objective = 'margin' ORDER BY d.unit_id, t.position""").fetchnumpy()
    m_units, _, m_delta = run.matrix("margin")
    np.testing.assert_array_equal(got["unit_id"].reshape(m_delta.shape)[:, 0], m_units)
    np.testing.assert_array_equal(got["delta"].reshape(m_delta.shape), m_delta)
    long = run.long().to_pydict()
    rows = con.sql("SELECT unit_id, test_id, objective, delta FROM deltas").fetchall()
    assert sorted(rows) == sorted(zip(long["unit_id"], long["test_id"], long["objective"], long["delta"], strict=True))
    assert isinstance(duckdb.__version__, str)

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


def _expected_summary(run) -> dict:
    units = run.units().to_pydict()
    out = {}
    for objective in run.objectives:
        unit_ids, _, delta = run.matrix(objective)
        assert unit_ids.tolist() == sorted(units["unit_id"])
        score = ddm_ray.api.helped_score(objective, delta)
        out[objective] = (delta.mean(axis=1), (score > 0).mean(axis=1), (score < 0).mean(axis=1))
    return out


def test_unit_summary_with_pandas(digits_run):
    pd = pytest.importorskip("pandas")
    run = ddm_ray.open_run(digits_run)
    df = run.unit_summary()
    assert isinstance(df, pd.DataFrame) and len(df) == run.units().num_rows == 20
    units = run.units().to_pydict()
    assert df["unit_id"].tolist() == list(range(20)) and df["name"].tolist() == units["name"]
    assert df["size"].tolist() == units["size"] and df["label_name"].tolist() == units["label_name"]
    for objective, (mean, helped, hurt) in _expected_summary(run).items():
        np.testing.assert_allclose(df[f"mean_delta_{objective}"], mean, rtol=1e-5)
        np.testing.assert_allclose(df[f"helped_share_{objective}"], helped)
        np.testing.assert_allclose(df[f"hurt_share_{objective}"], hurt)
    for i, (ids, labels, pred, loss) in enumerate(zip(units["sample_ids"], units["member_labels"],
                                                       units["member_predicted"], units["member_loss"], strict=True)):
        assert df["disagreeing"][i] == sum(a != b for a, b in zip(labels, pred, strict=True))
        by_loss = sorted(range(len(ids)), key=lambda j: (-loss[j], j))
        assert list(df["top_member_ids"][i]) == [ids[j] for j in by_loss[:5]]
    worst = df.sort_values("mean_delta_loss").iloc[0]  # loss: the most negative mean hurt most
    assert worst["name"] == run.members(int(worst["unit_id"]))["name"]
    # top_units: the same pairs as before, now with the unit's name
    test_id = int(run.test_index().column("test_id")[0].as_py())
    top = run.top_units(test_id, k=3)
    (u, d), first = top["helpful"][0], top["helpful"][0]
    assert first.unit_id == u and first.delta == d and first.name == units["name"][u] and first == (u, d)
    assert "name=" in repr(first)


def test_unit_summary_without_pandas_is_a_pyarrow_table(digits_run):
    code = (
        "import sys\n"
        "class NoPandas:  # an import finder that finds no pandas: as if it were not installed\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'pandas':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoPandas())\n"
        "import json, ddm_ray, pyarrow as pa\n"
        f"run = ddm_ray.open_run({digits_run!r})\n"
        "t = run.unit_summary()\n"
        "assert isinstance(t, pa.Table), type(t)\n"
        "try:\n    run.unit_summary(as_pandas=True)\nexcept ddm_ray.errors.InputError as e:\n    err = str(e)\n"
        "print(json.dumps({'columns': t.column_names, 'rows': t.num_rows, 'err': err,\n"
        "                  'mean': t.column('mean_delta_loss').to_pylist()}))\n"
    )
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    assert doc["rows"] == 20 and doc["columns"][:6] == ["unit_id", "name", "label", "label_name", "level", "size"]
    assert {"mean_delta_margin", "hurt_share_correct", "disagreeing", "top_member_ids"} <= set(doc["columns"])
    assert 'pip install "ddm-ray[pandas]"' in doc["err"]
    mean, _, _ = _expected_summary(ddm_ray.open_run(digits_run))["loss"]
    np.testing.assert_allclose(doc["mean"], mean, rtol=1e-5)


@pytest.mark.slow
def test_readme_notebook_audit_finds_the_sloppy_annotator(tmp_path):
    """The README's notebook-sized audit, run as written: annotator-5 (30% of its labels flipped)
    comes out worst, its first members to look at are flipped ones, and the exact check agrees."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("pandas")
    (code,) = readme_blocks("A notebook-sized audit")
    code += ("\nflipped = set(sloppy.tolist())\n"
             "print('RESULT', json.dumps({'worst': worst['name'], 'top': [int(i) for i in worst['top_member_ids']],"
             " 'flipped_in_top': sum(int(i) in flipped for i in worst['top_member_ids']),"
             " 'pearson': check['pearson'], 'members': len(unit['sample_ids']),"
             " 'disagreeing': int(worst['disagreeing'])}))\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DDM_RAY_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(README.parent)}
    p = subprocess.run([sys.executable, "-c", "import json\n" + code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "worst unit: annotator-5" in p.stdout
    doc = json.loads(p.stdout.split("RESULT ", 1)[1])
    assert doc["worst"] == "annotator-5" and doc["members"] == 100
    assert doc["flipped_in_top"] == 5 and doc["disagreeing"] >= 20
    assert doc["pearson"] > 0.8

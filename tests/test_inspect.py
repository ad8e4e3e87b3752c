"""`ddm-ray inspect` on one real small run: a test sample's units, a unit's members, the worst
test samples; table, JSON and CSV output; the run folder given positionally or with --out;
one-line errors. Mirrors ddm_ray/inspect.py and ddm_ray/cli/inspect.py."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import ddm_ray
from ddm_ray import inspect
from ddm_ray.cli import main
from ddm_ray.errors import InputError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """digits, 400 training and 60 test samples, 3 clusters per class: 30 units x 60 test samples."""
    out = str(tmp_path_factory.mktemp("inspect") / "run")
    assert main(["run", "--out", out, "--engine", "local", "--quiet", "--max-train", "400", "--max-test", "60",
                 "--epochs", "5", "--clusters-per-class", "3"]) == 0
    return out


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["inspect", *args])
    got = capsys.readouterr()
    return rc, got.out, got.err


def section(text: str, title: str) -> list[str]:
    """The data lines under `title:` and its column header, up to the next line without indent."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("  "):
            break
        rows.append(line)
    return rows


def test_unit_lists_exactly_its_members_and_the_tests_it_moves(run_dir, capsys):
    units = pq.read_table(f"{run_dir}/units.parquet").to_pydict()
    rc, out, _ = cli(capsys, run_dir, "--unit", "0")
    assert rc == 0
    assert out.startswith(f"unit 0 ({units['name'][0]}): label {units['label_name'][0]}, size {units['size'][0]}, "
                          "level cluster")
    members = section(out, "members (")
    assert [int(line.split()[0]) for line in members] == units["sample_ids"][0]
    assert {line.split()[1] for line in members} == {units["label_name"][0]}
    assert "delta > 0: the unit helped" in out
    run = ddm_ray.open_run(run_dir)
    moved = run.top_tests(0, k=5)
    helped = section(out, "test samples it helps most")
    hurt = section(out, "test samples it hurts most")
    assert [int(line.split()[0]) for line in helped] == [t for t, _ in moved["helped"]]
    assert [int(line.split()[0]) for line in hurt] == [t for t, _ in moved["hurt"]]
    assert float(helped[0].split()[-1]) == pytest.approx(moved["helped"][0][1], abs=1e-5)
    rc, js, _ = cli(capsys, run_dir, "--unit", "0", "--format", "json")
    doc = json.loads(js)
    assert [m["sample_id"] for m in doc["members"]] == units["sample_ids"][0]
    assert [t["test_id"] for t in doc["hurt"]] == [t for t, _ in moved["hurt"]]
    rc, text, _ = cli(capsys, run_dir, "--unit", "0", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [int(r["id"]) for r in rows if r["relation"] == "member"] == units["sample_ids"][0]
    assert [r["relation"] for r in rows].count("helped") == 5


def test_test_id_agrees_with_top_units(run_dir, capsys):
    run = ddm_ray.open_run(run_dir)
    index = run.test_index().to_pylist()
    ctx = index[7]
    units = run.units().to_pydict()
    for objective in ("loss", "margin"):
        rc, out, _ = cli(capsys, run_dir, "--test-id", str(ctx["test_id"]), "--top", "3", "--objective", objective)
        assert rc == 0
        first = out.splitlines()[0]
        assert f"test sample {ctx['test_id']} (column 7): label {ctx['label_name']}" in first
        assert f"predicted {ctx['predicted_name']}, loss {ctx['loss']:.4f}" in first
        assert ("correct" if ctx["correct"] else "misclassified") in first
        top = run.top_units(ctx["test_id"], k=3, objective=objective)
        for title, side in (("most helpful", "helpful"), ("most harmful", "harmful")):
            lines = section(out, title)
            assert [int(line.split()[0]) for line in lines] == [u for u, _ in top[side]]
            for line, (u, d) in zip(lines, top[side], strict=True):
                assert line.split()[1] == units["name"][u]
                assert int(line.split()[3]) == units["size"][u] and float(line.split()[4]) == pytest.approx(d, abs=1e-5)
                shown = line.split()[5:]
                assert [int(i) for i in shown[:10] if i.isdigit()] == units["sample_ids"][u][:10]
                if units["size"][u] > 10:
                    assert line.endswith(f"... (+{units['size'][u] - 10} more)")
        helpful_deltas = [d for _, d in top["helpful"]]
        assert (helpful_deltas[0] > 0) if objective == "loss" else (helpful_deltas[0] < 0)
    rc, text, _ = cli(capsys, "--out", run_dir, "--test-id", str(ctx["test_id"]), "--top", "2", "--format", "csv")
    lines = text.splitlines()
    assert lines[0] == "test_id,objective,direction,rank,unit_id,unit_name,label,label_name,size,delta,member_ids"
    assert len(lines) == 1 + 4
    rc, js, _ = cli(capsys, run_dir, "--test-id", str(ctx["test_id"]), "--top", "2", "--format", "json")
    doc = json.loads(js)
    assert doc["test"] == ctx and [u["unit_id"] for u in doc["harmful"]] == [u for u, _ in run.top_units(ctx["test_id"], k=2)["harmful"]]


def test_worst_tests_puts_misclassified_first_by_loss(run_dir, capsys):
    index = pq.read_table(f"{run_dir}/test_index.parquet").to_pylist()
    wrong = sorted((r for r in index if not r["correct"]), key=lambda r: -r["loss"])
    right = sorted((r for r in index if r["correct"]), key=lambda r: -r["loss"])
    assert wrong and right, "the fixture run should misclassify a few test samples"
    k = len(wrong) + 3
    rc, js, _ = cli(capsys, run_dir, "--worst-tests", str(k), "--format", "json")
    assert rc == 0
    doc = json.loads(js)
    assert [t["test_id"] for t in doc["tests"]] == [r["test_id"] for r in (wrong + right)[:k]]
    run = ddm_ray.open_run(run_dir)
    worst = doc["tests"][0]
    assert worst["harmful_unit"] == run.top_units(worst["test_id"], k=1)["harmful"][0][0]
    rc, out, _ = cli(capsys, run_dir, "--worst-tests", "4")
    body = out.splitlines()[2:]
    assert [int(line.split()[0]) for line in body] == [r["test_id"] for r in (wrong + right)[:4]]
    rc, text, _ = cli(capsys, run_dir, "--worst-tests", "2", "--format", "csv")
    assert text.splitlines()[0].startswith("rank,test_id,label,label_name,predicted,predicted_name,loss,correct")


def test_positional_and_out_name_the_same_run(run_dir, capsys):
    a = cli(capsys, run_dir, "--unit", "2")
    b = cli(capsys, "--out", run_dir, "--unit", "2")
    c = cli(capsys, run_dir, "--out", run_dir + "/", "--unit", "2")
    assert a[0] == b[0] == c[0] == 0 and a[1] == b[1] == c[1]
    rc, _, err = cli(capsys, run_dir, "--out", run_dir + "-other", "--unit", "2")
    assert rc != 0 and err.count("\n") == 1 and "two run folders" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--unit", "999"], "unit 999 is not in this run"),
        (["--test-id", "-3"], "test id -3 is not in this run's test set"),
        (["--unit", "1", "--objective", "accuracy"], "objective 'accuracy' not in this run (loss, margin, correct)"),
        ([], "say what to inspect"),
        (["--unit", "1", "--test-id", "2"], "not allowed with"),
        (["--worst-tests", "0"], "positive integer"),
    ],
)
def test_bad_requests_are_one_line(run_dir, capsys, args, message):
    try:
        rc, out, err = cli(capsys, run_dir, *args)
    except SystemExit as e:  # argparse errors
        rc, err = e.code, capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and err.startswith("ddm-ray: error:") and message in err, err


def test_errors_from_a_fresh_process_are_one_line(run_dir, tmp_path):
    for args, message in (([run_dir, "--unit", "999"], "unit 999"),
                          (["--unit", "1"], "name the run folder"),
                          ([str(tmp_path), "--unit", "1"], "no run here")):
        p = subprocess.run([sys.executable, "-m", "ddm_ray.cli", "inspect", *args], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode != 0 and p.stdout == "" and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr


def test_library_functions_return_plain_data_and_read_through_audit_run(run_dir):
    run = ddm_ray.open_run(run_dir)
    report = inspect.unit_report(run, 3, top=2)
    assert json.loads(json.dumps(report)) == report
    assert report["objective"] == "loss" and len(report["helped"]) == len(report["hurt"]) == 2
    with pytest.raises(InputError, match="unit -1"):
        inspect.unit_report(run, -1)
    source = Path(inspect.__file__).read_text()
    for reader in ("pyarrow", "RunStore", "complete_parts", "read_table", "print("):
        assert reader not in source, f"ddm_ray/inspect.py uses {reader}: read through AuditRun"
    _, _, delta = run.matrix("loss")
    assert delta.shape == (30, 60) and np.isfinite(delta).all()


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> str:
    """Blobs of 3 classes with a `source` column of 4 annotators: one unit per annotator."""
    import pyarrow as pa

    from tests.conftest import TINY_RUN, blobs

    root = tmp_path_factory.mktemp("named")
    x, y = blobs(96, seed=0)
    xt, yt = blobs(24, seed=1)
    pq.write_table(pa.table({"x": list(x), "y": y, "source": [f"annotator-{i % 4}" for i in range(96)]}),
                   root / "train.parquet")
    pq.write_table(pa.table({"x": list(xt), "y": yt}), root / "test.parquet")
    out = str(root / "run")
    i = TINY_RUN.index("--clusters-per-class")
    run_args = TINY_RUN[:i] + TINY_RUN[i + 2 :]  # k-means options do not apply to column units
    assert main(["run", "--train", str(root / "train.parquet"), "--test", str(root / "test.parquet"),
                 "--units-from", "source", "--out", out, *run_args]) == 0
    return out


def test_a_unit_is_named_wherever_an_id_is_accepted(source_run, run_dir, capsys):
    units = pq.read_table(f"{source_run}/units.parquet").to_pydict()
    assert sorted(units["name"]) == [f"annotator-{i}" for i in range(4)]
    uid = units["name"].index("annotator-2")
    run = ddm_ray.open_run(source_run)
    assert run.unit_id("annotator-2") == uid and run.unit_id(str(uid)) == uid and run.unit_id(uid) == uid
    assert run.members("annotator-2") == run.members(uid)
    assert run.members("annotator-2")["sample_ids"] == units["sample_ids"][uid]
    assert run.top_tests("annotator-2", k=3) == run.top_tests(uid, k=3)
    by_name = cli(capsys, source_run, "--unit", "annotator-2")
    by_id = cli(capsys, source_run, "--unit", str(uid))
    assert by_name[0] == by_id[0] == 0 and by_name[1] == by_id[1]
    assert by_name[1].startswith(f"unit {uid} (annotator-2): label mixed, size 24, level column:source")
    rc, js, _ = cli(capsys, source_run, "--unit", "annotator-2", "--format", "json")
    doc = json.loads(js)
    assert doc["unit"]["name"] == "annotator-2"
    # a mixed unit's members carry their own labels (blobs: sample i has label i % 3), and the
    # trained model's prediction on each
    assert [(m["sample_id"], m["label"], m["label_name"]) for m in doc["members"]] == [
        (i, i % 3, str(i % 3)) for i in units["sample_ids"][uid]]
    assert {m["label"] for m in doc["members"]} == {0, 1, 2}
    assert all(m["agrees"] == (m["predicted"] == m["label"]) for m in doc["members"])
    assert doc["unit"]["disagreeing"] == sum(not m["agrees"] for m in doc["members"])
    assert units["member_labels"][uid] == [m["label"] for m in doc["members"]]
    members = section(by_name[1], "members (")
    assert [line.split()[:2] for line in members] == [[str(i), str(i % 3)] for i in units["sample_ids"][uid]]
    # the test sample view and the worst tests name the units too
    test_id = run.test_index().column("test_id")[0].as_py()
    rc, js, _ = cli(capsys, source_run, "--test-id", str(test_id), "--top", "2", "--format", "json")
    doc = json.loads(js)
    assert [u["name"] for u in doc["helpful"]] == [units["name"][u] for u, _ in run.top_units(test_id, k=2)["helpful"]]
    rc, js, _ = cli(capsys, source_run, "--worst-tests", "2", "--format", "json")
    assert all(t["harmful_unit_name"] == units["name"][t["harmful_unit"]] for t in json.loads(js)["tests"])
    # k-means units are named "<label>/<cluster>"
    kmeans = pq.read_table(f"{run_dir}/units.parquet").to_pydict()
    assert cli(capsys, run_dir, "--unit", kmeans["name"][4])[1] == cli(capsys, run_dir, "--unit", "4")[1]
    # an unknown name: one line naming a few valid ones; an unknown id stays an id error
    rc, out, err = cli(capsys, source_run, "--unit", "annotator-9")
    assert rc != 0 and out == "" and err.count("\n") == 1, err
    assert "no unit named 'annotator-9'" in err and "'annotator-0'" in err and "'annotator-3'" in err
    rc, out, err = cli(capsys, source_run, "--unit", "7")
    assert rc != 0 and "unit 7 is not in this run" in err
    with pytest.raises(InputError, match="no unit named 'nobody'"):
        run.members("nobody")
    p = subprocess.run([sys.executable, "-m", "ddm_ray.cli", "inspect", source_run, "--unit", "annotator-1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "(annotator-1): label mixed" in p.stdout, p.stderr


def test_help_imports_neither_torch_nor_pyarrow():
    code = ("import sys\nfrom ddm_ray.cli import build_parser\n"
            "try:\n    build_parser().parse_args(['inspect', '--help'])\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('torch', 'pyarrow', 'ray') if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--worst-tests" in p.stdout and "--format" in p.stdout
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout

"""`ddm-ray` end to end on tiny data: outputs, determinism, validation and bad input."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from ddm_ray.cli import main
from ddm_ray.store.run_store import ATTRIBUTION_SCHEMA, TEST_INDEX_SCHEMA, UNITS_SCHEMA
from tests.conftest import TINY_RUN, blobs, write_parquet


def _run(tmp_path, tiny_parquet, out_name="out", extra=()):
    tr, te = tiny_parquet
    out = str(tmp_path / out_name)
    try:
        rc = main(["run", "--dataset", "parquet", "--train", tr, "--test", te, "--out", out, *TINY_RUN, *extra])
    except SystemExit as e:  # a flag value argparse refuses (choices, types) before the command runs
        rc = e.code
    return rc, out


def _manifest(out):
    with open(f"{out}/manifest.json") as f:
        return json.load(f)


def test_run_writes_the_output_contract(tmp_path, tiny_parquet):
    rc, out = _run(tmp_path, tiny_parquet)
    assert rc == 0
    m = _manifest(out)
    assert m["status"] == "complete"
    assert m["counts"]["units"] == 6 and m["counts"]["rows"] == 18
    assert len(m["config_hash"]) == 16 and "torch" in m["versions"]
    assert set(m["timings_seconds"]) >= {"load_data", "train_and_units", "distill", "online", "total"}
    assert isinstance(m["execution"]["online_batch"], int) and m["execution"]["online_batch"] >= 1
    units = pq.read_table(f"{out}/units.parquet")
    assert units.schema.equals(UNITS_SCHEMA)
    members = sorted(i for ids in units.column("sample_ids").to_pylist() for i in ids)
    assert members == list(range(1000, 1120))  # every training id in exactly one unit
    assert set(units.column("level").to_pylist()) == {"cluster"}
    ti = pq.read_table(f"{out}/test_index.parquet")
    assert ti.schema.equals(TEST_INDEX_SCHEMA) and ti.column("test_id").to_pylist() == list(range(30))
    att = pq.read_table(f"{out}/attribution")
    assert att.schema.equals(ATTRIBUTION_SCHEMA)
    keys = sorted(zip(att.column("unit_id").to_pylist(), att.column("objective").to_pylist(), strict=True))
    assert keys == sorted((u, o) for u in range(6) for o in ("loss", "margin", "correct"))
    assert all(len(d) == 30 for d in att.column("delta").to_pylist())


def test_same_config_gives_identical_files_and_refuses_other_configs(tmp_path, tiny_parquet, capsys):
    _, a = _run(tmp_path, tiny_parquet, "a")
    _, b = _run(tmp_path, tiny_parquet, "b")
    import os

    for rel in ["units.parquet", "test_index.parquet"] + [
        f"attribution/{n}" for n in sorted(os.listdir(f"{a}/attribution"))
    ]:
        with open(f"{a}/{rel}", "rb") as fa, open(f"{b}/{rel}", "rb") as fb:
            assert fa.read() == fb.read(), rel
    rc, _ = _run(tmp_path, tiny_parquet, "a", extra=("--ipc", "3"))
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ddm-ray: error:") and "another config" in err[-1]
    assert "distill.ipc: 2 -> 3" in err[-1]  # the refusal names the field that differs
    assert _manifest(a)["status"] == "complete"  # untouched


def test_validate_and_inspect(tmp_path, tiny_parquet, capsys):
    _, out = _run(tmp_path, tiny_parquet)
    assert main(["validate", "--out", out, "--units", "3", "--quiet", "--engine", "local"]) == 0
    with open(f"{out}/validation.json") as f:
        v = json.load(f)
    assert v["units_validated"] == 3
    for key in ("pearson", "spearman", "ddm_seconds_per_unit", "retrain_seconds_per_unit", "speedup"):
        assert key in v
    assert set(v["per_objective"]) == {"loss", "margin", "correct"}
    assert "gradient_ascent" in v["per_objective"]["loss"]
    capsys.readouterr()
    assert main(["inspect", "--out", out, "--test-id", "4", "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "most helpful" in text and "most harmful" in text
    assert main(["inspect", "--out", out, "--test-id", "999"]) != 0


@pytest.mark.parametrize(
    "args,match",
    [
        (["--clusters-per-class", "0"], "K"),
        (["--ipc", "0"], "IPC"),
        (["--clusters-per-class", "50"], "fewer than"),
        (["--model", "convnet"], "C,H,W"),
        (["--objectives", "loss,accuracy"], "objectives"),
        (["--ipc", "100000000"], "IPC"),
        (["--epochs", "100000000"], "epochs"),
        (["--probe-rank", "0"], "probe rank"),
        (["--target", "magic"], "target"),
        (["--blend-weight", "2"], "blend weight"),
        (["--online-steps", "3"], "one online step"),
        (["--storage-option", "bogus=1", "--out", "s3://b/r"], "unknown --storage-option"),
    ],
)
def test_bad_options_one_line_nonzero(tmp_path, tiny_parquet, capsys, args, match):
    rc, out = _run(tmp_path, tiny_parquet, extra=tuple(args))
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and "Traceback" not in err[0]
    import os

    if os.path.exists(f"{out}/manifest.json"):
        assert _manifest(out)["status"] != "complete"


def test_bad_data_never_marks_complete(tmp_path, tiny_parquet, capsys):
    x, y = blobs(20, classes=3)
    bad = write_parquet(str(tmp_path / "t.parquet"), x, y + 7)  # labels outside the training classes
    tr, _ = tiny_parquet
    out = str(tmp_path / "o")
    rc = main(["run", "--dataset", "parquet", "--train", tr, "--test", bad, "--out", out, *TINY_RUN])
    assert rc != 0
    assert "not among the training classes" in capsys.readouterr().err
    import os

    assert not os.path.exists(f"{out}/manifest.json") or _manifest(out)["status"] != "complete"


def test_subprocess_error_has_no_traceback(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "ddm_ray.cli", "run", "--dataset", "parquet", "--train", "/nope.parquet",
         "--test", "/nope.parquet", "--out", str(tmp_path / "o"), "--engine", "local"],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == ["ddm-ray: error: /nope.parquet: no such file"]
    p = subprocess.run([sys.executable, "-m", "ddm_ray.cli", "run", "--epochs", "x"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_resume_refuses_changed_data(tmp_path, tiny_parquet, capsys):
    rc, out = _run(tmp_path, tiny_parquet)
    assert rc == 0 and len(_manifest(out)["data_fingerprint"]) == 16
    tr, te = tiny_parquet
    x, y = blobs(120, seed=5)
    write_parquet(tr, x, y, None)  # same path, other content
    capsys.readouterr()
    rc, _ = _run(tmp_path, tiny_parquet, extra=("--resume",))
    assert rc != 0
    assert "data changed" in capsys.readouterr().err


def test_resume_after_a_crash_in_the_offline_stage(tmp_path, tiny_parquet):
    """State of a run killed after the tables but before the model was written: resume redoes the
    offline stage and ends with the same rows as an uninterrupted run."""
    import os
    import shutil

    _, ref = _run(tmp_path, tiny_parquet, "ref")
    _, out = _run(tmp_path, tiny_parquet, "crashed")
    shutil.rmtree(f"{out}/artifacts")
    shutil.rmtree(f"{out}/attribution")
    m = _manifest(out)
    m["status"] = "running"
    with open(f"{out}/manifest.json", "w") as f:
        json.dump(m, f)
    rc, _ = _run(tmp_path, tiny_parquet, "crashed", extra=("--resume",))
    assert rc == 0 and _manifest(out)["status"] == "complete"
    for name in sorted(os.listdir(f"{ref}/attribution")):
        with open(f"{ref}/attribution/{name}", "rb") as a, open(f"{out}/attribution/{name}", "rb") as b:
            assert a.read() == b.read()


def test_a_folder_without_a_run_is_refused_and_left_untouched(tmp_path, tiny_parquet, capsys):
    out = tmp_path / "mine"
    (out / "artifacts").mkdir(parents=True)
    (out / "artifacts" / "keep.txt").write_text("user data")
    (out / "validation.json").write_text("{}")
    rc, _ = _run(tmp_path, tiny_parquet, "mine")
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no ddm-ray run" in err[0]
    assert (out / "artifacts" / "keep.txt").read_text() == "user data" and (out / "validation.json").exists()
    assert not (out / "manifest.json").exists()


def test_a_rerun_marks_the_run_not_complete_before_deleting(tmp_path, tiny_parquet, monkeypatch):
    from ddm_ray.store.run_store import RunStore

    rc, out = _run(tmp_path, tiny_parquet)
    assert rc == 0
    seen = []
    real_remove = RunStore.remove

    def remove(self, rel):
        seen.append((rel, json.load(open(f"{out}/manifest.json"))["status"]))
        if rel == RunStore.ATTRIBUTION:
            raise KeyboardInterrupt  # a crash between the deletion and the rewrite
        return real_remove(self, rel)

    monkeypatch.setattr(RunStore, "remove", remove)
    assert _run(tmp_path, tiny_parquet)[0] == 130
    assert seen and all(status == "running" for _rel, status in seen)
    monkeypatch.setattr(RunStore, "remove", real_remove)
    assert main(["inspect", "--out", out, "--test-id", "3"]) != 0  # not complete: refused


def test_a_rerun_without_resume_says_it_removed_validation_json(tmp_path, tiny_parquet, capsys):
    rc, out = _run(tmp_path, tiny_parquet)
    assert rc == 0 and main(["validate", out, "--units", "1", "--engine", "local", "--quiet"]) == 0
    assert os.path.exists(f"{out}/validation.json")
    capsys.readouterr()
    assert _run(tmp_path, tiny_parquet)[0] == 0  # --quiet: warnings only
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "break-even" not in line]
    assert len(err) == 1 and "removed" in err[0] and "validation.json" in err[0] and "ddm-ray validate" in err[0], err
    assert not os.path.exists(f"{out}/validation.json")
    assert _run(tmp_path, tiny_parquet)[0] == 0  # nothing to remove: nothing said
    assert "validation.json" not in capsys.readouterr().err


@pytest.mark.parametrize("case", ["huge_lr", "huge_inputs"])
def test_diverging_runs_stop_with_one_line_and_are_never_complete(tmp_path, case, capsys):
    out = str(tmp_path / "div")
    if case == "huge_lr":  # digits with --lr 1e6: the parameters overflow during training
        args = ["--lr", "1e6", "--max-train", "300", "--epochs", "3", "--clusters-per-class", "2"]
    else:  # inputs scaled by 1e18
        x, y = blobs(120, seed=0)
        xt, yt = blobs(30, seed=1)
        tr = write_parquet(str(tmp_path / "tr.parquet"), x * 1e18, y)
        te = write_parquet(str(tmp_path / "te.parquet"), xt * 1e18, yt)
        args = ["--dataset", "parquet", "--train", tr, "--test", te, *TINY_RUN]
    rc = main(["run", "--out", out, "--engine", "local", "--quiet", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "non-finite" in err[0], err
    assert "--lr" in err[0] and "normalise" in err[0]
    if case == "huge_lr":
        assert err[0].startswith("ddm-ray: error: training:")
    if (tmp_path / "div" / "manifest.json").exists():
        assert _manifest(out)["status"] != "complete"


@pytest.mark.slow
def test_exit_codes_are_exact_across_repeated_processes(tmp_path, tiny_parquet):
    """torch + a Parquet table read from memory used to abort some exits with 134: run inspect and
    an input error 20 times each in fresh interpreters and require the exact exit codes."""
    from concurrent.futures import ThreadPoolExecutor

    rc, out = _run(tmp_path, tiny_parquet)
    assert rc == 0
    inspect = [sys.executable, "-m", "ddm_ray.cli", "inspect", "--out", out, "--test-id", "3", "--top", "1"]
    bad = [sys.executable, "-m", "ddm_ray.cli", "run", "--dataset", "parquet", "--train", tiny_parquet[0],
           "--test", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "never"), "--quiet"]

    def code(cmd):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120).returncode

    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(code, [inspect] * 20 + [bad] * 20))
    assert codes == [0] * 20 + [2] * 20, codes


def _damage(path, how, other=None):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "emptied":
        path.write_bytes(b"")
    elif how == "flipped":
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :])
    elif how == "swapped":
        path.write_bytes(other.read_bytes())


@pytest.mark.parametrize("how", ["truncated", "emptied", "flipped", "swapped"])
def test_damaged_parts_are_refused_by_readers_and_recomputed_on_resume(tmp_path, tiny_parquet, capsys, how):
    rc, out = _run(tmp_path, tiny_parquet, extra=("--block-units", "2"))
    assert rc == 0
    parts = sorted((tmp_path / "out" / "attribution").iterdir())
    assert len(parts) == 3
    before = {p.name: p.read_bytes() for p in parts}
    _damage(parts[1], how, other=parts[0])
    capsys.readouterr()
    assert main(["inspect", "--out", out, "--test-id", "3"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and parts[1].name in err[0] and "--resume" in err[0], err
    assert main(["validate", "--out", out, "--units", "2", "--engine", "local", "--quiet"]) != 0
    rc, _ = _run(tmp_path, tiny_parquet, extra=("--block-units", "2", "--resume"))
    assert rc == 0
    m = _manifest(out)
    assert m["status"] == "complete" and m["counts"]["rows_computed_this_session"] == 2 * 3
    assert {p.name: p.read_bytes() for p in parts} == before, "the recomputed part equals the original"
    assert set(m["parts"]) == set(before)
    assert main(["inspect", "--out", out, "--test-id", "3"]) == 0


def test_a_damaged_synset_is_recomputed_on_resume(tmp_path, tiny_parquet):
    import torch

    rc, out = _run(tmp_path, tiny_parquet)
    assert rc == 0
    rows = {p.name: p.read_bytes() for p in (tmp_path / "out" / "attribution").iterdir()}
    syn = torch.load(f"{out}/artifacts/synset.pt", weights_only=True)
    syn["x"] = syn["x"][:, :3]  # wrong input shape
    torch.save(syn, f"{out}/artifacts/synset.pt")
    m = _manifest(out)
    m["status"] = "running"
    with open(f"{out}/manifest.json", "w") as f:
        json.dump(m, f)
    for p in (tmp_path / "out" / "attribution").iterdir():
        p.unlink()
    rc, _ = _run(tmp_path, tiny_parquet, extra=("--resume",))
    assert rc == 0 and _manifest(out)["status"] == "complete"
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "attribution").iterdir()} == rows


def test_a_failed_local_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import os

    from ddm_ray.errors import StorageError
    from ddm_ray.store.run_store import RunStore

    store = RunStore(str(tmp_path / "s"))
    store.write_bytes("a/ok.bin", b"1")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StorageError, match="No space left"):
        store.write_bytes("a/fail.bin", b"2")
    assert sorted(os.listdir(tmp_path / "s" / "a")) == ["ok.bin"]


def test_train_and_test_files_select_parquet_and_contradictions_are_refused(tmp_path, tiny_parquet, capsys):
    tr, te = tiny_parquet
    out = str(tmp_path / "p")
    assert main(["run", "--train", tr, "--test", te, "--out", out, *TINY_RUN]) == 0
    m = _manifest(out)
    assert m["config"]["data"]["dataset"] == "parquet" and m["counts"]["train_samples"] == 120
    capsys.readouterr()
    assert main(["run", "--dataset", "digits", "--train", tr, "--test", te, "--out", str(tmp_path / "q"), *TINY_RUN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dataset is digits" in err[0]


def test_online_blocks_ship_only_their_weight_rows(tmp_path, tiny_parquet):
    """Each online task gets its block's weight rows (compact, not a view of the whole matrix);
    the synthetic pool travels once, with the job."""
    import pickle

    from ddm_ray.cli import build_parser, configs_from_args
    from ddm_ray.engine.local import LocalExecutor
    from ddm_ray.pipeline import Run

    tr, te = tiny_parquet
    cfg, exe = configs_from_args(build_parser().parse_args(
        ["run", "--train", tr, "--test", te, *TINY_RUN, "--block-units", "2"]))
    shipped = []

    class Capturing(LocalExecutor):
        def evaluate(self, job, blocks):
            for _block, weight in blocks:
                shipped.append((weight.shape, len(pickle.dumps(weight)), weight.untyped_storage().nbytes()))
            return super().evaluate(job, blocks)

    Run(cfg, exe, str(tmp_path / "c"), Capturing()).execute()
    assert len(shipped) == 3
    for shape, pickled, storage in shipped:
        assert shape[0] == 2 and storage == shape[0] * shape[1] * 4  # its own storage, nothing more
        assert pickled < storage + 2048


def test_run_prints_next_steps_with_its_path_and_they_work(tmp_path, tiny_parquet):
    import shlex

    tr, te = tiny_parquet
    out = str(tmp_path / "my audit")  # a space: the commands must quote it
    opts = tmp_path / "storage.txt"
    opts.write_text("anon=false\n")
    p = subprocess.run([sys.executable, "-m", "ddm_ray.cli", "run", "--train", tr, "--test", te, "--out", out,
                        "--storage-options-file", str(opts), *TINY_RUN], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("complete: 6 units") and lines[1] == "next steps:"
    steps = [line.split("  # ")[0].strip() for line in lines[2:5]]
    assert all(line.startswith("warning: ") for line in lines[5:])  # then the run's warnings, if any
    quoted, opt = shlex.quote(out), f"--storage-options-file {shlex.quote(str(opts))}"
    assert steps == [f"ddm-ray validate {quoted} --engine local {opt}", f"ddm-ray inspect {quoted} --worst-tests 5 {opt}",
                     f"ddm-ray report {quoted} {opt}"]
    assert lines[4].endswith(f"# an HTML page: {out}/report/index.html")
    for step in steps[1:]:  # the printed commands run as printed (validate is covered elsewhere)
        argv = shlex.split(step)
        r = subprocess.run([sys.executable, "-m", "ddm_ray.cli", *argv[1:]], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (step, r.stderr)
    assert (tmp_path / "my audit" / "report" / "index.html").exists()
    from ddm_ray.cli import build_parser
    from ddm_ray.cli.run import next_steps
    from ddm_ray.config import ExecConfig

    a = build_parser().parse_args(["run", "--out", "s3://bucket/runs/a", "--storage-option", "endpoint_url=http://h:9"])
    remote = next_steps(a, ExecConfig())
    assert remote[1].startswith("  ddm-ray validate s3://bucket/runs/a --storage-option endpoint_url=http://h:9  ")
    assert "ddm-ray report s3://bucket/runs/a --report-out ./report --storage-option endpoint_url=http://h:9" in remote[3]


def test_a_missing_local_input_fails_before_anything_starts(tmp_path, tiny_parquet, capsys):
    out = tmp_path / "never"
    rc = main(["run", "--dataset", "parquet", "--train", tiny_parquet[0], "--test", str(tmp_path / "missing.parquet"),
               "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "missing.parquet: no such file" in err[0], err
    assert not out.exists()  # no run folder, no lease, no Ray runtime: refused before any of them

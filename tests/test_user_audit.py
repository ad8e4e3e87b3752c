"""The user's own model and data end to end: a GroupNorm CNN named `module:factory`, Parquet with
float-list pixels, string labels and a `source` column as units (on the Ray engine, then
validated), a Hugging Face-style PNG image Parquet, and the README's `ddm_ray.audit` snippet."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
pytestmark = pytest.mark.slow


def _block(after: str, lang: str = "python") -> str:
    """The first fenced block of `lang` after the text `after` in the README."""
    start = README.index(after)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(README, start)
    assert m is not None, after
    return m.group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory holding the README's mymodels.py (and nothing on PYTHONPATH)."""
    d = tmp_path_factory.mktemp("user")
    (d / "mymodels.py").write_text(_block("(`mymodels.py`):"))
    return d


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target


def _cli(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-m", "ddm_ray.cli", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=900)


def test_user_cnn_string_labels_and_source_units_on_ray_then_validate(workdir: Path) -> None:
    x, y = _digits()
    train, test = slice(0, 360), slice(1500, 1560)
    sources = np.array([f"src-{i % 6}" for i in range(360)], dtype=object)
    sources[:30] = "src-mixed"  # a unit spanning classes
    # pixels as nested float lists of shape (1, 8, 8): the input shape comes from the data itself
    pixels = x.reshape(-1, 1, 8, 8).tolist()
    pq.write_table(pa.table({"pixels": pixels[train], "label": NAMES[y[train]], "source": sources}),
                   workdir / "train.parquet")
    pq.write_table(pa.table({"pixels": pixels[test], "label": NAMES[y[test]]}), workdir / "test.parquet")
    out = str(workdir / "run-ray")
    r = _cli(workdir, "run", "--train", "train.parquet", "--test", "test.parquet", "--x-column", "pixels",
             "--y-column", "label", "--model", "mymodels:build", "--units-from", "source",
             "--epochs", "4", "--num-cpus", "2", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "complete: 7 units x 60 test samples" in r.stdout

    import ddm_ray

    run = ddm_ray.open_run(out)
    units = run.units().to_pydict()
    assert units["name"] == sorted(set(sources.tolist())) and units["level"] == ["column:source"] * 7
    assert sorted(i for ids in units["sample_ids"] for i in ids) == list(range(360))
    mixed = units["name"].index("src-mixed")
    assert units["label_name"][mixed] == "mixed" and units["label"][mixed] is None
    unit_ids, test_ids, delta = run.matrix("loss")
    assert delta.shape == (7, 60) and np.isfinite(delta).all() and np.abs(delta).max() > 0
    ti = run.test_index().to_pydict()
    assert set(ti["label_name"]) <= set(NAMES) and ti["label_name"] == NAMES[y[test]].tolist()
    assert run.manifest["execution"]["engine"] == "ray" and run.manifest["data"]["input_shape"] == [1, 8, 8]
    assert run.manifest["data"]["label_names"] == sorted(NAMES.tolist())

    v = _cli(workdir, "validate", "--out", out, "--model", "mymodels:build", "--engine", "ray", "--num-cpus", "2",
             "--quiet")
    assert v.returncode == 0, v.stderr[-3000:]
    report = json.loads((Path(out) / "validation.json").read_text())
    assert report["units_total"] == report["units_validated"] == 7 and report["pearson"] > 0.5
    print(v.stdout)  # figures for the closing note (pytest -s)


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_hugging_face_style_png_parquet(workdir: Path) -> None:
    x, y = _digits()
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    def table(rows: slice) -> pa.Table:
        cells = [{"bytes": _png(img.reshape(8, 8)), "path": f"{i}.png"} for i, img in enumerate(x[rows])]
        return pa.table({"image": pa.array(cells, struct), "label": y[rows]})

    pq.write_table(table(slice(0, 400)), workdir / "hf-train.parquet")
    pq.write_table(table(slice(1500, 1550)), workdir / "hf-test.parquet")
    out = str(workdir / "run-hf")
    r = _cli(workdir, "run", "--train", "hf-train.parquet", "--test", "hf-test.parquet", "--x-column", "image",
             "--y-column", "label", "--model", "mymodels:build", "--clusters-per-class", "3", "--epochs", "3",
             "--engine", "local", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    import ddm_ray

    run = ddm_ray.open_run(out)
    _, test_ids, delta = run.matrix("loss")
    units = run.units().to_pydict()
    assert delta.shape == (len(units["unit_id"]), 50) and test_ids.tolist() == list(range(50))
    assert min(units["size"]) >= 5  # --min-unit-size 5 by default
    assert {int(v) for v in units["label"]} == set(range(10))


def test_readme_audit_snippet_runs(workdir: Path) -> None:
    snippet = _block("**From Python**")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DDM_RAY_CACHE": str(workdir / "cache")}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-c", snippet], cwd=workdir, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "['scanner-0', 'scanner-1', 'scanner-2', 'scanner-3', 'scanner-4', 'scanner-5'] (6, 100)" in r.stdout
    assert len(list((workdir / "cache" / "inputs").glob("*.parquet"))) == 2


def test_an_edited_user_model_does_not_resume_or_validate(workdir: Path) -> None:
    d = workdir / "edited"
    d.mkdir()
    (d / "editable_models.py").write_text(_block("(`mymodels.py`):"))
    out = str(d / "run")
    args = ["run", "--max-train", "300", "--max-test", "40", "--epochs", "2", "--clusters-per-class", "2",
            "--input-shape", "1,8,8", "--model", "editable_models:build", "--engine", "local", "--out", out, "--quiet"]
    assert _cli(d, *args).returncode == 0
    source = (d / "editable_models.py").read_text()
    (d / "editable_models.py").write_text(source.replace("nn.Linear(64, num_classes)", "nn.Linear(64, num_classes, bias=False)"))
    for cmd in (["run", *args[1:], "--resume"], ["validate", "--out", out, "--model", "editable_models:build", "--engine", "local", "--units", "2"]):
        r = _cli(d, *cmd)
        assert r.returncode != 0 and "model" in r.stderr and "changed since" in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1

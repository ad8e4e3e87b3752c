"""User Parquet beyond flat lists: named columns, nested lists, PNG/JPEG bytes, Hugging Face
{bytes, path} image structs, string labels and a units column; each bad case is one InputError."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ddm_ray.config import DataConfig
from ddm_ray.data import load_dataset
from ddm_ray.errors import InputError


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _gray_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 6, 5), dtype=np.uint8)


def _write(path, table: pa.Table) -> str:
    pq.write_table(table, str(path))
    return str(path)


def test_named_columns_string_labels_and_units_column(tmp_path):
    x = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    names = np.array(["cat", "dog", "ant"])[np.arange(12) % 3]
    t = pa.table({"pixels": list(x), "label": names, "source": [f"s{i % 4}" for i in range(12)],
                  "key": np.arange(100, 112)})
    tr = _write(tmp_path / "tr.parquet", t)
    te = _write(tmp_path / "te.parquet", t.slice(0, 5).drop(["source"]))
    ds = load_dataset(DataConfig(dataset="parquet", train=tr, test=te, x_column="pixels", y_column="label",
                                 id_column="key"), group_column="source")
    assert ds.class_names == ["ant", "cat", "dog"]  # sorted order
    assert ds.y_train.tolist()[:3] == [1, 2, 0]  # cat, dog, ant
    assert [ds.name_of(c) for c in ds.y_test.tolist()] == names[:5].tolist()
    assert ds.train_ids.tolist() == list(range(100, 112))
    assert ds.train_groups == [f"s{i % 4}" for i in range(12)]
    np.testing.assert_allclose(ds.x_train.numpy(), x)


def test_nested_lists_keep_their_shape(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    t = pa.table({"x": [[row.tolist() for row in img] for img in x], "y": [0, 1]})
    p = _write(tmp_path / "n.parquet", t)
    ds = load_dataset(DataConfig(dataset="parquet", train=p, test=p))
    assert ds.input_shape == (3, 4)
    np.testing.assert_array_equal(ds.x_train.numpy(), x)


def test_png_bytes_decode_to_one_channel_images(tmp_path):
    imgs = _gray_images(6)
    t = pa.table({"image": pa.array([_png(a) for a in imgs], pa.binary()), "y": [0, 1] * 3})
    p = _write(tmp_path / "png.parquet", t)
    ds = load_dataset(DataConfig(dataset="parquet", train=p, test=p, x_column="image"))
    assert ds.input_shape == (1, 6, 5)
    np.testing.assert_allclose(ds.x_train.numpy()[:, 0], imgs / 255.0, atol=1e-6)  # PNG is lossless


def test_hugging_face_image_struct_with_bytes_and_relative_path(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, size=(4, 5, 5, 3), dtype=np.uint8)
    (tmp_path / "pics").mkdir()
    Image.fromarray(imgs[3]).save(tmp_path / "pics" / "three.png")
    cells = [{"bytes": _png(a), "path": f"img{i}.png"} for i, a in enumerate(imgs[:3])]
    cells.append({"bytes": None, "path": "pics/three.png"})  # bytes absent: read beside the Parquet
    t = pa.table({"image": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                  "label": ["a", "b", "a", "b"]})
    p = _write(tmp_path / "hf.parquet", t)
    ds = load_dataset(DataConfig(dataset="parquet", train=p, test=p, x_column="image", y_column="label"))
    assert ds.input_shape == (3, 5, 5)
    np.testing.assert_allclose(ds.x_train.numpy(), imgs.transpose(0, 3, 1, 2) / 255.0, atol=1e-6)


def test_jpeg_rgb_is_decoded(tmp_path):
    imgs = np.full((2, 8, 8, 3), 200, dtype=np.uint8)
    t = pa.table({"x": pa.array([_png(a, "JPEG") for a in imgs], pa.binary()), "y": [0, 1]})
    p = _write(tmp_path / "j.parquet", t)
    ds = load_dataset(DataConfig(dataset="parquet", train=p, test=p))
    assert ds.input_shape == (3, 8, 8)
    assert abs(float(ds.x_train.mean()) - 200 / 255) < 0.02


@pytest.mark.parametrize(
    "table,match",
    [
        (pa.table({"x": pa.array([_png(_gray_images(1)[0]), b"not an image"], pa.binary()), "y": [0, 1]}),
         "row 1: not a decodable image"),
        (pa.table({"x": pa.array([_png(_gray_images(1)[0]), _png(np.zeros((7, 5), np.uint8))], pa.binary()),
                   "y": [0, 1]}), "resize the images"),
        (pa.table({"x": pa.array([{"bytes": None, "path": "nope.png"}] * 2,
                                 pa.struct([("bytes", pa.binary()), ("path", pa.string())])), "y": [0, 1]}),
         "image file nope.png not found"),
        (pa.table({"x": [[1.0], [2.0]], "y": ["a", None]}), "null values in the label column"),
        (pa.table({"x": [["a"], ["b"]], "y": [0, 1]}), "must hold numbers or images"),
        (pa.table({"x": [[1.0], [2.0]], "y": [0, 1], "id": ["a", "b"]}), "must be non-null integers"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, table, match):
    p = _write(tmp_path / "bad.parquet", table)
    with pytest.raises(InputError, match=match) as e:
        load_dataset(DataConfig(dataset="parquet", train=p, test=p))
    assert "\n" not in str(e.value)


def test_units_column_with_nulls_is_refused(tmp_path):
    t = pa.table({"x": [[1.0], [2.0]], "y": [0, 1], "source": ["a", None]})
    p = _write(tmp_path / "g.parquet", t)
    with pytest.raises(InputError, match="null values in the units column 'source'"):
        load_dataset(DataConfig(dataset="parquet", train=p, test=p), group_column="source")


def test_units_column_needs_parquet():
    with pytest.raises(InputError, match="--units-from source reads a column"):
        load_dataset(DataConfig(), group_column="source")


@pytest.mark.parametrize(
    "table,match,extra",
    [
        (pa.table({"x": pa.array([{"bytes": "s", "path": "p"}], pa.struct([("bytes", pa.string()), ("path", pa.string())])),
                   "y": [0]}), "images need", {}),
        (pa.table({"x": [[1.0], [2.0]], "y": [0, 1], "id": pa.array([1, 2**63 + 5], pa.uint64())}), "int64 range", {}),
        (pa.table({"x": [[1.0], [2.0]], "y": [0, 1]}), "missing id column 'key'", {"id_column": "key"}),
    ],
)
def test_odd_columns_are_one_line_errors(tmp_path, table, match, extra):
    p = _write(tmp_path / "odd.parquet", table)
    with pytest.raises(InputError, match=match):
        load_dataset(DataConfig(dataset="parquet", train=p, test=p, **extra))


def test_max_rows_are_taken_before_images_are_decoded(tmp_path):
    good = [_png(a) for a in _gray_images(4)]
    t = pa.table({"x": pa.array([*good, b"damaged beyond the rows used"], pa.binary()), "y": [0, 1, 0, 1, 0]})
    p = _write(tmp_path / "rows.parquet", t)
    ds = load_dataset(DataConfig(dataset="parquet", train=p, test=p, max_train=4, max_test=2))
    assert ds.x_train.shape == (4, 1, 6, 5) and ds.x_test.shape == (2, 1, 6, 5)


def _hf(table: pa.Table, names: list[str], column: str = "label") -> pa.Table:
    """The table with the schema metadata Hugging Face `datasets` writes for a ClassLabel column."""
    import json

    features = {column: {"names": names, "_type": "ClassLabel"}, "x": {"feature": {"dtype": "float32"}}}
    return table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def _labelled(tmp_path, name: str, labels: list, names: list[str] | None = None, test_names: list[str] | None = None):
    x = np.random.default_rng(0).normal(size=(len(labels), 3)).astype(np.float32)
    t = pa.table({"x": list(x), "label": labels})
    tr = _write(tmp_path / f"{name}-train.parquet", _hf(t, names) if names else t)
    te_names = test_names if test_names is not None else names
    te = _write(tmp_path / f"{name}-test.parquet", _hf(t, te_names) if te_names else t)
    return load_dataset(DataConfig(dataset="parquet", train=tr, test=te, y_column="label"))


def test_class_order_follows_a_hugging_face_class_label_else_numbers_else_the_alphabet(tmp_path):
    order = ["zero", "one", "two", "eight"]  # as the ClassLabel stores them, not alphabetical
    words = [order[i % 4] for i in range(12)]
    ds = _labelled(tmp_path, "words", words, order)
    assert ds.class_names == order and ds.label_order == "class_label"
    assert ds.y_train.tolist()[:4] == [0, 1, 2, 3] and ds.name_of(3) == "eight"
    # HF stores a ClassLabel column as the names' indices: the names come from the metadata
    ds = _labelled(tmp_path, "codes", [i % 3 for i in range(9)], ["cat", "dog", "ant"])
    assert ds.classes == [0, 1, 2] and ds.class_names == ["cat", "dog", "ant"] and ds.label_order == "class_label"
    assert [ds.name_of(c) for c in ds.y_test.tolist()[:3]] == ["cat", "dog", "ant"]
    # a ClassLabel that does not cover the labels is not used
    ds = _labelled(tmp_path, "partial", words, ["zero", "one"])
    assert ds.label_order == "alphabetical" and ds.class_names == ["eight", "one", "two", "zero"]
    # no metadata: numbers in numeric order, not "10" < "2"
    ds = _labelled(tmp_path, "numbers", ["10", "2", "1.5", "-3"] * 3)
    assert ds.class_names == ["-3", "1.5", "2", "10"] and ds.label_order == "numeric"
    ds = _labelled(tmp_path, "alpha", words)
    assert ds.class_names == ["eight", "one", "two", "zero"] and ds.label_order == "alphabetical"
    ds = _labelled(tmp_path, "ints", [i % 3 for i in range(9)])
    assert ds.class_names is None and ds.label_order == "integer"
    # unreadable metadata is ignored; train and test naming the classes differently is refused
    x = pa.table({"x": [[1.0], [2.0]], "label": ["b", "a"]}).replace_schema_metadata({"huggingface": "{not json"})
    p = _write(tmp_path / "broken.parquet", x)
    assert load_dataset(DataConfig(dataset="parquet", train=p, test=p, y_column="label")).label_order == "alphabetical"
    with pytest.raises(InputError, match="name the classes of 'label' differently") as e:
        _labelled(tmp_path, "differ", words, order, test_names=list(reversed(order)))
    assert "\n" not in str(e.value)


def test_a_run_records_the_class_order_and_the_report_says_it(tmp_path):
    import json

    from ddm_ray.cli import main
    from tests.conftest import TINY_RUN, blobs

    x, y = blobs(120, seed=0)
    xt, yt = blobs(30, seed=1)
    order = ["zero", "one", "two"]
    for name, xs, ys in (("train", x, y), ("test", xt, yt)):
        t = pa.table({"x": list(xs), "label": [order[i] for i in ys]})
        _write(tmp_path / f"{name}.parquet", _hf(t, order))
    out = str(tmp_path / "run")
    assert main(["run", "--train", str(tmp_path / "train.parquet"), "--test", str(tmp_path / "test.parquet"),
                 "--y-column", "label", "--out", out, *TINY_RUN]) == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data"]["label_names"] == order and manifest["data"]["label_order"] == "class_label"
    index = pq.read_table(f"{out}/test_index.parquet").to_pydict()
    assert index["label"] == yt.tolist() and index["label_name"] == [order[i] for i in yt]
    assert main(["report", out, "--quiet"]) == 0
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "<td>class order</td><td>the order of the Hugging Face ClassLabel names" in page
    assert "3: zero, one, two" in page


def test_only_the_needed_columns_and_rows_are_read(tmp_path):
    """A 2,000-row file with a 20 MB column the run does not use, in row groups of 200: reading
    x, y and the first 10 rows allocates a few kB of Arrow memory, not the file."""
    import json
    import subprocess
    import sys

    n = 2000
    t = pa.table({"x": [[float(i), 1.0] for i in range(n)], "y": [i % 2 for i in range(n)],
                  "blob": [bytes(10_000)] * n, "id": np.arange(n) + 7})
    pq.write_table(t, tmp_path / "big.parquet", row_group_size=200)
    code = (
        "import json, sys, pyarrow as pa, pyarrow.parquet as pq\n"
        "from ddm_ray.data.parquet import read_split\n"
        "pool = pa.default_memory_pool()\n"
        f"c = read_split({str(tmp_path / 'big.parquet')!r}, {{}}, 'x', 'y', 'id', max_rows=10)\n"
        "part = pool.max_memory()\n"
        f"full = read_split({str(tmp_path / 'big.parquet')!r}, {{}}, 'x', 'y', 'id')\n"
        "columns = pool.max_memory()\n"
        f"pq.read_table({str(tmp_path / 'big.parquet')!r})\n"
        "print(json.dumps({'part': part, 'columns': columns, 'whole': pool.max_memory(), 'ids': c.ids.tolist(),\n"
        "                  'x': c.x.tolist(), 'dtype': str(c.x.dtype), 'rows': len(full.ids)}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["ids"] == list(range(7, 17)) and doc["x"] == [[float(i), 1.0] for i in range(10)]
    assert doc["dtype"] == "float32" and doc["rows"] == n
    assert doc["whole"] > 20_000_000  # what reading the whole file costs
    assert doc["part"] < 1_000_000 and doc["columns"] < 2_000_000  # the unused column was never read


def test_inputs_are_float32_with_the_values_of_a_float64_read(tmp_path):
    from ddm_ray.data.parquet import read_split

    ints = np.array([[0, 3, 2**24 + 1], [255, 7, 1]], dtype=np.int64)
    floats = np.array([[0.1, 1e-8, 3.3333333333], [2.5, -1.0, 7.0]], dtype=np.float64)
    for name, x in (("ints", ints), ("floats", floats)):
        p = _write(tmp_path / f"{name}.parquet", pa.table({"x": [r.tolist() for r in x], "y": [0, 1]}))
        c = read_split(p, {}, "x", "y", "id")
        assert c.x.dtype == np.float32 and c.x.flags.writeable
        np.testing.assert_array_equal(c.x, x.astype(np.float64).astype(np.float32))
    imgs = _gray_images(3)
    p = _write(tmp_path / "png.parquet", pa.table({"x": pa.array([_png(a) for a in imgs], pa.binary()), "y": [0, 1, 0]}))
    c = read_split(p, {}, "x", "y", "id")
    assert c.x.dtype == np.float32
    np.testing.assert_array_equal(c.x, (imgs.reshape(3, -1) / 255.0).astype(np.float32))
    ds = load_dataset(DataConfig())  # digits, built in
    assert ds.x_train.dtype == torch.float32


def test_images_decode_in_parallel_as_they_do_in_one_thread(tmp_path):
    from ddm_ray.data.parquet import _PARALLEL_FROM, DECODE_THREADS, _decode_images

    imgs = np.random.default_rng(3).integers(0, 256, size=(_PARALLEL_FROM + 60, 7, 5), dtype=np.uint8)
    blobs = [_png(a) for a in imgs]
    one, shape = _decode_images(blobs, "f.parquet", threads=1)
    many, shape2 = _decode_images(blobs, "f.parquet", threads=max(2, DECODE_THREADS))
    assert shape == shape2 == (1, 7, 5) and many.dtype == np.float32
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(many, (imgs.reshape(len(imgs), -1) / 255.0).astype(np.float32))
    # the first bad row in row order is the one named, however the threads ran
    bad = list(blobs)
    bad[_PARALLEL_FROM + 40] = b"not an image"
    bad[_PARALLEL_FROM + 10] = _png(np.zeros((4, 4), np.uint8))
    for threads in (1, 4):
        with pytest.raises(InputError, match=rf"row {_PARALLEL_FROM + 10}: image of shape 1,4,4") as e:
            _decode_images(bad, "f.parquet", threads=threads)
        assert "\n" not in str(e.value)

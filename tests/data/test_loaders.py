"""Loaders for user Parquet, MNIST idx and CIFAR-10 batches, on tiny files written here."""

import gzip
import pickle
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ddm_ray.config import DataConfig
from ddm_ray.data import load_dataset
from ddm_ray.errors import InputError
from tests.conftest import blobs, write_parquet


def test_parquet_roundtrip_with_ids_and_shape(tiny_parquet):
    tr, te = tiny_parquet
    ds = load_dataset(DataConfig(dataset="parquet", train=tr, test=te, input_shape=(1, 4, 4)))
    assert ds.x_train.shape == (120, 1, 4, 4)
    assert ds.train_ids[0] == 1000 and ds.test_ids[-1] == 29
    assert ds.classes == [0, 1, 2]


def test_labels_are_mapped_to_class_indices(tmp_path):
    x, y = blobs(30, classes=3)
    tr = write_parquet(str(tmp_path / "a.parquet"), x, y * 10 + 5)
    ds = load_dataset(DataConfig(dataset="parquet", train=tr, test=tr))
    assert ds.classes == [5, 15, 25]
    assert set(ds.y_train.tolist()) == {0, 1, 2}


def _bad(tmp_path, table: pa.Table) -> str:
    p = str(tmp_path / "bad.parquet")
    pq.write_table(table, p)
    return p


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p, tr: str(p / "missing.parquet"), "no such file"),
        (lambda p, tr: _write_text(p / "junk.parquet"), "cannot read as Parquet"),
        (lambda p, tr: _bad(p, pa.table({"x": [[1.0]], "label": [1]})), "missing column 'y'"),
        (lambda p, tr: _bad(p, pa.table({"x": [1.0, 2.0], "y": [0, 1]})), "list of numbers or encoded images"),
        (lambda p, tr: _bad(p, pa.table({"x": [[1.0] * 16, [float("nan")] * 16], "y": [0, 1]})), "NaN"),
        (lambda p, tr: _bad(p, pa.table({"x": [[1.0] * 16, [float("inf")] * 16], "y": [0, 1]})), "NaN or infinite"),
        (lambda p, tr: _bad(p, pa.table({"x": [[1.0] * 16, [1.0] * 15], "y": [0, 1]})), "different lengths"),
        (lambda p, tr: _bad(p, pa.table({"x": [[1.0] * 16], "y": [99]})), "not among the training classes"),
        (lambda p, tr: _bad(p, pa.table({"x": [[1.0] * 16], "y": ["a"]})), "both be strings or both integers"),
        (lambda p, tr: _bad(p, pa.table({"x": [[1.0] * 16], "y": [0.5]})), "integers or strings"),
    ],
)
def test_bad_test_files_are_rejected(tmp_path, tiny_parquet, make, match):
    tr, _ = tiny_parquet
    bad = make(tmp_path, tr)
    with pytest.raises(InputError, match=match):
        load_dataset(DataConfig(dataset="parquet", train=tr, test=bad))


def _write_text(path) -> str:
    path.write_text("this is not parquet")
    return str(path)


def test_shape_mismatch_is_rejected(tiny_parquet):
    tr, te = tiny_parquet
    with pytest.raises(InputError, match="needs 27"):
        load_dataset(DataConfig(dataset="parquet", train=tr, test=te, input_shape=(3, 3, 3)))


def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def test_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 6)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labs = (np.arange(n) % 3).astype(np.uint8)
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(imgs)))
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labs))
    ds = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (6, 1, 28, 28)
    assert float(ds.x_train.max()) <= 1.0
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(InputError, match="idx body"):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 1]}
        (folder / name).write_bytes(pickle.dumps(batch))
    ds = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    (folder / "test_batch").write_bytes(b"damaged")
    with pytest.raises(InputError, match="not a CIFAR-10 python batch"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_missing_mnist_folder():
    with pytest.raises(InputError, match="no such file"):
        load_dataset(DataConfig(dataset="mnist", root="/nonexistent/mnist"))


def test_corrupt_gzip_is_a_one_line_input_error(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(InputError, match="cannot read"):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path)))


class _RunsCode:
    """A crafted pickle: unpickling it calls os.system (the full unpickler would run it)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_cifar10_pickle_that_runs_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 1]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _RunsCode(str(marker)), b"labels": [0]}))
    with pytest.raises(InputError, match="refused to load a pickle that calls .*system"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))
    assert not marker.exists(), "the crafted pickle ran code"

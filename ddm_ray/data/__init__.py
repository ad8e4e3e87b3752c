"""Datasets in: built-in digits, user Parquet (any fsspec URL), MNIST idx and CIFAR-10 batches.

Every loader returns a validated `Dataset`: float32 inputs of one declared shape, labels mapped
to class indices 0..C-1 of the training classes, and stable int64 ids for both splits.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ddm_ray.config import DataConfig
from ddm_ray.data.parquet import encode_labels, read_split
from ddm_ray.errors import InputError


def unit_float32(a: np.ndarray, scale: float, chunk: int = 1 << 22) -> np.ndarray:
    """a / scale as float32, computed in float64 chunk by chunk (the values of a float64 division
    cast to float32, without a float64 copy of the whole array)."""
    out = np.empty(a.shape, dtype=np.float32)
    src, dst = a.reshape(-1), out.reshape(-1)
    for i in range(0, src.size, chunk):
        dst[i : i + chunk] = src[i : i + chunk] / scale
    return out


@dataclass
class Dataset:
    """x_*: (N, *input_shape) float32; y_*: (N,) int64 class index; *_ids: (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    train_ids: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_ids: torch.Tensor
    classes: list[int]  # label of each class index as in the data (its index for string labels)
    input_shape: tuple[int, ...]
    class_names: list[str] | None = None  # the data's label names (string labels), in class order
    train_groups: list[Any] | None = None  # (N_train,) value of the units column of each sample
    label_order: str = "integer"  # how classes were ordered: a key of data.parquet.LABEL_ORDERS

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def name_of(self, class_index: int) -> str:
        """The label of a class index as the data wrote it."""
        if self.class_names is not None:
            return self.class_names[class_index]
        return str(self.classes[class_index])


def _finish(
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    id_tr: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
    id_te: np.ndarray,
    shape: tuple[int, ...],
    cfg: DataConfig,
    source: str,
    groups: np.ndarray | None = None,
    class_label: list[str] | None = None,
) -> Dataset:
    """Check both splits and map labels to class indices. x_*: (N, F); y_*: (N,) int64 or str;
    class_label: the data's ClassLabel names, if it stores any (see `encode_labels`)."""
    if cfg.max_train is not None:
        x_tr, y_tr, id_tr = x_tr[: cfg.max_train], y_tr[: cfg.max_train], id_tr[: cfg.max_train]
        groups = None if groups is None else groups[: cfg.max_train]
    if cfg.max_test is not None:
        x_te, y_te, id_te = x_te[: cfg.max_test], y_te[: cfg.max_test], id_te[: cfg.max_test]
    for name, x in (("train", x_tr), ("test", x_te)):
        if x.shape[0] == 0:
            raise InputError(f"{source}: the {name} set is empty")
        if not np.isfinite(x).all():
            raise InputError(f"{source}: the {name} set has NaN or infinite values in x")
    flat = math.prod(shape)
    if x_tr.shape[1] != flat or x_te.shape[1] != flat:
        raise InputError(
            f"{source}: samples have {x_tr.shape[1]} (train) / {x_te.shape[1]} (test) values, "
            f"but the input shape {','.join(map(str, shape))} needs {flat}"
        )
    for name, ids in (("train", id_tr), ("test", id_te)):
        if len(np.unique(ids)) != len(ids):
            raise InputError(f"{source}: the {name} set has duplicate ids")
    y_tr_idx, y_te_idx, classes, names, order = encode_labels(y_tr, y_te, source, class_label)
    if len(classes) < 2:
        raise InputError(f"{source}: the training set has {len(classes)} class; need at least 2")
    return Dataset(
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr, dtype=np.float32)).reshape(-1, *shape),
        y_train=torch.from_numpy(y_tr_idx),
        train_ids=torch.from_numpy(id_tr.astype(np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te, dtype=np.float32)).reshape(-1, *shape),
        y_test=torch.from_numpy(y_te_idx),
        test_ids=torch.from_numpy(id_te.astype(np.int64)),
        classes=classes,
        input_shape=shape,
        class_names=names,
        train_groups=None if groups is None else groups.tolist(),
        label_order=order,
    )


def _digits(cfg: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = unit_float32(d.data, 16.0)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    tr, te = perm[:1200], perm[1200:]
    shape = cfg.input_shape or (64,)
    return _finish(x[tr], y[tr], tr, x[te], y[te], te, shape, cfg, "digits")


def _parquet(cfg: DataConfig, storage_options: dict[str, str], group_column: str | None = None) -> Dataset:
    assert cfg.train and cfg.test
    cols = (cfg.x_column, cfg.y_column, cfg.id_column)
    named_id = cfg.id_column != "id"  # a default id column may be absent (row numbers then)
    tr = read_split(cfg.train, storage_options, *cols, group_column=group_column, max_rows=cfg.max_train,
                    id_required=named_id)
    te = read_split(cfg.test, storage_options, *cols, max_rows=cfg.max_test, id_required=named_id)
    if tr.shape != te.shape:
        raise InputError(
            f"parquet: train samples have shape {','.join(map(str, tr.shape))}, test samples "
            f"{','.join(map(str, te.shape))}"
        )
    if tr.label_names is not None and te.label_names is not None and tr.label_names != te.label_names:
        raise InputError(f"parquet: the train and test files name the classes of {cfg.y_column!r} differently "
                         f"(Hugging Face ClassLabel: {', '.join(tr.label_names[:5])} ... vs "
                         f"{', '.join(te.label_names[:5])} ...)")
    shape = cfg.input_shape or tr.shape
    return _finish(tr.x, tr.y, tr.ids, te.x, te.y, te.ids, shape, cfg, "parquet", groups=tr.groups,
                   class_label=tr.label_names or te.label_names)


def _open_maybe_gz(root: str, name: str) -> bytes:
    for candidate in (name, name + ".gz"):
        path = os.path.join(root, candidate)
        if os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    raw = f.read()
                return gzip.decompress(raw) if candidate.endswith(".gz") else raw
            except (OSError, EOFError, zlib.error) as e:
                raise InputError(f"{path}: cannot read ({e})") from None
    raise InputError(f"{os.path.join(root, name)}: no such file (also tried .gz)")


def _idx(raw: bytes, name: str) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{name}: not an unsigned-byte idx file")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise InputError(f"{name}: truncated idx header")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise InputError(f"{name}: idx body has {body.size} bytes, header says {math.prod(dims)}")
    return body.reshape(dims)


def _mnist(cfg: DataConfig) -> Dataset:
    root = cfg.root or ""
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_name, lab_name = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
        imgs = _idx(_open_maybe_gz(root, img_name), img_name)
        labs = _idx(_open_maybe_gz(root, lab_name), lab_name)
        if imgs.ndim != 3 or labs.ndim != 1 or len(imgs) != len(labs):
            raise InputError(f"{root}: MNIST {split} images and labels do not match")
        h, w = imgs.shape[1:]  # the test images' size is the one used (the last split read)
        keep = cfg.max_train if split == "train" else cfg.max_test  # scale only the rows kept
        imgs, labs = imgs[:keep], labs[:keep]
        parts[split] = (unit_float32(imgs.reshape(len(imgs), -1), 255.0), labs.astype(np.int64))
    (x_tr, y_tr), (x_te, y_te) = parts["train"], parts["test"]
    shape = cfg.input_shape or (1, h, w)
    return _finish(
        x_tr, y_tr, np.arange(len(x_tr)), x_te, y_te, np.arange(len(x_te)), shape, cfg, "mnist"
    )


# what a CIFAR-10 python batch needs to rebuild its numpy arrays; nothing else is ever called
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _RefusedPickle(Exception):
    pass


class _DataOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, tuples, bytes, str, numbers and numpy arrays; refuses any other
    callable a crafted file names (the full unpickler would run it)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise _RefusedPickle(f"{module}.{name}")


def load_data_pickle(f: object) -> object:
    """Unpickle data-only content (see `_DataOnlyUnpickler`); raises InputError on anything else."""
    try:
        return _DataOnlyUnpickler(f, encoding="bytes").load()  # type: ignore[arg-type]
    except _RefusedPickle as e:
        raise InputError(f"refused to load a pickle that calls {e} (only plain data is allowed)") from None


def _cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = load_data_pickle(f)
        data = np.asarray(d[b"data"], dtype=np.uint8)  # type: ignore[index]
        labels = np.asarray(d[b"labels"], dtype=np.int64)  # type: ignore[index]
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise InputError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise InputError(f"{path}: CIFAR-10 batch with unexpected shape {data.shape}")
    return data, labels


def _cifar10(cfg: DataConfig) -> Dataset:
    root = cfg.root or ""
    sub = os.path.join(root, "cifar-10-batches-py")
    if os.path.isdir(sub):
        root = sub
    train = [_cifar_batch(os.path.join(root, f"data_batch_{i}")) for i in range(1, 6)]
    x_te, y_te = _cifar_batch(os.path.join(root, "test_batch"))
    x_tr = unit_float32(np.concatenate([b[0] for b in train])[: cfg.max_train], 255.0)
    y_tr = np.concatenate([b[1] for b in train])[: cfg.max_train]
    x_te, y_te = x_te[: cfg.max_test], y_te[: cfg.max_test]
    shape = cfg.input_shape or (3, 32, 32)
    return _finish(
        x_tr, y_tr, np.arange(len(x_tr)), unit_float32(x_te, 255.0), y_te, np.arange(len(x_te)), shape, cfg,
        "cifar10",
    )


def load_dataset(
    cfg: DataConfig, storage_options: dict[str, str] | None = None, group_column: str | None = None
) -> Dataset:
    """Load and validate the dataset named by cfg; raises InputError with a one-line reason.
    group_column: a training column whose values become units (Parquet input only)."""
    if group_column and cfg.dataset != "parquet":
        raise InputError(f"--units-from {group_column} reads a column of the training Parquet; dataset is {cfg.dataset}")
    if cfg.dataset == "digits":
        return _digits(cfg)
    if cfg.dataset == "parquet":
        return _parquet(cfg, storage_options or {}, group_column)
    if cfg.dataset == "mnist":
        return _mnist(cfg)
    return _cifar10(cfg)


def data_fingerprint(ds: Dataset) -> str:
    """sha256 (16 hex) of the loaded inputs, labels and ids of both splits."""
    h = hashlib.sha256()
    for t in (ds.x_train, ds.y_train, ds.train_ids, ds.x_test, ds.y_test, ds.test_ids):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    h.update(repr(ds.classes).encode())
    return h.hexdigest()[:16]

"""User Parquet in: numbers, nested lists or encoded images as inputs; integer or string labels.

Columns are named by `DataConfig` (`x_column`, `y_column`, `id_column`, and the units column of
`UnitConfig.from_column`). An input cell may be
* a list of numbers (list, large_list or fixed_size_list; nested lists of one shape are kept as
  that shape, e.g. list<list<float>> rows of 28 x 28 -> (28, 28)),
* PNG/JPEG bytes (binary), or
* the struct {bytes, path} that Hugging Face `datasets` writes for an Image feature (bytes first;
  a relative path is taken beside the Parquet file).
Images are decoded with Pillow: grayscale kinds to (1, H, W), everything else to RGB (3, H, W),
values scaled to [0, 1]; the first image fixes the shape and every other must match it.
"""

from __future__ import annotations

import io
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ddm_ray.errors import DDMError, InputError, brief


@dataclass
class Columns:
    """One split as arrays: x (N, F) float32, shape of one sample, y (N,) raw labels (int64 or
    str objects), ids (N,) int64, groups (N,) raw values of the units column or None;
    label_names: the class names a Hugging Face `ClassLabel` stores for the label column in the
    file's schema metadata (index i names label i), or None."""

    x: np.ndarray
    shape: tuple[int, ...]
    y: np.ndarray
    ids: np.ndarray
    groups: np.ndarray | None
    label_names: list[str] | None = None


#: How string labels were put in class order (recorded in the manifest's `data.label_order`).
LABEL_ORDERS = {
    "class_label": "the order of the Hugging Face ClassLabel names in the Parquet schema metadata",
    "numeric": "numeric order of the label names (every name is a number)",
    "alphabetical": "alphabetical order of the label names (no ClassLabel names in the Parquet metadata)",
    "integer": "ascending integer labels",
}


def class_label_names(metadata: dict[bytes, bytes] | None, column: str) -> list[str] | None:
    """The `names` of a Hugging Face `ClassLabel` feature for `column` in Parquet schema
    metadata (key `huggingface`: JSON with info.features.<column>.names), or None when there is
    none or it is not a list of distinct strings."""
    import json

    raw = (metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        feature = doc.get("info", {}).get("features", {}).get(column)
    except (ValueError, AttributeError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return None
    return names if len(set(names)) == len(names) else None


_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


DECODE_THREADS = min(8, os.cpu_count() or 1)  # Pillow's decoders release the GIL
_PARALLEL_FROM = 256  # images: fewer are decoded in the calling thread


def _decode_one(blob: bytes, gray: bool | None, url: str, row: int) -> tuple[np.ndarray, bool]:
    """One encoded image -> ((C, H, W) float64 in [0, 1], gray); gray None: decide from this
    image (a grayscale mode: one channel; anything else: RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as im:
            if gray is None:
                gray = im.mode in _GRAY_MODES
            if gray and im.mode.startswith("I"):  # 16/32-bit grayscale
                return np.asarray(im, dtype=np.float64)[None] / 65535.0, gray
            if gray and im.mode == "F":  # float images are taken as they are
                return np.asarray(im, dtype=np.float64)[None], gray
            if gray:
                return np.asarray(im.convert("L"), dtype=np.float64)[None] / 255.0, gray
            return np.asarray(im.convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255.0, gray
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{url}: row {row}: not a decodable image ({brief(e)})") from None


def _decode_images(blobs: list[bytes], url: str, first_row: int = 0,
                   threads: int | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
    """Encoded images -> (N, C*H*W) float32 in [0, 1] and the shape (C, H, W) of the first one,
    which also decides grayscale or RGB for all. Decoded on `threads` threads (default
    `DECODE_THREADS`; from `_PARALLEL_FROM` images on), each image computed in float64 and
    stored as float32 (the values a float64 decode then a float32 cast give). The first bad
    image in row order is the one reported."""
    assert blobs, "no images to decode"
    first, gray = _decode_one(blobs[0], None, url, first_row)
    shape = tuple(int(d) for d in first.shape)
    out = np.empty((len(blobs), first.size), dtype=np.float32)
    out[0] = first.reshape(-1)

    def decode(i: int) -> None:
        arr, _ = _decode_one(blobs[i], gray, url, first_row + i)
        if tuple(arr.shape) != shape:
            raise InputError(
                f"{url}: row {first_row + i}: image of shape {','.join(map(str, arr.shape))}, but the first is "
                f"{','.join(map(str, shape))}; resize the images to one size"
            )
        out[i] = arr.reshape(-1)

    workers = DECODE_THREADS if threads is None else threads
    if workers <= 1 or len(blobs) < _PARALLEL_FROM:
        for i in range(1, len(blobs)):
            decode(i)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(decode, range(1, len(blobs)), chunksize=64):  # in row order: the first error
                pass
    return out, shape


def _image_bytes(col: pa.Array, url: str, storage_options: dict[str, str]) -> list[bytes]:
    """Bytes of every image cell: binary cells, or {bytes, path} structs."""
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        return col.to_pylist()
    names = [col.type.field(i).name for i in range(col.type.num_fields)]
    data = col.field("bytes").to_pylist() if "bytes" in names else [None] * len(col)
    paths = col.field("path").to_pylist() if "path" in names else [None] * len(col)
    out: list[bytes] = []
    for i, (b, p) in enumerate(zip(data, paths, strict=True)):
        if b is not None:
            out.append(b)
            continue
        if not p:
            raise InputError(f"{url}: row {i}: image with neither bytes nor path")
        from ddm_ray.store.fs import open_url

        target = p if "://" in p or p.startswith("/") else posixpath.join(posixpath.dirname(url), p)
        try:
            fs, path = open_url(target, storage_options)
            with fs.open(path, "rb") as f:
                out.append(f.read())
        except FileNotFoundError:
            raise InputError(f"{url}: row {i}: image file {p} not found") from None
        except Exception as e:  # noqa: BLE001  storage back-ends raise far beyond OSError
            raise InputError(f"{url}: row {i}: cannot read image {p} ({brief(e)})") from None
    return out


def _fits_int64(col: pa.Array | pa.ChunkedArray, url: str, name: str) -> None:
    if pa.types.is_uint64(col.type) and len(col) and pc.max(col).as_py() > np.iinfo(np.int64).max:
        raise InputError(f"{url}: column {name!r} has values above the int64 range")


def _is_image_type(t: pa.DataType, url: str = "", name: str = "") -> bool:
    """Binary cells, or a {bytes: binary, path: string} struct (Hugging Face Image)."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    if pa.types.is_struct(t):
        fields = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
        ok = ("bytes" in fields or "path" in fields) and all(
            (k != "bytes" or pa.types.is_binary(v) or pa.types.is_large_binary(v))
            and (k != "path" or pa.types.is_string(v) or pa.types.is_large_string(v))
            for k, v in fields.items()
        )
        if not ok:
            raise InputError(f"{url}: column {name!r} is a struct {t}; images need {{bytes: binary, path: string}}")
        return True
    return False


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _numeric_lists(col: pa.Array, url: str, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """list<number> or nested lists of one shape -> (N, F) float32 and the per-sample shape
    (integers are converted through float64, chunk by chunk: the values a float64 array cast to
    float32 has)."""
    n = len(col)
    shape: list[int] = []
    level: pa.Array = col
    while _is_list(level.type):
        lengths = np.asarray(pc.list_value_length(level))
        if level.null_count:
            raise InputError(f"{url}: null values in {name!r}")
        if len(lengths) == 0 or (lengths != lengths[0]).any():
            lo, hi = (int(lengths.min()), int(lengths.max())) if len(lengths) else (0, 0)
            raise InputError(f"{url}: rows of {name!r} have different lengths ({lo}..{hi})")
        if lengths[0] == 0:
            raise InputError(f"{url}: rows of {name!r} are empty")
        shape.append(int(lengths[0]))
        level = level.flatten()
    if not (pa.types.is_integer(level.type) or pa.types.is_floating(level.type)):
        raise InputError(f"{url}: column {name!r} must hold numbers or images, got {col.type}")
    if level.null_count:
        raise InputError(f"{url}: null values in {name!r}")
    if pa.types.is_floating(level.type):
        x = np.array(level.cast(pa.float32()), dtype=np.float32).reshape(n, -1)  # a writable copy
    else:
        x = np.empty(len(level), dtype=np.float32)
        step = 1 << 20
        for i in range(0, len(level), step):
            x[i : i + step] = np.asarray(level.slice(i, step), dtype=np.float64)
        x = x.reshape(n, -1)
    return x, tuple(shape)


def read_split(
    url: str, storage_options: dict[str, str], x_column: str, y_column: str, id_column: str,
    group_column: str | None = None, max_rows: int | None = None, id_required: bool = False,
) -> Columns:
    """Read one Parquet split (its first max_rows rows when given, sliced before any image is
    decoded); raises InputError with a one-line reason for anything unusable. id_required: the
    id column was named by the user, so its absence is an error, not the row number."""
    from ddm_ray.store.fs import open_url, parquet_schema, read_parquet_part, redact

    raw, url = url, redact(url)  # messages never echo a presigned signature
    try:
        fs, path = open_url(raw, storage_options)
        schema, num_rows = parquet_schema(fs, path)
    except FileNotFoundError:
        raise InputError(f"{url}: no such file") from None
    except DDMError:
        raise
    except Exception as e:  # noqa: BLE001  storage back-ends raise far beyond OSError
        raise InputError(f"{url}: cannot read as Parquet ({brief(e)})") from None
    names = schema.names
    label_names = class_label_names(schema.metadata, y_column)
    wanted = [x_column, y_column] + ([group_column] if group_column else [])
    for col in wanted:
        if col not in names:
            raise InputError(f"{url}: missing column {col!r} (has {', '.join(names) or 'none'})")
    if num_rows == 0:
        raise InputError(f"{url}: no rows")
    if id_required and id_column not in names:
        raise InputError(f"{url}: missing id column {id_column!r} (has {', '.join(names)})")
    columns = list(dict.fromkeys([*wanted, *([id_column] if id_column in names else [])]))
    try:  # only these columns, and only the rows asked for: the rest of the file is never read
        table = read_parquet_part(fs, path, columns, max_rows)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{url}: cannot read as Parquet ({brief(e)})") from None
    xcol = table.column(x_column).combine_chunks()
    if xcol.null_count:
        raise InputError(f"{url}: null values in {x_column!r}")
    if _is_image_type(xcol.type, url, x_column):
        x, shape = _decode_images(_image_bytes(xcol, raw, storage_options), url)
    elif _is_list(xcol.type):
        x, shape = _numeric_lists(xcol, url, x_column)
    else:
        raise InputError(
            f"{url}: column {x_column!r} must be a list of numbers or encoded images, got {xcol.type}"
        )
    y = _labels(table.column(y_column).combine_chunks(), url, y_column)
    if id_column in names:
        ids_col = table.column(id_column)
        if not pa.types.is_integer(ids_col.type) or ids_col.null_count:
            raise InputError(f"{url}: column {id_column!r} must be non-null integers, got {ids_col.type}")
        _fits_int64(ids_col, url, id_column)
        ids = np.asarray(ids_col, dtype=np.int64)
    else:
        ids = np.arange(table.num_rows, dtype=np.int64)
    groups = None
    if group_column:
        g = table.column(group_column).combine_chunks()
        if g.null_count:
            raise InputError(f"{url}: null values in the units column {group_column!r}")
        if pa.types.is_dictionary(g.type):
            g = g.cast(g.type.value_type)
        if not (pa.types.is_integer(g.type) or pa.types.is_string(g.type) or pa.types.is_large_string(g.type)
                or pa.types.is_boolean(g.type)):
            raise InputError(f"{url}: units column {group_column!r} must be strings or integers, got {g.type}")
        groups = np.asarray(g.to_pylist(), dtype=object)
    return Columns(x, shape, y, ids, groups, label_names)


def _labels(col: pa.Array, url: str, name: str) -> np.ndarray:
    """Integer labels as int64; string (or dictionary-encoded string) labels as str objects."""
    if col.null_count:
        raise InputError(f"{url}: null values in the label column {name!r}")
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_integer(col.type):
        _fits_int64(col, url, name)
        return np.asarray(col, dtype=np.int64)
    if pa.types.is_boolean(col.type):
        return np.asarray(col, dtype=np.int64)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return np.asarray(col.to_pylist(), dtype=object)
    raise InputError(f"{url}: label column {name!r} must be integers or strings, got {col.type}")


def _number(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if np.isfinite(v) else None


def encode_labels(
    y_train: np.ndarray, y_test: np.ndarray, source: str, class_label: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[Any], list[str] | None, str]:
    """Map labels to class indices 0..C-1 of the training labels' classes.

    Class order (returned as `order`, one of `LABEL_ORDERS`): for string labels, the order of
    `class_label` (the Hugging Face ClassLabel names of the file) when every training label is
    among them, else numeric when every name parses as a number, else alphabetical; integer
    labels ascend ("integer"), named by `class_label` when it covers them (ClassLabel columns
    are stored as the names' indices).

    Returns (y_train_index, y_test_index, classes, class_names, order): classes are the integer
    labels (or the indices, for string labels), class_names the labels' names (None for integer
    labels without ClassLabel names).
    """
    strings = y_train.dtype == object or y_test.dtype == object
    if strings:
        if y_train.dtype != object or y_test.dtype != object:
            raise InputError(f"{source}: train and test labels must both be strings or both integers")
        present = set(y_train.tolist())
        if class_label is not None and present <= set(class_label):
            names, order = [n for n in class_label if n in present], "class_label"
        elif all(_number(n) is not None for n in present):
            names, order = sorted(present, key=lambda n: (_number(n), n)), "numeric"
        else:
            names, order = sorted(present), "alphabetical"
        lookup = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(y_test.tolist()) - set(names))
        if unknown:
            raise InputError(f"{source}: test labels not among the training classes: {', '.join(map(str, unknown[:5]))}")
        tr = np.fromiter((lookup[v] for v in y_train.tolist()), dtype=np.int64, count=len(y_train))
        te = np.fromiter((lookup[v] for v in y_test.tolist()), dtype=np.int64, count=len(y_test))
        return tr, te, list(range(len(names))), names, order
    classes = np.unique(y_train)
    unknown = np.setdiff1d(np.unique(y_test), classes)
    if len(unknown):
        shown = ", ".join(map(str, unknown[:5].tolist()))
        raise InputError(f"{source}: test labels not among the training classes: {shown}")
    named = class_label is not None and len(classes) > 0 and bool(classes.min() >= 0) and bool(classes.max() < len(class_label))
    return (np.searchsorted(classes, y_train).astype(np.int64), np.searchsorted(classes, y_test).astype(np.int64),
            [int(c) for c in classes], [class_label[int(c)] for c in classes] if named else None,
            "class_label" if named else "integer")

"""Auditing from Python: `ddm_ray.audit(train, test, model=..., out=..., **options) -> AuditRun`.

    import ddm_ray
    run = ddm_ray.audit("train.parquet", "test.parquet", model="mymodels:build", out="./audit",
                        x_column="pixels", y_column="label", units_from="source", epochs=20)
    unit_ids, test_ids, delta = run.matrix("loss")

train / test: a Parquet path or fsspec URL, or in-memory data: a tuple (x, y) or (x, y, ids), or a
dict with keys "x", "y" and optionally "id" and more columns (for `units_from`), of numpy arrays
or torch tensors (x of shape (N, *input_shape); y integers or strings). In-memory data are written
once to Parquet in a content-addressed cache ($DDM_RAY_CACHE, default ~/.cache/ddm-ray/inputs),
so the same arrays give the same run config and a rerun resumes.
model: "mlp", "convnet", "package.module:factory", or the factory itself when it is importable
by name (defined at module level in an importable module, not in __main__).
options: the options of `ddm-ray run` by their Python names (`epochs=5`, `clusters_per_class=4`,
`units_from="source"`, `engine="local"`, `resume=True`, ...; `ddm_ray.audit_options()` lists them).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ddm_ray.api import AuditRun, open_run
from ddm_ray.errors import ConfigError, InputError


def audit_options() -> dict[str, str]:
    """Every option `audit` takes, with its help text."""
    from ddm_ray.cli.options import options

    return {o.dest: o.help for o in options()}


def _model_ref(model: str | Callable[..., Any]) -> str:
    if isinstance(model, str):
        return model
    module, name = getattr(model, "__module__", None), getattr(model, "__qualname__", "")
    if not module or module == "__main__" or "<" in name:
        raise ConfigError(
            "model: pass a factory defined at module level of an importable module (Ray workers import it "
            f"by name), or its 'package.module:factory' name; got {name or model!r} from {module}"
        )
    return f"{module}:{name}"


def _numpy(v: Any, what: str) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    arr = np.asarray(v)
    if arr.dtype.kind in "US":
        arr = arr.astype(str).astype(object)
    if arr.ndim == 0:
        raise InputError(f"{what}: expected an array, got a scalar")
    return arr


def _columns(data: Any, split: str) -> dict[str, np.ndarray]:
    if isinstance(data, Mapping):
        cols = {str(k): _numpy(v, f"{split}[{k!r}]") for k, v in data.items()}
        if "x" not in cols or "y" not in cols:
            raise InputError(f"{split}: a dict of arrays needs keys 'x' and 'y' (has {', '.join(cols)})")
    elif isinstance(data, (tuple, list)) and len(data) in (2, 3):
        names = ("x", "y", "id")[: len(data)]
        cols = {n: _numpy(v, f"{split} {n}") for n, v in zip(names, data, strict=True)}
    else:
        raise InputError(f"{split}: expected a Parquet path/URL, (x, y), (x, y, ids) or a dict of arrays")
    n = len(cols["x"])
    bad = [k for k, v in cols.items() if len(v) != n]
    if bad:
        raise InputError(f"{split}: columns {', '.join(bad)} do not have the {n} rows of x")
    if n == 0:
        raise InputError(f"{split}: no rows")
    return cols


def _write_arrays(cols: dict[str, np.ndarray], split: str) -> tuple[str, tuple[int, ...]]:
    """Write in-memory columns as Parquet in the content-addressed cache; returns (path, sample shape)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = cols["x"]
    if x.dtype.kind not in "biuf":
        raise InputError(f"{split}: x must be numbers, got {x.dtype}")
    shape = tuple(int(d) for d in x.shape[1:]) or (1,)
    flat = np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)
    arrays: dict[str, pa.Array] = {
        "x": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1]),
    }
    for k, v in cols.items():
        if k == "x":
            continue
        if v.ndim != 1:
            raise InputError(f"{split}: column {k!r} must be one value per sample, got shape {v.shape}")
        arrays[k] = pa.array(v.tolist() if v.dtype == object else v)
    table = pa.table(arrays)
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(str(arrays[k].type).encode())
        h.update(np.ascontiguousarray(flat).tobytes() if k == "x" else repr(arrays[k].to_pylist()).encode())
    root = Path(os.environ.get("DDM_RAY_CACHE") or Path.home() / ".cache" / "ddm-ray") / "inputs"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{h.hexdigest()[:20]}-{split}.parquet"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    return str(path), shape


def audit(
    train: Any,
    test: Any,
    *,
    model: str | Callable[..., Any] = "mlp",
    out: str = "./ddm-out",
    address: str | None = None,
    storage_options: dict[str, str] | None = None,
    progress: bool = True,
    **options: Any,
) -> AuditRun:
    """Run a whole audit (offline + online) and open its result; see the module docstring."""
    from ddm_ray.cli.options import build_configs, coerce
    from ddm_ray.cli.options import options as all_options
    from ddm_ray.engine import run_with_engine
    from ddm_ray.engine.runtime import choose_ray_auth

    given = dict(options)
    for split, data in (("train", train), ("test", test)):
        if isinstance(data, (str, os.PathLike)):
            given[split] = os.fspath(data)
            continue
        path, shape = _write_arrays(_columns(data, split), split)
        given[split] = path
        if len(shape) > 1:
            given.setdefault("input_shape", shape)
        for key, name in (("x_column", "x"), ("y_column", "y"), ("id_column", "id")):
            if given.get(key, name) != name:
                raise ConfigError(f"{key}={given[key]!r} does not apply to in-memory {split} data (its columns are x, y, id)")
    given["model"] = _model_ref(model)
    opts = {o.dest: o for o in all_options()}
    unknown = sorted(set(given) - set(opts))
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; ddm_ray.audit_options() lists them")
    given = {k: coerce(opts[k], v, k) for k, v in given.items()}
    choose_ray_auth(address)  # before anything imports Ray: a runtime started here gets token auth
    cfg, exe = build_configs(given, storage_options=storage_options or {})
    run_with_engine(cfg, exe, out, address=address, progress=progress)
    return open_run(out, storage_options)

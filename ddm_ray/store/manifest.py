"""The manifest as readers take it: checked against a small schema before anything uses it.

A manifest is data anyone with write access to the folder can rewrite. `check_manifest` turns
every deviation into one line (RunStateError naming the key) instead of a KeyError or TypeError
deep inside a reader: the top-level types, the config (every value type-checked and validated by
`RunConfig.from_dict`), and the part records, whose names must be plain attribution part names
(`part-<first>-<last>.parquet`: no path separators, no `..`), so nothing is read outside
`attribution/` and `checksums/`.
"""

from __future__ import annotations

import re
from typing import Any

from ddm_ray.errors import ConfigError, RunStateError

PART_NAME = re.compile(r"^part-(\d{1,18})-(\d{1,18})\.parquet$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# key: (types allowed, required). Keys not listed are kept but not read by any reader.
_TOP: dict[str, tuple[tuple[type, ...], bool]] = {
    "status": ((str,), True),
    "config": ((dict,), True),
    "config_hash": ((str,), True),
    "format": ((int,), False),
    "data_fingerprint": ((str, type(None)), False),
    "model_fingerprint": ((str, type(None)), False),
    "data": ((dict,), False),
    "versions": ((dict,), False),
    "timings_seconds": ((dict,), False),
    "counts": ((dict,), False),
    "parts": ((dict,), False),
    "distillation": ((dict,), False),
    "stability": ((dict, type(None)), False),
    "execution": ((dict,), False),
}
_NAMES = {str: "a string", dict: "a table", int: "an integer", type(None): "null", list: "a list"}


def _kind(types: tuple[type, ...]) -> str:
    return " or ".join(_NAMES.get(t, t.__name__) for t in types)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_status(m: Any, where: str) -> None:
    """What a reader needs before it looks at the status: a table with a string status."""
    if not isinstance(m, dict):
        raise RunStateError(f"{where}: expected a table (a JSON object), got {type(m).__name__}")
    if not isinstance(m.get("status"), str):
        raise RunStateError(f"{where}: status: expected a string, got {m.get('status')!r}")


def check_manifest(m: Any, where: str) -> dict[str, Any]:
    """m itself once it fits the schema; RunStateError with one line (naming the key) otherwise.
    where: what the message names (the manifest's URL)."""
    check_status(m, where)
    for key, (types, required) in _TOP.items():
        if key not in m:
            if required:
                raise RunStateError(f"{where}: no {key!r} (not a manifest ddm-ray wrote, or damaged)")
            continue
        v = m[key]
        if not isinstance(v, types) or isinstance(v, bool):
            raise RunStateError(f"{where}: {key}: expected {_kind(types)}, got {type(v).__name__}")
    from ddm_ray.config import RunConfig

    try:
        RunConfig.from_dict(m["config"])
    except ConfigError as e:
        raise RunStateError(f"{where}: {e}") from None
    for key, ok, want in (("counts", _integer, "an integer"), ("timings_seconds", _number, "a number")):
        for name, v in (m.get(key) or {}).items():
            if not ok(v):
                raise RunStateError(f"{where}: {key}.{name}: expected {want}, got {type(v).__name__}")
    for name, rec in (m.get("parts") or {}).items():
        check_part(name, rec, where)
    for name, ok, want in _STABILITY:
        st = m.get("stability") or {}
        if name in st and not ok(st[name]):
            raise RunStateError(f"{where}: stability.{name}: expected {want}, got {type(st[name]).__name__}")
    return m


_STABILITY = (
    ("epochs", lambda v: isinstance(v, list) and all(_integer(x) for x in v), "a list of integers"),
    ("top_eigenvalue", lambda v: isinstance(v, list) and all(_number(x) for x in v), "a list of numbers"),
    ("limit", _number, "a number"),
    ("unstable", lambda v: isinstance(v, bool), "true or false"),
    ("warning", lambda v: isinstance(v, str), "a string"),
    ("limit_rule", lambda v: isinstance(v, str), "a string"),
)


def check_part(name: Any, rec: Any, where: str) -> tuple[int, int]:
    """(first, last) unit of a part record that fits: a plain part name and {rows, sha256, bytes}."""
    match = PART_NAME.match(name) if isinstance(name, str) else None
    if match is None:
        raise RunStateError(f"{where}: parts: {name!r} is not an attribution part name (part-<first>-<last>.parquet)")
    if not isinstance(rec, dict) or not _integer(rec.get("rows")) or not _integer(rec.get("bytes")) \
            or not isinstance(rec.get("sha256"), str) or not _SHA256.match(rec["sha256"]):
        raise RunStateError(f"{where}: parts.{name}: expected {{rows, sha256, bytes}}, got {rec!r:.80}")
    return int(match.group(1)), int(match.group(2))

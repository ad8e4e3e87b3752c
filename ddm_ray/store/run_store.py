"""The run folder: one place that knows every file name of the output contract.

    <out>/manifest.json            config, hash, versions, timings, counts, status
    <out>/units.parquet            unit_id, label, sample_ids, level
    <out>/test_index.parquet       position, test_id
    <out>/attribution/part-<first>-<last>.parquet   unit_id, objective, delta
    <out>/checksums/part-<first>-<last>.parquet.json rows, sha256, bytes of that part
    <out>/artifacts/model.pt       final parameters and the trajectory checkpoints
    <out>/artifacts/distill/<piece>.pt              distillation pieces (subspace, target shards)
    <out>/artifacts/synset.pt                       every unit's synset
    <out>/validation.json          written by `ddm-ray validate`

Every file is written whole (local: to a temporary name, then renamed; object stores: one PUT),
so a reader never sees half a file, and part names depend only on the block of units they hold.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ddm_ray.errors import ConfigError, DamagedArtifactError, StorageError, brief
from ddm_ray.store.fs import join, open_url, read_parquet

ATTRIBUTION_SCHEMA = pa.schema(
    [
        pa.field("unit_id", pa.int64(), nullable=False),
        pa.field("objective", pa.string(), nullable=False),
        pa.field("delta", pa.list_(pa.float32()), nullable=False),
    ]
)
UNITS_SCHEMA = pa.schema(
    [
        pa.field("unit_id", pa.int64(), nullable=False),
        pa.field("label", pa.int64(), nullable=True),  # class label; null for a unit spanning classes
        pa.field("label_name", pa.string(), nullable=False),  # the label as in the data ("mixed" if spanning)
        pa.field("name", pa.string(), nullable=False),  # column value, or "<label>/<cluster>" for k-means
        pa.field("sample_ids", pa.list_(pa.int64()), nullable=False),  # training ids of the members
        pa.field("member_labels", pa.list_(pa.int64()), nullable=False),  # each member's label (coded as `label`)
        pa.field("member_predicted", pa.list_(pa.int64()), nullable=False),  # the trained model on each member
        pa.field("member_loss", pa.list_(pa.float32()), nullable=False),  # its cross-entropy on each member
        pa.field("level", pa.string(), nullable=False),  # "cluster" (k-means) or "column:<name>"
        pa.field("size", pa.int64(), nullable=False),
    ]
)
TEST_INDEX_SCHEMA = pa.schema(
    [
        pa.field("position", pa.int64(), nullable=False),  # 0-based index into every row's delta list
        pa.field("test_id", pa.int64(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),  # true class label (as in the data, or its index)
        pa.field("label_name", pa.string(), nullable=False),
        pa.field("predicted", pa.int64(), nullable=False),  # the trained model's prediction (same coding)
        pa.field("predicted_name", pa.string(), nullable=False),
        pa.field("loss", pa.float32(), nullable=False),  # cross-entropy of the trained model
        pa.field("correct", pa.bool_(), nullable=False),
    ]
)


def part_name(first_unit: int, last_unit: int) -> str:
    """Deterministic attribution part name for units first..last (inclusive)."""
    return f"part-{first_unit:09d}-{last_unit:09d}.parquet"


class RunStore:
    """Reads and writes one run folder through fsspec."""

    def __init__(self, url: str, storage_options: dict[str, str] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = open_url(url, self.storage_options)
        if not self.root.strip("/"):
            raise ConfigError(f"{url or repr(url)}: the root of a file system or store cannot be a run folder; "
                              "choose a folder below it")
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        # called with the relative name before every write and removal: a lease's ownership check
        # (`store.lease`), so that a run that lost its lease stops instead of writing
        self.guard: Callable[[str], None] | None = None

    @property
    def local(self) -> bool:
        """True for a folder on this machine's file system."""
        return self._local

    # ---- raw bytes -------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.guard is not None:
            self.guard(rel)
        dest = self.path(rel)
        try:
            parent = dest.rsplit("/", 1)[0]
            if self._local:
                self.fs.makedirs(parent, exist_ok=True)
                # hidden temp name: dataset readers (pyarrow) skip dot-files
                tmp = f"{parent}/.{dest.rsplit('/', 1)[1]}.tmp-{uuid.uuid4().hex}"
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, dest)
                finally:
                    if os.path.exists(tmp):  # a failed write leaves no temporary file behind
                        os.remove(tmp)
            else:
                self.fs.pipe_file(dest, data)
        except Exception as e:  # noqa: BLE001  botocore/s3fs raise far beyond OSError
            raise StorageError(f"cannot write {self.url}/{rel}: {brief(e)}") from None

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            raise StorageError(f"{self.url}/{rel}: not found") from None
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"cannot read {self.url}/{rel}: {brief(e)}") from None

    def exists(self, rel: str) -> bool:
        try:
            return bool(self.fs.exists(self.path(rel)))
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"cannot reach {self.url}: {brief(e)}") from None

    def list(self, rel: str) -> list[str]:
        """File names directly under rel (empty if it does not exist)."""
        try:
            self.fs.invalidate_cache()
            where = self.path(rel) if rel else self.root
            if not self.fs.exists(where):
                return []
            if not self.fs.isdir(where):
                raise StorageError(f"{self.url}/{rel}: not a folder")
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(where, detail=False))
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"cannot list {self.url}/{rel}: {brief(e)}") from None

    def remove(self, rel: str) -> None:
        if self.guard is not None:
            self.guard(rel)
        try:
            if self.fs.exists(self.path(rel)):
                self.fs.rm(self.path(rel), recursive=True)
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"cannot remove {self.url}/{rel}: {brief(e)}") from None

    # ---- typed helpers ---------------------------------------------------------------------
    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read_bytes(rel))
        except json.JSONDecodeError as e:
            raise StorageError(f"{self.url}/{rel}: not valid JSON ({e})") from None

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="snappy")
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str) -> pa.Table:
        try:
            return read_parquet(self.fs, self.path(rel))
        except FileNotFoundError:
            raise StorageError(f"{self.url}/{rel}: not found") from None
        except OSError as e:
            raise StorageError(f"cannot read {self.url}/{rel}: {e}") from None
        except pa.ArrowException as e:
            raise StorageError(f"{self.url}/{rel}: not valid Parquet ({e})") from None

    def write_torch(self, rel: str, obj: Any) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write_bytes(rel, buf.getvalue())

    def read_torch(self, rel: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
        """A dict written by `write_torch`, holding at least `keys`. Anything else (cut short,
        overwritten, a pickle of arbitrary objects, another file put in its place) raises
        `DamagedArtifactError` with one line: torch's own message is several lines of advice to
        turn `weights_only` off, which a run folder must never be trusted with."""
        data = self.read_bytes(rel)
        try:
            obj = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:  # noqa: BLE001 - every decoding failure is the same damage
            raise DamagedArtifactError(f"{self.url}/{rel}", _torch_load_reason(e, data)) from None
        if not isinstance(obj, dict):
            raise DamagedArtifactError(f"{self.url}/{rel}", f"holds a {type(obj).__name__}, not a dict")
        missing = [k for k in keys if k not in obj]
        if missing:
            raise DamagedArtifactError(f"{self.url}/{rel}", f"no {', '.join(map(repr, missing))}")
        return obj

    # ---- the contract ----------------------------------------------------------------------
    MANIFEST = "manifest.json"
    UNITS = "units.parquet"
    TEST_INDEX = "test_index.parquet"
    ATTRIBUTION = "attribution"
    MODEL = "artifacts/model.pt"
    VALIDATION = "validation.json"

    SYNSET = "artifacts/synset.pt"
    SUBSPACE = "artifacts/distill/subspace.pt"

    @staticmethod
    def distill_piece(key: str) -> str:
        """A finished distillation shard (its key names the shard: deterministic, no probing)."""
        return f"artifacts/distill/{key}.pt"

    CHECKSUMS = "checksums"

    def write_part(
        self, first_unit: int, last_unit: int, table: pa.Table, lease: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write a part, then its record (rows, sha256, bytes, and the lease token of the run that
        wrote it) beside it in checksums/: a part without a record is unfinished, and a part whose
        bytes do not match it is damaged."""
        name = part_name(first_unit, last_unit)
        buf = io.BytesIO()
        pq.write_table(table.cast(ATTRIBUTION_SCHEMA), buf, compression="snappy")
        data = buf.getvalue()
        record = {"rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                  **({"lease": lease} if lease else {})}
        self.write_bytes(f"{self.ATTRIBUTION}/{name}", data)
        self.write_json(f"{self.CHECKSUMS}/{name}.json", record)
        return record

    def parts(self) -> list[str]:
        return [n for n in self.list(self.ATTRIBUTION) if n.startswith("part-") and n.endswith(".parquet")]

    def part_record(self, name: str) -> dict[str, Any] | None:
        """The record written after part `name`, or None if there is none (or it is unreadable)."""
        rel = f"{self.CHECKSUMS}/{name}.json"
        if not self.exists(rel):
            return None
        try:
            rec = self.read_json(rel)
        except StorageError:
            return None
        ok = isinstance(rec, dict) and {"rows", "sha256", "bytes"} <= set(rec)
        return rec if ok else None

    def part_problem(self, name: str, record: dict[str, Any] | None, rows: int | None = None) -> str | None:
        """Why part `name` cannot be trusted (missing, no record, wrong size or checksum, wrong row
        count), or None when its bytes are exactly what was written."""
        if record is None:
            return "no checksum record (unfinished write)"
        if not self.exists(f"{self.ATTRIBUTION}/{name}"):
            return "missing"
        data = self.read_bytes(f"{self.ATTRIBUTION}/{name}")
        if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            return "bytes do not match the recorded checksum (damaged or replaced)"
        if rows is not None and record["rows"] != rows:
            return f"{record['rows']} rows recorded, {rows} expected"
        return None

    def complete_parts(self, manifest: dict[str, Any]) -> Iterator[tuple[str, pa.Table]]:
        """Every attribution part a complete run's manifest lists, each verified (`read_part`):
        the one reader of parts that validate, inspect and the Python API share."""
        records = manifest.get("parts")
        if not isinstance(records, dict) or not records:
            raise StorageError(f"{self.url}: the manifest lists no checksummed parts (an older ddm-ray wrote it); rerun")
        for name in sorted(records):
            yield name, self.read_part(name, records[name])

    def read_part(self, name: str, record: dict[str, Any] | None) -> pa.Table:
        """A verified part: refuses one whose bytes or unit ids do not match what was written."""
        from ddm_ray.store.manifest import check_part

        first, last = check_part(name, record, f"{self.url}/{self.MANIFEST}") if record is not None else (0, -1)
        problem = self.part_problem(name, record)
        if problem is not None:
            raise StorageError(f"{self.url}/{self.ATTRIBUTION}/{name}: {problem}; rerun with --resume to recompute it")
        table = self.read_table(f"{self.ATTRIBUTION}/{name}")
        ids = table.column("unit_id").to_pylist()
        if table.num_rows != record["rows"] or (ids and (min(ids) < first or max(ids) > last)):  # type: ignore[index]
            raise StorageError(f"{self.url}/{self.ATTRIBUTION}/{name}: holds other units than its name says")
        return table


def _torch_load_reason(e: Exception, data: bytes) -> str:
    """Why `torch.load` refused `data`, in a few words (never torch's multi-line advice)."""
    import pickle

    if not data:
        return "empty"
    if isinstance(e, pickle.UnpicklingError):
        return "holds objects other than tensors and plain containers"
    if not data.startswith(b"PK"):
        return "not a torch file"
    return "cut short or corrupted"

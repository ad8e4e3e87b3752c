"""Reading a finished audit from Python: `ddm_ray.open_run(url)`.

    run = ddm_ray.open_run("./ddm-out")                 # or s3://bucket/run
    unit_ids, test_ids, delta = run.matrix("loss")      # (n_units, n_test) numpy array
    run.top_units(test_id=1234, k=5)                    # most helpful and most harmful units
    run.units()                                         # pyarrow table: unit_id, label, sample_ids

Sign conventions (delta = f(model without the unit, x) - f(model, x)): for `loss`, delta > 0 means
removing the unit raises the loss, i.e. the unit helped that prediction; for `margin` and
`correct`, delta < 0 means the unit helped. Every attribution part is verified against the
checksum the run recorded before it is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ddm_ray.errors import InputError, RunStateError
from ddm_ray.store.run_store import RunStore


@dataclass
class AuditRun:
    """A complete run folder, read through its verified files."""

    store: RunStore
    manifest: dict[str, Any]

    @property
    def objectives(self) -> tuple[str, ...]:
        return tuple(self.manifest["config"]["online"]["objectives"])

    def units(self) -> pa.Table:
        """unit_id, label, sample_ids (training ids), level."""
        return self.store.read_table(RunStore.UNITS)

    def test_index(self) -> pa.Table:
        """position (column of every row) and test_id."""
        return self.store.read_table(RunStore.TEST_INDEX)

    def matrix(self, objective: str = "loss") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit_ids (U,), test_ids (N,), delta (U, N) float32), rows in unit order."""
        if objective not in self.objectives:
            raise InputError(f"objective {objective!r} not in this run ({', '.join(self.objectives)})")
        ids, rows = [], []
        for _name, t in self.store.complete_parts(self.manifest):
            t = t.filter(pc.equal(t.column("objective"), objective))
            ids.extend(t.column("unit_id").to_pylist())
            rows.extend(t.column("delta").to_numpy(zero_copy_only=False))
        order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
        unit_ids = np.asarray(ids, dtype=np.int64)[order]
        delta = np.stack([rows[i] for i in order]).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
        test_ids = self.test_index().column("test_id").to_numpy()
        return unit_ids, test_ids, delta

    def top_units(self, test_id: int, k: int = 5, objective: str = "loss") -> dict[str, list[tuple[int, float]]]:
        """The k most helpful and k most harmful units for one test sample: {"helpful": [(unit_id,
        delta), ...], "harmful": [...]}, strongest first (see the module docstring for signs)."""
        unit_ids, test_ids, delta = self.matrix(objective)
        where = np.nonzero(test_ids == test_id)[0]
        if where.size == 0:
            raise InputError(f"test id {test_id} is not in this run's test set")
        col = delta[:, int(where[0])]
        helped = col if objective == "loss" else -col  # larger: removing the unit hurts more
        order = np.argsort(-helped, kind="stable")
        pairs = [(int(unit_ids[i]), float(col[i])) for i in order]
        return {"helpful": pairs[:k], "harmful": pairs[::-1][:k]}


def open_run(url: str, storage_options: dict[str, str] | None = None) -> AuditRun:
    """Open a complete ddm-ray run folder (local path or fsspec URL)."""
    store = RunStore(url, storage_options or {})
    if not store.exists(RunStore.MANIFEST):
        raise RunStateError(f"{url}: no run here (manifest.json missing)")
    manifest = store.read_json(RunStore.MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("status") != "complete":
        status = manifest.get("status") if isinstance(manifest, dict) else None
        raise RunStateError(f"{url}: the run is not complete (status {status!r}); finish it with --resume")
    return AuditRun(store, manifest)

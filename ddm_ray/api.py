"""Reading a finished audit from Python: `ddm_ray.open_run(url)`.

    run = ddm_ray.open_run("./ddm-out")                 # or s3://bucket/run
    unit_ids, test_ids, delta = run.matrix("loss")      # (n_units, n_test) numpy array
    run.long("loss")                                    # pyarrow: unit_id, test_id, objective, delta
    run.top_units(test_id=1234, k=5)                    # most helpful and most harmful units (with names)
    run.unit_summary()                                  # one row per unit: name, label, size, mean effects
    run.validate(units=8)                               # exact leave-one-out retraining of 8 units vs the rows
    run.members(unit_id=3)                              # label, size, training ids of one unit
    run.members("annotator-5")                          # a unit by its name (units.parquet `name`)
    run.test_context(test_id=1234)                      # true label, prediction, loss, correct
    run.units()                                         # pyarrow table: unit_id, label, sample_ids, ...

Sign conventions (delta = f(model without the unit, x) - f(model, x)): for `loss`, delta > 0 means
removing the unit raises the loss, i.e. the unit helped that prediction; for `margin` and
`correct`, delta < 0 means the unit helped. `helped_score(objective, delta)` turns either into
"larger = helped more". Every attribution part is verified against the checksum the run recorded
before it is read; this module is the one reader of parts for users and for `ddm-ray inspect`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ddm_ray.config import RunConfig
from ddm_ray.errors import InputError, RunStateError, StorageError
from ddm_ray.store.manifest import check_manifest, check_status
from ddm_ray.store.run_store import RunStore

#: For each objective, the sign of delta that means "the unit helped this prediction".
HELPED_SIGN: dict[str, float] = {"loss": 1.0, "margin": -1.0, "correct": -1.0}

LONG_SCHEMA = pa.schema(
    [
        pa.field("unit_id", pa.int64(), nullable=False),
        pa.field("test_id", pa.int64(), nullable=False),
        pa.field("objective", pa.string(), nullable=False),
        pa.field("delta", pa.float32(), nullable=False),
    ]
)


class UnitEffect(tuple):
    """One unit's effect on one test sample: the pair (unit_id, delta), unpacked as before, with
    the unit's `name` (units.parquet) beside it: `u.unit_id`, `u.delta`, `u.name`."""

    name: str

    def __new__(cls, unit_id: int, delta: float, name: str) -> UnitEffect:
        self = super().__new__(cls, (int(unit_id), float(delta)))
        self.name = name
        return self

    @property
    def unit_id(self) -> int:
        return self[0]

    @property
    def delta(self) -> float:
        return self[1]

    def __repr__(self) -> str:
        return f"UnitEffect(unit_id={self[0]}, delta={self[1]!r}, name={self.name!r})"


def helped_sign(objective: str) -> float:
    """+1.0 if delta > 0 means the unit helped (loss), -1.0 if delta < 0 does (margin, correct)."""
    return HELPED_SIGN.get(objective, -1.0)


def helped_score(objective: str, delta: np.ndarray) -> np.ndarray:
    """delta (any shape) rescaled so that larger always means "removing the unit hurts more",
    i.e. the unit helped more: delta for loss, -delta for margin and correct."""
    return helped_sign(objective) * np.asarray(delta)


@dataclass
class AuditRun:
    """A complete run folder, read through its verified files."""

    store: RunStore
    manifest: dict[str, Any]

    @property
    def config(self) -> RunConfig:
        """The run's config as its manifest records it (type-checked by `open_run`)."""
        return RunConfig.from_dict(self.manifest["config"])

    @property
    def objectives(self) -> tuple[str, ...]:
        return self.config.online.objectives

    def check_objective(self, objective: str) -> str:
        """objective itself, or InputError naming the run's objectives."""
        if objective not in self.objectives:
            raise InputError(f"objective {objective!r} not in this run ({', '.join(self.objectives)})")
        return objective

    # ---- small tables ----------------------------------------------------------------------
    def units(self) -> pa.Table:
        """unit_id, label (null: spans classes), label_name, name, sample_ids (training ids), level, size."""
        return self.store.read_table(RunStore.UNITS)

    def class_names(self) -> dict[int, str]:
        """{label (as coded in the tables' `label` columns): its name as the data wrote it}."""
        data = self.manifest.get("data") or {}
        labels, names = data.get("labels") or [], data.get("label_names") or []
        if len(labels) == len(names) and labels:
            return {int(lab): str(name) for lab, name in zip(labels, names, strict=True)}
        t = self.test_index().to_pydict()  # runs from before the manifest named the classes
        return {int(lab): str(name) for lab, name in zip(t["label"], t["label_name"], strict=True)}

    def unit_id(self, unit: int | str) -> int:
        """A unit's id from its id or its name (the `name` column of units.parquet: the column value
        of `--units-from` units, "<label>/<cluster>" for k-means ones). An int, or a string of
        digits, is an id; any other string is a name. InputError names a few valid names."""
        if isinstance(unit, (int, np.integer)) and not isinstance(unit, bool):
            return int(unit)
        if not isinstance(unit, str):
            raise InputError(f"a unit is an id or a name, got {unit!r}")
        text = unit.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        t = self.units()
        if "name" not in t.column_names:
            raise InputError(f"unit {unit!r}: this run's units.parquet has no names; give a unit id")
        names = t.column("name").to_pylist()
        if text in names:
            return int(t.column("unit_id")[names.index(text)].as_py())
        shown = ", ".join(repr(n) for n in names[:5]) + (f" ... ({len(names)} units)" if len(names) > 5 else "")
        raise InputError(f"no unit named {unit!r} in this run (names: {shown}; or give a unit id)")

    def test_index(self) -> pa.Table:
        """position (0-based column of every delta list), test_id, label, label_name, predicted,
        predicted_name, loss, correct (the trained model on each test sample), in position order."""
        t = self.store.read_table(RunStore.TEST_INDEX)
        t = t.take(pc.sort_indices(t, [("position", "ascending")]))
        if t.column("position").to_pylist() != list(range(t.num_rows)):
            raise StorageError(f"{self.store.url}/{RunStore.TEST_INDEX}: positions are not 0..{t.num_rows - 1}")
        return t

    def members(self, unit_id: int | str) -> dict[str, Any]:
        """One unit (by id or name, see `unit_id`): {"unit_id", "label", "label_name", "name",
        "level", "size", "sample_ids": [training id, ...], "member_labels": [label of each member],
        "member_predicted": [the trained model's prediction on each member], "member_loss": [its
        loss on each member]} (labels coded as `label`; `class_names()` names them; the member
        lists are absent in runs from before they were written). Cluster units lie inside one class; a unit of `--units-from` may span
        classes (label None, label_name "mixed")."""
        unit_id = self.unit_id(unit_id)
        t = self.units()
        i = pc.index(t.column("unit_id"), unit_id).as_py()
        if i < 0:
            raise InputError(f"unit {unit_id} is not in this run (unit ids 0..{t.num_rows - 1})")
        return {k: v[0] for k, v in t.slice(i, 1).to_pydict().items()}

    def test_context(self, test_id: int) -> dict[str, Any]:
        """One test sample: {"position", "test_id", "label", "label_name", "predicted",
        "predicted_name", "loss", "correct"} (the trained model's prediction and loss)."""
        t = self.test_index()
        i = pc.index(t.column("test_id"), int(test_id)).as_py()
        if i < 0:
            raise InputError(f"test id {test_id} is not in this run's test set")
        return {k: v[0] for k, v in t.slice(i, 1).to_pydict().items()}

    # ---- the attribution -------------------------------------------------------------------
    def _rows(self, objective: str | None) -> Iterator[pa.Table]:
        """Verified parts, filtered to one objective (None: all), as unit_id, objective, delta."""
        if objective is not None:
            self.check_objective(objective)
        for _name, t in self.store.complete_parts(self.manifest):
            yield t if objective is None else t.filter(pc.equal(t.column("objective"), objective))

    def matrix(self, objective: str = "loss") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit_ids (U,), test_ids (N,), delta (U, N) float32), rows in unit order, columns in
        test_index position order: delta[i, j] belongs to unit unit_ids[i] and test sample
        test_ids[j]. Signs: see `helped_sign`."""
        ids, rows = [], []
        for t in self._rows(objective):
            ids.extend(t.column("unit_id").to_pylist())
            rows.extend(t.column("delta").to_numpy(zero_copy_only=False))
        order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
        unit_ids = np.asarray(ids, dtype=np.int64)[order]
        delta = np.stack([rows[i] for i in order]).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
        test_ids = self.test_index().column("test_id").to_numpy()
        if rows and delta.shape[1] != test_ids.shape[0]:
            raise StorageError(f"{self.store.url}: delta lists hold {delta.shape[1]} values, test_index {test_ids.shape[0]}")
        return unit_ids, test_ids, delta

    def long(self, objective: str | None = None) -> pa.Table:
        """The attribution in long format: one row per (unit, test sample, objective) with columns
        unit_id int64, test_id int64, objective string, delta float32; all objectives when
        objective is None. Sorted by unit_id, then objective in the run's order, then test
        position. delta = f(without the unit) - f(model): for loss, delta > 0 means the unit
        helped that test sample; for margin and correct, delta < 0 means it helped."""
        test_ids = self.test_index().column("test_id").to_numpy()
        n = test_ids.shape[0]
        rank = {o: i for i, o in enumerate(self.objectives)}
        pieces = []
        for t in self._rows(objective):
            if t.num_rows == 0:
                continue
            lengths = pc.list_value_length(t.column("delta")).to_numpy(zero_copy_only=False)
            if (lengths != n).any():
                raise StorageError(f"{self.store.url}: a delta list does not hold {n} values (test_index)")
            order = np.lexsort((np.array([rank[o] for o in t.column("objective").to_pylist()]),
                                t.column("unit_id").to_numpy()))
            t = t.take(pa.array(order))
            pieces.append(pa.table(
                {
                    "unit_id": np.repeat(t.column("unit_id").to_numpy(), n),
                    "test_id": np.tile(test_ids, t.num_rows),
                    "objective": pc.take(t.column("objective"), pa.array(np.repeat(np.arange(t.num_rows), n))),
                    "delta": pc.list_flatten(t.column("delta")).cast(pa.float32()),
                },
                schema=LONG_SCHEMA,
            ))
        if not pieces:
            return LONG_SCHEMA.empty_table()
        out = pa.concat_tables(pieces)
        first = out.column("unit_id").to_numpy()
        if (np.diff(first) < 0).any():  # parts out of unit order: sort, keeping objective and position order
            out = out.take(pa.array(np.argsort(first, kind="stable")))
        return out

    def unit_names(self) -> dict[int, str]:
        """{unit_id: name} (the id as text in runs from before units had names)."""
        t = self.units().to_pydict()
        names = t.get("name") or [str(u) for u in t["unit_id"]]
        return {int(u): str(n) for u, n in zip(t["unit_id"], names, strict=True)}

    def top_units(self, test_id: int, k: int = 5, objective: str = "loss") -> dict[str, list[UnitEffect]]:
        """The k most helpful and k most harmful units for one test sample: {"helpful": [(unit_id,
        delta), ...], "harmful": [...]}, strongest first (see `helped_sign` for signs). Each pair
        is a `UnitEffect`, which also carries the unit's name (`.name`)."""
        unit_ids, test_ids, delta = self.matrix(objective)
        where = np.nonzero(test_ids == test_id)[0]
        if where.size == 0:
            raise InputError(f"test id {test_id} is not in this run's test set")
        col = delta[:, int(where[0])]
        order = np.argsort(-helped_score(objective, col), kind="stable")
        names = self.unit_names()
        pairs = [UnitEffect(int(unit_ids[i]), float(col[i]), names.get(int(unit_ids[i]), str(int(unit_ids[i]))))
                 for i in order]
        return {"helpful": pairs[:k], "harmful": pairs[::-1][:k]}

    def unit_summary(self, top_members: int = 5, as_pandas: bool | None = None) -> Any:
        """One row per unit: unit_id, name, label, label_name, level, size; per objective O of the
        run: mean_delta_O (mean delta over the test samples), helped_share_O and hurt_share_O
        (share of test samples the unit helps / hurts, by `helped_sign`); disagreeing (members
        whose label differs from the trained model's prediction on them) and top_member_ids (up
        to `top_members` members the trained model fits worst: highest training loss first, a
        likely sign of a wrong label; in units.parquet order for runs without member losses).
        A pandas DataFrame when pandas is installed (as_pandas None or True; True without pandas
        is an InputError naming the extra), else a pyarrow Table; rows in unit_id order."""
        if as_pandas is None or as_pandas:
            try:
                import pandas  # noqa: F401
            except ImportError:
                if as_pandas:
                    raise InputError('unit_summary(as_pandas=True) needs pandas: pip install "ddm-ray[pandas]"') from None
                as_pandas = False
            else:
                as_pandas = True
        t = self.units()
        t = t.take(pc.sort_indices(t, [("unit_id", "ascending")]))
        d = t.to_pydict()
        n = t.num_rows
        labels, predicted, losses = d.get("member_labels"), d.get("member_predicted"), d.get("member_loss")
        disagree, top = [], []
        for i in range(n):
            ids = d["sample_ids"][i]
            if labels is not None and predicted is not None:
                disagree.append(int((np.asarray(labels[i]) != np.asarray(predicted[i])).sum()))
            else:
                disagree.append(None)
            order = (np.argsort(-np.asarray(losses[i], dtype=np.float64), kind="stable").tolist()
                     if losses is not None else list(range(len(ids))))
            top.append([int(ids[j]) for j in order[:top_members]])
        cols: dict[str, Any] = {
            "unit_id": pa.array(d["unit_id"], pa.int64()),
            "name": pa.array(d.get("name") or [str(u) for u in d["unit_id"]], pa.string()),
            "label": pa.array(d["label"], pa.int64()),
            "label_name": pa.array(d["label_name"], pa.string()),
            "level": pa.array(d["level"], pa.string()),
            "size": pa.array(d["size"], pa.int64()),
        }
        for objective in self.objectives:
            unit_ids, _tests, delta = self.matrix(objective)
            row = {int(u): r for r, u in enumerate(unit_ids)}
            rows = [row.get(int(u)) for u in d["unit_id"]]
            if any(r is None for r in rows):
                raise StorageError(f"{self.store.url}: units without attribution rows for {objective}")
            delta = delta[np.asarray(rows, dtype=np.int64)] if n else np.zeros((0, 0), np.float32)
            score = helped_score(objective, delta)
            width = max(delta.shape[1], 1)
            cols[f"mean_delta_{objective}"] = pa.array(delta.mean(axis=1) if delta.shape[1] else np.zeros(n), pa.float64())
            cols[f"helped_share_{objective}"] = pa.array((score > 0).sum(axis=1) / width, pa.float64())
            cols[f"hurt_share_{objective}"] = pa.array((score < 0).sum(axis=1) / width, pa.float64())
        cols["disagreeing"] = pa.array(disagree, pa.int64())
        cols["top_member_ids"] = pa.array(top, pa.list_(pa.int64()))
        out = pa.table(cols)
        return out.to_pandas() if as_pandas else out

    def top_tests(self, unit_id: int | str, k: int = 5, objective: str = "loss") -> dict[str, list[tuple[int, float]]]:
        """The k test samples one unit (by id or name) helps most and the k it hurts most:
        {"helped": [(test_id, delta), ...], "hurt": [...]}, strongest first (see `helped_sign`)."""
        unit_id = self.unit_id(unit_id)
        unit_ids, test_ids, delta = self.matrix(objective)
        where = np.nonzero(unit_ids == unit_id)[0]
        if where.size == 0:
            raise InputError(f"unit {unit_id} is not in this run (unit ids 0..{len(unit_ids) - 1})")
        row = delta[int(where[0])]
        order = np.argsort(-helped_score(objective, row), kind="stable")
        pairs = [(int(test_ids[j]), float(row[j])) for j in order]
        return {"helped": pairs[:k], "hurt": pairs[::-1][:k]}


    # ---- the exact check ---------------------------------------------------------------------
    def validate(self, units: int | None = None, seed: int = 0, engine: str = "local", num_cpus: int | None = None,
                 noise_seeds: int = 0) -> dict[str, Any]:
        """`ddm-ray validate` from Python: retrain `units` seeded units (all when None) exactly and
        compare with this run's rows; writes validation.json and returns its figures ("pearson",
        "spearman" on Δ loss, "per_objective", "noise_ceiling" with noise_seeds > 0, costs)."""
        from ddm_ray.validate import validate_run

        return validate_run(self.store.url, units, seed, self.store.storage_options, engine=engine,
                            num_cpus=num_cpus, noise_seeds=noise_seeds)


def open_run(url: str, storage_options: dict[str, str] | None = None) -> AuditRun:
    """Open a complete ddm-ray run folder (local path or fsspec URL). Its manifest is checked
    against the schema readers rely on (`ddm_ray.store.manifest`): RunStateError with one line
    for a manifest that does not fit. Nothing is imported or opened because the manifest says so."""
    store = RunStore(url, storage_options or {})
    if not store.exists(RunStore.MANIFEST):
        raise RunStateError(f"{url}: no run here (manifest.json missing)")
    manifest = store.read_json(RunStore.MANIFEST)
    where = f"{url}/{RunStore.MANIFEST}"
    check_status(manifest, where)
    if manifest["status"] != "complete":
        raise RunStateError(f"{url}: the run is not complete (status {manifest['status']!r}); finish it with --resume")
    return AuditRun(store, check_manifest(manifest, where))

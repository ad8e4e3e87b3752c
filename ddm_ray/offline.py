"""The offline stage's first half: training with a trajectory and the units, on any device.

`train_and_units` is a plain function an executor may run where the GPUs are (`Executor.call`);
the tables it feeds are the run's `units.parquet` and `test_index.parquet`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from ddm_ray.config import RunConfig
from ddm_ray.core.models import Network, Params
from ddm_ray.core.stability import stability_report
from ddm_ray.core.training import Trajectory, train
from ddm_ray.core.units import Units, make_units, units_from_column
from ddm_ray.data import Dataset
from ddm_ray.engine.progress import Progress
from ddm_ray.errors import InputError, NonFiniteError
from ddm_ray.store.run_store import TEST_INDEX_SCHEMA, UNITS_SCHEMA

_log = logging.getLogger(__name__)


@dataclass
class Offline:
    """What the offline stage produces (and a resumed run reloads)."""

    dataset: Dataset
    net: Network
    params0: Params
    traj: Trajectory
    units: Units


MODEL_KEYS = ("params0", "checkpoints", "steps_per_epoch", "unit_of", "unit_label")


def model_state_problem(state: dict[str, Any], net: Network, n_train: int) -> str | None:
    """A one-line reason when a loaded `artifacts/model.pt` (holding `MODEL_KEYS`) does not fit
    this run's model and data, else None: every parameter set (params0, each checkpoint, each
    velocity) has exactly the network's names and shapes and finite values, and unit_of is
    (n_train,) with ids inside unit_label (U,)."""
    shapes = {k: tuple(v.shape) for k, v in net.module.named_parameters()}

    def params_problem(what: str, p: Any) -> str | None:
        if not isinstance(p, dict) or not all(isinstance(v, torch.Tensor) for v in p.values()):
            return f"{what} is not a set of named tensors"
        got = {k: tuple(v.shape) for k, v in p.items()}
        if got != shapes:
            return f"{what} does not fit the model (names or shapes differ)"
        if not all(bool(torch.isfinite(v).all()) for v in p.values()):
            return f"{what} holds non-finite values"
        return None

    checkpoints, velocities = state["checkpoints"], state.get("velocities")
    if not isinstance(checkpoints, list) or not checkpoints:
        return "no checkpoints"
    sets = [("params0", state["params0"])] + [(f"checkpoint {i}", c) for i, c in enumerate(checkpoints)]
    if velocities is not None:
        if not isinstance(velocities, list) or len(velocities) != len(checkpoints):
            return "velocities do not match the checkpoints"
        sets += [(f"velocity {i}", v) for i, v in enumerate(velocities)]
    for what, p in sets:
        if (problem := params_problem(what, p)) is not None:
            return problem
    steps, unit_of, label = state["steps_per_epoch"], state["unit_of"], state["unit_label"]
    if not isinstance(steps, int | torch.Tensor) or int(steps) < 1:
        return "steps_per_epoch is not a positive count"
    if not (isinstance(unit_of, torch.Tensor) and isinstance(label, torch.Tensor)):
        return "units are not tensors"
    if unit_of.dtype != torch.int64 or tuple(unit_of.shape) != (n_train,):
        return f"unit_of is not ({n_train},) int64: the data has {n_train} training samples"
    if label.ndim != 1 or label.numel() < 1 or int(unit_of.min()) < 0 or int(unit_of.max()) >= label.numel():
        return "unit ids do not fit the unit labels"
    return None


def offline_from_state(state: dict[str, Any], dataset: Dataset, net: Network) -> Offline:
    """The `Offline` a checked `model.pt` state (`model_state_problem` is None) describes."""
    traj = Trajectory(state["checkpoints"], int(state["steps_per_epoch"]), state.get("velocities"))
    return Offline(dataset, net, state["params0"], traj, Units(unit_of=state["unit_of"], label=state["unit_label"]))


def train_and_units(cfg: RunConfig, dataset: Dataset, device: str = "cpu") -> tuple[Params, Trajectory, Units]:
    """Train with a trajectory and split the classes into units, on `device`; CPU tensors out."""
    dev = torch.device(device)
    net = Network(cfg.model, dataset.input_shape, dataset.num_classes)
    net.module.to(dev)
    params0 = {k: v.to(dev) for k, v in net.init_params(cfg.train.seed).items()}
    x, y = dataset.x_train.to(dev), dataset.y_train.to(dev)
    with Progress(cfg.train.epochs, what="train", unit="epochs", logger=_log) as bar:
        traj = train(net, params0, x, y, cfg.train, on_epoch=bar.set)
    if not all(bool(torch.isfinite(v).all()) for v in traj.final.values()):
        raise NonFiniteError(
            "training: the model diverged (non-finite parameters); lower --lr or normalise the inputs"
        )
    if cfg.units.from_column:
        if dataset.train_groups is None:
            raise InputError(f"--units-from {cfg.units.from_column}: the data has no such column loaded")
        units = units_from_column(dataset.train_groups, dataset.y_train, cfg.units.from_column)
    else:
        if cfg.units.features == "penultimate":
            with torch.no_grad():
                feats = net.features(traj.final, x)
        else:
            feats = x.reshape(x.shape[0], -1)
        t0 = time.perf_counter()
        units = make_units(
            feats, dataset.y_train, dataset.num_classes, cfg.units.clusters_per_class,
            cfg.units.kmeans_iters, cfg.units.seed, class_names=[dataset.name_of(c) for c in range(dataset.num_classes)],
            min_size=cfg.units.min_size,
        )
        _log.info(f"units: k-means ({cfg.units.features}), {cfg.units.clusters_per_class} clusters per class x "
                  f"{dataset.num_classes} classes -> {units.num_units} units in {time.perf_counter() - t0:.1f}s")

    def cpu(p: Params) -> Params:
        return {k: v.cpu() for k, v in p.items()}

    traj = Trajectory(
        [cpu(p) for p in traj.checkpoints], traj.steps_per_epoch,
        None if traj.velocities is None else [cpu(p) for p in traj.velocities],
    )
    return cpu(params0), traj, units


def train_offline(cfg: RunConfig, dataset: Dataset, device: str = "cpu") -> Offline:
    """The offline stage's first half (see `train_and_units`) as an `Offline`."""
    params0, traj, units = train_and_units(cfg, dataset, device)
    return Offline(dataset, Network(cfg.model, dataset.input_shape, dataset.num_classes), params0, traj, units)


def stability_of(cfg: RunConfig, off: Offline, device: str = "cpu") -> dict[str, Any]:
    """The training-stability figures (`core.stability.stability_report`) of the trained run, on
    `device`: the top Hessian eigenvalue at a few checkpoints against 2 (1 + momentum) / lr."""
    dev = torch.device(device)
    net = Network(cfg.model, off.dataset.input_shape, off.dataset.num_classes)
    net.module.to(dev)
    cps = [{k: v.to(dev) for k, v in p.items()} for p in off.traj.checkpoints]
    return stability_report(net, cps, off.dataset.x_train.to(dev), off.dataset.y_train.to(dev), cfg.train)


def _unit_names(units: Units, ds: Dataset) -> list[str]:
    """The column value of column units; "<label>/<cluster>" (cluster counted within its class)
    for k-means units."""
    if units.names is not None:
        return list(units.names)
    seen: dict[int, int] = {}
    out = []
    for c in units.label.tolist():
        out.append(f"{ds.name_of(c)}/{seen.get(c, 0)}")
        seen[c] = seen.get(c, 0) + 1
    return out


def units_table(off: Offline) -> pa.Table:
    """units.parquet: one row per unit with its label, members (training ids), each member's
    label, the trained model's prediction on it (coded as `label`) and its loss, and size."""
    ids, ds, units = off.dataset.train_ids, off.dataset, off.units
    rows = [units.members(u) for u in range(units.num_units)]
    members = [ids[r].tolist() for r in rows]
    labels = [int(c) for c in units.label]
    pred, loss = test_predictions(off.net, off.traj.final, ds.x_train, ds.y_train)
    coded = torch.tensor(ds.classes, dtype=torch.int64)
    member_labels = [coded[ds.y_train[r]].tolist() for r in rows]
    member_predicted = [coded[pred[r]].tolist() for r in rows]
    member_loss = [loss[r].tolist() for r in rows]
    return pa.table(
        {
            "unit_id": pa.array(range(units.num_units), pa.int64()),
            "label": pa.array([ds.classes[c] if c >= 0 else None for c in labels], pa.int64()),
            "label_name": pa.array([ds.name_of(c) if c >= 0 else "mixed" for c in labels], pa.string()),
            "sample_ids": pa.array(members, pa.list_(pa.int64())),
            "member_labels": pa.array(member_labels, pa.list_(pa.int64())),
            "member_predicted": pa.array(member_predicted, pa.list_(pa.int64())),
            "member_loss": pa.array(member_loss, pa.list_(pa.float32())),
            "name": pa.array(_unit_names(units, ds), pa.string()),
            "level": pa.array([units.level] * units.num_units, pa.string()),
            "size": pa.array([len(m) for m in members], pa.int64()),
        },
        schema=UNITS_SCHEMA,
    )


def test_predictions(net: Network, params: Params, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained model on the test set: predicted class index (N,) int64 and loss (N,) float32."""
    preds, losses = [], []
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            logits = net.logits(params, x[i : i + chunk])
            preds.append(logits.argmax(1))
            losses.append(torch.nn.functional.cross_entropy(logits, y[i : i + chunk], reduction="none"))
    return torch.cat(preds), torch.cat(losses).float()


def test_index_table(off: Offline) -> pa.Table:
    """test_index.parquet: the column (0-based position) of every test sample in each row's delta
    list, with its true label and the trained model's prediction, loss and correctness."""
    ds = off.dataset
    pred, loss = test_predictions(off.net, off.traj.final, ds.x_test, ds.y_test)
    y = ds.y_test.tolist()
    p = pred.tolist()
    return pa.table(
        {
            "position": pa.array(range(len(y)), pa.int64()),
            "test_id": pa.array(ds.test_ids.tolist(), pa.int64()),
            "label": pa.array([ds.classes[c] for c in y], pa.int64()),
            "label_name": pa.array([ds.name_of(c) for c in y], pa.string()),
            "predicted": pa.array([ds.classes[c] for c in p], pa.int64()),
            "predicted_name": pa.array([ds.name_of(c) for c in p], pa.string()),
            "loss": pa.array(loss.numpy(), pa.float32()),
            "correct": pa.array([a == b for a, b in zip(y, p, strict=True)], pa.bool_()),
        },
        schema=TEST_INDEX_SCHEMA,
    )

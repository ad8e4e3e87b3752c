"""The offline stage's first half: training with a trajectory and the units, on any device.

`train_and_units` is a plain function an executor may run where the GPUs are (`Executor.call`);
the tables it feeds are the run's `units.parquet` and `test_index.parquet`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from ddm_ray.config import RunConfig
from ddm_ray.core.models import Network, Params
from ddm_ray.core.training import Trajectory, train
from ddm_ray.core.units import Units, make_units
from ddm_ray.data import Dataset
from ddm_ray.errors import NonFiniteError
from ddm_ray.store.run_store import TEST_INDEX_SCHEMA, UNITS_SCHEMA


@dataclass
class Offline:
    """What the offline stage produces (and a resumed run reloads)."""

    dataset: Dataset
    net: Network
    params0: Params
    traj: Trajectory
    units: Units


def train_and_units(cfg: RunConfig, dataset: Dataset, device: str = "cpu") -> tuple[Params, Trajectory, Units]:
    """Train with a trajectory and split the classes into units, on `device`; CPU tensors out."""
    dev = torch.device(device)
    net = Network(cfg.model, dataset.input_shape, dataset.num_classes)
    net.module.to(dev)
    params0 = {k: v.to(dev) for k, v in net.init_params(cfg.train.seed).items()}
    x, y = dataset.x_train.to(dev), dataset.y_train.to(dev)
    traj = train(net, params0, x, y, cfg.train)
    if not all(bool(torch.isfinite(v).all()) for v in traj.final.values()):
        raise NonFiniteError(
            "training: the model diverged (non-finite parameters); lower --lr or normalise the inputs"
        )
    if cfg.units.features == "penultimate":
        with torch.no_grad():
            feats = net.features(traj.final, x)
    else:
        feats = x.reshape(x.shape[0], -1)
    units = make_units(
        feats, dataset.y_train, dataset.num_classes, cfg.units.clusters_per_class,
        cfg.units.kmeans_iters, cfg.units.seed, class_names=dataset.classes,
    )

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


def units_table(off: Offline) -> pa.Table:
    ids = off.dataset.train_ids
    rows_members = [ids[off.units.members(u)].tolist() for u in range(off.units.num_units)]
    return pa.table(
        {
            "unit_id": pa.array(range(off.units.num_units), pa.int64()),
            "label": pa.array([off.dataset.classes[int(c)] for c in off.units.label], pa.int64()),
            "sample_ids": pa.array(rows_members, pa.list_(pa.int64())),
            "level": pa.array(["cluster"] * off.units.num_units, pa.string()),
        },
        schema=UNITS_SCHEMA,
    )


def test_index_table(dataset: Dataset) -> pa.Table:
    n = dataset.test_ids.numel()
    return pa.table(
        {"position": pa.array(range(n), pa.int64()), "test_id": pa.array(dataset.test_ids.tolist(), pa.int64())},
        schema=TEST_INDEX_SCHEMA,
    )

"""`ddm-ray run`: options of a run (shared with jobs/audit.py), their configs, and the command."""

from __future__ import annotations

import argparse
from typing import Any

from ddm_ray.cli.common import _kv, _logger, _shape, storage_options_from_args
from ddm_ray.config import (
    DataConfig,
    DistillConfig,
    ExecConfig,
    ModelConfig,
    OnlineConfig,
    RunConfig,
    TrainConfig,
    UnitConfig,
)
from ddm_ray.errors import ConfigError


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options of a run (shared by `ddm-ray run` and jobs/audit.py)."""
    d, m, t, u, s, o = DataConfig(), ModelConfig(), TrainConfig(), UnitConfig(), DistillConfig(), OnlineConfig()
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None,
                   help=f"digits | parquet | mnist | cifar10 (default: parquet when --train/--test are given, else {d.dataset})")
    g.add_argument("--train", help="training Parquet (columns x: list<float>, y: int, optional id)")
    g.add_argument("--test", help="test Parquet, same schema")
    g.add_argument("--data-root", help="folder with MNIST idx files or CIFAR-10 python batches")
    g.add_argument("--input-shape", type=_shape, help="sample shape C,H,W (default: flat vector)")
    g.add_argument("--max-train", type=int, help="use only the first N training samples")
    g.add_argument("--max-test", type=int, help="use only the first N test samples")
    g = p.add_argument_group("model and training")
    g.add_argument("--model", default=m.arch, help="mlp | convnet")
    g.add_argument("--hidden", type=_shape, default=m.hidden, help="MLP hidden widths, e.g. 64,64")
    g.add_argument("--epochs", type=int, default=t.epochs)
    g.add_argument("--batch-size", type=int, default=t.batch_size)
    g.add_argument("--lr", type=float, default=t.lr)
    g.add_argument("--momentum", type=float, default=t.momentum)
    g.add_argument("--weight-decay", type=float, default=t.weight_decay)
    g.add_argument("--seed", type=int, default=t.seed, help="seed of init, data order, k-means, distillation")
    g = p.add_argument_group("units and distillation")
    g.add_argument("--clusters-per-class", type=int, default=u.clusters_per_class, help="K units per class")
    g.add_argument("--unit-features", default=u.features, help="input | penultimate (k-means space)")
    g.add_argument("--distill-method", default=s.method, help="basis (default) | soft_label | literal")
    g.add_argument("--target", default=s.target, help="basis target: blend (default) | unrolled | influence")
    g.add_argument("--target-solver", default=s.target_solver,
                   help="unrolled target: auto (default) | adjoint (cost flat in units) | forward")
    g.add_argument("--probe-samples", type=int, default=s.probe_samples,
                   help="basis: class-stratified probe samples, the synsets' shared pool (default %(default)s)")
    g.add_argument("--probe-rank", type=int, default=s.probe_rank,
                   help="basis: probe subspace dimension k (default %(default)s)")
    g.add_argument("--basis-ridge", type=float, default=s.ridge, help="basis: shrinkage of weak probe directions")
    g.add_argument("--influence-damping", type=float, default=s.influence_damping,
                   help="influence target: damping relative to the largest curvature")
    g.add_argument("--blend-weight", type=float, default=s.blend_weight,
                   help="blend: weight of the unrolled target (default: calibrated on exact retrainings)")
    g.add_argument("--calibration-units", type=int, default=s.calibration_units,
                   help="blend calibration: units retrained exactly (default %(default)s)")
    g.add_argument("--ipc", type=int, default=s.ipc, help="soft_label/literal: synthetic samples per unit")
    g.add_argument("--distill-steps", type=int, default=s.steps, help="soft_label/literal: matching steps")
    g.add_argument("--distill-lr", type=float, default=s.lr, help="soft_label/literal: Adam lr")
    g.add_argument("--unroll-epochs", type=int, help="unroll only the last N epochs (default all)")
    g = p.add_argument_group("online stage")
    g.add_argument("--online-steps", type=int, default=o.steps)
    g.add_argument("--online-lr", type=float, default=o.lr)
    g.add_argument("--objectives", default=",".join(o.objectives), help="subset of loss,margin,correct")
    g.add_argument("--online-precision", default=o.precision, help="fp32 | tf32 | bf16 (tf32/bf16: GPU speed-ups)")
    g = p.add_argument_group("execution (does not change results)")
    g.add_argument("--out", default="./ddm-out", help="output folder or URL (file://, s3://)")
    g.add_argument("--engine", default="ray", help="ray (default) | local (in-process, no Ray)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--online-batch", type=int, help="units fine-tuned together per pass (default 64)")
    g.add_argument("--block-units", type=int, default=64, help="units per task and per Parquet part")
    g.add_argument("--max-in-flight", type=int, help="online tasks in flight (default 2 x workers)")
    g.add_argument("--num-cpus", type=int, help="CPUs for a local Ray runtime")
    g.add_argument("--address", help="Ray address (default: start a local runtime or use RAY_ADDRESS)")
    g.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds to wait for --address / RAY_ADDRESS to answer (default %(default)s)")
    g.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    g.add_argument("--storage-option", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="s3fs option, e.g. endpoint_url=http://127.0.0.1:9000 (no credentials here: "
                        "use AWS_* variables or --storage-options-file)")
    g.add_argument("--storage-options-file", metavar="PATH",
                   help="key=value lines of storage options, credentials included (kept out of argv)")
    g.add_argument("--quiet", action="store_true", help="no progress output")


def _dataset(a: argparse.Namespace) -> str:
    """--train/--test select Parquet input by themselves; contradicting --dataset is refused."""
    files = bool(a.train or a.test)
    if a.dataset is None:
        return "parquet" if files else DataConfig().dataset
    if files and a.dataset != "parquet":
        raise ConfigError(f"--train/--test are Parquet files, but --dataset is {a.dataset}; drop one of them")
    return str(a.dataset)


def configs_from_args(a: argparse.Namespace) -> tuple[RunConfig, ExecConfig]:
    """Build validated config objects from parsed arguments (raises ConfigError)."""
    objectives = tuple(x.strip() for x in a.objectives.split(",") if x.strip())
    cfg = RunConfig(
        data=DataConfig(
            dataset=_dataset(a), train=a.train, test=a.test, root=a.data_root,
            input_shape=a.input_shape, max_train=a.max_train, max_test=a.max_test,
        ),
        model=ModelConfig(arch=a.model, hidden=tuple(a.hidden)),
        train=TrainConfig(
            epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, momentum=a.momentum,
            weight_decay=a.weight_decay, seed=a.seed,
        ),
        units=UnitConfig(clusters_per_class=a.clusters_per_class, features=a.unit_features, seed=a.seed),
        distill=DistillConfig(
            method=a.distill_method, target=a.target, target_solver=a.target_solver,
            probe_samples=a.probe_samples, probe_rank=a.probe_rank, ridge=a.basis_ridge,
            influence_damping=a.influence_damping, blend_weight=a.blend_weight,
            calibration_units=a.calibration_units,
            ipc=a.ipc, steps=a.distill_steps, lr=a.distill_lr, unroll_epochs=a.unroll_epochs, seed=a.seed,
        ),
        online=OnlineConfig(
            steps=a.online_steps, lr=a.online_lr, objectives=objectives, precision=a.online_precision
        ),
    )
    exe = ExecConfig(
        engine=a.engine, device=a.device, online_batch=a.online_batch, block_units=a.block_units,
        max_in_flight=a.max_in_flight, num_cpus=a.num_cpus, resume=a.resume,
        storage_options=storage_options_from_args(a), connect_timeout_s=a.connect_timeout,
    )
    return cfg, exe


def cmd_run(a: argparse.Namespace) -> int:
    from ddm_ray.engine import run_with_engine

    cfg, exe = configs_from_args(a)
    manifest = run_with_engine(cfg, exe, a.out, address=a.address, log=_logger(a.quiet), progress=not a.quiet)
    c = manifest["counts"]
    print(
        f"complete: {c['units']} units x {c['test_samples']} test samples x {c['objectives']} "
        f"objectives -> {a.out} (config {manifest['config_hash']}, {manifest['timings_seconds']['total']:.1f}s)"
    )
    return 0


def register(sub: Any) -> None:
    r = sub.add_parser("run", help="offline distillation + online leave-one-out rows into --out")
    add_run_arguments(r)
    r.set_defaults(func=cmd_run)

"""`ddm-ray` command line: run, validate, inspect, bench. The only place (with jobs/) that parses
arguments; everything below takes config objects. User errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

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
from ddm_ray.errors import ConfigError, DDMError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        sys.stderr.write(f"ddm-ray: error: {message}\n")
        raise SystemExit(2)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,28,28, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,28,28, got {text!r}")
    return dims


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


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


def storage_options_from_args(a: argparse.Namespace) -> dict[str, str]:
    """--storage-options-file, then --storage-option on top. Credentials on the command line are
    refused: argv shows in process lists, `ray job list` and job logs."""
    from ddm_ray.store.fs import SECRET_KEYS, storage_options_file

    given = dict(getattr(a, "storage_option", []) or [])
    leaked = sorted(k for k in given if k.lower() in SECRET_KEYS)
    if leaked:
        raise ConfigError(
            f"--storage-option {leaked[0]}=... puts a credential on the command line; set it in the "
            "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or in --storage-options-file"
        )
    path = getattr(a, "storage_options_file", None)
    return {**(storage_options_file(path) if path else {}), **given}


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


def _logger(quiet: bool) -> Any:
    def log(msg: str) -> None:
        if not quiet:
            print(f"[ddm-ray {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


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


def cmd_validate(a: argparse.Namespace) -> int:
    from ddm_ray.validate import print_validation, validate_run

    if a.units is not None and a.units < 1:
        raise ConfigError("--units must be >= 1")
    report = validate_run(
        a.out, a.units, a.seed, storage_options_from_args(a), log=_logger(a.quiet), engine=a.engine, num_cpus=a.num_cpus
    )
    print_validation(report)
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from ddm_ray.inspect import inspect_test_sample

    print(inspect_test_sample(a.out, a.test_id, a.objective, a.top, storage_options_from_args(a)))
    return 0


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `ddm-ray bench fidelity` (the run options above fix data, model and DDM)."""
    from ddm_ray.bench.fidelity import BenchConfig

    d = BenchConfig()
    g = p.add_argument_group("benchmark")
    g.add_argument("--units", type=int, help="score N units (seeded sample; default all)")
    g.add_argument("--masks", type=int, default=d.masks, help="retrained removal masks for LDS (0: skip)")
    g.add_argument("--fit-masks", type=int, default=d.fit_masks, help="DDM masks for the ridge datamodel")
    g.add_argument("--alpha", type=float, default=d.alpha, help="probability a mask removes each unit")
    g.add_argument("--ridge", type=float, default=d.ridge)
    g.add_argument("--peers", default=",".join(d.peers), help="peer methods to score (comma list)")
    g.add_argument("--ga-steps", type=int, default=d.ga_steps, help="gradient-ascent steps")
    g.add_argument("--if-damping", type=float, default=d.if_damping)
    g.add_argument("--if-curvature", default=d.if_curvature, help="abs | damped")
    g.add_argument("--skip-quality", action="store_true", help="skip label noise and data removal")
    g.add_argument("--noise-fraction", type=float, default=d.noise_fraction)
    g.add_argument("--noise-kind", default=d.noise_kind, help="pair (y -> y+1) | uniform")
    g.add_argument("--quality-peers", default=",".join(d.quality_peers), help="peers ranked on noisy data")
    g.add_argument("--remove-fractions", default=",".join(str(f) for f in d.remove_fractions))
    g.add_argument("--random-repeats", type=int, default=d.random_repeats)
    g.add_argument("--bench-seed", type=int, default=d.seed, help="seed of unit sample, masks, noise")
    g.add_argument("--no-plots", action="store_true")


def cmd_bench_fidelity(a: argparse.Namespace) -> int:
    from ddm_ray.bench.fidelity import BenchConfig, run_fidelity

    cfg, exe = configs_from_args(a)

    def names(text: str) -> tuple[str, ...]:
        return tuple(t.strip() for t in text.split(",") if t.strip())

    try:
        fractions = tuple(float(t) for t in names(a.remove_fractions))
    except ValueError:
        raise ConfigError(f"--remove-fractions: expected numbers like 0.01,0.1, got {a.remove_fractions!r}") from None
    bench = BenchConfig(
        units=a.units, masks=a.masks, fit_masks=a.fit_masks, alpha=a.alpha, ridge=a.ridge,
        peers=names(a.peers), ga_steps=a.ga_steps, if_damping=a.if_damping, if_curvature=a.if_curvature,
        skip_quality=a.skip_quality, noise_fraction=a.noise_fraction, noise_kind=a.noise_kind,
        quality_peers=names(a.quality_peers), remove_fractions=fractions,
        random_repeats=a.random_repeats, seed=a.bench_seed,
    )
    r = run_fidelity(
        cfg, bench, a.out, engine=exe.engine, num_cpus=exe.num_cpus, storage_options=exe.storage_options,
        plots=not a.no_plots, log=_logger(a.quiet),
    )
    print(open(os.path.join(a.out, "report.md")).read())
    print(f"wrote {a.out}/fidelity.json and report.md ({r['timings_seconds']['total']:.0f}s)")
    return 0


def add_scaling_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `ddm-ray bench scaling` (the run options above fix model, training and DDM)."""
    from ddm_ray.bench.scaling import ScalingConfig

    d = ScalingConfig()
    g = p.add_argument_group("scaling benchmark")
    g.add_argument("--unit-counts", type=_shape, default=d.units, help="unit counts U, e.g. 100,300,1000")
    g.add_argument("--synthetic-train", type=int, default=d.train, help="synthetic training samples")
    g.add_argument("--synthetic-test", type=int, default=d.test, help="synthetic test samples")
    g.add_argument("--synthetic-features", type=int, default=d.features, help="synthetic input features")
    g.add_argument("--validate-units", type=int, default=d.validate_units, help="units retrained exactly per U")
    g.add_argument("--no-plots", action="store_true")


def cmd_bench_scaling(a: argparse.Namespace) -> int:
    from ddm_ray.bench.scaling import ScalingConfig, run_scaling

    cfg, exe = configs_from_args(a)
    bench = ScalingConfig(
        units=tuple(a.unit_counts), train=a.synthetic_train, test=a.synthetic_test,
        features=a.synthetic_features, validate_units=a.validate_units, seed=cfg.train.seed,
    )
    os.makedirs(a.out, exist_ok=True)
    run_scaling(cfg, bench, a.out, engine=exe.engine, num_cpus=exe.num_cpus, plots=not a.no_plots, log=_logger(a.quiet))
    print(open(os.path.join(a.out, "report.md")).read())
    print(f"wrote {a.out}/scaling.json and report.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ddm-ray", description="Distilled Datamodel attribution: which training data drive which predictions.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="offline distillation + online leave-one-out rows into --out")
    add_run_arguments(r)
    r.set_defaults(func=cmd_run)
    v = sub.add_parser("validate", help="compare a run's rows with exact leave-one-out retraining")
    v.add_argument("--out", default="./ddm-out")
    v.add_argument("--units", type=int, help="retrain for N units (deterministic sample; default all)")
    v.add_argument("--seed", type=int, default=0, help="seed of the unit sample")
    v.add_argument("--engine", default="ray", choices=("ray", "local"), help="retrain on Ray tasks or in-process")
    v.add_argument("--num-cpus", type=int, help="CPUs for a local Ray runtime")
    v.add_argument("--storage-option", type=_kv, action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--storage-options-file", metavar="PATH", help="key=value lines (credentials go here)")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=cmd_validate)
    i = sub.add_parser("inspect", help="most helpful and harmful units for one test sample")
    i.add_argument("--out", default="./ddm-out")
    i.add_argument("--test-id", type=int, required=True)
    i.add_argument("--objective", default="loss")
    i.add_argument("--top", type=int, default=5)
    i.add_argument("--storage-option", type=_kv, action="append", default=[], metavar="KEY=VALUE")
    i.add_argument("--storage-options-file", metavar="PATH", help="key=value lines (credentials go here)")
    i.set_defaults(func=cmd_inspect)
    b = sub.add_parser("bench", help="benchmarks: fidelity against exact retraining and peer methods")
    bsub = b.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    bf = bsub.add_parser("fidelity", help="DDM and peers vs exact retraining; LDS; label noise; data removal")
    add_run_arguments(bf)
    add_bench_arguments(bf)
    bf.set_defaults(func=cmd_bench_fidelity, out="./bench-out")
    bs = bsub.add_parser("scaling", help="whole-run cost vs retraining every unit as the number of units grows")
    add_run_arguments(bs)
    add_scaling_arguments(bs)
    bs.set_defaults(func=cmd_bench_scaling, out="./bench-scaling", epochs=10)
    return p


def choose_ray_auth(address: str | None) -> None:
    """Before anything imports Ray (it reads the mode once): a runtime this command starts for
    itself uses token auth, since Ray 2.60 listens on every interface; joining a cluster keeps
    auth disabled unless RAY_AUTH_MODE says otherwise."""
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "disabled" if (address or os.environ.get("RAY_ADDRESS")) else "token"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    choose_ray_auth(getattr(a, "address", None))
    try:
        return int(a.func(a))
    except DDMError as e:
        print(f"ddm-ray: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ddm-ray: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`ddm-ray bench fidelity|scaling`: the benchmarks, with the run options fixing data, model and DDM."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ddm_ray.cli.common import _logger, _Parser, _shape
from ddm_ray.cli.run import add_run_arguments, configs_from_args
from ddm_ray.errors import ConfigError


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `ddm-ray bench fidelity` (the run options above fix data, model and DDM)."""
    from ddm_ray.bench.config import BenchConfig

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
    from ddm_ray.bench.config import ScalingConfig

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


def register(sub: Any) -> None:
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

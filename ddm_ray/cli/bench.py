"""`ddm-ray bench fidelity|scaling`: the benchmarks, with the run options fixing data, model and DDM."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ddm_ray.cli.common import _logger, _Parser
from ddm_ray.cli.options import add_options, dataclass_from_args
from ddm_ray.cli.run import add_run_arguments, configs_from_args
from ddm_ray.config import RunConfig
from ddm_ray.errors import ConfigError


def _ddm_only(cfg: RunConfig, what: str) -> None:
    if cfg.online.method != "ddm":
        raise ConfigError(f"bench {what} measures DDM against exact retraining; --method {cfg.online.method} does not apply")


def cmd_bench_fidelity(a: argparse.Namespace) -> int:
    from ddm_ray.bench.config import BenchConfig
    from ddm_ray.bench.fidelity import run_fidelity

    cfg, exe = configs_from_args(a)
    _ddm_only(cfg, "fidelity")
    bench = dataclass_from_args(BenchConfig, a)
    r = run_fidelity(
        cfg, bench, a.out, engine=exe.engine, num_cpus=exe.num_cpus, storage_options=exe.storage_options,
        plots=not a.no_plots, log=_logger(a.quiet),
    )
    print(open(os.path.join(a.out, "report.md")).read())
    print(f"wrote {a.out}/fidelity.json and report.md ({r['timings_seconds']['total']:.0f}s)")
    return 0


def cmd_bench_scaling(a: argparse.Namespace) -> int:
    from ddm_ray.bench.config import ScalingConfig
    from ddm_ray.bench.scaling import run_scaling

    cfg, exe = configs_from_args(a)
    _ddm_only(cfg, "scaling")
    bench = dataclass_from_args(ScalingConfig, a, seed=cfg.train.seed)
    os.makedirs(a.out, exist_ok=True)
    run_scaling(cfg, bench, a.out, engine=exe.engine, num_cpus=exe.num_cpus, plots=not a.no_plots, log=_logger(a.quiet))
    print(open(os.path.join(a.out, "report.md")).read())
    print(f"wrote {a.out}/scaling.json and report.md")
    return 0


def _add(p: argparse.ArgumentParser, klass: type, title: str) -> None:
    add_run_arguments(p)
    add_options(p, {"bench": klass}, {"bench": title})
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")


def register(sub: Any) -> None:
    from ddm_ray.bench.config import BenchConfig, ScalingConfig  # dataclasses only: no torch

    b = sub.add_parser("bench", help="benchmarks: fidelity against exact retraining and peer methods")
    bsub = b.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    bf = bsub.add_parser("fidelity", help="DDM and peers vs exact retraining; LDS; label noise; data removal")
    _add(bf, BenchConfig, "fidelity benchmark")
    bf.set_defaults(func=cmd_bench_fidelity, out="./bench-out")
    bs = bsub.add_parser("scaling", help="whole-run cost vs retraining every unit as the number of units grows")
    _add(bs, ScalingConfig, "scaling benchmark")
    bs.set_defaults(func=cmd_bench_scaling, out="./bench-scaling", epochs=10)

"""`ddm-ray validate`: compare a run's rows with exact leave-one-out retraining."""

from __future__ import annotations

import argparse
from typing import Any

from ddm_ray.cli.common import _logger, add_storage_arguments, storage_options_from_args
from ddm_ray.errors import ConfigError


def cmd_validate(a: argparse.Namespace) -> int:
    from ddm_ray.validate import print_validation, validate_run

    if a.units is not None and a.units < 1:
        raise ConfigError("--units must be >= 1")
    report = validate_run(
        a.out, a.units, a.seed, storage_options_from_args(a), log=_logger(a.quiet), engine=a.engine, num_cpus=a.num_cpus
    )
    print_validation(report)
    return 0


def register(sub: Any) -> None:
    v = sub.add_parser("validate", help="compare a run's rows with exact leave-one-out retraining")
    v.add_argument("--out", default="./ddm-out")
    v.add_argument("--units", type=int, help="retrain for N units (deterministic sample; default all)")
    v.add_argument("--seed", type=int, default=0, help="seed of the unit sample")
    v.add_argument("--engine", default="ray", choices=("ray", "local"), help="retrain on Ray tasks or in-process")
    v.add_argument("--num-cpus", type=int, help="CPUs for a local Ray runtime")
    add_storage_arguments(v)
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=cmd_validate)

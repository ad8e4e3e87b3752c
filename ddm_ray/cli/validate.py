"""`ddm-ray validate`: compare a run's rows with exact leave-one-out retraining."""

from __future__ import annotations

import argparse
from typing import Any

from ddm_ray.cli.common import _logger, add_reader_arguments, add_storage_arguments, storage_options_from_args
from ddm_ray.config import MAX_CPUS
from ddm_ray.errors import ConfigError


def cmd_validate(a: argparse.Namespace) -> int:
    from ddm_ray.validate import print_validation, validate_run

    if a.units is not None and a.units < 1:
        raise ConfigError("--units must be >= 1")
    if a.num_cpus is not None and not 1 <= a.num_cpus <= MAX_CPUS:
        raise ConfigError(f"--num-cpus must be in [1, {MAX_CPUS}]")
    if a.noise_seeds < 0 or a.noise_seeds > 16:
        raise ConfigError("--noise-seeds must be in [0, 16]")
    if a.run is not None and a.out is not None and a.run.rstrip("/") != a.out.rstrip("/"):
        raise ConfigError(f"two run folders given ({a.run!r} and --out {a.out!r}); give one")
    folder = a.run or a.out or "./ddm-out"
    report = validate_run(
        folder, a.units, a.seed, storage_options_from_args(a), log=_logger(a.quiet), engine=a.engine, num_cpus=a.num_cpus,
        noise_seeds=a.noise_seeds, model=a.model, train=a.train, test=a.test, data_root=a.data_root,
    )
    print_validation(report)
    return 0


def register(sub: Any) -> None:
    v = sub.add_parser("validate", help="compare a run's rows with exact leave-one-out retraining")
    v.add_argument("run", nargs="?", metavar="RUN", help="the run folder or URL (default ./ddm-out)")
    v.add_argument("--out", help="the run folder, as given to `ddm-ray run --out` (same as RUN)")
    v.add_argument("--units", type=int, help="retrain for N units (deterministic sample; default all)")
    v.add_argument("--seed", type=int, default=0, help="seed of the unit sample")
    v.add_argument("--noise-seeds", type=int, default=0,
                   help="also retrain the units under N other seeds: the noise ceiling (default 0: off)")
    add_reader_arguments(v, model=True)
    v.add_argument("--engine", default="ray", choices=("ray", "local"), help="retrain on Ray tasks or in-process")
    v.add_argument("--num-cpus", type=int, help="CPUs for a local Ray runtime")
    add_storage_arguments(v)
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=cmd_validate)

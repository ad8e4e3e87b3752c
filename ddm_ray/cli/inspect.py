"""`ddm-ray inspect RUN`: from a result back to the units and samples behind it.

    ddm-ray inspect RUN --test-id 17        # its context, the units that help and hurt it most
    ddm-ray inspect RUN --unit 3            # label, size, every member, the tests it moves most
    ddm-ray inspect RUN --unit annotator-5  # the same, by the unit's name (units.parquet `name`)
    ddm-ray inspect RUN --worst-tests 20    # misclassified first, then the highest-loss correct ones

The computing lives in `ddm_ray.inspect` (imported inside the command, so `--help` stays fast).
"""

from __future__ import annotations

import argparse
from typing import Any

from ddm_ray.cli.common import add_storage_arguments, storage_options_from_args
from ddm_ray.errors import ConfigError


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= v <= 1_000_000:
        raise argparse.ArgumentTypeError(f"expected a positive integer (at most 1000000), got {text!r}")
    return v


def run_folder(a: argparse.Namespace) -> str:
    """The run folder from RUN or --out: one of them, or both the same."""
    if a.run is None and a.out is None:
        raise ConfigError("name the run folder: ddm-ray inspect RUN (or --out RUN)")
    if a.run is not None and a.out is not None and a.run.rstrip("/") != a.out.rstrip("/"):
        raise ConfigError(f"two run folders given ({a.run!r} and --out {a.out!r}); give one")
    return a.run if a.run is not None else a.out


def cmd_inspect(a: argparse.Namespace) -> int:
    chosen = [flag for flag, v in (("--test-id", a.test_id), ("--unit", a.unit), ("--worst-tests", a.worst_tests))
              if v is not None]
    if not chosen:
        raise ConfigError("say what to inspect: --test-id N, --unit U or --worst-tests K")
    out = run_folder(a)

    from ddm_ray import inspect
    from ddm_ray.api import open_run

    run = open_run(out, storage_options_from_args(a))
    if a.test_id is not None:
        report = inspect.test_report(run, a.test_id, a.objective, a.top)
    elif a.unit is not None:
        report = inspect.unit_report(run, a.unit, a.objective, a.top)
    else:
        report = inspect.worst_tests(run, a.worst_tests, a.objective)
    print(inspect.FORMATTERS[a.format](report))
    return 0


def register(sub: Any) -> None:
    i = sub.add_parser("inspect", help="drill down: a test sample's units, a unit's members, the worst tests",
                       description="Drill down into a complete run: one test sample (--test-id), one unit "
                                   "(--unit) or the worst test samples (--worst-tests).")
    i.add_argument("run", nargs="?", metavar="RUN", help="the run folder (local path or fsspec URL)")
    i.add_argument("--out", help="the run folder, as given to `ddm-ray run --out` (instead of RUN)")
    what = i.add_mutually_exclusive_group()
    what.add_argument("--test-id", type=int, metavar="N", help="one test sample: context, most helpful and harmful units")
    what.add_argument("--unit", metavar="U", help="one unit, by id or by name (e.g. annotator-5, or 3/0 for class 3's "
                                                  "first cluster): label, size, members, the test samples it moves most")
    what.add_argument("--worst-tests", type=_positive, metavar="K",
                      help="the K worst test samples: misclassified (highest loss first), then highest-loss correct")
    i.add_argument("--objective", help="loss (default), margin or correct: one of the run's objectives")
    i.add_argument("--top", type=_positive, default=5, metavar="K", help="units or test samples per direction (default 5)")
    i.add_argument("--format", choices=("table", "json", "csv"), default="table",
                   help="table (default), json (one document) or csv (header and rows, for piping)")
    add_storage_arguments(i)
    i.set_defaults(func=cmd_inspect)

"""`ddm-ray report`: a self-contained HTML page over a finished run (see ddm_ray/report.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ddm_ray.cli.common import _logger, add_reader_arguments, add_storage_arguments, storage_options_from_args
from ddm_ray.errors import ConfigError


def cmd_report(a: argparse.Namespace) -> int:
    if a.run and a.out and a.run != a.out:
        raise ConfigError(f"two run folders given ({a.run} and --out {a.out}); give one")
    if not (1 <= a.top <= 10_000 and 1 <= a.max_tests <= 10_000):
        raise ConfigError("--top and --max-tests must be in [1, 10000]")
    from ddm_ray.report import write_report

    warnings: list[str] = []
    index = write_report(
        a.run or a.out or "./ddm-out",
        report_out=a.report_out,
        test_ids=a.test_id or None,
        objective=a.objective,
        top=a.top,
        max_tests=a.max_tests,
        storage_options=storage_options_from_args(a),
        log=_logger(a.quiet),
        train=a.train,
        test=a.test,
        data_root=a.data_root,
        warnings_out=warnings,
    )
    for w in warnings:
        print(f"ddm-ray: warning: {w}", file=sys.stderr)
    print(index)
    return 0


def register(sub: Any) -> None:
    r = sub.add_parser("report", help="write an HTML report of a finished run (test samples, units, samples)")
    r.add_argument("run", nargs="?", metavar="RUN", help="run folder or URL (default ./ddm-out)")
    r.add_argument("--out", help="the run folder, as the other commands name it (same as RUN)")
    r.add_argument("--report-out", metavar="DIR",
                   help="local folder for index.html and its PNGs (default RUN/report; required for s3:// runs)")
    r.add_argument("--test-id", type=int, action="append", default=[], metavar="N",
                   help="show this test sample (repeatable; default: misclassified first, then highest loss)")
    r.add_argument("--objective", default="loss", help="loss | margin | correct (default loss)")
    r.add_argument("--top", type=int, default=5, help="helpful and harmful units shown per test sample")
    r.add_argument("--max-tests", type=int, default=12, help="test samples shown when no --test-id is given")
    add_reader_arguments(r, model=False)
    add_storage_arguments(r)
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_report)

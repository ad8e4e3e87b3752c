"""`ddm-ray inspect`: from a result back to the units and samples behind it."""

from __future__ import annotations

import argparse
from typing import Any

from ddm_ray.cli.common import add_storage_arguments, storage_options_from_args


def cmd_inspect(a: argparse.Namespace) -> int:
    from ddm_ray.inspect import inspect_test_sample

    print(inspect_test_sample(a.out, a.test_id, a.objective, a.top, storage_options_from_args(a)))
    return 0


def register(sub: Any) -> None:
    i = sub.add_parser("inspect", help="most helpful and harmful units for one test sample")
    i.add_argument("--out", default="./ddm-out")
    i.add_argument("--test-id", type=int, required=True)
    i.add_argument("--objective", default="loss")
    i.add_argument("--top", type=int, default=5)
    add_storage_arguments(i)
    i.set_defaults(func=cmd_inspect)

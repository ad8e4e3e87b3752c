"""`ddm-ray` command line: run, validate, inspect, bench. The only place (with jobs/) that parses
arguments; everything below takes config objects. User errors print one line and exit non-zero.

One module per subcommand, each with `register(subparsers)`; building the parser imports no torch
or Ray, so every `--help` is fast. Heavy modules are imported inside the commands.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import ddm_ray
from ddm_ray.cli import bench, inspect, report, run, validate
from ddm_ray.cli.common import _Parser, choose_ray_auth
from ddm_ray.cli.run import add_run_arguments, configs_from_args
from ddm_ray.errors import DDMError

__all__ = ["main", "build_parser", "add_run_arguments", "configs_from_args", "choose_ray_auth"]


def build_parser() -> _Parser:
    p = _Parser(prog="ddm-ray", description="Distilled Datamodel attribution: which training data drive which predictions.")
    p.add_argument("--version", action="version", version=f"ddm-ray {ddm_ray.__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (run, validate, inspect, report, bench):
        module.register(sub)
    return p


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


"""`ddm-ray` command line: run, validate, inspect, bench. The only place (with jobs/) that parses
arguments; everything below takes config objects. User errors print one line and exit non-zero.

One module per subcommand, each with `register(subparsers)`; building the parser imports no torch
or Ray, so every `--help` is fast. Heavy modules are imported inside the commands.
"""

from __future__ import annotations

import os
import signal
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


def one_line(text: str) -> str:
    """text as one printable line: a message may quote values from a run folder anyone could
    write (a manifest's config), so line breaks and other control characters are escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, `ray job stop` and orchestrators send), raised in the main thread
    like SIGINT's KeyboardInterrupt, so that the same unwinding releases the lease."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the unwinding
    raise Terminated


def _catch_sigterm() -> object | None:
    """Install the SIGTERM handler (main thread only); returns the previous one to restore."""
    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    choose_ray_auth(getattr(a, "address", None))
    resume = "; rerun with --resume to finish" if getattr(a, "command", None) == "run" else ""
    previous = _catch_sigterm()
    try:
        return int(a.func(a))
    except DDMError as e:
        print(f"ddm-ray: error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print(f"ddm-ray: terminated (SIGTERM){resume}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"ddm-ray: interrupted{resume}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]


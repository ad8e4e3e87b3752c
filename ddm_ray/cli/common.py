"""Pieces every subcommand shares: the one-line-error parser, storage options, logging, Ray auth.

Nothing here imports torch or Ray: `ddm-ray --help` must stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ddm_ray.errors import ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        sys.stderr.write(f"ddm-ray: error: {message}\n")
        raise SystemExit(2)


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def add_storage_arguments(p: argparse.ArgumentParser) -> None:
    """--storage-option KEY=VALUE (no credentials) and --storage-options-file PATH."""
    p.add_argument("--storage-option", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="s3fs option, e.g. endpoint_url=http://127.0.0.1:9000 (no credentials here: "
                        "use AWS_* variables or --storage-options-file)")
    p.add_argument("--storage-options-file", metavar="PATH",
                   help="key=value lines of storage options, credentials included (kept out of argv)")


def add_reader_arguments(p: argparse.ArgumentParser, model: bool) -> None:
    """What a reader of a finished run takes from its caller rather than from the run folder
    (`ddm_ray.readers`): the user model's factory and the data locations."""
    if model:
        p.add_argument("--model", metavar="MODULE:FACTORY",
                       help="the run's user model (required for a run trained on one: a run folder never makes "
                            "ddm-ray import code); checked against the run's model fingerprint")
    p.add_argument("--train", metavar="URL", help="the run's training Parquet (default: the location its manifest "
                                                  "records, logged); checked against its data fingerprint")
    p.add_argument("--test", metavar="URL", help="the run's test Parquet (with --train)")
    p.add_argument("--data-root", metavar="DIR", help="the run's MNIST / CIFAR-10 folder (default: as recorded, logged)")


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


def setup_logging(quiet: bool) -> None:
    """Once per command: the `ddm_ray` loggers write `[ddm-ray HH:MM:SS] message` lines to stderr,
    INFO and up (progress included), or WARNING and up with --quiet."""
    import logging

    from ddm_ray.engine.progress import configure_logging

    configure_logging(logging.WARNING if quiet else logging.INFO)


def _logger(quiet: bool) -> Callable[[str], None]:
    """Configure logging (`setup_logging`) and return the `log(msg)` callable a run takes: an INFO
    line of the `ddm_ray.cli` logger."""
    import logging

    setup_logging(quiet)
    return logging.getLogger("ddm_ray.cli").info


def choose_ray_auth(address: str | None) -> None:
    """Before anything imports Ray: RAY_AUTH_MODE as `engine.runtime.choose_ray_auth` decides it
    (token for a runtime this command starts, disabled when joining a cluster)."""
    from ddm_ray.engine.runtime import choose_ray_auth as decide

    decide(address)

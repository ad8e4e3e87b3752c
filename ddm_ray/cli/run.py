"""`ddm-ray run`: options of a run (shared with jobs/audit.py), their configs, and the command."""

from __future__ import annotations

import argparse
from typing import Any

from ddm_ray.cli.common import _logger, add_storage_arguments, storage_options_from_args
from ddm_ray.cli.options import (
    add_help_all,
    add_options,
    build_configs,
    given_options,
    read_toml,
    values_from_toml,
)
from ddm_ray.config import ExecConfig, RunConfig

DEFAULT_OUT = "./ddm-out"


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options of a run (shared by `ddm-ray run`, the benchmarks and jobs/audit.py): generated from
    the config dataclasses (`ddm_ray.cli.options`), plus where the rows go and how to reach Ray."""
    p.add_argument("--config", metavar="FILE",
                   help="TOML file with [data] [model] [train] [units] [distill] [online] [exec] tables "
                        "(and top-level out, address); flags given override it")
    add_options(p)
    g = p.add_argument_group("output and cluster")
    g.add_argument("--out", default=None, help="output folder or URL (file://, s3://) (default: ./ddm-out)")
    g.add_argument("--address", help="Ray address (default: start a local runtime or use RAY_ADDRESS)")
    add_storage_arguments(g)
    g.add_argument("--quiet", action="store_true", help="no progress output")
    add_help_all(p)


def configs_from_args(a: argparse.Namespace) -> tuple[RunConfig, ExecConfig]:
    """Validated configs from the defaults, the --config file and the flags given (in that order);
    fills a.out and a.address from the file when the flags did not give them. Raises ConfigError."""
    file_values: dict[tuple[str, str], Any] = {}
    top: dict[str, Any] = {}
    if getattr(a, "config", None):
        file_values, top = values_from_toml(read_toml(a.config), a.config)
    a.out = getattr(a, "out", None) or top.get("out") or DEFAULT_OUT
    a.address = getattr(a, "address", None) or top.get("address")
    return build_configs(given_options(a), file_values, storage_options_from_args(a))


def next_steps(a: argparse.Namespace, exe: ExecConfig) -> list[str]:
    """The commands to run next on this run's folder, with the storage flags it was read with (a
    credentials file by its path only) and `--engine local` for validate when the run used it."""
    import shlex

    out = shlex.quote(a.out)
    storage = "".join(f" --storage-option {shlex.quote(f'{k}={v}')}" for k, v in (a.storage_option or []))
    if a.storage_options_file:
        storage += f" --storage-options-file {shlex.quote(a.storage_options_file)}"
    engine = " --engine local" if exe.engine == "local" else ""
    local = "://" not in a.out or a.out.startswith("file://")
    rows = [
        (f"ddm-ray validate {out}{engine}{storage}", "exact leave-one-out retraining vs these rows (--units N: a sample)"),
        (f"ddm-ray inspect {out} --worst-tests 5{storage}", "the worst test samples and the unit hurting each most"),
        (f"ddm-ray report {out}{storage}", f"an HTML page: {a.out.rstrip('/')}/report/index.html") if local else
        (f"ddm-ray report {out} --report-out ./report{storage}", "an HTML page in the local folder ./report"),
    ]
    width = max(len(cmd) for cmd, _ in rows)
    return ["next steps:", *(f"  {cmd:<{width}}  # {why}" for cmd, why in rows)]


def check_local_inputs(cfg: RunConfig) -> None:
    """A missing local Parquet input fails in one line before Ray starts (seconds, not a runtime's
    start-up); URLs are left to the reader, which says the same."""
    import os

    from ddm_ray.errors import InputError

    for path in (cfg.data.train, cfg.data.test):
        if path and ("://" not in path or path.startswith("file://")):
            local = path.removeprefix("file://")
            if not os.path.exists(local):
                raise InputError(f"{path}: no such file")


def cmd_run(a: argparse.Namespace) -> int:
    from ddm_ray.engine import run_with_engine

    cfg, exe = configs_from_args(a)
    check_local_inputs(cfg)
    manifest = run_with_engine(cfg, exe, a.out, address=a.address, log=_logger(a.quiet), progress=not a.quiet)
    c = manifest["counts"]
    print(
        f"complete: {c['units']} units x {c['test_samples']} test samples x {c['objectives']} "
        f"objectives -> {a.out} (config {manifest['config_hash']}, {manifest['timings_seconds']['total']:.1f}s)"
    )
    print("\n".join(next_steps(a, exe)))
    from ddm_ray.advice import run_warnings

    for w in run_warnings(manifest):
        print(f"warning: {w}")
    return 0


def register(sub: Any) -> None:
    r = sub.add_parser("run", help="offline distillation + online leave-one-out rows into --out")
    add_run_arguments(r)
    r.set_defaults(func=cmd_run)

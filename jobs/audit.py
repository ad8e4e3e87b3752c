"""Full audit (offline + online) as a Ray job, on the cluster the job was submitted to:

    ray job submit --working-dir . -- python jobs/audit.py --out s3://bucket/run [run options]

Takes the options of `ddm-ray run`. Inside a job RAY_ADDRESS is set, so the driver joins the
existing cluster. Prints a one-line error and exits non-zero on bad input or a failed run, which
`ray job submit` reports as a failed job.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working dir

from ddm_ray.cli.common import _logger, _Parser
from ddm_ray.cli.run import add_run_arguments, configs_from_args  # noqa: E402
from ddm_ray.errors import DDMError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="jobs/audit.py", description="DDM audit as a Ray job: offline + online rows into --out")
    add_run_arguments(p)
    a = p.parse_args(argv)
    from ddm_ray.cli.common import choose_ray_auth

    choose_ray_auth(a.address)
    try:
        from ddm_ray.engine import run_with_engine

        cfg, exe = configs_from_args(a)
        address = a.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
        manifest = run_with_engine(cfg, exe, a.out, address=address, log=_logger(a.quiet), progress=not a.quiet)
    except DDMError as e:
        print(f"audit: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("audit: interrupted", file=sys.stderr, flush=True)
        return 130
    c = manifest["counts"]
    print(f"audit complete: {c['rows']} rows ({c['units']} units x {c['objectives']} objectives) -> {a.out} "
          f"(config {manifest['config_hash']})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

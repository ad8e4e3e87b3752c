"""Full audit (offline + online) as a Ray job, on the cluster the job was submitted to:

    ray job submit --working-dir . -- python jobs/audit.py --out s3://bucket/run [run options]

The same entry point as `ddm-ray run` (same options, --config FILE included). Inside a job
RAY_ADDRESS is set, so the driver joins the existing cluster; user models (`--model pkg.mod:factory`)
travel with the job's --working-dir. Bad input or a failed run prints one line and exits non-zero,
which `ray job submit` reports as a failed job.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working dir

from ddm_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["run", *sys.argv[1:]]))

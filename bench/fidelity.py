"""Fidelity and data-quality benchmark: `python bench/fidelity.py [options]`.

Same as `ddm-ray bench fidelity [options]` (see `ddm-ray bench fidelity --help`); the logic lives in
ddm_ray/bench/fidelity.py. Default: METHOD.md's digits benchmark, results in ./bench-out.
"""

import sys

from ddm_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "fidelity", *sys.argv[1:]]))

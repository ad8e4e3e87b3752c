"""Scaling benchmark: `python bench/scaling.py [options]`.

Same as `ddm-ray bench scaling [options]` (see `ddm-ray bench scaling --help`); the logic lives in
ddm_ray/bench/scaling.py. Default: 10,000 x 256 synthetic data, MLP, 10 epochs, U = 100, 300, 1000.
"""

import sys

from ddm_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "scaling", *sys.argv[1:]]))

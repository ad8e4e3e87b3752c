"""Write digits as a Hugging Face-style image Parquet and the README's GroupNorm CNN, for the
user-model fidelity reference in bench/fidelity-user-cnn/:

    python bench/digits_png_parquet.py /tmp/hfb
    cd /tmp/hfb && ddm-ray bench fidelity --engine local --train train.parquet --test test.parquet \\
        --x-column image --y-column label --model mymodels:build --peers gradient_ascent,unrolled \\
        --masks 0 --skip-quality --out ./bench

Columns: image = {bytes: PNG, path}, label = the digit's English name (string labels), id; the
split is the built-in digits split (1200 train / 597 test).
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from sklearn.datasets import load_digits

NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("(`mymodels.py`):")
    block = re.compile(r"```python\n(.*?)```", re.S).search(readme, start)
    assert block is not None
    (out / "mymodels.py").write_text(block.group(1))
    d = load_digits()
    x, y = d.data / 16.0, d.target
    perm = np.random.default_rng(0).permutation(len(x))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray((a.reshape(8, 8) * 255).round().astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    for name, idx in (("train", perm[:1200]), ("test", perm[1200:])):
        cells = [{"bytes": png(x[i]), "path": f"{i}.png"} for i in idx]
        table = pa.table({"image": pa.array(cells, struct), "label": NAMES[y[idx]], "id": idx.astype(np.int64)})
        pq.write_table(table, out / f"{name}.parquet")
    print(f"wrote {out}/train.parquet, test.parquet and mymodels.py")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "./digits-png")

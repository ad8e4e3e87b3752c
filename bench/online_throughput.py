"""Online-stage throughput: Ray engine vs a plain in-process loop on the same cores, and driver
memory during the online stage for runs of growing size (a script, not a test).

    python bench/online_throughput.py [--units 2000 --num-cpus 2 --out bench/results]

The offline stage (training, units, synsets) runs once per size on the local engine; each engine
then recomputes only the online stage of that run (`--resume` after dropping the attribution parts),
so both compute exactly the same rows. Data: synthetic Gaussian blobs written to Parquet (64
features, 10 classes, 20 samples per unit), so the unit count is not capped by a small dataset.
Driver memory: peak RSS growth of the driver process while the online stage runs (sampled).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the driver's RSS every 20 ms; .growth is the peak above the starting value."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())
        self.growth = self.peak - self.start


def make_data(folder: Path, n_train: int, n_test: int, seed: int = 0) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (10, 64)).astype(np.float32)
    paths = []
    for name, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n) % 10
        x = np.clip(0.5 + 0.15 * (centers[y] + rng.normal(0, 1.5, (n, 64))), 0, 1).astype(np.float32)
        p = folder / f"{name}.parquet"
        pq.write_table(pa.table({"x": list(x), "y": y.astype(np.int64)}), p)
        paths.append(str(p))
    return paths[0], paths[1]


def measure(units: int, num_cpus: int, work: Path, block_units: int) -> dict[str, object]:
    import ray

    from ddm_ray.cli import build_parser, configs_from_args
    from ddm_ray.engine import run_with_engine
    from ddm_ray.store.run_store import RunStore

    k = units // 10
    train, test = make_data(work, n_train=units * 20, n_test=500)
    out = str(work / f"run-{units}")
    args = ["run", "--dataset", "parquet", "--train", train, "--test", test, "--epochs", "2",
            "--clusters-per-class", str(k), "--ipc", "1", "--distill-steps", "2", "--unroll-epochs", "1",
            "--block-units", str(block_units), "--device", "cpu", "--quiet", "--out", out]
    cfg, exe = configs_from_args(build_parser().parse_args(args))
    run_with_engine(cfg, exe, out, progress=False)  # offline once (local Ray for distillation)
    resume_cfg, resume_exe = configs_from_args(build_parser().parse_args([*args, "--resume"]))
    result: dict[str, object] = {"units": units}
    for engine in ("local", "ray"):
        RunStore(out).remove(RunStore.ATTRIBUTION)
        e = resume_exe.__class__(**{**resume_exe.__dict__, "engine": engine, "num_cpus": num_cpus})
        if engine == "ray":
            ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
                     logging_level="ERROR")
        try:
            with PeakRSS() as mem:
                m = run_with_engine(resume_cfg, e, out, progress=False)
        finally:
            if engine == "ray":
                ray.shutdown()
        rows = m["counts"]["rows_computed_this_session"]
        t = m["timings_seconds"]["online"]
        result[engine] = {"rows": rows, "online_s": t, "rows_per_s": round(rows / t, 1),
                          "driver_rss_growth_mib": round(mem.growth / 2**20, 1)}
    result["ray_overhead_pct"] = round(100 * (1 - result["ray"]["rows_per_s"] / result["local"]["rows_per_s"]), 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--units", type=int, nargs="+", default=[500, 2000], help="run sizes (multiples of 10)")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--block-units", type=int, default=64)
    p.add_argument("--results", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()
    import tempfile

    import torch

    torch.set_num_threads(1)  # the in-process loop: one core per Ray worker, the same as each task
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for u in a.units:
            w = Path(tmp) / str(u)
            w.mkdir()
            r = measure(u, a.num_cpus, w, a.block_units)
            print(json.dumps(r), flush=True)
            runs.append(r)
    report = {"bench": "online_throughput", "num_cpus": a.num_cpus, "block_units": a.block_units,
              "host": platform.node(), "cpu_count": os.cpu_count(), "runs": runs,
              "driver_peak_rss_mib_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(a.results).mkdir(parents=True, exist_ok=True)
    path = Path(a.results) / f"online_throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""`ddm-ray bench scaling`: the whole run's cost against retraining every unit, as units grow.

One synthetic dataset (default 10,000 train x 256 features, 10 classes, an MLP, 10 epochs) is
audited at several unit counts U (clusters per class = U / classes). For each U the bench records

* stage seconds of a complete run (train + units, distillation, online) and the peak resident
  memory of the process while it ran (sampled every 50 ms);
* exact leave-one-out retraining of a seeded subset of units (`ddm-ray validate`): fidelity
  (Pearson / Spearman of delta loss) and retraining seconds per unit;
* end_to_end_speedup = U x retrain seconds per unit / (offline + online seconds of the run).

It writes scaling.json, report.md and scaling.png (cost vs U for DDM and for retraining).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from ddm_ray.bench.config import ScalingConfig
from ddm_ray.config import DataConfig, ExecConfig, RunConfig, UnitConfig

_log = logging.getLogger(__name__)


def synthetic_data(cfg: ScalingConfig, folder: str) -> tuple[str, str]:
    """Write train/test Parquet files: Gaussian classes with overlap and 5% label noise, so that
    removing a unit changes predictions. Returns the two paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(cfg.seed)
    centres = rng.normal(0, 1, size=(cfg.classes, cfg.features)) / np.sqrt(cfg.features) * 3.0
    sub = rng.normal(0, 1, size=(cfg.classes, 4, cfg.features)) / np.sqrt(cfg.features) * 1.5

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, cfg.classes, size=n)
        mode = rng.integers(0, 4, size=n)
        x = centres[y] + sub[y, mode] + rng.normal(0, 1, size=(n, cfg.features)) / np.sqrt(cfg.features) * 2.0
        flip = rng.random(n) < 0.05
        y = np.where(flip, rng.integers(0, cfg.classes, size=n), y)
        return x.astype(np.float32), y.astype(np.int64)

    paths = []
    os.makedirs(folder, exist_ok=True)
    for name, n in (("train", cfg.train), ("test", cfg.test)):
        x, y = draw(n)
        table = pa.table({"x": pa.array(list(x), pa.list_(pa.float32())), "y": pa.array(y)})
        path = os.path.join(folder, f"{name}.parquet")
        pq.write_table(table, path)
        paths.append(path)
    return paths[0], paths[1]


def _rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; else the lifetime peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _PeakMemory:
    """Peak resident memory of this process while the block runs (sampled)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(interval_s)

    def __enter__(self) -> _PeakMemory:
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_scaling(
    base: RunConfig, bench: ScalingConfig, out: str, engine: str = "local", num_cpus: int | None = None,
    plots: bool = True, log: Any = None,
) -> dict[str, Any]:
    """Run the benchmark into the local folder out; returns what scaling.json holds."""
    from ddm_ray.engine import run_with_engine
    from ddm_ray.validate import validate_run

    log = log or _log.info
    train_path, test_path = synthetic_data(bench, os.path.join(out, "data"))
    rows = []
    for u in bench.units:
        k = u // bench.classes
        cfg = replace(
            base,
            data=DataConfig(dataset="parquet", train=train_path, test=test_path),
            units=replace(base.units, clusters_per_class=k, min_size=1) if isinstance(base.units, UnitConfig) else base.units,
        )
        run_out = os.path.join(out, f"run-u{u}-{cfg.hash()}")  # a folder per config: never refused
        log(f"U={k * bench.classes}: auditing ({k} clusters per class)")
        with _PeakMemory() as mem:
            manifest = run_with_engine(cfg, ExecConfig(engine=engine, num_cpus=num_cpus), run_out, log=log,
                                       progress=True)
        t = manifest["timings_seconds"]
        log(f"U={k * bench.classes}: exact retraining of {bench.validate_units} units")
        v = validate_run(run_out, bench.validate_units, bench.seed, {}, log=log, engine=engine, num_cpus=num_cpus)
        n_units = manifest["counts"]["units"]
        offline = float(t.get("train_and_units", 0.0)) + float(t.get("distill", 0.0))
        online = float(t.get("online", 0.0))
        retrain_all = n_units * v["retrain_seconds_per_unit"]
        row = {
            "units": n_units,
            "distillation": manifest.get("distillation"),
            "seconds": {"train_and_units": t.get("train_and_units"), "distill": t.get("distill"),
                        "distill_subspace": t.get("distill_subspace"), "online": online, "offline": offline,
                        "whole_run": offline + online},
            "peak_rss_mib": round(mem.peak / 2**20, 1),
            "validated_units": v["units_validated"],
            "pearson": v["pearson"],
            "spearman": v["spearman"],
            "gradient_ascent_pearson": v["per_objective"]["loss"]["gradient_ascent"]["pearson"],
            "retrain_seconds_per_unit": v["retrain_seconds_per_unit"],
            "retrain_all_seconds": retrain_all,
            "end_to_end_speedup": v["end_to_end_speedup"],
        }
        log(f"U={n_units}: offline {offline:.1f}s, online {online:.1f}s, retrain all {retrain_all:.0f}s "
            f"-> {row['end_to_end_speedup']:.1f}x; Pearson {row['pearson']:.3f}")
        rows.append(row)
    first = rows[0]["seconds"]["offline"]
    result = {
        "bench": asdict(bench),
        "config": base.to_dict(),
        "rows": rows,
        "offline_ratio_largest_to_smallest": rows[-1]["seconds"]["offline"] / first if first > 0 else None,
    }
    if plots:
        result["plot"] = _plot(out, rows)
    with open(os.path.join(out, "scaling.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(render_report(result))
    return result


def _plot(out: str, rows: list[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = [r["units"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot(u, [r["retrain_all_seconds"] for r in rows], "o-", label="exact retraining of every unit")
    ax.plot(u, [r["seconds"]["whole_run"] for r in rows], "s-", label="DDM whole run (offline + online)")
    ax.plot(u, [r["seconds"]["offline"] for r in rows], "^--", label="DDM offline only")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("units U")
    ax.set_ylabel("seconds")
    ax.set_title("cost vs number of units (retraining: measured per unit x U)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scaling.png"), dpi=110)
    plt.close(fig)
    return "scaling.png"


def render_report(r: dict[str, Any]) -> str:
    b = r["bench"]
    lines = [
        "# Scaling: DDM's whole run vs retraining every unit",
        "",
        f"Synthetic data: {b['train']} train x {b['features']} features, {b['classes']} classes, {b['test']} test. "
        f"Fidelity: Δ loss vs exact leave-one-out on {b['validate_units']} seeded units per U.",
        "",
        "| U | train+units s | distill s | online s | whole run s | retrain all s | end-to-end speed-up | peak RSS MiB | Pearson | Spearman |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        s = row["seconds"]
        lines.append(
            f"| {row['units']} | {s['train_and_units']:.1f} | {s['distill']:.1f} | {s['online']:.1f} | "
            f"{s['whole_run']:.1f} | {row['retrain_all_seconds']:.0f} | {row['end_to_end_speedup']:.1f}x | "
            f"{row['peak_rss_mib']:.0f} | {row['pearson']:.3f} | {row['spearman']:.3f} |"
        )
    ratio = r.get("offline_ratio_largest_to_smallest")
    if ratio is not None:
        lines += ["", f"Offline seconds at the largest U / at the smallest U: {ratio:.2f}."]
    return "\n".join(lines) + "\n"

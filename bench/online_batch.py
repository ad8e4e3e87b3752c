"""Benchmark (not a test): online-stage rows/s against the number of units fine-tuned per pass.

For each model and each online batch B, evaluates U units (synsets weighting a shared pool of
--pool synthetic samples, as the default basis distillation ships them) over
N test samples with `core.online.evaluate_units` and reports rows/s (one row = one unit and one
objective, 3 objectives), the ratio to B = 1, and peak memory (CPU: max RSS of a fresh
subprocess per configuration; CUDA: torch.cuda.max_memory_allocated). On CUDA it also reports the
achieved TFLOP/s (forward + fine-tune FLOPs counted by torch's FlopCounterMode) and the fidelity
cost of bf16/TF32 against fp32 on the same units.

    python bench/online_batch.py                       # CPU: mlp and convnet on digits shapes
    python bench/online_batch.py --device cuda --shape 1,28,28 --n-test 10000 --units 2048 \
        --batches 1,64,256,1024 --precisions fp32,tf32,bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from ddm_ray.config import ModelConfig
from ddm_ray.core.metrics import pearson
from ddm_ray.core.models import Network
from ddm_ray.core.online import evaluate_units
from ddm_ray.core.synset import Synset

NAMES = ("loss", "margin", "correct")
PEAK_TFLOPS = {"H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}, "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}}


def _setup(arch: str, shape: tuple[int, ...], units: int, n_test: int, pool: int, dev: torch.device):
    torch.manual_seed(0)
    net = Network(ModelConfig(arch=arch), shape, 10)
    net.module.to(dev)
    final = {k: v.to(dev) for k, v in net.init_params(0).items()}
    syn = Synset(
        torch.arange(units), torch.rand(pool, *shape, device=dev),
        torch.softmax(torch.randn(pool, 10, device=dev), -1), torch.randn(units, pool, device=dev) * 0.01,
    )
    return net, final, syn, torch.rand(n_test, *shape, device=dev), torch.randint(0, 10, (n_test,), device=dev)


def _flops_per_unit(net: Network, final, syn: Synset, x_test: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from ddm_ray.core.synset import fast_learn

    with FlopCounterMode(display=False) as fc:
        p = fast_learn(net, final, syn.x, syn.label, syn.weight[0], 1, 0.1)
        with torch.no_grad():
            net.logits(p, x_test)
    return float(fc.get_total_flops())


def measure(arch: str, shape: tuple[int, ...], batch: int, units: int, n_test: int, pool: int,
            device: str, precision: str, repeats: int) -> dict:
    dev = torch.device(device)
    net, final, syn, xt, yt = _setup(arch, shape, units, n_test, pool, dev)
    evaluate_units(net, final, syn.select(slice(0, min(units, batch))), xt, yt, NAMES, 1, 0.1, batch=batch,
                   precision=precision)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = evaluate_units(net, final, syn, xt, yt, NAMES, 1, 0.1, batch=batch, precision=precision)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    res = {
        "arch": arch, "shape": list(shape), "batch": batch, "units": units, "n_test": n_test, "pool": pool,
        "device": device, "precision": precision, "seconds": best,
        "rows_per_s": units * len(NAMES) / best, "units_per_s": units / best,
    }
    if dev.type == "cuda":
        res["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        flops = _flops_per_unit(net, final, syn, xt) * units
        res["tflops_achieved"] = flops / best / 1e12
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak:
            res["tflops_peak"] = peak[precision]
            res["fraction_of_peak"] = res["tflops_achieved"] / peak[precision]
        if precision != "fp32":
            ref = evaluate_units(net, final, syn, xt, yt, NAMES, 1, 0.1, batch=batch, precision="fp32")
            res["pearson_vs_fp32_loss"] = float(pearson(out[0].cpu(), ref[0].cpu()))
            res["max_abs_diff_loss"] = float((out[0] - ref[0]).abs().max())
    else:
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--archs", default="mlp,convnet")
    p.add_argument("--shape", default=None, help="input shape; default 64 for mlp and 1,8,8 for convnet")
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--precisions", default="fp32")
    p.add_argument("--units", type=int, default=256)
    p.add_argument("--n-test", type=int, default=597)
    p.add_argument("--pool", type=int, default=1024, help="synthetic samples shared by the synsets")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.single:  # one configuration in this (fresh) process, for a clean peak RSS
        arch, shape, batch, precision = json.loads(a.single)
        print(json.dumps(measure(arch, tuple(shape), batch, a.units, a.n_test, a.pool, a.device, precision, a.repeats)))
        return
    results = []
    for arch in a.archs.split(","):
        shape = tuple(int(s) for s in a.shape.split(",")) if a.shape else ((64,) if arch == "mlp" else (1, 8, 8))
        for precision in a.precisions.split(","):
            base = None
            for b in (int(x) for x in a.batches.split(",")):
                if a.device == "cpu":
                    cmd = [sys.executable, __file__, "--single", json.dumps([arch, list(shape), b, precision]),
                           "--units", str(a.units), "--n-test", str(a.n_test), "--pool", str(a.pool),
                           "--repeats", str(a.repeats), "--device", a.device]
                    if a.threads:
                        cmd += ["--threads", str(a.threads)]
                    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
                else:
                    r = measure(arch, shape, b, a.units, a.n_test, a.pool, a.device, precision, a.repeats)
                base = base or r["rows_per_s"]
                r["speedup_vs_first_batch"] = r["rows_per_s"] / base
                results.append(r)
                mem = r.get("peak_rss_mb", r.get("peak_mem_mb", 0.0))
                extra = f"  {r['tflops_achieved']:.2f} TFLOP/s" if "tflops_achieved" in r else ""
                if "fraction_of_peak" in r:
                    extra += f" ({100 * r['fraction_of_peak']:.1f}% of peak)"
                if "pearson_vs_fp32_loss" in r:
                    extra += f"  vs fp32: pearson {r['pearson_vs_fp32_loss']:.5f}, max|d| {r['max_abs_diff_loss']:.2e}"
                print(f"{arch:8s} {precision:5s} B={b:5d}  {r['rows_per_s']:10.1f} rows/s  x{r['speedup_vs_first_batch']:5.2f}  "
                      f"peak {mem:8.1f} MB{extra}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"online_batch-{a.device}.json")
    with open(path, "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

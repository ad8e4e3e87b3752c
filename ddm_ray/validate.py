"""`ddm-ray validate`: a finished run's rows against exact leave-one-out retraining.

Exact retraining uses the run's own init, seed and data order with the unit's samples dropped
(`core.training.train` with a keep mask), so the only difference is the removed data. The same
units are also scored by the gradient-ascent peer (one ascent step on the unit's real samples from
the final model), the floor DDM must beat.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad

from ddm_ray.config import RunConfig
from ddm_ray.core.metrics import agreement
from ddm_ray.core.models import Network, Params
from ddm_ray.core.objectives import all_objectives
from ddm_ray.core.training import retrain_without
from ddm_ray.data import Dataset, load_dataset
from ddm_ray.engine.fanout import FanOut
from ddm_ray.errors import RunStateError
from ddm_ray.store.run_store import RunStore


def load_complete_run(out: str, storage_options: dict[str, str]) -> tuple[RunStore, dict[str, Any], RunConfig]:
    store = RunStore(out, storage_options)
    if not store.exists(RunStore.MANIFEST):
        raise RunStateError(f"{out}: no run here (manifest.json missing)")
    manifest = store.read_json(RunStore.MANIFEST)
    if manifest.get("status") != "complete":
        raise RunStateError(f"{out}: the run is not complete (status {manifest.get('status')!r}); finish it with --resume")
    cfg = RunConfig.from_dict(manifest["config"])
    if cfg.hash() != manifest.get("config_hash"):
        raise RunStateError(f"{out}: manifest config does not match its hash")
    return store, manifest, cfg


def read_rows(store: RunStore, manifest: dict[str, Any], units: list[int], objective: str, n_test: int) -> torch.Tensor:
    """DDM deltas for `units` and one objective: (len(units), n_test), in the given unit order."""
    want = {u: i for i, u in enumerate(units)}
    out = torch.full((len(units), n_test), float("nan"))
    for _name, table in store.complete_parts(manifest):
        t = table.to_pydict()
        for u, o, d in zip(t["unit_id"], t["objective"], t["delta"], strict=True):
            if o == objective and u in want:
                out[want[u]] = torch.tensor(d)
    return out


def _objectives(net: Network, p: Params, ds: Dataset, names: tuple[str, ...]) -> torch.Tensor:
    with torch.no_grad():
        return all_objectives(net.logits(p, ds.x_test), ds.y_test, names)


def gradient_ascent(net: Network, final: Params, x: torch.Tensor, y: torch.Tensor, lr: float, batch_size: int) -> Params:
    """One ascent step on the unit's real samples x (n, ...), y (n,) from the final model."""
    g = grad(lambda p: F.cross_entropy(net.logits(p, x), y, reduction="sum") / batch_size)(final)
    return {k: final[k] + lr * g[k] for k in final}


def _scores(pred: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    return agreement(pred, exact, "per_test_mean")


@dataclass
class _RetrainJob:
    cfg: RunConfig
    ds: Dataset
    params0: Params
    unit_of: torch.Tensor
    base: torch.Tensor


def _retrain_delta(job: _RetrainJob, unit: int) -> tuple[torch.Tensor, float]:
    """Exact leave-one-out: retrain without `unit`; (n_obj, N_test) deltas and seconds taken."""
    net = Network(job.cfg.model, job.ds.input_shape, job.ds.num_classes)
    t0 = time.perf_counter()
    p = retrain_without(net, job.params0, job.ds.x_train, job.ds.y_train, job.cfg.train, job.unit_of == unit)
    seconds = time.perf_counter() - t0
    return _objectives(net, p, job.ds, job.cfg.online.objectives) - job.base, seconds


def validate_run(
    out: str,
    n_units: int | None,
    seed: int,
    storage_options: dict[str, str],
    log: Any = None,
    engine: str = "ray",
    num_cpus: int | None = None,
) -> dict[str, Any]:
    log = log or (lambda m: None)
    store, manifest, cfg = load_complete_run(out, storage_options)
    ds = load_dataset(cfg.data, storage_options)
    state = store.read_torch(RunStore.MODEL)
    net = Network(cfg.model, ds.input_shape, ds.num_classes)
    params0, final, unit_of = state["params0"], state["checkpoints"][-1], state["unit_of"]
    total_units = int(state["unit_label"].numel())
    if n_units is None or n_units >= total_units:
        units = list(range(total_units))
    else:
        gen = torch.Generator().manual_seed(seed)
        units = sorted(torch.randperm(total_units, generator=gen)[:n_units].tolist())
    names = cfg.online.objectives
    base = _objectives(net, final, ds, names)
    log(f"retraining {len(units)} units exactly ({engine} engine)")
    shared = _RetrainJob(cfg, ds, params0, unit_of, base)
    with FanOut(engine, num_cpus) as fan:
        results = fan.map(_retrain_delta, shared, units)
    exact = [r[0] for r in results]
    t_retrain = sum(r[1] for r in results)
    ga = []
    t_ga = 0.0
    for u in units:
        idx = unit_of == u
        t0 = time.perf_counter()
        pg = gradient_ascent(net, final, ds.x_train[idx], ds.y_train[idx], cfg.train.lr, cfg.train.batch_size)
        ga.append(_objectives(net, pg, ds, names) - base)
        t_ga += time.perf_counter() - t0
    exact_t = torch.stack(exact, 1)  # (n_obj, U, N)
    ga_t = torch.stack(ga, 1)
    n_test = ds.x_test.shape[0]
    per_objective: dict[str, Any] = {}
    for j, name in enumerate(names):
        ddm = read_rows(store, manifest, units, name, n_test)
        if torch.isnan(ddm).any():
            raise RunStateError(f"{out}: attribution rows missing for some units ({name})")
        per_objective[name] = {"ddm": _scores(ddm, exact_t[j]), "gradient_ascent": _scores(ga_t[j], exact_t[j])}
    timings = manifest.get("timings_seconds", {})
    n_total = manifest["counts"]["units"]
    online_total = float(timings.get("online", float("nan")))
    offline_total = sum(float(timings.get(k, 0.0)) for k in ("train_and_units", "distill"))
    ddm_s = online_total / n_total
    offline_s = offline_total / n_total
    retrain_s = t_retrain / len(units)
    whole = offline_total + online_total
    loss = per_objective.get("loss", next(iter(per_objective.values())))
    report = {
        "config_hash": manifest["config_hash"],
        "units_validated": len(units),
        "units_total": n_total,
        "unit_sample_seed": seed,
        "objective": "loss" if "loss" in per_objective else names[0],
        "pearson": loss["ddm"]["pearson"],
        "spearman": loss["ddm"]["spearman"],
        "per_objective": per_objective,
        "ddm_seconds_per_unit": ddm_s,
        "ddm_offline_seconds_per_unit": offline_s,
        "gradient_ascent_seconds_per_unit": t_ga / len(units),
        "retrain_seconds_per_unit": retrain_s,
        "retrain_engine": engine,
        "speedup": retrain_s / ddm_s if ddm_s > 0 else float("inf"),
        # the honest figure: retraining every unit against the whole run (offline + online)
        "ddm_offline_seconds": offline_total,
        "ddm_online_seconds": online_total,
        "end_to_end_speedup": n_total * retrain_s / whole if whole > 0 else float("inf"),
        "exact_delta_loss_std": float(exact_t[0].std()),
    }
    store.write_json(RunStore.VALIDATION, _finite(report))
    return report


def _finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def print_validation(r: dict[str, Any]) -> None:
    print(f"validated {r['units_validated']} units against exact leave-one-out retraining")
    print(f"{'objective':<10} {'method':<17} {'pearson':>8} {'spearman':>9} {'per-test P':>11} {'per-test S':>11}")
    for name, d in r["per_objective"].items():
        for method, s in d.items():
            print(
                f"{name:<10} {method:<17} {s['pearson']:>8.3f} {s['spearman']:>9.3f} "
                f"{s['pearson_per_test_mean']:>11.3f} {s['spearman_per_test_mean']:>11.3f}"
            )
    print(
        f"seconds per unit: ddm online {r['ddm_seconds_per_unit']:.5f}, "
        f"ddm offline (amortised) {r['ddm_offline_seconds_per_unit']:.4f}, "
        f"retrain {r['retrain_seconds_per_unit']:.4f}; online speed-up {r['speedup']:.0f}x"
    )
    print(
        f"whole run (offline {r['ddm_offline_seconds']:.1f}s + online {r['ddm_online_seconds']:.1f}s) vs "
        f"retraining all {r['units_total']} units: end-to-end speed-up {r['end_to_end_speedup']:.1f}x"
    )

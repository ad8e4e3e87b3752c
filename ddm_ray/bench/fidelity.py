"""`ddm-ray bench fidelity`: DDM and peer methods against exact retraining, on one configuration.

Stages (each timed; `fidelity.json` and `report.md` hold the results):

1. Train the target model with its trajectory and units (`offline.train_offline`).
2. Ground truth: exact leave-one-out retraining of each scored unit (same init, seed and order).
3. DDM: synsets by `distillation.distill_synsets` (whatever distillation the RunConfig selects), online
   rows by `core.online.evaluate_units`; every peer of `core.peers` on the same units.
   Scores: Pearson / Spearman over (unit, test) pairs and per test sample, per objective.
4. Datamodel mode: random unit-removal masks (each unit removed with probability alpha); exact
   retraining per mask; DDM per mask = fast-learn on the union of the masked units' synsets; LDS of
   DDM directly, of a ridge datamodel fitted on DDM masks, and of additive LOO rows per method.
5. Data quality: planted label noise (seeded) -> rank units by harm -> AUC / precision@k for units
   mostly mislabeled; remove the least useful X% by DDM attribution -> retrain -> accuracy beside
   random removal of the same number of samples.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ddm_ray.bench.config import BenchConfig
from ddm_ray.config import RunConfig
from ddm_ray.core import peers
from ddm_ray.core.datamodel import additive_prediction, fit_datamodel, lds, predict, random_masks
from ddm_ray.core.metrics import agreement, auc, precision_at_k
from ddm_ray.core.models import flatten
from ddm_ray.core.objectives import all_objectives
from ddm_ray.core.online import evaluate_units
from ddm_ray.core.synset import Synset
from ddm_ray.data import Dataset, load_dataset
from ddm_ray.distillation import DistillJob, Shard, distill_shard, distill_synsets
from ddm_ray.engine.fanout import FanOut
from ddm_ray.offline import Offline, train_offline
from ddm_ray.validate import RetrainJob, finite, retrain_logits, sample_units

_log = logging.getLogger(__name__)


# ---- retraining (the ground truth): `validate.retrain_logits`, fanned out --------------------------
def _distill_one(job: DistillJob, shard: Shard) -> list[tuple[str, dict[str, torch.Tensor]]]:
    return list(distill_shard(job, shard))


# ---- one model: train, distill, score ----------------------------------------------------------------
@dataclass
class _Model:
    cfg: RunConfig
    ds: Dataset
    off: Offline
    inp: peers.PeerInputs
    job: RetrainJob
    syn: Synset | None = None
    distill_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def _prepare(cfg: RunConfig, ds: Dataset) -> _Model:
    off = train_offline(cfg, ds)
    inp = peers.PeerInputs(
        off.net, off.params0, off.traj, ds.x_train, ds.y_train, off.units.unit_of, off.units.label,
        cfg.train, ds.x_test, ds.y_test, cfg.online.objectives,
    )
    job = RetrainJob(cfg, ds.input_shape, ds.num_classes, off.params0, ds.x_train, ds.y_train, ds.x_test)
    return _Model(cfg, ds, off, inp, job)


def _distill(m: _Model, fan: FanOut) -> None:
    t0 = time.perf_counter()
    n_shards = fan.describe().get("cpus", 1) if fan.engine == "ray" else 1

    def run_shards(job: DistillJob, shards: list[Shard]) -> list[tuple[str, dict[str, torch.Tensor]]]:
        return [pair for part in fan.map(_distill_one, job, shards) for pair in part]

    m.syn = distill_synsets(m.cfg, m.off, run_shards, max(1, n_shards))
    m.distill_seconds = time.perf_counter() - t0


def _exact_loo(m: _Model, fan: FanOut, units: list[int]) -> tuple[torch.Tensor, float]:
    keeps = torch.stack([m.off.units.unit_of != u for u in units])
    t0 = time.perf_counter()
    logits, _ = retrain_logits(fan, m.job, keeps, what="exact leave-one-out", unit="units")
    secs = time.perf_counter() - t0
    base = m.inp.base_objectives()
    return all_objectives(logits, m.ds.y_test, m.cfg.online.objectives) - base[:, None, :], secs


def _ddm_loo(m: _Model, units: list[int]) -> tuple[torch.Tensor, float]:
    assert m.syn is not None
    syn = m.syn.select(torch.tensor(units))
    o = m.cfg.online
    t0 = time.perf_counter()
    d = evaluate_units(m.off.net, m.off.traj.final, syn, m.ds.x_test, m.ds.y_test, o.objectives, o.steps, o.lr)
    return d, time.perf_counter() - t0


def _run_peers(
    m: _Model, bench: BenchConfig, units: list[int], names: tuple[str, ...], log: Callable[[str], None]
) -> dict[str, peers.PeerResult]:
    """Every requested peer on `units`; shared offline work (Hessian, unroll) is done once."""
    out: dict[str, peers.PeerResult] = {}
    inp = m.inp
    if "class_indicator" in names:
        out["class_indicator"] = peers.class_indicator(inp, units)
    if "gradient_ascent" in names:
        out["gradient_ascent"] = peers.gradient_ascent(inp, units, steps=bench.ga_steps)
    if "tracin" in names:
        out["tracin"] = peers.tracin(inp, units)
    if {"influence", "influence_linear", "influence_damped"} & set(names):
        log("influence: Hessian at the final model")
        exact_h = flatten(inp.final).numel() <= bench.if_max_exact
        t0 = time.perf_counter()
        hess = peers.hessian(inp) if exact_h else None
        h_s = time.perf_counter() - t0
        if "influence" in names or "influence_linear" in names:
            disp, off_s, on_s = peers.influence_displacement(
                inp, units, bench.if_damping, bench.if_max_exact, curvature=bench.if_curvature, hess=hess
            )
            for mode, name in (("eval", "influence"), ("linear", "influence_linear")):
                if name in names:
                    t0 = time.perf_counter()
                    d = peers.displacement_objectives(inp, disp, mode)
                    out[name] = peers.PeerResult(d, h_s + off_s, on_s + time.perf_counter() - t0)
        if "influence_damped" in names:
            disp, off_s, on_s = peers.influence_displacement(
                inp, units, bench.if_damping, bench.if_max_exact, curvature="damped", hess=hess
            )
            t0 = time.perf_counter()
            d = peers.displacement_objectives(inp, disp, "eval")
            out["influence_damped"] = peers.PeerResult(d, h_s + off_s, on_s + time.perf_counter() - t0)
    if "unrolled" in names or "unrolled_linear" in names:
        log("unrolled SGD influence: replaying training")
        disp, off_s = peers.unrolled_displacement_of(inp, units, m.cfg.distill.unroll_epochs)
        for mode, name in (("eval", "unrolled"), ("linear", "unrolled_linear")):
            if name in names:
                t0 = time.perf_counter()
                d = peers.displacement_objectives(inp, disp, mode)
                out[name] = peers.PeerResult(d, off_s, time.perf_counter() - t0)
    return out


def _scores(pred: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    return agreement(pred, exact, "per_test")


# ---- datamodel mode ------------------------------------------------------------------------------------
def _ddm_masks(m: _Model, masks: torch.Tensor, obj: int) -> torch.Tensor:
    """DDM outputs f(theta_p, x) for each mask (M, U): fast-learn on the union of the masked synsets."""
    assert m.syn is not None
    o = m.cfg.online
    net, final = m.off.net, m.off.traj.final
    union = Synset(torch.arange(masks.shape[0]), m.syn.x, m.syn.label, masks.to(m.syn.weight.dtype) @ m.syn.weight)
    base = m.inp.base_objectives()[obj]
    d = evaluate_units(net, final, union, m.ds.x_test, m.ds.y_test, o.objectives, o.steps, o.lr)
    return d[obj] + base[None, :]


def _datamodel(
    m: _Model, fan: FanOut, bench: BenchConfig, loo: dict[str, torch.Tensor], all_units_scored: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """LDS on `bench.masks` retrained masks, objective loss (or the first objective)."""
    names = m.cfg.online.objectives
    obj = names.index("loss") if "loss" in names else 0
    n_units = m.off.units.num_units
    test_masks = random_masks(bench.masks, n_units, bench.alpha, bench.seed + 11)
    keeps = ~test_masks[:, m.off.units.unit_of]  # (M, N)
    log(f"datamodel: retraining {bench.masks} masks (alpha {bench.alpha})")
    t0 = time.perf_counter()
    logits, _ = retrain_logits(fan, m.job, keeps, what="datamodel: exact retraining", unit="masks")
    retrain_s = time.perf_counter() - t0
    actual = all_objectives(logits, m.ds.y_test, names)[obj]  # (M, N)
    base = m.inp.base_objectives()[obj]
    res: dict[str, Any] = {"masks": bench.masks, "alpha": bench.alpha, "objective": names[obj],
                           "retrain_seconds_per_mask": retrain_s / max(1, bench.masks), "lds": {}}
    t0 = time.perf_counter()
    direct = _ddm_masks(m, test_masks, obj)
    res["ddm_seconds_per_mask"] = (time.perf_counter() - t0) / max(1, bench.masks)
    res["lds"]["ddm_direct"] = lds(direct, actual)
    if bench.fit_masks > 0:
        fit = random_masks(bench.fit_masks, n_units, bench.alpha, bench.seed + 12)
        w, b = fit_datamodel(fit, _ddm_masks(m, fit, obj), bench.ridge)
        res["lds"]["ddm_datamodel"] = lds(predict(w, b, test_masks), actual)
        res["fit_masks"] = bench.fit_masks
    if all_units_scored:  # additive LOO rows need every unit
        for name, d in loo.items():
            res["lds"][f"{name}_additive"] = lds(base[None] + additive_prediction(d[obj], test_masks), actual)
    return res


# ---- data quality --------------------------------------------------------------------------------------
def plant_label_noise(ds: Dataset, fraction: float, kind: str, seed: int) -> tuple[Dataset, torch.Tensor]:
    """Flip round(fraction * N) training labels (seeded). pair: y -> y+1 mod C; uniform: any other class.

    Returns the noisy dataset and the (N,) bool mask of flipped samples.
    """
    n, c = ds.y_train.numel(), ds.num_classes
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[: round(fraction * n)]
    y = ds.y_train.clone()
    if kind == "pair":
        y[idx] = (y[idx] + 1) % c
    else:
        y[idx] = (y[idx] + torch.randint(1, c, (idx.numel(),), generator=gen)) % c
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[idx] = True
    return replace(ds, y_train=y), flipped


def _rank_report(harm: torch.Tensor, positive: torch.Tensor) -> dict[str, float]:
    k = int(positive.sum())
    return {
        "auc": auc(harm, positive),
        "precision_at_k": precision_at_k(harm, positive, k) if k else float("nan"),
        "precision_at_5": precision_at_k(harm, positive, 5),
    }


def _noise_experiment(
    cfg: RunConfig, ds: Dataset, fan: FanOut, bench: BenchConfig, log: Callable[[str], None]
) -> dict[str, Any]:
    noisy, flipped = plant_label_noise(ds, bench.noise_fraction, bench.noise_kind, bench.seed + 21)
    log(f"label noise: {int(flipped.sum())} labels flipped ({bench.noise_kind}); training and distilling")
    m = _prepare(cfg, noisy)
    _distill(m, fan)
    units = list(range(m.off.units.num_units))
    nu = m.off.units.num_units
    frac = torch.zeros(nu).index_add_(0, m.off.units.unit_of, flipped.double().float())
    frac = frac / torch.bincount(m.off.units.unit_of, minlength=nu).clamp_min(1)
    positive = frac > 0.5
    names = cfg.online.objectives
    obj = names.index("loss") if "loss" in names else 0
    ddm, _ = _ddm_loo(m, units)
    log("label noise: exact leave-one-out on the noisy model")
    exact, _ = _exact_loo(m, fan, units)
    methods = {"ddm": ddm, "exact_retraining": exact}
    methods.update({k: r.deltas for k, r in _run_peers(m, bench, units, bench.quality_peers, log).items()})
    sign = 1.0 if names[obj] == "loss" else -1.0  # harm: removal lowers loss (raises margin)
    ranking = {k: _rank_report(-sign * d[obj].mean(1), positive) for k, d in methods.items()}
    with torch.no_grad():
        acc = float((m.off.net.logits(m.off.traj.final, ds.x_test).argmax(1) == ds.y_test).float().mean())
    return {
        "noise_fraction": bench.noise_fraction,
        "noise_kind": bench.noise_kind,
        "flipped_samples": int(flipped.sum()),
        "units": nu,
        "mostly_mislabeled_units": int(positive.sum()),
        "units_with_any_flip": int((frac > 0).sum()),
        "noisy_model_test_accuracy": acc,
        "ranking": ranking,
    }


def _removal_experiment(
    m: _Model, fan: FanOut, bench: BenchConfig, orders: dict[str, torch.Tensor], log: Callable[[str], None]
) -> dict[str, Any]:
    """Remove units in each given order until >= X% of training samples are gone; retrain; accuracy.

    Random baseline: the same number of samples drawn uniformly (bench.random_repeats draws).
    """
    n = m.ds.y_train.numel()
    unit_of = m.off.units.unit_of
    sizes = torch.bincount(unit_of, minlength=m.off.units.num_units)
    keeps, tags = [], []
    removed_counts: dict[str, list[int]] = {}
    for name, order in orders.items():
        removed_counts[name] = []
        cum = torch.cumsum(sizes[order], 0)
        for f in bench.remove_fractions:
            j = int(torch.searchsorted(cum, torch.tensor(math.ceil(f * n)))) + 1
            gone = order[: min(j, len(order))]
            keep = ~torch.isin(unit_of, gone)
            keeps.append(keep)
            tags.append((name, f))
            removed_counts[name].append(int((~keep).sum()))
    gen = torch.Generator().manual_seed(bench.seed + 31)
    ref = removed_counts[next(iter(orders))]
    for _ in range(bench.random_repeats):
        for f, cnt in zip(bench.remove_fractions, ref, strict=True):
            keep = torch.ones(n, dtype=torch.bool)
            keep[torch.randperm(n, generator=gen)[:cnt]] = False
            keeps.append(keep)
            tags.append(("random", f))
    log(f"useless-data removal: {len(keeps)} retrainings")
    logits, _ = retrain_logits(fan, m.job, torch.stack(keeps), what="removal: retraining")
    acc = (logits.argmax(-1) == m.ds.y_test[None]).float().mean(1)
    with torch.no_grad():
        full = float((m.off.net.logits(m.off.traj.final, m.ds.x_test).argmax(1) == m.ds.y_test).float().mean())
    table: dict[str, dict[str, Any]] = {}
    for name in [*orders, "random"]:
        row = {}
        for f in bench.remove_fractions:
            vals = [float(a) for a, t in zip(acc, tags, strict=True) if t == (name, f)]
            row[str(f)] = {"accuracy": sum(vals) / len(vals), "std": float(torch.tensor(vals).std()) if len(vals) > 1 else 0.0}
        table[name] = row
    return {
        "full_accuracy": full,
        "fractions": list(bench.remove_fractions),
        "removed_samples": {k: v for k, v in removed_counts.items()},
        "accuracy": table,
        "random_repeats": bench.random_repeats,
        "order": "units by mean delta test loss ascending (removing them lowers loss most / hurts least)",
    }


# ---- the benchmark -------------------------------------------------------------------------------------
def run_fidelity(
    cfg: RunConfig,
    bench: BenchConfig,
    out: str,
    engine: str = "ray",
    num_cpus: int | None = None,
    storage_options: dict[str, str] | None = None,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every stage and write fidelity.json, report.md and PNG plots into the local folder out."""
    log = log or _log.info
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 3)
        log(f"{name}: {timings[name]:.1f}s")

    os.makedirs(out, exist_ok=True)
    ds = load_dataset(cfg.data, storage_options or {})
    names = cfg.online.objectives
    result: dict[str, Any] = {
        "config": cfg.to_dict(), "config_hash": cfg.hash(), "bench": asdict(bench),
        "counts": {"train": int(ds.y_train.numel()), "test": int(ds.y_test.numel()), "classes": ds.num_classes},
    }
    with FanOut(engine, num_cpus) as fan:
        result["execution"] = fan.describe()
        t0 = time.perf_counter()
        m = _prepare(cfg, ds)
        stage("train_and_units", t0)
        n_units = m.off.units.num_units
        units = sample_units(n_units, bench.units, bench.seed)
        result["counts"].update({"units_total": n_units, "units_scored": len(units),
                                 "parameters": int(flatten(m.off.traj.final).numel())})
        log(f"exact leave-one-out retraining of {len(units)} units")
        exact, retrain_s = _exact_loo(m, fan, units)
        timings["exact_loo"] = round(retrain_s, 3)
        t0 = time.perf_counter()
        _distill(m, fan)
        stage("ddm_distill", t0)
        ddm, ddm_online = _ddm_loo(m, units)
        loo: dict[str, torch.Tensor] = {"ddm": ddm}
        cost: dict[str, dict[str, float]] = {
            "exact_retraining": {"online_s_per_unit": retrain_s / len(units), "offline_s_per_unit": 0.0},
            "ddm": {"online_s_per_unit": ddm_online / len(units), "offline_s_per_unit": m.distill_seconds / n_units},
        }
        t0 = time.perf_counter()
        for name, r in _run_peers(m, bench, units, bench.peers, log).items():
            loo[name] = r.deltas
            cost[name] = {"online_s_per_unit": r.online_seconds / len(units),
                          "offline_s_per_unit": r.offline_seconds / len(units)}
        stage("peers", t0)
        fidelity: dict[str, Any] = {}
        for name, d in loo.items():
            fidelity[name] = {obj: _scores(d[j], exact[j]) for j, obj in enumerate(names)}
            fidelity[name]["cost"] = cost[name]
        fidelity["exact_retraining"] = {"cost": cost["exact_retraining"]}
        # the honest figure: the whole DDM run against retraining every unit
        online_all = ddm_online / len(units) * n_units
        whole = timings["train_and_units"] + timings["ddm_distill"] + online_all
        result["whole_run"] = {
            "train_and_units_s": timings["train_and_units"], "distill_s": timings["ddm_distill"],
            "online_s": online_all, "retrain_all_s": retrain_s / len(units) * n_units,
            "end_to_end_speedup": retrain_s / len(units) * n_units / whole if whole > 0 else None,
        }
        result["fidelity"] = fidelity
        result["exact_delta_std"] = {obj: float(exact[j].std()) for j, obj in enumerate(names)}
        if bench.masks > 0:
            t0 = time.perf_counter()
            result["datamodel"] = _datamodel(m, fan, bench, loo, len(units) == n_units, log)
            stage("datamodel", t0)
        if not bench.skip_quality:
            t0 = time.perf_counter()
            obj = names.index("loss") if "loss" in names else 0
            sign = 1.0 if names[obj] == "loss" else -1.0
            all_units = list(range(n_units))
            ddm_all = ddm if len(units) == n_units else _ddm_loo(m, all_units)[0]
            exact_all = exact if len(units) == n_units else None
            orders = {"ddm": torch.argsort(sign * ddm_all[obj].mean(1), stable=True)}
            if exact_all is not None:
                orders["exact_retraining"] = torch.argsort(sign * exact_all[obj].mean(1), stable=True)
            result["removal"] = _removal_experiment(m, fan, bench, orders, log)
            stage("removal", t0)
            t0 = time.perf_counter()
            result["label_noise"] = _noise_experiment(cfg, ds, fan, bench, log)
            stage("label_noise", t0)
        timings["total"] = round(time.perf_counter() - t_all, 3)
        result["timings_seconds"] = timings
        if plots:
            from ddm_ray.bench.plots import write_plots

            result["plots"] = write_plots(out, m, units, loo, exact, result)
    result = finite(result)
    with open(os.path.join(out, "fidelity.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(render_report(result))
    return result


def _distill_text(d: dict[str, Any]) -> str:
    if d["method"] == "basis":
        return (f"`basis` (target {d['target']}, {d['probe_samples']} probes, rank {d['probe_rank']}, "
                f"ridge {d['ridge']})")
    return f"`{d['method']}` (IPC {d['ipc']}, {d['steps']} matching steps)"


def _f(v: Any, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def render_report(r: dict[str, Any]) -> str:
    """The Markdown report of a fidelity.json dict."""
    b, c = r["bench"], r["counts"]
    cfg = r["config"]
    lines = [
        "# Fidelity benchmark",
        "",
        f"Dataset `{cfg['data']['dataset']}` ({c['train']} train / {c['test']} test, {c['classes']} classes), "
        f"model {cfg['model']['arch']} {cfg['model']['hidden'] if cfg['model']['arch'] == 'mlp' else ''}, "
        f"SGD lr {cfg['train']['lr']} batch {cfg['train']['batch_size']} x {cfg['train']['epochs']} epochs, "
        f"{c['units_total']} units (k-means {cfg['units']['clusters_per_class']} per class), "
        f"DDM distill {_distill_text(cfg['distill'])}, config `{r['config_hash']}`.",
        "",
        f"Options: units scored {c['units_scored']}/{c['units_total']}, masks {b['masks']} (alpha {b['alpha']}, "
        f"DDM fit masks {b['fit_masks']}), quality {'skipped' if b['skip_quality'] else 'run'}, "
        f"influence curvature `{b['if_curvature']}` damping {b['if_damping']}, engine {r['execution'].get('engine')}. "
        f"Total {r['timings_seconds']['total']:.0f} s.",
        "",
    ]
    fid = r["fidelity"]
    objs = [o for o in cfg["online"]["objectives"]]
    for obj in objs:
        lines += [
            f"## Leave-one-out fidelity vs exact retraining: Δ {obj}",
            "",
            "| method | Pearson | Spearman | Pearson per test | Spearman per test | online s/unit | offline s/unit |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, d in fid.items():
            if obj not in d:
                continue
            s, k = d[obj], d["cost"]
            lines.append(
                f"| {name} | {_f(s['pearson'])} | {_f(s['spearman'])} | {_f(s['pearson_per_test'])} | "
                f"{_f(s['spearman_per_test'])} | {_f(k['online_s_per_unit'], '.5f')} | {_f(k['offline_s_per_unit'], '.4f')} |"
            )
        lines.append("")
    ex = fid["exact_retraining"]["cost"]
    lines += [f"Exact retraining: {_f(ex['online_s_per_unit'], '.3f')} s per unit (wall, all workers).", ""]
    if "whole_run" in r:
        w = r["whole_run"]
        lines += [
            f"Whole DDM run (train + units {_f(w['train_and_units_s'], '.1f')} s, distill {_f(w['distill_s'], '.1f')} s, "
            f"online {_f(w['online_s'], '.1f')} s) against retraining all {c['units_total']} units "
            f"({_f(w['retrain_all_s'], '.1f')} s): end-to-end speed-up {_f(w['end_to_end_speedup'], '.2g')}x.",
            "",
        ]
    if "datamodel" in r:
        dm = r["datamodel"]
        lines += [
            f"## Datamodel mode: LDS over {dm['masks']} retrained masks (Δ {dm['objective']}, alpha {dm['alpha']})",
            "",
            "| predictor | LDS |",
            "|---|---|",
        ]
        lines += [f"| {k} | {_f(v)} |" for k, v in dm["lds"].items()]
        lines += ["", f"DDM {_f(dm['ddm_seconds_per_mask'], '.4f')} s per mask; retraining "
                      f"{_f(dm['retrain_seconds_per_mask'], '.3f')} s per mask.", ""]
    if "label_noise" in r:
        ln = r["label_noise"]
        lines += [
            f"## Planted label noise ({ln['noise_kind']}, {ln['noise_fraction']:.0%}: {ln['flipped_samples']} labels)",
            "",
            f"{ln['mostly_mislabeled_units']} of {ln['units']} units are mostly (>50%) mislabeled; "
            f"noisy model test accuracy {_f(ln['noisy_model_test_accuracy'])}. Units ranked by harm "
            "(removal lowers mean test loss); k = number of mostly mislabeled units.",
            "",
            "| method | AUC | precision@k | precision@5 |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {_f(v['auc'])} | {_f(v['precision_at_k'])} | {_f(v['precision_at_5'])} |"
            for k, v in ln["ranking"].items()
        ]
        lines.append("")
    if "removal" in r:
        rm = r["removal"]
        fr = rm["fractions"]
        lines += [
            "## Removing the least useful data, then retraining: test accuracy",
            "",
            f"Full model: {_f(rm['full_accuracy'])}. Order: {rm['order']}; random: same number of samples, "
            f"mean of {rm['random_repeats']} draws.",
            "",
            "| removed | " + " | ".join(f"{f:.0%}" for f in fr) + " |",
            "|---|" + "---|" * len(fr),
        ]
        for name, row in rm["accuracy"].items():
            lines.append(f"| {name} | " + " | ".join(_f(row[str(f)]["accuracy"]) for f in fr) + " |")
        lines.append("")
    if r.get("plots"):
        lines += ["## Plots", ""]
        lines += [f"![{k}]({v})" for k, v in r["plots"].items()]
        lines.append("")
    lines += ["## Timings (s)", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["timings_seconds"].items()]
    return "\n".join(lines) + "\n"

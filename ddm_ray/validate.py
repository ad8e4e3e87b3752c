"""`ddm-ray validate`: a finished run's rows against exact leave-one-out retraining.

Exact retraining uses the run's own init, seed and data order with the unit's samples dropped
(`core.training.retrain_without`), so the only difference is the removed data. The same units are
also scored by the gradient-ascent peer (`core.peers.gradient_ascent`: one ascent step on the
unit's real samples from the final model), the floor DDM must beat. The run is read through
`ddm_ray.api.open_run` (verified parts). `retrain_logits` is the one fan-out of exact retrainings,
shared with the fidelity benchmark; it reports units retrained, rate and ETA.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ddm_ray.api import AuditRun, open_run
from ddm_ray.config import RunConfig
from ddm_ray.core import peers
from ddm_ray.core.metrics import agreement
from ddm_ray.core.models import Network, Params
from ddm_ray.core.objectives import all_objectives
from ddm_ray.core.online import base_objectives
from ddm_ray.core.training import Trajectory, retrain_without
from ddm_ray.data import load_dataset
from ddm_ray.engine.fanout import FanOut
from ddm_ray.engine.progress import Progress
from ddm_ray.errors import DamagedArtifactError, RunStateError
from ddm_ray.offline import MODEL_KEYS, model_state_problem
from ddm_ray.readers import caller_data, caller_model, check_data_fingerprint
from ddm_ray.store.run_store import RunStore

_log = logging.getLogger(__name__)


def run_config(run: AuditRun) -> RunConfig:
    """The config of an opened run, checked against the hash it was stored under."""
    cfg = run.config
    if cfg.hash() != run.manifest.get("config_hash"):
        raise RunStateError(f"{run.store.url}: manifest config does not match its hash")
    return cfg


def read_rows(run: AuditRun, units: list[int], objective: str) -> torch.Tensor:
    """DDM deltas for `units` and one objective: (len(units), n_test), in the given unit order;
    NaN rows for units the run does not hold."""
    unit_ids, test_ids, delta = run.matrix(objective)
    row = {int(u): i for i, u in enumerate(unit_ids)}
    out = torch.full((len(units), len(test_ids)), float("nan"))
    for j, u in enumerate(units):
        if u in row:
            out[j] = torch.from_numpy(delta[row[u]])
    return out


def sample_units(n_units: int, want: int | None, seed: int) -> list[int]:
    """A seeded sample of `want` units (ascending), or every unit when want is None or >= n_units."""
    if want is None or want >= n_units:
        return list(range(n_units))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_units, generator=gen)[:want].tolist())


# ---- exact retraining, fanned out ----------------------------------------------------------------
@dataclass
class RetrainJob:
    """What every exact retraining shares; shipped once to each worker."""

    cfg: RunConfig
    input_shape: tuple[int, ...]
    num_classes: int
    params0: Params
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor


def _retrain_chunk(job: RetrainJob, keeps: torch.Tensor) -> tuple[torch.Tensor, float]:
    """keeps (k, N) bool -> (test logits (k, N_test, C) of the models retrained without ~keep,
    seconds spent retraining)."""
    net = Network(job.cfg.model, job.input_shape, job.num_classes)
    out, seconds = [], 0.0
    for keep in keeps:
        t0 = time.perf_counter()
        p = retrain_without(net, job.params0, job.x_train, job.y_train, job.cfg.train, ~keep)
        seconds += time.perf_counter() - t0
        with torch.no_grad():
            out.append(net.logits(p, job.x_test))
    return torch.stack(out), seconds


def retrain_logits(
    fan: FanOut, job: RetrainJob, keeps: torch.Tensor, chunk: int = 8, what: str = "exact retraining",
    unit: str = "models",
) -> tuple[torch.Tensor, float]:
    """Exact retraining for every row of keeps (K, N), `chunk` rows per task: test logits
    (K, N_test, C) and the seconds the retrainings took (summed over workers). Progress: `what`,
    rows retrained (named `unit`), rate and ETA, counted in the driver as tasks finish."""
    if keeps.shape[0] == 0:
        return torch.zeros(0, job.x_test.shape[0], job.num_classes), 0.0
    parts = [keeps[i : i + chunk] for i in range(0, keeps.shape[0], chunk)]
    with Progress(keeps.shape[0], what=what, unit=unit, logger=_log) as bar:
        results = fan.map(_retrain_chunk, job, parts, on_done=lambda i: bar.update(parts[i].shape[0]))
    return torch.cat([r[0] for r in results]), sum(r[1] for r in results)


def _scores(pred: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    return agreement(pred, exact, "per_test_mean")


NOISE_SEED_STRIDE = 7_919  # noise seed i trains under seed + i * stride (init and data order)


def noise_ceiling(
    fan: FanOut, job: RetrainJob, net: Network, keeps: torch.Tensor, exact_loss: torch.Tensor, seeds: int,
    y_test: torch.Tensor,
) -> dict[str, Any]:
    """How well exact leave-one-out agrees with itself: the same units removed under `seeds` other
    seeds (another init and data order), each Δ test loss (U, N) scored against the run's own
    exact Δ test loss exact_loss (U, N). Returns the mean Pearson / Spearman over the seeds, each
    seed's figures and the seeds used. A DDM figure well above it describes one training run
    (same-seed leave-one-out is deterministic), not the data."""
    per_seed = []
    for i in range(1, seeds + 1):
        seed = job.cfg.train.seed + i * NOISE_SEED_STRIDE
        cfg = dataclasses.replace(job.cfg, train=dataclasses.replace(job.cfg.train, seed=seed))
        other = dataclasses.replace(job, cfg=cfg, params0=net.init_params(seed))
        rows = torch.cat([torch.ones(1, keeps.shape[1], dtype=torch.bool), keeps])  # the full model first
        logits, _ = retrain_logits(fan, other, rows, chunk=1, what=f"validate: noise seed {i}/{seeds}",
                                   unit="models")
        loss = all_objectives(logits, y_test, ("loss",))[0]
        s = agreement(loss[1:] - loss[:1], exact_loss, "per_test_mean")
        per_seed.append({"seed": seed, "pearson": s["pearson"], "spearman": s["spearman"]})
    mean = {k: float(sum(r[k] for r in per_seed) / len(per_seed)) for k in ("pearson", "spearman")}
    return {**mean, "seeds": [r["seed"] for r in per_seed], "per_seed": per_seed}


def validate_run(
    out: str,
    n_units: int | None,
    seed: int,
    storage_options: dict[str, str],
    log: Callable[[str], None] | None = None,
    engine: str = "ray",
    num_cpus: int | None = None,
    noise_seeds: int = 0,
    model: str | None = None,
    train: str | None = None,
    test: str | None = None,
    data_root: str | None = None,
) -> dict[str, Any]:
    """Score `n_units` seeded units of the complete run in `out` (all when None) against exact
    retraining, with the gradient-ascent peer beside DDM; writes and returns validation.json.
    noise_seeds N > 0 also retrains the same units under N other seeds: the noise ceiling.

    model: the run's user factory ("package.module:factory"), which the caller must give for a run
    trained on one (a run folder never makes a reader import code); train/test (Parquet) or
    data_root (MNIST, CIFAR-10): the run's data, checked against its data fingerprint (without
    them the manifest's locations are read, after a log line naming them; see `ddm_ray.readers`)."""
    log = log or _log.info
    run = open_run(out, storage_options)
    cfg, store, manifest = run_config(run), run.store, run.manifest
    if cfg.online.method == "exact":
        raise RunStateError(
            f"{out}: its rows are exact leave-one-out retraining (--method exact), the ground truth validate "
            "compares with; there is nothing to validate"
        )
    cfg = caller_model(cfg, model, store.url)
    cfg = caller_data(cfg, store.url, train, test, data_root)
    ds = load_dataset(cfg.data, storage_options)
    check_data_fingerprint(manifest, ds, store.url)
    net = Network(cfg.model, ds.input_shape, ds.num_classes)
    if manifest.get("model_fingerprint") not in (None, net.fingerprint()):
        raise RunStateError(
            f"{run.store.url}: the model {cfg.model.arch} changed since this run (fingerprint "
            f"{manifest.get('model_fingerprint')} vs {net.fingerprint()}); rerun it before validating"
        )
    resume = f"; `ddm-ray run --out {store.url} --resume` (with the run's options) recomputes it"
    try:
        state = store.read_torch(RunStore.MODEL, MODEL_KEYS)
    except DamagedArtifactError as e:
        raise RunStateError(f"{e}{resume}") from None
    if (problem := model_state_problem(state, net, int(ds.y_train.numel()))) is not None:
        raise RunStateError(f"{store.url}/{RunStore.MODEL}: damaged or not this run's model ({problem}){resume}")
    traj = Trajectory(state["checkpoints"], int(state["steps_per_epoch"]), state.get("velocities"))
    unit_of, unit_label = state["unit_of"], state["unit_label"]
    units = sample_units(int(unit_label.numel()), n_units, seed)
    names = cfg.online.objectives
    base = base_objectives(net, traj.final, ds.x_test, ds.y_test, names)
    log(f"retraining {len(units)} units exactly ({engine} engine)")
    job = RetrainJob(cfg, ds.input_shape, ds.num_classes, state["params0"], ds.x_train, ds.y_train, ds.x_test)
    keeps = torch.stack([unit_of != u for u in units])
    with FanOut(engine, num_cpus) as fan:
        logits, t_retrain = retrain_logits(fan, job, keeps, chunk=1, what="validate: exact retraining", unit="units")
        exact_t = all_objectives(logits, ds.y_test, names) - base[:, None, :]  # (n_obj, U, N)
        ceiling = None
        if noise_seeds > 0:
            log(f"noise ceiling: retraining the {len(units)} units under {noise_seeds} other seed(s)")
            exact_loss = exact_t[names.index("loss")] if "loss" in names else (
                all_objectives(logits, ds.y_test, ("loss",))[0]
                - base_objectives(net, traj.final, ds.x_test, ds.y_test, ("loss",))[0][None, :])
            ceiling = noise_ceiling(fan, job, net, keeps, exact_loss, noise_seeds, ds.y_test)
    inp = peers.PeerInputs(net, state["params0"], traj, ds.x_train, ds.y_train, unit_of, unit_label, cfg.train,
                           ds.x_test, ds.y_test, names)
    ga = peers.gradient_ascent(inp, units)
    per_objective: dict[str, Any] = {}
    for j, name in enumerate(names):
        ddm = read_rows(run, units, name)
        if torch.isnan(ddm).any():
            raise RunStateError(f"{out}: attribution rows missing for some units ({name})")
        per_objective[name] = {"ddm": _scores(ddm, exact_t[j]), "gradient_ascent": _scores(ga.deltas[j], exact_t[j])}
    timings = manifest.get("timings_seconds", {})
    n_total = int(manifest.get("counts", {}).get("units") or unit_label.numel())
    online_total = float(timings.get("online", float("nan")))
    offline_total = sum(float(timings.get(k, 0.0)) for k in ("train_and_units", "stability", "distill"))
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
        "gradient_ascent_seconds_per_unit": ga.online_seconds / len(units),
        "retrain_seconds_per_unit": retrain_s,
        "retrain_engine": engine,
        "speedup": retrain_s / ddm_s if ddm_s > 0 else float("inf"),
        # the honest figure: retraining every unit against the whole run (offline + online)
        "ddm_offline_seconds": offline_total,
        "ddm_online_seconds": online_total,
        "end_to_end_speedup": n_total * retrain_s / whole if whole > 0 else float("inf"),
        "exact_delta_loss_std": float(exact_t[0].std()),
        "noise_ceiling": ceiling,
    }
    stability = manifest.get("stability")
    if stability is not None:
        report["stability"] = stability
    store.write_json(RunStore.VALIDATION, finite(report))
    return report


def finite(obj: Any) -> Any:
    """obj with every non-finite float (in dicts and lists) replaced by None: valid JSON."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
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
    nc = r.get("noise_ceiling")
    if nc:
        print(
            f"noise ceiling (exact leave-one-out against itself under {len(nc['seeds'])} other seed(s)), Δ loss: "
            f"pearson {nc['pearson']:.3f}, spearman {nc['spearman']:.3f}"
        )
    print(
        f"seconds per unit: ddm online {r['ddm_seconds_per_unit']:.5f}, "
        f"ddm offline (amortised) {r['ddm_offline_seconds_per_unit']:.4f}, "
        f"retrain {r['retrain_seconds_per_unit']:.4f}; online speed-up {r['speedup']:.0f}x"
    )
    print(
        f"whole run (offline {r['ddm_offline_seconds']:.1f}s + online {r['ddm_online_seconds']:.1f}s) vs "
        f"retraining all {r['units_total']} units: end-to-end speed-up {r['end_to_end_speedup']:.2g}x"
    )
    from ddm_ray.advice import run_warnings

    for w in run_warnings({}, r):  # validation.json carries the stability figures too
        print(f"warning: {w}")

"""The run driver: one run from data to a complete manifest, independent of where work executes.

offline: load data -> train with a trajectory -> units (`ddm_ray.offline`) -> the cost estimate
         (`ddm_ray.cost`) -> synsets (`ddm_ray.distillation`)
online:  blocks of units -> leave-one-out rows -> one Parquet part per block (`ddm_ray.online_stage`)

`--method exact` skips the synsets: its blocks retrain every unit exactly, into the same parts.

An executor (`ddm_ray.engine`) decides where shards, blocks and one-process calls run: in-process
(`LocalExecutor`) or as Ray actors and tasks. The driver never holds the attribution matrix.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import torch

import ddm_ray
from ddm_ray.config import ExecConfig, RunConfig, config_diff
from ddm_ray.core.models import Network, flatten
from ddm_ray.core.synset import SYNSET_KEYS, Synset
from ddm_ray.cost import break_even_units, cost_lines, estimate_cost, time_kernels
from ddm_ray.data import Dataset, data_fingerprint, load_dataset
from ddm_ray.distillation import DistillJob, Shard, distill_synsets
from ddm_ray.errors import DamagedArtifactError, InputError, RunStateError
from ddm_ray.offline import (
    MODEL_KEYS,
    Offline,
    model_state_problem,
    offline_from_state,
    stability_of,
    test_index_table,
    train_and_units,
    units_table,
)
from ddm_ray.online_stage import Block, ExactJob, OnlineJob, online_batch_for
from ddm_ray.store.lease import Lease, LeaseLost, is_lease_file
from ddm_ray.store.run_store import RunStore

FORMAT_VERSION = 2  # 2: shared-pool synsets (artifacts/synset.pt), distillation pieces
T = TypeVar("T")


class Executor(Protocol):
    """Where shards and blocks run. Implementations live in ddm_ray.engine."""

    def distill(
        self, job: DistillJob, shards: list[Shard]
    ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]: ...

    def evaluate(
        self, job: OnlineJob | ExactJob, blocks: list[tuple[Block, torch.Tensor | None]]
    ) -> Iterator[tuple[Block, int]]:
        """Run every block (an online block with its synset weight rows, or a block of exact
        retrainings with None), each writing its Parquet part; yield (block, rows) as they finish."""
        ...

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args, device=...) where one-process heavy work belongs (training, k-means, the
        probe subspace): a GPU worker when the cluster has GPUs, else this process."""
        ...

    def describe(self) -> dict[str, Any]: ...


def versions() -> dict[str, str]:
    out = {
        "ddm_ray": ddm_ray.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "python": platform.python_version(),
    }
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _check_out(store: RunStore, cfg: RunConfig, resume: bool) -> dict[str, Any] | None:
    if not store.exists(RunStore.MANIFEST):
        if resume:
            raise RunStateError(f"{store.url}: nothing to resume (no manifest.json)")
        if [n for n in store.list("") if not is_lease_file(n)]:
            # a run deletes only what a manifest of its own says it wrote: never a stranger's files
            raise RunStateError(
                f"{store.url} is not empty and holds no ddm-ray run; choose an empty or new --out"
            )
        return None
    manifest = store.read_json(RunStore.MANIFEST)
    other = manifest.get("config_hash") if isinstance(manifest, dict) else None
    if other != cfg.hash():
        old = manifest.get("config") if isinstance(manifest, dict) else None
        diff = config_diff(old, cfg.to_dict()) if isinstance(old, dict) else []
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise RunStateError(
            f"{store.url} holds a run of another config ({shown or f'hash {other}'}); "
            "choose another --out or remove it"
        )
    return manifest


class Run:
    """Drives one run: offline stage, online stage, manifest. Used by the CLI and jobs/."""

    def __init__(
        self, cfg: RunConfig, exe: ExecConfig, out: str, executor: Executor, log: Any = None,
        progress: Callable[..., Any] | None = None,
    ) -> None:
        """progress(total_rows, rows_already_done, what=stage name) -> object with update(rows) and close()."""
        self.cfg, self.exe, self.executor = cfg, exe, executor
        self.store = RunStore(out, exe.storage_options)
        self.log = log or logging.getLogger(__name__).info  # stage lines, through the ddm_ray loggers
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.manifest: dict[str, Any] = {}
        self.online_batch: int | None = exe.online_batch
        self.fingerprint: str | None = None
        self.data_info: dict[str, Any] = {}  # input shape and the classes as the data names them
        self.model_fingerprint: str | None = None
        self.distillation: dict[str, Any] = {}
        self.stability: dict[str, Any] | None = None
        self.cost_estimate: dict[str, Any] | None = None
        self.part_records: dict[str, Any] = {}  # part name -> rows, sha256, bytes (once complete)
        self.lease: Lease | None = None  # held while executing; its token fences every write
        self._manifest_written = False

    def _stage(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.perf_counter() - t0, 3)
        self.log(f"{name}: {self.timings[name]:.1f}s")

    def _write_manifest(self, status: str, counts: dict[str, int]) -> None:
        if self._manifest_written:  # fencing: refused when another holder wrote it since this run did
            current = self.store.read_json(RunStore.MANIFEST) if self.store.exists(RunStore.MANIFEST) else {}
            token = current.get("lease") if isinstance(current, dict) else None
            if self.lease is not None and (not isinstance(token, dict) or token.get("owner") != self.lease.owner):
                raise LeaseLost(f"{self.store.url}: another run rewrote the manifest under its own lease; this run "
                                "lost its lease and stops without writing more")
        self.manifest = {
            "format": FORMAT_VERSION,
            "status": status,
            "method": self.cfg.online.method,
            "config": self.cfg.to_dict(),
            "config_hash": self.cfg.hash(),
            "data_fingerprint": self.fingerprint,
            "data": self.data_info,
            "model_fingerprint": self.model_fingerprint,
            "versions": versions(),
            "timings_seconds": self.timings,
            "counts": counts,
            "parts": self.part_records,
            "lease": None if self.lease is None else self.lease.token,
            "distillation": self.distillation,
            "stability": self.stability,
            "cost_estimate": self.cost_estimate,
            "execution": {
                "engine": self.exe.engine,
                "online_batch": self.online_batch,
                "online_batch_mode": ("none (exact retraining)" if self.cfg.online.method == "exact"
                                      else "fixed" if self.exe.online_batch else "auto (free memory)"),
                "block_units": self.exe.block_size(self.cfg.online.method),
                **self.executor.describe(),
            },
        }
        self.store.write_json(RunStore.MANIFEST, self.manifest)
        self._manifest_written = True

    def _load(self) -> Dataset:
        """Load and check the data before anything is written to the output folder."""
        t0 = time.perf_counter()
        dataset = load_dataset(self.cfg.data, self.exe.storage_options, self.cfg.units.from_column)
        k = self.cfg.units.clusters_per_class
        counts = torch.bincount(dataset.y_train, minlength=dataset.num_classes)
        small = [(dataset.name_of(c), int(n)) for c, n in enumerate(counts) if n < k]
        if small and not self.cfg.units.from_column:
            label, n = small[0]
            raise InputError(
                f"class {label} has {n} training samples, fewer than --clusters-per-class {k}"
            )
        # the model is built here first: an unusable user model is refused before anything runs
        self.model_fingerprint = Network(self.cfg.model, dataset.input_shape, dataset.num_classes).fingerprint()
        self._stage("load_data", t0)
        return dataset

    def _offline(self, dataset: Dataset, resume: bool) -> Offline:
        if resume and self.store.exists(RunStore.MODEL):
            net = Network(self.cfg.model, dataset.input_shape, dataset.num_classes)
            try:
                state = self.store.read_torch(RunStore.MODEL, MODEL_KEYS)
                problem = model_state_problem(state, net, int(dataset.y_train.numel()))
            except DamagedArtifactError as e:
                problem = e.reason
            if problem is None:
                self.log("resume: reusing the trained model and units")
                return offline_from_state(state, dataset, net)
            self._discard_downstream(f"{RunStore.MODEL}: {problem}")
        t0 = time.perf_counter()
        params0, traj, units = self.executor.call(train_and_units, self.cfg, dataset)
        off = Offline(dataset, Network(self.cfg.model, dataset.input_shape, dataset.num_classes), params0, traj, units)
        self._stage("train_and_units", t0)
        # the tables first: a resume that finds the model takes the tables as written too
        self.store.write_table(RunStore.UNITS, units_table(off))
        self.store.write_table(RunStore.TEST_INDEX, test_index_table(off))
        self.store.write_torch(
            RunStore.MODEL,
            {
                "params0": off.params0,
                "checkpoints": off.traj.checkpoints,
                "steps_per_epoch": off.traj.steps_per_epoch,
                **({} if off.traj.velocities is None else {"velocities": off.traj.velocities}),
                "unit_of": off.units.unit_of,
                "unit_label": off.units.label,
                "classes": torch.tensor(dataset.classes),
            },
        )
        return off

    def _discard_downstream(self, why: str) -> None:
        """Before the model is retrained on resume: everything made from the old one (synsets,
        distillation pieces, attribution parts and their records) goes too, so that no row of
        the run comes from a model it no longer holds."""
        self.log(f"resume: retraining the model ({why}); its synsets and attribution parts are recomputed too")
        for rel in (RunStore.SYNSET, "artifacts/distill", RunStore.ATTRIBUTION, RunStore.CHECKSUMS):
            self.store.remove(rel)

    def _estimate_cost(self, off: Offline) -> None:
        """Log (and keep for the manifest) DDM's estimated distillation cost in trainings and the
        break-even number of units, before anything of it is spent (`ddm_ray.cost`); warn when
        the other method is the cheaper one."""
        ds, method, n_units = off.dataset, self.cfg.online.method, off.units.num_units
        if self.cfg.distill.method != "basis":
            self.log(f"cost estimate: none for --distill-method {self.cfg.distill.method}")
            return
        t0 = time.perf_counter()
        try:
            kernels = self.executor.call(time_kernels, self.cfg, off)
        except (torch.cuda.OutOfMemoryError, MemoryError) as e:
            self.log(f"cost estimate: not measured ({type(e).__name__}: the timed kernels did not fit)")
            return
        self.cost_estimate = estimate_cost(
            self.cfg, int(ds.y_train.numel()), int(ds.y_test.numel()), n_units,
            int(flatten(off.traj.final).numel()), kernels,
        )
        self._stage("cost_estimate", t0)
        line, advice = cost_lines(self.cost_estimate, n_units, method)
        self.log(line)
        if advice is not None:
            if method == "ddm":
                logging.getLogger(__name__).warning(advice)
            else:
                self.log(advice)

    def _measured_cost(self, n_units: int, units_done: int) -> None:
        """The cost as measured, in trainings: one training is a calibration retraining of this
        session when distillation ran them (real work, under the same load), else the estimate's
        timed one (`cost.training_seconds`)."""
        est = self.cost_estimate
        timed = float(est["training_seconds"]) if est else 0.0
        if self.cfg.online.method == "exact":
            if units_done:
                each = self.timings["exact"] / units_done
                ddm = (f"; at that rate DDM's distillation (about {est['distill_trainings']:.1f} trainings) would "
                       f"take about {est['distill_trainings'] * each:.0f}s" if est else "")
                self.log(f"cost: exact retraining took {each:.2f}s per unit, {units_done} units this session{ddm}")
            return
        if "train_and_units" not in self.timings or "distill" not in self.timings:
            return  # resumed: this session's timings do not cover the whole offline stage
        calibrated = len(self.distillation.get("blend_calibration", {}).get("units", []))
        if calibrated and "distill_calibration" in self.timings:
            one, what = self.timings["distill_calibration"] / calibrated, f"{calibrated} calibration retrainings' mean"
        elif timed > 0:
            one, what = timed, "timed for the estimate"
        else:
            return
        d = self.timings["distill"] / one
        self.distillation["distill_trainings"] = round(d, 3)
        self.distillation["training_seconds"] = round(one, 3)
        estimated = f", estimated {est['distill_trainings']:.1f}" if est else ""
        self.log(f"cost: distillation took {d:.1f} trainings ({self.timings['distill']:.1f}s; a training {one:.2f}s, "
                 f"the {what}{estimated}); retraining every unit would take {n_units}, so this run "
                 f"{'beats' if n_units > d else 'does not beat'} exact leave-one-out "
                 f"(break-even at about {break_even_units(d)} units)")

    def _verified_parts(self, expected: set[str], rows_of: dict[str, int]) -> set[str]:
        """On resume: the parts whose bytes match their checksum record; every other file in
        attribution/ (damaged, unfinished, another block size, a killed writer's temp file) and its
        record are removed so that the block is recomputed."""
        done = set()
        for name in self.store.list(RunStore.ATTRIBUTION):
            problem = "not a part of this run" if name not in expected else None
            if problem is None:
                problem = self.store.part_problem(name, self.store.part_record(name), rows_of[name])
            if problem is None:
                done.add(name)
                continue
            self.log(f"resume: recomputing {name} ({problem})")
            self.store.remove(f"{RunStore.ATTRIBUTION}/{name}")
            self.store.remove(f"{RunStore.CHECKSUMS}/{name}.json")
        return done

    def _synsets(self, off: Offline, resume: bool, n_shards: int) -> Synset:
        ds = off.dataset
        t0 = time.perf_counter()
        if resume and self.store.exists(RunStore.SYNSET):
            try:
                syn = Synset.from_dict(self.store.read_torch(RunStore.SYNSET, SYNSET_KEYS))
                problem = syn.check(ds.input_shape, ds.num_classes)
                if problem is None and len(syn) != off.units.num_units:
                    problem = f"{len(syn)} units' synsets, the run has {off.units.num_units} units"
            except DamagedArtifactError as e:
                problem = e.reason
            if problem is None:
                return syn
            self.log(f"resume: recomputing the synsets ({problem})")

        def load(key: str) -> dict[str, torch.Tensor] | None:
            name = RunStore.distill_piece(key)
            if not (resume and self.store.exists(name)):
                return None
            try:
                return self.store.read_torch(name)
            except DamagedArtifactError as e:
                self.log(f"resume: recomputing {name} ({e.reason})")
                return None

        def save(key: str, piece: dict[str, torch.Tensor]) -> None:
            self.store.write_torch(RunStore.distill_piece(key), piece)

        syn = distill_synsets(
            self.cfg, off, self.executor.distill, n_shards, load, save, self.log, self.timings, self.distillation,
            call=self.executor.call,
        )
        self.store.write_torch(RunStore.SYNSET, syn.to_dict())
        self._stage("distill", t0)
        return syn

    def execute(self, n_shards: int = 1) -> dict[str, Any]:
        """The whole run, holding the output folder's lease (a second writer is refused)."""
        with Lease(self.store, ttl_s=self.exe.lease_ttl_s, log=self.log) as lease:
            self.lease = lease
            lease.guard(self.store)  # every write first checks the lease is still this run's
            try:
                return self._execute(n_shards)
            finally:
                self.store.guard = None

    def _execute(self, n_shards: int) -> dict[str, Any]:
        t_all = time.perf_counter()
        previous = _check_out(self.store, self.cfg, self.exe.resume)
        resume = self.exe.resume and previous is not None
        dataset = self._load()
        self.fingerprint = data_fingerprint(dataset)
        self.data_info = {
            "input_shape": list(dataset.input_shape),
            "labels": list(dataset.classes),
            "label_names": [dataset.name_of(c) for c in range(dataset.num_classes)],
            "label_order": dataset.label_order,  # a key of data.parquet.LABEL_ORDERS
        }
        if resume and previous is not None and previous.get("data_fingerprint") not in (None, self.fingerprint):
            raise RunStateError(
                f"{self.store.url}: the data changed since this run started (fingerprint "
                f"{previous.get('data_fingerprint')} vs {self.fingerprint}); rerun without --resume"
            )
        if resume and previous is not None and previous.get("model_fingerprint") not in (None, self.model_fingerprint):
            raise RunStateError(
                f"{self.store.url}: the model changed since this run started ({self.cfg.model.arch}: fingerprint "
                f"{previous.get('model_fingerprint')} vs {self.model_fingerprint}); rerun without --resume"
            )
        # not complete before anything is deleted: a crash in between leaves a resumable run
        self._write_manifest("running", {})
        if not resume and previous is not None:  # a rerun of this config: only files it wrote
            self.store.remove(RunStore.ATTRIBUTION)
            self.store.remove(RunStore.CHECKSUMS)
            self.store.remove("artifacts")
            if self.store.exists(RunStore.VALIDATION):  # it scored the rows this rerun recomputes
                self.store.remove(RunStore.VALIDATION)
                logging.getLogger(__name__).warning(
                    f"rerun without --resume: removed {self.store.url}/{RunStore.VALIDATION} of the previous run; "
                    "run `ddm-ray validate` again once this run is complete")
        off = self._offline(dataset, resume)
        t0 = time.perf_counter()
        self.stability = self.executor.call(stability_of, self.cfg, off)
        self._stage("stability", t0)
        if self.stability.get("unstable"):
            logging.getLogger(__name__).warning("warning: " + self.stability["warning"])
        else:
            self.log(f"stability: top Hessian eigenvalue {max(map(abs, self.stability['top_eigenvalue'])):.3g} "
                     f"within the limit 2(1+momentum)/lr = {self.stability['limit']:.3g}")
        n_units = off.units.num_units
        method = self.cfg.online.method
        self._estimate_cost(off)
        job: OnlineJob | ExactJob
        if method == "exact":  # no synsets: every block retrains its units exactly
            syn = None
            job = ExactJob(
                self.cfg, dataset.input_shape, dataset.num_classes, off.params0, off.traj.final,
                dataset.x_train, dataset.y_train, off.units.unit_of, dataset.x_test, dataset.y_test,
                self.store.url, self.exe.storage_options, lease=None if self.lease is None else self.lease.token,
            )
        else:
            syn = self._synsets(off, resume, n_shards)
            job = OnlineJob(
                self.cfg, off.dataset.input_shape, off.dataset.num_classes, off.traj.final,
                off.dataset.x_test, off.dataset.y_test, syn.x, syn.label, self.store.url, self.exe.storage_options,
                online_batch=self.exe.online_batch, lease=None if self.lease is None else self.lease.token,
            )
        names = self.cfg.online.objectives
        bs = self.exe.block_size(method)
        blocks = [Block(i, min(i + bs, n_units) - 1) for i in range(0, n_units, bs)]
        expected = {b.part for b in blocks}
        rows_of = {b.part: (b.last - b.first + 1) * len(names) for b in blocks}
        done = self._verified_parts(expected, rows_of) if resume else set()
        todo = [(b, None if syn is None else syn.weight[b.first : b.last + 1].clone())
                for b in blocks if b.part not in done]
        if isinstance(job, OnlineJob) and self.online_batch is None and n_units:
            # what a worker on this machine's device picks (GPU workers size from their own memory)
            self.online_batch = online_batch_for(job, off.net, off.traj.final)[0]
        t0 = time.perf_counter()
        rows = 0
        units_left = sum(b.last - b.first + 1 for b, _ in todo)
        stage = "exact" if method == "exact" else "online"
        bar = (self.progress(n_units * len(names), (n_units - units_left) * len(names), what=stage)
               if self.progress else None)
        try:
            for _block, n in self.executor.evaluate(job, todo):
                rows += n
                if bar is not None:
                    bar.update(n)
        finally:
            if bar is not None:
                bar.close()
        self._stage(stage, t0)
        self._measured_cost(n_units, units_left)
        records = {name: self.store.part_record(name) for name in sorted(expected)}
        bad = {n: p for n, r in records.items() if (p := self.store.part_problem(n, r, rows_of[n])) is not None}
        if bad:
            name, problem = next(iter(bad.items()))
            raise RunStateError(
                f"{self.store.url}: {len(bad)} attribution part(s) not written correctly ({name}: {problem}); "
                "rerun with --resume"
            )
        self.part_records = records
        self.timings["total"] = round(time.perf_counter() - t_all, 3)
        counts = {
            "units": n_units,
            "test_samples": int(off.dataset.test_ids.numel()),
            "train_samples": int(off.dataset.train_ids.numel()),
            "classes": off.dataset.num_classes,
            "objectives": len(names),
            "rows": n_units * len(names),
            "parts": len(expected),
            "rows_computed_this_session": rows,
            "parameters": int(flatten(off.traj.final).numel()),
        }
        self._write_manifest("complete", counts)
        return self.manifest

"""Config dataclasses for every stage, validated on construction and hashed into every output.

Only fields that change results enter the hash (`RunConfig.hash`); execution choices such as the
engine, device or online batch size live in `ExecConfig` and never change a row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ddm_ray.errors import ConfigError

DATASETS = ("digits", "parquet", "mnist", "cifar10")
ARCHS = ("mlp", "convnet")
OBJECTIVES = ("loss", "margin", "correct")
DISTILL_METHODS = ("basis", "soft_label", "literal")
TARGETS = ("unrolled", "influence", "blend")
PROBE_POOLS = ("test", "train", "both")
CURVATURES = ("hessian", "ggn")
TARGET_SOLVERS = ("auto", "adjoint", "forward")
UNIT_FEATURES = ("input", "penultimate")
METHODS = ("ddm", "exact")


def opt(default: Any = None, help: str = "", *, flag: str | None = None, choices: tuple[str, ...] | None = None,
        factory: Any = None, advanced: bool = False) -> Any:
    """A config field with what the CLI and TOML need: help text, flag name (default: the field
    name with dashes; "" hides it from the CLI) and choices. Flags are generated from these.
    advanced: an internal or tuning knob, listed by `--help-all` but not by `--help` (it is
    accepted either way)."""
    meta = {"help": help, "flag": flag, "choices": choices, "advanced": advanced}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


MAX_WIDTH = 16_384  # widest layer of the built-in models (--hidden, --fc-width)
MAX_PARAMETERS = 200_000_000  # largest built-in model (checked from the input shape before allocating)
MAX_FEATURES = 2**31 - 1  # values per sample
MAX_CPUS = 4096


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class DataConfig:
    """Where the training and test data come from, and which Parquet columns hold what."""

    dataset: str = opt("digits", "built-in dataset, or parquet (chosen by itself when --train/--test are given)",
                       choices=DATASETS)
    train: str | None = opt(None, "training Parquet file (path or fsspec URL)")
    test: str | None = opt(None, "test Parquet file, same columns")
    root: str | None = opt(None, "folder of MNIST idx / CIFAR-10 python files", flag="data-root")
    input_shape: tuple[int, ...] | None = opt(
        None, "sample shape, e.g. 1,28,28 (default: images keep theirs, lists stay flat)")
    max_train: int | None = opt(None, "keep the first N training samples")
    max_test: int | None = opt(None, "keep the first N test samples")
    x_column: str = opt("x", "Parquet input column: list of numbers, PNG/JPEG bytes, or {bytes, path} images")
    y_column: str = opt("y", "Parquet label column: integers or strings (class order: a Hugging Face ClassLabel's "
                        "in the file's metadata, else numeric for numbers, else alphabetical)")
    id_column: str = opt("id", "Parquet integer id column (when absent: the row number)")

    def __post_init__(self) -> None:
        _check(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; choose from {DATASETS}")
        if self.dataset == "parquet":
            _check(bool(self.train) and bool(self.test), "dataset parquet needs --train and --test")
        else:
            _check(not self.train and not self.test,
                   f"--train/--test are Parquet files, but --dataset is {self.dataset}; drop one of them")
        if self.dataset in ("mnist", "cifar10"):
            _check(bool(self.root), f"dataset {self.dataset} needs --data-root")
        if self.input_shape is not None:
            _check(
                len(self.input_shape) >= 1 and all(d >= 1 for d in self.input_shape),
                f"input shape must be positive integers, got {self.input_shape}",
            )
            _check(len(self.input_shape) <= 8 and math.prod(self.input_shape) <= MAX_FEATURES,
                   f"input shape must have at most 8 dimensions and {MAX_FEATURES} values, got {self.input_shape}")
        for name in ("max_train", "max_test"):
            v = getattr(self, name)
            _check(v is None or 1 <= v <= 1_000_000_000, f"{name} must be in [1, 1000000000]")
        for name in ("x_column", "y_column", "id_column"):
            _check(bool(getattr(self, name)), f"{name} must not be empty")
        _check(len({self.x_column, self.y_column, self.id_column}) == 3, "x, y and id columns must differ")


_MODEL_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class ModelConfig:
    """The network trained on the data: a built-in name or the user's `module:factory`."""

    arch: str = opt("mlp", "mlp | convnet | package.module:factory (factory(input_shape, num_classes) -> "
                    "torch.nn.Module, importable from the working directory or PYTHONPATH)", flag="model")
    hidden: tuple[int, ...] = opt((64, 64), "MLP hidden widths, e.g. 64,64")
    conv_channels: tuple[int, int] = opt((32, 64), "ConvNet channels of its two conv layers", advanced=True)
    fc_width: int = opt(128, "ConvNet fully connected width", advanced=True)

    @property
    def is_user_model(self) -> bool:
        return self.arch not in ARCHS

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS or bool(_MODEL_REF.match(self.arch)),
               f"unknown model {self.arch!r}; choose mlp, convnet or package.module:factory")
        _check(all(1 <= h <= MAX_WIDTH for h in self.hidden), f"hidden widths must be in [1, {MAX_WIDTH}]")
        _check(len(self.hidden) <= 64, "at most 64 hidden layers")
        _check(len(self.conv_channels) == 2 and 1 <= min(self.conv_channels) and max(self.conv_channels) <= 4096,
               "two conv widths in [1, 4096]")
        _check(1 <= self.fc_width <= MAX_WIDTH, f"fc width must be in [1, {MAX_WIDTH}]")


@dataclass(frozen=True)
class TrainConfig:
    """Training of the target model (plain or momentum SGD, fixed seed and data order)."""

    epochs: int = opt(30, "training epochs")
    batch_size: int = opt(100, "training batch size")
    lr: float = opt(0.1, "training learning rate (SGD)")
    momentum: float = opt(0.0, "SGD momentum")
    weight_decay: float = opt(0.0, "SGD weight decay")
    seed: int = opt(0, "seed of init, data order, k-means and distillation")

    def __post_init__(self) -> None:
        _check(1 <= self.epochs <= 100_000, "epochs must be in [1, 100000]")
        _check(1 <= self.batch_size <= 1_000_000, "batch size must be in [1, 1000000]")
        _check(math.isfinite(self.lr) and self.lr > 0, "learning rate must be a finite number > 0")
        _check(0 <= self.momentum < 1, "momentum must be in [0, 1)")
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight decay must be finite and >= 0")


@dataclass(frozen=True)
class UnitConfig:
    """What the removable units are: k-means clusters inside each class (default), or every
    distinct value of a training column (`from_column`), which may span classes."""

    clusters_per_class: int = opt(8, "k-means clusters per class (K)")
    features: str = opt("input", "k-means space: input | penultimate", flag="unit-features", choices=UNIT_FEATURES,
                        advanced=True)
    kmeans_iters: int = opt(50, "k-means iterations", advanced=True)
    seed: int = opt(0, "", flag="seed")
    from_column: str | None = opt(None, "one unit per distinct value of this training column (e.g. source)",
                                  flag="units-from")
    min_size: int = opt(5, "k-means: merge clusters smaller than this into their nearest cluster",
                        flag="min-unit-size")

    def __post_init__(self) -> None:
        _check(1 <= self.clusters_per_class <= 1_000_000, "clusters per class (K) must be in [1, 1000000]")
        _check(self.features in UNIT_FEATURES, f"unit features must be one of {UNIT_FEATURES}")
        _check(1 <= self.kmeans_iters <= 100_000, "k-means iterations must be in [1, 100000]")
        _check(1 <= self.min_size <= 1_000_000_000, "min unit size must be in [1, 1000000000]")
        _check(self.from_column is None or bool(self.from_column), "--units-from needs a column name")


@dataclass(frozen=True)
class DistillConfig:
    """Synset distillation.

    method:
      basis (default): every unit's leave-one-out displacement is estimated offline in the probe
        subspace (the top `probe_rank` directions, fewer when `probe_energy` is reached, spanned by
        the loss gradients of `probe_samples` class-stratified samples of the `probe_pool`: the
        test set by default) by `target`; each unit's synset is then a weighting of
        the shared probe samples, solved in closed form, whose one descent step from the final
        model reproduces that displacement (`core.distill.basis_synset`).
      soft_label: paper-style reverse gradient matching of -grad L(theta_{t+s}; S) to
        grad L(theta_t; D_unit), IPC learnable samples per unit with learnable soft labels.
      literal: the same with hard labels equal to the unit's class (kept for comparison).
    target (basis):
      unrolled: unrolled SGD influence over the trajectory (Hara et al. 2019);
      influence: influence function with the Hessian projected on the probe subspace;
      blend: w * unrolled + (1 - w) * influence, w = blend_weight, or when that is None (default)
        fitted: the non-negative lengths of the unrolled piece and of the influence piece (on the
        adjoint's directions and on the rest) that bring the target closest to V^T D of
        `calibration_units` seeded units retrained exactly (`core.targets.fit_target`).
    The unrolled target's adjoint runs on the `unrolled_rank` leading directions only (its cost
    is one fused pass per direction and training step); the influence target covers all k. Its
    curvature (`curvature`) is the Hessian over every training sample, or the Gauss-Newton matrix
    (for cross-entropy, the Fisher) on `curvature_samples` of them, from per-sample gradients.
    """

    method: str = opt("basis", "basis (default) | soft_label | literal", flag="distill-method", choices=DISTILL_METHODS,
                      advanced=True)
    target: str = opt("blend", "basis target: blend | unrolled | influence", choices=TARGETS, advanced=True)
    target_solver: str = opt("auto", "unrolled target: adjoint (cost flat in units) | forward (per unit) | auto",
                             choices=TARGET_SOLVERS, advanced=True)
    probe_samples: int = opt(1024, "basis: class-stratified probe samples per pool source (the synsets' shared pool)",
                             advanced=True)
    probe_pool: str = opt("test", "basis: samples whose loss gradients span the subspace and form the pool: "
                          "test (what a removal's effect is measured on) | train | both", choices=PROBE_POOLS,
                          advanced=True)
    probe_rank: int = opt(256, "basis: most probe subspace directions k", advanced=True)
    unrolled_rank: int | None = opt(None, "basis: the unrolled target (adjoint) runs on this many leading "
                                    "directions, the influence target covers the rest; 0: no adjoint (default: "
                                    "all of them for a model without convolutions, 32 with them: a vmapped "
                                    "convolution costs about 2 training steps per direction and step)",
                                    advanced=True)
    probe_energy: float | None = opt(0.999, "basis: fewer directions when they hold this share of the probe "
                                     "gradients' energy (default 0.999; none: always probe_rank)", advanced=True)
    probe_norm: float = opt(0.5, "basis: probe gradients divided by their norm ** this", advanced=True)
    ridge: float = opt(1e-3, "basis: shrinkage of weak probe directions (x largest)", flag="basis-ridge", advanced=True)
    curvature: str = opt("hessian", "influence: the curvature projected on the subspace: hessian (all training "
                         "samples) | ggn (the Gauss-Newton / Fisher matrix on --curvature-samples samples: per-sample "
                         "gradients, no Hessian-vector products; with --unrolled-rank 0 the cheap ConvNet recipe)",
                         choices=CURVATURES, advanced=True)
    curvature_samples: int = opt(512, "influence: seeded training samples the ggn curvature is estimated on",
                                 advanced=True)
    influence_damping: float = opt(0.005, "influence: damping relative to the largest curvature", advanced=True)
    blend_weight: float | None = opt(None, "blend: weight of the unrolled target (default: the targets' lengths "
                                     "fitted on exact retrainings)", advanced=True)
    calibration_units: int = opt(16, "blend calibration: units retrained exactly to fit the targets' lengths",
                                 advanced=True)
    unroll_epochs: int | None = opt(None, "unroll only the last N epochs (default: all)", advanced=True)
    ipc: int = opt(4, "soft_label/literal: synthetic samples per unit", advanced=True)
    steps: int = opt(300, "soft_label/literal: matching steps", flag="distill-steps", advanced=True)
    lr: float = opt(0.05, "soft_label/literal: Adam lr on the synset", flag="distill-lr", advanced=True)
    max_gap: int = opt(20, "soft_label/literal: trajectory gap s drawn from [1, max_gap)", advanced=True)
    seed: int = opt(0, "", flag="seed")

    def __post_init__(self) -> None:
        _check(self.method in DISTILL_METHODS, f"distill method must be one of {DISTILL_METHODS}")
        _check(self.target in TARGETS, f"distill target must be one of {TARGETS}")
        _check(self.target_solver in TARGET_SOLVERS, f"target solver must be one of {TARGET_SOLVERS}")
        _check(self.ipc >= 1, "IPC must be >= 1")
        _check(self.ipc <= 4096, "IPC must be <= 4096")
        _check(0 <= self.steps <= 1_000_000, "distill steps must be in [0, 1000000]")
        _check(math.isfinite(self.lr) and self.lr > 0, "distill lr must be a finite number > 0")
        _check(1 <= self.max_gap <= 100_000, "max gap must be in [1, 100000]")
        _check(self.unroll_epochs is None or 1 <= self.unroll_epochs <= 100_000, "unroll epochs must be in [1, 100000]")
        _check(1 <= self.probe_samples <= 65536, "probe samples must be in [1, 65536]")
        _check(1 <= self.probe_rank <= 4096, "probe rank must be in [1, 4096]")
        _check(self.unrolled_rank is None or 0 <= self.unrolled_rank <= 4096, "unrolled rank must be in [0, 4096]")
        _check(self.curvature in CURVATURES, f"curvature must be one of {CURVATURES}")
        _check(1 <= self.curvature_samples <= 1_000_000, "curvature samples must be in [1, 1000000]")
        _check(math.isfinite(self.probe_norm) and 0 <= self.probe_norm <= 16, "probe norm must be in [0, 16]")
        _check(self.probe_pool in PROBE_POOLS, f"probe pool must be one of {PROBE_POOLS}")
        _check(self.probe_energy is None or 0 < self.probe_energy <= 1, "probe energy must be in (0, 1]")
        _check(0 <= self.ridge < 1, "ridge must be in [0, 1)")
        _check(math.isfinite(self.influence_damping) and self.influence_damping > 0,
               "influence damping must be a finite number > 0")
        _check(self.blend_weight is None or 0 <= self.blend_weight <= 1, "blend weight must be in [0, 1]")
        _check(1 <= self.calibration_units <= 64, "calibration units must be in [1, 64]")


@dataclass(frozen=True)
class OnlineConfig:
    """How each unit's row is computed, and what is measured.

    method:
      ddm (default): the fast-learn step: fine-tuning the final model on the unit's synset
        (distilled offline, `DistillConfig`);
      exact: exact leave-one-out retraining of every unit (`core.training.retrain_without`: the
        same init, seed and data order with the unit's samples dropped); no distillation at all.
        Cheaper than DDM below the break-even number of units the run logs."""

    method: str = opt("ddm", "rows by ddm (distilled synsets, one online step) | exact (retrain without each "
                      "unit; cheaper below the break-even number of units the run logs)", choices=METHODS)
    steps: int = opt(1, "fine-tuning steps on a synset (basis synsets are solved for 1)", flag="online-steps",
                     advanced=True)
    lr: float = opt(0.1, "fine-tuning learning rate", flag="online-lr", advanced=True)
    objectives: tuple[str, ...] = opt(OBJECTIVES, "what is measured on every test sample: loss,margin,correct")
    precision: str = opt("fp32", "fp32 | tf32 | bf16 (GPU speed-ups)", flag="online-precision",
                         choices=("fp32", "tf32", "bf16"), advanced=True)

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"method must be one of {METHODS}")
        _check(self.precision in ("fp32", "tf32", "bf16"), "precision must be fp32, tf32 or bf16")
        _check(1 <= self.steps <= 10_000, "online steps must be in [1, 10000]")
        _check(math.isfinite(self.lr) and self.lr > 0, "online lr must be a finite number > 0")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        _check(not bad and len(self.objectives) > 0, f"objectives must be a subset of {OBJECTIVES}")
        _check(len(set(self.objectives)) == len(self.objectives), f"objectives repeat: {','.join(self.objectives)}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's rows. Its hash names and guards the output folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    units: UnitConfig = field(default_factory=UnitConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def __post_init__(self) -> None:
        _check(
            self.distill.method != "basis" or self.online.steps == 1,
            "basis synsets are solved for one online step; use --online-steps 1 "
            "(or --distill-method soft_label for multi-step fine-tuning)",
        )
        if self.units.from_column is not None:
            kmeans_only = [f"{f.name}" for f in dataclasses.fields(UnitConfig)
                           if f.name in ("clusters_per_class", "features", "kmeans_iters", "min_size")
                           and getattr(self.units, f.name) != f.default]
            _check(not kmeans_only, f"--units-from {self.units.from_column} makes the units; the k-means option(s) "
                                    f"{', '.join(kmeans_only)} do not apply: drop them")
        _check(
            self.units.from_column is None or self.distill.method == "basis",
            "--units-from units may span classes; the soft_label/literal synsets are per class: use --distill-method basis",
        )

    def to_dict(self) -> dict[str, Any]:
        """The config as written to manifests and hashed: data URLs with query strings (presigned
        signatures) and passwords redacted, so no secret is stored and a re-signed URL resumes."""
        from ddm_ray.store.fs import redact

        d = dataclasses.asdict(self)
        for k in ("train", "test", "root"):
            if d["data"].get(k):
                d["data"][k] = redact(d["data"][k])
        return d

    def hash(self) -> str:
        d = self.to_dict()
        if d["online"].get("method") == "ddm":  # added later: a DDM config keeps the hash it had before
            del d["online"]["method"]
        blob = json.dumps(d, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """The config a manifest (`to_dict`) records, every value type-checked against its field:
        ConfigError with one line naming the key (`config.train.epochs: expected an integer, got
        '5'`) for a value of another type, and the dataclasses' own checks after that."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a table of sections, got {_shown(d)}")

        def build(name: str, klass: type, sub: Any) -> Any:
            if not isinstance(sub, dict):
                raise ConfigError(f"config.{name}: expected a table, got {_shown(sub)}")
            kwargs = {f.name: _typed(f, sub[f.name], f"config.{name}.{f.name}")
                      for f in dataclasses.fields(klass) if f.name in sub}
            return klass(**kwargs)

        units = d.get("units", {})
        if isinstance(units, dict) and units and "min_size" not in units:
            units = {**units, "min_size": 1}  # manifests from before units were merged: raw clusters
        sections = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "units": UnitConfig,
                    "distill": DistillConfig, "online": OnlineConfig}
        return cls(**{name: build(name, klass, units if name == "units" else d.get(name, {}))
                      for name, klass in sections.items()})


def _shown(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


_WANT = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}


def _typed(f: dataclasses.Field, v: Any, where: str) -> Any:  # type: ignore[type-arg]
    """v as field f's type (a JSON list as a tuple, an integer as a float), or ConfigError."""
    text = str(f.type).replace(" ", "")
    optional = text.endswith("|None")
    base = text[: -len("|None")] if optional else text

    def one(kind: str, x: Any) -> bool:
        if kind == "str":
            return isinstance(x, str)
        if kind == "bool":
            return isinstance(x, bool)
        if kind == "int":
            return isinstance(x, int) and not isinstance(x, bool)
        return isinstance(x, (int, float)) and not isinstance(x, bool)  # float

    if v is None and optional:
        return None
    if base.startswith("tuple["):
        kind = base[len("tuple["):].split(",")[0].rstrip("]")
        if isinstance(v, (list, tuple)) and all(one(kind, x) for x in v):
            return tuple(float(x) if kind == "float" else x for x in v)
        raise ConfigError(f"{where}: expected a list of {_WANT[kind].split(' ', 1)[1]}s, got {_shown(v)}")
    if base in _WANT:
        if one(base, v):
            return float(v) if base == "float" else v
        raise ConfigError(f"{where}: expected {_WANT[base]}{' or null' if optional else ''}, got {_shown(v)}")
    return v  # pragma: no cover - a field type without a check here


@dataclass(frozen=True)
class ExecConfig:
    """How a run executes. Never changes results, so it is not hashed."""

    engine: str = opt("ray", "ray | local (in-process, no Ray)", choices=("ray", "local"))
    device: str = opt("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    online_batch: int | None = opt(None, "units fine-tuned together per pass (default: from free memory)",
                                   advanced=True)
    block_units: int | None = opt(None, "units per online task and per Parquet part (default: 64; "
                                  "--method exact: 1, one retraining per task)", advanced=True)
    max_in_flight: int | None = opt(None, "online tasks in flight (default: 2 x workers)", advanced=True)
    num_cpus: int | None = opt(None, "CPUs for a local Ray runtime")
    resume: bool = opt(False, "finish an interrupted run in --out")
    storage_options: dict[str, str] = opt(help="", flag="", factory=dict)
    connect_timeout_s: float = opt(30.0, "seconds to wait for --address / RAY_ADDRESS to answer",
                                   flag="connect-timeout", advanced=True)
    lease_ttl_s: float = opt(60.0, "seconds the folder's lease outlives this run's last heartbeat before another "
                             "run may take it over", flag="lease-ttl", advanced=True)

    def block_size(self, method: str) -> int:
        """Units per block (task and Parquet part): --block-units, else 64 for DDM's online
        blocks and 1 for exact retraining (each unit is a whole training: one task per unit)."""
        return self.block_units or (1 if method == "exact" else 64)

    def __post_init__(self) -> None:
        _check(self.engine in ("ray", "local"), "engine must be ray or local")
        _check(self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda")
        _check(self.online_batch is None or 1 <= self.online_batch <= 65_536, "online batch must be in [1, 65536]")
        _check(self.block_units is None or 1 <= self.block_units <= 1_000_000, "block units must be in [1, 1000000]")
        _check(self.max_in_flight is None or 1 <= self.max_in_flight <= 100_000, "max in flight must be in [1, 100000]")
        _check(self.num_cpus is None or 1 <= self.num_cpus <= MAX_CPUS, f"num cpus must be in [1, {MAX_CPUS}]")
        _check(math.isfinite(self.connect_timeout_s) and 0 < self.connect_timeout_s <= 86_400,
               "connect timeout must be in (0, 86400] seconds")
        _check(math.isfinite(self.lease_ttl_s) and 1 <= self.lease_ttl_s <= 86_400,
               "lease ttl must be in [1, 86400] seconds")


_BASIS_ONLY = ("target", "target_solver", "probe_samples", "probe_pool", "probe_rank", "unrolled_rank", "probe_energy",
               "probe_norm", "ridge", "curvature", "curvature_samples", "influence_damping", "blend_weight", "calibration_units", "unroll_epochs")
_MATCHING_ONLY = ("ipc", "steps", "lr", "max_gap")


def applicable_settings(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A `RunConfig.to_dict()` without the settings that did not apply to the run (for people to
    read; the hash covers everything): the built-in models' widths for other models, k-means
    options for `--units-from` units (and the column for k-means ones), the other distillation
    method's options, blend and unrolled options of a target without them, Parquet columns of a
    built-in dataset, the distillation and online-step settings of `--method exact`; and None
    values."""
    out = {k: dict(v) for k, v in config.items() if isinstance(v, dict)}
    drop: dict[str, set[str]] = {k: set() for k in out}
    model, units, distill, data = (out.get(k, {}) for k in ("model", "units", "distill", "data"))
    arch = model.get("arch")
    if arch != "mlp":
        drop.setdefault("model", set()).add("hidden")
    if arch != "convnet":
        drop.setdefault("model", set()).update(("conv_channels", "fc_width"))
    if units.get("from_column"):
        drop.setdefault("units", set()).update(("clusters_per_class", "features", "kmeans_iters", "min_size"))
    method, target = distill.get("method"), distill.get("target")
    if method == "basis":
        drop.setdefault("distill", set()).update(_MATCHING_ONLY)
        if target != "blend":
            drop["distill"].update(("blend_weight", "calibration_units"))
        if target == "influence":
            drop["distill"].update(("unrolled_rank", "target_solver", "unroll_epochs"))
        if target == "unrolled":
            drop["distill"].update(("curvature", "curvature_samples", "influence_damping"))
        if distill.get("blend_weight") is not None:
            drop["distill"].add("calibration_units")
    elif method is not None:
        drop.setdefault("distill", set()).update(_BASIS_ONLY)
    if data.get("dataset") != "parquet":
        drop.setdefault("data", set()).update(("x_column", "y_column", "id_column"))
    if out.get("online", {}).get("method") == "exact":  # exact retraining: no synsets, no online step
        out.pop("distill", None)
        drop.setdefault("online", set()).update(("steps", "lr", "precision"))
    return {section: {k: v for k, v in values.items() if v is not None and k not in drop.get(section, set())}
            for section, values in out.items()}


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two `RunConfig.to_dict()`s, with both values,
    e.g. ["train.epochs: 30 -> 5"]; fields only one side has count as differing."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_diff(a, b, name + "."))
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            out.append(f"{name}: {a} -> {b}")
    return out


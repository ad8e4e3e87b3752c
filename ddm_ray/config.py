"""Config dataclasses for every stage, validated on construction and hashed into every output.

Only fields that change results enter the hash (`RunConfig.hash`); execution choices such as the
engine, device or online batch size live in `ExecConfig` and never change a row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ddm_ray.errors import ConfigError

DATASETS = ("digits", "parquet", "mnist", "cifar10")
ARCHS = ("mlp", "convnet")
OBJECTIVES = ("loss", "margin", "correct")
DISTILL_METHODS = ("basis", "soft_label", "literal")
TARGETS = ("unrolled", "influence", "blend")
TARGET_SOLVERS = ("auto", "adjoint", "forward")
UNIT_FEATURES = ("input", "penultimate")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class DataConfig:
    """Where the training and test data come from."""

    dataset: str = field(default="digits", metadata={"help": "digits | parquet | mnist | cifar10"})
    train: str | None = field(default=None, metadata={"help": "parquet train file (path or URL)"})
    test: str | None = field(default=None, metadata={"help": "parquet test file (path or URL)"})
    root: str | None = field(default=None, metadata={"help": "folder of MNIST idx / CIFAR-10 files"})
    input_shape: tuple[int, ...] | None = field(
        default=None, metadata={"help": "sample shape C,H,W for parquet data (default flat)"}
    )
    max_train: int | None = field(default=None, metadata={"help": "keep the first N train samples"})
    max_test: int | None = field(default=None, metadata={"help": "keep the first N test samples"})

    def __post_init__(self) -> None:
        _check(self.dataset in DATASETS, f"unknown dataset {self.dataset!r}; choose from {DATASETS}")
        if self.dataset == "parquet":
            _check(bool(self.train) and bool(self.test), "dataset parquet needs --train and --test")
        if self.dataset in ("mnist", "cifar10"):
            _check(bool(self.root), f"dataset {self.dataset} needs --data-root")
        if self.input_shape is not None:
            _check(
                len(self.input_shape) >= 1 and all(d >= 1 for d in self.input_shape),
                f"input shape must be positive integers, got {self.input_shape}",
            )
        for name in ("max_train", "max_test"):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"{name} must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    """The network trained on the data."""

    arch: str = field(default="mlp", metadata={"help": "mlp | convnet"})
    hidden: tuple[int, ...] = field(default=(64, 64), metadata={"help": "MLP hidden widths"})
    conv_channels: tuple[int, int] = field(default=(32, 64), metadata={"help": "ConvNet channels"})
    fc_width: int = field(default=128, metadata={"help": "ConvNet fully connected width"})

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, f"unknown model {self.arch!r}; choose from {ARCHS}")
        _check(all(h >= 1 for h in self.hidden), "hidden widths must be >= 1")
        _check(len(self.conv_channels) == 2 and min(self.conv_channels) >= 1, "two conv widths >= 1")
        _check(self.fc_width >= 1, "fc width must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Training of the target model (plain or momentum SGD, fixed seed and data order)."""

    epochs: int = 30
    batch_size: int = 100
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check(1 <= self.epochs <= 100_000, "epochs must be in [1, 100000]")
        _check(1 <= self.batch_size <= 1_000_000, "batch size must be in [1, 1000000]")
        _check(self.lr > 0, "learning rate must be > 0")
        _check(0 <= self.momentum < 1, "momentum must be in [0, 1)")
        _check(self.weight_decay >= 0, "weight decay must be >= 0")


@dataclass(frozen=True)
class UnitConfig:
    """How each class is split into removable units."""

    clusters_per_class: int = field(default=8, metadata={"help": "K: k-means clusters per class"})
    features: str = field(default="input", metadata={"help": "input | penultimate"})
    kmeans_iters: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        _check(1 <= self.clusters_per_class <= 1_000_000, "clusters per class (K) must be in [1, 1000000]")
        _check(self.features in UNIT_FEATURES, f"unit features must be one of {UNIT_FEATURES}")
        _check(self.kmeans_iters >= 1, "k-means iterations must be >= 1")


@dataclass(frozen=True)
class DistillConfig:
    """Synset distillation.

    method:
      basis (default): every unit's leave-one-out displacement is estimated offline in the probe
        subspace (the top `probe_rank` directions spanned by the loss gradients of `probe_samples`
        class-stratified training samples) by `target`; each unit's synset is then a weighting of
        the shared probe samples, solved in closed form, whose one descent step from the final
        model reproduces that displacement (`core.distill.basis_synset`).
      soft_label: paper-style reverse gradient matching of -grad L(theta_{t+s}; S) to
        grad L(theta_t; D_unit), IPC learnable samples per unit with learnable soft labels.
      literal: the same with hard labels equal to the unit's class (kept for comparison).
    target (basis):
      unrolled: unrolled SGD influence over the trajectory (Hara et al. 2019);
      influence: influence function with the Hessian projected on the probe subspace;
      blend: w * unrolled + (1 - w) * influence, w = blend_weight, or when that is None the w of
        (0, 0.25, 0.5, 0.75, 1) whose rows agree best with exact retraining of `calibration_units`
        seeded units (a converged model gets some influence, an unconverged one none).
    """

    method: str = field(default="basis", metadata={"help": "basis | soft_label | literal"})
    target: str = field(default="blend", metadata={"help": "basis: unrolled | influence | blend"})
    target_solver: str = field(
        default="auto",
        metadata={"help": "unrolled target: adjoint (cost flat in units) | forward (per unit) | auto"},
    )
    probe_samples: int = field(
        default=1024, metadata={"help": "basis: probe samples, class-stratified (the synthetic pool)"}
    )
    probe_rank: int = field(default=128, metadata={"help": "basis: probe subspace dimension k"})
    probe_norm: float = field(
        default=0.5, metadata={"help": "basis: probe gradients divided by their norm ** this"}
    )
    ridge: float = field(
        default=1e-3, metadata={"help": "basis: shrinkage of weak probe directions (x largest)"}
    )
    influence_damping: float = field(
        default=0.005, metadata={"help": "influence: damping relative to the largest curvature"}
    )
    blend_weight: float | None = field(
        default=None,
        metadata={"help": "blend: weight of the unrolled target; None: calibrated on exact retrainings"},
    )
    calibration_units: int = field(
        default=4, metadata={"help": "blend calibration: units retrained exactly to choose the weight"}
    )
    unroll_epochs: int | None = field(
        default=None, metadata={"help": "unroll only the last N epochs (None: all)"}
    )
    ipc: int = field(default=4, metadata={"help": "soft_label/literal: synthetic samples per unit"})
    steps: int = field(default=300, metadata={"help": "soft_label/literal: matching steps"})
    lr: float = field(default=0.05, metadata={"help": "soft_label/literal: Adam lr on the synset"})
    max_gap: int = field(default=20, metadata={"help": "trajectory matching: s drawn from [1, max_gap)"})
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.method in DISTILL_METHODS, f"distill method must be one of {DISTILL_METHODS}")
        _check(self.target in TARGETS, f"distill target must be one of {TARGETS}")
        _check(self.target_solver in TARGET_SOLVERS, f"target solver must be one of {TARGET_SOLVERS}")
        _check(self.ipc >= 1, "IPC must be >= 1")
        _check(self.ipc <= 4096, "IPC must be <= 4096")
        _check(self.steps >= 0, "distill steps must be >= 0")
        _check(self.lr > 0, "distill lr must be > 0")
        _check(self.max_gap >= 1, "max gap must be >= 1")
        _check(self.unroll_epochs is None or self.unroll_epochs >= 1, "unroll epochs must be >= 1")
        _check(1 <= self.probe_samples <= 65536, "probe samples must be in [1, 65536]")
        _check(1 <= self.probe_rank <= 4096, "probe rank must be in [1, 4096]")
        _check(self.probe_norm >= 0, "probe norm must be >= 0")
        _check(0 <= self.ridge < 1, "ridge must be in [0, 1)")
        _check(self.influence_damping > 0, "influence damping must be > 0")
        _check(self.blend_weight is None or 0 <= self.blend_weight <= 1, "blend weight must be in [0, 1]")
        _check(1 <= self.calibration_units <= 64, "calibration units must be in [1, 64]")


@dataclass(frozen=True)
class OnlineConfig:
    """The fast-learn step: fine-tuning the final model on synsets, and what is measured."""

    steps: int = 1
    lr: float = 0.1
    objectives: tuple[str, ...] = OBJECTIVES
    precision: str = field(default="fp32", metadata={"help": "fp32 | tf32 | bf16 (GPU speed-ups)"})

    def __post_init__(self) -> None:
        _check(self.precision in ("fp32", "tf32", "bf16"), "precision must be fp32, tf32 or bf16")
        _check(self.steps >= 1, "online steps must be >= 1")
        _check(self.lr > 0, "online lr must be > 0")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        _check(not bad and len(self.objectives) > 0, f"objectives must be a subset of {OBJECTIVES}")


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
        blob = json.dumps(self.to_dict(), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        def build(klass: type, sub: dict[str, Any]) -> Any:
            kwargs = {}
            for f in dataclasses.fields(klass):
                if f.name in sub:
                    v = sub[f.name]
                    kwargs[f.name] = tuple(v) if isinstance(v, list) else v
            return klass(**kwargs)

        return cls(
            data=build(DataConfig, d.get("data", {})),
            model=build(ModelConfig, d.get("model", {})),
            train=build(TrainConfig, d.get("train", {})),
            units=build(UnitConfig, d.get("units", {})),
            distill=build(DistillConfig, d.get("distill", {})),
            online=build(OnlineConfig, d.get("online", {})),
        )


@dataclass(frozen=True)
class ExecConfig:
    """How a run executes. Never changes results, so it is not hashed."""

    engine: str = "ray"
    device: str = "auto"
    online_batch: int | None = None
    block_units: int = 64
    max_in_flight: int | None = None
    num_cpus: int | None = None
    resume: bool = False
    storage_options: dict[str, str] = field(default_factory=dict)
    connect_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _check(self.engine in ("ray", "local"), "engine must be ray or local")
        _check(self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda")
        _check(self.online_batch is None or self.online_batch >= 1, "online batch must be >= 1")
        _check(self.block_units >= 1, "block units must be >= 1")
        _check(self.max_in_flight is None or self.max_in_flight >= 1, "max in flight must be >= 1")
        _check(self.connect_timeout_s > 0, "connect timeout must be > 0")

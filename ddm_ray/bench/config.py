"""The benchmarks' options, importable without torch (the CLI builds its parser from them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ddm_ray.errors import ConfigError

PEER_NAMES = (
    "class_indicator", "gradient_ascent", "tracin", "influence", "influence_linear", "influence_damped",
    "unrolled", "unrolled_linear",
)


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark measures and how much work it does (the RunConfig fixes the model)."""

    units: int | None = field(default=None, metadata={"help": "score N units (seeded sample; default all)"})
    masks: int = field(default=50, metadata={"help": "retrained removal masks for LDS"})
    fit_masks: int = field(default=200, metadata={"help": "DDM masks for the ridge datamodel fit"})
    alpha: float = field(default=0.1, metadata={"help": "probability that a mask removes a unit"})
    ridge: float = 1e-3
    peers: tuple[str, ...] = PEER_NAMES
    ga_steps: int = 1
    if_damping: float = 0.05
    if_curvature: str = field(default="abs", metadata={"help": "abs (|eigenvalues| + damping) | damped (H + damping I)"})
    if_max_exact: int = 20_000
    skip_quality: bool = False
    noise_fraction: float = 0.1
    noise_kind: str = field(default="pair", metadata={"help": "pair (y -> y+1 mod C) | uniform (any other class)"})
    quality_peers: tuple[str, ...] = ("class_indicator", "gradient_ascent", "tracin", "unrolled_linear")
    remove_fractions: tuple[float, ...] = (0.01, 0.1, 0.2, 0.5)
    random_repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        check(self.units is None or self.units >= 2, "--units must be >= 2")
        check(self.masks >= 0, "--masks must be >= 0")
        check(self.fit_masks >= 0, "--fit-masks must be >= 0")
        check(0 < self.alpha < 1, "--alpha must be in (0, 1)")
        check(self.ridge >= 0, "--ridge must be >= 0")
        bad = [p for p in (*self.peers, *self.quality_peers) if p not in PEER_NAMES]
        check(not bad, f"unknown peers {bad}; choose from {PEER_NAMES}")
        check(self.ga_steps >= 1, "--ga-steps must be >= 1")
        check(self.if_damping >= 0, "--if-damping must be >= 0")
        check(self.if_curvature in ("abs", "damped"), "--if-curvature must be abs or damped")
        check(0 <= self.noise_fraction < 1, "--noise-fraction must be in [0, 1)")
        check(self.noise_kind in ("pair", "uniform"), "--noise-kind must be pair or uniform")
        check(all(0 < f < 1 for f in self.remove_fractions), "--remove-fractions must be in (0, 1)")
        check(self.random_repeats >= 1, "--random-repeats must be >= 1")



@dataclass(frozen=True)
class ScalingConfig:
    """What the scaling benchmark runs (the RunConfig's data section is replaced by the synthetic set)."""

    units: tuple[int, ...] = field(default=(100, 300, 1000), metadata={"help": "unit counts U"})
    train: int = field(default=10_000, metadata={"help": "synthetic training samples"})
    test: int = field(default=2_000, metadata={"help": "synthetic test samples"})
    features: int = field(default=256, metadata={"help": "synthetic input features"})
    classes: int = field(default=10, metadata={"help": "synthetic classes"})
    validate_units: int = field(default=20, metadata={"help": "units retrained exactly per U"})
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.units or min(self.units) < self.classes:
            raise ConfigError(f"every unit count must be >= the number of classes ({self.classes})")
        if self.train < max(self.units) or self.test < 1 or self.features < 1 or self.classes < 2:
            raise ConfigError("synthetic data needs train >= units, test >= 1, features >= 1, classes >= 2")
        if self.validate_units < 2:
            raise ConfigError("validate at least 2 units")

"""The benchmarks' options, importable without torch (the CLI builds its parser from them)."""

from __future__ import annotations

from dataclasses import dataclass

from ddm_ray.config import opt
from ddm_ray.errors import ConfigError

PEER_NAMES = (
    "class_indicator", "gradient_ascent", "tracin", "influence", "influence_linear", "influence_damped",
    "unrolled", "unrolled_linear",
)


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark measures and how much work it does (the RunConfig fixes the model)."""

    units: int | None = opt(None, "score N units (seeded sample; default all)")
    masks: int = opt(50, "retrained removal masks for LDS (0: skip)")
    fit_masks: int = opt(200, "DDM masks for the ridge datamodel fit")
    alpha: float = opt(0.1, "probability that a mask removes a unit")
    ridge: float = opt(1e-3, "ridge of the datamodel fit")
    peers: tuple[str, ...] = opt(PEER_NAMES, "peer methods to score")
    ga_steps: int = opt(1, "gradient-ascent steps")
    if_damping: float = opt(0.05, "influence peers: damping")
    if_curvature: str = opt("abs", "influence peers: abs (|eigenvalues| + damping) | damped (H + damping I)",
                            choices=("abs", "damped"))
    if_max_exact: int = opt(20_000, "influence peers: largest parameter count for the exact Hessian")
    skip_quality: bool = opt(False, "skip the label-noise and data-removal experiments")
    noise_fraction: float = opt(0.1, "fraction of training labels flipped")
    noise_kind: str = opt("pair", "pair (y -> y+1 mod C) | uniform (any other class)", choices=("pair", "uniform"))
    quality_peers: tuple[str, ...] = opt(("class_indicator", "gradient_ascent", "tracin", "unrolled_linear"),
                                         "peers ranked on noisy data")
    remove_fractions: tuple[float, ...] = opt((0.01, 0.1, 0.2, 0.5), "fractions of units removed")
    random_repeats: int = opt(3, "random removals per fraction")
    seed: int = opt(0, "seed of the unit sample, masks and noise", flag="bench-seed")

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        check(self.units is None or self.units >= 2, "--units must be >= 2")
        check(self.units is None or self.units <= 10_000_000, "--units must be <= 10000000")
        check(0 <= self.masks <= 100_000, "--masks must be in [0, 100000]")
        check(0 <= self.fit_masks <= 1_000_000, "--fit-masks must be in [0, 1000000]")
        check(0 < self.alpha < 1, "--alpha must be in (0, 1)")
        check(self.ridge >= 0, "--ridge must be >= 0")
        bad = [p for p in (*self.peers, *self.quality_peers) if p not in PEER_NAMES]
        check(not bad, f"unknown peers {bad}; choose from {PEER_NAMES}")
        check(1 <= self.ga_steps <= 10_000, "--ga-steps must be in [1, 10000]")
        check(1 <= self.if_max_exact <= 50_000, "--if-max-exact must be in [1, 50000] (the exact Hessian is its square)")
        check(self.if_damping >= 0, "--if-damping must be >= 0")
        check(self.if_curvature in ("abs", "damped"), "--if-curvature must be abs or damped")
        check(0 <= self.noise_fraction < 1, "--noise-fraction must be in [0, 1)")
        check(self.noise_kind in ("pair", "uniform"), "--noise-kind must be pair or uniform")
        check(all(0 < f < 1 for f in self.remove_fractions), "--remove-fractions must be in (0, 1)")
        check(1 <= self.random_repeats <= 1000, "--random-repeats must be in [1, 1000]")



@dataclass(frozen=True)
class ScalingConfig:
    """What the scaling benchmark runs (the RunConfig's data section is replaced by the synthetic set)."""

    units: tuple[int, ...] = opt((100, 300, 1000), "unit counts U", flag="unit-counts")
    train: int = opt(10_000, "synthetic training samples", flag="synthetic-train")
    test: int = opt(2_000, "synthetic test samples", flag="synthetic-test")
    features: int = opt(256, "synthetic input features", flag="synthetic-features")
    classes: int = opt(10, "synthetic classes", flag="synthetic-classes")
    validate_units: int = opt(20, "units retrained exactly per U")
    seed: int = opt(0, "", flag="")  # the run's --seed

    def __post_init__(self) -> None:
        if not self.units or min(self.units) < self.classes:
            raise ConfigError(f"every unit count must be >= the number of classes ({self.classes})")
        if self.train < max(self.units) or self.test < 1 or self.features < 1 or self.classes < 2:
            raise ConfigError("synthetic data needs train >= units, test >= 1, features >= 1, classes >= 2")
        if self.validate_units < 2:
            raise ConfigError("validate at least 2 units")
        if max(self.units) > 10_000_000 or self.train > 100_000_000 or self.test > 10_000_000 \
                or self.features > 1_000_000 or self.classes > 100_000 or self.validate_units > 100_000:
            raise ConfigError("synthetic sizes too large: at most 10000000 units, 100000000 train and 10000000 test "
                              "samples, 1000000 features, 100000 classes, 100000 validated units")

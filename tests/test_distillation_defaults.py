"""The default's cost-driven choices: how many directions the adjoint runs on, how many units
calibrate the targets' lengths."""

from __future__ import annotations

import pytest

from ddm_ray.config import DistillConfig, ModelConfig
from ddm_ray.core.models import Network
from ddm_ray.distillation import (
    CONV_UNROLLED_RANK,
    SCALE_CALIBRATION_UNITS,
    calibration_count,
    calibration_units,
    unrolled_rank_of,
)
from ddm_ray.errors import ConfigError


def test_the_hessian_is_the_default_curvature_and_the_gauss_newton_one_is_asked_for():
    assert DistillConfig().curvature == "hessian"  # for every model: distillation reads only this field
    assert DistillConfig(curvature="ggn").curvature == "ggn"
    with pytest.raises(ConfigError, match="curvature must be one of"):
        DistillConfig(curvature="auto")


def test_one_fitted_length_needs_only_a_few_calibration_units():
    assert calibration_count(78, 16, pieces=3) == 16
    assert calibration_count(78, 16, pieces=1) == SCALE_CALIBRATION_UNITS
    assert calibration_count(6, 16, pieces=1) == 2  # still at most a quarter
    # the smaller draw is a prefix-free subset of the same seeded permutation: deterministic
    assert calibration_units(78, 16, 0, pieces=1) == calibration_units(78, 16, 0, pieces=1)


def test_adjoint_covers_every_direction_of_an_mlp_and_a_few_of_a_convnet():
    mlp = Network(ModelConfig(arch="mlp"), (1, 8, 8), 10)
    conv = Network(ModelConfig(arch="convnet"), (1, 8, 8), 10)
    d = DistillConfig()
    assert d.unrolled_rank is None
    assert unrolled_rank_of(d, mlp, 245) == 245
    assert unrolled_rank_of(d, conv, 245) == CONV_UNROLLED_RANK
    assert unrolled_rank_of(d, conv, 10) == 10  # never more than the subspace has
    assert unrolled_rank_of(DistillConfig(unrolled_rank=0), conv, 245) == 0  # no adjoint
    given = DistillConfig(unrolled_rank=64)
    assert unrolled_rank_of(given, mlp, 245) == 64 and unrolled_rank_of(given, conv, 245) == 64


@pytest.mark.parametrize(("units", "want"), [(78, 16), (30, 7), (5, 2), (1, 1), (1000, 16)])
def test_calibration_takes_at_most_a_quarter_of_the_units(units, want):
    got = calibration_units(units, 16, seed=0)
    assert len(got) == want and got == sorted(set(got)) and all(0 <= u < units for u in got)
    assert got == calibration_units(units, 16, seed=0)  # seeded: the same for every run

"""The default's cost-driven choices: how many directions the adjoint runs on, how many units
calibrate the targets' lengths."""

from __future__ import annotations

import pytest

from ddm_ray.config import DistillConfig, ModelConfig
from ddm_ray.core.models import Network
from ddm_ray.distillation import CONV_UNROLLED_RANK, calibration_units, unrolled_rank_of


def test_adjoint_covers_every_direction_of_an_mlp_and_a_few_of_a_convnet():
    mlp = Network(ModelConfig(arch="mlp"), (1, 8, 8), 10)
    conv = Network(ModelConfig(arch="convnet"), (1, 8, 8), 10)
    d = DistillConfig()
    assert d.unrolled_rank is None
    assert unrolled_rank_of(d, mlp, 245) == 245
    assert unrolled_rank_of(d, conv, 245) == CONV_UNROLLED_RANK
    assert unrolled_rank_of(d, conv, 10) == 10  # never more than the subspace has
    given = DistillConfig(unrolled_rank=64)
    assert unrolled_rank_of(given, mlp, 245) == 64 and unrolled_rank_of(given, conv, 245) == 64


@pytest.mark.parametrize(("units", "want"), [(78, 16), (30, 7), (5, 2), (1, 1), (1000, 16)])
def test_calibration_takes_at_most_a_quarter_of_the_units(units, want):
    got = calibration_units(units, 16, seed=0)
    assert len(got) == want and got == sorted(set(got)) and all(0 <= u < units for u in got)
    assert got == calibration_units(units, 16, seed=0)  # seeded: the same for every run

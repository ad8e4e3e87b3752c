import pytest
import torch

from ddm_ray.core.units import kmeans, make_units
from ddm_ray.errors import InputError
from tests.conftest import blobs


def test_units_never_mix_classes_and_are_non_empty():
    x, y = blobs(60, dim=4, classes=3)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    units = make_units(x, y, 3, k=4, iters=20, seed=0)
    assert units.num_units == 12
    for u in range(12):
        m = units.members(u)
        assert m.numel() >= 1
        assert torch.all(y[m] == units.label[u])
    assert torch.equal(units.unit_of // 4, y)


def test_kmeans_is_deterministic_and_handles_duplicates():
    feats = torch.zeros(10, 3)
    feats[5:] = 1.0  # two distinct points, ask for 4 clusters: empties must be re-seeded
    a = kmeans(feats, 4, 10, seed=0)
    b = kmeans(feats, 4, 10, seed=0)
    assert torch.equal(a, b)
    assert torch.bincount(a, minlength=4).min() >= 1


def test_class_smaller_than_k_is_rejected():
    x, y = blobs(9, dim=4, classes=3)
    with pytest.raises(InputError, match="fewer than"):
        make_units(torch.from_numpy(x), torch.from_numpy(y), 3, k=4, iters=5, seed=0, class_names=[7, 8, 9])

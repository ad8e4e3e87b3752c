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


def test_small_clusters_are_merged_until_every_unit_has_min_size():
    from ddm_ray.core.units import merge_small

    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(20, 2, generator=g), torch.randn(3, 2, generator=g) + 10, torch.randn(1, 2) - 10])
    y = torch.zeros(24, dtype=torch.long)
    u = make_units(feats, y, 1, k=3, iters=20, seed=0, min_size=5)
    counts = torch.bincount(u.unit_of)
    assert int(counts.min()) >= 5 and int(counts.sum()) == 24 and u.num_units == int(counts.numel())
    assert u.label.tolist() == [0] * u.num_units
    # without merging k-means keeps the tiny clusters
    assert int(torch.bincount(make_units(feats, y, 1, k=3, iters=20, seed=0).unit_of).min()) < 5
    # ids stay dense; a single cluster is kept even if small
    assert merge_small(feats[:3], torch.tensor([0, 0, 1]), min_size=5).tolist() == [0, 0, 0]


def test_units_from_a_column_may_span_classes():
    from ddm_ray.core.units import units_from_column

    values = ["b", "a", "b", "c", "a"]
    y = torch.tensor([0, 1, 0, 1, 0])
    u = units_from_column(values, y, "source")
    assert u.names == ["a", "b", "c"] and u.level == "column:source"
    assert u.unit_of.tolist() == [1, 0, 1, 2, 0]
    assert u.label.tolist() == [-1, 0, 1]  # "a" spans classes 1 and 0

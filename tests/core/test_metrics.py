"""Agreement metrics on hand-computed inputs: Pearson, Spearman, LDS, AUC, precision@k."""

import math

import torch

from ddm_ray.core.datamodel import lds
from ddm_ray.core.metrics import auc, nanmean, pearson, precision_at_k, spearman


def test_pearson_known_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert math.isclose(float(pearson(a, 2 * a + 1)), 1.0, abs_tol=1e-12)
    assert math.isclose(float(pearson(a, -a)), -1.0, abs_tol=1e-12)
    # centred a = (-1.5,-.5,.5,1.5), b = (1,0,0,1) centred (.5,-.5,-.5,.5): num 0 -> 0
    assert math.isclose(float(pearson(a, torch.tensor([1.0, 0.0, 0.0, 1.0]))), 0.0, abs_tol=1e-12)
    # (1,2,3) vs (1,3,2): centred (-1,0,1)·(-1,1,0) = 1, norms sqrt2*sqrt2 -> 0.5
    assert math.isclose(float(pearson(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 3, 2]))), 0.5, abs_tol=1e-12)


def test_pearson_of_matrix_all_pairs_and_per_column():
    pred = torch.tensor([[1.0, 1.0], [2.0, 3.0], [3.0, 2.0]])
    exact = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    per_col = pearson(pred, exact, dim=0)
    torch.testing.assert_close(per_col, torch.tensor([1.0, 0.5], dtype=torch.float64))
    # flattened: pred (1,1,2,3,3,2), exact (1,1,2,2,3,3); means 2 and 2
    # centred p (-1,-1,0,1,1,0), e (-1,-1,0,0,1,1): num 3, |p|^2 4, |e|^2 4 -> 0.75
    assert math.isclose(float(pearson(pred, exact)), 0.75, abs_tol=1e-12)
    assert math.isnan(float(pearson(torch.ones(3), torch.arange(3.0))))


def test_spearman_is_pearson_of_ranks_with_ties():
    a = torch.tensor([10.0, 20.0, 30.0, 40.0])
    assert math.isclose(float(spearman(a, a**3)), 1.0, abs_tol=1e-12)
    # ranks of (1,1,2): (1.5,1.5,3) vs (1,2,3): centred (-.5,-.5,1)·(-1,0,1) = 1.5; norms sqrt1.5*sqrt2
    got = float(spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])))
    assert math.isclose(got, 1.5 / math.sqrt(1.5 * 2), abs_tol=1e-12)
    assert nanmean(torch.tensor([1.0, float("nan"), 0.0])) == 0.5


def test_lds_on_known_matrices():
    actual = torch.tensor([[1.0, 5.0], [2.0, 6.0], [3.0, 4.0]])  # masks x test samples
    pred = torch.tensor([[0.1, 0.0], [0.2, 1.0], [0.3, 2.0]])
    # column 0 ranks agree (1); column 1 actual ranks (2,3,1) vs pred (1,2,3): spearman -0.5
    assert math.isclose(lds(pred, actual), (1.0 - 0.5) / 2, abs_tol=1e-12)


def test_auc_hand_computed():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([1, 0, 1, 0, 0])
    # positive pairs won: 0.9 beats 3 negatives, 0.7 beats 2 -> 5 of 6
    assert math.isclose(auc(scores, labels), 5 / 6, abs_tol=1e-12)
    assert auc(torch.tensor([1.0, 2.0]), torch.tensor([0, 1])) == 1.0
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == 0.5  # ties count one half
    assert math.isnan(auc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])))


def test_precision_at_k():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([1, 0, 1, 0, 0])
    assert precision_at_k(scores, labels, 1) == 1.0
    assert precision_at_k(scores, labels, 2) == 0.5
    assert math.isclose(precision_at_k(scores, labels, 3), 2 / 3)
    assert precision_at_k(scores, labels, 10) == 0.4  # k capped at n

"""Linear datamodel: masks, ridge fit recovering a known linear model, additive prediction."""

import torch

from ddm_ray.core.datamodel import additive_prediction, fit_datamodel, lds, predict, random_masks


def test_random_masks_rate_and_nonempty():
    m = random_masks(400, 50, 0.1, seed=3)
    assert m.shape == (400, 50) and m.dtype == torch.bool
    assert m.any(1).all()
    assert abs(float(m.float().mean()) - 0.1) < 0.02
    assert torch.equal(m, random_masks(400, 50, 0.1, seed=3))


def test_ridge_recovers_linear_datamodel():
    torch.manual_seed(0)
    masks = random_masks(300, 12, 0.3, seed=1)
    w_true = torch.randn(12, 5).double()
    b_true = torch.randn(5).double()
    outputs = masks.double() @ w_true + b_true
    w, b = fit_datamodel(masks, outputs, ridge=0.0)
    torch.testing.assert_close(w, w_true)
    torch.testing.assert_close(b, b_true)
    assert lds(predict(w, b, masks), outputs) > 0.999


def test_additive_prediction_sums_removed_rows():
    loo = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    masks = torch.tensor([[True, False, True], [False, True, False]])
    torch.testing.assert_close(additive_prediction(loo, masks), torch.tensor([[4.0, 3.0], [0.0, 2.0]], dtype=torch.float64))

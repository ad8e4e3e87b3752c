import math

import torch

from ddm_ray.core.matching import reverse_matching_distance


def _rotate(v: torch.Tensor, w: torch.Tensor, angle: float) -> torch.Tensor:
    """v rotated by `angle` towards w (w orthogonalised against v), same norm."""
    w = w - (w @ v) / (v @ v) * v
    w = w / w.norm() * v.norm()
    return math.cos(angle) * v + math.sin(angle) * w


def test_zero_when_synthetic_gradient_is_exact_reverse():
    torch.manual_seed(0)
    real = {"a": torch.randn(3, 4, 5), "b": torch.randn(3, 7)}
    syn = {k: -2.5 * v for k, v in real.items()}
    d = reverse_matching_distance(syn, real)
    assert d.shape == (3,)
    assert torch.allclose(d, torch.zeros(3), atol=1e-6)


def test_grows_as_gradients_diverge():
    torch.manual_seed(1)
    r = torch.randn(20)
    other = torch.randn(20)
    dists = []
    for angle in [0.0, 0.3, 0.8, 1.5, 2.5, math.pi]:
        syn = -_rotate(r, other, angle)
        dists.append(float(reverse_matching_distance({"w": syn[None]}, {"w": r[None]})))
    assert dists[0] < 1e-6
    assert all(b > a for a, b in zip(dists, dists[1:], strict=False))
    assert abs(dists[-1] - 2.0) < 1e-5  # same direction as the real gradient: the worst case

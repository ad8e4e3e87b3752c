"""Offline estimate of each unit's counterfactual displacement theta_{-u} - theta_final.

Unrolled SGD influence (Hara et al. 2019), propagated forward for all units at once while the
training run is replayed. With s_t(u) = (1/B) sum_{i in u, i in batch t} grad l_i(theta_t) and
H_t the batch Hessian (plus weight decay):

    plain SGD:     D_{t+1} = D_t - lr (H_t D_t - s_t)
    momentum mu:   V_{t+1} = mu V_t + H_t D_t - s_t ;  D_{t+1} = D_t - lr V_{t+1}

D has shape (U, P) per parameter tensor: (U, *param.shape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from ddm_ray.config import TrainConfig
from ddm_ray.core.models import Network, Params
from ddm_ray.core.training import batch_loss, train


class _Unroller:
    def __init__(
        self,
        net: Network,
        x: torch.Tensor,
        y: torch.Tensor,
        unit_of: torch.Tensor,
        num_units: int,
        params0: Params,
        cfg: TrainConfig,
        chunk: int,
    ) -> None:
        self.net, self.x, self.y, self.unit_of, self.cfg, self.chunk = net, x, y, unit_of, cfg, chunk
        self.num_units = num_units
        self.d: Params = {
            k: torch.zeros((num_units, *v.shape), device=v.device, dtype=v.dtype) for k, v in params0.items()
        }
        self.v: Params | None = (
            {k: torch.zeros_like(t) for k, t in self.d.items()} if cfg.momentum > 0 else None
        )

    def __call__(self, step: int, params: Params, batch: torch.Tensor, _vel: Params | None) -> None:
        net, cfg = self.net, self.cfg
        nominal = batch.numel()
        xb, yb, ub = self.x[batch], self.y[batch], self.unit_of[batch]

        def one_loss(p: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(net.logits(p, xi[None]), yi[None], reduction="sum") / nominal

        per_sample = vmap(grad(one_loss), in_dims=(None, 0, 0))(params, xb, yb)  # (b, *shape)
        src = {
            k: torch.zeros_like(self.d[k]).index_add_(0, ub, g) for k, g in per_sample.items()
        }  # (U, *shape)

        g_fn = grad(lambda p: batch_loss(net, p, xb, yb, nominal))

        def hvp(t: Params) -> Params:
            return jvp(g_fn, (params,), (t,))[1]

        hd = vmap(hvp, chunk_size=self.chunk)(self.d)
        for k in self.d:
            drive = hd[k] - src[k]
            if cfg.weight_decay:
                drive = drive + cfg.weight_decay * self.d[k]
            if self.v is not None:
                self.v[k] = cfg.momentum * self.v[k] + drive
                drive = self.v[k]
            self.d[k] = self.d[k] - cfg.lr * drive


def unrolled_displacement(
    net: Network,
    params0: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    unit_of: torch.Tensor,
    num_units: int,
    cfg: TrainConfig,
    unroll_epochs: int | None = None,
    chunk: int = 256,
) -> Params:
    """Replay training from params0 on x (N, ...), y (N,); return D: (U, *shape) per parameter.

    unit_of (N,) maps each training sample to its unit in [0, U). With unroll_epochs set, only the
    last that many epochs are unrolled (earlier removals are treated as absorbed).
    """
    unroller = _Unroller(net, x, y, unit_of, num_units, params0, cfg, chunk)
    start = 0 if unroll_epochs is None else max(0, cfg.epochs - unroll_epochs)
    train(net, params0, x, y, cfg, hook=unroller, start_epoch_hook=start)
    return unroller.d

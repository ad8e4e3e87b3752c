"""Peer attribution methods DDM is measured against (pure torch: no Ray, no I/O).

Every peer answers the same question as DDM's leave-one-out rows: for each unit u in `units`,
the change of every objective on every test sample when u is removed from training,

    deltas: (n_obj, U, N_test)  with  deltas[j, u, x] ~= f_j(theta_{-u}, x) - f_j(theta_final, x).

Peers (each returns a `PeerResult` with the deltas and its offline / online seconds):

* `class_indicator`: +1 on test samples of the unit's class (loss), -1 for margin and correct.
* `gradient_ascent`: `steps` ascent steps on the unit's real samples from theta_final,
  theta + lr/B * sum_{i in u} grad l_i, evaluated at the new parameters.
* `tracin`: first-order replay over the checkpoints; each training sample is visited once per epoch
  with step lr/B, so removal moves theta by +lr/B * G_u(theta_c) per epoch and
      delta f(x) ~= sum_c lr/B * <grad f(theta_c, x), G_u(theta_c)>,   G_u = sum_{i in u} grad l_i.
* `influence`: Delta theta_u = (1/N) (H + damping I)^{-1} G_u(theta_final), H the Hessian of the
  mean training loss at theta_final (exact and dense when P <= max_exact, else conjugate gradient
  with Hessian-vector products).
* `unrolled`: Delta theta_u from unrolled SGD influence over the trajectory (Hara et al. 2019,
  `core.displacement`).

Parameter-space peers (`influence`, `unrolled`) turn Delta theta into objectives either by evaluating
the network at theta + Delta theta (mode "eval") or by linearisation (mode "linear": loss and
margin through their test gradients; correct from the sign of the linearised margin).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from ddm_ray.config import TrainConfig
from ddm_ray.core.displacement import unrolled_displacement
from ddm_ray.core.models import Network, Params, flatten, unflatten
from ddm_ray.core.objectives import all_objectives, per_sample
from ddm_ray.core.online import base_objectives
from ddm_ray.core.probe import per_sample_grads
from ddm_ray.core.training import Trajectory

MODES = ("eval", "linear")


@dataclass
class PeerInputs:
    """What every peer may use: the trained model, its trajectory, the data and the units.

    x_train (N, ...), y_train (N,), unit_of (N,) unit id per training sample in [0, num_units),
    x_test (N_test, ...), y_test (N_test,), unit_label (num_units,) class index per unit.
    """

    net: Network
    params0: Params
    traj: Trajectory
    x_train: torch.Tensor
    y_train: torch.Tensor
    unit_of: torch.Tensor
    unit_label: torch.Tensor
    train_cfg: TrainConfig
    x_test: torch.Tensor
    y_test: torch.Tensor
    objectives: tuple[str, ...]

    @property
    def final(self) -> Params:
        return self.traj.final

    def base_objectives(self, params: Params | None = None) -> torch.Tensor:
        """f(theta, x) for every objective at params (default theta_final): (n_obj, N_test), by
        `core.online.base_objectives` (the one implementation)."""
        return base_objectives(self.net, params or self.final, self.x_test, self.y_test, self.objectives)


@dataclass
class PeerResult:
    """deltas (n_obj, U, N_test) float32; seconds spent once (offline) and for all U units (online)."""

    deltas: torch.Tensor
    offline_seconds: float
    online_seconds: float


# ---- shared pieces --------------------------------------------------------------------------------
def unit_gradient_sums(
    net: Network, params: Params, x: torch.Tensor, y: torch.Tensor, unit_of: torch.Tensor,
    units: Sequence[int], chunk: int = 512,
) -> torch.Tensor:
    """G (U, P): G[j] = sum over samples i of unit units[j] of grad CE_i(params), flat."""
    local = torch.full_like(unit_of, -1)
    for j, u in enumerate(units):
        local[unit_of == u] = j
    sel = torch.nonzero(local >= 0).flatten()
    flat = flatten(params)
    out = torch.zeros(len(units), flat.numel(), dtype=flat.dtype)
    for i in range(0, sel.numel(), chunk):
        idx = sel[i : i + chunk]
        out.index_add_(0, local[idx], per_sample_grads(net, params, x[idx], y[idx], chunk))
    return out


def test_jacobian(
    net: Network, params: Params, x_test: torch.Tensor, y_test: torch.Tensor, name: str, chunk: int = 512
) -> torch.Tensor:
    """J (N_test, P): gradient of objective `name` (loss or margin) per test sample, flat."""
    like = params
    flat = flatten(params)

    if name not in ("loss", "margin"):
        raise ValueError(f"objective {name!r} has no gradient; use loss or margin")
    onehot = F.one_hot(y_test, net.num_classes).to(flat.dtype)  # (N_test, C), built outside vmap

    def one(pf: torch.Tensor, xi: torch.Tensor, oh: torch.Tensor) -> torch.Tensor:
        z = net.logits(unflatten(pf, like), xi[None])[0]
        true = (z * oh).sum()
        if name == "loss":
            return torch.logsumexp(z, 0) - true
        return true - (z - 1e30 * oh).max()

    g_fn = vmap(grad(one), in_dims=(None, 0, 0))
    return torch.cat([g_fn(flat, x_test[i : i + chunk], onehot[i : i + chunk]) for i in range(0, len(x_test), chunk)])


def _linear_from_margin_and_loss(
    inp: PeerInputs, d_loss: torch.Tensor | None, d_margin: torch.Tensor | None, base: torch.Tensor
) -> torch.Tensor:
    """Assemble (n_obj, U, N) from linearised loss and margin deltas (U, N)."""
    rows = []
    for j, name in enumerate(inp.objectives):
        if name == "loss":
            rows.append(d_loss)
        elif name == "margin":
            rows.append(d_margin)
        else:  # correct: the sign of the linearised margin decides
            assert d_margin is not None
            m0 = per_sample(inp.net.logits(inp.final, inp.x_test), inp.y_test, "margin")
            rows.append(((m0[None, :] + d_margin) > 0).to(d_margin.dtype) - base[j][None, :])
    return torch.stack(rows).float()


def _needs(inp: PeerInputs) -> tuple[bool, bool]:
    need_loss = "loss" in inp.objectives
    need_margin = "margin" in inp.objectives or "correct" in inp.objectives
    return need_loss, need_margin


def linearised_objectives(inp: PeerInputs, disp: torch.Tensor, at: Params | None = None) -> torch.Tensor:
    """First-order deltas of every objective for displacements disp (U, P): (n_obj, U, N_test)."""
    at = at or inp.final
    need_loss, need_margin = _needs(inp)
    d_loss = disp.to(torch.float32) @ test_jacobian(inp.net, at, inp.x_test, inp.y_test, "loss").T if need_loss else None
    d_margin = (
        disp.to(torch.float32) @ test_jacobian(inp.net, at, inp.x_test, inp.y_test, "margin").T if need_margin else None
    )
    return _linear_from_margin_and_loss(inp, d_loss, d_margin, inp.base_objectives())


def evaluated_objectives(inp: PeerInputs, disp: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Deltas of every objective at theta_final + disp[u] for each row of disp (U, P): (n_obj, U, N)."""
    final = inp.final
    theta = flatten(final)
    base = inp.base_objectives()

    def logits_of(pf: torch.Tensor) -> torch.Tensor:
        return inp.net.logits(unflatten(pf, final), inp.x_test)

    out = []
    with torch.no_grad():
        for i in range(0, disp.shape[0], chunk):
            p = theta[None, :] + disp[i : i + chunk].to(theta.dtype)
            logits = vmap(logits_of)(p)  # (b, N, C)
            out.append(all_objectives(logits, inp.y_test, inp.objectives) - base[:, None, :])
    return torch.cat(out, 1).float()


def displacement_objectives(inp: PeerInputs, disp: torch.Tensor, mode: str) -> torch.Tensor:
    """Objectives from parameter displacements disp (U, P) by `mode` (eval | linear)."""
    if mode == "eval":
        return evaluated_objectives(inp, disp)
    if mode == "linear":
        return linearised_objectives(inp, disp)
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


# ---- peers ---------------------------------------------------------------------------------------
def class_indicator(inp: PeerInputs, units: Sequence[int]) -> PeerResult:
    """No model: removal of a unit raises the loss of its class's test samples (sign only)."""
    t0 = time.perf_counter()
    ind = (inp.unit_label[list(units)][:, None] == inp.y_test[None, :]).float()  # (U, N)
    sign = {"loss": 1.0, "margin": -1.0, "correct": -1.0}
    deltas = torch.stack([sign[n] * ind for n in inp.objectives])
    return PeerResult(deltas, 0.0, time.perf_counter() - t0)


def gradient_ascent(
    inp: PeerInputs, units: Sequence[int], steps: int = 1, lr: float | None = None
) -> PeerResult:
    """`steps` ascent steps of size lr (default: the training lr) on each unit's real samples.

    The step loss is the unit's summed cross-entropy over the training batch size, as in training.
    """
    lr = inp.train_cfg.lr if lr is None else lr
    b = inp.train_cfg.batch_size
    t0 = time.perf_counter()
    if steps == 1:
        g = unit_gradient_sums(inp.net, inp.final, inp.x_train, inp.y_train, inp.unit_of, units)
        deltas = evaluated_objectives(inp, lr / b * g)
        return PeerResult(deltas, 0.0, time.perf_counter() - t0)
    base = inp.base_objectives()
    rows = []
    for u in units:
        idx = inp.unit_of == u
        xu, yu = inp.x_train[idx], inp.y_train[idx]
        p = inp.final
        g_fn = grad(lambda q, xu=xu, yu=yu: F.cross_entropy(inp.net.logits(q, xu), yu, reduction="sum") / b)
        for _ in range(steps):
            g = g_fn(p)
            p = {k: p[k] + lr * g[k] for k in p}
        rows.append(inp.base_objectives(p) - base)
    return PeerResult(torch.stack(rows, 1).float(), 0.0, time.perf_counter() - t0)


def tracin(inp: PeerInputs, units: Sequence[int], checkpoints: Sequence[int] | None = None) -> PeerResult:
    """First-order checkpoint replay (TracIn-style) over checkpoints (default: end of every epoch).

    delta f(x) = sum_c lr/B <grad f(theta_c, x), G_u(theta_c)>; correct from the linearised margin.
    """
    cfg = inp.train_cfg
    ckpts = list(checkpoints) if checkpoints is not None else list(range(1, len(inp.traj.checkpoints)))
    need_loss, need_margin = _needs(inp)
    t0 = time.perf_counter()
    n_test = inp.x_test.shape[0]
    d_loss = torch.zeros(len(units), n_test) if need_loss else None
    d_margin = torch.zeros(len(units), n_test) if need_margin else None
    scale = cfg.lr / cfg.batch_size
    for c in ckpts:
        p = inp.traj.checkpoints[c]
        g = unit_gradient_sums(inp.net, p, inp.x_train, inp.y_train, inp.unit_of, units) * scale
        if d_loss is not None:
            d_loss += g @ test_jacobian(inp.net, p, inp.x_test, inp.y_test, "loss").T
        if d_margin is not None:
            d_margin += g @ test_jacobian(inp.net, p, inp.x_test, inp.y_test, "margin").T
    deltas = _linear_from_margin_and_loss(inp, d_loss, d_margin, inp.base_objectives())
    return PeerResult(deltas, 0.0, time.perf_counter() - t0)


def _mean_loss_fn(inp: PeerInputs):  # noqa: ANN202 - a closure over flat params
    like = inp.final
    n = inp.x_train.shape[0]
    wd = inp.train_cfg.weight_decay

    def loss(pf: torch.Tensor) -> torch.Tensor:
        out = F.cross_entropy(inp.net.logits(unflatten(pf, like), inp.x_train), inp.y_train, reduction="sum") / n
        return out + 0.5 * wd * pf.pow(2).sum() if wd else out

    return loss


def hessian(inp: PeerInputs, chunk: int = 256) -> torch.Tensor:
    """Dense Hessian (P, P) of the mean training loss at theta_final, by chunked HVPs."""
    loss = _mean_loss_fn(inp)
    theta = flatten(inp.final)
    g_fn = grad(loss)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return jvp(g_fn, (theta,), (v,))[1]

    p = theta.numel()
    rows = []
    for i in range(0, p, chunk):
        eye = torch.zeros(min(chunk, p - i), p, dtype=theta.dtype)
        eye[torch.arange(eye.shape[0]), torch.arange(i, i + eye.shape[0])] = 1.0
        rows.append(vmap(hvp)(eye))
    h = torch.cat(rows)
    return 0.5 * (h + h.T)


def conjugate_gradient(
    matvec, b: torch.Tensor, iters: int = 100, tol: float = 1e-6  # noqa: ANN001
) -> torch.Tensor:
    """Solve A X = B for symmetric positive definite A given by matvec on rows: B (U, P) -> X (U, P)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    b_norm = b.norm(dim=1).clamp_min(1e-30)
    for _ in range(iters):
        ap = matvec(p)
        alpha = rs / (p * ap).sum(1).clamp_min(1e-30)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = (r * r).sum(1)
        if bool((rs_new.sqrt() / b_norm < tol).all()):
            break
        p = r + (rs_new / rs.clamp_min(1e-30))[:, None] * p
        rs = rs_new
    return x


def influence_displacement(
    inp: PeerInputs,
    units: Sequence[int],
    damping: float = 0.05,
    max_exact: int = 20_000,
    cg_iters: int = 100,
    curvature: str = "damped",
    hess: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Delta theta_u = (1/N) (H + damping I)^{-1} G_u for each unit: (U, P), offline s, online s.

    P <= max_exact: dense Hessian, then curvature "damped" solves with H + damping I (LU), and
    "abs" with V (|Lambda| + damping) V^T from the eigendecomposition (saddle-free: a trained
    network's H has negative eigenvalues, where the plain damped solve blows up).
    `hess` (P, P) reuses a Hessian computed before (its cost is then not counted here).
    P > max_exact (the dense Hessian does not fit): batched conjugate gradient. Curvature "abs"
    then uses the Gauss-Newton matrix (positive semi-definite, the usual large-model stand-in for
    the saddle-free |H|) plus damping; "damped" uses H + damping I, which must be positive definite
    (raise damping if the solve does not converge).
    """
    if curvature not in ("damped", "abs"):
        raise ValueError(f"curvature must be damped or abs, got {curvature!r}")
    n = inp.x_train.shape[0]
    theta = flatten(inp.final)
    t0 = time.perf_counter()
    lu = eig = None
    if theta.numel() <= max_exact:
        h = hessian(inp) if hess is None else hess
        if curvature == "abs":
            ev, vec = torch.linalg.eigh(h)
            eig = (1.0 / (ev.abs() + damping), vec)
        else:
            h = h.double()
            h.diagonal().add_(damping)
            lu = torch.linalg.lu_factor(h)
    offline = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = unit_gradient_sums(inp.net, inp.final, inp.x_train, inp.y_train, inp.unit_of, units) / n
    if eig is not None:
        inv, vec = eig
        disp = ((g @ vec) * inv[None, :]) @ vec.T
    elif lu is not None:
        disp = torch.linalg.lu_solve(lu[0], lu[1], g.double().T).T.float()
    else:
        if curvature == "abs":
            mvp = gauss_newton_vp(inp)
        else:
            g_fn = grad(_mean_loss_fn(inp))

            def mvp(v: torch.Tensor) -> torch.Tensor:
                return jvp(g_fn, (theta,), (v,))[1]

        disp = conjugate_gradient(lambda v: vmap(mvp)(v) + damping * v, g, iters=cg_iters)
        if not bool(torch.isfinite(disp).all()):
            raise ValueError("influence: conjugate gradient diverged (the damped Hessian is indefinite); "
                             "raise the damping or use curvature abs")
    return disp, offline, time.perf_counter() - t0


def gauss_newton_vp(inp: PeerInputs):  # noqa: ANN201 - a closure over flat params
    """v (P,) -> G v, G = (1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i + wd I: the Gauss-Newton
    matrix of the mean cross-entropy at theta_final (J_i the logits' Jacobian), PSD by construction."""
    like = inp.final
    theta = flatten(like)
    n = inp.x_train.shape[0]
    wd = inp.train_cfg.weight_decay

    def logits(pf: torch.Tensor) -> torch.Tensor:
        return inp.net.logits(unflatten(pf, like), inp.x_train)

    with torch.no_grad():
        prob = torch.softmax(logits(theta), -1)  # (N, C)

    def gvp(v: torch.Tensor) -> torch.Tensor:
        _, jv = jvp(logits, (theta,), (v,))  # (N, C)
        hjv = prob * jv - prob * (prob * jv).sum(-1, keepdim=True)
        _, back = torch.func.vjp(logits, theta)
        out = back(hjv)[0] / n
        return out + wd * v if wd else out

    return gvp


def influence(
    inp: PeerInputs,
    units: Sequence[int],
    damping: float = 0.05,
    mode: str = "eval",
    max_exact: int = 20_000,
    cg_iters: int = 100,
    curvature: str = "damped",
) -> PeerResult:
    """Influence-function deltas (see `influence_displacement`), objectives by `mode`."""
    disp, offline, online = influence_displacement(inp, units, damping, max_exact, cg_iters, curvature)
    t0 = time.perf_counter()
    deltas = displacement_objectives(inp, disp, mode)
    return PeerResult(deltas, offline, online + time.perf_counter() - t0)


def unrolled_displacement_of(
    inp: PeerInputs, units: Sequence[int], unroll_epochs: int | None = None
) -> tuple[torch.Tensor, float]:
    """Unrolled SGD influence (Hara et al. 2019) for `units`: Delta theta (U, P) and seconds.

    One replay of training for all `units` at once; other samples map to a dummy unit.
    """
    t0 = time.perf_counter()
    local = torch.full_like(inp.unit_of, len(units))
    for j, u in enumerate(units):
        local[inp.unit_of == u] = j
    d = unrolled_displacement(
        inp.net, inp.params0, inp.x_train, inp.y_train, local, len(units) + 1, inp.train_cfg, unroll_epochs
    )
    disp = torch.cat([v.flatten(1) for v in d.values()], 1)[: len(units)]
    return disp, time.perf_counter() - t0


def unrolled(
    inp: PeerInputs, units: Sequence[int], mode: str = "eval", unroll_epochs: int | None = None
) -> PeerResult:
    """Unrolled SGD influence over the training run, then objectives by `mode`."""
    disp, offline = unrolled_displacement_of(inp, units, unroll_epochs)
    t0 = time.perf_counter()
    deltas = displacement_objectives(inp, disp, mode)
    return PeerResult(deltas, offline, time.perf_counter() - t0)

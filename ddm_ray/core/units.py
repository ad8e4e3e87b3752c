"""Units: each class split into K clusters by seeded k-means. Units never mix classes.

Unit ids are global and ordered by class index then cluster: unit = class_index * K + cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddm_ray.errors import InputError


@dataclass
class Units:
    """unit_of (N,) int64 unit id of each training sample; label (U,) class index of each unit."""

    unit_of: torch.Tensor
    label: torch.Tensor
    level: str = "cluster"  # how units were formed: "cluster" (k-means in a class) or "column:<name>"

    @property
    def num_units(self) -> int:
        return int(self.label.numel())

    def members(self, unit: int) -> torch.Tensor:
        """Indices (n_u,) of the training samples in `unit`, ascending."""
        return torch.nonzero(self.unit_of == unit).flatten()


def kmeans(feats: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Assign each row of feats (n, d) to one of k non-empty clusters; returns (n,) int64.

    k-means++ seeding from a seeded generator, Lloyd iterations, and any cluster that empties is
    re-seeded with the point farthest from its centre, so every cluster keeps at least one member.
    """
    n = feats.shape[0]
    if n < k:
        raise InputError(f"cannot split {n} samples into {k} clusters")
    feats = feats.double()
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [feats[first]]
    d2 = ((feats - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n, dtype=feats.dtype)
        nxt = int(torch.multinomial(probs.cpu(), 1, generator=gen))  # the seeded draw on the CPU
        centres.append(feats[nxt])
        d2 = torch.minimum(d2, ((feats - feats[nxt]) ** 2).sum(1))
    c = torch.stack(centres)
    assign = torch.zeros(n, dtype=torch.long, device=feats.device)
    for _ in range(iters):
        dist = torch.cdist(feats, c)
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=k)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            far = int(dist.gather(1, assign[:, None]).flatten().argmax())
            assign[far] = empty
            dist[far] = -1.0
        new_c = torch.zeros_like(c).index_add_(0, assign, feats)
        new_c /= torch.bincount(assign, minlength=k).clamp_min(1)[:, None].to(feats.dtype)
        if torch.allclose(new_c, c):
            break
        c = new_c
    return assign.cpu()


def make_units(
    feats: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    k: int,
    iters: int,
    seed: int,
    class_names: list[int] | None = None,
) -> Units:
    """Cluster each class of feats (N, d) with labels y (N,) into k units."""
    y = y.cpu()
    unit_of = torch.empty(y.shape[0], dtype=torch.long)
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        if idx.numel() < k:
            raise InputError(
                f"class {class_names[c] if class_names else c} has {idx.numel()} training samples, fewer than "
                f"--clusters-per-class {k}"
            )
        unit_of[idx] = c * k + kmeans(feats[idx.to(feats.device)], k, iters, seed + c)
    label = torch.arange(num_classes).repeat_interleave(k)
    return Units(unit_of=unit_of, label=label)

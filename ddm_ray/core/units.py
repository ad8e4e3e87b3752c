"""Units: the removable pieces of the training set.

* k-means (default): each class split into K clusters by seeded k-means, clusters smaller than
  `min_size` merged into their nearest cluster of the same class; such units never mix classes.
  Unit ids are global, ordered by class index then cluster.
* a column: every distinct value of a training column (a source, an annotator, a shard) is one
  unit, ids in sorted order of the values; such a unit may span classes (label -1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ddm_ray.errors import InputError


@dataclass
class Units:
    """unit_of (N,) int64 unit id of each training sample; label (U,) class index of each unit."""

    unit_of: torch.Tensor
    label: torch.Tensor  # (U,) class index of each unit, -1 when its members span classes
    level: str = "cluster"  # how units were formed: "cluster" (k-means in a class) or "column:<name>"
    names: list[str] | None = None  # (U,) the column value of each unit (column units)

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


def merge_small(feats: torch.Tensor, assign: torch.Tensor, min_size: int) -> torch.Tensor:
    """Merge clusters with fewer than min_size members into the nearest remaining cluster (by the
    distance of each member to the cluster means), smallest first, until every cluster is big
    enough or one is left. feats (n, d), assign (n,) -> (n,) ids renumbered 0..k'-1 in order."""
    assign = assign.clone()
    feats = feats.double().cpu()
    while True:
        ids, counts = torch.unique(assign, return_counts=True)
        if ids.numel() <= 1 or int(counts.min()) >= min_size:
            break
        small = int(ids[int(torch.argmin(counts))])  # ties: the lowest id
        keep = ids[ids != small]
        means = torch.stack([feats[assign == k].mean(0) for k in keep.tolist()])
        rows = torch.nonzero(assign == small).flatten()
        assign[rows] = keep[torch.cdist(feats[rows], means).argmin(1)]
    _, dense = torch.unique(assign, return_inverse=True)
    return dense


def make_units(
    feats: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    k: int,
    iters: int,
    seed: int,
    class_names: list[str] | None = None,
    min_size: int = 1,
) -> Units:
    """Cluster each class of feats (N, d) with labels y (N,) into at most k units of at least
    min_size members (a class smaller than min_size is one unit)."""
    y = y.cpu()
    unit_of = torch.empty(y.shape[0], dtype=torch.long)
    labels: list[int] = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        if idx.numel() < k:
            raise InputError(
                f"class {class_names[c] if class_names else c} has {idx.numel()} training samples, fewer than "
                f"--clusters-per-class {k}"
            )
        local = kmeans(feats[idx.to(feats.device)], k, iters, seed + c)
        if min_size > 1:
            local = merge_small(feats[idx.to(feats.device)], local, min_size)
        n_local = int(local.max()) + 1
        unit_of[idx] = len(labels) + local
        labels.extend([c] * n_local)
    return Units(unit_of=unit_of, label=torch.tensor(labels, dtype=torch.long))


def units_from_column(values: list[Any], y: torch.Tensor, column: str) -> Units:
    """One unit per distinct value of a training column, in sorted order of the values.
    values (N,) raw column values, y (N,) class indices."""
    keys = sorted(set(values), key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(keys)}
    unit_of = torch.tensor([index[v] for v in values], dtype=torch.long)
    y = y.cpu()
    label = torch.full((len(keys),), -1, dtype=torch.long)
    for u in range(len(keys)):
        classes = torch.unique(y[unit_of == u])
        if classes.numel() == 1:
            label[u] = classes[0]
    return Units(unit_of=unit_of, label=label, level=f"column:{column}", names=[str(v) for v in keys])

"""PNG plots of a fidelity benchmark (matplotlib, Agg backend): scatter, heatmap, removal curve."""

from __future__ import annotations

import os
from typing import Any

import torch


def write_plots(
    out: str, m: Any, units: list[int], loo: dict[str, torch.Tensor], exact: torch.Tensor, result: dict[str, Any]
) -> dict[str, str]:
    """Write the PNGs into out; returns {plot name: file name relative to out}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = m.cfg.online.objectives
    obj = names.index("loss") if "loss" in names else 0
    files: dict[str, str] = {}

    # 1. DDM delta vs retraining delta (and the best peer beside it)
    fid = result["fidelity"]
    peer_names = [k for k in loo if k != "ddm" and names[obj] in fid.get(k, {})]
    best = max(peer_names, key=lambda k: fid[k][names[obj]]["pearson"] or -2) if peer_names else None
    panels = ["ddm"] + ([best] if best else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    ex = exact[obj].flatten().numpy()
    for ax, name in zip(axes[0], panels, strict=True):
        pr = loo[name][obj].flatten().numpy()
        ax.scatter(ex, pr, s=2, alpha=0.3)
        lo, hi = float(min(ex.min(), pr.min())), float(max(ex.max(), pr.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        p = fid[name][names[obj]]["pearson"]
        ax.set_title(f"{name}: Pearson {p:.3f}" if p is not None else name)
        ax.set_xlabel(f"exact retraining Δ {names[obj]}")
        ax.set_ylabel(f"predicted Δ {names[obj]}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scatter.png"), dpi=110)
    plt.close(fig)
    files["scatter"] = "scatter.png"

    # 2. heatmap of the attribution matrix, units (by class) x test samples (by class)
    order = torch.argsort(m.ds.y_test, stable=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (title, mat) in zip(axes, (("DDM", loo["ddm"][obj]), ("exact retraining", exact[obj])), strict=True):
        a = mat[:, order].numpy()
        v = float(abs(a).max()) or 1.0
        im = ax.imshow(a, aspect="auto", cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
        ax.set_title(f"{title}: Δ {names[obj]}")
        ax.set_xlabel("test samples (sorted by class)")
        ax.set_ylabel("units (by class)")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "heatmap.png"), dpi=110)
    plt.close(fig)
    files["heatmap"] = "heatmap.png"

    # 3. accuracy vs fraction removed
    if "removal" in result:
        rm = result["removal"]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, row in rm["accuracy"].items():
            xs = rm["fractions"]
            ys = [row[str(f)]["accuracy"] for f in xs]
            ax.plot([100 * f for f in xs], ys, marker="o", label=name)
        ax.axhline(rm["full_accuracy"], color="k", ls=":", label="full data")
        ax.set_xlabel("% of training data removed")
        ax.set_ylabel("test accuracy after retraining")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "removal.png"), dpi=110)
        plt.close(fig)
        files["removal"] = "removal.png"
    return files

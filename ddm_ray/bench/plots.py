"""PNG plots of a fidelity benchmark (matplotlib, Agg backend): scatter, heatmap, removal curve.

Drawn so they do not mislead: the scatter draws y = x and states on the plot how much the largest
effects are under- (or over-) estimated; the heatmap panels share one colour scale, symmetric
around 0, with one colorbar; the removal plot says in its title where attribution-guided removal
is worse than random. `write_plots` draws all three from the benchmark's tensors; `replot` redraws
from a committed fidelity.json what it holds (the removal curve: the JSON keeps no matrices).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

LARGE_QUANTILE = 0.95  # "large effects": the top 5% of |exact delta|
CLIP_QUANTILE = 0.995  # the heatmaps' shared colour scale ends at this quantile of |delta|


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def effect_scale(exact: np.ndarray, predicted: np.ndarray, quantile: float = LARGE_QUANTILE) -> dict[str, float]:
    """How predicted deltas scale against exact ones, both (n,): {"slope": least-squares slope of
    predicted on exact, "large_ratio": sum(predicted * sign(exact)) / sum(|exact|) over the
    samples with |exact| at or above the quantile}; large_ratio < 1: large effects under-estimated."""
    ex, pr = np.asarray(exact, np.float64).ravel(), np.asarray(predicted, np.float64).ravel()
    var = float(np.var(ex))
    slope = float(np.cov(ex, pr, bias=True)[0, 1] / var) if var > 0 else float("nan")
    big = np.abs(ex) >= np.quantile(np.abs(ex), quantile)
    denom = float(np.abs(ex[big]).sum())
    ratio = float((pr[big] * np.sign(ex[big])).sum() / denom) if denom > 0 else float("nan")
    return {"slope": slope, "large_ratio": ratio}


def scatter_plot(path: str, objective: str, exact: np.ndarray, predicted: dict[str, np.ndarray],
                 pearson: dict[str, float | None]) -> None:
    """Predicted vs exact-retraining delta, one panel per method (exact and each predicted: (n,)),
    with y = x and a note on the plot saying how far the largest effects are under-estimated."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(predicted), figsize=(5 * len(predicted), 4.8), squeeze=False)
    ex = np.asarray(exact).ravel()
    for ax, (name, pr) in zip(axes[0], predicted.items(), strict=True):
        pr = np.asarray(pr).ravel()
        ax.scatter(ex, pr, s=2, alpha=0.3)
        lo, hi = float(min(ex.min(), pr.min())), float(max(ex.max(), pr.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x (a perfect prediction)")
        s = effect_scale(ex, pr)
        verdict = ("large effects are under-estimated" if s["large_ratio"] < 1
                   else "large effects are over-estimated")
        ax.text(0.03, 0.97, f"least-squares slope {s['slope']:.2f}\n"
                            f"largest {100 * (1 - LARGE_QUANTILE):.0f}% |exact Δ|: predicted/exact = {s['large_ratio']:.2f}\n"
                            f"→ {verdict}",
                transform=ax.transAxes, va="top", fontsize=8,
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9})
        p = pearson.get(name)
        ax.set_title(f"{name}: Pearson {p:.3f}" if p is not None else name)
        ax.set_xlabel(f"exact retraining Δ {objective}")
        ax.set_ylabel(f"predicted Δ {objective}")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heatmap_plot(path: str, objective: str, panels: dict[str, np.ndarray]) -> float:
    """Attribution matrices (units, test samples) side by side on ONE colour scale, symmetric
    around 0 (clipped at the CLIP_QUANTILE of |Δ| over all panels), with one colorbar.
    Returns the scale's end v (colours span -v..v)."""
    plt = _pyplot()
    mats = [np.asarray(a, np.float64) for a in panels.values()]
    flat = np.abs(np.concatenate([a.ravel() for a in mats]))
    v = float(np.quantile(flat, CLIP_QUANTILE)) if flat.size else 1.0
    v = v if v > 0 else (float(flat.max()) if flat.size and flat.max() > 0 else 1.0)
    fig, axes = plt.subplots(1, len(mats), figsize=(5.5 * len(mats) + 1, 4.5), squeeze=False, layout="constrained")
    im = None
    for ax, (title, a) in zip(axes[0], zip(panels, mats, strict=True), strict=True):
        im = ax.imshow(a, aspect="auto", cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
        ax.set_title(f"{title}: Δ {objective}")
        ax.set_xlabel("test samples (sorted by class)")
        ax.set_ylabel("units (by class)")
    clipped = bool((flat > v).any())
    fig.colorbar(im, ax=axes[0].tolist(), extend="both" if clipped else "neither",
                 label=f"Δ {objective}, one scale for all panels" + (f" (clipped at ±{v:.2g})" if clipped else ""))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return v


def worse_than_random(removal: dict[str, Any]) -> dict[str, list[float]]:
    """For each attribution-guided order in a fidelity.json "removal" entry: the fractions at which
    its accuracy after retraining is below random removal's mean accuracy."""
    acc, fractions = removal["accuracy"], removal["fractions"]
    rand = acc.get("random")
    if rand is None:
        return {}
    return {name: [f for f in fractions if row[str(f)]["accuracy"] < rand[str(f)]["accuracy"]]
            for name, row in acc.items() if name != "random"}


def removal_plot(path: str, removal: dict[str, Any]) -> None:
    """Accuracy after retraining vs % of training data removed, units removed in each method's
    order (most harmful first) and at random (mean ± std over repeats); the title says at which
    fractions guided removal does worse than random, and those points are circled."""
    plt = _pyplot()
    xs = removal["fractions"]
    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    worse = worse_than_random(removal)
    for name, row in removal["accuracy"].items():
        ys = [row[str(f)]["accuracy"] for f in xs]
        err = [row[str(f)].get("std", 0.0) for f in xs]
        label = "random (mean ± std)" if name == "random" else f"{name}-guided"
        ax.errorbar([100 * f for f in xs], ys, yerr=err if name == "random" else None, marker="o", capsize=3,
                    label=label)
        bad = worse.get(name, [])
        if bad:
            ax.scatter([100 * f for f in bad], [row[str(f)]["accuracy"] for f in bad], s=160, facecolors="none",
                       edgecolors="red", linewidths=1.5, zorder=5)
    ax.axhline(removal["full_accuracy"], color="k", ls=":", label="full data")
    lines = ["removing units ranked most harmful first vs at random"]
    bad_any = {k: v for k, v in worse.items() if v}
    if bad_any:
        lines += [f"{k}-guided is WORSE than random at {', '.join(f'{100 * f:g}%' for f in v)} removed (circled)"
                  for k, v in bad_any.items()]
    elif worse:
        lines.append("guided removal is at least as good as random at every fraction")
    ax.set_title("\n".join(lines), fontsize=9, color="firebrick" if bad_any else "black")
    ax.set_xlabel("% of training data removed")
    ax.set_ylabel("test accuracy after retraining")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(
    out: str, m: Any, units: list[int], loo: dict[str, torch.Tensor], exact: torch.Tensor, result: dict[str, Any]
) -> dict[str, str]:
    """Write the PNGs into out from the benchmark's tensors: loo[name] and exact are
    (objectives, units, test samples); returns {plot name: file name relative to out}."""
    names = m.cfg.online.objectives
    obj = names.index("loss") if "loss" in names else 0
    files: dict[str, str] = {}

    # 1. DDM delta vs retraining delta (and the best peer beside it)
    fid = result["fidelity"]
    peer_names = [k for k in loo if k != "ddm" and names[obj] in fid.get(k, {})]
    best = max(peer_names, key=lambda k: fid[k][names[obj]]["pearson"] or -2) if peer_names else None
    panels = ["ddm"] + ([best] if best else [])
    scatter_plot(os.path.join(out, "scatter.png"), names[obj], exact[obj].flatten().numpy(),
                 {k: loo[k][obj].flatten().numpy() for k in panels},
                 {k: fid[k][names[obj]]["pearson"] for k in panels})
    files["scatter"] = "scatter.png"

    # 2. heatmap of the attribution matrix, units (by class) x test samples (by class)
    order = torch.argsort(m.ds.y_test, stable=True)
    heatmap_plot(os.path.join(out, "heatmap.png"), names[obj],
                 {"DDM": loo["ddm"][obj][:, order].numpy(), "exact retraining": exact[obj][:, order].numpy()})
    files["heatmap"] = "heatmap.png"

    # 3. accuracy vs fraction removed
    if "removal" in result:
        removal_plot(os.path.join(out, "removal.png"), result["removal"])
        files["removal"] = "removal.png"
    return files


def replot(folder: str) -> dict[str, str]:
    """Redraw from folder/fidelity.json what it holds: the removal curve (scatter and heatmap need
    the attribution matrices, which the JSON does not keep). Returns {plot name: file name}."""
    with open(os.path.join(folder, "fidelity.json")) as f:
        result = json.load(f)
    files: dict[str, str] = {}
    if "removal" in result:
        removal_plot(os.path.join(folder, "removal.png"), result["removal"])
        files["removal"] = "removal.png"
    return files

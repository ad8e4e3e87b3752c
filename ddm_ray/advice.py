"""What a run's own figures say the user should be warned about: one sentence each, shown at the
top of the report and printed by `ddm-ray run`, `validate` and `report`.

Pure: reads the manifest (and validation.json when `ddm-ray validate` has written one), imports
nothing heavy.

* training past its stability limit (`manifest.stability.unstable`): leave-one-out effects are
  chaotic there and neither DDM nor exact retraining under another seed agrees;
* the run cost more than retraining every unit exactly: from validate's measured end-to-end
  speed-up when there is one, else from the distillation's measured cost in trainings
  (`manifest.distillation.distill_trainings`) against the number of units (DDM beats exact
  retraining when it has more units than that, `ddm_ray.cost.break_even_units`);
* poor fidelity against exact retraining: Pearson on Δ loss below `POOR_PEARSON`, or below the
  noise ceiling (exact retraining against itself under other seeds) where validate measured it.

A `--method exact` run retrains every unit: neither the cost nor the fidelity warning applies.
"""

from __future__ import annotations

from typing import Any

POOR_PEARSON = 0.5


def run_warnings(manifest: dict[str, Any], validation: dict[str, Any] | None = None) -> list[str]:
    """The warnings for a run (its manifest) and its validation.json (None: not validated)."""
    out: list[str] = []
    st = manifest.get("stability") or (validation or {}).get("stability") or {}
    if st.get("unstable"):
        out.append(st.get("warning") or "training ran past its stability limit 2(1+momentum)/lr: leave-one-out "
                   "effects are chaotic there; lower --lr")
    if manifest.get("method") == "exact":
        return out
    n_units = (manifest.get("counts") or {}).get("units")
    speedup = (validation or {}).get("end_to_end_speedup")
    trainings = (manifest.get("distillation") or {}).get("distill_trainings")
    if isinstance(speedup, (int, float)) and speedup < 1:
        out.append(f"this run cost more than retraining every unit exactly: {1 / max(speedup, 1e-9):.1f}x the time "
                   f"retraining all {validation.get('units_total', n_units)} units takes (measured by validate); "
                   "--method exact retrains them for less")
    elif speedup is None and isinstance(trainings, (int, float)) and isinstance(n_units, int) and trainings >= n_units:
        out.append(f"this run cost more than retraining every unit exactly: its distillation took about "
                   f"{trainings:.1f} trainings, retraining all {n_units} units takes {n_units}; --method exact "
                   "retrains them for less")
    if validation:
        pearson = validation.get("pearson")
        ceiling = (validation.get("noise_ceiling") or {}).get("pearson")
        if isinstance(pearson, (int, float)):
            if pearson < POOR_PEARSON:
                out.append(f"fidelity against exact retraining is poor: Pearson {pearson:.2f} on Δ loss (below "
                           f"{POOR_PEARSON}); rank units with care and check the ones you act on with validate")
            elif isinstance(ceiling, (int, float)) and pearson < ceiling:
                out.append(f"fidelity against exact retraining (Pearson {pearson:.2f} on Δ loss) is below the noise "
                           f"ceiling ({ceiling:.2f}, exact retraining against itself under another seed): DDM misses "
                           "part of what retraining agrees on")
    return out

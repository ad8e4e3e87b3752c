"""`ddm-ray inspect`: the units that help and hurt one test sample most."""

from __future__ import annotations

import pyarrow.compute as pc

from ddm_ray.errors import InputError
from ddm_ray.store.run_store import RunStore
from ddm_ray.validate import load_complete_run


def inspect_test_sample(out: str, test_id: int, objective: str, top: int, storage_options: dict[str, str]) -> str:
    """A table of the `top` most helpful and most harmful units for test sample `test_id`.

    For objective loss, removing a helpful unit raises the loss (delta > 0); for margin and correct,
    removing a helpful unit lowers them (delta < 0).
    """
    store, manifest, cfg = load_complete_run(out, storage_options)
    if objective not in cfg.online.objectives:
        raise InputError(f"objective {objective!r} not in this run ({', '.join(cfg.online.objectives)})")
    index = store.read_table(RunStore.TEST_INDEX)
    pos_arr = pc.index(index.column("test_id"), test_id).as_py()
    if pos_arr < 0:
        raise InputError(f"test id {test_id} is not in this run's test set")
    position = int(index.column("position")[pos_arr].as_py())
    units = store.read_table(RunStore.UNITS).to_pydict()
    label = {u: lab for u, lab in zip(units["unit_id"], units["label"], strict=True)}
    size = {u: len(s) for u, s in zip(units["unit_id"], units["sample_ids"], strict=True)}
    scores: list[tuple[float, int]] = []
    for _name, t in store.complete_parts(manifest):
        t = t.filter(pc.equal(t.column("objective"), objective))
        for u, d in zip(t.column("unit_id").to_pylist(), t.column("delta").to_pylist(), strict=True):
            scores.append((float(d[position]), int(u)))
    sign = 1.0 if objective == "loss" else -1.0
    helpful = sorted(scores, key=lambda s: -sign * s[0])[:top]
    harmful = sorted(scores, key=lambda s: sign * s[0])[:top]
    lines = [f"test sample {test_id} (column {position}), objective {objective}: delta when the unit is removed"]
    for title, rows in (("most helpful", helpful), ("most harmful", harmful)):
        lines.append(f"{title}:")
        lines.append(f"  {'unit':>6} {'label':>6} {'members':>8} {'delta':>11}")
        for d, u in rows:
            lines.append(f"  {u:>6} {label[u]:>6} {size[u]:>8} {d:>+11.5f}")
    return "\n".join(lines)

"""`ddm-ray inspect`: from a result back to the units and training samples behind it.

Three drill-downs over a complete run, each returning plain data (dicts and lists of JSON-able
values) that the CLI formats as a table, one JSON document or CSV rows:

- `test_report`: one test sample's context and the units that help and hurt it most;
- `unit_report`: one unit's label, size, members and the test samples it moves most;
- `worst_tests`: misclassified test samples (highest loss first), then the highest-loss correct ones.

Everything is read through `ddm_ray.api.AuditRun` (verified attribution parts); nothing here
reads Parquet itself. Signs: delta = f(model without the unit) - f(model); for loss, delta > 0
means the unit helped; for margin and correct, delta < 0 means it helped (`api.helped_sign`).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import numpy as np

from ddm_ray.api import AuditRun, helped_score, helped_sign

MEMBER_PREVIEW = 10  # member ids shown per unit in tables before "... (+N more)"


def default_objective(run: AuditRun, objective: str | None) -> str:
    """objective, checked against the run; None: loss if the run has it, else its first objective."""
    if objective is None:
        return "loss" if "loss" in run.objectives else run.objectives[0]
    return run.check_objective(objective)


def sign_note(objective: str) -> str:
    """One line saying which sign of delta means "the unit helped" for objective."""
    if helped_sign(objective) > 0:
        return f"delta = {objective} without the unit - {objective} with it; delta > 0: the unit helped"
    return f"delta = {objective} without the unit - {objective} with it; delta < 0: the unit helped"


def _unit_rows(run: AuditRun) -> dict[int, dict[str, Any]]:
    t = run.units().to_pydict()
    names = t.get("name") or [str(u) for u in t["unit_id"]]  # runs from before units had names
    return {
        int(u): {"unit_id": int(u), "name": unit_name, "label": None if lab is None else int(lab), "label_name": name,
                 "size": int(size), "member_ids": list(ids)}
        for u, unit_name, lab, name, size, ids in zip(t["unit_id"], names, t["label"], t["label_name"], t["size"],
                                                       t["sample_ids"], strict=True)
    }


def test_report(run: AuditRun, test_id: int, objective: str | None = None, top: int = 5) -> dict[str, Any]:
    """{"kind": "test", "objective", "sign", "test": test_context, "helpful": [unit, ...],
    "harmful": [...]}; each unit: unit_id, name, label, label_name, size, member_ids, delta
    (strongest first, the order of `AuditRun.top_units`)."""
    objective = default_objective(run, objective)
    context = run.test_context(test_id)
    top_units = run.top_units(test_id, k=top, objective=objective)
    units = _unit_rows(run)
    out: dict[str, Any] = {"kind": "test", "objective": objective, "sign": sign_note(objective), "test": context}
    for side in ("helpful", "harmful"):
        out[side] = [{**units[u], "delta": d} for u, d in top_units[side]]
    return out


def unit_report(run: AuditRun, unit: int | str, objective: str | None = None, top: int = 5) -> dict[str, Any]:
    """One unit, by id or name (`AuditRun.unit_id`):
    {"kind": "unit", "objective", "sign", "unit": {unit_id, name, label, label_name, level, size},
    "members": [{"sample_id", "label", "label_name", "predicted", "predicted_name", "agrees", "loss"}, ...]
    (every member, in units.parquet order; predicted and loss: the trained model on that training
    sample, agrees: predicted == label; None in runs from before they were recorded),
    "helped" / "hurt": [test context + "delta", ...] (the `top` test samples it moves most each way)."""
    objective = default_objective(run, objective)
    m = run.members(unit)
    unit_id = m["unit_id"]
    m.setdefault("name", str(unit_id))
    ids = m.pop("sample_ids")
    labels, predicted = m.pop("member_labels", None), m.pop("member_predicted", None)
    losses = m.pop("member_loss", None)
    names = run.class_names()
    members = []
    for j, i in enumerate(ids):
        lab = labels[j] if labels is not None else m["label"]  # older runs: the unit's label
        pred = predicted[j] if predicted is not None else None
        members.append({
            "sample_id": int(i), "label": lab,
            "label_name": m["label_name"] if lab is None else names.get(lab, str(lab)),
            "predicted": pred, "predicted_name": None if pred is None else names.get(pred, str(pred)),
            "agrees": None if pred is None or lab is None else pred == lab,
            "loss": None if losses is None else float(losses[j]),
        })
    m["disagreeing"] = sum(1 for r in members if r["agrees"] is False)
    moved = run.top_tests(unit_id, k=top, objective=objective)
    tests = {int(r["test_id"]): r for r in run.test_index().to_pylist()}
    out: dict[str, Any] = {"kind": "unit", "objective": objective, "sign": sign_note(objective), "unit": m,
                           "members": members}
    for side in ("helped", "hurt"):
        out[side] = [{**tests[t], "delta": d} for t, d in moved[side]]
    return out


def worst_tests(run: AuditRun, k: int, objective: str | None = None) -> dict[str, Any]:
    """{"kind": "worst", "objective", "sign", "tests": [...]}: misclassified test samples first
    (highest loss first), then correct ones (highest loss first), k in all. Each carries its test
    context plus the unit that hurts it most (`harmful_unit`, `harmful_unit_name`, `harmful_delta`)."""
    objective = default_objective(run, objective)
    index = run.test_index().to_pylist()
    order = sorted(range(len(index)), key=lambda i: (bool(index[i]["correct"]), -float(index[i]["loss"]), i))[:k]
    unit_ids, _test_ids, delta = run.matrix(objective)
    worst = np.argmin(helped_score(objective, delta[:, order]), axis=0) if len(unit_ids) else None
    names = {u: r["name"] for u, r in _unit_rows(run).items()} if worst is not None else {}
    rows = []
    for j, i in enumerate(order):
        row = dict(index[i])
        if worst is not None:
            row["harmful_unit"] = int(unit_ids[worst[j]])
            row["harmful_unit_name"] = names.get(row["harmful_unit"], str(row["harmful_unit"]))
            row["harmful_delta"] = float(delta[worst[j], i])
        rows.append(row)
    return {"kind": "worst", "objective": objective, "sign": sign_note(objective), "tests": rows}


# ---- formatting -------------------------------------------------------------------------------
def _label(name: str, code: int | None) -> str:
    return name if code is None or name == str(code) else f"{name} ({code})"


def _ids(ids: list[int], limit: int = MEMBER_PREVIEW) -> str:
    shown = " ".join(str(i) for i in ids[:limit])
    return f"{shown} ... (+{len(ids) - limit} more)" if len(ids) > limit else shown


def _test_line(r: dict[str, Any]) -> str:
    return (f"  {r['test_id']:>8} {_label(r['label_name'], r['label']):>10} "
            f"{_label(r['predicted_name'], r['predicted']):>10} {r['loss']:>9.4f} {str(r['correct']):>7}")


_TEST_HEAD = f"  {'test_id':>8} {'label':>10} {'predicted':>10} {'loss':>9} {'correct':>7}"


def format_table(report: dict[str, Any]) -> str:
    """Human-readable text for any report above."""
    kind, lines = report["kind"], []
    if kind == "test":
        width = max([4, *(len(u["name"]) for side in ("helpful", "harmful") for u in report[side])])
        t = report["test"]
        lines.append(f"test sample {t['test_id']} (column {t['position']}): label {_label(t['label_name'], t['label'])}, "
                     f"predicted {_label(t['predicted_name'], t['predicted'])}, loss {t['loss']:.4f}, "
                     f"{'correct' if t['correct'] else 'misclassified'}")
        lines.append(f"objective {report['objective']}: {report['sign']}")
        for side, title in (("helpful", "most helpful units"), ("harmful", "most harmful units")):
            lines.append(f"{title}:")
            lines.append(f"  {'unit':>6} {'name':>{width}} {'label':>10} {'size':>6} {'delta':>11}  members")
            for u in report[side]:
                lines.append(f"  {u['unit_id']:>6} {u['name']:>{width}} {_label(u['label_name'], u['label']):>10} "
                             f"{u['size']:>6} {u['delta']:>+11.5f}  {_ids(u['member_ids'])}")
    elif kind == "unit":
        u = report["unit"]
        lines.append(f"unit {u['unit_id']} ({u['name']}): label {_label(u['label_name'], u['label'])}, size {u['size']}, "
                     f"level {u['level']}")
        lines.append(f"members ({len(report['members'])}; {u['disagreeing']} labelled otherwise than the trained "
                     "model predicts them, marked *):")
        lines.append(f"  {'sample_id':>10} {'label':>10} {'predicted':>10} {'loss':>9}")
        for m in report["members"]:
            pred = "?" if m["predicted"] is None else _label(m["predicted_name"], m["predicted"])
            loss = "?" if m["loss"] is None else f"{m['loss']:.4f}"
            flag = " *" if m["agrees"] is False else ""
            lines.append(f"  {m['sample_id']:>10} {_label(m['label_name'], m['label']):>10} {pred:>10} {loss:>9}{flag}")
        lines.append(f"objective {report['objective']}: {report['sign']}")
        for side, title in (("helped", "test samples it helps most"), ("hurt", "test samples it hurts most")):
            lines.append(f"{title}:")
            lines.append(f"{_TEST_HEAD} {'delta':>11}")
            for r in report[side]:
                lines.append(f"{_test_line(r)} {r['delta']:>+11.5f}")
    else:
        lines.append(f"worst test samples (misclassified first, then by loss); objective {report['objective']}: "
                     f"{report['sign']}")
        lines.append(f"{_TEST_HEAD} {'harmful_unit':>12} {'delta':>11}  name")
        for r in report["tests"]:
            extra = (f" {r['harmful_unit']:>12} {r['harmful_delta']:>+11.5f}  {r['harmful_unit_name']}"
                     if "harmful_unit" in r else "")
            lines.append(_test_line(r) + extra)
    return "\n".join(lines)


def format_json(report: dict[str, Any]) -> str:
    """The report as one JSON document."""
    return json.dumps(report, indent=1)


def csv_rows(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of a report in long form, for piping:
    test:  test_id, objective, direction (helpful|harmful), rank, unit_id, unit_name, label, label_name, size,
           delta, member_ids
    unit:  unit_id, unit_name, objective, relation (member|helped|hurt), rank, id (training or test id),
           label, label_name, predicted, predicted_name (the trained model), delta (empty for members)
    worst: rank, test_id, label, label_name, predicted, predicted_name, loss, correct, harmful_unit,
           harmful_unit_name, harmful_delta
    (member_ids: space-separated, complete)."""
    kind, o = report["kind"], report["objective"]
    if kind == "test":
        head = ["test_id", "objective", "direction", "rank", "unit_id", "unit_name", "label", "label_name", "size",
                "delta", "member_ids"]
        tid = report["test"]["test_id"]
        rows = [[tid, o, side, r + 1, u["unit_id"], u["name"], u["label"], u["label_name"], u["size"], u["delta"],
                 " ".join(map(str, u["member_ids"]))]
                for side in ("helpful", "harmful") for r, u in enumerate(report[side])]
    elif kind == "unit":
        head = ["unit_id", "unit_name", "objective", "relation", "rank", "id", "label", "label_name", "predicted",
                "predicted_name", "delta"]
        uid, uname = report["unit"]["unit_id"], report["unit"]["name"]
        rows = [[uid, uname, o, "member", r + 1, m["sample_id"], m["label"], m["label_name"], m["predicted"],
                 m["predicted_name"], ""]
                for r, m in enumerate(report["members"])]
        rows += [[uid, uname, o, side, r + 1, t["test_id"], t["label"], t["label_name"], t["predicted"],
                  t["predicted_name"], t["delta"]]
                 for side in ("helped", "hurt") for r, t in enumerate(report[side])]
    else:
        head = ["rank", "test_id", "label", "label_name", "predicted", "predicted_name", "loss", "correct",
                "harmful_unit", "harmful_unit_name", "harmful_delta"]
        rows = [[r + 1, *(t[c] for c in head[1:8]), t.get("harmful_unit", ""), t.get("harmful_unit_name", ""),
                 t.get("harmful_delta", "")]
                for r, t in enumerate(report["tests"])]
    return head, rows


def format_csv(report: dict[str, Any]) -> str:
    """Header line plus one line per row of `csv_rows`."""
    head, rows = csv_rows(report)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    w.writerows(rows)
    return buf.getvalue().rstrip("\n")


FORMATTERS = {"table": format_table, "json": format_json, "csv": format_csv}

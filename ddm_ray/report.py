"""`ddm-ray report`: one self-contained HTML page over a finished run.

    write_report("./ddm-out")     # -> ./ddm-out/report/index.html, PNGs beside it

The page holds a summary (data, accuracy, config, stage timings, fidelity from validation.json),
the test samples worth a look (misclassified first, then highest loss, or the ids asked for) with
the units that helped and hurt each one most and a few of their member samples, the units that
hurt the most test samples, units that look like label problems, and histograms of unit effects.

Where it is written: a local run folder gets `<run>/report/`; for a run on an object store
(s3://...) give `report_out`, a local folder (the report is read from the store, written here).
Every link in the page is relative, so the folder can be moved or zipped as a whole.

Sign convention (as in `ddm_ray.api`): delta = f(model without the unit) - f(model). The page
calls a unit *helpful* for a test sample when removing it makes that prediction worse (loss
rises; margin or correctness falls) and *harmful* when removing it makes the prediction better.

Samples are drawn with Pillow: as images when the input shape is (C, H, W) with C in 1 or 3, or
(H, W); a flat input of n features is drawn as a grayscale square image when n is a perfect
square of a side of at least 8 (the 64 features of digits: 8x8); any other input is drawn as a
bar chart of its features. Charts use matplotlib's Agg canvas (no pyplot, no global backend).
"""

from __future__ import annotations

import contextlib
import html
import io
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ddm_ray.api import AuditRun, open_run
from ddm_ray.errors import ConfigError, InputError, StorageError, brief
from ddm_ray.store.run_store import RunStore

MEMBERS_SHOWN = 4  # member samples drawn per unit
UNITS_LISTED = 8  # rows of each unit table
MIXED = np.iinfo(np.int64).min  # unit_label of a unit spanning classes (units.parquet: null label)
_THUMB = 48  # pixel size samples are drawn at (nearest-neighbour upscale of small images)
_BAR_W, _BAR_H = 96, 48


# ---- how a sample is drawn ------------------------------------------------------------------
def image_layout(input_shape: Sequence[int]) -> tuple[int, int, int] | None:
    """(C, H, W) to draw a sample of `input_shape` as an image, or None to draw feature bars.

    (C, H, W) with C in {1, 3} and (H, W) are images; a flat (n,) with n = s*s, s >= 8, is a
    grayscale s x s image; anything else is not.
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3 and shape[0] in (1, 3):
        return shape[0], shape[1], shape[2]
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side >= 8 and side * side == shape[0]:
            return 1, side, side
    return None


def draw_sample(x: np.ndarray, layout: tuple[int, int, int] | None, lo: float, hi: float) -> Any:
    """A PIL image of one sample x (any shape with prod = C*H*W or n features), values scaled
    from [lo, hi] to the full range: an upscaled image, or a bar chart of the features."""
    from PIL import Image, ImageDraw

    span = hi - lo if hi > lo else 1.0
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    if layout is not None:
        c, h, w = layout
        pix = np.clip((flat.reshape(c, h, w) - lo) / span * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(pix[0], "L") if c == 1 else Image.fromarray(np.transpose(pix, (1, 2, 0)), "RGB")
        scale = max(1, math.ceil(_THUMB / max(h, w)))
        return img.resize((w * scale, h * scale), Image.NEAREST)
    n = flat.size
    if n > _BAR_W:  # more features than pixels: mean of equal bins
        edges = np.linspace(0, n, _BAR_W + 1).astype(int)
        flat = np.array([flat[a:b].mean() for a, b in zip(edges[:-1], edges[1:], strict=True)], np.float32)
        n = _BAR_W
    img = Image.new("RGB", (_BAR_W, _BAR_H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    zero = _BAR_H - 1 - (0.0 - lo) / span * (_BAR_H - 1) if lo < 0 < hi else _BAR_H - 1
    width = _BAR_W / n
    for i, v in enumerate(flat):
        y = _BAR_H - 1 - (float(np.clip(v, lo, hi)) - lo) / span * (_BAR_H - 1)
        top, bottom = sorted((y, zero))
        colour = (49, 99, 189) if v >= 0 else (200, 64, 64)
        d.rectangle([i * width, top, max(i * width, (i + 1) * width - 1), bottom], fill=colour)
    d.line([0, zero, _BAR_W, zero], fill=(120, 120, 120))
    return img


class _OutDir:
    """A local folder the report writes into through a directory file descriptor, never through
    a link: every file is created fresh under a random hidden name with O_CREAT | O_EXCL |
    O_NOFOLLOW, then renamed over its final name (a rename replaces a link planted there instead
    of writing through it); a sub-folder that is a link is replaced by a real folder, and sub-folders
    are opened with O_NOFOLLOW. Stale files are unlinked by name (never followed)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path

    @classmethod
    def open(cls, path: str) -> _OutDir:
        """The folder at path (created if missing), named by the caller: its own path is resolved
        as given; only what is below it is guarded."""
        os.makedirs(path, exist_ok=True)
        return cls(os.open(path, os.O_RDONLY | os.O_DIRECTORY), path)

    def sub(self, name: str) -> _OutDir:
        """The sub-folder `name`, created if missing; a link in its place is removed first."""
        import stat

        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                os.unlink(name, dir_fd=self.fd)
                raise FileNotFoundError
        except FileNotFoundError:
            os.mkdir(name, 0o755, dir_fd=self.fd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self.fd)
        return _OutDir(fd, os.path.join(self.path, name))

    def write(self, name: str, data: bytes) -> None:
        """name's bytes replaced atomically by data, through a fresh exclusive temporary file."""
        tmp = f".{name}.tmp-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=self.fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def remove(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)  # removes a link itself, never what it points to

    def close(self) -> None:
        os.close(self.fd)


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


@dataclass
class _Samples:
    """Draws train and test samples into <report>/samples/, each once."""

    out: _OutDir | None  # <report>/samples
    x_train: np.ndarray | None = None  # (N, *shape)
    x_test: np.ndarray | None = None
    train_row: dict[int, int] = field(default_factory=dict)
    test_row: dict[int, int] = field(default_factory=dict)
    layout: tuple[int, int, int] | None = None
    shape: tuple[int, ...] | None = None  # the loaded input shape
    lo: float = 0.0
    hi: float = 1.0
    written: set[str] = field(default_factory=set)

    @property
    def available(self) -> bool:
        return self.x_train is not None

    def _draw(self, kind: str, sample_id: int) -> str | None:
        x, rows = (self.x_train, self.train_row) if kind == "train" else (self.x_test, self.test_row)
        if x is None or sample_id not in rows:
            return None
        rel = f"samples/{kind}-{sample_id}.png"
        if rel not in self.written and self.out is not None:
            self.out.write(rel.split("/", 1)[1], _png(draw_sample(x[rows[sample_id]], self.layout, self.lo, self.hi)))
            self.written.add(rel)
        return rel

    def train(self, sample_id: int) -> str | None:
        return self._draw("train", sample_id)

    def test(self, test_id: int) -> str | None:
        return self._draw("test", test_id)


def _load_samples(
    run: AuditRun, folder: _OutDir | None, storage_options: dict[str, str], data: dict[str, str | None]
) -> tuple[_Samples, str]:
    """The run's inputs for drawing, and a one-line note (why they are missing, or how drawn).
    data: the caller's train/test/root (`ddm_ray.readers.caller_data`; none: the manifest's,
    named in a log line first), checked against the run's data fingerprint."""
    samples = _Samples(folder)
    try:
        from ddm_ray.config import RunConfig
        from ddm_ray.data import load_dataset
        from ddm_ray.readers import caller_data, check_data_fingerprint

        cfg = caller_data(RunConfig.from_dict(run.manifest["config"]), run.store.url, **data)
        ds = load_dataset(cfg.data, storage_options)
        check_data_fingerprint(run.manifest, ds, run.store.url)
    except ConfigError:
        raise  # the caller's options contradict the run: say so rather than drop the pictures
    except Exception as e:  # noqa: BLE001  any failure here only costs the pictures
        return samples, f"Sample images not drawn: the run's data could not be loaded ({brief(e)})."
    samples.x_train = ds.x_train.numpy()
    samples.x_test = ds.x_test.numpy()
    samples.train_row = {int(i): r for r, i in enumerate(ds.train_ids.tolist())}
    samples.test_row = {int(i): r for r, i in enumerate(ds.test_ids.tolist())}
    samples.layout = image_layout(ds.input_shape)
    samples.shape = tuple(ds.input_shape)
    samples.lo, samples.hi = float(samples.x_train.min()), float(samples.x_train.max())
    shape = "x".join(map(str, ds.input_shape))
    if samples.layout is None:
        how = f"as bar charts of their {math.prod(ds.input_shape)} features (blue >= 0, red < 0)"
    elif len(ds.input_shape) == 1:
        c, h, w = samples.layout
        how = f"as {h}x{w} grayscale images (a flat input whose length is a perfect square >= 64 is drawn square)"
    else:
        how = "as images"
    return samples, f"Samples (input shape {shape}) are drawn {how}, values scaled from [{samples.lo:.3g}, {samples.hi:.3g}]."


# ---- HTML helpers ---------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{_e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        return ",".join(_fmt(x) for x in v)
    return str(v)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:16px 24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;border-bottom:2px solid #ddd;margin:28px 0 8px;padding-bottom:2px}
h3{font-size:15px;margin:0 0 6px}nav a{margin-right:14px}.note{color:#555;margin:4px 0}
table{border-collapse:collapse;margin:4px 0 10px}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.grid{display:flex;flex-wrap:wrap;gap:8px 28px}.grid>div{min-width:300px}
.config td:first-child{font-weight:600}.config td{font-family:ui-monospace,monospace;font-size:12px}
.test{border:1px solid #ccc;border-radius:6px;padding:8px;margin:10px 0;display:flex;gap:16px}
.test.wrong{border-color:#d33;background:#fff7f7}.testside{width:150px;flex:none}
.testimg{width:96px;height:96px;image-rendering:pixelated;border:1px solid #999;display:block;object-fit:contain}
.rowlabel{font-weight:600;margin:4px 0 2px}.units{display:flex;flex-wrap:wrap;gap:6px}
.unit{border:1px solid #ddd;border-radius:4px;padding:4px;font-size:12px;background:#fff}
.unit.helpful{border-left:4px solid #2a8a2a}.unit.harmful{border-left:4px solid #c33}
.member{width:48px;height:48px;image-rendering:pixelated;margin:1px;border:1px solid #bbb;object-fit:contain}
.bars .member,.bars .testimg{width:96px;height:48px}.chart{max-width:100%}
.pos{color:#2a8a2a}.neg{color:#c33}
.sub{padding-left:16px;color:#555}.mem{display:inline-block;text-align:center;vertical-align:top;margin:1px}.cap{display:block;font-size:10px;line-height:1.1}
.warning{border:2px solid #d9822b;background:#fff4e5;border-radius:6px;padding:6px 12px;margin:10px 0}
.warning ul{margin:4px 0;padding-left:20px}
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute("data-images-loaded", String(ok));
  document.body.setAttribute("data-images-total", String(imgs.length));
});
"""


# ---- the report -----------------------------------------------------------------------------
@dataclass
class _Frame:
    """What every section reads: the matrix and the two index tables, as numpy."""

    objective: str
    unit_ids: np.ndarray  # (U,)
    helped: np.ndarray  # (U, N): > 0 where the unit helped the prediction (sign-normalised delta)
    delta: np.ndarray  # (U, N) raw delta
    unit_label: np.ndarray  # (U,) class label, MIXED for a unit spanning classes
    unit_name: list[str]
    unit_size: np.ndarray
    unit_level: list[str]
    unit_members: list[list[int]]
    test_ids: np.ndarray  # (N,) in column order
    test_label: np.ndarray
    test_name: list[str]
    pred_name: list[str]
    test_loss: np.ndarray
    test_correct: np.ndarray
    unit_title: list[str] = field(default_factory=list)  # units.parquet `name` (the unit's own name)
    member_labels: list[list[int]] | None = None  # each member's label (coded as unit_label); None: not recorded
    member_predicted: list[list[int]] | None = None  # the trained model's prediction on each member
    member_loss: list[list[float]] | None = None  # the trained model's loss on each member
    class_names: dict[int, str] = field(default_factory=dict)  # label -> its name in the data

    def title(self, row: int) -> str:
        """The unit's name (its id as text for runs from before units had names)."""
        return self.unit_title[row] if self.unit_title else str(int(self.unit_ids[row]))

    def members_to_draw(self, row: int, k: int = MEMBERS_SHOWN) -> list[int]:
        """Positions (within the unit) of the k members to draw: those the trained model fits worst
        (highest loss) first, a likely sign of a wrong label; the first k when no losses exist."""
        n = len(self.unit_members[row])
        if self.member_loss is None:
            return list(range(min(k, n)))
        return np.argsort(-np.asarray(self.member_loss[row], dtype=np.float64), kind="stable")[:k].tolist()

    def disagreeing(self, row: int) -> int | None:
        """Members whose label differs from the trained model's prediction (None: not recorded)."""
        if self.member_labels is None or self.member_predicted is None:
            return None
        return int((np.asarray(self.member_labels[row]) != np.asarray(self.member_predicted[row])).sum())


def _frame(run: AuditRun, objective: str) -> _Frame:
    unit_ids, test_ids, delta = run.matrix(objective)
    units = run.units().to_pydict()
    order = {int(u): i for i, u in enumerate(units["unit_id"])}
    missing = [int(u) for u in unit_ids if int(u) not in order]
    if missing:
        raise InputError(f"{run.store.url}: attribution rows for units missing from units.parquet: {missing[:5]}")
    idx = [order[int(u)] for u in unit_ids]
    ti = run.test_index().to_pydict()
    pos = np.asarray(ti["position"], dtype=np.int64)
    by_pos = np.argsort(pos, kind="stable")
    if delta.ndim != 2 or delta.shape[1] != len(pos):
        raise InputError(f"{run.store.url}: delta lists have {delta.shape[-1]} values, test_index.parquet {len(pos)} rows")

    def col(name: str) -> list[Any]:
        return [ti[name][i] for i in by_pos]

    return _Frame(
        objective=objective,
        unit_ids=unit_ids,
        helped=delta if objective == "loss" else -delta,
        delta=delta,
        unit_label=np.asarray([MIXED if units["label"][i] is None else units["label"][i] for i in idx], dtype=np.int64),
        unit_name=[str(units["label_name"][i]) for i in idx],
        unit_size=np.asarray([units["size"][i] for i in idx], dtype=np.int64),
        unit_level=[str(units["level"][i]) for i in idx],
        unit_members=[list(units["sample_ids"][i]) for i in idx],
        test_ids=np.asarray(col("test_id"), dtype=np.int64),
        test_label=np.asarray(col("label"), dtype=np.int64),
        test_name=[str(v) for v in col("label_name")],
        pred_name=[str(v) for v in col("predicted_name")],
        test_loss=np.asarray(col("loss"), dtype=np.float64),
        test_correct=np.asarray(col("correct"), dtype=bool),
        unit_title=[str(units["name"][i]) for i in idx] if "name" in units else [],
        member_labels=[list(units["member_labels"][i]) for i in idx] if "member_labels" in units else None,
        member_predicted=[list(units["member_predicted"][i]) for i in idx] if "member_predicted" in units else None,
        member_loss=[list(units["member_loss"][i]) for i in idx] if "member_loss" in units else None,
        class_names=run.class_names(),
    )


def choose_tests(frame: _Frame, test_ids: Sequence[int] | None, max_tests: int) -> list[int]:
    """Column positions to show: the given test ids (in order, each once), else misclassified
    samples by descending loss, then correct ones by descending loss, `max_tests` in all."""
    if test_ids:
        where = {int(t): i for i, t in enumerate(frame.test_ids)}
        unknown = [t for t in test_ids if int(t) not in where]
        if unknown:
            raise InputError(f"test id {unknown[0]} is not in this run's test set")
        return list(dict.fromkeys(where[int(t)] for t in test_ids))
    order = np.lexsort((-frame.test_loss, frame.test_correct))  # last key first: wrong before right
    return [int(i) for i in order[:max_tests]]


def _delta_text(frame: _Frame, value: float) -> str:
    cls = "pos" if value * (1 if frame.objective == "loss" else -1) > 0 else "neg"
    return f'<span class="{cls}">&Delta; {value:+.4g}</span>'


def _member_caption(frame: _Frame, row: int, j: int) -> tuple[str, str]:
    """(caption HTML, title text) of member j of unit `row`: its label, and the trained model's
    prediction when it differs (a likely wrong label)."""
    sid = int(frame.unit_members[row][j])
    if frame.member_labels is None:
        return "", f"train sample {sid}"
    lab = int(frame.member_labels[row][j])
    name = frame.class_names.get(lab, str(lab))
    title = f"train sample {sid}: label {name}"
    caption = _e(name)
    if frame.member_predicted is not None:
        pred = int(frame.member_predicted[row][j])
        pname = frame.class_names.get(pred, str(pred))
        title += f", the model predicts {pname}"
        if pred != lab:
            caption = f'<span class="neg">{_e(name)}&rarr;{_e(pname)}</span>'
    if frame.member_loss is not None:
        title += f", loss {float(frame.member_loss[row][j]):.3g}"
    return caption, title


def _unit_card(frame: _Frame, row: int, samples: _Samples, kind: str, stat: str) -> str:
    imgs = []
    for j in frame.members_to_draw(row):
        sid = int(frame.unit_members[row][j])
        caption, title = _member_caption(frame, row, j)
        rel = samples.train(sid)
        img = (f'<img class="member" src="{_e(rel)}" alt="train sample {sid}" title="{_e(title)}" '
               f'data-sample-id="{sid}">') if rel is not None else ""
        if img or caption:
            imgs.append(f'<span class="mem" title="{_e(title)}">{img}<span class="cap">{caption}</span></span>')
    uid = int(frame.unit_ids[row])
    off = frame.disagreeing(row)
    disagree = f" &middot; {off} labelled otherwise than the model predicts" if off else ""
    return (
        f'<div class="unit {_e(kind)}" data-unit-id="{uid}">'
        f"<div><b>unit {uid} {_e(frame.title(row))}</b> &middot; label {_e(frame.unit_name[row])} &middot; "
        f"{int(frame.unit_size[row])} members{disagree} &middot; {stat}</div>"
        f"<div>{''.join(imgs)}</div></div>"
    )


def _summary(run: AuditRun, frame: _Frame, samples: _Samples, sample_note: str, validation: dict[str, Any] | None) -> str:
    m = run.manifest
    cfg = m.get("config", {})
    data = cfg.get("data", {})
    counts = m.get("counts", {})
    classes = sorted({(int(lab), name) for lab, name in zip(frame.test_label, frame.test_name, strict=True)})
    class_names = ", ".join(name for _lab, name in classes)
    shape = samples.shape or data.get("input_shape")
    n_wrong = int((~frame.test_correct).sum())
    acc = float(frame.test_correct.mean()) if frame.test_correct.size else float("nan")
    data_rows = [
        ("dataset", _e(data.get("dataset"))),
        *[(k, _e(data[k])) for k in ("train", "test", "root") if data.get(k)],
        ("training samples", _e(counts.get("train_samples", "?"))),
        ("test samples", _e(len(frame.test_ids))),
        ("classes", _e(f"{counts.get('classes', len(classes))}: {class_names}")),
        *_label_order_row(m.get("data", {}).get("label_order")),
        ("input shape", _e("x".join(map(str, shape)) if shape else "as stored (flat unless an image format)")),
        ("units", _e(f"{len(frame.unit_ids)} ({', '.join(sorted(set(frame.unit_level)))})")),
        ("model", _e(f"{cfg.get('model', {}).get('arch', '?')}, {counts.get('parameters', '?')} parameters")),
        ("test accuracy", _e(f"{acc:.2%} ({n_wrong} of {len(frame.test_ids)} misclassified)")),
    ]
    timing_rows = [(f'<span class="sub">{_e(k)}</span>' if sub else _e(k), _e(f"{v:.2f}"))
                   for k, v, sub in stage_timings(m.get("timings_seconds", {}))]
    from ddm_ray.config import applicable_settings

    config_rows = []
    for section, values in applicable_settings(cfg).items():
        items = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        config_rows.append((_e(section), _e(items)))
    parts = [
        '<section id="summary"><h2>Summary</h2><div class="grid">',
        f"<div><h3>Data and model</h3>{_table(('', ''), data_rows)}</div>",
        f"<div><h3>Stage timings (seconds)</h3>{_table(('stage', 'seconds'), timing_rows)}</div>",
        "<div><h3>Fidelity</h3>" + (_EXACT_NOTE if m.get("method") == "exact" else _fidelity(validation)) + "</div>",
        "</div>",
        _stability(m.get("stability")),
        f'<h3>Config <span class="note">(hash {_e(m.get("config_hash", "?"))})</span></h3>',
        _table(("section", "settings"), config_rows, "config"),
        f'<p class="note" id="sample-note">{_e(sample_note)}</p></section>',
    ]
    return "".join(parts)


STAGES = ("load_data", "train_and_units", "stability", "cost_estimate", "distill", "online", "exact")  # pipeline order


def stage_timings(timings: dict[str, Any]) -> list[tuple[str, float, bool]]:
    """(stage, seconds, is a sub-stage) in pipeline order: each stage, then its sub-stages (keys
    "<stage>_<part>", e.g. distill_subspace, part of distill), then stages not known here, then
    the total."""
    known = {k: float(v) for k, v in timings.items() if isinstance(v, int | float)}
    rows: list[tuple[str, float, bool]] = []
    seen = set()
    for stage in STAGES:
        if stage in known:
            rows.append((stage, known[stage], False))
            seen.add(stage)
        for k in sorted(known):
            if k.startswith(stage + "_") and k not in STAGES:
                rows.append((k, known[k], True))
                seen.add(k)
    rows += [(k, known[k], False) for k in sorted(known) if k not in seen and k != "total"]
    if "total" in known:
        rows.append(("total", known["total"], False))
    return rows


def _warnings(warnings: list[str]) -> str:
    """The warning box at the top of the page (nothing when there is nothing to warn about)."""
    if not warnings:
        return ""
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return f'<div class="warning" id="warnings"><strong>Warning{"s" if len(warnings) > 1 else ""}:</strong><ul>{items}</ul></div>'


def _label_order_row(order: str | None) -> list[tuple[str, str]]:
    """The "class order" row of the summary: which rule put the classes in order (none for runs
    from before it was recorded)."""
    if order is None:
        return []
    from ddm_ray.data.parquet import LABEL_ORDERS

    return [("class order", _e(LABEL_ORDERS.get(order, order)))]


def _stability(st: dict[str, Any] | None) -> str:
    """The training-stability line; a warning box when training ran past its limit."""
    if not st:
        return ""
    eig = ", ".join(f"epoch {e}: {_fmt(x)}" for e, x in zip(st.get("epochs", []), st.get("top_eigenvalue", []), strict=False))
    line = (f"Training stability: top Hessian eigenvalue {eig} against the limit "
            f"{_fmt(st.get('limit', '?'))} = {st.get('limit_rule', '2 (1 + momentum) / lr')}.")
    if st.get("unstable"):
        return f'<p class="warning" id="stability-warning"><strong>Warning:</strong> {_e(st.get("warning", line))}</p>'
    return f'<p class="note" id="stability">{_e(line)}</p>'


_EXACT_NOTE = ('<p class="note" id="exact-rows">The rows are exact leave-one-out retraining '
               "(<code>--method exact</code>): every unit retrained without its samples, nothing estimated.</p>")


def _fidelity(v: dict[str, Any] | None) -> str:
    if v is None:
        return '<p class="note">No validation.json: run <code>ddm-ray validate</code> to compare with exact retraining.</p>'
    head = (f"<p>{_e(v.get('units_validated', '?'))} of {_e(v.get('units_total', '?'))} units retrained exactly; "
            f"speed-up per unit {_e(_fmt(v.get('speedup', '?')))}x, end to end {_e(_fmt(v.get('end_to_end_speedup', '?')))}x.</p>")
    rows = []
    per_objective = v.get("per_objective") if isinstance(v.get("per_objective"), dict) else {}
    names = sorted(per_objective, key=lambda n: (("loss", "margin", "correct") + (n,)).index(n))
    for name, methods in ((n, per_objective[n]) for n in names):
        for method, s in (methods.items() if isinstance(methods, dict) else ()):
            if not isinstance(s, dict):
                continue
            rows.append([_e(name), _e(method), *(_e(_fmt(s.get(k, ""))) for k in
                         ("pearson", "spearman", "pearson_per_test_mean", "spearman_per_test_mean"))])
    if not rows:
        rows.append([_e(v.get("objective", "?")), "ddm", _e(_fmt(v.get("pearson", ""))),
                     _e(_fmt(v.get("spearman", ""))), "", ""])
    nc = v.get("noise_ceiling")
    if isinstance(nc, dict):
        seeds = nc.get("seeds") if isinstance(nc.get("seeds"), list) else []
        rows.append([_e(v.get("objective", "loss")), _e(f"noise ceiling ({len(seeds)} seed(s))"),
                     _e(_fmt(nc.get("pearson", ""))), _e(_fmt(nc.get("spearman", ""))), "", ""])
    return head + _table(("objective", "method", "pearson", "spearman", "per-test P", "per-test S"), rows)


def cards_per_side(n_units: int, top: int) -> int:
    """Units per side of a test card: `top`, or with few units (at most 2 x top, where every card
    would list every unit again) a quarter of them, at least 1: the units x tests table says the rest."""
    return top if n_units > 2 * top else max(1, min(top, n_units // 4))


def _units_by_tests(frame: _Frame, positions: list[int]) -> str:
    """The units x shown test samples table: every unit's effect on each, harm in red."""
    head = ["unit", "label", "members", "hurts (of shown)"] + [
        f"test {int(frame.test_ids[p])} ({frame.test_name[p]}{'' if frame.test_correct[p] else ' ✗'})" for p in positions]
    rows = []
    order = np.argsort((frame.helped[:, positions] < 0).sum(axis=1) * -1, kind="stable") if positions else []
    for i in order:
        cells = []
        for p in positions:
            v = float(frame.helped[i, p])
            cells.append(f'<span class="{"pos" if v > 0 else "neg"}">{v:+.3g}</span>')
        hurt = int((frame.helped[i, positions] < 0).sum())
        rows.append([_e(f"{int(frame.unit_ids[i])} {frame.title(i)}"), _e(frame.unit_name[i]),
                     f"{int(frame.unit_size[i])}", f"{hurt}", *cells])
    return (f'<h3 id="units-by-tests">Every unit on the test samples shown</h3><p class="note">Effect of each unit '
            f"(sign-normalised &Delta;, objective {_e(frame.objective)}; &gt; 0 helped, &lt; 0 hurt); units that "
            "hurt the most of these test samples first. The cards below show each sample's strongest units only.</p>"
            + _table(head, rows, "bytests"))


def _tests_section(frame: _Frame, positions: list[int], samples: _Samples, top: int, chosen: bool) -> str:
    how = ("the test ids asked for" if chosen else
           "misclassified samples first (highest loss first), then the correct ones with the highest loss")
    n_units = len(frame.unit_ids)
    per_side = cards_per_side(n_units, top)
    out = [f'<section id="tests"><h2>Test samples</h2><p class="note">Showing {len(positions)}: {_e(how)}. '
           f"Per sample: the {per_side} units whose removal would hurt this prediction most (helpful) and "
           f"help it most (harmful), by objective {_e(frame.objective)}; &Delta; = f(model without the unit) "
           "&minus; f(model). Member samples drawn: those the trained model fits worst first.</p>"]
    if per_side < top:
        out.append(_units_by_tests(frame, positions))
    top = per_side
    for p in positions:
        tid = int(frame.test_ids[p])
        wrong = not bool(frame.test_correct[p])
        rel = samples.test(tid)
        img = f'<img class="testimg" src="{_e(rel)}" alt="test sample {tid}">' if rel else ""
        col = frame.helped[:, p]
        order = np.argsort(-col, kind="stable")
        helpful = [int(i) for i in order[:top] if col[i] > 0]
        harmful = [int(i) for i in order[::-1][:top] if col[i] < 0]
        rows = []
        for title, kind, sel in (("most helpful", "helpful", helpful), ("most harmful", "harmful", harmful)):
            cards = "".join(_unit_card(frame, r, samples, kind, _delta_text(frame, float(frame.delta[r, p]))) for r in sel)
            rows.append(f'<div class="rowlabel">{title}</div><div class="units">{cards or "<i>none</i>"}</div>')
        out.append(
            f'<div class="test{" wrong" if wrong else ""}" id="test-{tid}" data-test-id="{tid}">'
            f'<div class="testside">{img}<div><b>test {tid}</b></div><div>true: {_e(frame.test_name[p])}</div>'
            f'<div>predicted: {_e(frame.pred_name[p])}{" &#10007;" if wrong else ""}</div>'
            f"<div>loss {float(frame.test_loss[p]):.3g}</div></div><div>{''.join(rows)}</div></div>"
        )
    out.append("</section>")
    return "".join(out)


def unit_statistics(frame: _Frame, top: int) -> dict[str, np.ndarray]:
    """Per unit (U,): "hurt", the test samples for which it is among the `top` most harmful units
    (helped < 0); "harm", its total harm (sum of -helped where < 0); "mean", its mean effect over
    all tests; "own"/"other", its mean effect on test samples of its own label / of the others
    (NaN if none). For a unit spanning labels (`--units-from`), "own" is over its members'
    labels: the mean effect on the test samples of each label its members carry, weighted by
    how many members carry it, and "other" over the labels none of them carries ("mixed_own" is
    True there; NaN when member labels were not recorded). Counting top-k places, not every
    slightly negative entry, keeps the many near-zero effects of unrelated classes out of the
    ranking."""
    h = frame.helped
    n_units = len(frame.unit_ids)
    own = np.full(n_units, np.nan)
    other = np.full(n_units, np.nan)
    mixed_own = np.zeros(n_units, dtype=bool)
    for i, lab in enumerate(frame.unit_label):
        if lab == MIXED:
            if frame.member_labels is None:
                continue
            labs, counts = np.unique(np.asarray(frame.member_labels[i], dtype=np.int64), return_counts=True)
            means = [(float(h[i, frame.test_label == c].mean()), n) for c, n in zip(labs, counts, strict=True)
                     if (frame.test_label == c).any()]
            if means:
                own[i] = sum(m * n for m, n in means) / sum(n for _, n in means)
                mixed_own[i] = True
            mask = np.isin(frame.test_label, labs)
        else:
            mask = frame.test_label == lab
            if mask.any():
                own[i] = float(h[i, mask].mean())
        if (~mask).any():
            other[i] = float(h[i, ~mask].mean())
    hurt = np.zeros(n_units, dtype=np.int64)
    if h.size:
        k = min(top, n_units)
        worst = np.argsort(h, axis=0, kind="stable")[:k]  # (k, N) rows of the k most harmful units
        hits = np.take_along_axis(h, worst, axis=0) < 0
        np.add.at(hurt, worst[hits], 1)
    return {
        "hurt": hurt,
        "harm": np.where(h < 0, -h, 0.0).sum(axis=1),
        "mean": h.mean(axis=1) if h.shape[1] else np.zeros(n_units),
        "own": own,
        "other": other,
        "mixed_own": mixed_own,
    }


def _units_section(frame: _Frame, stats: dict[str, np.ndarray], samples: _Samples, top: int) -> str:
    n = len(frame.test_ids)
    hurt_order = [int(i) for i in np.lexsort((-stats["harm"], -stats["hurt"])) if stats["hurt"][i] > 0][:UNITS_LISTED]
    own = stats["own"]
    suspects = [int(i) for i in np.argsort(np.where(np.isnan(own), np.inf, own), kind="stable") if own[i] < 0]
    suspects = suspects[:UNITS_LISTED]
    off = [frame.disagreeing(i) for i in range(len(frame.unit_ids))]
    share = np.array([(o or 0) / max(int(frame.unit_size[i]), 1) for i, o in enumerate(off)])
    typical = float(np.median(share)) if share.size else 0.0  # outliers: at least twice the median share
    disagree_order = [int(i) for i in np.argsort(-share, kind="stable")
                      if share[i] > 0 and share[i] >= 2 * typical][:UNITS_LISTED]

    def row(i: int, kind: str, stat: str) -> list[str]:
        mixed = " (over its members' labels)" if stats["mixed_own"][i] else ""
        return [
            f"{int(frame.unit_ids[i])}", _e(frame.title(i)), _e(frame.unit_name[i]), f"{int(frame.unit_size[i])}",
            "&ndash;" if off[i] is None else f"{off[i]}",
            f"{int(stats['hurt'][i])}", f"{stats['harm'][i]:.4g}",
            f"{own[i]:+.4g}{mixed}" if not np.isnan(own[i]) else "&ndash;",
            f"{stats['other'][i]:+.4g}" if not np.isnan(stats["other"][i]) else "&ndash;",
            _unit_card(frame, i, samples, kind, stat),
        ]

    header = ("unit", "name", "label", "members", "labelled otherwise than predicted", f"top-{top} harmful for",
              "total harm", "own-label mean effect", "other-label mean effect", "members drawn")
    hurt_rows = [row(i, "harmful", f"top-{top} harmful for {int(stats['hurt'][i])} tests") for i in hurt_order]
    sus_rows = [row(i, "harmful", f"own-label effect {own[i]:+.3g}") for i in suspects]
    dis_rows = [row(i, "harmful", f"{share[i]:.0%} of its members") for i in disagree_order]
    effect = ("raises the loss" if frame.objective == "loss" else f"lowers the {frame.objective}")
    n_mixed = int((frame.unit_label == MIXED).sum())
    not_computed = int(np.isnan(own).sum())
    if sus_rows:
        suspects_html = _table(header, sus_rows)
    elif not_computed:
        suspects_html = (f"<p><i>none among the units where it is computed; not computed for {not_computed} "
                         f"unit(s) ({'spanning labels without recorded member labels' if n_mixed else 'no test sample of their label'})"
                         "</i></p>")
    else:
        suspects_html = "<p><i>none: every unit helps the test samples of its own label(s) on average</i></p>"
    if frame.member_labels is None or frame.member_predicted is None:
        dis_html = "<p><i>not computed: this run did not record its members' labels and predictions</i></p>"
    elif dis_rows:
        dis_html = _table(header, dis_rows)
    else:
        dis_html = ("<p><i>none: the trained model predicts every training sample's own label</i></p>" if not share.any()
                    else "<p><i>none stands out: no unit has twice the median share of such members</i></p>")
    mixed_note = (f" For the {n_mixed} unit(s) spanning labels the own-label effect is over their members' labels "
                  "(each label's test samples, weighted by how many members carry it)." if n_mixed else "")
    return (
        '<section id="units"><h2>Units</h2>'
        f'<p class="note">Effect = how much removing the unit would worsen a prediction (sign-normalised '
        f"&Delta;, objective {_e(frame.objective)}): &gt; 0 the unit helped, &lt; 0 it hurt. A unit hurts a "
        f"test sample when removing it would improve that prediction; <i>top-{top} harmful for</i> counts the "
        f"test samples (of {n}) for which it is among the {top} most harmful units; total harm sums its "
        "negative effects over all test samples. Members drawn: those the trained model fits worst (highest "
        "loss) first, each with its label (in red, label&rarr;prediction where the model predicts another).</p>"
        f'<h3 id="units-hurting">Units that hurt the most test samples</h3>{_table(header, hurt_rows)}'
        '<h3 id="label-problems">Likely label problems</h3>'
        '<p class="note">Units whose removal would improve the predictions on test samples of their own label, '
        f"on average (removing them {_e('lowers' if frame.objective == 'loss' else 'raises')} the "
        f"{_e(frame.objective)} there): their members may be mislabelled or atypical of the class. "
        f"Normally a unit's removal {_e(effect)} on its own class.{_e(mixed_note)}</p>"
        + suspects_html
        + '<h4 id="label-disagreement">Members the trained model labels otherwise</h4>'
        '<p class="note">Per member: its label against the trained model\'s prediction on it. Listed: units '
        f"where the share of such members is at least twice the median unit's ({typical:.0%}), largest first. "
        "A model that fits its training data fully disagrees with none, so an empty list says little; a high "
        "share points at wrong labels.</p>"
        + dis_html
        + "</section>"
    )


def _charts(frame: _Frame, stats: dict[str, np.ndarray], top: int) -> tuple[bytes, int, int]:
    """One PNG of histograms of per-unit effects (four; three when no unit has an own-label
    effect): its bytes and (width, height) in pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h = frame.helped
    own = stats["own"][~np.isnan(stats["own"])]
    panels = [
        (stats["mean"], "mean effect of each unit over all test samples", "units", False),
        (h.reshape(-1), "effect of each unit on each test sample", "unit x test pairs (log)", True),
        (stats["hurt"].astype(float), f"test samples for which each unit is top-{top} harmful", "units", False),
    ]
    if own.size:
        panels.append((own, "mean effect on test samples of the unit's own label(s)", "units", False))
    dpi = 80
    fig = Figure(figsize=(11, 6.4) if len(panels) == 4 else (11, 3.4), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2) if len(panels) == 4 else fig.subplots(1, 3)
    for ax, (values, title, ylabel, log) in zip(axes.reshape(-1), panels, strict=True):
        values = values[np.isfinite(values)]
        if values.size:
            ax.hist(values, bins=40, color="#4a72b8", log=log)
        ax.axvline(0.0, color="#c33", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"objective {frame.objective}: effect > 0 = the unit helped (removing it worsens the prediction)",
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    width, height = fig.get_size_inches() * dpi
    return buf.getvalue(), int(round(width)), int(round(height))


def _validation(run: AuditRun) -> dict[str, Any] | None:
    """validation.json when it is a readable table (anything else: as if absent)."""
    try:
        v = run.store.read_json(RunStore.VALIDATION) if run.store.exists(RunStore.VALIDATION) else None
    except StorageError:
        return None
    return v if isinstance(v, dict) else None


def _report_folder(run: AuditRun, report_out: str | None) -> _OutDir:
    """The report's folder: the caller's --report-out as given, or <run>/report, whose `report`
    is the run folder's own entry and so is never followed if it is a link."""
    try:
        if report_out is None:
            if not run.store.local:
                raise InputError(f"{run.store.url} is not a local folder: give --report-out DIR (a local folder) "
                                 "for its report")
            parent = _OutDir.open(run.store.root)
            try:
                return parent.sub("report")
            finally:
                parent.close()
        if "://" in report_out and not report_out.startswith("file://"):
            raise InputError(f"--report-out must be a local folder, got {report_out}")
        return _OutDir.open(report_out.removeprefix("file://"))
    except OSError as e:
        where = report_out or os.path.join(run.store.root, "report")
        raise InputError(f"cannot write the report to {where}: {brief(e)}") from None


def write_report(
    run_url: str,
    report_out: str | None = None,
    test_ids: Sequence[int] | None = None,
    objective: str = "loss",
    top: int = 5,
    max_tests: int = 12,
    storage_options: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
    train: str | None = None,
    test: str | None = None,
    data_root: str | None = None,
    warnings_out: list[str] | None = None,
) -> str:
    """Write <run>/report/index.html (or <report_out>/index.html) and its PNGs; returns its path.
    The page opens with the run's warnings (`ddm_ray.advice.run_warnings`), which are also
    appended to `warnings_out` when given.

    Raises RunStateError when run_url holds no complete run, InputError for an unknown objective
    or test id, ConfigError for top/max_tests below 1. Data that cannot be loaded (e.g. a redacted
    presigned URL) only leaves the sample pictures out, with the reason on the page.
    train/test (Parquet) or data_root (MNIST, CIFAR-10): where the run's data are, checked against
    its data fingerprint; without them the locations the manifest records are read, after a log
    line naming them (`ddm_ray.readers`). A report never imports a model.
    """
    log = log or (lambda _msg: None)
    if not (1 <= top <= 10_000 and 1 <= max_tests <= 10_000):
        raise ConfigError("--top and --max-tests must be in [1, 10000]")
    t0 = time.perf_counter()
    opts = dict(storage_options or {})
    run = open_run(run_url, opts)
    frame = _frame(run, objective)
    positions = choose_tests(frame, test_ids, max_tests)
    validation = _validation(run)
    from ddm_ray.advice import run_warnings

    warnings = run_warnings(run.manifest, validation)
    if warnings_out is not None:
        warnings_out.extend(warnings)
    folder = _report_folder(run, report_out)
    try:
        return _write(run, folder, frame, positions, validation, objective, top, test_ids, opts,
                      {"train": train, "test": test, "root": data_root}, log, t0, warnings)
    except OSError as e:
        raise InputError(f"cannot write the report to {folder.path}: {brief(e)}") from None
    finally:
        folder.close()


def _write(
    run: AuditRun, folder: _OutDir, frame: _Frame, positions: list[int], validation: dict[str, Any] | None,
    objective: str, top: int, test_ids: Sequence[int] | None, opts: dict[str, str], data: dict[str, str | None],
    log: Callable[[str], None], t0: float, warnings: list[str],
) -> str:
    pictures = folder.sub("samples")
    try:
        for name in pictures.names():  # drop our own stale pictures only
            if name.endswith(".png") and name.startswith(("train-", "test-")):
                pictures.remove(name)
        samples, sample_note = _load_samples(run, pictures, opts, data)
        log(sample_note)
        stats = unit_statistics(frame, top)
        png, chart_w, chart_h = _charts(frame, stats, top)
        folder.write("effects.png", png)
        page = _page(run, frame, positions, samples, sample_note, validation, objective, top, test_ids, stats,
                     warnings, chart_w, chart_h)
    finally:
        pictures.close()
    folder.write("index.html", page.encode("utf-8"))
    index = os.path.join(folder.path, "index.html")
    log(f"report: {len(positions)} test samples, {len(samples.written)} samples drawn, "
        f"{time.perf_counter() - t0:.1f}s -> {index}")
    return index


def _page(
    run: AuditRun, frame: _Frame, positions: list[int], samples: _Samples, sample_note: str,
    validation: dict[str, Any] | None, objective: str, top: int, test_ids: Sequence[int] | None,
    stats: dict[str, np.ndarray], warnings: list[str], chart_w: int, chart_h: int,
) -> str:
    bars = " bars" if samples.available and samples.layout is None else ""
    title = f"ddm-ray report: {run.store.url}"
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body class=\"report{bars}\">"
        f"<h1>{_e(title)}</h1>"
        f'<p class="note">config {_e(run.manifest.get("config_hash", "?"))}, objective {_e(objective)}. '
        'Sign: &Delta; = f(model without the unit) &minus; f(model); for loss &Delta; &gt; 0 means the unit helped, '
        "for margin and correct &Delta; &lt; 0 means it helped.</p>"
        '<nav><a href="#summary">Summary</a><a href="#tests">Test samples</a><a href="#units">Units</a>'
        '<a href="#distributions">Distributions</a></nav>'
        + _warnings(warnings)
        + _summary(run, frame, samples, sample_note, validation)
        + _tests_section(frame, positions, samples, top, bool(test_ids))
        + _units_section(frame, stats, samples, top)
        + '<section id="distributions"><h2>Distributions</h2>'
        f'<img class="chart" src="effects.png" alt="histograms of per-unit effects" width="{chart_w}" '
        f'height="{chart_h}"></section>'
        + "</body></html>\n"
    )
    return page

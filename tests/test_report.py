"""`ddm-ray report`: the HTML page over a real small run, its pictures, and a real browser's view."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import ddm_ray
from ddm_ray.cli import main
from ddm_ray.errors import InputError
from ddm_ray.report import (
    MEMBERS_SHOWN,
    _Frame,
    cards_per_side,
    choose_tests,
    image_layout,
    unit_statistics,
    write_report,
)
from tests.conftest import TINY_RUN, blobs

NAMES = np.array(["<i>ant</i>", "bee & co", 'cat"s'])  # label names the page must escape


def _string_label_parquet(path: Path, n: int, seed: int) -> str:
    x, y = blobs(n, seed=seed)
    pq.write_table(pa.table({"x": pa.array(list(x), pa.list_(pa.float32())), "y": pa.array(NAMES[y])}), str(path))
    return str(path)


@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory) -> str:
    """16 features, string labels with HTML characters: members are drawn as feature bars."""
    d = tmp_path_factory.mktemp("report_tab")
    tr = _string_label_parquet(d / "train.parquet", 120, 0)
    te = _string_label_parquet(d / "test.parquet", 30, 1)
    out = str(d / "run")
    assert main(["run", "--train", tr, "--test", te, "--out", out, *TINY_RUN]) == 0
    return out


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> str:
    """Digits as (1, 8, 8) images through a small ConvNet: members are drawn as images."""
    out = str(tmp_path_factory.mktemp("report_img") / "run")
    assert main(["run", "--out", out, "--input-shape", "1,8,8", "--model", "convnet", "--conv-channels", "4,8",
                 "--fc-width", "16", "--max-train", "200", "--max-test", "40", "--epochs", "2",
                 "--batch-size", "50", "--clusters-per-class", "1", "--ipc", "2", "--distill-steps", "5",
                 "--quiet", "--engine", "local"]) == 0
    return out


def _page(index: str) -> str:
    return Path(index).read_text(encoding="utf-8")


def _imgs(page: str) -> list[str]:
    return re.findall(r"<img [^>]*>", page)


def _attr(tag: str, name: str) -> str:
    m = re.search(rf'{name}="([^"]*)"', tag)
    assert m, f"{name} missing in {tag}"
    return m.group(1)


def _cards(page: str) -> list[tuple[int, list[int]]]:
    """(unit id, member sample ids drawn) of every unit card, in page order."""
    out = []
    for m in re.finditer(r'<div class="unit [a-z]+" data-unit-id="(\d+)">(.*?)</div></div>', page):
        out.append((int(m.group(1)), [int(s) for s in re.findall(r'data-sample-id="(\d+)"', m.group(2))]))
    return out


def _check_pngs(page: str, folder: Path) -> list[Image.Image]:
    images = []
    for tag in _imgs(page):
        path = folder / _attr(tag, "src")
        assert path.is_file(), path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            assert im.format == "PNG"
            im.load()
            images.append(im.copy())
    return images


def test_report_sections_units_and_member_pictures(tabular_run):
    index = write_report(tabular_run)
    folder = Path(index).parent
    assert folder == Path(tabular_run) / "report"
    page = _page(index)
    for section in ("summary", "tests", "units", "distributions", "units-hurting", "label-problems"):
        assert f'id="{section}"' in page
    assert "No validation.json" in page and "test accuracy" in page and "train_and_units" in page
    assert len(_check_pngs(page, folder)) == len(_imgs(page)) > 0

    run = ddm_ray.open_run(tabular_run)
    units = run.units().to_pydict()
    members = dict(zip(units["unit_id"], units["sample_ids"], strict=True))
    losses = dict(zip(units["unit_id"], units["member_loss"], strict=True))
    cards = _cards(page)
    assert cards
    for uid, drawn in cards:  # each card: the members the model fits worst first, up to the cap
        worst = sorted(range(len(members[uid])), key=lambda j: (-losses[uid][j], j))[:MEMBERS_SHOWN]
        assert drawn == [members[uid][j] for j in worst]
    drawn_ids = {s for _u, ids in cards for s in ids}
    on_disk = {int(p.stem.split("-")[1]) for p in (folder / "samples").glob("train-*.png")}
    assert on_disk == drawn_ids
    member_tags = [t for t in _imgs(page) if 'class="member"' in t]
    assert len(member_tags) == sum(len(ids) for _u, ids in cards)
    # 16 features are not an image: feature bars of a fixed size
    assert 'class="report bars"' in page and "bar charts of their 16 features" in page
    assert {Image.open(folder / _attr(t, "src")).size for t in member_tags} == {(96, 48)}

    # default choice: misclassified first by loss, at most max_tests; helpful/harmful as the API ranks them
    shown = [int(t) for t in re.findall(r'class="test[^"]*" id="test-\d+" data-test-id="(\d+)"', page)]
    ti = run.test_index().to_pydict()
    key = {t: (c, -loss) for t, c, loss in zip(ti["test_id"], ti["correct"], ti["loss"], strict=True)}
    assert len(shown) == min(12, len(key)) and shown == sorted(shown, key=lambda t: key[t])
    first = re.search(rf'data-test-id="{shown[0]}">(.*?)(<div class="test(?: wrong)?" id=|</section>)', page).group(1)
    helpful_part = first.split('<div class="rowlabel">most harmful</div>')[0]
    helpful = [int(u) for u in re.findall(r'class="unit helpful" data-unit-id="(\d+)"', helpful_part)]
    per_side = cards_per_side(len(members), 5)  # 6 units: the cards show 1 a side, the table all of them
    assert per_side == 1 and 'id="units-by-tests"' in page
    expected = [u for u, d in run.top_units(test_id=shown[0], k=per_side)["helpful"] if d > 0]
    assert helpful == expected


def test_report_escapes_data_text(tabular_run):
    page = _page(write_report(tabular_run))
    assert "<i>ant</i>" not in page and "&lt;i&gt;ant&lt;/i&gt;" in page
    assert "bee &amp; co" in page and "cat&quot;s" in page


def test_report_shows_the_test_ids_asked_for(tabular_run, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", tabular_run, "--report-out", str(out), "--test-id", "7", "--test-id", "3",
                 "--test-id", "7", "--top", "2", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    page = _page(str(out / "index.html"))
    assert re.findall(r'data-test-id="(\d+)"', page) == ["7", "3"]
    assert (out / "samples" / "test-7.png").is_file() and (out / "samples" / "test-3.png").is_file()
    assert len(re.findall(r'class="unit helpful"', page.split('id="units"')[0])) <= 4
    with pytest.raises(InputError, match="test id 999"):
        write_report(tabular_run, report_out=str(tmp_path / "x"), test_ids=[999])


def test_report_without_the_data_still_renders(tabular_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tabular_run, copy, ignore=shutil.ignore_patterns("report"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["data"]["train"] = "https://example.invalid/train.parquet?<redacted>"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    page = _page(write_report(str(copy)))
    note = re.search(r'id="sample-note">([^<]*)<', page).group(1)
    assert note.startswith("Sample images not drawn: the run&#x27;s data could not be loaded (") and "\n" not in note
    assert not [t for t in _imgs(page) if 'class="member"' in t or 'class="testimg"' in t]
    assert 'id="tests"' in page and 'data-unit-id="' in page and (copy / "report" / "effects.png").is_file()


def test_report_never_writes_through_planted_links(tabular_run, tmp_path):
    """Links planted in <run>/report/ (the temporary name, the chart, a picture, the samples
    folder itself, the report folder) point outside the run: those files stay untouched, and the
    report's own files are regular files inside the run."""
    copy = tmp_path / "run"
    shutil.copytree(tabular_run, copy, ignore=shutil.ignore_patterns("report"))
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = {name: outside / name for name in ("tmp", "effects", "picture", "index")}
    for path in victims.values():
        path.write_text("precious")
    rep = copy / "report"
    (rep / "samples").mkdir(parents=True)
    os.symlink(victims["tmp"], rep / "index.html.tmp")
    os.symlink(victims["effects"], rep / "effects.png")
    os.symlink(victims["index"], rep / "index.html")
    os.symlink(victims["picture"], rep / "samples" / "train-0.png")
    index = write_report(str(copy), max_tests=2)
    assert all(p.read_text() == "precious" for p in victims.values())
    for name in ("index.html", "effects.png"):
        assert (rep / name).is_file() and not (rep / name).is_symlink()
    assert not (rep / "samples" / "train-0.png").is_symlink()
    assert Path(index) == rep / "index.html" and "<!DOCTYPE html>" in _page(index)

    # the samples folder, then the report folder itself, as links to a folder outside
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "train-1.png").write_text("theirs")
    shutil.rmtree(rep / "samples")
    os.symlink(theirs, rep / "samples")
    write_report(str(copy), max_tests=2)
    assert sorted(os.listdir(theirs)) == ["train-1.png"] and (theirs / "train-1.png").read_text() == "theirs"
    assert (rep / "samples").is_dir() and not (rep / "samples").is_symlink() and os.listdir(rep / "samples")
    shutil.rmtree(rep)
    os.symlink(theirs, rep)
    write_report(str(copy), max_tests=2)
    assert sorted(os.listdir(theirs)) == ["train-1.png"] and rep.is_dir() and not rep.is_symlink()
    assert not [n for n in os.listdir(rep) if ".tmp" in n], "no temporary file left behind"


@pytest.fixture
def s3_run(tabular_run, monkeypatch):
    """The tabular run copied into a moto S3 bucket: (s3 URL, storage options)."""
    pytest.importorskip("moto")
    import fsspec
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"endpoint_url": f"http://{host}:{port}"}
    fs = fsspec.filesystem("s3", **opts)
    bucket = f"report-{uuid.uuid4().hex[:12]}"  # moto's backend is shared by every server in this process
    fs.mkdir(bucket)
    fs.put(tabular_run, f"{bucket}/run", recursive=True)
    yield f"s3://{bucket}/run", opts
    server.stop()


def test_report_of_an_object_store_run_needs_a_local_folder(s3_run, tmp_path, capsys):
    url, opts = s3_run
    options = [f"--storage-option=endpoint_url={opts['endpoint_url']}"]
    assert main(["report", url, *options, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give --report-out DIR" in err
    assert main(["report", url, *options, "--report-out", str(tmp_path / "rep"), "--max-tests", "2", "--quiet"]) == 0
    page = _page(str(tmp_path / "rep" / "index.html"))
    assert len(re.findall(r'class="test[^"]*" id="test-', page)) == 2 and url in page
    assert len(_check_pngs(page, tmp_path / "rep")) == len(_imgs(page)) > 2


def test_report_one_line_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run here" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text(json.dumps({"status": "running"}))
    assert main(["report", "--out", str(tmp_path / "half")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not complete" in err
    assert main(["report", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 2
    assert "two run folders" in capsys.readouterr().err


def test_image_layout_rule():
    assert image_layout((1, 28, 28)) == (1, 28, 28) and image_layout((3, 32, 32)) == (3, 32, 32)
    assert image_layout((8, 8)) == (1, 8, 8) and image_layout((64,)) == (1, 8, 8)
    assert image_layout((784,)) == (1, 28, 28)
    assert image_layout((16,)) is None and image_layout((10,)) is None and image_layout((2, 8, 8)) is None


def _frame(delta: np.ndarray, objective: str, unit_label: list[int], test_label: list[int],
           correct: list[bool], loss: list[float]) -> _Frame:
    u, n = delta.shape
    return _Frame(objective, np.arange(u), delta if objective == "loss" else -delta, delta,
                  np.asarray(unit_label), [str(v) for v in unit_label], np.ones(u, np.int64), ["cluster"] * u,
                  [[i] for i in range(u)], np.arange(100, 100 + n), np.asarray(test_label),
                  [str(v) for v in test_label], [str(v) for v in test_label], np.asarray(loss), np.asarray(correct))


def test_unit_statistics_and_test_choice_on_a_hand_made_matrix():
    # loss deltas: unit 0 helps test 0 (its label) and hurts test 1; unit 1 hurts its own label (test 0)
    delta = np.array([[0.5, -0.2, 0.1], [-0.3, 0.4, -0.1], [0.2, 0.1, -0.4]], np.float32)
    f = _frame(delta, "loss", [0, 0, 1], [0, 1, 1], [True, False, False], [0.1, 2.0, 3.0])
    s = unit_statistics(f, top=1)
    assert s["hurt"].tolist() == [1, 1, 1]  # most harmful: test 0 -> unit 1, test 1 -> unit 0, test 2 -> unit 2
    np.testing.assert_allclose(s["harm"], [0.2, 0.4, 0.4], rtol=1e-6)
    np.testing.assert_allclose(s["own"], [0.5, -0.3, (0.1 - 0.4) / 2], rtol=1e-6)
    np.testing.assert_allclose(s["other"], [(-0.2 + 0.1) / 2, (0.4 - 0.1) / 2, 0.2], rtol=1e-6)
    assert unit_statistics(f, top=2)["hurt"].tolist() == [1, 2, 1]  # only negative effects count
    margin = unit_statistics(_frame(-delta, "margin", [0, 0, 1], [0, 1, 1], [True] * 3, [0.0] * 3), top=1)
    np.testing.assert_allclose(margin["own"], s["own"], rtol=1e-6)  # margin signs flip into the same effect
    assert choose_tests(f, None, 2) == [2, 1]  # misclassified first, by descending loss
    assert choose_tests(f, None, 5) == [2, 1, 0]
    assert choose_tests(f, [100, 102, 100], 1) == [0, 2]  # asked-for ids, each once, max_tests not applied


def test_image_run_draws_members_as_images(image_run):
    index = write_report(image_run, max_tests=4, top=2)
    folder = Path(index).parent
    page = _page(index)
    assert 'class="report"' in page and "drawn as images" in page and "1x8x8" in page
    images = _check_pngs(page, folder)
    members = [t for t in _imgs(page) if 'class="member"' in t]
    assert members and len(re.findall(r'class="test[^"]*" id="test-', page)) == 4
    for tag in members:
        with Image.open(folder / _attr(tag, "src")) as im:
            assert im.size == (48, 48) and im.mode == "L"  # 8x8 upscaled 6x, grayscale
            assert len(set(im.getdata())) > 2  # a drawn digit, not a blank square
    assert len(images) == len(_imgs(page))


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(profile)})


@pytest.mark.skipif(_browser() is None, reason="no chromium/chrome binary on PATH (.ci/run installs the distribution's chromium)")
def test_report_in_a_real_browser(image_run, tmp_path):
    index = Path(write_report(image_run, report_out=str(tmp_path / "rep"), max_tests=3, top=2))
    binary = _browser()
    assert binary is not None
    url = index.resolve().as_uri()
    dom = _chromium(binary, tmp_path / "profile", "--dump-dom", url).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    total = len(_imgs(_page(str(index))))
    assert int(_attr(body.group(0), "data-images-total")) == total > 10
    assert int(_attr(body.group(0), "data-images-loaded")) == total  # every picture decoded

    shot = tmp_path / "shot.png"
    _chromium(binary, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2000", url)
    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        gray = np.asarray(im.convert("L"), dtype=np.float32)
    assert gray.std() > 10  # not a blank page
    # the first test card's 96x96 sample sits in its dark-background digit: some rows are mostly dark
    assert (gray < 60).sum() > 96 * 96


@pytest.fixture(scope="module")
def annotator_run(tmp_path_factory) -> tuple[str, set[int]]:
    """8 annotators of 3-class blobs, one unit each (`--units-from source`); annotator-5 flipped
    30% of its labels. Returns the run folder and the flipped training ids."""
    d = tmp_path_factory.mktemp("report_annot")
    x, y = blobs(240, seed=0)
    xt, yt = blobs(60, seed=1)
    source = np.array([f"annotator-{i % 8}" for i in range(240)])
    rng = np.random.default_rng(0)
    flipped = np.nonzero((source == "annotator-5") & (rng.random(240) < 0.3))[0]
    y = y.copy()
    y[flipped] = (y[flipped] + 1) % 3
    pq.write_table(pa.table({"x": list(x), "y": y, "source": source, "id": np.arange(240)}), d / "train.parquet")
    pq.write_table(pa.table({"x": list(xt), "y": yt}), d / "test.parquet")
    args = list(TINY_RUN)
    i = args.index("--clusters-per-class")
    del args[i : i + 2]
    args[args.index("--epochs") + 1] = "20"
    out = str(d / "run")
    assert main(["run", "--train", str(d / "train.parquet"), "--test", str(d / "test.parquet"), "--units-from",
                 "source", "--out", out, *args]) == 0
    return out, set(flipped.tolist())


def test_report_names_units_shows_member_labels_and_flags_the_sloppy_annotator(annotator_run):
    out, flipped = annotator_run
    index = write_report(out, max_tests=6)
    page = _page(index)
    run = ddm_ray.open_run(out)
    units = run.units().to_pydict()
    names = dict(zip(units["unit_id"], units["name"], strict=True))
    sloppy = units["name"].index("annotator-5")
    # unit names wherever a unit appears: cards, the units tables, the units x tests table
    for m in re.finditer(r'<div class="unit [a-z]+" data-unit-id="(\d+)"><div><b>unit \d+ ([^<]+)</b>', page):
        assert m.group(2) == names[int(m.group(1))]
    units_part = page[page.index('id="units"'):]
    assert all(f"<td>{names[u]}</td>" in units_part for u in units["unit_id"] if f'data-unit-id="{u}"' in units_part)
    # each member drawn with its own label; label->prediction where the model disagrees
    flags = re.findall(r'<span class="neg">(\d)&rarr;(\d)</span>', page)
    assert flags and all(a != b for a, b in flags)
    label_of = {s: lab for ids, labs in zip(units["sample_ids"], units["member_labels"], strict=True)
                for s, lab in zip(ids, labs, strict=True)}
    caps = re.findall(r'<span class="mem" title="train sample (\d+): label (\d)', page)
    assert caps and all(label_of[int(s)] == int(lab) for s, lab in caps)
    # likely label problems: computed for the mixed units over their members' labels, and the
    # disagreement table ranks the sloppy annotator first, drawing flipped members
    problems = page[page.index('id="label-problems"'):page.index('id="distributions"')]
    assert "every unit helps its own label" not in problems and "own-label effect is over their members" in problems
    disagree = problems[problems.index('id="label-disagreement"'):]
    cards = _cards(disagree)
    assert cards[0][0] == sloppy and set(cards[0][1]) <= flipped and len(cards[0][1]) == MEMBERS_SHOWN
    # 8 units: a units x tests table first, then cards with 2 units a side
    assert cards_per_side(8, 5) == 2
    assert page.index('id="units-by-tests"') < page.index('class="test')
    table = re.search(r'<table class="bytests">(.*?)</table>', page).group(1)
    assert table.count("<tr>") == 1 + 8 and all(n in table for n in names.values())
    first_card = re.search(r'data-test-id="\d+">(.*?)(<div class="test(?: wrong)?" id=|</section>)', page).group(1)
    assert len(re.findall(r'class="unit helpful"', first_card)) <= 2
    assert len(re.findall(r'class="unit harmful"', first_card)) <= 2
    # the config table: no k-means options for column units; timings in pipeline order, sub-stages indented
    config = re.search(r'<table class="config">(.*?)</table>', page).group(1)
    assert "from_column=source" in config and "clusters_per_class" not in config and "kmeans_iters" not in config
    assert "conv_channels" not in config and "ipc=" not in config and "hidden=16" in config
    stages = re.findall(r"<tr><td>(?:<span class=\"sub\">)?([a-z_]+)(?:</span>)?</td><td>[\d.]+</td></tr>", page)
    assert stages[:5] == ["load_data", "train_and_units", "stability", "cost_estimate", "distill"]
    assert stages[-1] == "total"
    assert stages.index("distill") < stages.index("distill_calibration") < stages.index("online")
    assert '<span class="sub">distill_calibration</span>' in page
    # the fourth histogram is filled (own-label effects of the mixed units)
    assert 'width="880" height="512"' in page
    with Image.open(Path(index).parent / "effects.png") as im:
        assert im.size == (880, 512)


def test_applicable_settings_drop_what_did_not_apply():
    from ddm_ray.config import (
        DistillConfig,
        ModelConfig,
        OnlineConfig,
        RunConfig,
        UnitConfig,
        applicable_settings,
    )

    user = applicable_settings(RunConfig(model=ModelConfig(arch="mymodels:build"),
                                         units=UnitConfig(from_column="source")).to_dict())
    assert "hidden" not in user["model"] and "fc_width" not in user["model"] and user["model"]["arch"] == "mymodels:build"
    assert "clusters_per_class" not in user["units"] and user["units"]["from_column"] == "source"
    assert "ipc" not in user["distill"] and "calibration_units" in user["distill"]
    assert "x_column" not in user["data"] and "train" not in user["data"]  # digits; None values dropped
    kmeans = applicable_settings(RunConfig().to_dict())
    assert kmeans["units"]["clusters_per_class"] == 8 and "from_column" not in kmeans["units"]
    assert kmeans["model"]["hidden"] == [64, 64] or kmeans["model"]["hidden"] == (64, 64)
    influence = applicable_settings(RunConfig(distill=DistillConfig(target="influence")).to_dict())["distill"]
    assert not {"blend_weight", "calibration_units", "unrolled_rank", "target_solver"} & set(influence)
    exact = applicable_settings(RunConfig(online=OnlineConfig(method="exact")).to_dict())
    assert "distill" not in exact and exact["online"]["method"] == "exact" and "lr" not in exact["online"]
    literal = applicable_settings(RunConfig(distill=DistillConfig(method="literal")).to_dict())["distill"]
    assert literal["ipc"] == 4 and "probe_rank" not in literal and "target" not in literal

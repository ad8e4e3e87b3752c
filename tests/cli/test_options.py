"""Run options generated from the config dataclasses: flags, TOML, precedence, refusals."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from ddm_ray.cli import build_parser, configs_from_args, main
from ddm_ray.cli.options import SECTIONS, help_text, options
from ddm_ray.config import RunConfig, config_diff
from ddm_ray.errors import ConfigError


def _configs(argv: list[str]):
    return configs_from_args(build_parser().parse_args(["run", *argv]))


def test_every_config_field_is_a_flag_with_help_and_default(capsys):
    flagged = {t for o in options() for t in o.targets}
    for section, klass in SECTIONS.items():
        for f in dataclasses.fields(klass):
            hidden = f.metadata.get("flag") == ""
            assert ((section, f.name) in flagged) != hidden, (section, f.name)
    with pytest.raises(SystemExit):
        main(["run", "--help-all"])
    text = " ".join(capsys.readouterr().out.split())
    for o in options():
        assert f"--{o.flag}" in text
    assert "--clusters-per-class INT k-means clusters per class (K) (default: 8)" in text
    assert "--target TEXT basis target: blend | unrolled | influence (default: blend)" in text


ADVANCED = ("--probe-norm", "--basis-ridge", "--probe-energy", "--unrolled-rank", "--probe-rank", "--target-solver",
            "--influence-damping", "--ipc", "--distill-steps", "--online-lr", "--block-units", "--max-in-flight")
EVERYDAY = ("--train", "--test", "--x-column", "--y-column", "--model", "--epochs", "--lr", "--seed",
            "--clusters-per-class", "--units-from", "--engine", "--resume", "--out", "--address", "--quiet")


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_lists_everyday_options_and_help_all_the_advanced_ones(capsys):
    short, full = _help(capsys, "run", "--help"), _help(capsys, "run", "--help-all")
    flags = lambda text: {w.split("=")[0].rstrip(",") for w in text.split() if w.startswith("--")}  # noqa: E731
    for flag in EVERYDAY:
        assert flag in flags(short) and flag in flags(full), flag
    for flag in ADVANCED:
        assert flag not in flags(short) and flag in flags(full), flag
    advanced = [o for o in options() if o.advanced]
    assert {f"--{o.flag}" for o in advanced} >= set(ADVANCED)
    assert f"{len(advanced)} advanced options" in " ".join(short.split()) and "--help-all" in short
    shown = [line for line in short.splitlines() if line.startswith("  --")]
    assert len(shown) <= 35 and len(full.splitlines()) > len(short.splitlines())
    # advanced options sit in groups of their own, after the everyday group of their section
    assert "distillation, advanced:" in full and "\ndistillation" not in short
    assert full.index("\nunits:") < full.index("units, advanced:") < full.index("distillation, advanced:")
    # every default said once per option, in both listings
    for text in (short, full):
        assert "(default: none) (default" not in " ".join(text.split())
    for o in options():
        assert help_text(o).count("(default") == 1, o.flag
    # hidden from --help, still accepted
    cfg, _ = _configs(["--probe-norm", "0.25", "--basis-ridge", "0.01", "--block-units", "8"])
    assert cfg.distill.probe_norm == 0.25 and cfg.distill.ridge == 0.01
    bench = _help(capsys, "bench", "fidelity", "--help")
    assert "--probe-norm" not in bench and "--masks" in bench
    p = subprocess.run([sys.executable, "-m", "ddm_ray.cli", "run", "--help-all"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "--probe-norm" in p.stdout and p.stderr == ""


def test_defaults_equal_the_dataclass_defaults():
    cfg, exe = _configs([])
    assert cfg == RunConfig() and exe.engine == "ray" and not exe.resume


def test_seed_sets_every_seeded_stage():
    cfg, _ = _configs(["--seed", "7"])
    assert cfg.train.seed == cfg.units.seed == cfg.distill.seed == 7


def test_toml_equals_flags_and_flags_override_it(tmp_path):
    toml = tmp_path / "audit.toml"
    toml.write_text(
        'out = "/tmp/from-toml"\n[train]\nepochs = 5\nseed = 3\n[units]\nclusters_per_class = 4\nseed = 3\n'
        '[distill]\nseed = 3\nblend_weight = 0.5\n[online]\nobjectives = ["loss", "margin"]\n'
        '[model]\nhidden = [32]\n[exec]\nengine = "local"\n'
    )
    from_file, exe = _configs(["--config", str(toml)])
    from_flags, exe2 = _configs(["--epochs", "5", "--seed", "3", "--clusters-per-class", "4", "--blend-weight",
                                 "0.5", "--objectives", "loss,margin", "--hidden", "32", "--engine", "local"])
    assert from_file == from_flags and from_file.hash() == from_flags.hash() and exe == exe2
    a = build_parser().parse_args(["run", "--config", str(toml), "--epochs", "9"])
    cfg, _ = configs_from_args(a)
    assert cfg.train.epochs == 9 and cfg.units.clusters_per_class == 4 and a.out == "/tmp/from-toml"


@pytest.mark.parametrize(
    "text,match",
    [
        ("[train]\nepoch = 5\n", r"unknown option \[train\] epoch"),
        ("[training]\nepochs = 5\n", "unknown key 'training'"),
        ("[train]\nepochs = 'five'\n", r"\[train\] epochs: expected an integer"),
        ("[distill]\ntarget = 'both'\n", "'both' is not one of"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        _configs(["--config", str(p)])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--epochs", "x"], "expected an integer"),
        (["--target", "both"], "'both' is not one of"),
        (["--dataset", "digits", "--train", "a.parquet"], "drop one of them"),
        (["--dataset", "parquet"], "needs --train and --test"),
    ],
)
def test_bad_flags_and_contradictions_exit_with_one_line(capsys, argv, match):
    try:
        code = main(["run", *argv])
    except SystemExit as e:  # argparse rejects a value before any command runs
        code = e.code
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_train_and_test_alone_select_parquet():
    cfg, _ = _configs(["--train", "a.parquet", "--test", "b.parquet"])
    assert cfg.data.dataset == "parquet"


def test_config_diff_names_the_fields():
    a, b = RunConfig().to_dict(), dataclasses.replace(RunConfig(), train=dataclasses.replace(
        RunConfig().train, epochs=5)).to_dict()
    assert config_diff(a, b) == ["train.epochs: 30 -> 5"]
    assert config_diff(a, a) == []


def test_version_and_a_light_parser():
    out = subprocess.run([sys.executable, "-m", "ddm_ray.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ddm-ray ")
    probe = ("import sys; from ddm_ray.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'ray', 'pyarrow', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_toml_seed_seeds_every_stage_and_must_agree(tmp_path):
    p = tmp_path / "seed.toml"
    p.write_text("[train]\nseed = 3\n")
    cfg, _ = _configs(["--config", str(p)])
    assert cfg.train.seed == cfg.units.seed == cfg.distill.seed == 3
    p.write_text("[train]\nseed = 3\n[units]\nseed = 4\n")
    with pytest.raises(ConfigError, match="seed is one option"):
        _configs(["--config", str(p)])


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--units-from", "source", "--clusters-per-class", "4"], "do not apply"),
        (["--objectives", "loss,loss"], "objectives repeat"),
        (["--lr", "inf"], "finite"),
    ],
)
def test_contradictory_or_degenerate_options_are_refused(argv, match):
    with pytest.raises(ConfigError, match=match):
        _configs(argv)


def test_a_flag_turns_off_a_boolean_the_file_turned_on(tmp_path):
    p = tmp_path / "resume.toml"
    p.write_text("[exec]\nresume = true\n")
    assert _configs(["--config", str(p)])[1].resume is True
    assert _configs(["--config", str(p), "--no-resume"])[1].resume is False

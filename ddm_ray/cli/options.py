"""CLI flags and TOML keys generated from the config dataclasses: one source of truth.

Every field of `RunConfig`'s sections and of `ExecConfig` becomes a flag (its `opt` metadata
gives the help text, the flag name and the choices), and a key of a TOML file
(`[data]`, `[model]`, `[train]`, `[units]`, `[distill]`, `[online]`, `[exec]`, plus top-level
`out` and `address`). Values come from the dataclass defaults, then the `--config` file, then the
flags given; the dataclasses validate the result. Nothing here imports torch or Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

from ddm_ray.config import (
    DataConfig,
    DistillConfig,
    ExecConfig,
    ModelConfig,
    OnlineConfig,
    RunConfig,
    TrainConfig,
    UnitConfig,
)
from ddm_ray.errors import ConfigError

SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "train": TrainConfig, "units": UnitConfig,
    "distill": DistillConfig, "online": OnlineConfig, "exec": ExecConfig,
}
TITLES = {
    "data": "data", "model": "model", "train": "training", "units": "units", "distill": "distillation",
    "online": "online stage", "exec": "execution (does not change results)",
}
TOP_LEVEL = ("out", "address")  # TOML keys outside any section


@dataclasses.dataclass(frozen=True)
class Option:
    """One flag: the config fields it sets (several for --seed) and how its text parses."""

    flag: str
    dest: str
    targets: tuple[tuple[str, str], ...]  # (section, field)
    kind: str  # str | int | float | bool | ints | strs
    optional: bool
    default: Any
    help: str
    choices: tuple[str, ...] | None
    advanced: bool = False  # listed by --help-all only


def _kind(annotation: str) -> tuple[str, bool]:
    text = annotation.replace(" ", "")
    optional = text.endswith("|None")
    base = text[: -len("|None")] if optional else text
    kinds = {"str": "str", "int": "int", "float": "float", "bool": "bool", "tuple[int,...]": "ints",
             "tuple[int,int]": "ints", "tuple[str,...]": "strs", "tuple[float,...]": "floats",
             "dict[str,str]": "dict"}
    if base not in kinds:  # pragma: no cover - a new field type needs a parser here
        raise TypeError(f"no CLI parser for {annotation}")
    return kinds[base], optional


def options(sections: Mapping[str, type] | None = None) -> list[Option]:
    """Every generated option of `sections` (default: the run's), in section order; fields
    sharing a flag share one option."""
    by_flag: dict[str, Option] = {}
    for section, klass in (SECTIONS if sections is None else sections).items():
        defaults = klass()
        for f in dataclasses.fields(klass):
            flag = f.metadata.get("flag")
            flag = f.name.replace("_", "-") if flag is None else flag
            if not flag:
                continue
            kind, optional = _kind(str(f.type))
            if flag in by_flag:
                prev = by_flag[flag]
                by_flag[flag] = dataclasses.replace(prev, targets=(*prev.targets, (section, f.name)))
                continue
            by_flag[flag] = Option(
                flag, flag.replace("-", "_"), ((section, f.name),), kind, optional,
                getattr(defaults, f.name), f.metadata.get("help", ""), f.metadata.get("choices"),
                bool(f.metadata.get("advanced", False)),
            )
    return list(by_flag.values())


def parse_value(opt: Option, text: str) -> Any:
    """Flag text -> typed value (raises argparse.ArgumentTypeError with a one-line reason)."""
    if opt.optional and text.strip().lower() in ("none", ""):
        return None
    try:
        if opt.kind == "int":
            return int(text)
        if opt.kind == "float":
            return float(text)
        if opt.kind == "ints":
            dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
            if not dims or min(dims) < 1:
                raise ValueError
            return dims
        if opt.kind == "strs":
            return tuple(t.strip() for t in text.split(",") if t.strip())
        if opt.kind == "floats":
            return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        want = {"int": "an integer", "float": "a number", "ints": "positive integers like 1,28,28",
                "floats": "numbers like 0.1,0.5"}[opt.kind]
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
    if opt.choices and text not in opt.choices:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(opt.choices)}")
    return text


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def help_text(o: Option) -> str:
    """The help line of an option: its text, its default once (unless the text already says
    it), and its choices (unless the text already lists them all)."""
    text = o.help
    if "(default" not in text:
        text = f"{text} (default: {_show(o.default)})" if text else f"(default: {_show(o.default)})"
    if o.choices and not all(c in o.help for c in o.choices):
        text += f"; one of {', '.join(o.choices)}"
    return text


class _HelpAll(argparse.Action):
    """--help-all: the help with the advanced options too (they are accepted without it)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kw: Any) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kw: Any) -> None:
        for action in parser._actions:
            full = getattr(action, "full_help", None)
            if full is not None:
                action.help = full
        parser.epilog = None
        parser.print_help()
        parser.exit()


def add_help_all(p: argparse.ArgumentParser) -> None:
    """--help-all on p, and an epilog saying how many advanced options --help leaves out (call
    after the options are added)."""
    hidden = [a for a in p._actions if getattr(a, "full_help", None) is not None]
    if not hidden or any(isinstance(a, _HelpAll) for a in p._actions):
        return
    p.add_argument("--help-all", action=_HelpAll,
                   help=f"show the {len(hidden)} advanced options too (distillation internals, tuning)")
    p.epilog = (f"{len(hidden)} advanced options (distillation internals, online and execution tuning) are accepted "
                "but not listed here: --help-all lists them.")


def add_options(
    p: argparse.ArgumentParser, sections: Mapping[str, type] | None = None, titles: Mapping[str, str] | None = None
) -> None:
    """Add the generated flags of `sections` (default: the run's) to p, grouped by section, the
    advanced ones (`opt(..., advanced=True)`) in groups of their own that only `--help-all`
    lists (`add_help_all`). Defaults are shown in the help but not stored: the namespace holds
    only the flags given (so a --config file can sit underneath them)."""
    groups: dict[tuple[str, bool], Any] = {}
    titles = TITLES if titles is None else titles
    for o in options(sections):
        section = o.targets[0][0]
        key = (section, o.advanced)
        if key not in groups:
            title = titles.get(section, section)
            groups[key] = p.add_argument_group(f"{title}, advanced" if o.advanced else title)
        g = groups[key]
        text = help_text(o)
        shown = argparse.SUPPRESS if o.advanced else text
        if o.kind == "bool":
            action = g.add_argument(f"--{o.flag}", dest=o.dest, action=argparse.BooleanOptionalAction,
                                    default=argparse.SUPPRESS, help=shown)  # --no-X turns off a file's true
        else:
            action = g.add_argument(f"--{o.flag}", dest=o.dest, type=lambda t, o=o: parse_value(o, t),
                                    default=argparse.SUPPRESS, metavar=o.kind.upper() if o.kind != "str" else "TEXT",
                                    help=shown)
        if o.advanced:
            action.full_help = text  # type: ignore[attr-defined]  # restored by --help-all


def read_toml(path: str) -> dict[str, Any]:
    """A --config file as a dict (one-line errors for a missing or malformed file)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"--config {path}: not valid TOML ({str(e).splitlines()[0]})") from None


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, tuples -> Python scalars and lists (what TOML gives)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [v.item() if hasattr(v, "item") else v for v in value]
    return value


def coerce(o: Option, value: Any, where: str) -> Any:
    """A TOML or Python value -> the field's type, or a one-line error naming the key."""
    value = _plain(value)
    if value is None and o.optional:
        return None
    if o.kind == "floats" and isinstance(value, list):
        value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "ints": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        "strs": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "floats": isinstance(value, list) and all(isinstance(v, float) for v in value),
    }[o.kind]
    if not ok:
        want = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
                "ints": "a list of integers", "strs": "a list of strings", "floats": "a list of numbers"}[o.kind]
        raise ConfigError(f"{where}: expected {want}, got {value!r}")
    if o.choices and value not in o.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(o.choices)}")
    if o.kind == "float":
        return float(value)
    return tuple(value) if o.kind in ("ints", "strs", "floats") else value


def values_from_toml(doc: Mapping[str, Any], path: str) -> tuple[dict[tuple[str, str], Any], dict[str, Any]]:
    """TOML document -> ({(section, field): value}, {top-level key: value}); unknown keys refused."""
    by_target = {t: o for o in options() for t in o.targets}
    fields: dict[tuple[str, str], Any] = {}
    top: dict[str, Any] = {}
    for key, value in doc.items():
        if key in TOP_LEVEL:
            if not isinstance(value, str):
                raise ConfigError(f"{path}: {key} must be a string")
            top[key] = value
            continue
        if key == "exec" and isinstance(value, dict) and "storage_options" in value:
            raise ConfigError(f"{path}: [exec] storage_options: use --storage-options-file (credentials stay out of configs)")
        if key not in SECTIONS or not isinstance(value, dict):
            known = ", ".join([*(f"[{s}]" for s in SECTIONS), *TOP_LEVEL])
            raise ConfigError(f"{path}: unknown key {key!r} (known: {known})")
        for name, v in value.items():
            o = by_target.get((key, name))
            if o is None:
                names = ", ".join(f for (s, f) in by_target if s == key)
                raise ConfigError(f"{path}: unknown option [{key}] {name} (known: {names})")
            value = coerce(o, v, f"{path}: [{key}] {name}")
            for target in o.targets:  # one option, several fields (the seed): all of them, one value
                if target in fields and fields[target] != value:
                    raise ConfigError(f"{path}: {o.flag} is one option for {', '.join(f'[{s}]' for s, _ in o.targets)}; "
                                      "give it one value")
                fields[target] = value
    return fields, top


def build_configs(
    given: Mapping[str, Any], file_values: Mapping[tuple[str, str], Any] | None = None,
    storage_options: dict[str, str] | None = None,
) -> tuple[RunConfig, ExecConfig]:
    """Configs from the defaults, then `file_values` ({(section, field): value}), then `given`
    ({option dest: value}, the flags or keyword options given). Unknown names are refused."""
    opts = {o.dest: o for o in options()}
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for (section, name), v in (file_values or {}).items():
        values[section][name] = v
    for dest, v in given.items():
        if dest not in opts:
            raise ConfigError(f"unknown option {dest!r}")
        for section, name in opts[dest].targets:
            values[section][name] = v
    data = values["data"]
    if "dataset" not in data and (data.get("train") or data.get("test")):
        data["dataset"] = "parquet"  # --train/--test select Parquet input by themselves
    if storage_options:
        values["exec"]["storage_options"] = dict(storage_options)
    sub = {s: SECTIONS[s](**values[s]) for s in SECTIONS if s != "exec"}
    cfg = RunConfig(**sub)
    return cfg, ExecConfig(**values["exec"])


def given_options(a: argparse.Namespace, sections: Mapping[str, type] | None = None) -> dict[str, Any]:
    """The generated options present in a parsed namespace (flags the user gave)."""
    return {o.dest: getattr(a, o.dest) for o in options(sections) if hasattr(a, o.dest)}


def dataclass_from_args(klass: type, a: argparse.Namespace, **fixed: Any) -> Any:
    """An instance of a dataclass whose flags were added by `add_options({name: klass})`: the
    flags given over the defaults, then `fixed` (values other options decide)."""
    values: dict[str, Any] = {}
    for o in options({"_": klass}):
        if hasattr(a, o.dest):
            for _section, name in o.targets:
                values[name] = getattr(a, o.dest)
    return klass(**{**values, **fixed})

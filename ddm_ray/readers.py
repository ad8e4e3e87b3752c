"""What a reader of a finished run (validate, report) takes from its caller, never from the folder.

A run folder is data, and anyone who can write a shared folder or bucket can write its
`manifest.json`. So a reader:

- never imports code because a manifest names it: a built-in model (`mlp`, `convnet`) is rebuilt
  from the manifest, but a user factory (`config.model.arch` = "package.module:factory") must be
  given by the caller (`--model`, `model=`), by the same name the run recorded; it is imported
  only then, and the module built from it is checked against the run's model fingerprint;
- opens the data locations the caller gives (`--train/--test`, `--data-root`), checked against the
  run's data fingerprint; without them it falls back to the locations the manifest records, and
  says which in one log line before it opens them (the fingerprint check still applies: data that
  are not the run's are refused). Built-in digits has no location.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ddm_ray.config import RunConfig
from ddm_ray.errors import ConfigError, RunStateError
from ddm_ray.store.fs import redact

_log = logging.getLogger(__name__)


def caller_model(cfg: RunConfig, model: str | None, url: str) -> RunConfig:
    """cfg, once the caller has vouched for its model: a built-in model needs nothing; a user
    factory must be named by the caller (the same name the run recorded). Nothing is imported
    here. Raises RunStateError / ConfigError with one line."""
    arch = cfg.model.arch
    if not cfg.model.is_user_model:
        if model is not None and model != arch:
            raise ConfigError(f"--model {model}: this run used the built-in model {arch}; drop --model")
        return cfg
    if model is None:
        raise RunStateError(
            f"{url}: the run's model is the user factory {arch}, and a reader never imports code a run folder "
            f"names; give it yourself with --model {arch} (Python: model={arch!r}), checked against the run's "
            "model fingerprint"
        )
    if model != arch:
        raise ConfigError(f"--model {model}: this run was trained with --model {arch}; give that one")
    return cfg


def caller_data(
    cfg: RunConfig, url: str, train: str | None = None, test: str | None = None, root: str | None = None,
) -> RunConfig:
    """cfg with the data locations the caller gave (`--train/--test` for Parquet, `--data-root`
    for MNIST / CIFAR-10), or, without them, cfg as recorded after one warning line (shown under
    --quiet too) naming the locations the manifest records, which the reader is about to open.
    Raises ConfigError for locations that do not apply to the run's dataset."""
    data = cfg.data
    if data.dataset == "parquet":
        if root is not None:
            raise ConfigError("--data-root: this run read Parquet files; give --train and --test")
        if (train is None) != (test is None):
            raise ConfigError("give both --train and --test (the run's Parquet files), or neither")
        if train is not None:
            return dataclasses.replace(cfg, data=dataclasses.replace(data, train=train, test=test))
        where = f"--train {redact(str(data.train))} --test {redact(str(data.test))}"
    elif data.dataset in ("mnist", "cifar10"):
        if train is not None or test is not None:
            raise ConfigError(f"--train/--test: this run read {data.dataset}; give --data-root")
        if root is not None:
            return dataclasses.replace(cfg, data=dataclasses.replace(data, root=root))
        where = f"--data-root {redact(str(data.root))}"
    else:  # built-in: nothing to open but the package's own copy
        if train is not None or test is not None or root is not None:
            raise ConfigError(f"this run used the built-in dataset {data.dataset}; drop --train/--test/--data-root")
        return cfg
    line = (f"{redact(url)}: reading the run's data from the locations its manifest records ({where}); "
            "give them yourself to choose (checked against the run's data fingerprint)")
    _log.warning(line)
    return cfg


def check_data_fingerprint(manifest: dict[str, Any], ds: Any, url: str) -> None:
    """RunStateError (one line) unless the loaded data are those the run recorded."""
    from ddm_ray.data import data_fingerprint

    recorded = manifest.get("data_fingerprint")
    got = data_fingerprint(ds)
    if recorded is not None and recorded != got:
        raise RunStateError(
            f"{url}: these are not the run's data (data fingerprint {got}, the run recorded {recorded}); "
            "give the run's own --train/--test or --data-root"
        )

"""Exceptions users can act on. The CLI prints their message as one line and exits non-zero."""

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def brief(e: BaseException) -> str:
    """`TypeName: first line of the message`, without terminal colour codes: what a one-line
    error says about an underlying exception (including the cause a Ray task error wraps)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        e = cause
    text = _ANSI.sub("", str(e)).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class DDMError(Exception):
    """Base class for every error ddm-ray reports to a user."""

    exit_code = 2


class InputError(DDMError):
    """The user's data is missing, unreadable or malformed."""


class ConfigError(DDMError):
    """An option or combination of options is invalid."""


class RunStateError(DDMError):
    """The output location holds something incompatible with this run (another config, no run)."""


class StorageError(DDMError):
    """Reading or writing the run's store failed."""


class DamagedArtifactError(StorageError):
    """A run artifact (model.pt, synset.pt, a distillation piece) is not a readable ddm-ray
    artifact of the expected form: `--resume` recomputes it, readers refuse it in one line."""

    def __init__(self, location: str, reason: str) -> None:
        super().__init__(f"{location}: damaged or not a ddm-ray artifact ({reason})")
        self.reason = reason


class NonFiniteError(DDMError):
    """Training, distillation or the online stage produced NaN or infinite values."""

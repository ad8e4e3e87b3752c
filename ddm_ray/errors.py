"""Exceptions users can act on. The CLI prints their message as one line and exits non-zero."""


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


class NonFiniteError(DDMError):
    """Training, distillation or the online stage produced NaN or infinite values."""

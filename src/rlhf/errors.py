"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (bad input file, bad config,
missing path). The CLI prints its message as one line and exits non-zero,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: one line saying what, where and how to fix."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.what = message
        self.where = where
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = []
        if self.where:
            parts.append(f"{self.where}: ")
        parts.append(self.what)
        if self.hint:
            parts.append(f" ({self.hint})")
        return "".join(parts)


class DataError(UserError):
    """Unreadable or malformed input data."""


class ConfigError(UserError):
    """Invalid configuration (params.yaml or command-line overrides)."""


class AccessDenied(UserError):
    """A service (MLflow) refused the request for these credentials: who, what, and how to get access."""

    exit_code = 4


class ValidationFailed(UserError):
    """Data validation found failed expectations; training must not start."""

    exit_code = 3


class DiskFull(UserError):
    """A write ran out of space (ENOSPC/EDQUOT): nothing half-written was kept."""

    exit_code = 4

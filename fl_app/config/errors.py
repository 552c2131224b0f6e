"""Typed configuration errors and the range checks every config check shares.

A config that must not run fails before any client starts, with the field's dotted
name, the value found and the fix (docs/architecture.md, Configuration). The kind of
failure is the exception's class, so a caller that needs to tell them apart catches a
class instead of searching the message text:

- :class:`ConfigRangeError`: one value outside the range its field allows;
- :class:`ConfigConflictError`: values that are each fine but do not go together
  (a threat model the mechanism cannot keep, a setting that would silently do nothing);
- :class:`ConfigPlanError`: a config whose resolved plan cannot be met (a target ε out
  of reach, a budget spent before round 1, a ring that cannot hold the noised sum).

All three are :class:`ConfigError`, itself a ``ValueError``.

The range helpers (:func:`require_positive`, :func:`require_fraction`,
:func:`require_in`) are the one implementation of "must be > 0", "must lie in (0, 1]"
and "[a, b]" for the validator and the plan.
"""

from __future__ import annotations

import math

__all__ = [
    "ConfigConflictError",
    "ConfigError",
    "ConfigPlanError",
    "ConfigRangeError",
    "require",
    "require_fraction",
    "require_in",
    "require_positive",
]


class ConfigError(ValueError):
    """A configuration that must not run. The message names the field and the fix."""

    def __init__(self, field: str, found: object, fix: str) -> None:
        self.field = field
        self.found = found
        self.fix = fix
        super().__init__(f"config error in `{field}` (found {found!r}): {fix}")


class ConfigRangeError(ConfigError):
    """One value outside the range its field allows."""


class ConfigConflictError(ConfigError):
    """Values that are each valid but must not be combined."""


class ConfigPlanError(ConfigError):
    """The resolved plan (calibration, budget, encoding) cannot be met."""


def require(
    ok: bool, field: str, found: object, fix: str, kind: type[ConfigError] = ConfigConflictError
) -> None:
    """Raise ``kind(field, found, fix)`` unless ``ok``."""
    if not ok:
        raise kind(field, found, fix)


def require_positive(value: float, field: str) -> None:
    """``value`` is a finite number > 0."""
    require(
        isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
        field,
        value,
        "must be a finite number > 0",
        ConfigRangeError,
    )


def require_fraction(value: float, field: str, *, allow_zero: bool) -> None:
    """``value`` lies in ``[0, 1]`` (``allow_zero``) or ``(0, 1]``."""
    low_ok = value >= 0 if allow_zero else value > 0
    bound = "[0, 1]" if allow_zero else "(0, 1]"
    require(
        math.isfinite(value) and low_ok and value <= 1,
        field,
        value,
        f"must lie in {bound}",
        ConfigRangeError,
    )


def require_in(ok: bool, field: str, found: object, fix: str) -> None:
    """A range check with its own wording (``"must lie in [0, 1)"``, ``">= 1"``)."""
    require(ok, field, found, fix, ConfigRangeError)

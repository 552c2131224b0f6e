"""A DP-SGD client's record-level privacy ledger: blocks of identical steps
(:class:`DpSgdEvent`) in an immutable, strictly serialised :class:`PrivacyHistory`, the
accountant names and the errors accounting raises.

The ledger, not an accountant object, persists across rounds and restarts (house rule
5, docs/architecture.md, Privacy accounting); :mod:`fl_app.privacy.accounting` turns it
into ε and states the trust assumptions, :mod:`fl_app.privacy.calibration` finds the
noise for a budget.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from enum import Enum
from typing import Any

from fl_app.strict_json import reject_duplicate_keys

__all__ = [
    "HISTORY_VERSION",
    "AccountantName",
    "AccountingError",
    "DpSgdEvent",
    "HistoryError",
    "PrivacyHistory",
]

HISTORY_VERSION = 1


class AccountantName(str, Enum):
    """Accountant turning a ledger into ε; values match ``fl_app.config.schema.Accountant``."""

    prv = "prv"
    rdp = "rdp"
    pld = "pld"


class HistoryError(ValueError):
    """A serialised :class:`PrivacyHistory` is malformed; the message names the field."""


class AccountingError(RuntimeError):
    """An accountant could not produce a trustworthy ε for this ledger.

    Raised instead of returning a guess: the caller must treat the budget as unknown
    (refuse to train) or switch to another accountant explicitly.
    """


def _check_real(
    name: str,
    value: object,
    *,
    upper: float | None = None,
    error: type[ValueError] = ValueError,
) -> float:
    """Return ``value`` as a float if it is a finite real in ``(0, upper]``; else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name}: expected a number, found {value!r} ({type(value).__name__})")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range, e.g. from JSON
        number = math.inf
    bounds = "(0, inf)" if upper is None else f"(0, {upper:g}]"
    if not math.isfinite(number) or number <= 0 or (upper is not None and number > upper):
        raise error(f"{name}: expected a finite number in {bounds}, found {value!r}")
    return number


def _check_steps(name: str, value: object, *, error: type[ValueError] = ValueError) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{name}: expected an integer, found {value!r} ({type(value).__name__})")
    if value < 1:
        raise error(f"{name}: expected an integer >= 1, found {value!r}")
    return int(value)


def _check_delta(delta: object) -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
        raise ValueError(f"delta: expected a number in (0, 1), found {delta!r}")
    if not 0.0 < float(delta) < 1.0:
        raise ValueError(
            f"delta: expected a number in (0, 1), found {delta!r}; "
            "use δ well below 1/n for n records (e.g. 1e-5)"
        )
    return float(delta)


def _accountant_name(accountant: AccountantName | str) -> AccountantName:
    raw = accountant.value if isinstance(accountant, Enum) else accountant
    try:
        return AccountantName(raw)
    except ValueError:
        choices = ", ".join(repr(a.value) for a in AccountantName)
        raise ValueError(f"accountant: expected one of {choices}, found {accountant!r}") from None


@dataclass(frozen=True)
class DpSgdEvent:
    """``steps`` identical DP-SGD steps: Poisson sampling with rate ``sample_rate``
    and the Gaussian mechanism with noise multiplier ``noise_multiplier``.

    The dp-accounting equivalent is ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
    GaussianDpEvent(z)), steps)``.

    Parameters
    ----------
    noise_multiplier
        ``z`` = noise standard deviation / clipping norm; finite and > 0 (z = 0 is not
        private and has no finite ε).
    sample_rate
        ``q`` in (0, 1]: probability that each local record is in a step's batch.
    steps
        Number of steps, >= 1.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        z = _check_real("noise_multiplier", self.noise_multiplier)
        q = _check_real("sample_rate", self.sample_rate, upper=1.0)
        steps = _check_steps("steps", self.steps)
        # Normalise numpy scalars and ints so equality, merging and JSON are exact.
        object.__setattr__(self, "noise_multiplier", z)
        object.__setattr__(self, "sample_rate", q)
        object.__setattr__(self, "steps", steps)


@dataclass(frozen=True)
class PrivacyHistory:
    """One client's ledger of :class:`DpSgdEvent` blocks, oldest first.

    Immutable: :meth:`add` returns a new ledger. Persist it with :meth:`to_json` and
    restore it with :meth:`from_json`; never start a new ledger mid-run.
    """

    events: tuple[DpSgdEvent, ...] = ()

    def __post_init__(self) -> None:
        events = tuple(self.events)
        for i, event in enumerate(events):
            if not isinstance(event, DpSgdEvent):
                raise TypeError(f"events[{i}]: expected a DpSgdEvent, found {type(event).__name__}")
        object.__setattr__(self, "events", events)

    @property
    def total_steps(self) -> int:
        """Total number of DP-SGD steps recorded."""
        return sum(event.steps for event in self.events)

    def add(self, event: DpSgdEvent) -> PrivacyHistory:
        """Return a new ledger with ``event`` appended.

        If the last event has exactly the same ``(noise_multiplier, sample_rate)``, the
        two are merged into one block (as Opacus' accountants do); composition does not
        depend on the order or grouping of events, so ε is unchanged by merging.
        """
        if not isinstance(event, DpSgdEvent):
            raise TypeError(f"event: expected a DpSgdEvent, found {type(event).__name__}")
        if self.events:
            last = self.events[-1]
            if (last.noise_multiplier, last.sample_rate) == (
                event.noise_multiplier,
                event.sample_rate,
            ):
                merged = DpSgdEvent(
                    last.noise_multiplier, last.sample_rate, last.steps + event.steps
                )
                return PrivacyHistory((*self.events[:-1], merged))
        return PrivacyHistory((*self.events, event))

    def to_json(self) -> str:
        """Serialise as ``{"version": 1, "events": [{noise_multiplier, sample_rate, steps}]}``.

        Floats are written with ``repr`` precision, so :meth:`from_json` restores the
        ledger exactly.
        """
        payload = {
            "version": HISTORY_VERSION,
            "events": [
                {
                    "noise_multiplier": e.noise_multiplier,
                    "sample_rate": e.sample_rate,
                    "steps": e.steps,
                }
                for e in self.events
            ],
        }
        return json.dumps(payload, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> PrivacyHistory:
        """Parse a ledger written by :meth:`to_json`; strict, JSON only (no pickle).

        Raises
        ------
        HistoryError
            If ``text`` is not JSON, has duplicate or unknown keys, an unsupported
            ``version``, or an event field of the wrong type or out of range. The
            message names the field, e.g. ``events[2].sample_rate``.
        """
        if not isinstance(text, str):
            raise HistoryError(f"history: expected a JSON string, found {type(text).__name__}")
        try:
            raw = json.loads(
                text, object_pairs_hook=reject_duplicate_keys(HistoryError, "history: ")
            )
        except HistoryError:
            raise
        except (ValueError, RecursionError) as err:  # JSONDecodeError, int digit limit
            raise HistoryError(f"history: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise HistoryError(f"history: expected a JSON object, found {type(raw).__name__}")
        _check_keys("history", raw, {"version", "events"})
        version = raw["version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise HistoryError(f"version: expected an integer, found {version!r}")
        if version != HISTORY_VERSION:
            raise HistoryError(
                f"version: unsupported history version {version!r}; "
                f"this build reads version {HISTORY_VERSION}"
            )
        items = raw["events"]
        if not isinstance(items, list):
            raise HistoryError(f"events: expected a list, found {type(items).__name__}")
        events = []
        for i, item in enumerate(items):
            where = f"events[{i}]"
            if not isinstance(item, dict):
                raise HistoryError(f"{where}: expected an object, found {type(item).__name__}")
            _check_keys(where, item, {"noise_multiplier", "sample_rate", "steps"})
            z = _check_real(
                f"{where}.noise_multiplier", item["noise_multiplier"], error=HistoryError
            )
            q = _check_real(
                f"{where}.sample_rate", item["sample_rate"], upper=1.0, error=HistoryError
            )
            steps = _check_steps(f"{where}.steps", item["steps"], error=HistoryError)
            events.append(DpSgdEvent(z, q, steps))
        return cls(tuple(events))


_NO_DUPLICATES = reject_duplicate_keys(HistoryError, "history: ")


def _check_keys(where: str, raw: dict[str, Any], expected: set[str]) -> None:
    missing = sorted(expected - raw.keys())
    if missing:
        raise HistoryError(f"{where}.{missing[0]}: missing")
    unknown = sorted(raw.keys() - expected)
    if unknown:
        raise HistoryError(f"{where}.{unknown[0]}: unknown field")

"""Record-level privacy accounting for DP-SGD clients: a persistent ledger and its ε.

A DP-SGD client (Abadi et al. 2016) spends privacy in blocks of identical steps: each
step Poisson-samples the client's local records with rate ``q``, clips every
per-example gradient to norm ``C`` and adds Gaussian noise of standard deviation
``z·C`` to their sum. A :class:`DpSgdEvent` describes one such block and a
:class:`PrivacyHistory` is the client's ledger of them. The ledger, not an accountant
object, is what persists across rounds and restarts (docs/architecture.md, Privacy
accounting; house rule 5): ε is always recomputed from the *whole* ledger, so an
accountant is never rebuilt from scratch mid-run and a round can never forget the
rounds before it.

Three accountants turn a ledger into ε at a given δ (:class:`AccountantName`):

``prv``
    Opacus' ``PRVAccountant``: numerical composition of privacy loss random
    variables (Gopi, Lee & Wutschitz 2021, "Numerical Composition of Differential
    Privacy", NeurIPS). Returns an upper bound, at most ``eps_error = 0.01`` (absolute)
    above the true ε, so for ε ≲ 1 it can sit a few percent above ``pld``.
``rdp``
    Opacus' ``RDPAccountant``: Rényi DP of the sampled Gaussian mechanism (Mironov
    2017, "Rényi Differential Privacy", CSF; Mironov, Talwar & Zhang 2019,
    arXiv:1908.10530) over Opacus' default orders, converted to (ε, δ). A valid but
    looser bound (typically 5-15 % above ``pld``); cheap, good as a cross-check.
``pld``
    dp-accounting's ``PLDAccountant``: privacy loss distributions composed by FFT
    (Koskela, Jälkö & Honkela 2020, AISTATS; Doroshenko, Ghazi, Kamath, Kumar &
    Manurangsi 2022, "Connect the Dots", PETS) with pessimistic discretisation
    (interval 1e-4). The tightest of the three.

Trust assumptions (what the reported ε relies on):

* every step really was Poisson sampling with the recorded rate (each local record
  included independently with probability ``q``); fixed-size batches, shuffling or
  sampling without replacement are *not* what these events describe;
* per-example clipping to ``C`` and Gaussian noise ``N(0, (z·C)²)`` on the sum, drawn
  from a generator the adversary cannot predict (by default a ChaCha20 keystream
  under a key the client draws itself, :mod:`fl_app.privacy.dpsgd`; no protection
  against floating-point attacks, see :mod:`fl_app.privacy.noise`);
* the ledger is complete: every step that touched data was recorded before its
  result left the client, and the ledger was restored, not restarted, after a crash;
* neighbouring datasets differ by adding or removing one record of *this client's*
  dataset (record-level DP; all three accountants use add/remove-one);
* ε covers every intermediate model the client releases (adaptive composition);
  it does not cover hyper-parameter tuning or data-dependent choices of ``z``/``q``;
* the accountant libraries (Opacus, dp-accounting) are correct; their numerical
  upper bounds are used as they are.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size
from opacus.accountants.utils import get_noise_multiplier

from fl_app.strict_json import reject_duplicate_keys

__all__ = [
    "HISTORY_VERSION",
    "PRV_EPS_ERROR",
    "PRV_MAX_GRID_POINTS",
    "AccountantName",
    "AccountingError",
    "DpSgdEvent",
    "HistoryError",
    "PrivacyHistory",
    "calibrate_noise_multiplier",
    "epsilon",
    "project_epsilon",
]

HISTORY_VERSION = 1
# Opacus' default absolute ε error for PRV; the reported ε is estimate + this.
PRV_EPS_ERROR = 0.01
# PRV discretises on a grid of ~2·L·sqrt(N·ln(12/δ_err)/2)/eps_error points (Opacus
# `PRVAccountant._get_domain`): ~0.8 µs and ~200 bytes per point. Beyond this the
# call would take seconds and gigabytes, so we refuse instead of hanging a client.
PRV_MAX_GRID_POINTS = 4_000_000
# calibrate_noise_multiplier stops when the ε it reaches is within this fraction
# below the target.
_CALIBRATION_RTOL = 0.01
# Largest z the calibration tries (Opacus' MAX_SIGMA).
_MAX_NOISE_MULTIPLIER = 1e6
_MAX_BISECTIONS = 100
# PLDAccountant's default value discretisation interval.
_PLD_INTERVAL = 1e-4


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


def _opacus_history(history: PrivacyHistory) -> list[tuple[float, float, int]]:
    # Opacus' accountants keep `history` as [(noise_multiplier, sample_rate, steps)].
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in history.events]


def _prv_grid_points(history: PrivacyHistory, delta_error: float) -> float:
    """Estimate of the PRV discretisation grid (mirrors Opacus' ``_get_domain``)."""
    prvs = [PoissonSubsampledGaussianPRV(e.sample_rate, e.noise_multiplier) for e in history.events]
    counts = [e.steps for e in history.events]
    with warnings.catch_warnings():
        # Opacus sizes the domain with RDP and warns when the optimal order is at the
        # edge of its range; that only loosens the domain, which is safe.
        warnings.simplefilter("ignore", UserWarning)
        half_width = compute_safe_domain_size(
            prvs, counts, eps_error=PRV_EPS_ERROR, delta_error=delta_error
        )
    mesh = PRV_EPS_ERROR / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
    return 2 * float(half_width) / mesh


def _epsilon_prv(history: PrivacyHistory, delta: float) -> float:
    delta_error = delta / 1000  # Opacus' default
    points = _prv_grid_points(history, delta_error)
    if points > PRV_MAX_GRID_POINTS:
        raise AccountingError(
            f"PRV accounting for {history.total_steps} steps at delta={delta} would need a "
            f"grid of ~{points:.3g} points (limit {PRV_MAX_GRID_POINTS:.3g}, grows with ε and "
            "sqrt(steps)); use accountant='pld' (as tight) or 'rdp' (looser, cheap)"
        )
    accountant = PRVAccountant()
    accountant.history = _opacus_history(history)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        # q = 1 and huge ε overflow harmlessly inside Opacus; the result is checked below.
        warnings.simplefilter("ignore", UserWarning)
        return float(
            accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR, delta_error=delta_error)
        )


def _epsilon_rdp(history: PrivacyHistory, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = _opacus_history(history)
    return float(accountant.get_epsilon(delta))  # Opacus' DEFAULT_ALPHAS


@functools.lru_cache(maxsize=64)
def _subsampled_gaussian_pld(noise_multiplier: float, sample_rate: float) -> Any:
    """dp-accounting's PLD of one Poisson-subsampled Gaussian step, built as
    ``PLDAccountant`` builds it (add/remove-one, value_discretization_interval 1e-4).

    Building it costs ~0.4 s and self-composing it ~0.1-0.25 s; the server projects ε
    before every round, so the base PLD is cached (PLDs are immutable: composition
    returns new objects).
    """
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=_PLD_INTERVAL,
        sampling_prob=sample_rate,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


def _epsilon_pld(history: PrivacyHistory, delta: float) -> float:
    # Same arithmetic as PLDAccountant composing SelfComposedDpEvent(PoissonSampledDpEvent(
    # q, GaussianDpEvent(z)), steps) per block (the tests compare the two), with the
    # per-(z, q) base PLD cached.
    composed = None
    for e in history.events:
        block = _subsampled_gaussian_pld(e.noise_multiplier, e.sample_rate).self_compose(e.steps)
        composed = block if composed is None else composed.compose(block)
    assert composed is not None
    return float(composed.get_epsilon_for_delta(delta))


_BACKENDS = {
    AccountantName.prv: _epsilon_prv,
    AccountantName.rdp: _epsilon_rdp,
    AccountantName.pld: _epsilon_pld,
}


def epsilon(history: PrivacyHistory, delta: float, accountant: AccountantName | str) -> float:
    """ε spent by the whole ledger at ``delta``, composed by ``accountant``.

    Parameters
    ----------
    history
        The client's complete ledger (restored, never restarted, across rounds).
    delta
        Target δ in (0, 1).
    accountant
        ``"prv"`` (Gopi et al. 2021, via Opacus), ``"rdp"`` (Mironov 2017, via Opacus)
        or ``"pld"`` (Koskela et al. 2020; Doroshenko et al. 2022, via dp-accounting).

    Returns
    -------
    float
        An upper bound on ε; ``0.0`` for an empty ledger.

    Raises
    ------
    AccountingError
        If the accountant fails or returns a non-finite or negative ε (e.g. PRV
        overflows for z ≲ 0.05, or its grid would exceed :data:`PRV_MAX_GRID_POINTS`).
        Never replaced silently by another accountant's value.
    """
    if not isinstance(history, PrivacyHistory):
        raise TypeError(f"history: expected a PrivacyHistory, found {type(history).__name__}")
    delta = _check_delta(delta)
    name = _accountant_name(accountant)
    if not history.events:
        return 0.0
    try:
        value = _BACKENDS[name](history, delta)
    except AccountingError:
        raise
    except (ArithmeticError, ValueError, RuntimeError, MemoryError) as err:
        raise AccountingError(
            f"{name.value} accountant failed on {_describe(history)} at delta={delta}: "
            f"{type(err).__name__}: {err}; choose another accountant explicitly ({_others(name)})"
        ) from err
    if not math.isfinite(value) or value < 0:
        raise AccountingError(
            f"{name.value} accountant returned epsilon={value!r} for {_describe(history)} at "
            f"delta={delta}: not a usable bound (numerical overflow); choose another "
            f"accountant explicitly ({_others(name)})"
        )
    return value


def _others(name: AccountantName) -> str:
    return " or ".join(repr(a.value) for a in AccountantName if a is not name)


def _describe(history: PrivacyHistory) -> str:
    blocks = ", ".join(
        f"(z={e.noise_multiplier:g}, q={e.sample_rate:g}, steps={e.steps})"
        for e in history.events[:3]
    )
    more = f" and {len(history.events) - 3} more blocks" if len(history.events) > 3 else ""
    return f"[{blocks}{more}]"


def project_epsilon(
    history: PrivacyHistory,
    planned: DpSgdEvent,
    delta: float,
    accountant: AccountantName | str,
) -> float:
    """ε the ledger would reach after ``planned``: ``epsilon(history.add(planned), ...)``.

    A client calls this *before* training and refuses the round if it exceeds its
    budget, so the budget is never overrun, not even by one round.
    """
    return epsilon(history.add(planned), delta, accountant)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName | str,
) -> float:
    """Smallest noise multiplier (to within 1 % of ε) keeping ``steps`` steps within budget.

    ``prv`` and ``rdp`` use Opacus' ``get_noise_multiplier`` (doubling then bisection);
    ``pld`` the same stopping rule over dp-accounting's PLD, started from the RDP
    answer to avoid slow PLD evaluations at tiny z. The stopping tolerance is 1 % of
    ``target_epsilon``, so the returned ``z`` gives ``0.99·target <= ε <= target``; ε
    is recomputed with :func:`epsilon` and checked before returning.

    Parameters
    ----------
    target_epsilon
        Budget ε > 0 for the whole run (all ``steps``).
    delta
        Target δ in (0, 1).
    sample_rate
        Poisson sampling rate ``q`` in (0, 1].
    steps
        Total DP-SGD steps the budget must cover (e.g. rounds × local steps).
    accountant
        As in :func:`epsilon`.

    Raises
    ------
    ValueError
        If the target is unreachable with ``z <= 1e6`` (e.g. below PRV's 0.01 error
        floor) or an argument is out of range.
    AccountingError
        If the accountant fails, or the calibrated ``z`` does not meet the target.
    """
    target = _check_real("target_epsilon", target_epsilon)
    delta = _check_delta(delta)
    q = _check_real("sample_rate", sample_rate, upper=1.0)
    n = _check_steps("steps", steps)
    name = _accountant_name(accountant)
    tolerance = _CALIBRATION_RTOL * target
    unreachable = (
        f"target_epsilon={target} at delta={delta} is unreachable for {n} steps at "
        f"sample_rate={q} with noise_multiplier <= {_MAX_NOISE_MULTIPLIER:g} ({name.value}); "
        "raise the budget or lower the number of steps or the sample rate"
    )
    try:
        if name is AccountantName.pld:
            z = _calibrate_pld(target, delta, q, n, tolerance)
        else:
            z = _opacus_noise_multiplier(target, delta, q, n, name, tolerance)
    except _Unreachable:
        raise ValueError(unreachable) from None
    except ValueError as err:
        if "budget is too low" in str(err):  # Opacus' message past MAX_SIGMA
            raise ValueError(unreachable) from None
        raise AccountingError(f"calibration with {name.value} failed: {err}") from err
    except (ArithmeticError, RuntimeError, MemoryError) as err:
        raise AccountingError(f"calibration with {name.value} failed: {err}") from err
    reached = epsilon(PrivacyHistory((DpSgdEvent(z, q, n),)), delta, name)
    if reached > target:
        raise AccountingError(
            f"calibrated noise_multiplier={z} gives epsilon={reached} > target {target} "
            f"({name.value}); refusing to return an over-budget noise multiplier"
        )
    return z


class _Unreachable(Exception):
    pass


def _opacus_noise_multiplier(
    target: float, delta: float, q: float, steps: int, name: AccountantName, tolerance: float
) -> float:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=target,
                target_delta=delta,
                sample_rate=q,
                steps=steps,
                accountant=name.value,
                epsilon_tolerance=tolerance,
            )
        )


def _calibrate_pld(target: float, delta: float, q: float, steps: int, tolerance: float) -> float:
    """Opacus' search (feasible z, then bisection to ``tolerance`` below target) over PLD.

    PLD evaluations far below the answer (huge ε) are slow, so the search starts from
    the cheap RDP calibration: RDP is looser than PLD, so its z is usually feasible
    for PLD and only ~5-20 % too large. Feasibility is checked, never assumed.
    """

    def eps_of(z: float) -> float:
        return _epsilon_pld(PrivacyHistory((DpSgdEvent(z, q, steps),)), delta)

    try:
        start = _opacus_noise_multiplier(target, delta, q, steps, AccountantName.rdp, tolerance)
    except ValueError:
        start = 20.0  # RDP cannot reach it; PLD may (Opacus' first bracket)
    high, eps_high = start, eps_of(start)
    doubled = False
    while eps_high > target:
        high, doubled = 2 * high, True
        if high > _MAX_NOISE_MULTIPLIER:
            raise _Unreachable
        eps_high = eps_of(high)
    if doubled:
        low = high / 2  # known to be over budget
    else:
        low = 0.8 * high
        eps_low = eps_of(low)
        while eps_low <= target:
            high, eps_high, low = low, eps_low, 0.8 * low
            if target - eps_high <= tolerance:
                return high
            eps_low = eps_of(low)
    for _ in range(_MAX_BISECTIONS):
        if target - eps_high <= tolerance:
            return high
        mid = (low + high) / 2
        eps_mid = eps_of(mid)
        if eps_mid <= target:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    raise AccountingError(
        f"PLD calibration did not converge to within {tolerance:g} of target_epsilon={target}"
    )

"""Noise calibration for a record-level privacy budget: the smallest noise multiplier
``z`` whose DP-SGD steps stay within a target ε, checked against the accountant that
will report it (:func:`fl_app.privacy.accounting.epsilon`).

PLD has no closed-form inverse, so it is searched (doubling then bisection, warm-started
from Opacus' RDP answer); PRV and RDP use Opacus' ``get_noise_multiplier``. Every
answer is re-checked: ε(z) <= target (docs/architecture.md, Privacy accounting).
"""

from __future__ import annotations

import warnings

import numpy as np
from opacus.accountants.utils import get_noise_multiplier

from fl_app.privacy.accounting import _epsilon_pld, epsilon
from fl_app.privacy.history import (
    AccountantName,
    AccountingError,
    DpSgdEvent,
    PrivacyHistory,
    _accountant_name,
    _check_delta,
    _check_real,
    _check_steps,
)

__all__ = ["calibrate_noise_multiplier"]

# calibrate_noise_multiplier stops when the ε it reaches is within this fraction
# below the target.
_CALIBRATION_RTOL = 0.01
# Largest z the calibration tries (Opacus' MAX_SIGMA).
_MAX_NOISE_MULTIPLIER = 1e6
_MAX_BISECTIONS = 100


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

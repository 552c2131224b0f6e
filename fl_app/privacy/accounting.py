"""Record-level privacy accounting for DP-SGD clients: the ε of a persistent ledger.

A DP-SGD client (Abadi et al. 2016) spends privacy in blocks of identical steps: each
step Poisson-samples the client's local records with rate ``q``, clips every
per-example gradient to norm ``C`` and adds Gaussian noise of standard deviation
``z·C`` to their sum. A :class:`~fl_app.privacy.history.DpSgdEvent` describes one such
block and a :class:`~fl_app.privacy.history.PrivacyHistory` is the client's ledger of
them (:mod:`fl_app.privacy.history`; noise calibration: :mod:`fl_app.privacy.calibration`).
The ledger, not an accountant object, is what persists across rounds and restarts
(docs/architecture.md, Privacy accounting; house rule 5): ε is always recomputed
from the *whole* ledger, so an accountant is never rebuilt from scratch mid-run and a
round can never forget the rounds before it.

Three accountants turn a ledger into ε at a given δ
(:class:`~fl_app.privacy.history.AccountantName`):

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
import math
import warnings
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

from fl_app.privacy.history import (
    AccountantName,
    AccountingError,
    DpSgdEvent,
    PrivacyHistory,
    _accountant_name,
    _check_delta,
)

__all__ = ["PRV_EPS_ERROR", "PRV_MAX_GRID_POINTS", "epsilon", "project_epsilon"]

# Opacus' default absolute ε error for PRV; the reported ε is estimate + this.
PRV_EPS_ERROR = 0.01
# PRV discretises on a grid of ~2·L·sqrt(N·ln(12/δ_err)/2)/eps_error points (Opacus
# `PRVAccountant._get_domain`): ~0.8 µs and ~200 bytes per point. Beyond this the
# call would take seconds and gigabytes, so we refuse instead of hanging a client.
PRV_MAX_GRID_POINTS = 4_000_000
# PLDAccountant's default value discretisation interval.
_PLD_INTERVAL = 1e-4


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

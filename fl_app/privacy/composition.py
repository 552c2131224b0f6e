"""ε of the federation ledger's rounds: consecutive equal rounds composed as blocks,
each kind by the accountant that describes it, and the noise calibration of a round.

Which event each round is, and why, is the docstring of :mod:`fl_app.privacy.round_event`:
Poisson and full-participation rounds are DP-SGD steps with clients as records
(:func:`fl_app.privacy.accounting.epsilon`), fixed-size rounds compose under
dp-accounting's replace-one RDP accountant, distributed-DP rounds under the RDP bound of
Kairouz et al. (:func:`fl_app.privacy.distributed.ddg_epsilon`); local-DP releases and
the guarantee against the server are unamplified compositions (docs/architecture.md,
Privacy accounting).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from fl_app.privacy.accounting import epsilon
from fl_app.privacy.calibration import calibrate_noise_multiplier
from fl_app.privacy.history import AccountantName, AccountingError, DpSgdEvent, PrivacyHistory
from fl_app.privacy.round_event import AccountingKey, RoundEvent, SamplingScheme, _positive

__all__ = ["branch_delta_total", "calibrate_round_noise", "local_epsilon", "unsampled_epsilon"]


class _Block(NamedTuple):
    """``rounds`` consecutive events with one accounting ``key``; ``first`` is the first."""

    key: AccountingKey
    rounds: int
    first: RoundEvent


def _blocks(events: Sequence[RoundEvent]) -> list[_Block]:
    """Consecutive events with the same accounting key, as blocks."""
    blocks: list[_Block] = []
    for e in events:
        key = e.accounting_key()
        if blocks and blocks[-1].key == key:
            blocks[-1] = blocks[-1]._replace(rounds=blocks[-1].rounds + 1)
        else:
            blocks.append(_Block(key, 1, e))
    return blocks


def branch_delta_total(events: Sequence[RoundEvent]) -> float:
    """``Σ η``: the part of δ the rounds' sampling-dependent branches take (see RoundEvent)."""
    return math.fsum(e.branch_delta for e in events)


def _epsilon_of(events: Sequence[RoundEvent], delta: float, accountant: AccountantName) -> float:
    """ε at ``delta`` of ``events`` against outsiders.

    A round whose release/abandon decision depends on the Poisson cohort's size is
    ``(ε_r, δ_r + η_r)``-DP (docs/privacy-branches.md), so the mechanisms are composed at
    ``δ − Σ η``; ``inf`` when the branches alone use up ``δ``.
    """
    if not events:
        return 0.0
    eta = branch_delta_total(events)
    if eta >= delta:
        return math.inf
    return _mechanism_epsilon(events, delta - eta, accountant)


def _mechanism_epsilon(
    events: Sequence[RoundEvent], delta: float, accountant: AccountantName
) -> float:
    # No-op rounds (once-per-tree DP-FTRL between powers of two) add no loss; dropped
    # before blocking, so the rounds around them compose as one block (one PLD
    # self-composition, not one convolution per round).
    blocks = _blocks([e for e in events if e.accounting_key().kind != "noop"])
    if not blocks:
        return 0.0
    kinds = {b.key.kind for b in blocks}
    if kinds == {"poisson"}:
        # A Poisson round is one DP-SGD step with clients as records.
        history = PrivacyHistory(
            tuple(DpSgdEvent(b.key.noise_multiplier, b.key.rate, b.rounds) for b in blocks)
        )
        return epsilon(history, delta, accountant)
    if "ddg" in kinds:
        if kinds != {"ddg"}:
            raise AccountingError(
                "the ledger mixes distributed-DP rounds with central-DP rounds; no accountant "
                "composes the two here. Keep privacy.mode fixed within a run"
            )
        if accountant is not AccountantName.rdp:
            raise AccountingError(
                "distributed DP is accounted only by the RDP bound of Kairouz et al. "
                f"(not {accountant.value!r}); set privacy.accountant=rdp"
            )
        from fl_app.privacy.distributed import ddg_epsilon

        return ddg_epsilon(
            [
                (b.key.rate, b.key.noise_multiplier, b.key.ddg_tau, b.key.ddg_dimension, b.rounds)
                for b in blocks
            ],
            delta,
        )
    if kinds != {"wor"}:
        raise AccountingError(
            "the ledger mixes fixed-size rounds (replace-one) with Poisson/full-participation "
            "rounds (add/remove); no accountant composes the two relations. Keep "
            "strategy.sampling and strategy.fraction_train fixed within a run"
        )
    if accountant is not AccountantName.rdp:
        raise AccountingError(
            f"fixed-size sampling without replacement is supported only by dp-accounting's "
            f"RDP accountant, not {accountant.value!r}; set privacy.accountant=rdp or "
            "strategy.sampling=poisson"
        )
    acc = _replace_one_rdp()
    for b in blocks:
        acc.compose(b.first.dp_event(), b.rounds)
    value = float(acc.get_epsilon(delta))
    if not math.isfinite(value) or value < 0:
        raise AccountingError(f"rdp accountant returned epsilon={value!r} for this ledger")
    return value


def local_epsilon(
    noise_multiplier: float, releases: int, delta: float, accountant: AccountantName | str
) -> float:
    """ε of ``releases`` local-DP releases of one client (``GaussianDpEvent(z/2)`` each).

    A Gaussian event is a Poisson-sampled one with ``q = 1``, so any of the record-level
    accountants composes it.
    """
    if releases <= 0:
        return 0.0
    z = _positive("noise_multiplier", noise_multiplier)
    history = PrivacyHistory((DpSgdEvent(z / 2.0, 1.0, int(releases)),))
    return epsilon(history, delta, accountant)


def unsampled_epsilon(
    template: RoundEvent, rounds: int, delta: float, accountant: AccountantName | str
) -> float:
    """ε of ``rounds`` rounds like ``template`` for a client known to be in each cohort.

    This is the guarantee against the party that samples the cohort (the server): it
    knows who took part, so sampling amplifies nothing and each round is the bare
    mechanism, ``GaussianDpEvent(z)`` (``z/2`` under replace-one) or the unsampled
    distributed discrete Gaussian (q = 1 in [KLS] Proposition 14). Sampling-dependent
    branches do not apply either (``branch_delta`` is an outsider's uncertainty).
    """
    if rounds <= 0:
        return 0.0
    if template.mechanism == "ddg":
        from fl_app.privacy.distributed import ddg_epsilon

        assert template.ddg_tau is not None and template.ddg_dimension is not None
        return ddg_epsilon(
            [(1.0, template.noise_multiplier, template.ddg_tau, template.ddg_dimension, rounds)],
            delta,
        )
    z = template.noise_multiplier / (2.0 if template.replace_one else 1.0)
    return epsilon(PrivacyHistory((DpSgdEvent(z, 1.0, int(rounds)),)), delta, accountant)


def _replace_one_rdp() -> RdpAccountant:
    return RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)


@functools.lru_cache(maxsize=32)
def calibrate_round_noise(
    target_epsilon: float,
    delta: float,
    template: RoundEvent,
    rounds: int,
    accountant: AccountantName | str,
) -> float:
    """Smallest effective ``z`` whose ``rounds`` rounds like ``template`` stay within budget.

    Poisson and full participation reuse
    :func:`fl_app.privacy.calibration.calibrate_noise_multiplier` (clients as records);
    fixed-size rounds use dp-accounting's ``calibrate_dp_mechanism`` over the
    replace-one RDP accountant. The result is checked: ε(z) <= target. Cached: the
    config validator and the run's builder resolve the same settings (seconds each).
    """
    target = _positive("target_epsilon", target_epsilon)
    name = AccountantName(accountant)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, found {rounds}")
    if not template.replace_one:
        rate = template.sample_rate if template.sampling is SamplingScheme.poisson else 1.0
        return calibrate_noise_multiplier(target, delta, rate, rounds, name)
    if name is not AccountantName.rdp:
        raise AccountingError(
            "fixed-size sampling is accounted only by rdp; set privacy.accountant=rdp"
        )

    def event_of(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(
                template.population, int(template.cohort), dp_accounting.GaussianDpEvent(z / 2.0)
            ),
            rounds,
        )

    z = float(
        dp_accounting.calibrate_dp_mechanism(
            _replace_one_rdp,
            event_of,
            target,
            delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-4,
        )
    )
    # calibrate_dp_mechanism's tolerance is on z; make sure the answer is within budget.
    for _ in range(50):
        rounds_at_z = [
            replace(template, round=i + 1, noise_multiplier=z, update_noise_multiplier=z)
            for i in range(rounds)
        ]
        if _epsilon_of(rounds_at_z, delta, name) <= target:
            return z
        z *= 1.001
    raise AccountingError(f"could not calibrate z for target_epsilon={target} (rdp)")

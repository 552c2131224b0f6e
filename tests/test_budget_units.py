"""strategies/budget.py as a unit: the guard's projection, its boundary, its message.

Expected ε values come from Opacus' RDP accountant (the ``rdp`` accountant's library,
default orders) composed here, not from the ledger: a Poisson round is one sampled
Gaussian step at rate ``q`` against outsiders, and the bare Gaussian (rate 1) against the
server (which knows the cohort). Kills mutants of ``BudgetGuard`` (mutmut,
tests/mutants-accepted.md).
"""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant

from fl_app.privacy.history import AccountantName
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.round_event import RoundEvent
from strategies.budget import BudgetGuard, BudgetVerdict

DELTA = 1e-5
Q, Z = 0.3, 1.2


def _event(rnd: int) -> RoundEvent:
    return RoundEvent(rnd, "poisson", 10, Q, 3.0, Z, 1.0, Z)


def _opacus_rdp_epsilon(rate: float, rounds: int) -> float:
    acc = RDPAccountant()
    acc.history = [(Z, rate, rounds)]
    return float(acc.get_epsilon(DELTA))


def _outsider_epsilon(rounds: int) -> float:
    return _opacus_rdp_epsilon(Q, rounds)


def _server_epsilon(rounds: int) -> float:
    return _opacus_rdp_epsilon(1.0, rounds)


def _ledger(rounds: int) -> FederationLedger:
    return FederationLedger(
        DELTA, AccountantName.rdp, tuple(_event(r) for r in range(1, rounds + 1))
    )


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, -math.inf, math.nan])
def test_max_epsilon_must_be_finite_and_positive(bad: float) -> None:
    with pytest.raises(ValueError, match=r"privacy\.max_epsilon must be finite and > 0"):
        BudgetGuard(bad)


def test_a_tiny_positive_budget_is_accepted_and_defaults_to_outsiders() -> None:
    guard = BudgetGuard(1e-300)
    assert guard.max_epsilon == 1e-300 and guard.against_server is False


def test_outsider_projection_is_the_composition_of_past_and_planned_rounds() -> None:
    two, three = _outsider_epsilon(2), _outsider_epsilon(3)
    ledger = _ledger(2)
    allowed = BudgetGuard(three + 10.0).check(ledger, _event(3))
    assert allowed == BudgetVerdict(True, pytest.approx(three, rel=1e-9), "")
    refused = BudgetGuard((two + three) / 2).check(ledger, _event(3))
    assert not refused.allowed
    assert refused.epsilon_after == pytest.approx(three, rel=1e-9)
    # The message names the round, the party, both ε (now and after), the field and the
    # accounting it used; epsilon "now" is the ledger's own, two rounds.
    assert refused.reason == (
        f"privacy budget: round 3 would take epsilon against outsiders from {two:.4g} to "
        f"{three:.4g} > privacy.max_epsilon={(two + three) / 2:g} (delta=1e-05, rdp); "
        "stopping with the DP-released model of the last completed round"
    )


def test_the_budget_is_inclusive_at_the_projected_epsilon() -> None:
    ledger = _ledger(1)
    after = BudgetGuard(100.0).check(ledger, _event(2)).epsilon_after
    assert after == pytest.approx(_outsider_epsilon(2), rel=1e-9)
    assert BudgetGuard(after).check(ledger, _event(2)).allowed  # epsilon == budget: allowed
    below = math.nextafter(after, 0.0)
    assert not BudgetGuard(below).check(ledger, _event(2)).allowed


def test_against_server_composes_the_most_sampled_client_without_amplification() -> None:
    # Client "7" was in 2 cohorts, "8" in 1: round 3 would make "7"'s third, unamplified.
    ledger = _ledger(2).add_participation(["7", "8"]).add_participation(["7"])
    two, three = _server_epsilon(2), _server_epsilon(3)
    budget = (two + three) / 2
    refused = BudgetGuard(budget, against_server=True).check(ledger, _event(3))
    assert not refused.allowed and refused.epsilon_after == pytest.approx(three, rel=1e-9)
    assert refused.reason == (
        "privacy budget: round 3 would take epsilon against the server (a client already "
        "in 2 cohorts, in this one too; no sampling amplification) from "
        f"{two:.4g} to {three:.4g} > privacy.max_epsilon={budget:g} (delta=1e-05, rdp); "
        "stopping with the DP-released model of the last completed round"
    )
    # The amplified (outsider) figure of the same ledger fits the same budget.
    assert _outsider_epsilon(3) < budget
    assert BudgetGuard(budget).check(ledger, _event(3)).allowed
    allowed = BudgetGuard(three, against_server=True).check(ledger, _event(3))
    assert allowed.allowed and allowed.reason == ""


def test_against_server_with_no_participation_yet_projects_one_round() -> None:
    verdict = BudgetGuard(100.0, against_server=True).check(_ledger(0), _event(1))
    assert verdict.allowed
    assert verdict.epsilon_after == pytest.approx(_server_epsilon(1), rel=1e-9)
    refused = BudgetGuard(0.5, against_server=True).check(_ledger(0), _event(1))
    assert not refused.allowed and "already in 0 cohorts" in refused.reason
    assert "from 0 to" in refused.reason

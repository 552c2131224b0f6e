"""A client's schedule check covers the round's DDG ``τ``, not only its ``z``
(fl_app/secagg/client/masked_input.py ``_check_round_tau``).

Under ``privacy.schedule=spend|decay`` the client recomputes its round's least ``z`` from
the pinned schedule, whose ε counts each round at the plan's ``τ`` ([KLS] Theorem 1, for
``max_cohort`` shares). Red-team finding: a server that ran a round with more clients than
``max_cohort`` (each share smaller, the same ``z`` on the sum) passed the ``z`` check while
the round's real ``τ`` was ~1,300 times the plan's, so on a small ring the client's ε
against the server was ~394 for a budget of 60. Values here are worked out by hand
([KLS] Theorem 1's ``τ`` and Eq. (17)'s RDP, converted by dp-accounting).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from dp_accounting.rdp import compute_epsilon
from flwr.app import ConfigRecord

from fl_app.client_spec import ClientDpSpec, ClientSpec, DdpScheduleSpec, encode_spec
from fl_app.config.schema import NoiseSchedule
from fl_app.privacy.ddg_encoding import DdpRound
from fl_app.privacy.ddp_schedule import spend_floor
from fl_app.privacy.distributed import RDP_ORDERS, DdpPlan
from fl_app.secagg.client.masked_input import _check_schedule
from fl_app.secagg.client.state import SecAggStageError

BUDGET = 60.0


def _spec() -> DdpScheduleSpec:
    return DdpScheduleSpec(
        schedule=NoiseSchedule.spend,
        num_rounds=2,
        max_epsilon=BUDGET,
        delta=1e-5,
        max_cohort=4,
        dropout_tolerance=0.25,
        beta=0.5,
        overflow_probability=1e-7,
    )


def _config(spec: DdpScheduleSpec) -> ConfigRecord:
    client = ClientSpec(client_dp=ClientDpSpec(ddp_schedule=spec))
    return ConfigRecord({"server-round": 1, "fl-app.spec": encode_spec(client)})


def _tau_by_hand(share_std: float, shares: int) -> float:
    """[KLS] Theorem 1: 10 * sum_{k=1}^{n-1} exp(-2 pi^2 share_var k/(k+1))."""
    v = share_std**2
    return 10.0 * sum(math.exp(-2 * math.pi**2 * v * k / (k + 1)) for k in range(1, shares))


def _epsilon_by_hand(z: float, tau: float, rounds: int) -> float:
    """[KLS] Eq. (17), L2 branch, unsampled, one coordinate; dp-accounting converts."""
    rdp = [rounds * min(a / (2 * z * z) + tau, (a / 2) * (1 / z + tau) ** 2) for a in RDP_ORDERS]
    return float(compute_epsilon(list(RDP_ORDERS), rdp, 1e-5)[0])


def _planned_round() -> tuple[float, DdpRound]:
    # An 8-bit ring of one coordinate (clip 2): so small that tau matters at all.
    floor = spend_floor(_spec(), clip=2.0, dim=1, bits=8)
    plan = DdpPlan(2.0, 1, 8, floor, 4, 0.25, beta=0.5, overflow_probability=1e-7)
    return floor, plan.round(4)


def test_the_planned_round_is_accepted_and_spends_within_the_budget() -> None:
    floor, at = _planned_round()
    tau = _tau_by_hand(at.share_std, 4)
    assert tau > 0.05  # tau matters on this ring
    assert _epsilon_by_hand(floor, tau, 2) <= BUDGET * (1 + 1e-6)
    _check_schedule(_config(_spec()), at)


@pytest.mark.parametrize("case", [0, 1])
def test_a_round_with_smaller_shares_than_planned_is_refused(case: int) -> None:
    floor, at = _planned_round()
    if case == 0:  # 40 clients where 4 were planned, the same z on the sum
        n, n_min = 40, 30
    else:  # the planned 4 clients, all 4 declared survivors (the plan's n_min is 3)
        n, n_min = 4, 4
    share = at.share_std * math.sqrt(3 / n_min)
    big = dataclasses.replace(at, cohort=n, min_survivors=n_min, share_std=share)
    # The same z on the sum: the z check alone would pass it ...
    assert share * math.sqrt(n_min) / at.bound == pytest.approx(floor, rel=1e-12)
    # ... but the round's real tau spends past the budget.
    assert _epsilon_by_hand(floor, _tau_by_hand(share, n), 2) > BUDGET * 1.01
    with pytest.raises(SecAggStageError, match=r"DDG tau .* privacy\.schedule=spend") as info:
        _check_schedule(_config(_spec()), big)
    assert info.value.field == "privacy.schedule"


@pytest.mark.parametrize("case", [0, 1])
def test_a_round_outside_the_plans_ring_is_refused(case: int) -> None:
    """Refusals that rest on the plan, not on tau alone: more clients than ``max_cohort``
    with larger shares (tau below the plan's: 8.4e-8 against 1.0e-7 here), and a ``z``
    above what the ring of these bits holds (no plan at that ``z``; a server's own plan
    would have refused it)."""
    _, at = _planned_round()
    spec = _spec()
    if case == 0:
        round_ = dataclasses.replace(at, cohort=5, share_std=at.share_std * 2.0)
        assert _tau_by_hand(round_.share_std, 5) < 1e-7
    else:
        spec = dataclasses.replace(spec, max_epsilon=0.05)  # floor ~20: the ring's capacity
        low = spend_floor(spec, clip=2.0, dim=1, bits=8)
        plan = DdpPlan(2.0, 1, 8, low * (1 - 1e-5), 4, 0.25, beta=0.5, overflow_probability=1e-7)
        ok = plan.round(4)
        round_ = dataclasses.replace(ok, share_std=ok.share_std * 2.0)  # z ~40
    with pytest.raises(SecAggStageError, match=r"privacy\.schedule=spend accounts for"):
        _check_schedule(_config(spec), round_)

"""The ledger's accounting keys keep every parameter the accountant needs (issue 18).

Rounds are grouped into blocks by :meth:`RoundEvent.accounting_key`; a key that dropped
a field would merge rounds that differ in it and account them with the wrong value.
Expected values are [KLS]'s per-round RDP from :mod:`fl_app.privacy.distributed`
(pinned by hand in tests/test_distributed_units.py) composed by dp-accounting.
"""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from fl_app.privacy.distributed import RDP_ORDERS, ddg_round_rdp
from fl_app.privacy.history import AccountantName
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.round_event import RoundEvent, SamplingScheme


def _ddg(round_: int, tau: float, dim: int) -> RoundEvent:
    # Full participation (fixed cohort = population): q = 1, z = 2.
    return RoundEvent(
        round_,
        SamplingScheme.fixed,
        4,
        1.0,
        4.0,
        2.0,
        1.0,
        2.0,
        mechanism="ddg",
        ddg_tau=tau,
        ddg_dimension=dim,
    )


def test_ddg_rounds_differing_only_in_tau_or_dimension_are_accounted_apart() -> None:
    events = (_ddg(1, 1e-3, 64), _ddg(2, 2e-3, 128), _ddg(3, 2e-3, 64))
    orders = list(RDP_ORDERS)
    rdp = [
        ddg_round_rdp(a, 1 / 2.0, 1e-3, 64)
        + ddg_round_rdp(a, 1 / 2.0, 2e-3, 128)
        + ddg_round_rdp(a, 1 / 2.0, 2e-3, 64)
        for a in orders
    ]
    expected, _ = compute_epsilon(orders, rdp, 1e-5)
    ledger = FederationLedger(1e-5, AccountantName.rdp, events)
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-12)
    keys = [e.accounting_key() for e in events]
    assert [(k.kind, k.rate, k.ddg_tau, k.ddg_dimension) for k in keys] == [
        ("ddg", 1.0, 1e-3, 64),
        ("ddg", 1.0, 2e-3, 128),
        ("ddg", 1.0, 2e-3, 64),
    ]


def test_fixed_size_key_names_population_and_cohort() -> None:
    event = RoundEvent(1, SamplingScheme.fixed, 10, 0.3, 3.0, 4.0, 1.0, 4.0)
    key = event.accounting_key()
    assert (key.kind, key.population, key.cohort, key.noise_multiplier) == ("wor", 10, 3, 4.0)
    # Replace-one: a changed client moves the sum by up to 2C, so z/2 (dp-accounting event).
    assert event.dp_event() == dp_accounting.SampledWithoutReplacementDpEvent(
        10, 3, dp_accounting.GaussianDpEvent(2.0)
    )

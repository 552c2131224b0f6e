"""privacy.schedule: decay's stated z per round, spend's budget-exact z, and their checks.

Every ε here is checked against an independent dp-accounting composition written in the
test (dp-accounting's PLDAccountant over each recorded event), never against the
ledger's own arithmetic.
"""

from __future__ import annotations

from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant

from fl_app.config.client_dp import ClientDpSettings
from fl_app.config.compose import compose_config, compose_plan
from fl_app.config.errors import ConfigConflictError, ConfigError, ConfigRangeError
from fl_app.config.schema import ClippingMode, ClipSide, NoiseSchedule, PrivacyMode
from fl_app.privacy.history import AccountantName
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.round_event import RoundEvent, SamplingScheme
from fl_app.privacy.schedule import SPEND_MAX_NOISE, decayed_noise, spend_noise, with_noise
from strategies.budget import BudgetGuard
from strategies.dp_aggregators import CentralDp
from strategies.noise_schedule import schedule_lines
from strategies.validation import TrainReply

DELTA = 1e-5


def _settings(**kw: Any) -> ClientDpSettings:
    base: dict[str, Any] = dict(
        mode=PrivacyMode.central,
        clip_side=ClipSide.server,
        clipping=ClippingMode.fixed,
        noise_multiplier=1.0,
        clip=1.0,
        delta=DELTA,
        accountant=AccountantName.pld,
        sampling=SamplingScheme.poisson,
        fraction=0.5,
        num_rounds=5,
        planned_population=20,
        seed=3,
        secure_mode=False,
    )
    base.update(kw)
    return ClientDpSettings(**base)


def _poisson_event(rnd: int, z: float, q: float = 0.2) -> RoundEvent:
    return RoundEvent(
        round=rnd,
        sampling=SamplingScheme.poisson,
        population=20,
        sample_rate=q,
        cohort=20 * q,
        noise_multiplier=z,
        clip=1.0,
        update_noise_multiplier=z,
    )


def _independent_pld(events: list[RoundEvent]) -> float:
    """dp-accounting's PLDAccountant composing PoissonSampled(q, Gaussian(z_t)) per round."""
    acc = PLDAccountant()
    for e in events:
        acc.compose(
            dp_accounting.PoissonSampledDpEvent(
                e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)
            )
        )
    return float(acc.get_epsilon(DELTA))


def _spend_run(dp: CentralDp, rounds: range, population: int = 20) -> None:
    for rnd in rounds:
        assert dp.begin_round(rnd, population) is None


def test_spend_ends_the_planned_rounds_within_one_percent_below_max_epsilon() -> None:
    """A resumed run (round 1 already released at z=1.5) spends the rest of the budget
    with spend: after the last planned round ε lies in [0.99, 1]·max_epsilon by an
    independent PLD composition of every recorded event, never above."""
    max_eps = 2.0
    s = _settings(
        schedule=NoiseSchedule.spend,
        max_epsilon=max_eps,
        noise_multiplier=1.2,
        num_rounds=3,
        fraction=0.2,
    )
    earlier = FederationLedger(DELTA).add(_poisson_event(1, 1.5))
    dp = CentralDp(s, earlier, BudgetGuard(max_eps))
    dp.restore_state({"clip": 1.0, "release_offset": 0, "noise_generation": 0}, 1)
    _spend_run(dp, range(2, 4))
    events = list(dp.ledger.events)
    assert [e.round for e in events] == [1, 2, 3]
    assert events[0].noise_multiplier == 1.5
    assert all(e.noise_multiplier != 1.5 for e in events[1:])  # heterogeneous rounds
    independent = _independent_pld(events)
    assert 0.99 * max_eps <= independent <= max_eps
    # The noise each round released is the recorded z (update noise = z with fixed clipping).
    assert all(e.update_noise_multiplier == e.noise_multiplier for e in events)


def test_spend_refuses_nothing_itself_when_the_budget_is_gone_the_guard_stops() -> None:
    """A ledger already past max_epsilon: spend offers its largest z, which still does
    not fit, so the budget guard stops the run and the ledger gains no round."""
    spent = FederationLedger(DELTA, AccountantName.rdp).add(_poisson_event(1, 0.3, q=1.0))
    assert spent.epsilon() > 1.0
    assert spend_noise(spent, _poisson_event(2, 1.0, q=1.0), 1, 1.0) == SPEND_MAX_NOISE
    s = _settings(
        schedule=NoiseSchedule.spend,
        max_epsilon=1.0,
        accountant=AccountantName.rdp,
        sampling=SamplingScheme.fixed,
        fraction=1.0,
    )
    dp = CentralDp(s, spent, BudgetGuard(1.0))
    dp.restore_state({"clip": 1.0, "release_offset": 0, "noise_generation": 0}, 1)
    reason = dp.begin_round(2, 20)
    assert reason is not None and "max_epsilon=1" in reason
    assert len(dp.ledger.events) == 1


def test_decay_runs_the_stated_z_per_round_and_resumes_on_schedule() -> None:
    """z_t = 4·0.5^(t−1): 4, 2, 1 (by hand); the noise released is z_t·C; a resumed
    run continues at its next server round's z; ε is the independent composition."""
    s = _settings(
        schedule=NoiseSchedule.decay,
        decay_rate=0.5,
        noise_multiplier=4.0,
        clip=0.5,
        fraction=1.0,
        sampling=SamplingScheme.fixed,
        accountant=AccountantName.pld,
        num_rounds=3,
    )
    dp = CentralDp(s)
    zeros = {"w": np.zeros(4)}
    assert dp.begin_round(1, 20) is None
    out = dp.aggregate(1, [TrainReply(0, zeros, 1.0, {}, 0.0)])
    assert out.metrics["dp_noise_std_sum"] == pytest.approx(4.0 * 0.5)
    assert dp.begin_round(2, 20) is None
    out = dp.aggregate(2, [TrainReply(0, zeros, 1.0, {}, 0.0)])
    assert out.metrics["dp_noise_std_sum"] == pytest.approx(2.0 * 0.5)
    resumed = CentralDp(s, dp.ledger)
    resumed.restore_state(dp.export_state(), 2)
    assert resumed.begin_round(3, 20) is None
    assert [e.noise_multiplier for e in resumed.ledger.events] == [4.0, 2.0, 1.0]
    # Full participation: three Gaussian mechanisms, composed independently.
    acc = PLDAccountant()
    for z in (4.0, 2.0, 1.0):
        acc.compose(dp_accounting.GaussianDpEvent(z))
    assert resumed.ledger.epsilon() == pytest.approx(float(acc.get_epsilon(DELTA)), rel=1e-3)


def test_decayed_noise_and_adaptive_update_noise_by_hand() -> None:
    assert decayed_noise(2.0, 0.9, 1) == 2.0
    assert decayed_noise(2.0, 0.9, 3) == pytest.approx(2.0 * 0.81)
    with pytest.raises(ValueError, match="round"):
        decayed_noise(2.0, 0.9, 0)
    # Adaptive clipping: z_Δ = (z^-2 − (2σ_b)^-2)^-1/2 = (1 − 1/4)^-1/2 at z=1, σ_b=1.
    adaptive = RoundEvent(
        round=1,
        sampling=SamplingScheme.poisson,
        population=20,
        sample_rate=1.0,
        cohort=20.0,
        noise_multiplier=0.5,
        clip=1.0,
        update_noise_multiplier=0.5,
        clipped_count_std=1.0,
    )
    assert with_noise(adaptive, 1.0).update_noise_multiplier == pytest.approx(0.75**-0.5)
    # spend never offers adaptive clipping a z at or above 2σ_b (it would have no z_Δ).
    spent = FederationLedger(DELTA, AccountantName.rdp).add(_poisson_event(1, 0.3, q=1.0))
    assert spend_noise(spent, adaptive, 1, 1.0) < 2.0


def test_dry_run_lines_state_z_and_epsilon_after_each_round() -> None:
    s = _settings(
        schedule=NoiseSchedule.decay,
        decay_rate=0.5,
        noise_multiplier=4.0,
        fraction=1.0,
        sampling=SamplingScheme.fixed,
        accountant=AccountantName.pld,
        num_rounds=2,
    )
    lines = schedule_lines(s)
    assert "z_t = 4 * 0.5^(t-1)" in lines[0]
    acc = PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(4.0))
    after_1 = float(acc.get_epsilon(DELTA))
    acc.compose(dp_accounting.GaussianDpEvent(2.0))
    after_2 = float(acc.get_epsilon(DELTA))
    assert lines[1] == f"  round 1: z=4, epsilon after {after_1:.4g}"
    assert lines[2] == f"  round 2: z=2, epsilon after {after_2:.4g}"
    assert schedule_lines(_settings()) == []


def test_server_epsilon_takes_every_round_at_the_least_noise() -> None:
    """Against the server a client's count of cohorts is composed at the smallest z the
    ledger holds (z=1 here, not the last round's z=3)."""
    ledger = FederationLedger(DELTA)
    for rnd, z in ((1, 2.0), (2, 1.0), (3, 3.0)):
        ledger = ledger.add(_poisson_event(rnd, z))
    ledger = ledger.add_participation(["a"]).add_participation(["a"])
    acc = PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1.0), 2)
    assert ledger.server_epsilons()["a"] == pytest.approx(float(acc.get_epsilon(DELTA)), rel=1e-3)


_REFUSALS = [
    (["privacy.schedule=decay"], ConfigConflictError, "privacy.decay_rate"),
    (["privacy.schedule=decay", "privacy.decay_rate=1.5"], ConfigRangeError, "privacy.decay_rate"),
    (["privacy.schedule=decay", "privacy.decay_rate=0"], ConfigRangeError, "privacy.decay_rate"),
    (
        [
            "privacy.schedule=decay",
            "privacy.decay_rate=0.9",
            "privacy.noise_multiplier=null",
            "privacy.target_epsilon=3",
        ],
        ConfigConflictError,
        "privacy.noise_multiplier",
    ),
    (["privacy.decay_rate=0.9"], ConfigConflictError, "privacy.decay_rate"),
    (
        ["privacy.schedule=spend", "privacy.noise_multiplier=null"],
        ConfigConflictError,
        "privacy.max_epsilon",
    ),
    (
        ["privacy.schedule=spend", "privacy.max_epsilon=3"],
        ConfigConflictError,
        "privacy.noise_multiplier",
    ),
    (
        [
            "privacy.schedule=spend",
            "privacy.max_epsilon=3",
            "privacy.noise_multiplier=null",
            "privacy.target_epsilon=2",
        ],
        ConfigConflictError,
        "privacy.target_epsilon",
    ),
]


@pytest.mark.parametrize("index", range(len(_REFUSALS)))
def test_schedule_refusals_name_the_field(index: int) -> None:
    overrides, kind, field = _REFUSALS[index]
    with pytest.raises(kind) as info:
        compose_config("config", ["privacy=central", *overrides])
    assert info.value.field == field


@pytest.mark.parametrize("preset", ["local", "none"])
def test_schedule_only_for_central_and_distributed_dp(preset: str) -> None:
    # Distributed DP's schedules: tests/test_ddp_schedule.py.
    rate = ["privacy.decay_rate=0.9"] if preset == "local" else []
    with pytest.raises(ConfigError) as info:
        compose_config("config", [f"privacy={preset}", "privacy.schedule=decay", *rate])
    assert info.value.field == "privacy.schedule"


def test_spend_plans_round_one_at_the_z_that_spends_max_epsilon() -> None:
    """spend's plan: z calibrated to max_epsilon (adaptive clipping included), so the
    planned rounds at the planned population end at max_epsilon or just below."""
    plan = compose_plan(
        "config",
        [
            "privacy=central_adaptive",
            "privacy.accountant=rdp",
            "privacy.schedule=spend",
            "privacy.noise_multiplier=null",
            "privacy.max_epsilon=8",
        ],
    )
    s = plan.client_dp
    assert s is not None and s.schedule is NoiseSchedule.spend and s.decay_rate == 1.0
    planned = FederationLedger(s.delta, s.accountant).project(s.planned_events())
    assert 0.9 * 8 <= planned <= 8

"""spend's search and the schedule's per-round z, against a stand-in ledger whose ε is a
closed form (ε(z) = spent + remaining·k/z), so the expected z is solved by hand and each
case runs in microseconds (tests/test_noise_schedule.py checks the real accountant)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from opacus.accountants import RDPAccountant

from fl_app.config.client_dp import ClientDpSettings
from fl_app.config.schema import ClippingMode, ClipSide, NoiseSchedule, PrivacyMode
from fl_app.privacy.history import AccountantName
from fl_app.privacy.round_event import RoundEvent, SamplingScheme
from fl_app.privacy.schedule import SPEND_MAX_NOISE, SPEND_TOLERANCE, spend_noise, with_noise
from strategies.noise_schedule import _shown_rounds, schedule_lines, scheduled_event


@dataclass
class _Ledger:
    """ε = spent + Σ k/z over the planned events (falls as z grows, like the real one)."""

    spent: float = 1.0
    k: float = 2.0
    events: tuple[RoundEvent, ...] = ()
    calls: list[float] = field(default_factory=list)

    def project(self, planned: list[RoundEvent]) -> float:
        self.calls.append(planned[0].noise_multiplier)
        return self.spent + sum(self.k / e.noise_multiplier for e in planned)


def _event(z: float = 1.0, sb: float | None = None) -> RoundEvent:
    return RoundEvent(
        round=1,
        sampling=SamplingScheme.poisson,
        population=10,
        sample_rate=0.5,
        cohort=5.0,
        noise_multiplier=z,
        clip=1.0,
        update_noise_multiplier=z,
        clipped_count_std=sb,
    )


def _in_window(ledger: _Ledger, z: float, remaining: int, target: float) -> bool:
    eps = ledger.spent + remaining * ledger.k / z
    return (1 - SPEND_TOLERANCE) * target <= eps <= target


# (spent, remaining, target, guess): by hand the exact z is remaining·k/(target − spent).
_CASES = [
    (1.0, 2, 3.0, None),  # z* = 2 from the default start 1 (too little noise)
    (1.0, 2, 3.0, 50.0),  # from far above (too much noise)
    (0.0, 10, 4.0, 0.01),  # z* = 5 from far below
    (2.5, 1, 3.0, 3.0),  # the last round: z* = 4
    (0.0, 1, 1e-3, None),  # z* = 2000
]


@pytest.mark.parametrize("index", range(len(_CASES)))
def test_spend_lands_in_the_window_below_the_budget(index: int) -> None:
    spent, remaining, target, guess = _CASES[index]
    ledger = _Ledger(spent=spent)
    z = spend_noise(ledger, _event(), remaining, target, guess)  # type: ignore[arg-type]
    exact = remaining * 2.0 / (target - spent)
    assert _in_window(ledger, z, remaining, target)
    # The window's ends solved for z: ε(z) = target and ε(z) = (1 − tol)·target.
    assert exact <= z <= remaining * 2.0 / ((1 - SPEND_TOLERANCE) * target - spent)
    assert len(ledger.calls) <= 12  # each call is a PLD build in a real run


def test_spend_keeps_a_guess_that_still_fits_with_one_projection() -> None:
    ledger = _Ledger(spent=1.0)
    assert spend_noise(ledger, _event(), 2, 3.0, 2.001) == 2.001  # type: ignore[arg-type]
    assert ledger.calls == [2.001]
    # Just outside the window on either side: searched, not kept.
    for guess in (1.99, 2.0 / (1 - 2 * SPEND_TOLERANCE)):
        ledger = _Ledger(spent=1.0)
        z = spend_noise(ledger, _event(), 2, 3.0, guess)  # type: ignore[arg-type]
        assert z != guess and _in_window(ledger, z, 2, 3.0)


def test_spend_offers_its_cap_when_the_budget_is_gone() -> None:
    ledger = _Ledger(spent=3.0)
    assert spend_noise(ledger, _event(), 1, 3.0) == SPEND_MAX_NOISE  # type: ignore[arg-type]
    # Adaptive clipping: never at or above 2·σ_b = 1 (z_Δ would not exist).
    ledger = _Ledger(spent=3.0)
    z = spend_noise(ledger, _event(0.5, sb=0.5), 1, 3.0)  # type: ignore[arg-type]
    assert 0.999 < z < 1.0
    # A guess above the cap is not tried (z* = 2/3 < 1).
    ledger = _Ledger(spent=0.0)
    z = spend_noise(ledger, _event(0.5, sb=0.5), 1, 3.0, guess=5.0)  # type: ignore[arg-type]
    assert ledger.calls[0] == pytest.approx(1.0)  # the default start, capped below 2σ_b
    assert _in_window(ledger, z, 1, 3.0)


def test_spend_refuses_nonsense_arguments() -> None:
    with pytest.raises(ValueError, match="remaining"):
        spend_noise(_Ledger(), _event(), 0, 3.0)  # type: ignore[arg-type]
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_epsilon"):
            spend_noise(_Ledger(), _event(), 1, bad)  # type: ignore[arg-type]


def test_with_noise_under_fixed_clipping_sets_both_multipliers() -> None:
    e = with_noise(_event(1.0), 2.5)
    assert (e.noise_multiplier, e.update_noise_multiplier) == (2.5, 2.5)
    assert e.round == 1 and e.clip == 1.0


def _settings(**kw: Any) -> ClientDpSettings:
    base: dict[str, Any] = dict(
        mode=PrivacyMode.central,
        clip_side=ClipSide.server,
        clipping=ClippingMode.fixed,
        noise_multiplier=2.0,
        clip=1.0,
        delta=1e-5,
        accountant=AccountantName.pld,
        sampling=SamplingScheme.poisson,
        fraction=0.5,
        num_rounds=4,
        planned_population=10,
        seed=0,
        max_epsilon=3.0,
    )
    base.update(kw)
    return ClientDpSettings(**base)


def test_scheduled_event_per_schedule() -> None:
    planned = _event(2.0)
    ledger = _Ledger(spent=1.0)
    # constant: the event as built; decay: z_1 * rate^(t-1) of the *server* round.
    assert scheduled_event(_settings(), ledger, 3, planned) is planned  # type: ignore[arg-type]
    decay = _settings(schedule=NoiseSchedule.decay, decay_rate=0.5)
    assert scheduled_event(decay, ledger, 3, planned).noise_multiplier == 0.5  # type: ignore[arg-type]
    assert ledger.calls == []
    # decay's planned events follow the schedule too (projections, dry run).
    assert [e.noise_multiplier for e in decay.planned_events()] == [2.0, 1.0, 0.5, 0.25]
    # spend at server round 3 of 4: two rounds left, z* = 2·2/(3 − 1) = 2; the first try
    # is the settings' z (empty ledger) ...
    spend = _settings(schedule=NoiseSchedule.spend)
    z = scheduled_event(spend, ledger, 3, planned).noise_multiplier  # type: ignore[arg-type]
    assert ledger.calls[0] == 2.0 and _in_window(ledger, z, 2, 3.0)
    # ... then the ledger's last z; past the planned rounds, one round is left.
    last = _Ledger(spent=1.0, events=(_event(1.234),))
    z = scheduled_event(spend, last, 9, planned).noise_multiplier  # type: ignore[arg-type]
    assert last.calls[0] == 1.234 and _in_window(last, z, 1, 3.0)


def test_dry_run_shows_every_round_of_a_short_run_and_a_spread_of_a_long_one() -> None:
    assert _shown_rounds(12) == set(range(1, 13))
    shown = _shown_rounds(100)
    assert {1, 100} <= shown and len(shown) <= 12
    assert max(b - a for a, b in zip(sorted(shown), sorted(shown)[1:], strict=False)) <= 10


def test_search_edges_pinned_by_hand() -> None:
    """A guess below 1 that fits is kept; a guess of 0 is not tried (start at 1); a
    guess at the cap is tried first; ε exactly at the budget is accepted; without a
    guess the search starts at z = 1; a spent budget reaches the cap in a few
    projections."""
    ledger = _Ledger(spent=0.0)  # ε = 2/z, target 4: z* = 0.5
    assert spend_noise(ledger, _event(), 1, 4.0, 0.501) == 0.501  # type: ignore[arg-type]
    assert ledger.calls == [0.501]
    ledger = _Ledger(spent=0.0)
    spend_noise(ledger, _event(), 1, 4.0, 0.0)  # type: ignore[arg-type]
    assert ledger.calls[0] == 1.0
    ledger = _Ledger(spent=1.0)  # ε(1) = 3 exactly = the budget
    assert spend_noise(ledger, _event(), 1, 3.0, 1.0) == 1.0  # type: ignore[arg-type]
    assert ledger.calls == [1.0]
    low_ok = (1 - SPEND_TOLERANCE) * 3.0
    ledger = _Ledger(spent=0.0, k=low_ok)  # ε(1) = the window's lower end exactly
    assert spend_noise(ledger, _event(), 1, 3.0, 1.0) == 1.0  # type: ignore[arg-type]
    assert ledger.calls == [1.0]
    ledger = _Ledger(spent=1.0)
    spend_noise(ledger, _event(), 2, 3.0)  # type: ignore[arg-type]
    assert ledger.calls[0] == 1.0
    ledger = _Ledger(spent=3.0)
    assert spend_noise(ledger, _event(), 1, 3.0, SPEND_MAX_NOISE) == SPEND_MAX_NOISE  # type: ignore[arg-type]
    assert ledger.calls == [SPEND_MAX_NOISE]
    ledger = _Ledger(spent=3.0)
    assert spend_noise(ledger, _event(), 1, 3.0) == SPEND_MAX_NOISE  # type: ignore[arg-type]
    # ε creeps towards 3 from above: steps grow x10, x100, x1000 after the third.
    assert len(ledger.calls) <= 8 and ledger.calls[-1] == SPEND_MAX_NOISE
    # ε below 1 (log ε < 0): the slope still comes from the two latest points.
    ledger = _Ledger(spent=0.0, k=1e-3)  # ε = 1e-3/z, target 1e-4: z* = 10
    z = spend_noise(ledger, _event(), 1, 1e-4)  # type: ignore[arg-type]
    assert 10.0 <= z <= 1e-3 / ((1 - SPEND_TOLERANCE) * 1e-4) and len(ledger.calls) <= 4


def _rdp(z: float, rounds: int) -> float:
    """Opacus' RDP accountant directly: ``rounds`` Gaussian steps at q = 1."""
    acc = RDPAccountant()
    acc.history = [(z, 1.0, rounds)]
    return float(acc.get_epsilon(1e-5))


def _full(**kw: Any) -> ClientDpSettings:
    """Full participation (q = 1) under RDP: each round a Gaussian mechanism, cheap."""
    return _settings(
        sampling=SamplingScheme.fixed, fraction=1.0, accountant=AccountantName.rdp, **kw
    )


def test_dry_run_lines_of_a_long_run_and_of_a_budget_stop() -> None:
    # decay_rate 1: every round at z = 10; 13 rounds, some not shown; the last is.
    s = _full(
        schedule=NoiseSchedule.decay,
        decay_rate=1.0,
        noise_multiplier=10.0,
        num_rounds=13,
        max_epsilon=None,
    )
    lines = schedule_lines(s)
    assert "(rdp)" in lines[0] and "z_t = 10 * 1^(t-1)" in lines[0]
    assert [ln.split(":")[0] for ln in lines[1:]] == [
        f"  round {r}" for r in sorted(_shown_rounds(13))
    ]
    assert lines[-1] == f"  round 13: z=10, epsilon after {_rdp(10.0, 13):.4g}"
    # A budget that fits 2 of 3 rounds at z = 10: the third is the stop line, the last.
    budget = (_rdp(10.0, 2) + _rdp(10.0, 3)) / 2
    s = _full(
        schedule=NoiseSchedule.decay,
        decay_rate=1.0,
        noise_multiplier=10.0,
        num_rounds=3,
        max_epsilon=budget,
    )
    lines = schedule_lines(s)
    assert len(lines) == 4
    # A budget that fits the 3 planned rounds but not a 4th: no stop line.
    fits = (_rdp(10.0, 3) + _rdp(10.0, 4)) / 2
    planned = _full(
        schedule=NoiseSchedule.decay,
        decay_rate=1.0,
        noise_multiplier=10.0,
        num_rounds=3,
        max_epsilon=fits,
    )
    assert len(schedule_lines(planned)) == 4 and "stops" not in schedule_lines(planned)[-1]
    assert lines[3] == (
        f"  round 3: z=10 would take epsilon to {_rdp(10.0, 3):.4g} > "
        f"max_epsilon={budget:g}: the run stops before it"
    )


def test_dry_run_lines_of_spend_end_at_the_budget() -> None:
    s = _full(schedule=NoiseSchedule.spend, noise_multiplier=10.0, num_rounds=3, max_epsilon=2.0)
    lines = schedule_lines(s)
    assert "recalibrated before each round" in lines[0] and "max_epsilon=2" in lines[0]
    assert len(lines) == 4  # one line per planned round, no stop line
    z = float(lines[3].split("z=")[1].split(",")[0])
    assert 0.99 * 2.0 <= _rdp(z, 3) <= 2.0 * 1.0001  # z printed to 4 digits


def test_shown_rounds_of_a_hundred_pinned() -> None:
    # Evenly spread: 1 + i·100/11 rounded, i = 0..10, and the last round.
    assert _shown_rounds(100) == {1, 10, 19, 28, 37, 46, 56, 65, 74, 83, 92, 100}


class _StepLedger(_Ledger):
    """ε jumps from 4 to 2 at z = 2: the window [2.985, 3] is never hit."""

    def project(self, planned: list[RoundEvent]) -> float:
        z = planned[0].noise_multiplier
        self.calls.append(z)
        return 4.0 if z < 2 else 2.0


def test_search_without_a_reachable_window_returns_the_bracket_end_within_budget() -> None:
    ledger = _StepLedger()
    z = spend_noise(ledger, _event(), 1, 3.0, 1.0)  # type: ignore[arg-type]
    assert 2.0 <= z <= 2.0 * (1 + 1e-9)  # the least noise within budget
    assert len(ledger.calls) < 80  # stops once the bracket has closed
    # ε = 0 whatever z: nothing to spend, the search stops at its floor z = 1e-9.
    ledger = _Ledger(spent=0.0, k=0.0)
    assert spend_noise(ledger, _event(), 1, 3.0, 1.0) == 1e-9  # type: ignore[arg-type]
    assert len(ledger.calls) <= 8


def test_search_cost_stays_a_few_projections_per_round() -> None:
    """Each projection is a PLD build and composition in a real run (~0.5 s): the five
    window cases together take at most 30 (27 measured when the search was written)."""
    total = 0
    for spent, remaining, target, guess in _CASES:
        ledger = _Ledger(spent=spent)
        spend_noise(ledger, _event(), remaining, target, guess)  # type: ignore[arg-type]
        total += len(ledger.calls)
    assert total <= 30

"""``privacy.schedule`` on the server: each round's event at its scheduled ``z``, and the
dry run's plan of ``z`` and ε per round.

The arithmetic is :mod:`fl_app.privacy.schedule`'s; this module applies it to a run's
settings (:class:`~fl_app.config.client_dp.ClientDpSettings`) and its ledger.
:class:`~strategies.dp_aggregators.FederationAccount` asks :func:`scheduled_event` for
every round before the budget guard and the ledger see it, so the event recorded is the
mechanism that runs (the release reads its ``z`` from the recorded event).

A resumed run continues the schedule from the restored ledger: ``decay`` is a function
of the server round alone, and ``spend`` reads what the ledger has spent so far
(rounds redone after a rollback included) and the planned rounds still to come.
"""

from __future__ import annotations

from fl_app.config.client_dp import ClientDpSettings
from fl_app.config.schema import NoiseSchedule
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.round_event import RoundEvent
from fl_app.privacy.schedule import spend_noise, with_noise

__all__ = ["schedule_lines", "scheduled_event"]

# The dry run lists at most this many rounds of a schedule (evenly spread, the last
# included): each line's ε composes every distinct z before it.
MAX_PLAN_LINES = 12


def scheduled_event(
    settings: ClientDpSettings, ledger: FederationLedger, server_round: int, event: RoundEvent
) -> RoundEvent:
    """``event`` (built for ``server_round``) at the ``z`` the schedule gives that round.

    ``constant``: unchanged. ``decay``: the stated ``z`` of ``server_round`` (not of the
    ledger's release index, so a resumed or rolled-back run keeps the stated
    schedule). ``spend``: the ``z`` that takes ``ledger`` to ``max_epsilon`` over this
    round and the planned ones after it (:func:`~fl_app.privacy.schedule.spend_noise`;
    at least this round once the planned rounds are past).
    """
    s = settings
    if s.schedule is NoiseSchedule.decay:
        return with_noise(event, s.planned_noise(server_round))
    if s.schedule is NoiseSchedule.spend:
        assert s.max_epsilon is not None  # the validator requires it for spend
        remaining = max(1, s.num_rounds - server_round + 1)
        guess = ledger.events[-1].noise_multiplier if ledger.events else s.noise_multiplier
        return with_noise(event, spend_noise(ledger, event, remaining, s.max_epsilon, guess))
    return event


def schedule_lines(settings: ClientDpSettings) -> list[str]:
    """The dry run's plan: ``z`` of each planned round and ε after it (a few rounds of a
    long run), simulated on an empty ledger at the planned population. Empty for a
    ``constant`` schedule (the projection lines already say it)."""
    s = settings
    if s.schedule is NoiseSchedule.constant:
        return []
    ledger = FederationLedger(s.delta, s.accountant)
    shown = _shown_rounds(s.num_rounds)
    rows = []
    for rnd in range(1, s.num_rounds + 1):
        planned = s.round_event(rnd, s.planned_population, s.clip)
        event = scheduled_event(s, ledger, rnd, planned)
        if s.max_epsilon is None and rnd not in shown:
            ledger = ledger.add(event)
            continue
        after = ledger.project([event])
        if s.max_epsilon is not None and after > s.max_epsilon:
            rows.append(
                f"  round {rnd}: z={event.noise_multiplier:.4g} would take epsilon to "
                f"{after:.4g} > max_epsilon={s.max_epsilon:g}: the run stops before it"
            )
            break
        ledger = ledger.add(event)
        if rnd in shown:
            rows.append(f"  round {rnd}: z={event.noise_multiplier:.4g}, epsilon after {after:.4g}")
    how = (
        f"z_t = {s.noise_multiplier:.4g} * {s.decay_rate:g}^(t-1), stated before the run"
        if s.schedule is NoiseSchedule.decay
        else f"z recalibrated before each round from the ledger to end at "
        f"max_epsilon={s.max_epsilon:g} (shown: every round at the planned population)"
    )
    return [
        f"noise schedule ({s.schedule.value}): {how}; delta={s.delta:g} ({s.accountant.value})",
        *rows,
    ]


def _shown_rounds(num_rounds: int) -> set[int]:
    if num_rounds <= MAX_PLAN_LINES:
        return set(range(1, num_rounds + 1))
    step = num_rounds / (MAX_PLAN_LINES - 1)
    return {max(1, round(1 + i * step)) for i in range(MAX_PLAN_LINES - 1)} | {num_rounds}

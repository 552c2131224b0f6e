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

Distributed DP (:mod:`fl_app.privacy.ddp_schedule`): a round's event carries the ring's
``τ`` at its own ``z``; ``spend`` spends ``max_epsilon`` against the server (every
released round unsampled, the budget the guard keeps there) and never goes below the
floor the clients recompute; :func:`client_schedule_spec` is what the client spec states
so that each client checks its round's ``z`` itself.
"""

from __future__ import annotations

import dataclasses

from fl_app.client_spec import DdpScheduleSpec
from fl_app.config.client_dp import ClientDpSettings
from fl_app.config.schema import NoiseSchedule
from fl_app.privacy.ddg_encoding import DdpConfigError
from fl_app.privacy.ddp_schedule import spend_floor
from fl_app.privacy.distributed import DdpPlan, ddg_epsilon
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.round_event import RoundEvent
from fl_app.privacy.schedule import spend_noise, with_noise

__all__ = ["client_schedule_spec", "schedule_lines", "scheduled_event", "server_projection"]

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
        return _at(s, event, s.planned_noise(server_round))
    if s.schedule is NoiseSchedule.spend:
        assert s.max_epsilon is not None  # the validator requires it for spend
        remaining = max(1, s.num_rounds - server_round + 1)
        guess = ledger.events[-1].noise_multiplier if ledger.events else s.noise_multiplier
        if s.distributed is None:
            return with_noise(event, spend_noise(ledger, event, remaining, s.max_epsilon, guess))
        spec = client_schedule_spec(s)
        assert spec is not None
        floor = spend_floor(spec, clip=s.clip, dim=s.distributed.dim, bits=s.distributed.bits)
        z = spend_noise(
            ledger,
            event,
            remaining,
            s.max_epsilon,
            max(guess, floor),
            project=lambda planned: server_projection([*ledger.events, *planned], ledger.delta),
            event_at=lambda e, z: _at(s, e, z),
            cap=_ring_cap(s.distributed, floor),
        )
        return _at(s, event, max(z, floor))
    return event


def server_projection(events: list[RoundEvent], delta: float) -> float:
    """ε against the server of a client in the cohort of every one of ``events``
    (distributed-DP rounds, each unsampled at its own ``z``, ``τ`` and ``d'``)."""
    blocks: dict[tuple[float, float, int], int] = {}
    for e in events:
        if e.mechanism != "ddg" or e.ddg_tau is None or e.ddg_dimension is None:
            raise ValueError(f"round {e.round} is not a distributed-DP event")
        key = (float(e.noise_multiplier), float(e.ddg_tau), int(e.ddg_dimension))
        blocks[key] = blocks.get(key, 0) + 1
    return ddg_epsilon([(1.0, z, tau, d, n) for (z, tau, d), n in blocks.items()], delta)


def _at(s: ClientDpSettings, event: RoundEvent, z: float) -> RoundEvent:
    """``event`` at ``z``; under distributed DP with the ring's ``τ`` at that ``z``."""
    out = with_noise(event, z)
    plan = s.distributed
    return out if plan is None else dataclasses.replace(out, ddg_tau=plan.at(z).tau)


def _ring_cap(plan: DdpPlan, floor: float) -> float:
    """The most noise the run's ring holds (spend never asks the clients for more), found
    by doubling from the floor: a ring that cannot hold ``2^k·floor`` caps at ``2^(k-1)``."""
    z = floor
    for _ in range(30):
        try:
            plan.at(2.0 * z)  # raises when no ring of the plan's bits holds it
        except DdpConfigError:
            return z
        z *= 2.0
    return z


def client_schedule_spec(s: ClientDpSettings) -> DdpScheduleSpec | None:
    """What the client spec states of a distributed-DP noise schedule (``None``: constant
    noise, or not distributed DP): the numbers each client recomputes its round's least
    ``z`` from (:mod:`fl_app.privacy.ddp_schedule`)."""
    plan = s.distributed
    if plan is None or s.schedule is NoiseSchedule.constant:
        return None
    return DdpScheduleSpec(
        schedule=s.schedule,
        noise_multiplier=float(s.noise_multiplier),
        decay_rate=float(s.decay_rate),
        num_rounds=int(s.num_rounds),
        max_epsilon=s.max_epsilon,
        delta=float(s.delta),
        sample_rate=float(s.round_event(1, s.planned_population, s.clip).sample_rate),
        max_cohort=int(plan.max_cohort),
        dropout_tolerance=float(plan.dropout_tolerance),
        beta=float(plan.beta),
        overflow_probability=float(plan.overflow_probability),
    )


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
        after = (
            ledger.project([event])
            if s.distributed is None
            else server_projection([*ledger.events, event], s.delta)
        )
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
    if s.distributed is not None:
        how += (
            "; distributed DP: epsilon against the server of a client in every round, "
            "each client checks its round's z against this schedule"
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

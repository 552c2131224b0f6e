"""``privacy.schedule`` under distributed DP: the least ``z`` round ``t`` may carry.

Under distributed DP each client adds its own share of the round's noise, sized by the
parameters the server sends with the masked-input instruction (``share_std``,
``min_survivors``, the sensitivity ``Δ₂``: the sum's multiplier is
``z = share_std·√n_min/Δ₂``). A schedule lets ``z`` change from round to round, so a
client must not take the server's word for it: from the run's stated schedule
(:class:`~fl_app.client_spec.DdpScheduleSpec`, in the client spec) it recomputes the
least ``z`` the schedule allows in round ``t`` (:func:`least_noise`) and refuses an
instruction below it (:func:`check_round_noise`, at stage 3, before it trains).

``decay``
    ``z_t = z_1 · decay_rate^(t−1)`` (:func:`~fl_app.privacy.schedule.decayed_noise`):
    a function of the round alone, recomputed by the client.
``spend``
    Under distributed DP ``max_epsilon`` is the budget *against the server*
    (``threat_model=distributed_dp``): the server picks the cohort, so a client's ε is
    the unsampled composition of the rounds it was in, and the worst case is a client
    in every planned round. The schedule's floor :func:`spend_floor` is the smallest
    ``z`` whose ``num_rounds`` unsampled rounds stay within ``max_epsilon`` by the DDG
    bound (``τ`` of the ring at that ``z``): public numbers only, so the client computes
    the same floor. The server spends the rest of the budget from its ledger
    (:mod:`strategies.noise_schedule`: every released round, unsampled, at its own
    ``z``) and never goes below the floor, so a run that releases its planned rounds ends within
    the floor's tolerance below ``max_epsilon``; rounds the ledger holds beyond the
    plan (a resume that redoes rounds) push the rest up, never down.

What the check gives a client. Every masked input it sends in a run carries at least
its round's scheduled ``z``; a round label outside ``1..num_rounds`` is refused, and a
client takes part in each round once and never in an earlier one (its progress in
``Context.state``, :mod:`fl_app.secagg.client.state`; a restarted SuperNode starts it
afresh), so it contributes to at most ``num_rounds``
releases, each at least as noised as the schedule says: its ε against the server is at
most the schedule's for a client in every round. What it does not give: the schedule is
the server's declaration at the start of the run (:mod:`fl_app.client.downgrade` pins it
for the rest of the run); a site that wants a floor independent of any declaration sets
``ddp_min_noise_multiplier`` in its policy, which applies as well.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

from fl_app.client_spec import DdpScheduleSpec
from fl_app.config.schema import NoiseSchedule
from fl_app.privacy.ddg_encoding import DdpConfigError
from fl_app.privacy.distributed import DdpPlan, ddg_epsilon

__all__ = [
    "NOISE_TOLERANCE",
    "ScheduleViolation",
    "check_round_noise",
    "least_noise",
    "plan_floor",
    "ring_plan",
    "spend_floor",
]

#: Relative slack on the declared ``z``: ``share_std·√n_min/Δ₂`` recomputed from the
#: server's floats differs from the planned ``z`` only in the last bits.
NOISE_TOLERANCE = 1e-9
# spend_floor's bisection stops when its bracket is this narrow (relative, in z).
_FLOOR_PRECISION = 1e-6
# The largest z spend_floor searches (a budget no z up to it meets: the floor is it).
_FLOOR_MAX = 1e4


class ScheduleViolation(ValueError):
    """A round's noise is below what the run's stated schedule allows in that round."""

    field = "privacy.schedule"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.detail = message


def ring_plan(spec: DdpScheduleSpec, *, clip: float, dim: int, bits: int, z: float) -> DdpPlan:
    """The run's distributed-DP plan at noise multiplier ``z`` (the ring the round uses)."""
    return DdpPlan(
        clip=float(clip),
        dim=int(dim),
        bits=int(bits),
        noise_multiplier=float(z),
        max_cohort=int(spec.max_cohort),
        dropout_tolerance=float(spec.dropout_tolerance),
        beta=float(spec.beta),
        overflow_probability=float(spec.overflow_probability),
    )


def spend_floor(spec: DdpScheduleSpec, *, clip: float, dim: int, bits: int) -> float:
    """``spend``'s least ``z``: the smallest found whose ``num_rounds`` unsampled rounds
    keep ε against the server within ``max_epsilon`` (module docstring)."""
    if spec.max_epsilon is None:
        raise ScheduleViolation("privacy.schedule=spend states no max_epsilon")
    return _spend_floor(
        dataclasses.astuple(dataclasses.replace(spec, schedule=NoiseSchedule.spend)),
        float(clip),
        int(dim),
        int(bits),
    )


@functools.lru_cache(maxsize=32)
def _spend_floor(fields: tuple[object, ...], clip: float, dim: int, bits: int) -> float:
    spec = DdpScheduleSpec(*fields)  # type: ignore[arg-type]

    def plan_at(z: float) -> DdpPlan:
        return ring_plan(spec, clip=clip, dim=dim, bits=bits, z=z)

    return plan_floor(plan_at, spec.num_rounds, spec.max_epsilon, spec.delta)


def plan_floor(
    plan_at: Callable[[float], DdpPlan], rounds: int, budget: float | None, delta: float
) -> float:
    """The smallest ``z`` found (relative precision 1e-6) whose ``rounds`` unsampled
    rounds of ``plan_at(z)`` keep ε against the server within ``budget``: spend's floor,
    and the ``z`` its ring is sized for (:mod:`fl_app.config.client_dp`)."""
    if budget is None:
        raise ScheduleViolation("privacy.schedule=spend states no max_epsilon")
    target = float(budget)

    def eps(z: float) -> float:
        try:
            plan = plan_at(z)
        except DdpConfigError:
            # No ring holds this much noise (nor any more): the server cannot run it.
            return 0.0
        return ddg_epsilon([(1.0, z, plan.tau, plan.padded, int(rounds))], delta)

    low, high = 1e-3, 1.0
    while eps(high) > target:  # ε falls as z grows (τ shrinks with z too)
        low, high = high, high * 2.0
        if high >= _FLOOR_MAX:
            return _FLOOR_MAX
    while high - low > _FLOOR_PRECISION * high:
        mid = math.sqrt(low * high)
        if eps(mid) <= target:
            high = mid
        else:
            low = mid
    return high


def least_noise(spec: DdpScheduleSpec, rnd: int, *, clip: float, dim: int, bits: int) -> float:
    """The least ``z`` the stated schedule allows in server round ``rnd``."""
    if isinstance(rnd, bool) or not isinstance(rnd, int) or not 1 <= rnd <= spec.num_rounds:
        raise ScheduleViolation(
            f"round {rnd!r} lies outside the {spec.num_rounds} planned rounds of "
            f"privacy.schedule={spec.schedule.value}"
        )
    if spec.schedule is NoiseSchedule.decay:
        # fl_app.privacy.schedule.decayed_noise's formula, written out: that module loads
        # the ledger and its accountants, and stage 3 (fl_app.secagg.client) must not
        # (pyproject's import contracts). tests/test_ddp_schedule.py holds the two equal.
        return float(spec.noise_multiplier * spec.decay_rate ** (rnd - 1))
    if spec.schedule is NoiseSchedule.spend:
        return spend_floor(spec, clip=clip, dim=dim, bits=bits)
    raise ScheduleViolation(f"privacy.schedule={spec.schedule.value} states no schedule")


def check_round_noise(
    spec: DdpScheduleSpec,
    rnd: int,
    *,
    declared: float,
    clip: float,
    dim: int,
    bits: int,
) -> float:
    """Refuse (:class:`ScheduleViolation`) a round whose declared ``z`` is below the
    schedule's least ``z`` for ``rnd``; returns that least ``z``."""
    least = least_noise(spec, rnd, clip=clip, dim=dim, bits=bits)
    if not declared >= least * (1.0 - NOISE_TOLERANCE):
        raise ScheduleViolation(
            f"round {rnd}: the distributed-DP parameters carry noise multiplier "
            f"{declared:.6g}, below {least:.6g}, the least privacy.schedule="
            f"{spec.schedule.value} allows in that round; refused before training"
        )
    return least

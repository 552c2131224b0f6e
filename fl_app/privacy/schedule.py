"""Client-level DP noise over time: the ``z`` of each round under ``privacy.schedule``.

Three schedules (docs/architecture.md, Noise schedules; README, Client-level DP):

``constant``
    Every round at the run's ``z`` (given, or calibrated once from ``target_epsilon``).
``decay``
    A stated schedule: round ``t`` (the server round, from 1) runs at
    ``z_t = z_1 · decay_rate^(t−1)`` (:func:`decayed_noise`), fixed before the run and
    printed by the dry run. It depends on nothing but the round number.
``spend``
    Before each round the server picks the smallest ``z`` whose planned remaining
    rounds, all at that ``z``, take the ledger's ε to ``max_epsilon`` exactly
    (:func:`spend_noise`): the remaining budget is spent by the last planned round and
    never exceeded. The only signal it adapts to is the ledger (the rounds already
    released, their populations and ``z``), which is public: it is what ``summary.json``
    and the card publish, and it depends on no client's data beyond what earlier noised
    releases already accounted for. So ``spend`` releases nothing new.

ε of rounds with differing ``z`` is the ledger's ordinary composition: each round's
event records its own ``z`` and :mod:`fl_app.privacy.composition` composes blocks of
equal events by the ledger's accountant (dp-accounting PLD by default), so the search
here asks the very accountant that reports ε. Cost: every distinct ``z`` is one more
PLD to build and compose (~0.5 s each), so a long ``decay`` schedule under PLD makes
each round's projection slower; ``spend`` keeps the last round's ``z`` whenever it
still lands within :data:`SPEND_TOLERANCE` of the budget, so its ledger stays a few
blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.mechanisms import update_noise_multiplier
from fl_app.privacy.round_event import RoundEvent

__all__ = [
    "SPEND_MAX_NOISE",
    "SPEND_TOLERANCE",
    "decayed_noise",
    "spend_noise",
    "with_noise",
]

# spend: the round's z is accepted when ε after the planned rounds lies in
# [(1 − SPEND_TOLERANCE)·max_epsilon, max_epsilon].
SPEND_TOLERANCE = 0.005
# spend: the largest z searched (a budget already spent needs more: the guard stops).
SPEND_MAX_NOISE = 1e4


def decayed_noise(first: float, decay_rate: float, rnd: int) -> float:
    """``z_t = z_1 · decay_rate^(t−1)`` for server round ``rnd`` (>= 1)."""
    if rnd < 1:
        raise ValueError(f"round must be >= 1, found {rnd}")
    return float(first * decay_rate ** (rnd - 1))


def with_noise(event: RoundEvent, z: float) -> RoundEvent:
    """``event`` at effective noise multiplier ``z``.

    With adaptive clipping the updates' part ``z_Δ`` follows from ``z`` and the count's
    ``σ_b`` (Andrew et al. 2021 §3.2, :func:`update_noise_multiplier`); otherwise
    ``z_Δ = z``.
    """
    sb = event.clipped_count_std
    zd = z if sb is None else update_noise_multiplier(z, sb)
    return replace(event, noise_multiplier=float(z), update_noise_multiplier=zd)


def spend_noise(
    ledger: FederationLedger,
    event: RoundEvent,
    remaining: int,
    max_epsilon: float,
    guess: float | None = None,
    *,
    project: Callable[[list[RoundEvent]], float] | None = None,
    event_at: Callable[[RoundEvent, float], RoundEvent] = with_noise,
    cap: float | None = None,
) -> float:
    """The ``z`` for ``event``'s round that spends the rest of ``max_epsilon``.

    The smallest ``z`` (up to :data:`SPEND_TOLERANCE` of the budget) with
    ``ledger.project([event at z] × remaining) <= max_epsilon``: ``remaining`` counts
    this round and the planned ones after it, each taken to be like this one. The last
    planned round (``remaining = 1``) thus ends the run at ``max_epsilon`` or just
    below. ``guess`` (the previous round's ``z``) is returned unchanged when it still
    lands within the tolerance, so steady rounds compose as one block. When even
    :data:`SPEND_MAX_NOISE` overruns the budget (it was spent already), that largest
    ``z`` is returned and the budget guard refuses the round.

    Distributed DP (:mod:`strategies.noise_schedule`) passes ``project`` (ε of the
    ledger's rounds plus the given ones, against the server), ``event_at`` (the event
    at a ``z``, with the ring's ``τ`` at that ``z``) and ``cap`` (the most noise the
    ring holds); the defaults are the ledger's own projection and :func:`with_noise`.
    """
    if remaining < 1:
        raise ValueError(f"remaining rounds must be >= 1, found {remaining}")
    if not (math.isfinite(max_epsilon) and max_epsilon > 0):
        raise ValueError(f"max_epsilon must be finite and > 0, found {max_epsilon!r}")
    cap = SPEND_MAX_NOISE if cap is None else min(SPEND_MAX_NOISE, cap)
    if event.clipped_count_std is not None:
        # Adaptive clipping needs z < 2σ_b (the count's own noise bounds the round's z).
        cap = min(cap, 2.0 * event.clipped_count_std * (1.0 - 1e-9))

    projection = ledger.project if project is None else project

    def eps(z: float) -> float:
        return projection([event_at(event, z)] * remaining)

    low_ok = (1.0 - SPEND_TOLERANCE) * max_epsilon
    return _search(eps, max_epsilon, low_ok, cap, guess)


def _search(
    eps: Callable[[float], float], target: float, low_ok: float, cap: float, guess: float | None
) -> float:
    """A ``z`` in ``(0, cap]`` with ``eps(z)`` in ``[low_ok, target]`` (ε falls as z grows),
    trying ``guess`` first.

    Each ``eps`` call builds and composes a PLD (~0.5 s), so the search is a secant in
    log-log space (ε of the Gaussian mechanism is close to ``∝ 1/z``): first steps by
    that power law until the window is bracketed, then interpolation between the
    bracket's ends, kept away from them so it always shrinks. Returns the best ``z``
    found within budget (``cap`` when none is).
    """
    goal = math.log((low_ok + target) / 2.0)
    x = guess if guess is not None and 0 < guess <= cap else min(1.0, cap)
    over: tuple[float, float] | None = None  # (z, log ε) with ε > target: too little noise
    under: tuple[float, float] | None = None  # (z, log ε) with ε <= target
    prev: tuple[float, float] | None = None
    streak = 0  # steps without a bracket: they grow, so a spent budget reaches the cap fast
    for _ in range(80):
        e = eps(x)
        if low_ok <= e <= target:
            return x
        point = (x, math.log(max(e, 1e-300)))
        if e > target:
            over = point if over is None or x > over[0] else over
            if x >= cap:
                return cap
        else:
            under = point if under is None or x < under[0] else under
            if x <= 1e-9:
                return x
        if over is not None and under is not None:
            if under[0] / over[0] < 1.0 + 1e-12:
                break
            (x1, e1), (x2, e2) = over, under
            t = (e1 - goal) / (e1 - e2) if e1 != e2 else 0.5
            t = min(0.9, max(0.1, t))
            x = math.exp(math.log(x1) + t * (math.log(x2) - math.log(x1)))
        else:
            # Slope -1 (ε ∝ 1/z) until two points give the local slope in log-log.
            slope = -1.0
            if prev is not None and prev[0] != x and prev[1] != point[1]:
                slope = min(-0.05, (point[1] - prev[1]) / (math.log(x) - math.log(prev[0])))
            streak += 1
            least = 1.01 if streak < 3 else min(1e3, 10.0 ** (streak - 2))
            step = math.exp((goal - point[1]) / slope)
            step = min(max(step, least), 1e3) if e > target else max(min(step, 1 / least), 1e-3)
            x = min(cap, max(1e-9, x * step))
        prev = point
    return under[0] if under is not None else cap

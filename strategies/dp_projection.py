"""Client-level DP budget projections and their printed text.

What the planned rounds of a run will spend, computed from its resolved
:class:`~fl_app.config.client_dp.ClientDpSettings` before anything trains: the lines the
ServerApp prints before round 1 and ``fl-app simulate --dry-run`` prints instead of
training (:func:`projection_lines`), how many rounds fit in ``privacy.max_epsilon``
(:func:`rounds_within_budget`), and for distributed DP the budget against the server,
which picks each cohort so sampling amplifies nothing (:func:`against_server_lines`,
:func:`~fl_app.config.client_dp.server_rounds_within_budget`, :func:`likely_server_stop_round`,
:func:`server_budget_refusal`). The ε arithmetic is the ledger's
(:mod:`fl_app.privacy.composition`); this module only plans and words it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fl_app.config.client_dp import ClientDpSettings, server_rounds_within_budget
from fl_app.config.schema import NoiseSchedule, PrivacyMode
from fl_app.privacy.composition import local_epsilon, unsampled_epsilon
from fl_app.privacy.history import AccountantName
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.round_event import SamplingScheme
from strategies.noise_schedule import schedule_lines, server_projection

__all__ = [
    "against_server_lines",
    "likely_server_stop_round",
    "projection_lines",
    "rounds_within_budget",
    "server_budget_refusal",
]


def rounds_within_budget(settings: ClientDpSettings) -> int:
    """How many of the planned rounds fit in ``max_epsilon`` (all if no budget)."""
    s = settings
    if s.max_epsilon is None:
        return s.num_rounds
    planned = s.planned_events()
    empty = FederationLedger(s.delta, s.accountant)

    def epsilon_after(k: int) -> float:
        if s.mode is PrivacyMode.local:  # a client taking part in every round
            return local_epsilon(s.noise_multiplier, k, s.delta, s.accountant)
        return empty.project(planned[:k])

    low, high = 0, s.num_rounds
    while low < high:  # ε grows with rounds: largest k with ε(k) <= budget
        mid = (low + high + 1) // 2
        if epsilon_after(mid) <= s.max_epsilon:
            low = mid
        else:
            high = mid - 1
    return low


def projection_lines(settings: ClientDpSettings) -> list[str]:
    """The pre-run privacy projection printed before training and by ``--dry-run``."""
    s = settings
    n = s.planned_population
    m = s.expected_cohort(n)
    empty = FederationLedger(s.delta, s.accountant)
    sampling = (
        f"Poisson q={s.fraction:g} of {n} clients (expected cohort {m:g})"
        if s.sampling is SamplingScheme.poisson
        else f"fixed-size {int(m)} of {n} clients per round"
    )
    if s.mode is PrivacyMode.local:
        eps = local_epsilon(s.noise_multiplier, s.num_rounds, s.delta, s.accountant)
        lines = [
            f"client-level DP (local): each client clips to C={s.clip:g} and adds "
            f"N(0, ({s.noise_multiplier:.4g}*C)^2) before its update leaves",
            f"projection: a client in all {s.num_rounds} rounds reaches epsilon "
            f"{eps:.4g} at delta={s.delta:g} ({s.accountant.value})",
        ]
        if s.max_epsilon is not None:
            k = rounds_within_budget(s)
            lines.append(
                f"budget: max_epsilon={s.max_epsilon:g} per client: "
                + (
                    "all planned rounds fit"
                    if k == s.num_rounds
                    else f"a client refuses after taking part in {k} rounds"
                )
            )
        return lines
    planned = s.planned_events()
    eps = empty.project(planned)
    cross = "rdp" if s.accountant is not AccountantName.rdp and s.distributed is None else None
    cross_text = f"; rdp cross-check {empty.project(planned, cross):.4g}" if cross else ""
    if s.distributed is not None:
        ddp = s.distributed
        lines = [
            "client-level DP (distributed discrete Gaussian under secure aggregation, "
            f"C={s.clip:g}): z={s.noise_multiplier:.4g} in rounded units, {sampling}; "
            f"each client adds a share calibrated to {ddp.min_survivors(ddp.max_cohort)} "
            f"of up to {ddp.max_cohort} clients surviving",
            f"ring: secagg.bits={ddp.bits} for {ddp.dim} parameters (rotated in {ddp.padded}), "
            f"step {ddp.gamma:.3g}, noise {ddp.inflation:.4f}x central DP's at the same z; noise "
            f"std on the mean {ddp.gamma * ddp.sigma / m:.4g}; "
            f"{ddp.bandwidth_bytes():,} bytes per client upload",
            f"projection: {s.num_rounds} planned rounds -> epsilon {eps:.4g} at delta={s.delta:g} "
            "against outsiders (RDP bound of Kairouz et al. 2021 with Zhu & Wang's Poisson "
            "amplification; the cohorts are secret from them)",
            *against_server_lines(s),
        ]
        return lines + schedule_lines(s) + _budget_lines(s)
    lines = [
        f"client-level DP (central, {s.clipping.value} clipping by the {s.clip_side.value}, "
        f"C={s.clip:g}): z={s.noise_multiplier:.4g}, {sampling}, noise std on the mean "
        f"{s.update_noise_multiplier * s.clip / m:.4g}",
        f"projection: {s.num_rounds} planned rounds -> epsilon {eps:.4g} at delta={s.delta:g} "
        f"({s.accountant.value}{cross_text})",
    ]
    return lines + schedule_lines(s) + _budget_lines(s)


def likely_server_stop_round(s: ClientDpSettings) -> int | None:
    """The round before which the against-server budget guard stops the run in half the
    draws of cohorts, or ``None`` when no draw can stop it within the planned rounds.

    The guard (:class:`strategies.budget.BudgetGuard` with ``against_server``) stops
    before round ``r + 1`` once some client has been in ``k`` cohorts
    (:func:`server_rounds_within_budget`). Each client's count after ``r`` rounds is
    ``Bin(r, p)`` (``p`` its chance to be in a cohort); the median stop is the smallest
    ``r`` with ``1 − (1 − P[Bin(r, p) >= k])^N >= ½`` (clients taken as independent, exact
    under Poisson sampling). A sweep must not take the worst case (a client in every
    round) for its refusal: almost every distributed-DP config would be refused.
    """
    k = _server_rounds(s)
    if k >= s.num_rounds:
        return None
    if k == 0:
        return 1
    n = s.planned_population
    p = min(1.0, s.expected_cohort(n) / n)

    def some_client_reached(r: int) -> float:
        if r < k:
            return 0.0
        if p >= 1.0:
            return 1.0
        below = sum(
            math.exp(
                math.lgamma(r + 1)
                - math.lgamma(j + 1)
                - math.lgamma(r - j + 1)
                + j * math.log(p)
                + (r - j) * math.log1p(-p)
            )
            for j in range(k)
        )
        one = min(1.0, max(0.0, 1.0 - below))
        return 1.0 - (1.0 - one) ** n

    # Round r + 1 runs only while no client has k cohorts after r rounds.
    if some_client_reached(s.num_rounds - 1) < 0.5:
        return None
    low, high = k, s.num_rounds - 1
    while low < high:
        mid = (low + high) // 2
        if some_client_reached(mid) >= 0.5:
            high = mid
        else:
            low = mid + 1
    return low + 1


def server_budget_refusal(s: ClientDpSettings) -> str | None:
    """Why a distributed-DP sweep job would likely not finish its planned rounds within
    ``max_epsilon`` against the server (``privacy.threat_model=distributed_dp``)."""
    if s.max_epsilon is None:
        return None
    stop = likely_server_stop_round(s)
    if stop is None:
        return None
    k = _server_rounds(s)
    return (
        f"privacy.max_epsilon={s.max_epsilon:g} against the server allows one client {k} "
        f"cohorts, so the run likely stops before round {stop} of {s.num_rounds} (once some "
        f"client of {s.planned_population} has been in {k}); raise the noise "
        "(privacy.noise_multiplier, or a lower privacy.target_epsilon), lower num_rounds or "
        "strategy.fraction_train, or raise privacy.max_epsilon"
    )


def against_server_lines(s: ClientDpSettings) -> list[str]:
    """ε against the server, which picks and messages each cohort (no amplification)."""
    expected = max(1, math.ceil(s.fraction * s.num_rounds))
    eps = _server_epsilon(s)
    return [
        "against the server (it picks the cohort, so sampling amplifies nothing): a client "
        f"in 1 cohort reaches epsilon {eps(1):.4g}, in {expected} (q*rounds, the expected "
        f"count) {eps(expected):.4g}; planned worst case, a client in all {s.num_rounds} "
        f"rounds: {eps(s.num_rounds):.4g}"
    ]


def _server_epsilon(s: ClientDpSettings) -> Callable[[int], float]:
    """ε against the server of a client in ``k`` cohorts. Under a noise schedule (rounds
    differ in ``z``) those are taken to be the ``k`` least-noised planned rounds, as the
    budget guard takes them (:class:`strategies.budget.BudgetGuard`)."""
    if s.schedule is NoiseSchedule.constant or s.distributed is None:
        template = s.round_event(1, s.planned_population, s.clip)
        return lambda k: unsampled_epsilon(template, k, s.delta, s.accountant)
    ordered = sorted(s.planned_events(), key=lambda e: e.noise_multiplier)
    return lambda k: server_projection(ordered[:k], s.delta) if k > 0 else 0.0


def _server_rounds(s: ClientDpSettings) -> int:
    """How many cohorts one client may join within ``max_epsilon`` against the server
    (:func:`server_rounds_within_budget`). Under a schedule: how many of the first planned
    rounds a client in every cohort may join, which is where the budget guard stops a
    full-participation run (the dry run's per-round lines); with sampling, a client that
    joins late under ``decay`` meets less noise, so read it as a projection."""
    if s.schedule is NoiseSchedule.constant or s.max_epsilon is None:
        return server_rounds_within_budget(s)
    planned = s.planned_events()
    fits = [
        k
        for k in range(1, s.num_rounds + 1)
        if server_projection(planned[:k], s.delta) <= s.max_epsilon
    ]
    return max(fits, default=0)


def _budget_lines(s: ClientDpSettings) -> list[str]:
    """The federation budget's verdict on the planned rounds (central and distributed)."""
    if s.max_epsilon is None:
        return []
    if s.distributed is not None:
        k = _server_rounds(s)
        return [
            f"budget: max_epsilon={s.max_epsilon:g} against the server (privacy.threat_model="
            f"distributed_dp) allows one client {k} cohorts: "
            + (
                "all planned rounds fit"
                if k >= s.num_rounds
                else f"the run stops before a round in which a client already in {k} cohorts "
                "could be sampled again" + _likely_stop_text(s)
            )
        ]
    k = rounds_within_budget(s)
    verdict = (
        "all planned rounds fit"
        if k == s.num_rounds
        else f"the run will stop before round {k + 1} (after {k} rounds)"
    )
    return [f"budget: max_epsilon={s.max_epsilon:g}: {verdict}"]


def _likely_stop_text(s: ClientDpSettings) -> str:
    stop = likely_server_stop_round(s)
    if stop is None:
        return " (unlikely within the planned rounds)"
    return f" (likely before round {stop} of {s.num_rounds}, the median over cohort draws)"

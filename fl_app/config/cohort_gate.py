"""Which cohort sizes a secure-aggregation round can release, and what that costs in δ.

Part of the run's plan (:mod:`fl_app.config.client_dp`, docs/privacy-branches.md):
secure aggregation abandons a round whose cohort is below its smallest size with
parameters (:func:`smallest_secure_cohort`), above distributed DP's ring
(:func:`max_cohort`), or at a size inside that has no parameters (a hole). Under Poisson
sampling one client can decide between release and abandonment, a data-dependent
branch accounted as ``branch_delta`` (:func:`gate_delta`).
"""

from __future__ import annotations

import functools
import math

from fl_app.config.errors import ConfigPlanError
from fl_app.config.schema import AppConfig, PrivacyMode, SecAggMode
from fl_app.privacy.mechanisms import cohort_gate_delta
from fl_app.privacy.round_event import SamplingScheme, fixed_cohort_size

__all__ = [
    "cohort_holes",
    "gate_delta",
    "gate_window",
    "max_cohort",
    "secure_cohort_gate",
    "smallest_secure_cohort",
]


@functools.lru_cache(maxsize=32)
def smallest_secure_cohort(
    mode: str, dropout_tolerance: float, corrupt_fraction: float, server_model: str = "malicious"
) -> int:
    """The smallest cohort secure aggregation has parameters for (smaller: abandoned)."""
    for n in range(3, 100_000):
        if _has_secure_params(n, mode, dropout_tolerance, corrupt_fraction, server_model):
            return n
    raise ConfigPlanError(
        "secagg.dropout_tolerance",
        dropout_tolerance,
        f"secagg.dropout_tolerance={dropout_tolerance:g} with secagg.corrupt_fraction="
        f"{corrupt_fraction:g}: no cohort size has secure-aggregation parameters; lower either",
    )


@functools.lru_cache(maxsize=4096)
def _has_secure_params(
    n: int,
    mode: str,
    dropout_tolerance: float,
    corrupt_fraction: float,
    server_model: str = "malicious",
) -> bool:
    from fl_app.secagg.derive import derive_params
    from fl_app.secagg.params import SecAggConfigError

    try:
        derive_params(
            n,
            mode=mode,
            dropout_tolerance=dropout_tolerance,
            corrupt_fraction=corrupt_fraction,
            server_model=server_model,
        )
    except SecAggConfigError:
        return False
    return True


def gate_window(q: float, population: int, low: int, high: int | None) -> tuple[int, int]:
    """The cohort sizes checked one by one for secure-aggregation parameters.

    The mean of the other clients' count ± 12 standard deviations (+10), inside the
    gate: every size a round can plausibly have. Beyond it :func:`cohort_gate_delta`
    bounds the flips by the binomial tails (below 1e-30 a round), so a 1,000-client run
    checks a few hundred sizes, not a thousand.
    """
    mean = q * (population - 1)
    spread = 12.0 * math.sqrt(mean * (1.0 - q)) + 10.0
    top = population if high is None else min(high, population)
    return max(low, math.floor(mean - spread)), min(top, math.ceil(mean + spread) + 1)


@functools.lru_cache(maxsize=64)
def cohort_holes(
    a: int,
    b: int,
    mode: str,
    dropout_tolerance: float,
    corrupt_fraction: float,
    server_model: str = "malicious",
) -> tuple[int, ...]:
    return tuple(
        n
        for n in range(a, b + 1)
        if not _has_secure_params(n, mode, dropout_tolerance, corrupt_fraction, server_model)
    )


@functools.lru_cache(maxsize=256)
def gate_delta(
    q: float,
    population: int,
    low: int,
    high: int | None,
    secagg: tuple[str, float, float] | tuple[str, float, float, str],
) -> float:
    """``η`` of the gate with the sizes secure aggregation has no parameters for.

    ``derive_params`` fails for some sizes inside ``[low, high]`` with some settings
    (``dropout_tolerance=0.5``: every even cohort), so the released sizes are not an
    interval and each hole is two more places where one client flips the round between
    released and abandoned (red-team finding: accounted 5.7e-29 a round, true ≈ 0.3).
    """
    a, b = gate_window(q, population, low, high)
    holes = cohort_holes(a, b, *secagg)
    return cohort_gate_delta(q, population, low, high, holes=holes, checked=(a, b))


def secure_cohort_gate(
    cfg: AppConfig, sampling: SamplingScheme, population: int
) -> tuple[int, int | None] | None:
    """The cohort sizes a secure round can release, ``(low, high)``; ``None`` without SecAgg.

    ``low``: secure aggregation's smallest cohort; ``high``: distributed DP's
    :func:`max_cohort` (``None``: no upper limit).
    """
    # Local DP: each release is its client's own, whatever the server then abandons.
    if cfg.secagg.mode is SecAggMode.off or cfg.privacy.mode is PrivacyMode.local:
        return None
    sa = cfg.secagg
    low = smallest_secure_cohort(
        sa.mode.value,
        float(sa.dropout_tolerance),
        float(sa.corrupt_fraction),
        sa.server_model.value,
    )
    high = None
    if cfg.privacy.mode is PrivacyMode.distributed:
        high = max_cohort(sampling, float(cfg.strategy.fraction_train), population)
    return (low, high)


def max_cohort(sampling: SamplingScheme, fraction: float, population: int) -> int:
    """The largest cohort distributed DP sizes its ring for.

    Fixed-size sampling and full participation: the cohort itself. Poisson: the mean
    plus six standard deviations (a larger cohort has probability below 1e-9 and is
    abandoned, model unchanged, rather than wrapped around the ring).
    """
    if sampling is SamplingScheme.fixed:
        return max(1, fixed_cohort_size(fraction, population))
    mean = fraction * population
    return min(population, math.ceil(mean + 6.0 * math.sqrt(mean * (1.0 - fraction))) + 1)

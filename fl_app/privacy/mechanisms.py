"""Client-level mechanisms as small units, free of Flower: what a round releases and its cost.

The round driver (:mod:`strategies.driver`) and the aggregators
(:mod:`strategies.dp_aggregators`) call these; each is pure math, tested against values
worked out by hand (``tests/test_privacy_branches.py``).

:func:`cohort_gate_delta`
    A round that is abandoned when its Poisson cohort is too small (secure aggregation
    needs a minimum cohort) or too large (distributed DP's ring) makes a data-dependent
    branch: with client ``x``, the cohort ``S_{-x} ∪ {x}`` may pass the gate where
    ``S_{-x}`` alone does not, and the two neighbouring releases then differ by a whole
    cohort's updates, not by one clipped update. Conditioning on ``S_{-x}`` (whose law
    is the same with or without ``x``), the round is the subsampled mechanism except on
    the event "``x`` sampled and ``|S_{-x}|`` at the gate's edge", whose probability
    ``η = q·(P[Bin(N−1, q) = low − 1] + P[Bin(N−1, q) = high])`` bounds the rest: by
    joint convexity of the hockey-stick divergence the round is ``(ε, δ(ε) + η)``-DP.
    When both neighbours abandon, both release the same thing (it does not depend on
    ``x``). Fixed-size sampling has a cohort size that no client changes: ``η = 0``.
    The released sizes need not be an interval (secure aggregation may have no
    parameters for some sizes inside it): in general ``η = q·Σ P[Bin(N−1, q) = s]`` over
    every ``s`` where "``s`` released" and "``s + 1`` released" differ.
:func:`encoding_slack`
    Secure aggregation's fixed-point encoding rounds each coordinate stochastically to
    a multiple of the step ``1/s`` (:class:`fl_app.secagg.encoding.FixedPointCodec`):
    the error is below one step per coordinate, so an encoded clipped update has norm
    below ``C + √d/s``. Central noise added to the decoded sum is calibrated to that
    post-encoding bound (the slack is this function's value).
:class:`CentralGaussian`
    Central DP's release of one round (McMahan et al. 2018): ``(Σ clip(Δ_i) + N(0, σ²))/m``
    over whatever arrived, an empty sum included, with ``σ = z_Δ·(C + slack)``.
:class:`AdaptiveClip`
    Adaptive clipping's norm update (Andrew, Thakkar, McMahan & Ramaswamy 2021,
    Algorithm 1): the noised fraction of unclipped updates
    ``b̃ = (Σ(b_i − ½) + N(0, σ_b²))/m + ½`` and ``C_{t+1} = C_t·exp(−η(b̃ − γ))``;
    :func:`update_noise_multiplier` splits the round's ``z`` between the updates and the
    count (§3.2: ``z^{-2} = z_Δ^{-2} + (2σ_b)^{-2}``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AdaptiveClip",
    "CentralGaussian",
    "cohort_gate_delta",
    "encoding_slack",
    "update_noise_multiplier",
]


def _binomial_pmf(n: int, q: float, k: int) -> float:
    if k < 0 or k > n:
        return 0.0
    if q >= 1.0:
        return 1.0 if k == n else 0.0
    log_pmf = (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(q)
        + (n - k) * math.log1p(-q)
    )
    return math.exp(log_pmf)


def cohort_gate_delta(
    q: float,
    population: int,
    low: int,
    high: int | None,
    *,
    holes: Collection[int] = (),
    checked: tuple[int, int] | None = None,
) -> float:
    """``η`` of a round released only for cohort sizes in ``[low, high]`` minus ``holes``.

    ``high=None``: no upper gate. ``holes``: sizes inside the gate that are abandoned
    all the same (secure aggregation has no parameters for every size: with
    ``dropout_tolerance=0.5`` none for even cohorts), each one two more places where
    ``x`` flips the round. ``checked=(a, b)``: ``holes`` lists the abandoned sizes in
    ``[a, b]`` only, so whether a size of the gate outside it is released is unknown;
    each count ``s`` of the other clients with ``s`` or ``s + 1`` of unknown status is
    counted as a flip (a bound, negligible for a window many standard deviations wide).
    See the module docstring for the argument.
    """
    if not 0 < q <= 1:
        raise ValueError(f"q must lie in (0, 1], found {q!r}")
    if population < 1:
        raise ValueError(f"population must be >= 1, found {population!r}")
    others = population - 1
    missing = frozenset(holes)
    top = others + 1 if high is None else min(high, others + 1)
    a, b = checked if checked is not None else (low, top)

    def released(n: int) -> bool:
        return low <= n <= top and n not in missing

    def unknown(n: int) -> bool:
        return low <= n <= top and not a <= n <= b

    eta = 0.0
    edges = {low - 1, top} | {h - 1 for h in missing} | set(missing)
    for s in edges:
        known = 0 <= s <= others and not (unknown(s) or unknown(s + 1))
        if known and released(s) != released(s + 1):
            eta += _binomial_pmf(others, q, s)
    if checked is not None:
        # Counts next to a size of unknown status: [low - 1, a - 1] and [b, top].
        if a > low:
            eta += sum(_binomial_pmf(others, q, s) for s in range(max(low - 1, 0), a))
        if b < top:
            eta += _binomial_upper_tail(others, q, b)
    return min(1.0, q * eta)


def _binomial_upper_tail(n: int, q: float, k: int) -> float:
    """``P[Bin(n, q) >= k]``, summed term by term (stops once the terms underflow)."""
    total = 0.0
    mode = math.floor((n + 1) * q)
    for s in range(max(k, 0), n + 1):
        term = _binomial_pmf(n, q, s)
        total += term
        if s > mode and term < 1e-300:
            break
    return total


def encoding_slack(bits: int, clip: float, dimension: int, max_contributors: int) -> float:
    """``√d/s``: how far stochastic fixed-point rounding can move a clipped update.

    ``s`` is the scale of the round codec for coordinates bounded by ``clip`` and sums
    of up to ``max_contributors`` (the codec's step grows with the cohort, so pass the
    largest cohort the round can have).
    """
    from fl_app.secagg.vector import round_codec

    if dimension < 0:
        raise ValueError(f"dimension must be >= 0, found {dimension!r}")
    codec = round_codec(int(bits), float(clip), int(max_contributors))
    return math.sqrt(dimension) * codec.resolution


NormalSource = Callable[[float, int], np.ndarray]


@dataclass(frozen=True)
class CentralGaussian:
    """One round of central Gaussian noise on a sum of clipped updates.

    Parameters
    ----------
    noise_std
        ``σ`` of the noise on the *sum* (``z_Δ`` times the sum's sensitivity).
    divisor
        ``m``: the expected cohort (the mean's divisor, independent of who arrived).
    """

    noise_std: float
    divisor: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_std) and self.noise_std > 0):
            raise ValueError(f"noise_std must be finite and > 0, found {self.noise_std!r}")
        if not (math.isfinite(self.divisor) and self.divisor > 0):
            raise ValueError(f"divisor must be finite and > 0, found {self.divisor!r}")

    def release(
        self, total: Mapping[str, np.ndarray], normal: NormalSource
    ) -> dict[str, np.ndarray]:
        """``(total + N(0, σ²))/m`` per array, noise drawn in the arrays' order.

        ``total`` is ``Σ clip(Δ_i)`` over the updates that arrived; zeros when none did
        (the noise is released all the same: skipping it would be a branch the ledger
        does not describe).
        """
        out: dict[str, np.ndarray] = {}
        for k, v in total.items():
            noised = np.array(v, dtype=np.float64)
            noised += normal(self.noise_std, noised.size).reshape(noised.shape)
            out[k] = noised / self.divisor
        return out


def update_noise_multiplier(z: float, clipped_count_std: float) -> float:
    """``z_Δ = (z^{-2} − (2σ_b)^{-2})^{-1/2}``: the updates' part of the round's ``z``.

    The count of unclipped clients (sensitivity ½, noise ``σ_b``) is a Gaussian mechanism
    of multiplier ``2σ_b``; composed with the updates' it must give ``z``, which needs
    ``2σ_b > z``.
    """
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"noise_multiplier must be finite and > 0, found {z!r}")
    if not 2 * clipped_count_std > z:
        raise ValueError(
            f"privacy.clipped_count_stddev={clipped_count_std}: adaptive clipping needs "
            f"2*clipped_count_stddev > noise_multiplier={z:g}"
        )
    return float((z**-2 - (2 * clipped_count_std) ** -2) ** -0.5)


@dataclass(frozen=True)
class AdaptiveClip:
    """Adaptive clipping's noised quantile step (Andrew et al. 2021, Algorithm 1)."""

    clipped_count_std: float
    learning_rate: float
    target_quantile: float

    def step(
        self,
        clip: float,
        unclipped: float,
        contributors: int,
        expected_cohort: float,
        count_noise: float,
    ) -> tuple[float, float]:
        """``(b̃, C_{t+1})`` from ``Σ b_i`` over the ``contributors`` that arrived.

        ``count_noise`` is the ``N(0, σ_b²)`` draw; each client contributes ``b_i − ½``
        (sensitivity ½), and ``m/2`` re-centres the noised sum on the expected cohort.
        """
        noised = unclipped - contributors / 2.0 + count_noise + expected_cohort / 2.0
        fraction = noised / expected_cohort
        return fraction, float(
            clip * math.exp(-self.learning_rate * (fraction - self.target_quantile))
        )

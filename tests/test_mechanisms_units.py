"""fl_app/privacy/mechanisms.py pinned where mutation testing found it loose.

``make mutate MUTANTS='fl_app.privacy.mechanisms*'`` left 46 of 260 mutants alive
against the branch tests; these kill the ones that could weaken a guarantee (the
adaptive-clipping noise split, the cohort gate's η at its edges and in its checked
window, the binomial helpers at k = 0, k = n, q = 1, argument checks). Expected values
are worked by hand or come from scipy's binomial distribution, never from the module.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fl_app.privacy.mechanisms import (
    CentralGaussian,
    _binomial_pmf,
    _binomial_upper_tail,
    cohort_gate_delta,
    encoding_slack,
    update_noise_multiplier,
)


@pytest.mark.parametrize(
    ("n", "q", "k"),
    [(4, 0.5, 0), (4, 0.5, 4), (4, 0.5, 2), (10, 0.3, 0), (10, 0.3, 10), (7, 0.9, 3)],
)
def test_binomial_pmf_matches_scipy(n: int, q: float, k: int) -> None:
    assert _binomial_pmf(n, q, k) == pytest.approx(stats.binom.pmf(k, n, q), rel=1e-12)


def test_binomial_pmf_outside_the_support_and_at_q_one() -> None:
    assert _binomial_pmf(4, 0.5, -1) == 0.0
    assert _binomial_pmf(4, 0.5, 5) == 0.0
    assert _binomial_pmf(4, 1.0, 4) == 1.0  # every other client sampled
    assert _binomial_pmf(4, 1.0, 3) == 0.0
    assert _binomial_pmf(4, 1.0, 0) == 0.0


@pytest.mark.parametrize(
    ("n", "q", "k"), [(4, 0.5, 0), (4, 0.5, 3), (50, 0.2, 15), (10_000, 0.001, 0)]
)
def test_binomial_upper_tail_matches_scipy(n: int, q: float, k: int) -> None:
    # n = 10,000 at q = 0.001: the terms underflow far past the mode, so the early stop
    # runs; the sum must still be returned (P[X >= 0] = 1).
    want = stats.binom.sf(k - 1, n, q)
    assert _binomial_upper_tail(n, q, k) == pytest.approx(want, rel=1e-9)


def test_gate_eta_at_the_lower_edge_s_zero() -> None:
    # N = 5, q = 1/2, released for cohorts >= 1: x flips the round exactly when no other
    # client was sampled: eta = q * P[Bin(4, 1/2) = 0] = 1/2 * 1/16.
    assert cohort_gate_delta(0.5, 5, 1, None) == pytest.approx(1 / 32, rel=1e-12)


def test_gate_eta_of_a_checked_window_counts_every_count_next_to_an_unknown_size() -> None:
    # Sizes 1..2 unchecked (window 3..5): counts 0, 1, 2 of the others sit next to a size
    # of unknown status: eta = 1/2 * (1 + 4 + 6)/16.
    got = cohort_gate_delta(0.5, 5, 1, None, checked=(3, 5))
    assert got == pytest.approx(11 / 32, rel=1e-12)


def test_gate_eta_is_capped_at_one() -> None:
    # A window that leaves everything unknown double counts (a bound): capped at 1.
    assert cohort_gate_delta(1.0, 5, 1, None, checked=(5, 4)) == 1.0


def test_gate_arguments_are_checked_by_name() -> None:
    assert cohort_gate_delta(1.0, 1, 1, None) >= 0.0  # q = 1 and one client are valid
    with pytest.raises(ValueError, match=r"q must lie in \(0, 1\], found 0"):
        cohort_gate_delta(0.0, 5, 1, None)
    with pytest.raises(ValueError, match=r"q must lie in \(0, 1\], found 1.5"):
        cohort_gate_delta(1.5, 5, 1, None)
    with pytest.raises(ValueError, match="population must be >= 1, found 0"):
        cohort_gate_delta(0.5, 0, 1, None)


def test_encoding_slack_of_an_empty_update_is_zero_and_negative_is_refused() -> None:
    assert encoding_slack(32, 1.0, 0, 10) == 0.0
    with pytest.raises(ValueError, match="dimension must be >= 0, found -1"):
        encoding_slack(32, 1.0, -1, 10)


def test_central_gaussian_divisor_checks() -> None:
    assert CentralGaussian(1.0, 0.5).divisor == 0.5  # a fractional expected cohort
    for bad in (0.0, math.inf, -1.0):
        with pytest.raises(ValueError, match="divisor must be finite and > 0"):
            CentralGaussian(1.0, bad)


def test_central_gaussian_adds_noise_in_float64_whatever_the_sum_dtype() -> None:
    # 1 + 1e-9 is not representable in float32: a release computed in the sum's float32
    # would drop the noise entirely.
    total = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    out = CentralGaussian(1.0, 2.0).release(total, lambda std, n: np.full(n, 1e-9))
    assert out["w"].dtype == np.float64
    np.testing.assert_array_equal(out["w"], (np.array([1.0, 2.0]) + 1e-9) / 2.0)


def test_update_noise_multiplier_by_hand() -> None:
    # z = 2, sigma_b = 5: z_delta = (1/4 - 1/100)^(-1/2) = 0.24^(-1/2) = 2.0412414523...
    assert update_noise_multiplier(2.0, 5.0) == pytest.approx(0.24**-0.5, rel=1e-12)
    # z = 1/2, sigma_b = 1: (4 - 1/4)^(-1/2) = 3.75^(-1/2)
    assert update_noise_multiplier(0.5, 1.0) == pytest.approx(3.75**-0.5, rel=1e-12)
    for bad in (0.0, math.inf, -1.0):
        with pytest.raises(ValueError, match="noise_multiplier must be finite and > 0"):
            update_noise_multiplier(bad, 5.0)

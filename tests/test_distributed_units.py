"""Unit tests for fl_app.privacy.distributed written against its surviving mutants.

``make mutate`` over ``distributed.py`` left mutants that the statistical and
end-to-end tests in ``tests/test_distributed_dp.py`` cannot pin down. Expected values
are worked out here from the paper and the standard libraries: the rotation's signs
from the ``cryptography`` ChaCha20 keystream under SHA-256 of the label and seed, the
Hadamard matrix from scipy, [KLS] (Kairouz, Liu & Steinke 2021) Theorem 1's τ and
Proposition 14's RDP by hand, Zhu & Wang (2019) Theorem 5 term by term, the wrap
mapping of a two's-complement ring by hand, and Hsu, Kakade & Zhang's tail bound.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from dp_accounting.rdp import compute_epsilon
from scipy.linalg import hadamard

from fl_app.privacy.ddg_encoding import (
    DdpConfigError,
    DdpRound,
    Rotation,
    conditional_round,
    fwht,
    padded_dimension,
    sample_discrete_gaussian,
)
from fl_app.privacy.distributed import (
    RDP_ORDERS,
    DdpPlan,
    ddg_epsilon,
    ddg_round_rdp,
    sensitivity,
    subsampled_rdp,
)


def _plan(**kw: object) -> DdpPlan:
    base: dict[str, object] = dict(
        clip=1.0, dim=100, bits=32, noise_multiplier=1.0, max_cohort=10, dropout_tolerance=0.2
    )
    return DdpPlan(**{**base, **kw})  # type: ignore[arg-type]


# ---- rotation -------------------------------------------------------------------------


@pytest.mark.parametrize(("d", "padded"), [(1, 1), (2, 2), (3, 4), (5, 8), (64, 64), (65, 128)])
def test_padded_dimension_is_the_next_power_of_two(d: int, padded: int) -> None:
    assert padded_dimension(d) == padded


@pytest.mark.parametrize("index", [0, 1, 2])
def test_padded_dimension_refuses_non_dimensions(index: int) -> None:
    bad = [0, True, 4.0][index]
    with pytest.raises(ValueError, match=rf"^dimension must be an int >= 1, found {bad!r}$"):
        padded_dimension(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [4, 128, 512])
def test_fwht_is_the_orthonormal_hadamard_matrix(n: int) -> None:
    x = np.random.default_rng(n).normal(size=n)
    np.testing.assert_allclose(fwht(x.copy()), hadamard(n) @ x / math.sqrt(n), atol=1e-12)


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_fwht_refuses_what_it_cannot_transform(index: int) -> None:
    candidates: list[np.ndarray] = [
        np.zeros(3),
        np.zeros((2, 2)),
        np.zeros(4, dtype=np.float32),
        np.zeros(0),
    ]
    bad = candidates[index]
    with pytest.raises(ValueError, match="power of two"):
        fwht(bad)


def test_rotation_signs_are_the_chacha20_keystream_bits_under_the_seed_hash() -> None:
    key = hashlib.sha256(b"fl-app/ddp/rotation/v1" + b"round-7").digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    raw = stream.update(bytes(128 // 8 + 1))
    bits = [(byte >> (7 - j)) & 1 for byte in raw for j in range(8)][:128]
    rot = Rotation(b"round-7", 100)
    assert rot.padded == 128
    np.testing.assert_array_equal(rot.signs, [1.0 - 2.0 * b for b in bits])
    x = np.random.default_rng(7).normal(size=100)
    dense = hadamard(128) / math.sqrt(128)
    padded = np.concatenate([x, np.zeros(28)])
    np.testing.assert_allclose(rot.forward(x), dense @ (rot.signs * padded), atol=1e-12)
    np.testing.assert_allclose(rot.inverse(rot.forward(x)), x, atol=1e-12)


def test_rotation_refuses_bad_seeds_and_shapes() -> None:
    for seed in (b"", "round-1"):
        with pytest.raises(ValueError, match=r"^rotation seed must be non-empty bytes$"):
            Rotation(seed, 8)  # type: ignore[arg-type]
    rot = Rotation(b"s", 5)
    with pytest.raises(ValueError, match=r"^expected a vector of length 5, found shape \(8,\)$"):
        rot.forward(np.zeros(8))
    with pytest.raises(ValueError, match=r"^expected a vector of length 8, found shape \(5,\)$"):
        rot.inverse(np.zeros(5))


# ---- rounding and sensitivity ------------------------------------------------------------


def test_conditional_rounding_rounds_up_exactly_when_the_uniform_is_at_most_the_fraction() -> None:
    x = np.array([0.25, -1.75, 2.0, 3.5])
    draws = iter([np.array([0.25, 0.3, 0.9, 0.6])])
    # frac = [0.25, 0.25, 0, 0.5]: up, down, down, down.
    out = conditional_round(x, 100.0, lambda n: next(draws))
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [1, -2, 2, 3])


def test_conditional_rounding_redraws_until_the_norm_fits() -> None:
    x = np.array([0.5, 0.5])
    draws = iter([np.array([0.1, 0.1]), np.array([0.1, 0.9]), np.array([0.9, 0.9])])
    # Bound 1: [1, 1] has norm √2 > 1 and is redrawn; [1, 0] has norm exactly 1.
    np.testing.assert_array_equal(conditional_round(x, 1.0, lambda n: next(draws)), [1, 0])


def test_conditional_rounding_gives_up_after_max_tries() -> None:
    calls = []

    def always_up(n: int) -> np.ndarray:
        calls.append(n)
        return np.zeros(n)

    with pytest.raises(DdpConfigError, match=r"^conditional rounding failed 3 times"):
        conditional_round(np.array([0.5, 0.5]), 1.0, always_up, max_tries=3)
    assert calls == [2, 2, 2]


def test_sensitivity_takes_the_smaller_branch_of_theorem_1() -> None:
    # A = 1, d' = 4, β = e^{-1/2}: (A + √d')² = 9 < A² + d'/4 + 1·(A + √d'/2) = 4.
    # Here the conditional branch is smaller: √4 = 2. With A = 0, d' = 1: plain 1 < 0.25 + 0.5.
    assert sensitivity(1.0, 4, math.exp(-0.5)) == pytest.approx(2.0, rel=1e-12)
    assert sensitivity(0.0, 1, math.exp(-0.5)) == pytest.approx(math.sqrt(0.75), rel=1e-12)
    assert sensitivity(0.0, 16, math.exp(-2.0)) == pytest.approx(math.sqrt(4 + 2 * 2), rel=1e-12)
    assert sensitivity(3.0, 16, 0.0) == pytest.approx(7.0, rel=1e-12)


# ---- the plan ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tolerance", "cohort", "n_min"),
    [(0.0, 10, 10), (0.2, 10, 8), (0.25, 10, 8), (0.5, 7, 4), (0.99, 10, 1), (0.5, 1, 1)],
)
def test_min_survivors_is_the_ceiling_of_the_kept_fraction(
    tolerance: float, cohort: int, n_min: int
) -> None:
    assert _plan(dropout_tolerance=tolerance).min_survivors(cohort) == n_min


def test_tau_by_hand() -> None:
    # [KLS] Thm 1: τ = 10·Σ_{k=1}^{n−1} exp(−2π²σ_l²·k/(k+1)) at n = max_cohort and
    # σ_l² = σ²/n_min(n).
    plan = _plan(max_cohort=3, dropout_tolerance=0.5, noise_multiplier=0.02, bits=10, dim=1)
    share_var = plan.sigma**2 / 2  # n_min(3) = ⌈1.5⌉ = 2
    expected = 10 * (
        math.exp(-2 * math.pi**2 * share_var / 2) + math.exp(-2 * math.pi**2 * share_var * 2 / 3)
    )
    assert plan.tau == pytest.approx(expected, rel=1e-12)
    assert 1.0 < plan.tau < 10.0  # σ_l of order 1: τ far from 0 and from 10·(n − 1)


def test_round_parameters_by_hand() -> None:
    plan = _plan(max_cohort=10, dropout_tolerance=0.5)
    rnd = plan.round(7)
    assert rnd.cohort == 7 and rnd.min_survivors == 4
    assert rnd.share_std == pytest.approx(plan.sigma / 2.0, rel=1e-12)
    assert rnd.gamma == pytest.approx(1.0 / plan.scaled_norm, rel=1e-12)
    assert rnd.bound == pytest.approx(sensitivity(plan.scaled_norm, 128, math.exp(-0.5)), rel=1e-12)
    assert (rnd.dim, rnd.padded, rnd.bits, rnd.clip) == (100, 128, 32, 1.0)
    for cohort in (0, 11):
        with pytest.raises(DdpConfigError, match=f"^a cohort of {cohort} exceeds the 10"):
            plan.round(cohort)


def test_bandwidth_is_bits_per_padded_coordinate_rounded_up_to_bytes() -> None:
    assert _plan(dim=100, bits=32).bandwidth_bytes() == 128 * 4
    assert _plan(dim=3, bits=20, max_cohort=2).bandwidth_bytes() == 10  # 4·20 = 80 bits
    assert _plan(dim=1, bits=20, max_cohort=2).bandwidth_bytes() == 3  # 20 bits -> 3 bytes


def test_round_json_round_trips_and_refuses_bad_fields() -> None:
    rnd = _plan().round(5)
    assert DdpRound.from_json(rnd.to_json()) == rnd
    raw = json.loads(rnd.to_json())
    assert list(raw) == sorted(raw)
    for field, value in [("gamma", 0), ("bound", -1.0), ("share_std", True), ("clip", "1")]:
        with pytest.raises(ValueError, match=f"^distributed-DP '{field}' must be a finite number"):
            DdpRound.from_json(json.dumps({**raw, field: value}))
    for field, value in [("dim", 0), ("cohort", 1.0), ("bits", True)]:
        with pytest.raises(ValueError, match=f"^distributed-DP '{field}' must be an int >= 1"):
            DdpRound.from_json(json.dumps({**raw, field: value}))
    for field, value in [("padded", 256), ("bits", 7), ("bits", 65)]:
        with pytest.raises(ValueError, match=r"^distributed-DP dimension or bits are inconsistent"):
            DdpRound.from_json(json.dumps({**raw, field: value}))
    with pytest.raises(ValueError, match=r"^distributed-DP min_survivors exceeds the cohort$"):
        DdpRound.from_json(json.dumps({**raw, "min_survivors": 6}))
    DdpRound.from_json(json.dumps({**raw, "min_survivors": 5, "bits": 64}))
    DdpRound.from_json(json.dumps({**raw, "bits": 8}))
    with pytest.raises(ValueError, match="need keys"):
        DdpRound.from_json(json.dumps({k: v for k, v in raw.items() if k != "gamma"}))


# ---- encoding, the ring and decoding -------------------------------------------------------


class _ScriptedSource:
    """A stand-in for SecureNoise with reproducible uniforms in (0, 1) and 64-bit words."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.uniform_calls: list[np.ndarray] = []

    def uniform(self, n: int) -> np.ndarray:
        out = self.rng.uniform(0.01, 0.99, size=n)
        self.uniform_calls.append(out.copy())
        return out

    def words(self, n: int) -> np.ndarray:
        return self.rng.integers(0, 2**64, size=n, dtype=np.uint64)


def _round(bits: int = 12, share_std: float = 1e-6) -> DdpRound:
    # d = 5 -> d' = 8; a noise share this small is exactly 0: only Y = 0 survives
    # the acceptance exp(−Y²/(2σ²)).
    return DdpRound(
        clip=1.0, dim=5, padded=8, bits=bits, gamma=0.01, bound=1000.0,
        share_std=share_std, min_survivors=1, cohort=1,
    )  # fmt: skip


def test_encode_rotates_scales_rounds_and_reduces_mod_2_to_the_bits() -> None:
    rnd = _round(bits=12)
    x = np.array([0.3, -0.5, 0.1, 0.2, -0.4])
    source = _ScriptedSource(3)
    out = rnd.encode(x, b"seed", source)  # type: ignore[arg-type]
    signs = Rotation(b"seed", 5).signs
    rotated = hadamard(8) @ (signs * np.concatenate([x, np.zeros(3)])) / math.sqrt(8) / 0.01
    low = np.floor(rotated)
    up = source.uniform_calls[0] <= rotated - low  # the first draw is the rounding's
    expected = (low + up).astype(np.int64) % (1 << 12)
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, expected)
    assert (expected % 2).any() and (expected > 2048).any()  # odd and wrapped values


def test_decode_maps_the_ring_to_signed_values_then_rotates_back() -> None:
    rnd = _round(bits=12)
    total = np.array([2047, 2048, 4095, 0, 1, 3000, 5, 2049], dtype=np.uint32)
    signed = np.array([2047, -2048, -1, 0, 1, 3000 - 4096, 5, 2049 - 4096], dtype=np.float64)
    signs = Rotation(b"seed", 5).signs
    expected = (signs * (hadamard(8) @ (signed * 0.01)) / math.sqrt(8))[:5]
    np.testing.assert_allclose(rnd.decode(total, b"seed"), expected, rtol=1e-12, atol=1e-12)


def test_decode_of_a_64_bit_ring_reads_twos_complement() -> None:
    rnd = _round(bits=64)
    total = np.array([2**64 - 1, 3, 2**63, 0, 0, 0, 0, 0], dtype=np.uint64)
    signed = np.array([-1.0, 3.0, -(2.0**63), 0, 0, 0, 0, 0])
    signs = Rotation(b"s", 5).signs
    expected = (signs * (hadamard(8) @ (signed * 0.01)) / math.sqrt(8))[:5]
    np.testing.assert_allclose(rnd.decode(total, b"s"), expected, rtol=1e-12)


def test_sum_norm_limit_by_hand() -> None:
    # n·Δ₂ + sqrt(n·σ_l²·(d' + 2√(d'τ) + 2τ)) with τ = 40 ln 2 (Hsu, Kakade & Zhang).
    rnd = _round(share_std=2.0)
    tau = 40 * math.log(2)
    expected = 3 * 1000.0 + math.sqrt(3 * 4.0 * (8 + 2 * math.sqrt(8 * tau) + 2 * tau))
    assert rnd.sum_norm_limit(3) == pytest.approx(expected, rel=1e-12)


def test_decode_refuses_a_sum_no_honest_cohort_reaches() -> None:
    rnd = DdpRound(
        clip=1.0, dim=5, padded=8, bits=32, gamma=0.01, bound=10.0,
        share_std=1.0, min_survivors=1, cohort=2,
    )  # fmt: skip
    limit = rnd.sum_norm_limit(2)
    inside = np.zeros(8, dtype=np.uint32)
    inside[0] = int(limit)
    rnd.decode(inside, b"s", num_contributors=2)
    outside = np.zeros(8, dtype=np.uint32)
    outside[0] = int(limit) + 1
    with pytest.raises(ValueError) as info:
        rnd.decode(outside, b"s", num_contributors=2)
    assert str(info.value) == (
        f"distributed-DP sum has norm {int(limit) + 1:.6g} (rounded units), above the "
        f"{limit:.6g} that 2 honest clients can reach"
    )
    with pytest.raises(ValueError, match=r"^sum has shape \(5,\), expected \(8,\)$"):
        rnd.decode(np.zeros(5, dtype=np.uint32), b"s")


def test_encode_refuses_what_it_must_not_encode() -> None:
    rnd = _round()
    with pytest.raises(ValueError, match=r"^update has 4 coordinates, the round expects 5$"):
        rnd.encode(np.zeros(4), b"s")
    with pytest.raises(ValueError, match=r"^update has a non-finite value; refuse to encode$"):
        rnd.encode(np.array([0.0, math.nan, 0, 0, 0]), b"s")
    with pytest.raises(ValueError) as info:
        rnd.encode(np.array([1.5, 0, 0, 0, 0]), b"s")
    assert str(info.value) == "update norm 1.5 exceeds the clip 1: clip before encoding"
    rnd.encode(np.array([1.0, 0, 0, 0, 0]), b"s")


# ---- the discrete Gaussian sampler's arguments ---------------------------------------------


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.inf, math.nan])
def test_sampler_refuses_a_non_positive_or_non_finite_sigma(sigma: float) -> None:
    with pytest.raises(ValueError, match=r"^sigma must be finite and > 0, found"):
        sample_discrete_gaussian(sigma, 4, np.random.default_rng(0).random)


def test_sampler_sizes() -> None:
    uniform = np.random.default_rng(0).random
    assert sample_discrete_gaussian(2.0, 0, uniform).shape == (0,)
    assert sample_discrete_gaussian(2.0, 1, uniform).shape == (1,)
    with pytest.raises(ValueError, match=r"^size must be >= 0, found -1$"):
        sample_discrete_gaussian(2.0, -1, uniform)


# ---- the plan's ring size and description ----------------------------------------------------


def test_min_bits_by_hand_on_a_one_coordinate_plan() -> None:
    # d' = 1, A = 0: Δ₂ = √min{1, 1/4 + 1·1/2} = √0.75; tolerance 0: n_min = n, ratio 1.
    # Smallest bits with n + k·z·Δ₂ <= 2^(bits−1) − 1, k = √(2 ln(2/p)), at least 8.
    n, z = 40, 200.0
    k = math.sqrt(2 * math.log(2 / 1e-9))
    need = n + k * z * math.sqrt(0.75)
    expected = next(b for b in range(8, 65) if need <= 2.0 ** (b - 1) - 1)
    plan = _plan(dim=1, max_cohort=n, noise_multiplier=z, dropout_tolerance=0.0)
    assert plan.min_bits() == expected == 12  # 13 if A = 1 were assumed
    small = _plan(dim=1, max_cohort=1, noise_multiplier=0.5, dropout_tolerance=0.0)
    assert small.min_bits() == 8  # fits in fewer bits, but the ring has at least 8


def test_an_impossible_plan_names_no_bit_width() -> None:
    with pytest.raises(DdpConfigError, match=r"use secagg.bits >= 65 \(or a smaller cohort\)$"):
        _plan(dim=1, max_cohort=1, noise_multiplier=1e19, bits=64, dropout_tolerance=0.0)


def test_a_cohort_of_one_gets_its_round() -> None:
    rnd = _plan(max_cohort=3).round(1)
    assert rnd.cohort == 1 and rnd.min_survivors == 1
    assert DdpRound.from_json(json.dumps({**json.loads(rnd.to_json()), "dim": 1, "padded": 1}))


def test_describe_reports_every_parameter_under_its_name() -> None:
    plan = _plan()
    assert plan.describe() == {
        "clip": 1.0,
        "dimension": 100,
        "padded_dimension": 128,
        "bits": 32,
        "noise_multiplier": 1.0,
        "max_cohort": 10,
        "dropout_tolerance": 0.2,
        "beta": math.exp(-0.5),
        "overflow_probability": 1e-9,
        "gamma": plan.gamma,
        "sensitivity_rounded": plan.bound,
        "noise_std_sum_rounded": plan.sigma,
        "noise_inflation_vs_central": plan.inflation,
        "tau": plan.tau,
    }
    assert plan.sigma == pytest.approx(1.0 * plan.bound, rel=1e-12)
    assert plan.inflation == pytest.approx(plan.bound / plan.scaled_norm, rel=1e-12)


def test_inverse_rotation_accepts_integer_sums() -> None:
    rot = Rotation(b"s", 5)
    y = np.arange(8, dtype=np.int64)
    np.testing.assert_allclose(rot.inverse(y), rot.inverse(y.astype(np.float64)), rtol=0)


# ---- accounting ([KLS] Proposition 14, Zhu & Wang Theorem 5) ----------------------------------


def test_ddg_round_rdp_by_hand_in_both_branches() -> None:
    # l = 0.5, τ = 0.01, d' = 16: first = α·l²/2 + τ·d', second = (α/2)·(l + √d'·τ)².
    # α = 3: first = 0.375 + 0.16 = 0.535 > second = 1.5·0.54² = 0.4374.
    assert ddg_round_rdp(3, 0.5, 0.01, 16) == pytest.approx(0.4374, rel=1e-12)
    # α = 64: first = 8 + 0.16 = 8.16 < second = 32·0.54² = 9.3312.
    assert ddg_round_rdp(64, 0.5, 0.01, 16) == pytest.approx(8.16, rel=1e-12)


def test_subsampled_rdp_without_sampling_is_the_mechanism() -> None:
    assert subsampled_rdp(2, 1.0, lambda a: 0.25 * a) == 0.5
    assert subsampled_rdp(5, 1.0, lambda a: 0.25 * a) == 1.25


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4, 5])
def test_subsampled_rdp_refuses_bad_orders_and_rates(index: int) -> None:
    order, q, message = [
        (1, 0.5, "order must be an integer >= 2, found 1"),
        (2.5, 0.5, "order must be an integer >= 2, found 2.5"),
        (3, 0.0, "q must lie in (0, 1], found 0.0"),
        (3, 1.5, "q must lie in (0, 1], found 1.5"),
        (3, -0.1, "q must lie in (0, 1], found -0.1"),
        (1.5, 0.5, "order must be an integer >= 2, found 1.5"),
    ][index]
    with pytest.raises(ValueError) as info:
        subsampled_rdp(order, q, lambda a: 0.1 * a)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_ddg_epsilon_composes_every_block() -> None:
    # Unsampled blocks: RDP is the sum of count·ρ(α) over blocks, converted by
    # dp-accounting's compute_epsilon.
    orders = list(RDP_ORDERS)
    rdp = [
        2 * ddg_round_rdp(a, 1 / 2.0, 1e-3, 64) + 3 * ddg_round_rdp(a, 1 / 4.0, 2e-3, 128)
        for a in orders
    ]
    expected, _ = compute_epsilon(orders, rdp, 1e-5)
    value = ddg_epsilon([(1.0, 2.0, 1e-3, 64, 2), (1.0, 4.0, 2e-3, 128, 3)], 1e-5)
    assert value == pytest.approx(expected, rel=1e-12)
    assert ddg_epsilon([], 1e-5) == 0.0


# ---- the plan's own checks -------------------------------------------------------------------


_BAD_PLANS: list[tuple[dict[str, object], str]] = [
    ({"clip": 0.0}, "clip must be finite and > 0, found 0.0"),
    ({"clip": math.inf}, "clip must be finite and > 0, found inf"),
    ({"noise_multiplier": 0.0}, "noise_multiplier must be > 0, found 0.0"),
    ({"noise_multiplier": math.inf}, "noise_multiplier must be > 0, found inf"),
    ({"bits": 7}, "secagg.bits must lie in [8, 64], found 7"),
    ({"bits": 65}, "secagg.bits must lie in [8, 64], found 65"),
    ({"max_cohort": 0}, "max_cohort and dim must be >= 1"),
    ({"dim": 0}, "max_cohort and dim must be >= 1"),
    ({"dropout_tolerance": 1.0}, "dropout_tolerance must lie in [0, 1)"),
    ({"dropout_tolerance": -0.1}, "dropout_tolerance must lie in [0, 1)"),
    ({"beta": 1.0}, "privacy.distributed.beta must lie in [0, 1), found 1.0"),
    ({"beta": -0.1}, "privacy.distributed.beta must lie in [0, 1), found -0.1"),
    ({"overflow_probability": 0.0}, "privacy.distributed.overflow_probability must lie in (0, 1)"),
    ({"overflow_probability": 1.0}, "privacy.distributed.overflow_probability must lie in (0, 1)"),
]


@pytest.mark.parametrize("index", range(len(_BAD_PLANS)))
def test_a_bad_plan_is_refused_naming_the_field(index: int) -> None:
    change, message = _BAD_PLANS[index]
    with pytest.raises(DdpConfigError) as info:
        _plan(**change)
    assert str(info.value) == message


def test_plans_at_the_edges_of_their_ranges_are_accepted() -> None:
    tiny = {"dim": 1, "max_cohort": 1, "noise_multiplier": 0.5}
    for change in (
        {"bits": 8},
        {"bits": 64},
        {"dropout_tolerance": 0.0},
        {"beta": 0.0},
        {"overflow_probability": 0.999},
    ):
        _plan(**{**tiny, **change})


def test_the_ring_is_sized_exactly_to_its_limit() -> None:
    # At the scaled norm A the plan picks, n + k·s = 2^(bits−1) − 1 with
    # s² = n²A²/d' + σ(A)²·max_n n/n_min(n) and σ(A) = z·Δ₂(A) (module docstring).
    plan = _plan(dim=4, bits=10, max_cohort=3, noise_multiplier=2.0, dropout_tolerance=0.5)
    a = plan.scaled_norm
    ratio = max(3 / 2, 2 / 1, 1 / 1)  # n_min(3) = 2, n_min(2) = 1, n_min(1) = 1
    sigma = 2.0 * sensitivity(a, 4, math.exp(-0.5))
    s = math.sqrt(9 * a * a / 4 + sigma * sigma * ratio)
    k = math.sqrt(2 * math.log(2 * 4 / 1e-9))
    assert 3 + k * s == pytest.approx(2.0**9 - 1, rel=1e-9)


def test_the_sampler_fills_in_several_batches() -> None:
    # σ = 0.3 accepts about a third of the candidates: 1.4·n + 64 per batch is not enough.
    sigma = 0.3
    draws = sample_discrete_gaussian(sigma, 20_000, np.random.default_rng(5).random)
    support = np.arange(-5, 6)
    pmf = np.exp(-(support**2) / (2 * sigma**2))
    pmf /= pmf.sum()
    var = float(np.sum(pmf * support**2))
    fourth = float(np.sum(pmf * support**4))
    assert np.all(np.abs(draws) <= 5)
    assert abs(float(np.mean(draws.astype(float) ** 2)) - var) < 6 * math.sqrt(
        (fourth - var**2) / 20_000
    )


def test_decode_of_a_wide_ring_wraps_in_exact_integers() -> None:
    # bits = 60: 2^60 − 1 is −1. Converting to float64 before wrapping would round it to
    # 2^60 and read 0.
    rnd = _round(bits=60)
    total = np.array([2**60 - 1, 0, 0, 0, 0, 0, 0, 0], dtype=np.uint64)
    signed = np.array([-1.0, 0, 0, 0, 0, 0, 0, 0])
    signs = Rotation(b"s", 5).signs
    expected = (signs * (hadamard(8) @ (signed * 0.01)) / math.sqrt(8))[:5]
    np.testing.assert_allclose(rnd.decode(total, b"s"), expected, rtol=1e-12)

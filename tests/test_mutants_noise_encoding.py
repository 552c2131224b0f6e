"""Tests that kill the mutants of noise.py and encoding.py that survived mutmut.

Every expected value is worked out independently of the code under test: by hand,
from the derivation in encoding.py's docstring (re-implemented here with exact
rationals), or from the ChaCha20 keystream of the ``cryptography`` library under a
key the test chooses. See tests/mutants-accepted.md for the survivors that are
equivalent.
"""

from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fl_app.config.schema import PrivacyMode, SamplingMode
from fl_app.privacy import noise
from fl_app.privacy.noise import (
    NOT_FOR_RELEASE,
    SecureNoise,
    SeededNoise,
    noise_source,
    release_status,
    seeded_randomness,
    uniform_from_words,
)
from fl_app.secagg.encoding import (
    FixedPointCodec,
    FixedPointConfigError,
    _modulus_mask,
    mod_add,
    mod_sub,
    mod_sum,
)

TWO_53 = float(2**53)


# --------------------------------------------------------------------------------------
# A SecureNoise under a key the test knows, and the reference keystream for it.
# --------------------------------------------------------------------------------------

KEY = bytes(range(1, 33))
NONCE_TAIL = bytes(range(100, 112))


def _fake_urandom(n: int) -> bytes:
    if n == 32:
        return KEY
    if n == 12:
        return NONCE_TAIL
    raise AssertionError(f"unexpected os.urandom({n})")


@pytest.fixture
def known_key(monkeypatch):
    """(SecureNoise under KEY, a reference ChaCha20 encryptor over the same keystream)."""
    monkeypatch.setattr(noise.os, "urandom", _fake_urandom)
    src = SecureNoise()
    ref = Cipher(algorithms.ChaCha20(KEY, b"\x00" * 4 + NONCE_TAIL), mode=None).encryptor()
    return src, ref


def _ref_words(ref, n: int) -> list[int]:
    data = ref.update(bytes(8 * n))
    return [int.from_bytes(data[8 * i : 8 * i + 8], "little") for i in range(n)]


def _ref_words32(ref, n: int) -> list[int]:
    data = ref.update(bytes(4 * n))
    return [int.from_bytes(data[4 * i : 4 * i + 4], "little") for i in range(n)]


def _u01_open_right(w: int) -> float:  # [0, 1): top 53 bits / 2**53
    return (w >> 11) / TWO_53


def _u01_open_left(w: int) -> float:  # (0, 1]: (top 53 bits + 1) / 2**53
    return ((w >> 11) + 1) / TWO_53


# --------------------------------------------------------------------------------------
# noise.py: argument checks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("std", [-1.0, -1e-300, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("make", [lambda: SeededNoise(1), SecureNoise])
def test_normal_rejects_negative_or_non_finite_std(make, std):
    # A negative std must never silently become "no noise".
    with pytest.raises(ValueError, match="std") as info:
        make().normal(std, 3)
    assert ">= 0" in str(info.value) and "finite" in str(info.value)


@pytest.mark.parametrize("make", [lambda: SeededNoise(1), SecureNoise])
def test_normal_rejects_negative_size_naming_it(make):
    with pytest.raises(ValueError, match="size") as info:
        make().normal(1.0, -1)
    assert ">= 0" in str(info.value)


def test_seeded_zero_std_is_zeros_and_does_not_advance_the_stream():
    src = SeededNoise(7, (1, 2))
    z = src.normal(0.0, 5)
    assert z.shape == (5,) and not z.any()
    # Reference: numpy's own generator for the documented seeding (seed, *stream).
    ref = np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, 1, 2])))
    np.testing.assert_array_equal(src.normal(1.5, 4), ref.normal(0.0, 1.5, 4))


def test_seeded_noise_accepts_zero_seed_and_stream_and_rejects_negative():
    ref = np.random.Generator(np.random.PCG64(np.random.SeedSequence([0, 0])))
    np.testing.assert_array_equal(SeededNoise(0, (0,)).normal(1.0, 3), ref.normal(0.0, 1.0, 3))
    with pytest.raises(ValueError, match="seed") as info:
        SeededNoise(0, (-1,))
    assert ">= 0" in str(info.value)


def test_standard_normal_f32_rejects_negative_size():
    with pytest.raises(ValueError, match="size") as info:
        SecureNoise().standard_normal_f32(-1)
    assert ">= 0" in str(info.value)


def test_noise_source_secure_flag_picks_the_csprng():
    assert isinstance(noise_source(True, 0), SecureNoise)
    assert isinstance(noise_source(False, 0), SeededNoise)


# --------------------------------------------------------------------------------------
# noise.py: the draws against the library keystream
# --------------------------------------------------------------------------------------


def test_uniform_from_words_endpoints():
    w = np.array([0, 2**11 - 1, 2**11, 2**64 - 1], dtype=np.uint64)
    expected = [2.0**-53, 2.0**-53, 2.0 * 2.0**-53, 1.0]
    got = uniform_from_words(w)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("size", [1, 2, 5, 6])
def test_secure_normal_is_box_muller_on_the_keystream(known_key, size):
    src, ref = known_key
    pairs = (size + 1) // 2
    u1 = [_u01_open_left(w) for w in _ref_words(ref, pairs)]
    u2 = [_u01_open_left(w) for w in _ref_words(ref, pairs)]
    r = [math.sqrt(-2.0 * math.log(u)) for u in u1]
    full = [r[i] * math.cos(2 * math.pi * u2[i]) for i in range(pairs)] + [
        r[i] * math.sin(2 * math.pi * u2[i]) for i in range(pairs)
    ]
    expected = np.array(full[:size]) * 2.5
    got = src.normal(2.5, size)
    assert got.shape == (size,)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # The next draw continues the keystream exactly where the reference is.
    assert src.words(1)[0] == _ref_words(ref, 1)[0]


def test_secure_normal_zero_std_or_size_draws_nothing(known_key):
    src, ref = known_key
    z = src.normal(0.0, 4)
    assert z.shape == (4,) and not z.any()
    assert src.normal(1.0, 0).shape == (0,)
    assert src.words(1)[0] == _ref_words(ref, 1)[0]


@pytest.mark.parametrize("size", [1, 4, 7])
def test_standard_normal_f32_matches_reference(known_key, size):
    src, ref = known_key
    pairs = (size + 1) // 2
    u1 = np.array([_u01_open_left(w) for w in _ref_words(ref, pairs)])
    # Docstring: radius in float64 from 53-bit uniforms; angle from 24-bit uniforms in
    # float32.
    r32 = np.array([math.sqrt(-2.0 * math.log(u)) for u in u1]).astype(np.float32)
    k = np.array([w >> 8 for w in _ref_words32(ref, pairs)], dtype=np.float32)
    angle = k * np.float32(2.0 * math.pi / 2**24)
    assert angle.dtype == np.float32 and float(angle.max()) < 2 * math.pi
    expected = np.concatenate([np.cos(angle) * r32, np.sin(angle) * r32])[:size]
    got = src.standard_normal_f32(size)
    assert got.dtype == np.float32 and got.shape == (size,)
    np.testing.assert_array_equal(got, expected)
    assert src.words(1)[0] == _ref_words(ref, 1)[0]


def test_random_size_zero_is_empty(known_key):
    src, ref = known_key
    assert src.random(0).shape == (0,)
    assert src.words(1)[0] == _ref_words(ref, 1)[0]


@pytest.mark.parametrize(
    "make_out",
    [
        lambda: np.empty((3, 5)),  # contiguous 2-d: the in-place path
        lambda: np.empty((4, 6))[:, :3],  # non-contiguous, no flat view: the copying path
        lambda: np.empty((4, 3)).T,  # Fortran order
        lambda: np.empty(7),
    ],
)
def test_random_out_fills_with_keystream_uniforms(known_key, make_out):
    src, ref = known_key
    out = make_out()
    n = out.size
    expected = np.array([_u01_open_right(w) for w in _ref_words(ref, n)]).reshape(out.shape)
    got = src.random(out=out)
    assert got is out
    np.testing.assert_array_equal(out, expected)
    # A second call continues the stream (buffer reuse).
    out2 = make_out()
    expected2 = np.array([_u01_open_right(w) for w in _ref_words(ref, n)]).reshape(out.shape)
    np.testing.assert_array_equal(src.random(out=out2), expected2)


def test_random_out_float16_stays_in_unit_interval(known_key):
    src, ref = known_key
    out = np.empty(256, dtype=np.float16)
    src.random(out=out)
    expected = np.array([_u01_open_right(w) for w in _ref_words(ref, 256)]).astype(np.float16)
    np.testing.assert_array_equal(out, expected)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


# --------------------------------------------------------------------------------------
# noise.py: release status
# --------------------------------------------------------------------------------------


def _cfg(*, secure=False, mode="central", record=False, sampling="fixed", frac=1.0):
    return SimpleNamespace(
        privacy=SimpleNamespace(secure_mode=secure, mode=PrivacyMode(mode), record_level=record),
        strategy=SimpleNamespace(sampling=SamplingMode(sampling), fraction_train=frac),
    )


def _kinds(reasons):
    out = []
    for r in reasons:
        assert isinstance(r, str)
        if r.startswith("central DP noise"):
            out.append("central")
        elif "DP-SGD" in r:
            out.append("dpsgd")
        elif r.startswith("client sampling"):
            out.append("sampling")
        else:
            out.append("?")
    return out


@pytest.mark.parametrize(
    ("kw", "kinds"),
    [
        ({"secure": True, "record": True, "sampling": "poisson", "frac": 0.1}, []),
        ({}, ["central"]),
        ({"sampling": "poisson"}, ["central", "sampling"]),
        ({"frac": 0.5}, ["central", "sampling"]),
        ({"frac": 0.999}, ["central", "sampling"]),
        ({"mode": "distributed"}, []),
        ({"mode": "distributed", "sampling": "poisson"}, ["sampling"]),
        ({"mode": "distributed", "frac": 0.5}, ["sampling"]),
        ({"mode": "local", "sampling": "poisson", "frac": 0.5}, []),
        ({"mode": "none", "sampling": "poisson", "frac": 0.5}, []),
        ({"mode": "none", "record": True}, ["dpsgd"]),
        ({"mode": "central", "record": True, "frac": 0.5}, ["central", "dpsgd", "sampling"]),
    ],
)
def test_seeded_randomness_truth_table(kw, kinds):
    assert _kinds(seeded_randomness(_cfg(**kw))) == kinds


def test_seeded_randomness_reasons_say_what_leaks():
    reasons = seeded_randomness(_cfg(record=True, sampling="poisson"))
    central, dpsgd, sampling = reasons
    assert "seed" in central and "regenerate and subtract" in central
    assert "DP-SGD noise and record batches" in dpsgd
    assert "seeded by the" in dpsgd and "server can regenerate every client's noise" in dpsgd
    assert "client sampling was seeded" in sampling and "amplification by sampling" in sampling
    assert "assumes cohorts nobody can recompute" in sampling


def test_release_status_names_the_setting_and_the_fix():
    ok = release_status(_cfg(secure=True))
    assert ok == {"for_release": True, "status": "for release", "reasons": []}
    bad = release_status(_cfg(mode="none", record=True))
    assert bad["for_release"] is False and bad["status"] == NOT_FOR_RELEASE
    assert _kinds(bad["reasons"][:-1]) == ["dpsgd"]
    fix = bad["reasons"][-1]
    assert "privacy.secure_mode=false" in fix and "seeded, reproducible randomness" in fix
    assert "rerun with privacy.secure_mode=true" in fix and "to release a model" in fix


# --------------------------------------------------------------------------------------
# encoding.py: modular helpers
# --------------------------------------------------------------------------------------


def test_modulus_mask_is_none_exactly_at_full_width():
    assert _modulus_mask(32, np.uint32) is None
    assert _modulus_mask(64, np.uint64) is None
    assert _modulus_mask(31, np.uint32) == 2**31 - 1
    assert _modulus_mask(33, np.uint64) == 2**33 - 1
    assert _modulus_mask(8, np.uint32) == 255


A32 = np.array([65535, 1], dtype=np.uint32)
B32 = np.array([2, 2], dtype=np.uint32)
W64 = np.array([2, 2], dtype=np.uint64)


@pytest.mark.parametrize("op", [mod_add, mod_sub])
def test_mod_ops_check_both_operands(op):
    for a, b in [(A32, W64), (W64, A32), (A32, [2, 2]), ([2, 2], A32)]:
        with pytest.raises(ValueError, match="bits=32"):
            op(a, b, 32)


def test_mod_ops_messages_name_expected_and_found_types():
    with pytest.raises(ValueError) as info:
        mod_add(A32, W64, 32)
    assert "uint32" in str(info.value) and "uint64" in str(info.value)
    with pytest.raises(ValueError) as info:
        mod_sub(A32, [2, 2], 32)
    assert "uint32" in str(info.value) and "list" in str(info.value)


def test_mod_ops_values_and_out():
    out = np.empty(2, dtype=np.uint32)
    assert mod_add(A32, B32, 16, out=out) is out
    np.testing.assert_array_equal(out, [1, 3])  # 65537 mod 65536, 3
    out2 = np.empty(2, dtype=np.uint32)
    assert mod_sub(A32, B32, 16, out=out2) is out2
    np.testing.assert_array_equal(out2, [65533, 65535])  # 1 - 2 mod 65536


def test_mod_sum_single_vector_and_checks():
    v = np.array([5, 2**16 + 3], dtype=np.uint32)
    got = mod_sum([v], 16)
    np.testing.assert_array_equal(got, [5, 3])
    assert got is not v and v[1] == 2**16 + 3
    np.testing.assert_array_equal(mod_sum((v, v, v), 16), [15, 9])
    with pytest.raises(ValueError, match="bits=32"):
        mod_sum([A32, W64], 32)
    with pytest.raises(ValueError, match="mod_sum needs at least one vector"):
        mod_sum([], 32)


# --------------------------------------------------------------------------------------
# encoding.py: FixedPointCodec parameters
# --------------------------------------------------------------------------------------


def _ref_scale(bits: int, b: float, n: int) -> float:
    """The docstring's derivation with exact rationals: the largest power of two s with
    B*s <= M - 1, M = min((2**(bits-1) - 1) // n, 2**53)."""
    m = min((2 ** (bits - 1) - 1) // n, 2**53)
    bound = Fraction(m - 1)
    bf = Fraction(b)
    k = 2000
    while bf * Fraction(2) ** k > bound:
        k -= 1
    return float(Fraction(2) ** k)


@pytest.mark.parametrize(
    ("bits", "b", "n", "hand"),
    [
        (8, 1.0, 1, 64.0),  # M-1 = 126
        (8, 64.0, 1, 1.0),  # 128 > 126
        (8, 63.0, 1, 2.0),  # 126 <= 126 exactly
        (8, 5.15, 3, 4.0),  # M = 127 // 3 = 42; 41.2 > 41
        (8, 31.25, 2, 1.0),  # M = 63; 62.5 > 62
        (8, 1000.0, 1, 0.125),  # 125 <= 126 < 250
        (8, 1.0, 50, 1.0),  # M = 2: the smallest usable ring
        (32, 1.0, 10_000, 2.0**17),  # the docstring's example
        (64, 1.0, 10_000, 2.0**49),  # the docstring's example
        (64, 1.0, 1, 2.0**52),  # M = 2**53; 2**53 > M - 1
        (64, 2.0**60, 1, 2.0**-8),
        (64, 1e300, 1, None),
    ],
)
def test_codec_scale_matches_derivation(bits, b, n, hand):
    expected = _ref_scale(bits, b, n)
    if hand is not None:
        assert expected == hand
    c = FixedPointCodec(bits, b, n, min_precision_bits=0)
    assert c.scale == expected
    assert c.max_encoded == math.ceil(Fraction(b) * Fraction(expected))
    # The overflow guarantee: n * (B*s + 1) < 2**(bits-1).
    assert n * (Fraction(b) * Fraction(c.scale) + 1) < 2 ** (bits - 1)


def test_codec_accepts_boundary_parameters():
    assert FixedPointCodec(64, 1.0, 1, min_precision_bits=52).scale == 2.0**52  # B*s == 2**52
    assert FixedPointCodec(32, 1.0, 1, min_precision_bits=0).max_contributors == 1
    assert FixedPointCodec(64, 1.0, 1).bits == 64


@pytest.mark.parametrize("bits", [7, 65, 32.0, True])
def test_codec_rejects_bad_bits(bits):
    with pytest.raises(FixedPointConfigError) as info:
        FixedPointCodec(bits, 1.0, 1)
    assert "bits must be an int in [8, 64]" in str(info.value)


@pytest.mark.parametrize("n", [0, -1, True, 2.0])
def test_codec_rejects_bad_max_contributors(n):
    with pytest.raises(FixedPointConfigError) as info:
        FixedPointCodec(32, 1.0, n)
    assert "max_contributors must be an int >= 1" in str(info.value)


@pytest.mark.parametrize("b", [0.0, -1.0, math.inf, math.nan, np.float32(0.5), "1"])
def test_codec_rejects_bad_max_abs(b):
    with pytest.raises(FixedPointConfigError) as info:
        FixedPointCodec(32, b, 1)
    assert "max_abs must be a finite float > 0" in str(info.value)


@pytest.mark.parametrize("p", [-1, 53, True, 12.0])
def test_codec_rejects_bad_min_precision_bits(p):
    with pytest.raises(FixedPointConfigError) as info:
        FixedPointCodec(64, 1.0, 1, min_precision_bits=p)
    assert "min_precision_bits must be an int in [0, 52]" in str(info.value)


def test_codec_too_many_contributors_names_them_and_the_fix():
    with pytest.raises(FixedPointConfigError) as info:
        FixedPointCodec(8, 1.0, 100, min_precision_bits=0)  # 127 // 100 = 1 < 2
    msg = str(info.value)
    assert "bits=8" in msg and "max_contributors=100" in msg
    assert "use more bits or a smaller cohort" in msg


def test_codec_coarse_step_message_reports_the_step():
    # bits=8, n=1, B=1: s = 64, step 1/64 = 0.015625 = B * 2**-6, coarser than 2**-12.
    with pytest.raises(FixedPointConfigError) as info:
        FixedPointCodec(8, 1.0, 1)
    msg = str(info.value)
    assert "step of 0.0156 " in msg and "max_abs * 2**-6.0" in msg and "2**-12" in msg
    assert "bits=64" in msg and "lower min_precision_bits" in msg
    # Exactly at the criterion it passes; one bit more fails.
    assert FixedPointCodec(8, 1.0, 1, min_precision_bits=6).scale == 64.0
    with pytest.raises(FixedPointConfigError):
        FixedPointCodec(8, 1.0, 1, min_precision_bits=7)


# --------------------------------------------------------------------------------------
# encoding.py: encode / decode checks
# --------------------------------------------------------------------------------------


class NotAGenerator:
    pass


def test_encode_rejects_non_generator_naming_its_type():
    c = FixedPointCodec(32, 1.0, 1)
    with pytest.raises(TypeError) as info:
        c.encode([0.5], NotAGenerator())
    assert "rng" in str(info.value) and "NotAGenerator" in str(info.value)


def test_encode_rejects_complex_naming_dtype():
    c = FixedPointCodec(32, 1.0, 1)
    with pytest.raises(ValueError) as info:
        c.encode(np.array([0.5 + 0j]), np.random.default_rng(0))
    assert "real" in str(info.value) and "complex128" in str(info.value)


@pytest.mark.parametrize("bad", [[0.5, -np.inf], [np.inf, 0.5], [np.nan, 0.1]])
def test_encode_rejects_non_finite(bad):
    c = FixedPointCodec(32, 1.0, 1)
    with pytest.raises(ValueError) as info:
        c.encode(np.array(bad), np.random.default_rng(0))
    assert "non-finite" in str(info.value) and "NaN" in str(info.value)


def test_encode_out_of_range_message_says_clip():
    c = FixedPointCodec(32, 1.0, 1)
    with pytest.raises(ValueError) as info:
        c.encode(np.array([1.5]), np.random.default_rng(0))
    assert "max_abs=1.0" in str(info.value) and "clip the update" in str(info.value)


def test_encode_float16_is_scaled_in_float64():
    # s = 2**30 (M - 1 = 2**31 - 2); 0.5 * 2**30 overflows float16 but not float64.
    c = FixedPointCodec(32, 1.0, 1)
    assert c.scale == 2.0**30
    x = np.array([0.5, -0.25, 1.0], dtype=np.float16)
    enc = c.encode(x, np.random.default_rng(0))  # x*s is an integer: no rounding
    np.testing.assert_array_equal(enc, [2**29, 2**32 - 2**28, 2**30])
    np.testing.assert_array_equal(c.decode_sum(enc, 1), [0.5, -0.25, 1.0])


def test_decode_checks_num_contributors_and_dtype():
    c = FixedPointCodec(32, 1.0, 3, min_precision_bits=0)
    total = np.zeros(2, dtype=np.uint32)
    for bad in (True, 0, 4, 1.0):
        with pytest.raises(ValueError, match="num_contributors") as info:
            c.decode_sum(total, bad)
        assert "max_contributors=3" in str(info.value)
    with pytest.raises(ValueError) as info:
        c.decode_sum(np.zeros(2, dtype=np.int64), 1)
    assert "uint32" in str(info.value) and "int64" in str(info.value)


def test_decode_rejects_unreduced_sum():
    c = FixedPointCodec(16, 1.0, 1, min_precision_bits=0)
    with pytest.raises(ValueError) as info:
        c.decode_sum(np.array([2**16], dtype=np.uint32), 1)
    assert "2**16" in str(info.value) and "not reduced" in str(info.value)


@pytest.mark.parametrize("bits", [32, 24])
def test_decode_rejects_negative_overflow(bits):
    c = FixedPointCodec(bits, 1.0, 2, min_precision_bits=0)
    bound = c.max_encoded  # for one contributor
    ok = np.array([(-bound) % 2**bits, bound], dtype=np.uint32)
    np.testing.assert_array_equal(c.decode_signed(ok, 1), [-bound, bound])
    for v in (-bound - 1, bound + 1):
        bad = np.array([v % 2**bits], dtype=np.uint32)
        with pytest.raises(ValueError) as info:
            c.decode_sum(bad, 1)
        assert "more contributors than stated" in str(info.value)

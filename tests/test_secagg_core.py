"""Guarantees of the secure-aggregation building blocks (fl_app.secagg, no messaging).

Shamir sharing, X25519/HKDF/AEAD/mask PRG, the fixed-point codec and the graph
parameter derivation. The protocol itself is tested in tests/test_secagg_protocol.py.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_app.secagg import crypto, masks, shamir
from fl_app.secagg.derive import custom_params, derive_params, params_from_config
from fl_app.secagg.encoding import FixedPointCodec, FixedPointConfigError, mod_add, mod_sub, mod_sum
from fl_app.secagg.graph import build_graph
from fl_app.secagg.params import GraphMode, SecAggConfigError

FAST = settings(max_examples=25, deadline=None)

# ---------------------------------------------------------------- package hygiene


def test_package_imports_neither_torch_nor_flwr() -> None:
    code = (
        "import sys, fl_app.secagg, fl_app.secagg.protocol;"
        "bad = [m for m in ('torch', 'flwr') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------- Shamir

secrets_st = st.binary(min_size=32, max_size=32)


@FAST
@given(secret=secrets_st, data=st.data())
def test_shamir_any_t_shares_reconstruct(secret: bytes, data: st.DataObject) -> None:
    m = data.draw(st.integers(1, 12), label="m")
    t = data.draw(st.integers(1, m), label="t")
    ids = data.draw(
        st.lists(st.integers(1, 2**64), min_size=m, max_size=m, unique=True), label="ids"
    )
    shares = shamir.split(secret, t, ids)
    subset = data.draw(st.permutations(ids), label="order")[:t]
    assert shamir.reconstruct({x: shares[x] for x in subset}, t) == secret
    # more than t shares also reconstruct (only t are used)
    assert shamir.reconstruct(shares, t) == secret


@FAST
@given(secret=secrets_st, other=secrets_st, data=st.data())
def test_shamir_t_minus_1_shares_fit_every_secret(
    secret: bytes, other: bytes, data: st.DataObject
) -> None:
    """t-1 shares are consistent with *any* candidate secret (information-theoretic hiding).

    For the t-1 shares plus the point (0, other) the unique interpolating polynomial
    has degree <= t-1, passes through every share and has constant term ``other``:
    the shares cannot tell ``secret`` and ``other`` apart.
    """
    t = data.draw(st.integers(2, 8), label="t")
    ids = data.draw(st.lists(st.integers(1, 2**64), min_size=t, max_size=t, unique=True))
    shares = shamir.split(secret, t, ids)
    known = [(x, shares[x]) for x in ids[: t - 1]]
    points = [(0, int.from_bytes(other, "big")), *known]
    coeffs = _interpolate_coefficients(points)
    assert len(coeffs) <= t
    assert coeffs[0] == int.from_bytes(other, "big")
    for x, y in known:
        assert shamir.evaluate_polynomial(coeffs, x) == y
    with pytest.raises(shamir.ShamirError, match="need threshold"):
        shamir.reconstruct(dict(known), t)


def _interpolate_coefficients(points: list[tuple[int, int]]) -> list[int]:
    """Coefficients of the Lagrange polynomial through ``points`` over GF(p) (test oracle)."""
    p = shamir.PRIME
    result = [0] * len(points)
    for i, (xi, yi) in enumerate(points):
        basis = [1]
        denom = 1
        for j, (xj, _) in enumerate(points):
            if j == i:
                continue
            basis = [
                (a - xj * b) % p
                for a, b in itertools.zip_longest([0, *basis], [*basis, 0], fillvalue=0)
            ]
            denom = denom * (xi - xj) % p
        scale = yi * pow(denom, -1, p) % p
        for k, c in enumerate(basis):
            result[k] = (result[k] + scale * c) % p
    return result


def test_shamir_argument_errors() -> None:
    s = bytes(range(32))
    with pytest.raises(shamir.ShamirError, match="32 bytes"):
        shamir.split(b"short", 2, [1, 2])
    with pytest.raises(shamir.ShamirError, match="exceeds the number of share ids"):
        shamir.split(s, 3, [1, 2])
    with pytest.raises(shamir.ShamirError, match="0 would reveal"):
        shamir.split(s, 2, [0, 1])
    with pytest.raises(shamir.ShamirError, match="duplicate share id"):
        shamir.split(s, 2, [5, 5, 6])
    shares = shamir.split(s, 2, [1, 2, 3])
    with pytest.raises(shamir.ShamirError, match="duplicate share id"):
        shamir.reconstruct([(1, shares[1]), (1, shares[1])], 2)
    with pytest.raises(shamir.ShamirError, match="0 would reveal"):
        shamir.reconstruct({0: 5, 1: shares[1]}, 2)
    with pytest.raises(shamir.ShamirError, match="threshold must be"):
        shamir.reconstruct(shares, 0)
    # shares of a higher-threshold split do not reconstruct: detected, not garbage
    high = shamir.split(s, 3, [1, 2, 3])
    with pytest.raises(shamir.ShamirError, match="inconsistent"):
        shamir.reconstruct({1: high[1], 2: high[2]}, 2)


def _naive_lagrange_at_zero(ids: list[int]) -> list[int]:
    """``l_i = prod_{j != i} x_j / (x_j - x_i)`` with one inversion per term (test oracle)."""
    p = shamir.PRIME
    out = []
    for i, xi in enumerate(ids):
        num = den = 1
        for j, xj in enumerate(ids):
            if j != i:
                num = num * xj % p
                den = den * (xj - xi) % p
        out.append(num * pow(den, -1, p) % p)
    return out


@FAST
@given(data=st.data())
def test_shamir_batched_lagrange_and_reconstruct_many_equal_one_by_one(
    data: st.DataObject,
) -> None:
    """The batched path (one inversion for all sets) equals the textbook one, set by set."""
    t = data.draw(st.integers(1, 10), label="t")
    sets = []
    secrets = []
    for _ in range(data.draw(st.integers(1, 6), label="sets")):
        m = data.draw(st.integers(t, t + 4))
        ids = data.draw(st.lists(st.integers(1, 2**64), min_size=m, max_size=m, unique=True))
        secret = data.draw(secrets_st)
        secrets.append(secret)
        sets.append(shamir.split(secret, t, ids))
    id_sets = [tuple(sorted(s))[:t] for s in sets]
    assert shamir._lagrange_batch(id_sets) == [
        tuple(_naive_lagrange_at_zero(list(ids))) for ids in id_sets
    ]
    assert list(shamir.lagrange_coefficients_at_zero(id_sets[0])) == _naive_lagrange_at_zero(
        list(id_sets[0])
    )
    assert shamir.reconstruct_many(sets, t) == [shamir.reconstruct(s, t) for s in sets]
    assert shamir.reconstruct_many(sets, t) == secrets


def test_shamir_reconstruct_many_raises_like_reconstruct() -> None:
    s = bytes(range(32))
    good = shamir.split(s, 2, [1, 2, 3])
    high = shamir.split(s, 3, [1, 2, 3])
    assert shamir.reconstruct_many([], 2) == []
    # sets over the same holders (a complete graph) share one coefficient computation
    same = [shamir.split(bytes([i]) * 32, 3, [4, 9, 2**64, 7]) for i in range(5)]
    assert shamir.reconstruct_many(same, 3) == [bytes([i]) * 32 for i in range(5)]
    # long sets exercise the product of differences 8 at a time
    wide = shamir.split(s, 19, list(range(3, 60, 2)))
    assert shamir.reconstruct_many([wide], 19) == [s]
    with pytest.raises(shamir.ShamirError, match="inconsistent"):
        shamir.reconstruct_many([good, {1: high[1], 2: high[2]}], 2)
    with pytest.raises(shamir.ShamirError, match="need threshold"):
        shamir.reconstruct_many([good, {1: good[1]}], 2)
    with pytest.raises(shamir.ShamirError, match="0 would reveal"):
        shamir.reconstruct_many([{0: 5, 1: good[1]}], 2)
    with pytest.raises(shamir.ShamirError, match="threshold must be"):
        shamir.reconstruct_many([good], 0)


def test_shamir_share_bytes_round_trip_and_range() -> None:
    shares = shamir.split(bytes(32), 2, [1, 2])
    for y in shares.values():
        raw = shamir.share_to_bytes(y)
        assert len(raw) == shamir.SHARE_BYTES == 66
        assert shamir.share_from_bytes(raw) == y
    with pytest.raises(shamir.ShamirError):
        shamir.share_from_bytes(b"\xff" * 66)  # >= p
    with pytest.raises(shamir.ShamirError):
        shamir.share_from_bytes(b"\x00" * 65)


def test_random_field_element_rejects_out_of_range_draws() -> None:
    draws = iter([b"\xff" * 66, (5).to_bytes(66, "big")])  # first masks to p itself
    assert shamir.random_field_element(lambda n: next(draws)) == 5


# ---------------------------------------------------------------- crypto

_P = 2**255 - 19
_SMALL_ORDER = [
    0,
    1,
    _P - 1,
    _P,
    _P + 1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
]


@pytest.mark.parametrize("u", _SMALL_ORDER)
def test_small_order_public_keys_rejected(u: int) -> None:
    raw = u.to_bytes(32, "little")
    with pytest.raises(crypto.InvalidPublicKeyError):
        crypto.load_public_key(raw)
    # the high bit is ignored by X25519: the same point with it set is also rejected
    with pytest.raises(crypto.InvalidPublicKeyError):
        crypto.load_public_key((u | (1 << 255)).to_bytes(32, "little"))
    # our list is right: OpenSSL's exchange indeed yields the all-zero secret for it
    with pytest.raises(ValueError):
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))


@pytest.mark.parametrize("raw", [b"", b"\x09" * 31, b"\x09" * 33, "not bytes", None])
def test_malformed_public_keys_rejected(raw: object) -> None:
    with pytest.raises(crypto.InvalidPublicKeyError, match="32 raw bytes"):
        crypto.load_public_key(raw)


def test_agree_and_derive_are_symmetric_and_domain_separated() -> None:
    a, b = crypto.generate_private_key(), crypto.generate_private_key()
    shared = crypto.agree(a, crypto.public_key_bytes(b))
    assert shared == crypto.agree(b, crypto.public_key_bytes(a))

    def derive(
        purpose: crypto.KeyPurpose = crypto.KeyPurpose.pairwise_mask,
        context: bytes = b"round-1",
        node_a: int = 3,
        node_b: int = 9,
    ) -> bytes:
        return crypto.derive_key(
            shared, purpose=purpose, context=context, node_a=node_a, node_b=node_b
        )

    k = derive()
    assert k == derive(node_a=9, node_b=3)
    variants = {
        derive(purpose=crypto.KeyPurpose.share_encryption),
        derive(context=b"round-2"),
        derive(node_b=10),
    }
    assert k not in variants and len(variants) == 3
    with pytest.raises(ValueError, match="distinct"):
        derive(node_b=3)


def test_aead_binds_context_sender_recipient() -> None:
    key = bytes(range(32))
    ct = crypto.encrypt(key, b"shares", context=b"ctx", sender=1, recipient=2)
    assert crypto.decrypt(key, ct, context=b"ctx", sender=1, recipient=2) == b"shares"
    tampered = bytearray(ct)
    tampered[-1] ^= 1
    cases = [
        (key, bytes(tampered), b"ctx", 1, 2),
        (key, ct, b"ctx-old", 1, 2),
        (key, ct, b"ctx", 2, 1),
        (key, ct, b"ctx", 1, 3),
        (bytes(32), ct, b"ctx", 1, 2),
        (key, ct[:20], b"ctx", 1, 2),
    ]
    for k, c, ctx, s, r in cases:
        with pytest.raises(crypto.DecryptionError):
            crypto.decrypt(k, c, context=ctx, sender=s, recipient=r)


def test_expand_mask_deterministic_domain_separated_and_reduced() -> None:
    seed = bytes(range(32))
    a = masks.expand_mask(seed, 3 * 2**18 + 5, 32, domain=masks.MaskDomain.pairwise)
    assert a.dtype == np.uint32 and a.shape == (3 * 2**18 + 5,)
    assert np.array_equal(
        a, masks.expand_mask(seed, a.size, 32, domain=masks.MaskDomain.pairwise)
    )
    # chunked keystream == one-shot keystream (prefix property)
    short = masks.expand_mask(seed, 1000, 32, domain=masks.MaskDomain.pairwise)
    assert np.array_equal(a[:1000], short)
    selfm = masks.expand_mask(seed, 1000, 32, domain=masks.MaskDomain.self_mask)
    assert not np.array_equal(short, selfm)
    wide = masks.expand_mask(seed, 1000, 64, domain=masks.MaskDomain.pairwise)
    assert wide.dtype == np.uint64
    small = masks.expand_mask(seed, 1000, 20, domain=masks.MaskDomain.pairwise)
    assert small.dtype == np.uint32 and int(small.max()) < 2**20
    assert masks.expand_mask(seed, 0, 32, domain=masks.MaskDomain.pairwise).size == 0
    with pytest.raises(ValueError, match="32 bytes"):
        masks.expand_mask(b"short", 10, 32, domain=masks.MaskDomain.pairwise)


@pytest.mark.parametrize("bits", [8, 20, 32, 33, 48, 64])
@pytest.mark.parametrize("extra", [0, 1, 5])
def test_accumulate_masks_equals_adding_expanded_masks_one_by_one(bits: int, extra: int) -> None:
    """The fused, chunked accumulation is exactly ``out + sum(add) - sum(subtract)`` mod 2**bits."""
    dtype = crypto.storage_dtype(bits)
    step = masks._ACC_CHUNK_BYTES // np.dtype(dtype).itemsize
    length = 2 * step + extra  # crosses chunk boundaries, with a partial last chunk
    rng = np.random.default_rng(bits + extra)
    base = rng.integers(0, 2**bits, length, dtype=np.uint64, endpoint=False).astype(dtype)
    seeds = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in range(5)]
    add = [(seeds[0], masks.MaskDomain.self_mask), (seeds[1], masks.MaskDomain.pairwise)]
    subtract = [(s, masks.MaskDomain.pairwise) for s in seeds[2:]]
    expected = base.copy()
    for s, d in add:
        expected = mod_add(expected, masks.expand_mask(s, length, bits, domain=d), bits)
    for s, d in subtract:
        expected = mod_sub(expected, masks.expand_mask(s, length, bits, domain=d), bits)
    out = base.copy()
    got = masks.accumulate_masks(out, bits, add=add, subtract=subtract)
    assert got is out and got.dtype == dtype
    assert np.array_equal(got, expected)
    if bits < 8 * got.itemsize:
        assert int(got.max()) < 2**bits
    # a mask added and subtracted cancels exactly
    again = masks.accumulate_masks(base.copy(), bits, add=add[:1], subtract=add[:1])
    assert np.array_equal(again, base)
    # out = base + masks in the same pass; base is left as it was
    before = base.copy()
    fresh = np.full(length, 7, dtype=dtype)
    got = masks.accumulate_masks(fresh, bits, add=add, subtract=subtract, base=base)
    assert got is fresh and np.array_equal(got, expected) and np.array_equal(base, before)


def test_accumulate_masks_argument_checks() -> None:
    seed = bytes(range(32))
    pair = [(seed, masks.MaskDomain.pairwise)]
    empty = np.zeros(0, dtype=np.uint32)
    assert masks.accumulate_masks(empty, 32, add=pair).size == 0
    unchanged = np.arange(10, dtype=np.uint32)
    assert np.array_equal(masks.accumulate_masks(unchanged.copy(), 32), unchanged)
    copied = masks.accumulate_masks(np.zeros(10, dtype=np.uint32), 32, base=unchanged)
    assert np.array_equal(copied, unchanged)
    reduced = masks.accumulate_masks(np.zeros(1, np.uint32), 4, base=np.array([18], np.uint32))
    assert reduced[0] == 2
    with pytest.raises(ValueError, match="base must match"):
        masks.accumulate_masks(np.zeros(4, dtype=np.uint32), 32, add=pair, base=unchanged)
    with pytest.raises(ValueError, match="uint32"):
        masks.accumulate_masks(np.zeros(4, dtype=np.uint64), 32, add=pair)
    with pytest.raises(ValueError, match="1-d"):
        masks.accumulate_masks(np.zeros((2, 2), dtype=np.uint32), 32, add=pair)
    with pytest.raises(ValueError, match="contiguous"):
        masks.accumulate_masks(np.zeros(8, dtype=np.uint32)[::2], 32, add=pair)
    with pytest.raises(ValueError, match="32 bytes"):
        masks.accumulate_masks(np.zeros(4, dtype=np.uint32), 32, subtract=[(b"short", pair[0][1])])


# ---------------------------------------------------------------- encoding


def test_codec_scale_derivation_and_ten_thousand_clients() -> None:
    c64 = FixedPointCodec(bits=64, max_abs=1.0, max_contributors=10_000)
    assert c64.scale == 2.0**49 and c64.dtype == np.uint64
    n = 10_000
    assert n * (c64.max_abs * c64.scale + 1) < 2**63
    c32 = FixedPointCodec(bits=32, max_abs=1.0, max_contributors=10_000)
    assert c32.scale == 2.0**17 and c32.dtype == np.uint32
    assert n * (c32.max_abs * c32.scale + 1) < 2**31
    with pytest.raises(FixedPointConfigError, match=r"bits=32 with max_contributors=1000000"):
        FixedPointCodec(bits=32, max_abs=1.0, max_contributors=1_000_000)
    with pytest.raises(FixedPointConfigError, match="bits must be"):
        FixedPointCodec(bits=7, max_abs=1.0, max_contributors=10)
    with pytest.raises(FixedPointConfigError, match="max_abs"):
        FixedPointCodec(bits=32, max_abs=0.0, max_contributors=10)


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_codec_extremes_of_ten_thousand_clients_do_not_wrap(bits: int, sign: float) -> None:
    codec = FixedPointCodec(bits=bits, max_abs=1.0, max_contributors=10_000)
    rng = np.random.default_rng(0)
    x = np.full(4, sign)
    enc = codec.encode(x, rng)
    total = np.zeros(4, dtype=codec.dtype)
    for _ in range(10_000):
        np.add(total, enc, out=total)
    assert np.array_equal(codec.decode_sum(total, 10_000), np.full(4, sign * 10_000))


def test_codec_round_trip_within_resolution_and_unbiased() -> None:
    codec = FixedPointCodec(bits=32, max_abs=2.0, max_contributors=100, min_precision_bits=4)
    rng = np.random.default_rng(1)
    x = rng.uniform(-2, 2, size=1000)
    dec = codec.decode_sum(codec.encode(x, rng), 1)
    assert np.max(np.abs(dec - x)) <= codec.resolution
    # unbiased: the mean of 4,000 encodings of a value between grid points converges
    v = np.full(4000, 0.3 * codec.resolution)
    mean = codec.decode_sum(codec.encode(v, rng), 1).mean()
    # std of the mean <= resolution/2/sqrt(4000); 6 sigma, false-failure rate ~2e-9
    assert abs(mean - v[0]) < 6 * codec.resolution / 2 / np.sqrt(4000)


def _reference_encode(
    codec: FixedPointCodec, x: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The textbook form of the codec's stochastic rounding (whole-array temporaries)."""
    flat = np.asarray(x).astype(np.float64).ravel()
    scaled = flat * codec.scale
    low = np.floor(scaled)
    up = rng.random(low.shape) < (scaled - low)
    signed = low.astype(np.int64) + up
    as_u64 = signed.view(np.uint64)
    if codec.bits < 64:
        as_u64 = as_u64 & np.uint64((1 << codec.bits) - 1)
    return as_u64.astype(codec.dtype)


def _reference_decode_signed(codec: FixedPointCodec, total: np.ndarray) -> np.ndarray:
    if codec.bits == 64:
        return total.view(np.int64).copy()
    signed = total.astype(np.int64)
    signed[signed >= 2 ** (codec.bits - 1)] -= 2**codec.bits
    return signed


@pytest.mark.parametrize("bits", [8, 20, 32, 40, 64])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int16])
def test_codec_chunked_encode_and_decode_equal_the_textbook_form(bits: int, dtype: type) -> None:
    """Bit-for-bit the reference computation, the same uniform stream, any length."""
    from fl_app.secagg import encoding

    n = 5
    max_abs = 3.0
    codec = FixedPointCodec(bits=bits, max_abs=max_abs, max_contributors=n, min_precision_bits=2)
    length = 2 * encoding._ENCODE_CHUNK + 7
    data = np.random.default_rng(bits)
    if np.dtype(dtype).kind == "f":
        x: np.ndarray = data.uniform(-max_abs, max_abs, length).astype(dtype)
        x[:4] = (max_abs, -max_abs, 0.0, -0.0)
    else:
        x = data.integers(-3, 4, length).astype(dtype)
    got = codec.encode(x, np.random.default_rng(7))
    ref = _reference_encode(codec, x, np.random.default_rng(7))
    assert got.dtype == codec.dtype and np.array_equal(got, ref)
    # the same number of uniforms was drawn
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    codec.encode(x, rng_a)
    _reference_encode(codec, x, rng_b)
    assert rng_a.random() == rng_b.random()
    # decode: sums of n encodings, including the most negative and positive ones
    encs = [codec.encode(x, np.random.default_rng(i)) for i in range(n)]
    total = mod_sum(encs, bits)
    signed = codec.decode_signed(total, n)
    assert signed.dtype == np.int64
    assert np.array_equal(signed, _reference_decode_signed(codec, total))
    decoded = codec.decode_sum(total, n)
    assert decoded.dtype == np.float64
    assert np.array_equal(decoded, signed.astype(np.float64) / codec.scale)
    assert np.max(np.abs(decoded - n * x.astype(np.float64))) <= n * codec.resolution
    assert codec.encode(x[:0], np.random.default_rng(0)).shape == (0,)


def test_codec_refuses_out_of_range_and_bad_sums() -> None:
    codec = FixedPointCodec(bits=32, max_abs=1.0, max_contributors=10)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="exceeds max_abs"):
        codec.encode(np.array([0.5, 1.0000001]), rng)
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode(np.array([np.nan]), rng)
    for bad in (np.inf, -np.inf):
        with pytest.raises(ValueError, match="non-finite"):
            codec.encode(np.array([0.5, bad, np.nan]), rng)
    with pytest.raises(ValueError, match="exceeds max_abs"):
        codec.encode(np.array([0.5, -1.5]), rng)
    enc = codec.encode(np.array([1.0, -1.0]), rng)
    with pytest.raises(ValueError, match="max_contributors"):
        codec.decode_sum(enc, 11)
    with pytest.raises(ValueError, match="dtype"):
        codec.decode_sum(enc.astype(np.uint64), 1)
    with pytest.raises(ValueError, match="wrapped"):
        codec.decode_sum(np.array([2**30], dtype=np.uint32), 1)
    # 0-d input encodes as a length-1 vector
    assert codec.encode(np.float64(0.25), rng).shape == (1,)


def test_codec_small_ring_and_modular_helpers() -> None:
    codec = FixedPointCodec(bits=20, max_abs=1.0, max_contributors=4, min_precision_bits=8)
    rng = np.random.default_rng(2)
    xs = [rng.uniform(-1, 1, 50) for _ in range(4)]
    encs = [codec.encode(x, rng) for x in xs]
    assert all(int(e.max()) < 2**20 for e in encs)
    total = mod_sum(encs, 20)
    assert np.max(np.abs(codec.decode_sum(total, 4) - sum(xs))) <= 4 * codec.resolution
    a = np.array([2**20 - 1], dtype=np.uint32)
    one = np.array([1], dtype=np.uint32)
    assert mod_add(a, one, 20)[0] == 0
    assert mod_sub(np.array([0], dtype=np.uint32), one, 20)[0] == 2**20 - 1
    with pytest.raises(ValueError, match="uint32"):
        mod_add(a.astype(np.int64), one, 20)


# ---------------------------------------------------------------- graph and parameters


def test_complete_mode_threshold_is_n_minus_dropouts() -> None:
    p = derive_params(20, mode="secagg", dropout_tolerance=0.25, corrupt_fraction=0.1)
    assert (p.degree, p.threshold, p.max_dropouts, p.max_corrupt) == (19, 15, 5, 2)
    assert p.min_survivors == 15 and p.is_complete
    assert p.log2_security_failure == -np.inf
    assert "t=15=n-D" in p.explanation


def test_sparse_mode_degree_is_logarithmic_and_conditions_hold() -> None:
    for n in (1_000, 10_000, 100_000):
        p = derive_params(n, mode="secaggplus", dropout_tolerance=0.05, corrupt_fraction=0.05)
        assert p.degree < 10 * np.log2(n)
        assert 2 * p.threshold > p.degree + 1
        assert p.log2_security_failure <= -40 and p.log2_correctness_failure <= -20
        assert "Harary" in p.explanation
    degrees = [derive_params(n).degree for n in (1_000, 10_000, 100_000)]
    # O(log n): 100x the clients grows k by at most log2(1e5)/log2(1e3) = 5/3 (the
    # split-view-with-colluders bound 2t > k+1+Y made k larger, not faster-growing).
    assert degrees == sorted(degrees) and degrees[-1] / degrees[0] < np.log2(1e5) / np.log2(1e3)


def test_sparse_mode_falls_back_to_complete_graph_for_tiny_cohorts() -> None:
    p = derive_params(5, mode="secaggplus", dropout_tolerance=0.2, corrupt_fraction=0.0)
    assert p.is_complete and "no sparse degree" in p.explanation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 10, "mode": "secagg", "dropout_tolerance": 0.5}, "no threshold"),
        ({"num_clients": 10, "dropout_tolerance": 0.5, "corrupt_fraction": 0.4}, "honest"),
        ({"num_clients": 10, "dropout_tolerance": 1.2}, "dropout_tolerance"),
        ({"num_clients": 2}, "num_clients"),
        ({"num_clients": 10, "mode": "ring"}, "mode"),
    ],
)
def test_impossible_parameters_raise_named_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(SecAggConfigError, match=match):
        derive_params(**kwargs)


def test_params_config_round_trip_and_tamper_detection() -> None:
    p = derive_params(500, dropout_tolerance=0.1, corrupt_fraction=0.05)
    cfg = p.to_config()
    assert all(isinstance(v, (int, float, str)) for v in cfg.values())
    assert params_from_config(cfg) == p
    with pytest.raises(SecAggConfigError, match="differ"):
        params_from_config({**cfg, "threshold": p.threshold - 1})
    custom = custom_params(10, 4, 3, max_dropouts=1)
    assert params_from_config(custom.to_config()) == custom
    with pytest.raises(SecAggConfigError, match="2t > degree"):
        custom_params(10, 4, 2, max_dropouts=1)


def test_harary_graph_is_regular_symmetric_and_seeded() -> None:
    ids = [2**64 - 1 - 13 * i for i in range(50)]
    seed = bytes(32)
    g = build_graph(ids, 6, seed)
    assert set(g) == set(ids)
    for u, nbrs in g.items():
        assert len(nbrs) == 6 and u not in nbrs
        assert all(u in g[v] for v in nbrs)
    assert g == build_graph(reversed(ids), 6, seed)
    assert g != build_graph(ids, 6, bytes([1]) + bytes(31))
    complete = build_graph(ids[:5], 6, seed)
    assert all(len(n) == 4 for n in complete.values())
    with pytest.raises(SecAggConfigError, match="even"):
        build_graph(ids, 5, seed)
    assert GraphMode("secaggplus") is GraphMode.secaggplus


# ---------------------------------------------------------------- threaded mask accumulation


@pytest.mark.parametrize("bits", [16, 32, 64])
@pytest.mark.parametrize("length", [1, 3, 5, 1_000_003])
def test_accumulate_masks_threaded_is_bit_identical(bits: int, length: int) -> None:
    """Any thread count gives exactly the single-threaded result and the one-by-one sum.

    Each slice's ciphers start at a counter offset (``_ctr_offset``): a wrong offset, a
    cut off a 16-byte block or a lost partial last chunk would change the result.
    """
    dtype = crypto.storage_dtype(bits)
    rng = np.random.default_rng(bits * 7 + length)
    base = rng.integers(0, 2**bits, length, dtype=np.uint64, endpoint=False).astype(dtype)
    seeds = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in range(4)]
    add = [(seeds[0], masks.MaskDomain.self_mask), (seeds[1], masks.MaskDomain.pairwise)]
    subtract = [(s, masks.MaskDomain.pairwise) for s in seeds[2:]]
    expected = base.copy()
    negated = np.zeros(length, dtype=dtype)  # -sum(subtract masks)
    for s, d in add:
        expected = mod_add(expected, masks.expand_mask(s, length, bits, domain=d), bits)
    for s, d in subtract:
        mask = masks.expand_mask(s, length, bits, domain=d)
        expected = mod_sub(expected, mask, bits)
        negated = mod_sub(negated, mask, bits)
    single = masks.accumulate_masks(base.copy(), bits, add=add, subtract=subtract, threads=1)
    assert np.array_equal(single, expected)
    before = base.copy()
    for threads in (1, 2, 3, 7, None):
        got = masks.accumulate_masks(
            base.copy(), bits, add=add, subtract=subtract, threads=threads
        )
        assert got.dtype == dtype and np.array_equal(got, single), threads
        # out = base + masks in the same pass, base untouched
        fresh = np.full(length, 9, dtype=dtype)
        got = masks.accumulate_masks(
            fresh, bits, add=add, subtract=subtract, base=base, threads=threads
        )
        assert got is fresh and np.array_equal(got, expected), threads
        # subtraction only (the server's unmasking)
        got = masks.accumulate_masks(np.zeros_like(base), bits, subtract=subtract, threads=threads)
        assert np.array_equal(got, negated), threads
    assert np.array_equal(base, before)


def test_accumulate_masks_thread_slices_and_argument_checks() -> None:
    # cuts at 64-byte multiples, non-empty, covering everything, at most `parts` slices
    for size, itemsize, parts in [(1, 4, 7), (17, 4, 2), (1_000_003, 4, 3), (1_000_003, 8, 7)]:
        bounds = masks._slice_bounds(size, itemsize, parts)
        assert bounds[0][0] == 0 and bounds[-1][1] == size and len(bounds) <= parts
        assert all(a < b for a, b in bounds)
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(bounds))
        assert all(a * itemsize % 64 == 0 for a, _ in bounds)
    assert len(masks._slice_bounds(1_000_003, 4, 3)) == 3
    assert masks._resolve_threads(None, masks._THREAD_MIN_ELEMENTS - 1, 100) == 1
    assert masks._resolve_threads(None, masks._THREAD_MIN_ELEMENTS, 1) == 1  # too little work
    assert 1 <= masks._resolve_threads(None, 10**6, 39) <= masks._MAX_DEFAULT_THREADS
    assert masks._resolve_threads(3, 1, 1) == 3
    seed = bytes(range(32))
    pair = [(seed, masks.MaskDomain.pairwise)]
    out = np.arange(10, dtype=np.uint32)
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="threads"):
            masks.accumulate_masks(out, 32, add=pair, threads=bad)  # type: ignore[arg-type]
    assert np.array_equal(out, np.arange(10, dtype=np.uint32))  # nothing modified


def _threaded_sum_in_child(queue: object) -> None:
    seeds = [(bytes([i]) * 32, masks.MaskDomain.pairwise) for i in range(3)]
    out = masks.accumulate_masks(np.zeros(1000, np.uint32), 32, add=seeds, threads=3)
    queue.put(int(out.astype(np.uint64).sum()))  # type: ignore[attr-defined]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_accumulate_masks_threads_work_in_a_forked_child() -> None:
    """The parent's pool has no threads in a forked child: a fresh one is made there."""
    import multiprocessing

    seeds = [(bytes([i]) * 32, masks.MaskDomain.pairwise) for i in range(3)]
    expected = masks.accumulate_masks(np.zeros(1000, np.uint32), 32, add=seeds, threads=3)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_threaded_sum_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=30) == int(expected.astype(np.uint64).sum())
    finally:
        child.join(timeout=30)
        if child.is_alive():  # pragma: no cover - only if the child hung
            child.kill()
    assert child.exitcode == 0


@pytest.mark.parametrize(
    "start",
    [2**128 - 3, 2**128 - 1, 2**32 - 2, (7 << 32) | (2**32 - 1), 0],
    ids=["wrap128", "last", "carry32", "carry-into-nonce", "zero"],
)
def test_ctr_offset_matches_openssl_counter(start: int) -> None:
    """Starting at ``_ctr_offset(iv, k)`` equals block ``k`` onwards from ``iv``.

    OpenSSL increments the whole 128-bit big-endian counter block (carrying out of
    the low 32 bits and wrapping at 2**128); the helper must agree, at the wrap too.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(16, 32))
    iv = start.to_bytes(16, "big")
    blocks = 8
    full = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update(bytes(16 * blocks))
    for k in range(blocks + 1):
        shifted = masks._ctr_offset(iv, k)
        assert int.from_bytes(shifted, "big") == (start + k) % 2**128
        tail = Cipher(algorithms.AES(key), modes.CTR(shifted)).encryptor()
        assert tail.update(bytes(16 * (blocks - k))) == full[16 * k :]
    assert masks._ctr_offset(iv, 2**130) == iv  # a multiple of 2**128 is the identity
    with pytest.raises(ValueError):
        masks._ctr_offset(iv[:15], 1)
    # the mask cipher at a block offset continues the mask's keystream
    seed = bytes(range(32))
    mask = masks.expand_mask(seed, 64, 32, domain=masks.MaskDomain.self_mask)
    enc = masks._mask_cipher(seed, masks.MaskDomain.self_mask, 5)
    tail_words = np.frombuffer(enc.update(bytes(4 * 64 - 16 * 5)), dtype=np.uint32)
    assert np.array_equal(tail_words, mask[4 * 5 :])


def test_default_threads_honour_a_cpu_share(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray sets OMP_NUM_THREADS to an actor's num_cpus: one simulated client per CPU must
    # not start a thread per core. Unset or malformed values fall back to the affinity.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert masks._resolve_threads(None, 10**6, 39) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not-a-number")
    assert masks._usable_cores() >= 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = masks._usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores + 5))
    assert masks._usable_cores() == cores


@pytest.mark.parametrize("n", [10, 20, 100, 300, 1000])
def test_derived_thresholds_survive_a_split_view_plus_colluding_neighbours(n: int) -> None:
    # A split view hands the server t shares of both secrets of u iff u's k + 1 - Y honest
    # holders plus its Y corrupt neighbours (in both piles) fill two piles of t:
    # 2t <= k + 1 + Y. Before this bound every size had 2t - k = 2 (two colluders
    # sufficed). Y ~ Hypergeometric(n - D - 1 others, C corrupt, k drawn), bounded here
    # with scipy, independently of the code's own tail: n * P[Y >= 2t - k - 1] <= 2^-41.
    from scipy.stats import hypergeom

    p = derive_params(n, mode="secaggplus", dropout_tolerance=0.2, corrupt_fraction=0.1)
    d, c = int(0.2 * n), max(int(0.1 * n), 1)
    assert (p.max_dropouts, p.max_corrupt) == (d, c)
    k, t = p.degree, p.threshold
    assert 2 * t - k - 1 >= 2  # two colluding neighbours are not enough at any size
    if p.is_complete:
        assert 2 * t > n + c
    elif k > n - d - 1:  # too few others for the hypergeometric: Y <= C decides
        assert 2 * t > k + 1 + c
    else:
        tail = hypergeom.sf(2 * t - k - 2, n - d - 1, c, k)  # P[Y >= 2t - k - 1]
        assert n * tail <= 2.0**-41
        # Correctness kept: n * P[dropped neighbours > k - t] <= 2^-20.
        assert n * hypergeom.sf(k - t, n - 1, d, k) <= 2.0**-20


def test_the_complete_graph_needs_2t_above_n_plus_c() -> None:
    # n = 10, D = 2, C = 1: t = n - D = 8 and 2t = 16 > 11. With D = 4, C = 3 no threshold:
    # t <= 6 for correctness, 2t > 13 for the split view (t >= 7).
    p = derive_params(10, mode="secagg", dropout_tolerance=0.2, corrupt_fraction=0.1)
    assert (p.threshold, p.max_corrupt) == (8, 1)
    with pytest.raises(SecAggConfigError, match="2t > n \\+ C"):
        derive_params(10, mode="secagg", dropout_tolerance=0.4, corrupt_fraction=0.3)
    # Custom parameters: 2t > k + 1 + min(C, k) exactly (n = 6, k = 5, C = 1: t >= 4).
    with pytest.raises(SecAggConfigError, match="4 <= t <= 6"):
        custom_params(6, 5, 3, max_dropouts=1, max_corrupt=1)
    with pytest.raises(SecAggConfigError, match="5 <= t <= 6"):
        custom_params(6, 5, 4, max_dropouts=1, max_corrupt=2)


def test_at_least_one_colluder_is_assumed_in_tiny_cohorts() -> None:
    # floor(0.1 * n) = 0 below 10 clients; the derivation assumes C >= 1 regardless, and a
    # server that states fewer colluders than it derived for is caught on re-derivation.
    for n in (3, 5, 9):
        assert derive_params(n, dropout_tolerance=0.2).max_corrupt == 1
    assert derive_params(5, corrupt_fraction=0.0, min_corrupt=0).max_corrupt == 0
    cfg = derive_params(9, dropout_tolerance=0.2).to_config()
    assert params_from_config(cfg).max_corrupt == 1
    cfg = derive_params(20).to_config()  # C = 2
    with pytest.raises(SecAggConfigError, match="differ"):
        params_from_config({**cfg, "max_corrupt": 1})

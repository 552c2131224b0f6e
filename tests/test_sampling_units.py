"""strategies/sampling.py as a unit: the cohorts are exactly the documented draws.

Keyed mode is checked against a ChaCha20 block function written out here from RFC 8439
§2.3 (itself checked against the RFC's test vector), with the nonce layout the module
docstring promises (block counter 0, then ``stream`` as 4 and ``round`` as 8
little-endian bytes); seeded mode against numpy's ``PCG64(SeedSequence([seed, round,
stream]))``. Cohort sizes are worked by hand. Kills mutants of sampling.py (mutmut,
tests/mutants-accepted.md).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from strategies.sampling import (
    EVALUATE_STREAM,
    TRAIN_STREAM,
    FixedSizeSampler,
    PoissonSampler,
    keyed_round_words,
    round_generator,
)

KEY = bytes(range(32))
MASK = 0xFFFFFFFF


def _rotl(v: int, c: int) -> int:
    return ((v << c) & MASK) | (v >> (32 - c))


def _quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & MASK
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & MASK
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & MASK
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & MASK
    s[b] = _rotl(s[b] ^ s[c], 7)


def _chacha20_block(key: bytes, counter: int, nonce12: bytes) -> bytes:
    """RFC 8439 §2.3: 20 rounds over constants, key, counter, nonce; add; serialise."""
    constants = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
    init = [*constants, *struct.unpack("<8I", key), counter, *struct.unpack("<3I", nonce12)]
    s = list(init)
    for _ in range(10):
        _quarter(s, 0, 4, 8, 12)
        _quarter(s, 1, 5, 9, 13)
        _quarter(s, 2, 6, 10, 14)
        _quarter(s, 3, 7, 11, 15)
        _quarter(s, 0, 5, 10, 15)
        _quarter(s, 1, 6, 11, 12)
        _quarter(s, 2, 7, 8, 13)
        _quarter(s, 3, 4, 9, 14)
    return struct.pack("<16I", *((x + y) & MASK for x, y in zip(s, init, strict=True)))


def _reference_words(key: bytes, server_round: int, stream: int, n: int) -> list[int]:
    nonce12 = struct.pack("<I", stream) + struct.pack("<Q", server_round)
    stream_bytes = b"".join(_chacha20_block(key, i, nonce12) for i in range(-(-8 * n // 64)))
    return [int.from_bytes(stream_bytes[8 * i : 8 * i + 8], "little") for i in range(n)]


def test_reference_block_function_matches_rfc_8439_vector() -> None:
    block = _chacha20_block(bytes(range(32)), 1, bytes.fromhex("000000090000004a00000000"))
    assert block[:32].hex() == ("10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e")


@pytest.mark.parametrize(
    ("server_round", "stream", "n"), [(0, 0, 1), (7, 1, 9), (2**40 + 3, 5, 17)]
)
def test_keyed_words_are_the_chacha20_keystream_for_stream_and_round(
    server_round: int, stream: int, n: int
) -> None:
    words = keyed_round_words(KEY, server_round, stream, n)
    assert words.dtype == np.uint64 and words.shape == (n,)
    assert [int(w) for w in words] == _reference_words(KEY, server_round, stream, n)


def test_keyed_words_accept_the_edges_and_refuse_beyond() -> None:
    top = keyed_round_words(KEY, 2**64 - 1, 2**32 - 1, 2)
    assert [int(w) for w in top] == _reference_words(KEY, 2**64 - 1, 2**32 - 1, 2)
    for bad_round, bad_stream in ((-1, 0), (2**64, 0), (0, -1), (0, 2**32)):
        with pytest.raises(ValueError, match=f"round {bad_round} / stream {bad_stream} out of"):
            keyed_round_words(KEY, bad_round, bad_stream, 1)
    for key in (KEY[:31], KEY + b"x"):
        with pytest.raises(ValueError, match=f"sampling key must be 32 bytes, found {len(key)}"):
            keyed_round_words(key, 1, 0, 1)


def test_round_generator_is_pcg64_of_seed_round_stream() -> None:
    got = round_generator(11, 4, 1).random(5)
    want = np.random.Generator(np.random.PCG64(np.random.SeedSequence([11, 4, 1]))).random(5)
    assert np.array_equal(got, want)
    assert (TRAIN_STREAM, EVALUATE_STREAM) == (0, 1)


@pytest.mark.parametrize(
    ("fraction", "nodes", "size"),
    [(0.01, 10, 1), (0.25, 10, 2), (0.35, 10, 4), (0.5, 3, 2), (1.0, 7, 7), (0.3, 0, 0)],
)
def test_cohort_size_is_max_1_round_fraction_n_capped_at_n(
    fraction: float, nodes: int, size: int
) -> None:
    # round(2.5) = 2 and round(3.5) = 4 (round half to even); 0.01 * 10 rounds to 0 -> 1.
    assert FixedSizeSampler(fraction, seed=0).cohort_size(nodes) == size


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.0000001, 2.0])
def test_fractions_and_rates_outside_0_1_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=f"fraction must lie in \\(0, 1\\], found {bad}"):
        FixedSizeSampler(bad, seed=0)
    with pytest.raises(ValueError, match=f"rate must lie in \\(0, 1\\], found {bad}"):
        PoissonSampler(bad, seed=0)


@pytest.mark.parametrize("key", [KEY[:31], KEY + b"\x00", bytearray(KEY), "k" * 32])
def test_keys_must_be_32_bytes(key: object) -> None:
    message = "sampling key must be 32 bytes from os.urandom (or None: seeded)"
    with pytest.raises(ValueError) as err:
        FixedSizeSampler(0.5, seed=0, key=key)  # type: ignore[arg-type]
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        PoissonSampler(0.5, seed=0, key=key)  # type: ignore[arg-type]
    assert str(err.value) == message


def test_the_key_is_neither_printed_nor_compared() -> None:
    a, b = FixedSizeSampler(0.5, seed=1, key=KEY), FixedSizeSampler(0.5, seed=1, key=KEY[::-1])
    assert "key" not in repr(a) and KEY.hex() not in repr(a) and repr(KEY) not in repr(a)
    assert a == b
    p = PoissonSampler(0.5, seed=1, key=KEY)
    assert "key" not in repr(p) and p == PoissonSampler(0.5, seed=1, key=KEY[::-1])
    assert FixedSizeSampler(1.0, seed=1).key is None and PoissonSampler(1.0, seed=1).key is None


IDS = [2**64 - 1, 5, 2**63 + 9, 12, 40, 2**63 - 1, 3, 77, 1000, 2**40]  # unsorted, uint64


@pytest.mark.parametrize(("server_round", "stream"), [(1, 0), (3, 1)])
def test_keyed_fixed_size_cohort_is_the_k_smallest_labels(server_round: int, stream: int) -> None:
    pool = sorted(IDS)
    words = _reference_words(KEY, server_round, stream, len(pool))
    k = 4  # round(0.4 * 10)
    chosen = sorted(range(len(pool)), key=lambda i: words[i])[:k]
    want = sorted(pool[i] for i in chosen)
    sampler = FixedSizeSampler(0.4, seed=123, stream=stream, key=KEY)
    assert sampler.sample(IDS, server_round) == want
    assert sampler.sample(np.array(IDS, dtype=np.uint64), server_round) == want
    assert sampler.sample([], server_round) == []


def test_seeded_fixed_size_cohort_is_numpys_choice_without_replacement() -> None:
    pool = sorted(IDS)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([123, 6, 1])))
    want = sorted(pool[i] for i in rng.choice(len(pool), size=3, replace=False))
    assert FixedSizeSampler(0.3, seed=123, stream=1).sample(list(reversed(IDS)), 6) == want
    assert FixedSizeSampler(0.3, seed=123).sample([], 6) == []


@pytest.mark.parametrize("rate", [0.05, 0.5, 0.93])
def test_keyed_poisson_keeps_a_node_iff_its_53_bit_uniform_is_below_the_rate(rate: float) -> None:
    pool = sorted(IDS)
    words = _reference_words(KEY, 8, 1, len(pool))
    want = [n for n, w in zip(pool, words, strict=True) if (w >> 11) / 2**53 < rate]
    assert PoissonSampler(rate, seed=5, stream=1, key=KEY).sample(IDS, 8) == want


def test_keyed_poisson_uniform_at_the_threshold() -> None:
    """A node whose 53-bit uniform equals the rate exactly is left out (``u < rate``)."""
    pool = sorted(IDS)
    words = _reference_words(KEY, 2, 0, len(pool))
    u = [(w >> 11) / 2**53 for w in words]
    rate = u[4]  # exactly representable: a multiple of 2**-53 below 1
    want = [n for n, x in zip(pool, u, strict=True) if x < rate]
    assert pool[4] not in want
    assert PoissonSampler(rate, seed=0, key=KEY).sample(IDS, 2) == want


def test_seeded_poisson_uses_the_round_stream_generator() -> None:
    pool = sorted(IDS)
    u = np.random.Generator(np.random.PCG64(np.random.SeedSequence([9, 2, 0]))).random(len(pool))
    want = [n for n, x in zip(pool, u, strict=True) if x < 0.5]
    assert PoissonSampler(0.5, seed=9).sample(list(reversed(IDS)), 2) == want
    assert PoissonSampler(1.0, seed=9, key=KEY).sample(IDS, 2) == pool
    assert PoissonSampler(0.5, seed=9).sample([], 2) == []


def test_seeded_fixed_size_cohorts_never_repeat_a_node() -> None:
    """Without replacement: a full cohort is the whole pool (numpy's draw with
    replacement would repeat one of 10 nodes with probability 1 - 10!/10**10 > 0.999),
    and a half cohort of 40 is 20 distinct nodes, numpy's choice without replacement."""
    pool = sorted(IDS)
    for rnd in range(1, 6):
        assert FixedSizeSampler(1.0, seed=7).sample(IDS, rnd) == pool
    many = list(range(1000, 1040))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, 2, 0])))
    want = sorted(many[i] for i in rng.choice(40, size=20, replace=False))
    got = FixedSizeSampler(0.5, seed=7).sample(many, 2)
    assert got == want and len(set(got)) == 20

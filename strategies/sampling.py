"""Cohort sampling the privacy accountant can describe.

Flower's strategies sample with the global ``random`` module; here every draw comes
from a per-round stream the sampler derives explicitly, so the cohort of any round can
be drawn again (the secure-aggregation driver samples the next round's cohort ahead)
with no RNG state to checkpoint:

* keyed (``key`` given: central and distributed DP with ``privacy.secure_mode=true``,
  the default, see :func:`strategies.factory.build_driver`): the ChaCha20
  keystream of ``cryptography`` under a 256-bit key from ``os.urandom`` that only the
  server process holds, with the nonce ``(stream, round)``. Amplification by sampling
  (Poisson or without replacement) assumes the cohort is secret from whoever the
  guarantee is stated against; a seeded generator lets anyone who knows or guesses the
  seed recompute every cohort. A resumed server draws a new key, so rounds after a
  resume are sampled afresh (independently of the data, as the accountant assumes).
* seeded (``key=None``: ``privacy.secure_mode=false``, or a run whose ε uses no
  amplification by sampling): numpy's PCG64 from ``(seed, round, stream)``;
  reproducible, a resumed run samples what the interrupted one would have. Under central
  or distributed DP it is for experiments only ("not for release").

* :class:`FixedSizeSampler`: exactly ``max(1, round(fraction * N))`` clients without
  replacement (accounted as sampling without replacement).
* :class:`PoissonSampler`: each client independently with probability ``fraction``
  (what ``PoissonSampledDpEvent`` models); the cohort may be empty.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fl_app.privacy.round_event import fixed_cohort_size

__all__ = [
    "CohortSampler",
    "FixedSizeSampler",
    "PoissonSampler",
    "keyed_round_words",
    "round_generator",
]

TRAIN_STREAM = 0
EVALUATE_STREAM = 1
_INV_2_53 = 1.0 / float(1 << 53)


def round_generator(seed: int, server_round: int, stream: int) -> np.random.Generator:
    """An independent generator for one (seed, round, stream) triple (seeded mode)."""
    return np.random.default_rng(np.random.SeedSequence([seed, server_round, stream]))


def keyed_round_words(key: bytes, server_round: int, stream: int, n: int) -> np.ndarray:
    """``n`` uniform 64-bit words of the ChaCha20 keystream for ``(round, stream)``.

    The 16-byte nonce of ``cryptography``'s ChaCha20 is a 4-byte block counter (0 here)
    followed by 12 nonce bytes, ``stream`` (4) and ``round`` (8): streams never overlap.
    """
    if len(key) != 32:
        raise ValueError(f"sampling key must be 32 bytes, found {len(key)}")
    if not (0 <= server_round < 2**64 and 0 <= stream < 2**32):
        raise ValueError(f"round {server_round} / stream {stream} out of range")
    nonce = b"\x00" * 4 + struct.pack("<IQ", stream, server_round)
    enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)), dtype=np.uint64)


def _check_key(key: bytes | None) -> None:
    if key is not None and (not isinstance(key, bytes) or len(key) != 32):
        raise ValueError("sampling key must be 32 bytes from os.urandom (or None: seeded)")


class CohortSampler(Protocol):
    def sample(self, node_ids: Sequence[int], server_round: int) -> list[int]:
        """Return the sampled node ids (sorted)."""
        ...


@dataclass(frozen=True)
class FixedSizeSampler:
    fraction: float
    seed: int
    stream: int = TRAIN_STREAM
    # 32 secret bytes: cohorts from a keystream (never printed or compared).
    key: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], found {self.fraction}")
        _check_key(self.key)

    def cohort_size(self, num_nodes: int) -> int:
        """The one definition the replace-one accountant also counts (round(q*N) in [1, N])."""
        return fixed_cohort_size(self.fraction, num_nodes)

    def sample(self, node_ids: Sequence[int], server_round: int) -> list[int]:
        return self.sample_size(node_ids, server_round, self.cohort_size(len(node_ids)))

    def sample_size(self, node_ids: Sequence[int], server_round: int, size: int) -> list[int]:
        """``min(size, len(node_ids))`` of ``node_ids`` uniformly without replacement (DP-FTRL's
        once-per-tree cap draws the full cohort from the clients still eligible)."""
        # Node ids are unsigned 64-bit (Flower draws them at random): sample positions
        # in the sorted pool, never the ids themselves through a signed numpy dtype.
        pool = sorted(int(n) for n in node_ids)
        if not pool:
            return []
        k = min(int(size), len(pool))
        if self.key is not None:
            # The k smallest of independent uniform 64-bit labels: a uniformly random
            # k-subset (ties, probability < n^2 / 2^65, broken by position).
            words = keyed_round_words(self.key, server_round, self.stream, len(pool))
            chosen = np.argsort(words, kind="stable")[:k]
        else:
            rng = round_generator(self.seed, server_round, self.stream)
            chosen = rng.choice(len(pool), size=k, replace=False)
        return sorted(pool[i] for i in chosen)


@dataclass(frozen=True)
class PoissonSampler:
    rate: float
    seed: int
    stream: int = TRAIN_STREAM
    # 32 secret bytes: cohorts from a keystream (never printed or compared).
    key: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 1:
            raise ValueError(f"rate must lie in (0, 1], found {self.rate}")
        _check_key(self.key)

    def sample(self, node_ids: Sequence[int], server_round: int) -> list[int]:
        pool = sorted(int(n) for n in node_ids)
        if self.key is not None:
            # Uniform on [0, 1) with 53 bits: P(u < rate) = rate to within 2^-53.
            words = keyed_round_words(self.key, server_round, self.stream, len(pool))
            u = (words >> np.uint64(11)).astype(np.float64) * _INV_2_53
        else:
            u = round_generator(self.seed, server_round, self.stream).random(len(pool))
        keep = u < self.rate
        return [n for n, k in zip(pool, keep, strict=True) if k]

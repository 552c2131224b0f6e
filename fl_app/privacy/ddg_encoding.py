"""Distributed DP's encoding: what a client does to its update, the server to the sum.

The mechanism, its parameters and its accounting are described in
:mod:`fl_app.privacy.distributed` (Kairouz, Liu & Steinke, ICML 2021, [KLS]), which
plans each round (:class:`~fl_app.privacy.distributed.DdpPlan`). This module holds the
steps a round runs, pure and separately tested: the randomized Hadamard rotation
(:class:`Rotation`, :func:`fwht`), conditional randomized rounding
(:func:`conditional_round`), the discrete Gaussian sampler of Canonne, Kamath & Steinke
(:func:`sample_discrete_gaussian`), and :class:`DdpRound`, which a client uses to
encode (rotate, scale, round, add its noise share, wrap) and the server to decode the
unmasked sum. Every random bit comes from ChaCha20 (``cryptography``); the rotation
seed is public, the rounding and noise bits are not.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fl_app.privacy.noise import SecureNoise
from fl_app.secagg.crypto import MAX_BITS, MIN_BITS

__all__ = [
    "DdpConfigError",
    "DdpRound",
    "Rotation",
    "conditional_round",
    "fwht",
    "padded_dimension",
    "sample_discrete_gaussian",
]

_ROTATION_LABEL = b"fl-app/ddp/rotation/v1"


class DdpConfigError(ValueError):
    """The distributed-DP parameters cannot work (e.g. too few bits for the cohort)."""


# --------------------------------------------------------------------------- rotation
def padded_dimension(d: int) -> int:
    """``d' = 2^⌈log2 d⌉``: the Hadamard transform needs a power-of-two length."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"dimension must be an int >= 1, found {d!r}")
    return 1 << (d - 1).bit_length()


_BLOCK = 64


@functools.lru_cache(maxsize=1)
def _block_hadamard() -> np.ndarray:
    from scipy.linalg import hadamard

    return hadamard(_BLOCK).astype(np.float64)


def fwht(x: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform of a float64 vector, in place.

    ``H/√n`` with ``H`` the Sylvester-Hadamard matrix; it is symmetric and orthogonal,
    so applying it twice gives back ``x``. ``O(n log n)``: the six innermost butterfly
    levels as one product of 64-blocks with ``H_64`` (BLAS), the rest as numpy passes
    over contiguous halves (scipy only builds the dense matrix).
    """
    n = x.shape[0]
    if x.ndim != 1 or n & (n - 1) or n == 0 or x.dtype != np.float64:
        raise ValueError("fwht needs a 1-d float64 array whose length is a power of two")
    h = 1
    if n >= _BLOCK:
        x[:] = (x.reshape(-1, _BLOCK) @ _block_hadamard()).reshape(-1)
        h = _BLOCK
    while h < n:
        y = x.reshape(-1, 2, h)
        a = y[:, 0, :].copy()
        y[:, 0, :] += y[:, 1, :]
        np.subtract(a, y[:, 1, :], out=y[:, 1, :])
        h *= 2
    x *= 1.0 / math.sqrt(n)
    return x


class Rotation:
    """The round's randomized Hadamard rotation ``x ↦ H·D·pad(x)/√d'``.

    ``D``'s signs come from a ChaCha20 keystream keyed by SHA-256 of the public round
    seed: clients and server derive the same rotation, and no party can pick it.
    """

    def __init__(self, seed: bytes, dim: int) -> None:
        if not isinstance(seed, bytes) or not seed:
            raise ValueError("rotation seed must be non-empty bytes")
        self.dim = int(dim)
        self.padded = padded_dimension(self.dim)
        key = hashlib.sha256(_ROTATION_LABEL + seed).digest()
        stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        bits = np.unpackbits(np.frombuffer(stream.update(bytes(self.padded // 8 + 1)), np.uint8))
        self.signs = 1.0 - 2.0 * bits[: self.padded].astype(np.float64)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Rotate a length-``dim`` vector into a fresh float64 vector of length ``padded``."""
        if x.shape != (self.dim,):
            raise ValueError(f"expected a vector of length {self.dim}, found shape {x.shape}")
        out = np.zeros(self.padded, dtype=np.float64)
        np.multiply(x, self.signs[: self.dim], out=out[: self.dim])
        return fwht(out)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Undo :meth:`forward` (``D·H``) and drop the padding."""
        if y.shape != (self.padded,):
            raise ValueError(f"expected a vector of length {self.padded}, found shape {y.shape}")
        out = fwht(np.array(y, dtype=np.float64))
        out *= self.signs
        return out[: self.dim]


# ------------------------------------------------------------------------- sampling
Uniform = Callable[[int], np.ndarray]
Words = Callable[[int], np.ndarray]


def sample_discrete_gaussian(
    sigma: float, size: int, uniform: Uniform, words: Words | None = None
) -> np.ndarray:
    """``size`` draws of the discrete Gaussian ``N_Z(0, σ²)`` (int64).

    Canonne, Kamath & Steinke (2020), Algorithm 3, vectorised: draw ``Y`` from the
    discrete Laplace with scale ``t = ⌊σ⌋ + 1``, keep it with probability
    ``exp(−(|Y| − σ²/t)²/(2σ²))``. The discrete Laplace is a geometric magnitude
    ``G = ⌊−t·ln U⌋`` (``P(G ≥ k) = e^{−k/t}``) with a fair sign, ``(−, 0)`` rejected.
    ``uniform(n)`` must return ``n`` independent doubles in ``(0, 1]`` from a CSPRNG;
    with ``words(n)`` (64-bit words of the same kind) each candidate costs two words:
    the magnitude's uniform comes from a word's top 53 bits and the sign from its
    lowest bit (bits the uniform does not use, so the two are independent).
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be finite and > 0, found {sigma!r}")
    if size < 0:
        raise ValueError(f"size must be >= 0, found {size}")
    from fl_app.privacy.noise import uniform_from_words

    t = math.floor(sigma) + 1.0
    centre = sigma * sigma / t
    two_var = 2.0 * sigma * sigma
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        want = size - filled
        m = int(want * 1.4) + 64  # acceptance is about 0.75 for sigma >= 1
        if words is not None:
            raw = words(m)
            u_mag = uniform_from_words(raw)
            negative = (raw & np.uint64(1)).astype(bool)
        else:
            u_mag = uniform(m)
            negative = uniform(m) <= 0.5
        magnitude = np.floor(-t * np.log(u_mag))
        keep = ~(negative & (magnitude == 0.0))
        accept = uniform(m) < np.exp(-np.square(magnitude - centre) / two_var)
        keep &= accept
        got = magnitude[keep][:want]
        sign = negative[keep][:want]
        values = got.astype(np.int64)
        np.negative(values, out=values, where=sign)
        out[filled : filled + values.size] = values
        filled += values.size
    return out


def conditional_round(
    x: np.ndarray, bound: float, uniform: Uniform, max_tries: int = 1000
) -> np.ndarray:
    """Unbiased randomized rounding of ``x`` to int64, redrawn until ``‖·‖₂ ≤ bound``.

    [KLS] §4: each draw rounds coordinate ``x_j`` up with probability ``frac(x_j)``;
    a draw passes with probability at least ``1 − β`` when ``bound`` is the second
    branch of :func:`sensitivity`. Raises after ``max_tries`` failures (only a vector
    outside the promised norm can get there).
    """
    low = np.floor(x)
    frac = x - low
    base = low.astype(np.int64)
    limit = bound * bound
    for _ in range(max_tries):
        rounded = base + (uniform(x.size) <= frac)
        if float(np.dot(rounded.astype(np.float64), rounded.astype(np.float64))) <= limit:
            return rounded
    raise DdpConfigError(
        f"conditional rounding failed {max_tries} times: the scaled vector's norm "
        f"{float(np.linalg.norm(x)):.6g} is above what the bound {bound:.6g} allows "
        "(was the update clipped?)"
    )


@dataclass(frozen=True)
class DdpRound:
    """What one round's clients need (sent in the masked-input instruction as JSON)."""

    clip: float
    dim: int
    padded: int
    bits: int
    gamma: float
    bound: float
    share_std: float
    min_survivors: int
    cohort: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DdpRound:
        raw = json.loads(text)
        if not isinstance(raw, dict) or set(raw) != set(cls.__dataclass_fields__):
            raise ValueError(
                f"distributed-DP round parameters need keys {sorted(cls.__dataclass_fields__)}"
            )
        out = cls(**raw)
        for name in ("clip", "gamma", "bound", "share_std"):
            v = getattr(out, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v <= 0
            ):
                raise ValueError(
                    f"distributed-DP '{name}' must be a finite number > 0, found {v!r}"
                )
        for name in ("dim", "padded", "bits", "min_survivors", "cohort"):
            v = getattr(out, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"distributed-DP '{name}' must be an int >= 1, found {v!r}")
        if out.padded != padded_dimension(out.dim) or not MIN_BITS <= out.bits <= MAX_BITS:
            raise ValueError("distributed-DP dimension or bits are inconsistent")
        if out.min_survivors > out.cohort:
            raise ValueError("distributed-DP min_survivors exceeds the cohort")
        return out

    def encode(
        self, update: np.ndarray, seed: bytes, source: SecureNoise | None = None
    ) -> np.ndarray:
        """Client: rotate, scale, round, add this client's noise share; ring vector.

        ``update`` is the flat clipped update (length ``dim``, norm ``<= clip``); the
        result is ``uint32``/``uint64`` (the storage of ``Z_{2^bits}``), length ``padded``.
        """
        from fl_app.secagg.crypto import storage_dtype

        x = np.asarray(update, dtype=np.float64)
        if x.shape != (self.dim,):
            raise ValueError(f"update has {x.size} coordinates, the round expects {self.dim}")
        if not np.all(np.isfinite(x)):
            raise ValueError("update has a non-finite value; refuse to encode")
        norm = float(np.linalg.norm(x))
        if norm > self.clip * (1.0 + 1e-6):
            raise ValueError(
                f"update norm {norm:.6g} exceeds the clip {self.clip:g}: clip before encoding"
            )
        rng = source if source is not None else SecureNoise()
        rotated = Rotation(seed, self.dim).forward(x)
        rotated *= 1.0 / self.gamma
        rounded = conditional_round(rotated, self.bound, rng.uniform)
        rounded += sample_discrete_gaussian(self.share_std, self.padded, rng.uniform, rng.words)
        signed = rounded.view(np.uint64)
        if self.bits < 64:
            signed = signed & np.uint64((1 << self.bits) - 1)
        return signed.astype(storage_dtype(self.bits), copy=False)

    def sum_norm_limit(self, num_contributors: int) -> float:
        """L2 bound on an honest sum of ``num_contributors`` vectors (rounded units).

        Each client's rounded vector has norm ``<= bound`` (conditional rounding redraws
        until it does), so the signal part is at most ``n·bound``. The noise is the sum
        of ``n`` discrete Gaussian shares of parameter ``share_std``, each
        ``share_std``-sub-Gaussian (Canonne, Kamath & Steinke 2020), so the sum is
        sub-Gaussian with ``s² = n·share_std²`` per coordinate and Hsu, Kakade & Zhang
        (2012, Thm. 1 with A = I) give ``P[‖noise‖² > s²(d' + 2√(d'τ) + 2τ)] <= e^-τ``;
        ``τ = 40 ln 2`` makes an honest round fail this check with probability ``<= 2^-40``.
        """
        n = int(num_contributors)
        tau = 40.0 * math.log(2.0)
        d = float(self.padded)
        noise_sq = n * self.share_std**2 * (d + 2.0 * math.sqrt(d * tau) + 2.0 * tau)
        return n * self.bound + math.sqrt(noise_sq)

    def decode(
        self, total: np.ndarray, seed: bytes, *, num_contributors: int | None = None
    ) -> np.ndarray:
        """Server: modular sum -> signed integers -> ``γ``·inverse rotation (float64, ``dim``).

        With ``num_contributors``, a sum whose norm exceeds :meth:`sum_norm_limit`
        raises ``ValueError``: it wrapped, or a client sent a vector no honest encoding
        produces. The caller abandons the round instead of releasing it.
        """
        arr = np.asarray(total)
        if arr.shape != (self.padded,):
            raise ValueError(f"sum has shape {arr.shape}, expected ({self.padded},)")
        if self.bits == 64:
            signed = arr.astype(np.uint64).view(np.int64).astype(np.float64)
        else:
            as_int = arr.astype(np.int64)
            as_int[as_int >= (1 << (self.bits - 1))] -= 1 << self.bits
            signed = as_int.astype(np.float64)
        if num_contributors is not None:
            norm = math.sqrt(float(np.einsum("i,i->", signed, signed)))
            limit = self.sum_norm_limit(num_contributors)
            if not norm <= limit:
                raise ValueError(
                    f"distributed-DP sum has norm {norm:.6g} (rounded units), above the "
                    f"{limit:.6g} that {num_contributors} honest clients can reach"
                )
        signed *= self.gamma
        return Rotation(seed, self.dim).inverse(signed)

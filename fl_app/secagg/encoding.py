"""Fixed-point encoding of bounded real vectors into Z_{2**bits} for masked summation.

Secure aggregation sums integers modulo ``2**bits`` (Bonawitz et al., CCS 2017, §3:
inputs are vectors in ``Z_R``); real-valued updates must be scaled, rounded and mapped
into that ring so that the modular sum of ``n`` encodings decodes to the real sum.
The codec follows the fixed-point step of Kairouz, Liu & Steinke (ICML 2021, "The
Distributed Discrete Gaussian Mechanism for Federated Learning with Secure
Aggregation", §4) with unbiased stochastic rounding, and derives its scale so the
sum can never wrap around.

Derivation (one source of truth; house rule 7 in docs/architecture.md). With
per-coordinate bound ``B`` (``max_abs``; a clipped update of L2 norm ``<= C`` has
every coordinate in ``[-C, C]``, so ``B = C`` is always safe), ``n`` =
``max_contributors`` and a power-of-two scale ``s``:

* one encoded coordinate is ``floor(x*s) + Bernoulli(frac(x*s))`` in
  ``[-(B*s + 1), B*s + 1]``;
* the sum of ``n`` of them stays in the signed range ``(-2**(bits-1), 2**(bits-1))``
  when ``n * (B*s + 1) < 2**(bits-1)``; we require ``B*s + 1 <= M`` with
  ``M = min((2**(bits-1) - 1) // n, 2**53)`` (the cap keeps ``x*s`` exact in float64:
  beyond 2**53 a larger scale adds no resolution);
* ``s`` is the largest power of two with ``B*s <= M - 1``: multiplying by it is exact
  in floating point, so the rounding is exactly unbiased (up to the 2**-53 granularity
  of the uniform draw) and decoding divides exactly.

Resolution criterion: the step ``1/s`` must be at most ``B * 2**-min_precision_bits``
(default 12 bits below the bound), i.e. ``B*s >= 2**12``; otherwise construction
raises :class:`FixedPointConfigError` naming ``bits`` and ``max_contributors``. Bits
available per coordinate are roughly ``bits - 1 - log2(n) - 1``: with ``C = 1`` a
cohort of 10,000 gets ``s = 2**49`` with 64 bits, and ``s = 2**17`` (step 7.6e-6,
17 bits) with 32 bits, which passes the default criterion; 32 bits stop passing at
about 524,000 contributors. Note a coordinate of a d-dimensional clipped update is
typically ``C / sqrt(d)``: raise ``min_precision_bits`` to demand resolution relative
to that instead of to ``B``.

Trust assumptions: the caller clips before encoding (values outside ``[-B, B]`` raise,
never wrap); at most ``max_contributors`` encodings are summed; the rounding
generator is independent of the data (pass a CSPRNG-seeded generator when the
rounding must not leak).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fl_app.secagg.crypto import MAX_BITS, MIN_BITS, storage_dtype

__all__ = [
    "DEFAULT_MIN_PRECISION_BITS",
    "FixedPointCodec",
    "FixedPointConfigError",
    "mod_add",
    "mod_reduce",
    "mod_sub",
    "mod_sum",
]

DEFAULT_MIN_PRECISION_BITS = 12
_MAX_EXACT = 2**53
# Coordinates encoded per step: four float64/bool scratch buffers of 16k entries
# (~400 KiB) stay in L2.
_ENCODE_CHUNK = 1 << 14


class FixedPointConfigError(ValueError):
    """The codec's parameters cannot encode without overflow at useful resolution."""


def _modulus_mask(bits: int, dtype: type[np.unsignedinteger]) -> np.unsignedinteger | None:
    width = 8 * np.dtype(dtype).itemsize
    return None if bits >= width else dtype((1 << bits) - 1)


def mod_reduce(x: np.ndarray, bits: int) -> np.ndarray:
    """Reduce a storage-dtype vector into ``[0, 2**bits)`` in place and return it."""
    mask = _modulus_mask(bits, storage_dtype(bits))
    if mask is not None:
        np.bitwise_and(x, mask, out=x)
    return x


def _check_operands(bits: int, *arrays: np.ndarray) -> type[np.unsignedinteger]:
    dtype = storage_dtype(bits)
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.dtype != dtype:
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(
                f"operands for bits={bits} must be {np.dtype(dtype)} arrays, got {got}"
            )
    return dtype


def mod_add(
    a: np.ndarray, b: np.ndarray, bits: int, *, out: np.ndarray | None = None
) -> np.ndarray:
    """``(a + b) mod 2**bits``; unsigned numpy addition wraps at the storage width."""
    _check_operands(bits, a, b)
    return mod_reduce(np.add(a, b, out=out), bits)


def mod_sub(
    a: np.ndarray, b: np.ndarray, bits: int, *, out: np.ndarray | None = None
) -> np.ndarray:
    """``(a - b) mod 2**bits``."""
    _check_operands(bits, a, b)
    return mod_reduce(np.subtract(a, b, out=out), bits)


def mod_sum(vectors: list[np.ndarray] | tuple[np.ndarray, ...], bits: int) -> np.ndarray:
    """Sum of equal-length vectors mod ``2**bits`` (a fresh array; inputs untouched)."""
    if not vectors:
        raise ValueError("mod_sum needs at least one vector")
    dtype = _check_operands(bits, *vectors)
    total = np.zeros_like(vectors[0], dtype=dtype)
    for v in vectors:
        np.add(total, v, out=total)
    return mod_reduce(total, bits)


@dataclass(frozen=True)
class FixedPointCodec:
    """Stochastic fixed-point codec into ``Z_{2**bits}`` whose sums of ``n`` never wrap.

    Parameters
    ----------
    bits
        Ring size exponent, 8..64 (32 or 64 use the storage width directly).
    max_abs
        ``B``: per-coordinate bound of every encoded value (the clip norm ``C`` is safe).
    max_contributors
        ``n``: the most encodings that are ever summed (the cohort size).
    min_precision_bits
        Required resolution: construction fails unless ``B * scale >= 2**min_precision_bits``.

    Attributes
    ----------
    scale
        ``s``, a power of two; a value ``x`` encodes to about ``x * s``.
    max_encoded
        Largest magnitude of one encoded coordinate (``ceil(B * s)``).
    """

    bits: int
    max_abs: float
    max_contributors: int
    min_precision_bits: int = DEFAULT_MIN_PRECISION_BITS
    scale: float = field(init=False)
    max_encoded: int = field(init=False)

    def __post_init__(self) -> None:
        bits, n, b = self.bits, self.max_contributors, self.max_abs
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise FixedPointConfigError(
                f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}; "
                "use 32 or 64 for SecAgg"
            )
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise FixedPointConfigError(f"max_contributors must be an int >= 1, got {n!r}")
        if not isinstance(b, (int, float)) or not np.isfinite(b) or b <= 0:
            raise FixedPointConfigError(
                f"max_abs must be a finite float > 0 (the clip norm), got {b!r}"
            )
        p = self.min_precision_bits
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 52:
            raise FixedPointConfigError(f"min_precision_bits must be an int in [0, 52], got {p!r}")
        m = min((2 ** (bits - 1) - 1) // n, _MAX_EXACT)
        if m < 2:
            raise FixedPointConfigError(
                f"bits={bits} cannot hold the sum of max_contributors={n} values; "
                "use more bits or a smaller cohort"
            )
        exponent = int(np.floor(np.log2((m - 1) / float(b))))
        while float(b) * 2.0**exponent > m - 1:
            exponent -= 1
        while float(b) * 2.0 ** (exponent + 1) <= m - 1:
            exponent += 1
        scale = 2.0**exponent
        if float(b) * scale < 2.0**p:
            raise FixedPointConfigError(
                f"bits={bits} with max_contributors={n} and max_abs={b} leaves a step of "
                f"{1 / scale:.3g} = max_abs * 2**-{np.log2(b * scale):.1f}, coarser than "
                f"max_abs * 2**-{p}; use bits=64 (or more bits), a smaller cohort, "
                "or lower min_precision_bits"
            )
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "max_encoded", int(np.ceil(float(b) * scale)))

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """Storage dtype: uint32 for ``bits <= 32``, else uint64."""
        return storage_dtype(self.bits)

    @property
    def resolution(self) -> float:
        """Quantisation step ``1/s`` of one coordinate."""
        return 1.0 / self.scale

    def encode(self, x: npt.ArrayLike, rng: np.random.Generator) -> np.ndarray:
        """Encode a real vector with unbiased stochastic rounding.

        ``E[decode(encode(x))] = x`` exactly: ``floor(x*s) + 1`` with probability
        ``frac(x*s)``, else ``floor(x*s)``. Values outside ``[-max_abs, max_abs]`` or
        non-finite values raise ``ValueError`` (clip first); they never wrap.
        """
        # A numpy Generator, or a keystream source with the same random(out=...)
        # (fl_app.privacy.noise.SecureNoise: what clients use).
        if not isinstance(rng, np.random.Generator) and not callable(getattr(rng, "random", None)):
            raise TypeError(f"rng must be a numpy Generator, got {type(rng).__name__}")
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiub":
            raise ValueError(f"encode expects a real array, got dtype {arr.dtype}")
        flat = arr.ravel()
        if flat.size:
            # max and min propagate NaN and expose +-inf: two passes, no temporaries.
            hi, lo = float(flat.max()), float(flat.min())
            if not (np.isfinite(hi) and np.isfinite(lo)):
                raise ValueError("encode got a non-finite value (NaN/inf); refuse to encode")
            peak = max(abs(hi), abs(lo))
            if peak > self.max_abs:
                raise ValueError(
                    f"a value of magnitude {peak:.6g} exceeds max_abs={self.max_abs}; "
                    "clip the update before encoding (values never wrap silently)"
                )
        return self._encode_checked(flat, rng)

    def _encode_checked(self, flat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Stochastic rounding of a checked 1-d array, a cache-sized chunk at a time.

        Per coordinate exactly what the textbook form computes (kept in the tests as the
        reference): ``scaled = x * s`` (exact, ``s`` a power of two), ``low =
        floor(scaled)``, ``up = U < scaled - low`` with ``U = rng.random()`` drawn in
        coordinate order, result ``low + up`` mod ``2**bits``. Working in chunks of
        :data:`_ENCODE_CHUNK` reuses a few small buffers instead of allocating about ten
        full-length float64/int64 temporaries, and draws the same uniform stream.
        """
        out = np.empty(flat.size, dtype=self.dtype)
        # Encoded values satisfy |v| <= max_encoded < 2**(bits-1): they fit the signed
        # type of the storage width, whose two's complement bits are v mod 2**width.
        signed_out = out.view(np.int32 if out.itemsize == 4 else np.int64)
        step = min(_ENCODE_CHUNK, max(flat.size, 1))
        scaled = np.empty(step)
        low = np.empty(step)
        uniform = np.empty(step)
        up = np.empty(step, dtype=bool)
        for start in range(0, flat.size, step):
            stop = min(start + step, flat.size)
            m = stop - start
            sc, lo_, un, upc = scaled[:m], low[:m], uniform[:m], up[:m]
            np.multiply(flat[start:stop], self.scale, out=sc, dtype=np.float64)
            np.floor(sc, out=lo_)
            np.subtract(sc, lo_, out=sc)  # frac(x*s), exact
            rng.random(out=un)
            np.less(un, sc, out=upc)
            np.add(lo_, upc, out=lo_)  # an integer below 2**53: exact
            np.copyto(signed_out[start:stop], lo_, casting="unsafe")
        mask = _modulus_mask(self.bits, self.dtype)
        if mask is not None:
            np.bitwise_and(out, mask, out=out)
        return out

    def _signed_view(self, total: np.ndarray, num_contributors: int) -> np.ndarray:
        """Checked two's-complement value of a modular sum in the storage width's signed type."""
        n = num_contributors
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_contributors:
            raise ValueError(
                f"num_contributors must be an int in [1, max_contributors={self.max_contributors}]"
                f", got {n!r}; a larger sum could have wrapped"
            )
        arr = np.asarray(total)
        if arr.dtype != self.dtype:
            raise ValueError(f"expected a {np.dtype(self.dtype)} sum, got dtype {arr.dtype}")
        width = 8 * arr.itemsize
        if self.bits < width and arr.size and int(arr.max()) >> self.bits:
            raise ValueError(f"sum has elements >= 2**{self.bits}: not reduced mod 2**bits")
        signed_type = np.int32 if width == 32 else np.int64
        if self.bits == width:
            signed = arr.view(signed_type)
        else:
            # Sign-extend from bit bits-1: shift it to the top, arithmetic shift back.
            shift = signed_type(width - self.bits)
            signed = np.left_shift(arr, arr.dtype.type(shift)).view(signed_type)
            np.right_shift(signed, shift, out=signed)
        bound = n * self.max_encoded
        if signed.size and max(int(signed.max()), -int(signed.min())) > bound:
            raise ValueError(
                f"decoded magnitude exceeds {n} * max_encoded: the sum wrapped or includes "
                "more contributors than stated"
            )
        return signed

    def decode_signed(self, total: np.ndarray, num_contributors: int) -> np.ndarray:
        """Signed integer value (int64) of a modular sum of ``num_contributors`` encodings."""
        return self._signed_view(total, num_contributors).astype(np.int64)

    def decode_sum(self, total: np.ndarray, num_contributors: int) -> np.ndarray:
        """Decode a modular sum of ``num_contributors`` encodings into float64.

        Elements ``>= 2**(bits-1)`` are negative (two's complement). Raises if the
        magnitude exceeds what ``num_contributors`` honest encodings can produce.
        """
        signed = self._signed_view(total, num_contributors)
        # One pass: the signed integers (|v| <= n * max_encoded <= 2**53) convert to
        # float64 exactly and dividing by the power-of-two scale is exact.
        return np.divide(signed, self.scale, dtype=np.float64)

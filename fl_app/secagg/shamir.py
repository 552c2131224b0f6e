"""Shamir secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

Secure aggregation (Bonawitz et al., CCS 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", §3 and §4) shares two 32-byte secrets of every
client, the self-mask seed ``b_u`` and the masking private key ``s_u^SK``, with a
``t``-out-of-``m`` scheme (Shamir 1979, "How to Share a Secret", CACM 22(11)).

Field choice: the Mersenne prime ``p = 2**521 - 1`` holds every 32-byte secret (an
integer ``< 2**256``) as a field element without reduction, and every share point
``x = node_id + 1`` of a uint64 node id. A share is one field element, serialised as
:data:`SHARE_BYTES` = 66 big-endian bytes. Because secrets are ``< 2**256`` and the
field has ``2**521`` elements, a reconstruction from inconsistent or corrupted shares
lands outside the secret range with probability ``1 - 2**-265`` and is reported as an
error instead of returning garbage.

Security: the ``t - 1`` random coefficients are drawn uniformly from the field with
rejection sampling from a CSPRNG (``os.urandom`` unless a test injects bytes), so any
``t - 1`` shares are independent of the secret (information-theoretic hiding); ``t``
shares determine it. This module trusts nothing about the shares it is given beyond
their range. Against a faulty or malicious share holder, :func:`reconstruct_verified`
takes a check the true secret passes (a commitment, a public key) and, when the first
``t`` shares fail it, decodes the shares as a Reed-Solomon codeword (Gao 2003: up to
``(m - t) / 2`` bad shares in polynomial time), then tries other ``t``-subsets, fewest
shares left out first (with at most ``m - t`` bad shares some subset succeeds; capped). A holder who
knows its Lagrange coefficient can shift a reconstructed secret by any amount it
chooses (Shamir shares are linear), so without such a check a crafted share would
go unnoticed.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "ShamirError",
    "decode_polynomial",
    "evaluate_polynomial",
    "lagrange_coefficients_at_zero",
    "random_field_element",
    "reconstruct",
    "reconstruct_candidates",
    "reconstruct_int",
    "reconstruct_many",
    "reconstruct_verified",
    "share_from_bytes",
    "share_to_bytes",
    "split",
]

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66
_FIELD_BITS = PRIME.bit_length()
_TOP_BYTE_MASK = (1 << (_FIELD_BITS - 8 * (SHARE_BYTES - 1))) - 1


class ShamirError(ValueError):
    """Bad arguments to split/reconstruct, or shares that do not reconstruct a secret."""


def random_field_element(randbytes: Callable[[int], bytes] = os.urandom) -> int:
    """Draw a uniform element of GF(p) by rejection sampling (no modulo bias)."""
    while True:
        raw = bytearray(randbytes(SHARE_BYTES))
        raw[0] &= _TOP_BYTE_MASK
        value = int.from_bytes(raw, "big")
        if value < PRIME:
            return value


def _check_threshold(threshold: int) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ShamirError(f"threshold must be an int >= 1, got {threshold!r}; pass t >= 1")
    return threshold


def _check_ids(ids: Sequence[int]) -> None:
    seen: set[int] = set()
    for x in ids:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 < x < PRIME:
            raise ShamirError(
                f"share id must be an int in [1, 2**521 - 2], got {x!r}; "
                "share ids are evaluation points and 0 would reveal the secret"
            )
        if x in seen:
            raise ShamirError(f"duplicate share id {x}; every share needs a distinct id")
        seen.add(x)


def evaluate_polynomial(coefficients: Sequence[int], x: int) -> int:
    """Evaluate ``sum(c_i x**i) mod p`` by Horner's rule; ``coefficients[0]`` is the constant."""
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc


def split(
    secret: bytes,
    threshold: int,
    share_ids: Iterable[int],
    *,
    randbytes: Callable[[int], bytes] = os.urandom,
) -> dict[int, int]:
    """Split a 32-byte secret into shares, any ``threshold`` of which reconstruct it.

    Parameters
    ----------
    secret
        Exactly :data:`SECRET_BYTES` bytes (a seed or an X25519 private key).
    threshold
        ``t``: the number of shares needed; ``t - 1`` shares reveal nothing.
    share_ids
        Distinct evaluation points in ``[1, p - 1]`` (the protocol uses ``node_id + 1``).
        There must be at least ``t`` of them.
    randbytes
        CSPRNG for the polynomial coefficients; ``os.urandom`` unless a test injects one.

    Returns
    -------
    dict
        ``share_id -> share`` (a field element; see :func:`share_to_bytes`).
    """
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
        got = len(secret) if isinstance(secret, (bytes, bytearray)) else type(secret).__name__
        raise ShamirError(f"secret must be {SECRET_BYTES} bytes, got {got}")
    t = _check_threshold(threshold)
    ids = list(share_ids)
    _check_ids(ids)
    if len(ids) < t:
        raise ShamirError(
            f"threshold={t} exceeds the number of share ids ({len(ids)}); "
            "lower the threshold or add share holders"
        )
    coefficients = [int.from_bytes(secret, "big")]
    coefficients.extend(random_field_element(randbytes) for _ in range(t - 1))
    return {x: evaluate_polynomial(coefficients, x) for x in ids}


def _batch_inverse(values: Sequence[int]) -> list[int]:
    """Inverses mod p of non-zero field elements with one ``pow`` (Montgomery's trick)."""
    prefix = [1] * (len(values) + 1)
    for i, v in enumerate(values):
        prefix[i + 1] = prefix[i] * v % PRIME
    inv = pow(prefix[-1], -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inv * prefix[i] % PRIME
        inv = inv * values[i] % PRIME
    return out


def _product_mod(values: Sequence[int]) -> int:
    """``prod(values) mod p``, multiplying 8 values at a time exactly (``math.prod`` in C)."""
    acc = 1
    for i in range(0, len(values), 8):
        acc = acc * math.prod(values[i : i + 8]) % PRIME
    return acc


def _lagrange_batch(id_sets: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Lagrange basis values at 0 of several point sets, sharing one modular inversion.

    ``l_i = prod_{j != i} x_j / prod_{j != i} (x_j - x_i)``: numerators from prefix and
    suffix products, denominators from a few exact products of small differences, and
    all denominators of all distinct sets inverted together (:func:`_batch_inverse`).
    A set listed twice (every node of a complete graph is reconstructed from the same
    holders) is computed once. The ids must be distinct and non-zero (every caller
    checks).
    """
    distinct = list(dict.fromkeys(id_sets))
    nums: list[int] = []
    dens: list[int] = []
    for ids in distinct:
        m = len(ids)
        prefix = [1] * (m + 1)
        for i, x in enumerate(ids):
            prefix[i + 1] = prefix[i] * x % PRIME
        suffix = 1
        set_nums = [0] * m
        for i in range(m - 1, -1, -1):
            set_nums[i] = prefix[i] * suffix % PRIME
            suffix = suffix * ids[i] % PRIME
        nums.extend(set_nums)
        dens.extend(_product_mod([xj - xi for xj in ids if xj != xi]) for xi in ids)
    invs = _batch_inverse(dens)
    coefficients: dict[tuple[int, ...], tuple[int, ...]] = {}
    pos = 0
    for ids in distinct:
        end = pos + len(ids)
        coefficients[ids] = tuple(
            n * d % PRIME for n, d in zip(nums[pos:end], invs[pos:end], strict=True)
        )
        pos = end
    return [coefficients[ids] for ids in id_sets]


@lru_cache(maxsize=256)
def _lagrange_cached(ids: tuple[int, ...]) -> tuple[int, ...]:
    return _lagrange_batch([ids])[0]


def lagrange_coefficients_at_zero(share_ids: Sequence[int]) -> tuple[int, ...]:
    """Lagrange basis values at 0 for the given points: ``f(0) = sum(l_i * f(x_i))``.

    Cached per tuple of ids: in a complete-graph round every node's secrets are
    reconstructed from the same surviving holders, so the O(t²) work is done once.
    """
    ids = tuple(share_ids)
    _check_ids(ids)
    return _lagrange_cached(ids)


def _normalise(shares: Mapping[int, int] | Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    items = list(shares.items()) if isinstance(shares, Mapping) else list(shares)
    _check_ids([x for x, _ in items])
    for x, y in items:
        if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < PRIME:
            raise ShamirError(f"share for id {x} is not a field element in [0, p): {y!r}")
    return items


def reconstruct_int(shares: Mapping[int, int] | Iterable[tuple[int, int]], threshold: int) -> int:
    """Interpolate the shared polynomial at 0 from the ``threshold`` smallest share ids.

    Raises :class:`ShamirError` with fewer than ``threshold`` shares, duplicate or zero
    ids, or values outside the field. Extra shares beyond ``threshold`` are not used.
    """
    used = _first_shares(shares, _check_threshold(threshold))
    return _combine(_lagrange_cached(tuple(x for x, _ in used)), used)


def _first_shares(
    shares: Mapping[int, int] | Iterable[tuple[int, int]], t: int
) -> list[tuple[int, int]]:
    """The ``t`` checked shares with the smallest ids (``ShamirError`` with fewer)."""
    items = _normalise(shares)
    if len(items) < t:
        raise ShamirError(
            f"need threshold={t} shares to reconstruct, got {len(items)}; "
            "collect more shares (fewer than t reveal nothing by design)"
        )
    items.sort()
    return items[:t]


def _combine(coefficients: Sequence[int], used: Sequence[tuple[int, int]]) -> int:
    """``Σ c_i·y_i mod p``: the polynomial at 0 from its Lagrange coefficients."""
    return sum(c * y for c, (_, y) in zip(coefficients, used, strict=True)) % PRIME


def _to_secret(value: int) -> bytes:
    if value >> (8 * SECRET_BYTES):
        raise ShamirError(
            "shares do not reconstruct a 32-byte secret: they are inconsistent "
            "(corrupted, from different secrets, or split with a higher threshold)"
        )
    return value.to_bytes(SECRET_BYTES, "big")


def reconstruct(shares: Mapping[int, int] | Iterable[tuple[int, int]], threshold: int) -> bytes:
    """Reconstruct a 32-byte secret split by :func:`split`.

    Raises
    ------
    ShamirError
        Fewer than ``threshold`` shares, duplicate/zero ids, or a result that is not a
        32-byte secret (the shares are inconsistent: wrong threshold or corrupted).
    """
    return _to_secret(reconstruct_int(shares, threshold))


def reconstruct_many(
    share_sets: Sequence[Mapping[int, int] | Iterable[tuple[int, int]]], threshold: int
) -> list[bytes]:
    """:func:`reconstruct` of every share set, with one modular inversion for all of them.

    The server of a sparse-graph round reconstructs one secret per node, each from a
    different set of holders; computing the Lagrange coefficients of all sets together
    replaces a ``pow`` per coefficient with one. Results and errors are those of
    :func:`reconstruct` applied to each set in order (the first failing set raises).
    """
    t = _check_threshold(threshold)
    used_sets = [_first_shares(shares, t) for shares in share_sets]
    coefficient_sets = _lagrange_batch([tuple(x for x, _ in used) for used in used_sets])
    return [
        _to_secret(_combine(cs, used)) for cs, used in zip(coefficient_sets, used_sets, strict=True)
    ]


def reconstruct_candidates(
    share_sets: Sequence[Mapping[int, int]], threshold: int
) -> list[bytes | None]:
    """:func:`reconstruct_many` without raising on a bad set: ``None`` where a set has
    fewer than ``threshold`` shares or its ``threshold`` smallest ids do not reconstruct
    a 32-byte secret (the caller then checks and falls back to :func:`reconstruct_verified`).
    """
    t = _check_threshold(threshold)
    used_sets = [_first_shares(s, t) if len(s) >= t else None for s in share_sets]
    full = [u for u in used_sets if u is not None]
    coefficient_sets = iter(_lagrange_batch([tuple(x for x, _ in used) for used in full]))
    out: list[bytes | None] = []
    for used in used_sets:
        if used is None:
            out.append(None)
            continue
        value = _combine(next(coefficient_sets), used)
        out.append(None if value >> (8 * SECRET_BYTES) else value.to_bytes(SECRET_BYTES, "big"))
    return out


def _value_at(used: Sequence[tuple[int, int]], x: int) -> int:
    """The polynomial through the points ``used`` evaluated at ``x`` (Lagrange form)."""
    xs = [xi for xi, _ in used]
    nums = [_product_mod([x - xj for xj in xs if xj != xi]) for xi in xs]
    dens = _batch_inverse([_product_mod([xi - xj for xj in xs if xj != xi]) for xi in xs])
    return sum(y * n * d for (_, y), n, d in zip(used, nums, dens, strict=True)) % PRIME


def _trim(poly: list[int]) -> list[int]:
    while len(poly) > 1 and poly[-1] == 0:
        poly.pop()
    return poly


def _poly_divmod(num: Sequence[int], den: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(q, r)`` with ``num = q·den + r`` over GF(p); coefficients lowest degree first."""
    rem = [c % PRIME for c in num]
    d = len(den) - 1
    if len(rem) - 1 < d:
        return [0], _trim(rem)
    inv_lead = pow(den[-1], -1, PRIME)
    quot = [0] * (len(rem) - d)
    for i in range(len(rem) - 1, d - 1, -1):
        c = rem[i] * inv_lead % PRIME
        quot[i - d] = c
        if c:
            for j in range(d + 1):
                rem[i - d + j] = (rem[i - d + j] - c * den[j]) % PRIME
    return _trim(quot), _trim(rem[:d] if d else [0])


def _poly_sub_mul(a: Sequence[int], q: Sequence[int], b: Sequence[int]) -> list[int]:
    """``a - q·b`` over GF(p)."""
    out = list(a) + [0] * max(0, len(q) + len(b) - 1 - len(a))
    for i, qi in enumerate(q):
        if qi:
            for j, bj in enumerate(b):
                out[i + j] = (out[i + j] - qi * bj) % PRIME
    return _trim(out)


def decode_polynomial(
    shares: Mapping[int, int] | Iterable[tuple[int, int]], threshold: int
) -> list[int] | None:
    """The degree ``< threshold`` polynomial within ``floor((m - t) / 2)`` of the shares.

    Gao's Reed-Solomon decoder (S. Gao, "A New Algorithm for Decoding Reed-Solomon
    Codes", 2003): interpolate ``g1`` through all ``m`` points, run the extended
    Euclidean algorithm on ``(prod (X - x_i), g1)`` until the remainder's degree drops
    below ``(m + t) / 2``, and divide. Unique decoding: if at most ``(m - t) / 2`` shares
    are wrong, the dealer's polynomial comes back (coefficients lowest degree first);
    ``None`` when no polynomial is that close. O(m²) field operations.
    """
    t = _check_threshold(threshold)
    items = sorted(_normalise(shares))
    m = len(items)
    if m < t:
        return None
    xs = [x for x, _ in items]
    g0 = [1]
    for x in xs:  # g0 = prod (X - x_i)
        g0 = [(-x * g0[0]) % PRIME] + [
            (g0[i - 1] - x * (g0[i] if i < len(g0) else 0)) % PRIME for i in range(1, len(g0) + 1)
        ]
    weights = _batch_inverse([_product_mod([xi - xj for xj in xs if xj != xi]) for xi in xs])
    g1 = [0] * m
    for (xi, yi), wi in zip(items, weights, strict=True):
        c = yi * wi % PRIME
        if not c:
            continue
        q = 0  # synthetic division of g0 by (X - xi), highest coefficient first
        for j in range(m, 0, -1):
            q = (g0[j] + xi * q) % PRIME if j < m else g0[m]
            g1[j - 1] = (g1[j - 1] + c * q) % PRIME
    r0, r1 = g0, _trim(g1)
    v0, v1 = [0], [1]
    while len(r1) - 1 >= (m + t) / 2 and any(r1):
        quot, rem = _poly_divmod(r0, r1)
        r0, r1 = r1, rem
        v0, v1 = v1, _poly_sub_mul(v0, quot, v1)
    if not any(v1):
        return None
    f, rem = _poly_divmod(r1, v1)
    if any(rem) or len(f) > t:
        return None
    return f


def reconstruct_verified(
    shares: Mapping[int, int],
    threshold: int,
    accept: Callable[[bytes], bool],
    *,
    max_subsets: int = 1024,
) -> tuple[bytes, tuple[int, ...]]:
    """The secret whose ``accept(secret)`` holds, from some ``threshold`` of ``shares``.

    Tries the ``threshold`` smallest ids first (what :func:`reconstruct` uses), then
    Reed-Solomon decoding (:func:`decode_polynomial`, up to ``(m - t) / 2`` bad shares),
    then leaves out 1, 2, ... shares at a time (``e`` bad shares cost at most
    ``sum_{j<=e} C(m, j)`` interpolations, capped at ``max_subsets``).

    Returns
    -------
    tuple
        ``(secret, bad_ids)``: the ids whose shares disagree with the polynomial found,
        named only when that is sound (see the comment in the code); empty when the
        first subset passed (the rest are then not examined).

    Raises
    ------
    ShamirError
        Fewer than ``threshold`` shares, or no subset tried passes ``accept``.
    """
    t = _check_threshold(threshold)
    items = sorted(_normalise(shares))
    m = len(items)
    if m < t:
        raise ShamirError(f"need threshold={t} shares to reconstruct, got {m}")
    first = items[:t]
    value = _combine(_lagrange_cached(tuple(x for x, _ in first)), first)
    if not value >> (8 * SECRET_BYTES) and accept(value.to_bytes(SECRET_BYTES, "big")):
        return value.to_bytes(SECRET_BYTES, "big"), ()
    # Up to (m - t) / 2 bad shares: decode directly (polynomial time).
    poly = decode_polynomial(items, t) if m > t else None
    if poly is not None and not poly[0] >> (8 * SECRET_BYTES):
        secret = poly[0].to_bytes(SECRET_BYTES, "big")
        if accept(secret):
            off = [x for x, y in items if evaluate_polynomial(poly, x) != y]
            return secret, tuple(off) if m - len(off) >= 2 * t - 2 else ()
    # More: subsets, fewest shares left out first (exponential: capped).
    tries = 0
    for left_out in range(m - t + 1):
        for skip in itertools.combinations(range(m), left_out):
            tries += 1
            if tries > max_subsets:
                raise ShamirError(
                    f"no {t} of the {m} shares reconstruct an accepted secret within "
                    f"{max_subsets} subsets (too many inconsistent shares)"
                )
            dropped = set(skip)
            used = [item for i, item in enumerate(items) if i not in dropped][:t]
            value = _combine(_lagrange_cached(tuple(x for x, _ in used)), used)
            if value >> (8 * SECRET_BYTES):
                continue
            secret = value.to_bytes(SECRET_BYTES, "big")
            if not accept(secret):
                continue
            if not left_out:
                return secret, ()
            # Name the shares off the polynomial found only when that polynomial is
            # surely the dealer's: it passes through >= 2t - 2 of the shares, and a wrong
            # one that still gives the right f(0) meets at most t - 2 honest shares, so it
            # would need >= t corrupted holders (who could then rebuild secrets anyway).
            # Otherwise colluding holders could frame honest ones; name nobody.
            chosen = {x for x, _ in used}
            off = [x for x, y in items if x not in chosen and _value_at(used, x) != y]
            return secret, tuple(off) if m - len(off) >= 2 * t - 2 else ()
    raise ShamirError(
        f"no {t} of the {m} shares reconstruct an accepted secret (more than {m - t} "
        "inconsistent shares)"
    )


def share_to_bytes(share: int) -> bytes:
    """Serialise a share as :data:`SHARE_BYTES` big-endian bytes."""
    if isinstance(share, bool) or not isinstance(share, int) or not 0 <= share < PRIME:
        raise ShamirError(f"share must be a field element in [0, p), got {share!r}")
    return share.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(raw: bytes) -> int:
    """Parse :func:`share_to_bytes` output, checking its length and range."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != SHARE_BYTES:
        got = len(raw) if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
        raise ShamirError(f"a serialised share is {SHARE_BYTES} bytes, got {got}")
    value = int.from_bytes(raw, "big")
    if value >= PRIME:
        raise ShamirError("serialised share is not a field element (>= p)")
    return value

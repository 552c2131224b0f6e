"""Noise and uniform sources for every DP mechanism: a CSPRNG by default, or seeded.

Every draw goes through a :class:`NoiseSource` the caller built explicitly; nothing
reads a global RNG (Flower's DP wrappers draw from ``np.random``'s global state).

:class:`SeededNoise`
    numpy's PCG64 seeded from ``(seed, *stream)`` via ``SeedSequence``: the same
    config gives the same noise, so runs reproduce and tests are exact. An adversary
    who knows the seed can subtract the noise, so this is for research runs only
    (``privacy.secure_mode=false``: the run is "not for release", see
    :func:`release_status`).
:class:`SecureNoise`
    ``privacy.secure_mode=true`` (the default), and always for local and distributed
    DP and stochastic rounding; also DP-SGD's noise (:meth:`~SecureNoise.standard_normal_f32`)
    and Poisson batches (:meth:`~SecureNoise.words`) in each client. Uniform bits
    from the ChaCha20 keystream of the ``cryptography`` package under a fresh
    256-bit key from ``os.urandom``, turned into standard normals by the Box-Muller
    transform. No maintained library offers a CSPRNG-backed vectorised Gaussian for
    numpy (Opacus relies on ``torchcsprng``, which is not published for current
    torch), so the transform is written here; the bits come from the library cipher,
    never from a hand-rolled generator.

Trust assumptions: both sources produce IEEE doubles, so neither defends against the
floating-point attacks on the Gaussian mechanism of Mironov (2012, "On Significance
of the Least Significant Bits for Differential Privacy", CCS) beyond what rounding to
float32 model weights already blurs. Discrete noise (distributed DP) avoids this.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

if TYPE_CHECKING:
    from fl_app.config.schema import AppConfig

__all__ = [
    "NOT_FOR_RELEASE",
    "NoiseSource",
    "SecureNoise",
    "SeededNoise",
    "noise_source",
    "release_status",
    "seeded_randomness",
]

NOT_FOR_RELEASE = "not for release"

_TWO_PI = 2.0 * math.pi
_INV_2_53 = 1.0 / float(1 << 53)


class NoiseSource(Protocol):
    """Draws independent ``N(0, std²)`` float64 samples."""

    def normal(self, std: float, size: int) -> np.ndarray: ...


def _check_std(std: float, size: int) -> None:
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be finite and >= 0, found {std!r}")
    if size < 0:
        raise ValueError(f"size must be >= 0, found {size}")


class SeededNoise:
    """Reproducible Gaussian noise from PCG64 seeded with ``(seed, *stream)``."""

    def __init__(self, seed: int, stream: Sequence[int] = ()) -> None:
        entropy = [int(seed), *(int(s) for s in stream)]
        if any(e < 0 for e in entropy):
            raise ValueError(f"seed and stream parts must be >= 0, found {entropy}")
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))

    def normal(self, std: float, size: int) -> np.ndarray:
        _check_std(std, size)
        return self._rng.normal(0.0, std, size) if std > 0 else np.zeros(size)


class SecureNoise:
    """Gaussian noise from a ChaCha20 keystream under a fresh OS-random key.

    Each instance owns one key and a running keystream, so successive calls never
    reuse keystream bytes.
    """

    def __init__(self) -> None:
        key = os.urandom(32)
        # cryptography's 16-byte ChaCha20 nonce is a 4-byte little-endian block counter
        # followed by the 12-byte nonce. The counter starts at 0: a random start would
        # make OpenSSL refuse the stream once the counter reaches 2**32, after a random
        # (possibly small) number of bytes. From 0 a stream holds 2**32 blocks (256 GiB),
        # and the key is fresh per instance, so the nonce itself may be fixed.
        nonce = b"\x00" * 4 + os.urandom(12)
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._zeros = b""  # reused input/output buffers of random(out=...)
        self._buf = bytearray()

    def words(self, n: int) -> np.ndarray:
        """``n`` uniform 64-bit words (a read-only view of fresh keystream)."""
        return np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)

    def random(self, size: int | None = None, *, out: np.ndarray | None = None) -> np.ndarray:
        """Doubles uniform on ``[0, 1)`` with 53 random bits, like
        ``numpy.random.Generator.random`` (``size`` or a float64 ``out`` to fill), so
        code written for a numpy generator (stochastic rounding) can take this source."""
        n = int(out.size if out is not None else (size or 0))
        if out is None or out.dtype != np.float64 or not out.flags.c_contiguous or n == 0:
            u = (self.words(n) >> np.uint64(11)).astype(np.float64)
            u *= _INV_2_53
            if out is None:
                return u
            out[...] = u.reshape(out.shape)
            return out
        # The hot path of stochastic rounding (a 16k-coordinate chunk at a time): the
        # same 53-bit values, with the keystream written into a reused buffer
        # (update_into) and converted in place, no temporaries per call.
        words = self._words_into(n)
        np.right_shift(words, np.uint64(11), out=words)
        flat = out.reshape(-1)
        np.copyto(flat, words, casting="unsafe")  # < 2**53: exact
        flat *= _INV_2_53
        return out

    def _words_into(self, n: int) -> np.ndarray:
        """``n`` fresh keystream words in a buffer this instance reuses (writable)."""
        need = 8 * n
        if len(self._zeros) < need:
            self._zeros = bytes(need)
            # update_into wants room for one block beyond the input.
            self._buf = bytearray(need + 64)
        view = memoryview(self._zeros)[:need]
        written = self._stream.update_into(view, self._buf)
        assert written == need
        return np.frombuffer(self._buf, dtype=np.uint64, count=n)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` doubles uniform on (0, 1] with 53 random bits each."""
        return uniform_from_words(self.words(n))

    def standard_normal_f32(self, size: int) -> np.ndarray:
        """``size`` independent ``N(0, 1)`` samples as float32, for float32 tensors.

        Box-Muller with the radius ``sqrt(-2 ln u1)`` computed in float64 from 53-bit
        uniforms, so the tails reach ``8.57`` standard deviations as with
        :meth:`normal`, and the angle from 24-bit uniforms in float32 (the output's
        own precision). numpy's float64 ``cos``/``sin`` dominated the float64 path
        (about 8 ms per million samples against 0.6 ms in float32): this is what
        keeps DP-SGD's per-step noise at or below the cost of ``torch.normal``.
        """
        if size < 0:
            raise ValueError(f"size must be >= 0, found {size}")
        pairs = (size + 1) // 2
        radius = self.uniform(pairs)
        np.log(radius, out=radius)
        radius *= -2.0
        np.sqrt(radius, out=radius)
        r32 = radius.astype(np.float32)
        angle = (self.words32(pairs) >> np.uint32(8)).astype(np.float32)
        angle *= np.float32(_TWO_PI / float(1 << 24))
        out = np.empty(2 * pairs, dtype=np.float32)
        np.cos(angle, out=out[:pairs])
        np.sin(angle, out=out[pairs:])
        out[:pairs] *= r32
        out[pairs:] *= r32
        return out[:size]

    def words32(self, n: int) -> np.ndarray:
        """``n`` uniform 32-bit words (a read-only view of fresh keystream)."""
        return np.frombuffer(self._stream.update(bytes(4 * n)), dtype=np.uint32)

    def normal(self, std: float, size: int) -> np.ndarray:
        _check_std(std, size)
        if size == 0 or std == 0:
            return np.zeros(size)
        pairs = (size + 1) // 2
        u1 = self.uniform(pairs)
        u2 = self.uniform(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = _TWO_PI * u2
        out = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]
        return out * std


def uniform_from_words(words: np.ndarray) -> np.ndarray:
    """Doubles uniform on (0, 1] from the top 53 bits of each 64-bit word."""
    out = (words >> np.uint64(11)).astype(np.float64)
    out += 1.0
    out *= _INV_2_53
    return out


def noise_source(secure: bool, seed: int, stream: Sequence[int] = ()) -> NoiseSource:
    """A :class:`SecureNoise` if ``secure`` else a :class:`SeededNoise` for ``(seed, *stream)``."""
    return SecureNoise() if secure else SeededNoise(seed, stream)


def seeded_randomness(cfg: AppConfig) -> list[str]:
    """Why a run's DP guarantee fails against whoever knows the seed (empty: it does not).

    With ``privacy.secure_mode=false`` (the opt-in for reproducible experiments) the
    draws below come from generators seeded by the config; a run with any of them is
    "not for release": ``summary.json`` and the model card say so, and a public export
    is refused. Local DP's and distributed DP's noise and the rounding under secure
    aggregation are drawn in the clients from OS-keyed keystreams in every mode.
    """
    p = cfg.privacy
    if p.secure_mode:
        return []
    mode = p.mode.value
    reasons: list[str] = []
    if mode == "central":
        reasons.append(
            "central DP noise was drawn from a generator seeded by the config: whoever "
            "knows or guesses the seed can regenerate and subtract it"
        )
    if p.record_level:
        reasons.append(
            "DP-SGD noise and record batches were drawn from generators seeded by the "
            "config, round and partition: the server can regenerate every client's noise"
        )
    sampled = cfg.strategy.sampling.value == "poisson" or cfg.strategy.fraction_train < 1
    if mode in ("central", "distributed") and sampled:
        reasons.append(
            "client sampling was seeded by the config: epsilon's amplification by sampling "
            "assumes cohorts nobody can recompute"
        )
    return reasons


def release_status(cfg: AppConfig) -> dict[str, Any]:
    """The ``release`` entry of ``summary.json`` and the model card.

    ``{"for_release": bool, "status": "for release" | "not for release", "reasons":
    [...]}``: ``reasons`` lists :func:`seeded_randomness` and the fix.
    """
    reasons = seeded_randomness(cfg)
    if not reasons:
        return {"for_release": True, "status": "for release", "reasons": []}
    return {
        "for_release": False,
        "status": NOT_FOR_RELEASE,
        "reasons": [
            *reasons,
            "privacy.secure_mode=false (seeded, reproducible randomness) was chosen for "
            "this run; rerun with privacy.secure_mode=true (the default) to release a model",
        ],
    }

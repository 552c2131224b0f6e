"""Compressed updates (``share.compression``; docs/compression.md).

A pure core (numpy and the standard library) shared by the client, which compresses its
update Δ right after forming it (before clip, noise, encode and mask), and the server,
which sizes the round's vectors by the compressed length and scatters the aggregate
back into the model's shape.

**random-k** keeps ``k = ceil(ratio * d)`` of the ``d`` shared coordinates. The
coordinates are a *public* function of the run key (a per-run uuid every client and the
server already hold) and the round: ``SHA-256("fl-app/randk/v1" | run key | round)``
seeds a PCG64 generator that draws ``k`` distinct indices. Every client of a round
therefore keeps the same coordinates, so the short vectors add up coordinate by
coordinate: secure aggregation masks and sums them, distributed DP encodes and noises
them, and the server scatters the sum into the full vector (coordinates not kept get a
zero update this round). The mask depends on no data and on no secret (not the run
seed, which may draw DP noise), so publishing it releases nothing.

No ``d/k`` rescaling: the kept coordinates carry the clients' exact values (the
"random-k without rescaling" of Stich et al., NeurIPS 2018, which is biased towards zero
but has a variance no larger than Δ's). Rescaling by ``d/k`` would make the estimate
unbiased but multiply the sensitivity, hence the noise, by ``d/k``.

Clipping and noise act on the short vector: it is what leaves the site, and its L2 norm
is at most Δ's, so clipping it to ``C`` bounds each client's contribution to the sum by
``C`` and a Gaussian of std ``z * C`` on the ``k`` kept coordinates gives the same
guarantee as on ``d`` (the scattered zeros carry no information).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["COMPRESSED_KEY", "RandK", "compressed_length", "randk_coordinates"]

# The one array a compressed update carries (its name in the reply's ArrayRecord).
COMPRESSED_KEY = "compressed"
_RANDK_TAG = b"fl-app/randk/v1"


def compressed_length(dimension: int, ratio: float) -> int:
    """``k = ceil(ratio * d)``, at least 1 and at most ``d``."""
    if dimension < 1:
        raise ValueError(f"dimension must be >= 1, got {dimension}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio!r}")
    return min(dimension, max(1, math.ceil(ratio * dimension)))


def randk_coordinates(run_key: str, rnd: int, dimension: int, k: int) -> np.ndarray:
    """The round's public coordinates: ``k`` distinct indices in ``[0, d)``, ascending."""
    digest = hashlib.sha256(
        _RANDK_TAG + b"|" + run_key.encode() + b"|" + str(int(rnd)).encode()
    ).digest()
    generator = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "big")))
    picked = generator.choice(dimension, size=k, replace=False)
    return np.sort(picked.astype(np.int64))


def total_size(template: Mapping[str, np.ndarray]) -> int:
    """How many coordinates ``template``'s arrays hold together."""
    return int(sum(int(np.asarray(a).size) for a in template.values()))


def wire_dtype(template: Mapping[str, np.ndarray]) -> np.dtype:
    """The dtype a compressed vector of ``template`` travels in (its arrays' common type)."""
    return np.result_type(*(np.asarray(a).dtype for a in template.values()))


def flatten(update: Mapping[str, np.ndarray]) -> np.ndarray:
    """``update``'s arrays, raveled in their order, as one float64 vector."""
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in update.values()])


def unflatten(flat: np.ndarray, model: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``flat`` cut into ``model``'s shapes and dtypes (the inverse of :func:`flatten`)."""
    out: dict[str, np.ndarray] = {}
    pos = 0
    for name, a in model.items():
        arr = np.asarray(a)
        out[name] = flat[pos : pos + arr.size].reshape(arr.shape).astype(arr.dtype)
        pos += arr.size
    if pos != flat.size:
        raise ValueError(f"a vector of {flat.size} coordinates does not fill a model of {pos}")
    return out


@dataclass(frozen=True)
class RandK:
    """random-k with the public per-round mask of the module doc."""

    run_key: str
    ratio: float

    def coordinates(self, rnd: int, dimension: int) -> np.ndarray:
        k = compressed_length(dimension, self.ratio)
        return randk_coordinates(self.run_key, rnd, dimension, k)

    def compress(self, rnd: int, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The kept coordinates of ``update`` flattened in its array order."""
        flat = np.concatenate([np.asarray(a).ravel() for a in update.values()])
        idx = self.coordinates(rnd, int(flat.size))
        return {COMPRESSED_KEY: flat[idx].astype(wire_dtype(update))}

    def wire_template(self, rnd: int, model: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Zeros shaped as a compressed update of ``model`` (for shape checks and layouts)."""
        k = compressed_length(total_size(model), self.ratio)
        return {COMPRESSED_KEY: np.zeros(k, dtype=wire_dtype(model))}

    def decompress(
        self, rnd: int, short: Mapping[str, np.ndarray], model: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Scatter ``short`` into zeros shaped as ``model`` (unsent coordinates: 0)."""
        if list(short) != [COMPRESSED_KEY]:
            raise ValueError(
                f"a compressed update holds only {COMPRESSED_KEY!r}, got {list(short)}"
            )
        d = total_size(model)
        idx = self.coordinates(rnd, d)
        values = np.asarray(short[COMPRESSED_KEY])
        if values.shape != idx.shape:
            raise ValueError(f"compressed update has shape {values.shape}, expected {idx.shape}")
        full = np.zeros(d, dtype=np.float64)
        full[idx] = values
        return unflatten(full, model)

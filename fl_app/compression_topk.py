"""top-k with client-side error feedback (``share.compression=topk``; docs/compression.md).

A pure core (numpy only) shared by the client, which picks what it sends, and the server,
which scatters each reply back into the model's shape *before* aggregation.

Each round a client forms ``a = Δ + e`` (its update plus the residual ``e`` it kept from
earlier rounds, flattened over the shared layers in their array order), sends the ``k``
coordinates of largest ``|a|`` as ``(indices, values)``, and keeps ``e ← a − topk(a)``
(error feedback, Stich et al., NeurIPS 2018; Karimireddy et al., ICML 2019): what it did
not send this round is added to a later round's update instead of being lost. The
residual never leaves the site (:mod:`fl_app.client.error_feedback` persists it).

The support (which coordinates are largest) depends on the data and differs per client,
so the replies cannot be summed coordinate by coordinate under secure aggregation, and
under local or distributed DP the support would be an un-noised function of the data.
top-k is therefore only allowed where the server sees each update individually anyway
(``privacy.mode`` ``none`` or ``central`` without secure aggregation; validate_share): the
server scatters each reply into a full ``d``-vector and aggregates those exactly as it
would uncompressed ones. Clipping acts on the ``k`` values sent, and a scattered vector
has the norm of its values, so central DP's sensitivity stays the clip norm ``C``.

Ties in ``|a|`` are broken towards the lower index, so the choice is a deterministic
function of ``a`` (no randomness to seed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fl_app.compression import compressed_length, flatten, unflatten, wire_dtype

__all__ = ["INDICES_KEY", "VALUES_KEY", "TopK", "flatten", "topk_indices", "unflatten"]

# The two arrays a top-k update carries (their names in the reply's ArrayRecord).
INDICES_KEY = "indices"
VALUES_KEY = "values"


def topk_indices(flat: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` coordinates of largest magnitude, ascending (ties: the lower index), as
    int32: 4 bytes per index on the wire, enough for any model below 2³¹ coordinates."""
    if flat.size > np.iinfo(np.int32).max:
        raise ValueError(f"top-k indexes at most 2**31 - 1 coordinates, got {flat.size}")
    order = np.argsort(-np.abs(flat), kind="stable")
    return np.sort(order[:k]).astype(np.int32)


@dataclass(frozen=True)
class TopK:
    """top-k at ``ratio`` (``k = ceil(ratio · d)``) with the error feedback of the module doc."""

    ratio: float

    def compress(
        self, update: Mapping[str, np.ndarray], residual: np.ndarray | None
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``({indices, values}, new residual)`` for ``update`` and the kept ``residual``
        (``None``: a site's first round, a zero residual)."""
        acc = flatten(update)
        if residual is not None:
            if residual.shape != acc.shape:
                raise ValueError(f"residual has shape {residual.shape}, the update {acc.shape}")
            acc = acc + residual
        idx = topk_indices(acc, compressed_length(int(acc.size), self.ratio))
        left = acc.copy()
        left[idx] = 0.0
        wire = {INDICES_KEY: idx, VALUES_KEY: acc[idx].astype(wire_dtype(update))}
        return wire, left

    def wire_template(self, model: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Zeros shaped as a top-k update of ``model`` (what a reply must match)."""
        d = int(sum(int(np.asarray(a).size) for a in model.values()))
        k = compressed_length(d, self.ratio)
        return {
            INDICES_KEY: np.zeros(k, dtype=np.int32),
            VALUES_KEY: np.zeros(k, dtype=wire_dtype(model)),
        }

    def decompress(
        self, short: Mapping[str, np.ndarray], model: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Scatter one reply into zeros shaped as ``model``; refuses indices out of range
        or repeated (a repeated index would let a reply's scattered norm differ from its
        values' norm, the one the clip bounds)."""
        if sorted(short) != sorted([INDICES_KEY, VALUES_KEY]):
            raise ValueError(
                f"a top-k update holds {INDICES_KEY!r} and {VALUES_KEY!r}, got {sorted(short)}"
            )
        template = self.wire_template(model)
        idx = np.asarray(short[INDICES_KEY])
        values = np.asarray(short[VALUES_KEY])
        if idx.shape != template[INDICES_KEY].shape or values.shape != idx.shape:
            raise ValueError(
                f"top-k update has shapes {idx.shape}/{values.shape}, expected "
                f"{template[INDICES_KEY].shape}"
            )
        d = int(sum(int(np.asarray(a).size) for a in model.values()))
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= d):
            raise ValueError(f"top-k indices must lie in [0, {d})")
        if np.unique(idx).size != idx.size:
            raise ValueError("top-k indices repeat a coordinate")
        full = np.zeros(d, dtype=np.float64)
        full[idx] = values
        return unflatten(full, model)

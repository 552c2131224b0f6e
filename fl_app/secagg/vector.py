"""What one client puts into the masked sum, and how the server reads the sum back.

Secure aggregation (Bonawitz et al., CCS 2017) reveals only ``Σ_u x_u`` of the clients'
ring vectors. To let the server compute a *weighted* mean and the round's training
metrics without learning any client's weight or metrics, every client appends them to
its update as extra coordinates (docs/architecture.md, Secure aggregation: "weighted
averaging without leaking weights"); the server learns only their sums.

Layout of ``x_u`` (length ``num_params + len(EXTRAS)``), before fixed-point encoding:

* ``w·Δ`` flattened in the global model's array order (``Δ`` already clipped to L2
  norm ``<= C``, so every coordinate of ``w·Δ`` lies in ``[-C, C]``);
* ``w·C`` (the weight, scaled into the same range so one codec serves all coordinates);
* ``b·C`` with ``b`` adaptive clipping's "unclipped" bit (0 unless the round asks for it);
* ``w·min(loss, LOSS_CAP)/LOSS_CAP·C`` (training loss, capped so it is bounded);
* ``w·accuracy·C``.

Weights: ``w = min(num_examples, max_weight) / max_weight ∈ (0, 1]`` for example-weighted
aggregation (a client with more than ``max_weight`` examples counts as ``max_weight``:
the bound keeps each coordinate within ``[-C, C]``), ``w = 1`` for uniform weighting
(central DP, whose sensitivity analysis needs unit weights). The server recovers
``Σ w_u Δ_u``, ``Σ w_u``, ``Σ b_u``, ``Σ w_u·loss_u`` and ``Σ w_u·acc_u``.

Codec: :func:`round_codec` derives the :class:`~fl_app.secagg.encoding.FixedPointCodec`
from ``(bits, C, cohort size)`` on both sides (one source of truth), with a small
relative slack on ``C`` because float32 clipping may overshoot the bound by an ulp.

Nothing here imports torch or flwr: it runs in the key-exchange ClientApp processes
and on the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fl_app.secagg.encoding import FixedPointCodec

__all__ = [
    "BOUND_SLACK",
    "EXTRAS",
    "LOSS_CAP",
    "DecodedSum",
    "VectorLayout",
    "client_weight",
    "pack_ids",
    "round_codec",
    "unpack_ids",
]

EXTRAS = ("weight", "unclipped", "loss", "accuracy")
# Training losses above this are reported as this (only the masked sum is learnt).
LOSS_CAP = 100.0
# The codec's per-coordinate bound is C·BOUND_SLACK: clipping in float32 can exceed C
# by ~1e-7 relative; 2**-10 costs a negligible 0.1% of resolution.
BOUND_SLACK = 1.0 + 2.0**-10


def pack_ids(ids: Sequence[int]) -> bytes:
    """Node ids (uint64, possibly >= 2**63) as 8-byte big-endian words.

    Flower's ConfigRecord integers are signed 64-bit, so ids travel as bytes.
    """
    return np.asarray([int(i) for i in ids], dtype=">u8").tobytes()


def unpack_ids(raw: object, name: str = "node ids") -> list[int]:
    """Inverse of :func:`pack_ids`; ``ValueError`` names ``name`` on malformed input."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) % 8:
        raise ValueError(f"{name} must be bytes holding 8-byte ids")
    return [int(v) for v in np.frombuffer(bytes(raw), dtype=">u8")]


def round_codec(bits: int, bound: float, max_contributors: int) -> FixedPointCodec:
    """The codec of one round: coordinates in ``[-bound, bound]``, sums of ``max_contributors``."""
    if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
        raise ValueError(f"encoding bound (the clip norm) must be finite and > 0, got {bound!r}")
    return FixedPointCodec(
        bits=bits, max_abs=float(bound) * BOUND_SLACK, max_contributors=max_contributors
    )


def client_weight(weighting: str, num_examples: float, max_weight: float) -> float:
    """``w`` of a client (see the module doc); raises on an unknown weighting."""
    if weighting == "uniform":
        return 1.0
    if weighting != "examples":
        raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
    if not (math.isfinite(max_weight) and max_weight > 0):
        raise ValueError(f"max_weight must be finite and > 0, got {max_weight!r}")
    if not (math.isfinite(num_examples) and num_examples > 0):
        raise ValueError(f"num_examples must be finite and > 0, got {num_examples!r}")
    return min(float(num_examples), float(max_weight)) / float(max_weight)


@dataclass(frozen=True)
class DecodedSum:
    """The decoded masked sum: ``Σ w·Δ`` by array name and the summed extras."""

    update: dict[str, np.ndarray]
    weight: float
    unclipped: float
    loss: float
    accuracy: float


@dataclass(frozen=True)
class VectorLayout:
    """Array names, shapes and dtypes of the model, in the order they are flattened."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> VectorLayout:
        return cls(
            tuple(arrays),
            tuple(tuple(int(s) for s in a.shape) for a in arrays.values()),
            tuple(str(a.dtype) for a in arrays.values()),
        )

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def length(self) -> int:
        """Length of the masked vector: parameters plus :data:`EXTRAS`."""
        return self.num_params + len(EXTRAS)

    def flatten_input(
        self,
        update: Mapping[str, np.ndarray],
        *,
        weight: float,
        bound: float,
        unclipped: float,
        loss: float,
        accuracy: float,
    ) -> np.ndarray:
        """The float64 input ``x_u`` of the module doc (before encoding)."""
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight must lie in (0, 1], got {weight!r}")
        if unclipped not in (0.0, 1.0):
            raise ValueError(f"unclipped must be 0 or 1, got {unclipped!r}")
        loss = float(loss) if math.isfinite(loss) else LOSS_CAP
        accuracy = float(accuracy) if math.isfinite(accuracy) else 0.0
        out = np.empty(self.length, dtype=np.float64)
        pos = self._fill(update, out, weight)
        out[pos:] = (
            weight * bound,
            unclipped * bound,
            weight * min(max(loss, 0.0), LOSS_CAP) / LOSS_CAP * bound,
            weight * min(max(accuracy, 0.0), 1.0) * bound,
        )
        return out

    def flatten_params(self, update: Mapping[str, np.ndarray]) -> np.ndarray:
        """The model's arrays as one float64 vector (no extras; distributed DP)."""
        out = np.empty(self.num_params, dtype=np.float64)
        self._fill(update, out, 1.0)
        return out

    def _fill(self, update: Mapping[str, np.ndarray], out: np.ndarray, weight: float) -> int:
        """Write ``weight·Δ`` flattened in model order into ``out``; return the end index."""
        if list(update) != list(self.names):
            raise ValueError("update arrays differ from the model's (names or order)")
        pos = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            arr = np.asarray(update[name])
            if tuple(arr.shape) != shape:
                raise ValueError(f"array '{name}' has shape {arr.shape}, expected {shape}")
            size = arr.size
            np.multiply(arr.reshape(-1), weight, out=out[pos : pos + size], casting="unsafe")
            pos += size
        return pos

    def split_params(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Inverse of :meth:`flatten_params` (float64 arrays)."""
        if flat.shape != (self.num_params,):
            raise ValueError(f"vector has shape {flat.shape}, expected ({self.num_params},)")
        out: dict[str, np.ndarray] = {}
        pos = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = math.prod(shape)
            out[name] = flat[pos : pos + size].reshape(shape)
            pos += size
        return out

    def split_sum(self, decoded: np.ndarray, bound: float) -> DecodedSum:
        """Split a decoded (float64) sum into ``Σ w·Δ`` arrays and the summed extras."""
        if decoded.shape != (self.length,):
            raise ValueError(f"decoded sum has shape {decoded.shape}, expected ({self.length},)")
        n = self.num_params
        update = self.split_params(decoded[:n])
        w, b, loss, acc = (float(v) / bound for v in decoded[n:])
        return DecodedSum(update, w, b, loss * LOSS_CAP, acc)

"""Bit-packing of ring vectors, and payload sizes, for the masked-input upload.

Elements of ``Z_{2^bits}`` are stored in ``uint32``/``uint64`` for arithmetic
(:func:`fl_app.secagg.crypto.storage_dtype`); on the wire a client sends exactly
``bits`` bits per coordinate, so ``secagg.bits`` is a real bandwidth knob (16 bits
halve a 32-bit upload). numpy has no arbitrary-width packer; this one uses
``packbits``/``unpackbits`` (vectorised, ~``bits`` bytes of scratch per coordinate).

Unpacking is strict: the byte length must be exact and the padding bits zero, so one
vector has one encoding (a malformed upload is rejected, never reinterpreted).

Nothing here imports torch or flwr's records beyond what callers pass in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fl_app.secagg.crypto import storage_dtype

__all__ = ["pack_ring", "packed_bytes", "payload_bytes", "unpack_ring", "wire_packed"]


def wire_packed(bits: int) -> bool:
    """Whether vectors of ``Z_{2^bits}`` travel bit-packed (narrower than their storage)."""
    return bits < 8 * np.dtype(storage_dtype(bits)).itemsize


def packed_bytes(length: int, bits: int) -> int:
    """Bytes of a packed vector of ``length`` coordinates."""
    return -(-length * bits // 8)


def pack_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """``uint8`` array holding the low ``bits`` bits of every coordinate, big-endian."""
    dtype = storage_dtype(bits)
    if values.dtype != dtype or values.ndim != 1:
        raise ValueError(f"pack_ring expects a 1-d {np.dtype(dtype)} vector")
    width = 8 * np.dtype(dtype).itemsize
    big = values.astype(np.dtype(dtype).newbyteorder(">"), copy=False).view(np.uint8)
    if bits % 8 == 0:
        return np.ascontiguousarray(big.reshape(-1, width // 8)[:, (width - bits) // 8 :]).ravel()
    bit_rows = np.unpackbits(big).reshape(-1, width)[:, width - bits :]
    return np.packbits(bit_rows.ravel())


def unpack_ring(raw: np.ndarray, length: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_ring`; ``ValueError`` on a wrong size or non-zero padding."""
    dtype = storage_dtype(bits)
    width = 8 * np.dtype(dtype).itemsize
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size != packed_bytes(length, bits):
        raise ValueError(
            f"packed vector must be {packed_bytes(length, bits)} uint8 bytes for "
            f"{length} coordinates of {bits} bits, found {raw.dtype}[{raw.size}]"
        )
    if bits % 8 == 0:
        rows = np.zeros((length, width // 8), dtype=np.uint8)
        rows[:, (width - bits) // 8 :] = raw.reshape(length, bits // 8)
    else:
        bit_list = np.unpackbits(raw)
        if bit_list[length * bits :].any():
            raise ValueError("packed vector has non-zero padding bits")
        bit_rows = np.zeros((length, width), dtype=np.uint8)
        bit_rows[:, width - bits :] = bit_list[: length * bits].reshape(length, bits)
        rows = np.packbits(bit_rows, axis=1)
    big = rows.ravel().view(np.dtype(dtype).newbyteorder(">"))
    return big.astype(dtype)


def payload_bytes(content: Any) -> int:
    """Payload bytes of a Flower ``RecordDict``: array data, byte/str values, 8 per scalar.

    Protocol framing (protobuf, gRPC, TLS) is not counted; it is the same with or
    without secure aggregation up to a few bytes per field.
    """
    total = 0
    for record in content.values():
        if hasattr(record, "keys") and hasattr(record, "values"):
            for value in record.values():
                total += _value_bytes(value)
    return total


def _value_bytes(value: Any) -> int:
    data = getattr(value, "data", None)
    if isinstance(data, (bytes, bytearray)):
        return len(data)
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, Mapping):
        return sum(_value_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_value_bytes(v) for v in value)
    return 8

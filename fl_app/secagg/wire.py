"""The secure-aggregation wire format, shared by the client stages and the server.

Under ``secagg.mode != off`` (:mod:`strategies.secagg`, :mod:`fl_app.secagg.client`) the
train stage becomes four ``train`` messages per client, each with ``fl-app.secagg-stage``
(1-4) in ``config``. Node ids travel as 8-byte big-endian words (``bytes``: ConfigRecord
integers are signed 64-bit, node ids are uint64). Replies carry ``metrics`` with only
``server-round`` and ``fl-app.secagg-stage``, plus the stage payload:
    1 advertise   instruction ``config``: ``fl-app.secagg.context`` (bytes),
                  ``fl-app.secagg.params`` (JSON of SecAggParams), ``.bits``,
                  ``.vector-length``, ``.cohort`` (ids);
                  reply ``secagg`` ConfigRecord: ``c-pk``, ``s-pk`` (32 bytes each)
    2 share keys  instruction: ``.nodes`` (ids), ``.keys`` (64 bytes per node);
                  reply ``secagg``: ``nodes`` (recipients), ``ciphertexts`` (concatenated)
    3 masked input instruction: ``arrays`` + the usual train ``config`` plus ``.nodes``
                  (senders), ``.ciphertexts``, ``.bound`` (encoding bound C),
                  ``.weighting``, ``.max-weight``;
                  reply ``masked`` ArrayRecord: one uint32/uint64 vector ``y``
    4 unmask      instruction: ``.survivors``, ``.dropouts`` (ids);
                  reply ``secagg``: ``self-mask-nodes``, ``self-mask-shares``,
                  ``key-nodes``, ``key-shares`` (66-byte shares, concatenated)

The record and key names below, as module constants (one place, so the server's
ingestion checks and the client's reply builder cannot drift apart; the rest of the
wire contract is :mod:`fl_app.protocol`).

Bit-packing of ring vectors, and payload sizes, for the masked-input upload. Elements
of ``Z_{2^bits}`` are stored in ``uint32``/``uint64`` for arithmetic
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

__all__ = [
    "SECAGG_BITS",
    "SECAGG_BOUND",
    "SECAGG_CIPHERTEXTS",
    "SECAGG_COHORT",
    "SECAGG_CONTEXT",
    "SECAGG_DDP",
    "SECAGG_DROPOUTS",
    "SECAGG_IDENTITIES",
    "SECAGG_KEYS",
    "SECAGG_KEY_ROUNDS",
    "SECAGG_MASKED_ARRAY",
    "SECAGG_MASKED_KEY",
    "SECAGG_MAX_KEY_ROUNDS",
    "SECAGG_MAX_WEIGHT",
    "SECAGG_NEXT_KEY",
    "SECAGG_NODES",
    "SECAGG_PARAMS",
    "SECAGG_RECORD_KEY",
    "SECAGG_REPLY_CIPHERTEXTS",
    "SECAGG_REPLY_COMMITMENT",
    "SECAGG_REPLY_C_PK",
    "SECAGG_REPLY_IDENTITY",
    "SECAGG_REPLY_KEY_NODES",
    "SECAGG_REPLY_KEY_SHARES",
    "SECAGG_REPLY_NODES",
    "SECAGG_REPLY_SELF_MASK_NODES",
    "SECAGG_REPLY_SELF_MASK_SHARES",
    "SECAGG_REPLY_SIGNATURES",
    "SECAGG_REPLY_SIGNING_KEY",
    "SECAGG_REPLY_S_PK",
    "SECAGG_RUN_ID",
    "SECAGG_SIGNATURES",
    "SECAGG_SIGNERS",
    "SECAGG_STAGE_KEY",
    "SECAGG_SURVIVORS",
    "SECAGG_VECTOR_LENGTH",
    "SECAGG_WEIGHTING",
    "pack_ring",
    "packed_bytes",
    "payload_bytes",
    "unpack_ring",
    "wire_packed",
]

# Secure aggregation (see the module doc). Instruction config keys:
SECAGG_STAGE_KEY = "fl-app.secagg-stage"
SECAGG_CONTEXT = "fl-app.secagg.context"
SECAGG_PARAMS = "fl-app.secagg.params"
SECAGG_BITS = "fl-app.secagg.bits"
SECAGG_VECTOR_LENGTH = "fl-app.secagg.vector-length"
SECAGG_COHORT = "fl-app.secagg.cohort"
SECAGG_NODES = "fl-app.secagg.nodes"
SECAGG_KEYS = "fl-app.secagg.keys"
SECAGG_CIPHERTEXTS = "fl-app.secagg.ciphertexts"
SECAGG_BOUND = "fl-app.secagg.bound"
SECAGG_WEIGHTING = "fl-app.secagg.weighting"
SECAGG_MAX_WEIGHT = "fl-app.secagg.max-weight"
SECAGG_SURVIVORS = "fl-app.secagg.survivors"
SECAGG_DROPOUTS = "fl-app.secagg.dropouts"
# Stage 1 (advertise): how many rounds, from this one on, to draw key pairs for.
SECAGG_KEY_ROUNDS = "fl-app.secagg.key-rounds"
# The most rounds one stage 1 may ask key pairs for (bounds a client's work and memory).
SECAGG_MAX_KEY_ROUNDS = 1024
# Distributed DP: the round's DdpRound as JSON (fl_app.privacy.distributed), stage 3.
SECAGG_DDP = "fl-app.secagg.ddp"
# Reply records: the stage payload (ConfigRecord of bytes) and the masked vector.
SECAGG_RECORD_KEY = "secagg"
SECAGG_MASKED_KEY = "masked"
# Share-ahead: a stage-4 instruction may carry the next round's stage-2 instruction in
# this ConfigRecord, and the reply then carries that stage's payload under the same key.
SECAGG_NEXT_KEY = "secagg-next"
# Keys inside the reply's ``secagg`` ConfigRecord.
SECAGG_REPLY_C_PK = "c-pk"
SECAGG_REPLY_S_PK = "s-pk"
SECAGG_REPLY_NODES = "nodes"
SECAGG_REPLY_CIPHERTEXTS = "ciphertexts"
# Stage 2: the sender's SHA-256 commitment to its self-mask seed (fl_app.secagg.crypto).
SECAGG_REPLY_COMMITMENT = "commitment"
SECAGG_REPLY_SELF_MASK_NODES = "self-mask-nodes"
SECAGG_REPLY_SELF_MASK_SHARES = "self-mask-shares"
SECAGG_REPLY_KEY_NODES = "key-nodes"
SECAGG_REPLY_KEY_SHARES = "key-shares"
# The masked vector's name inside the ``masked`` ArrayRecord.
SECAGG_MASKED_ARRAY = "y"
# Malicious server model (fl_app.secagg.signing). Stage 1: the run id the client binds
# its signed key pairs to (present only in malicious rounds); the reply's roster
# identity, Ed25519 signatures (64 bytes each, one per pair; one at the consistency
# stage) and signing public key (lets the server drop bad signatures before forwarding).
SECAGG_RUN_ID = "fl-app.secagg.run-id"
SECAGG_REPLY_IDENTITY = "identity"
SECAGG_REPLY_SIGNATURES = "signatures"
SECAGG_REPLY_SIGNING_KEY = "signing-key"
# Stage 2: neighbours' identities (JSON list, neighbour order) and key signatures;
# stage 4: the consistency-check signers (packed ids), their identities and signatures.
SECAGG_IDENTITIES = "fl-app.secagg.identities"
SECAGG_SIGNATURES = "fl-app.secagg.signatures"
SECAGG_SIGNERS = "fl-app.secagg.signers"


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

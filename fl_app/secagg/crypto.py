"""Primitives of secure aggregation, all from ``cryptography`` (OpenSSL).

Bonawitz et al. (CCS 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", §4 and Fig. 4) need a key agreement, an authenticated encryption
scheme for the routed secret shares, and a PRG expanding seeds into masks. We use:

* key agreement: X25519 (RFC 7748); public keys travel as 32 raw bytes and are
  validated on receipt (:func:`load_public_key`, :func:`agree`): exact length, not a
  small-order point, and the shared secret must not be all-zero;
* key derivation: HKDF-SHA256 (RFC 5869) binding every derived key to a purpose label,
  the round context and the two node ids in canonical (sorted) order
  (:func:`derive_key`); the encryption key comes from the ``c`` key pair and the
  pairwise mask seed from the ``s`` key pair, as in Bonawitz et al.;
* authenticated encryption: ChaCha20-Poly1305 (RFC 8439) with a random 96-bit nonce
  and associated data binding (context, sender, recipient) (:func:`encrypt`,
  :func:`decrypt`); any mismatch raises :class:`DecryptionError`;
* mask PRG: the AES-128-CTR keystream under the seed's first 16 bytes, in
  :mod:`fl_app.secagg.masks` (the seeds come from here).

Trust assumptions: OpenSSL's primitives are correct; secrets come from ``os.urandom``
(or bytes a test injects explicitly). Python cannot guarantee that immutable
``bytes``/``int`` copies of secrets are overwritten; callers drop references and
zero the mutable buffers they own (see ``ClientSession.wipe``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from enum import Enum

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "AEAD_NONCE_BYTES",
    "AEAD_OVERHEAD",
    "AEAD_TAG_BYTES",
    "COMMITMENT_BYTES",
    "KEY_BYTES",
    "MAX_BITS",
    "MAX_CONTEXT_BYTES",
    "MAX_NODE_ID",
    "MIN_BITS",
    "DecryptionError",
    "InvalidPublicKeyError",
    "KeyPurpose",
    "agree",
    "associated_data",
    "check_context",
    "check_node_id",
    "check_seed",
    "commit_seed",
    "decrypt",
    "derive_key",
    "encrypt",
    "generate_private_key",
    "load_public_key",
    "private_key_bytes",
    "private_key_from_bytes",
    "public_key_bytes",
    "storage_dtype",
]

# Ring widths of secure aggregation, Z_{2**bits}: at most 64 (uint64 storage, the wire's
# packing); at least 8 (a narrower ring holds no useful fixed-point sum). Every layer
# that checks a width (config, settings, codec, protocol, distributed DP) uses these.
MIN_BITS = 8
MAX_BITS = 64

KEY_BYTES = 32
AEAD_NONCE_BYTES = 12
AEAD_TAG_BYTES = 16
AEAD_OVERHEAD = AEAD_NONCE_BYTES + AEAD_TAG_BYTES
MAX_CONTEXT_BYTES = 1024
MAX_NODE_ID = 2**64 - 1
_PROTOCOL_LABEL = b"fl-app/secagg/v1"

_P25519 = 2**255 - 19
# u-coordinates of the points of small order on Curve25519 and its twist (0 and 1:
# orders 4 and 1; p-1: order 2; the two order-8 points; libsodium's blacklist).
# Non-canonical encodings (u >= p) and the ignored top bit are reduced before lookup.
_SMALL_ORDER_U = frozenset(
    {
        0,
        1,
        _P25519 - 1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
    }
)


class InvalidPublicKeyError(ValueError):
    """A received X25519 public key is malformed, small-order or yields a zero secret."""


class DecryptionError(ValueError):
    """An AEAD ciphertext failed authentication: tampered, wrong key, wrong context/ids."""


class KeyPurpose(str, Enum):
    """Purpose label bound into every HKDF derivation (domain separation)."""

    share_encryption = "share-encryption"
    pairwise_mask = "pairwise-mask"


def check_node_id(name: str, node_id: object) -> int:
    """Return ``node_id`` if it is an int in [0, 2**64 - 1], else raise naming ``name``."""
    if isinstance(node_id, bool) or not isinstance(node_id, (int, np.integer)):
        raise ValueError(f"{name} must be an int node id, got {type(node_id).__name__}")
    value = int(node_id)
    if not 0 <= value <= MAX_NODE_ID:
        raise ValueError(f"{name} must be a uint64 node id in [0, 2**64 - 1], got {value}")
    return value


def check_context(context: object) -> bytes:
    """Return the round context as bytes if it is 1..1024 bytes long, else raise."""
    if not isinstance(context, (bytes, bytearray)) or not 0 < len(context) <= MAX_CONTEXT_BYTES:
        got = len(context) if isinstance(context, (bytes, bytearray)) else type(context).__name__
        raise ValueError(
            f"context must be 1..{MAX_CONTEXT_BYTES} bytes identifying the run and round, got "
            f"{got}; build it with fl_app.secagg.protocol.round_context"
        )
    return bytes(context)


def storage_dtype(bits: int) -> type[np.unsignedinteger]:
    """Unsigned storage for arithmetic mod ``2**bits``: uint32 up to 32 bits, else uint64."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")
    return np.uint32 if bits <= 32 else np.uint64


def generate_private_key(entropy: Callable[[int], bytes] = os.urandom) -> X25519PrivateKey:
    """A fresh X25519 private key from 32 CSPRNG bytes (clamped by X25519 itself)."""
    return X25519PrivateKey.from_private_bytes(entropy(KEY_BYTES))


def private_key_bytes(key: X25519PrivateKey) -> bytes:
    """Raw 32-byte private key (for Shamir sharing and session state)."""
    return key.private_bytes_raw()


def private_key_from_bytes(raw: bytes) -> X25519PrivateKey:
    """Inverse of :func:`private_key_bytes`."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != KEY_BYTES:
        raise ValueError(f"an X25519 private key is {KEY_BYTES} raw bytes")
    return X25519PrivateKey.from_private_bytes(bytes(raw))


def public_key_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the public key of ``key``."""
    return key.public_key().public_bytes_raw()


def load_public_key(raw: object) -> X25519PublicKey:
    """Validate and load a received public key.

    Raises
    ------
    InvalidPublicKeyError
        Not exactly 32 bytes, or a small-order point (all-zero, identity, order 2, 4
        or 8, in canonical or non-canonical encoding): agreeing with such a key gives
        a secret known to everyone.
    """
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != KEY_BYTES:
        got = f"{len(raw)} bytes" if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
        raise InvalidPublicKeyError(f"an X25519 public key is {KEY_BYTES} raw bytes, got {got}")
    u = (int.from_bytes(raw, "little") & ((1 << 255) - 1)) % _P25519
    if u in _SMALL_ORDER_U:
        raise InvalidPublicKeyError("public key is a small-order point (contributory check)")
    try:
        return X25519PublicKey.from_public_bytes(bytes(raw))
    except ValueError as exc:  # pragma: no cover - OpenSSL accepts every 32-byte string
        raise InvalidPublicKeyError(f"public key rejected by X25519: {exc}") from exc


def agree(private_key: X25519PrivateKey, public_key: bytes | X25519PublicKey) -> bytes:
    """X25519 shared secret with a validated peer key; never returns all-zero."""
    peer = public_key if isinstance(public_key, X25519PublicKey) else load_public_key(public_key)
    try:
        shared = private_key.exchange(peer)
    except ValueError as exc:  # OpenSSL refuses an all-zero result
        raise InvalidPublicKeyError(f"X25519 exchange failed: {exc}") from exc
    if not any(shared):
        raise InvalidPublicKeyError("X25519 shared secret is all-zero (small-order peer key)")
    return shared


def _ids_bytes(node_a: int, node_b: int) -> bytes:
    a = check_node_id("node_a", node_a)
    b = check_node_id("node_b", node_b)
    if a == b:
        raise ValueError(f"pairwise keys need two distinct nodes, got {a} twice")
    return struct.pack(">QQ", min(a, b), max(a, b))


def derive_key(
    shared_secret: bytes,
    *,
    purpose: KeyPurpose,
    context: bytes,
    node_a: int,
    node_b: int,
) -> bytes:
    """HKDF-SHA256 of an X25519 secret into a 32-byte key for one purpose, round and pair.

    ``info = label || purpose || len(context) || context || min(id) || max(id)``: the
    same key results whichever node derives it, and keys for another purpose, round
    or pair are independent.
    """
    ctx = check_context(context)
    label = KeyPurpose(purpose).value.encode()
    info = b"".join(
        (
            _PROTOCOL_LABEL,
            bytes([len(label)]),
            label,
            struct.pack(">H", len(ctx)),
            ctx,
            _ids_bytes(node_a, node_b),
        )
    )
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_PROTOCOL_LABEL, info=info)
    return hkdf.derive(shared_secret)


COMMITMENT_BYTES = 32
_COMMIT_LABEL = b"fl-app/secagg/self-mask-commitment/v1"


def commit_seed(seed: bytes, *, context: bytes, node: int) -> bytes:
    """SHA-256 commitment to a node's self-mask seed ``b_u``, bound to round and node.

    ``H(label || len(context) || context || node || b_u)``: sent at stage 2, checked by
    the server against the seed it rebuilds from shares, so a crafted share cannot
    shift the seed unnoticed (binding: SHA-256 collision resistance). The seed is 32
    uniform bytes, so the hash reveals nothing usable about it (hiding by entropy).
    """
    ctx = check_context(context)
    raw = check_seed(seed)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(
        _COMMIT_LABEL
        + struct.pack(">H", len(ctx))
        + ctx
        + struct.pack(">Q", check_node_id("node", node))
        + raw
    )
    return digest.finalize()


def associated_data(context: bytes, sender: int, recipient: int) -> bytes:
    """AEAD associated data: (round context, sender id, recipient id), unambiguous."""
    ctx = check_context(context)
    s = check_node_id("sender", sender)
    r = check_node_id("recipient", recipient)
    return _PROTOCOL_LABEL + struct.pack(">H", len(ctx)) + ctx + struct.pack(">QQ", s, r)


def encrypt(
    key: bytes,
    plaintext: bytes,
    *,
    context: bytes,
    sender: int,
    recipient: int,
    entropy: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """ChaCha20-Poly1305 ``nonce || ciphertext || tag`` bound to (context, sender, recipient)."""
    nonce = entropy(AEAD_NONCE_BYTES)
    aad = associated_data(context, sender, recipient)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, ciphertext: bytes, *, context: bytes, sender: int, recipient: int) -> bytes:
    """Inverse of :func:`encrypt`; raises :class:`DecryptionError` on any mismatch."""
    if not isinstance(ciphertext, (bytes, bytearray)) or len(ciphertext) < AEAD_OVERHEAD:
        raise DecryptionError("ciphertext too short to hold a nonce and a tag")
    aad = associated_data(context, sender, recipient)
    nonce = bytes(ciphertext[:AEAD_NONCE_BYTES])
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, bytes(ciphertext[AEAD_NONCE_BYTES:]), aad)
    except InvalidTag as exc:
        raise DecryptionError(
            "authentication failed: tampered ciphertext, wrong recipient/sender or round"
        ) from exc


def check_seed(seed: object) -> bytes:
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != KEY_BYTES:
        raise ValueError(f"mask seed must be {KEY_BYTES} bytes")
    return bytes(seed)

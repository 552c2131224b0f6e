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
* mask PRG: the AES-128-CTR keystream under the seed's first 16 bytes
  (:func:`expand_mask`), with distinct IV prefixes separating self-masks from pairwise
  masks (AES-NI makes it ~1.6x faster than ChaCha20, and masks are a client's main cost).

Trust assumptions: OpenSSL's primitives are correct; secrets come from ``os.urandom``
(or bytes a test injects explicitly). Python cannot guarantee that immutable
``bytes``/``int`` copies of secrets are overwritten; callers drop references and
zero the mutable buffers they own (see ``ClientSession.wipe``).
"""

from __future__ import annotations

import itertools
import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from enum import Enum

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "AEAD_NONCE_BYTES",
    "AEAD_OVERHEAD",
    "AEAD_TAG_BYTES",
    "COMMITMENT_BYTES",
    "KEY_BYTES",
    "MAX_CONTEXT_BYTES",
    "MAX_NODE_ID",
    "DecryptionError",
    "InvalidPublicKeyError",
    "KeyPurpose",
    "MaskDomain",
    "accumulate_masks",
    "agree",
    "associated_data",
    "check_context",
    "check_node_id",
    "commit_seed",
    "decrypt",
    "derive_key",
    "encrypt",
    "expand_mask",
    "generate_private_key",
    "load_public_key",
    "private_key_bytes",
    "private_key_from_bytes",
    "public_key_bytes",
    "storage_dtype",
]

KEY_BYTES = 32
AEAD_NONCE_BYTES = 12
AEAD_TAG_BYTES = 16
AEAD_OVERHEAD = AEAD_NONCE_BYTES + AEAD_TAG_BYTES
MAX_CONTEXT_BYTES = 1024
MAX_NODE_ID = 2**64 - 1
# Longest mask the IV's 32-bit block counter allows (2**32 AES blocks of 16 bytes) in
# uint64 elements; far beyond any model, checked so the keystream can never repeat.
_MAX_MASK_ELEMENTS = (2**32 * 16) // 8
_PROTOCOL_LABEL = b"fl-app/secagg/v1"
_CHUNK = 1 << 20
# Zero plaintext for the CTR keystream, sliced through a memoryview (slicing the bytes
# object itself would copy up to 1 MiB per call).
_ZEROS = memoryview(bytes(_CHUNK))
# Bytes of each mask generated per step of accumulate_masks: the keystream scratch and
# the matching slice of the accumulator (128 KiB each) stay in L2 while every mask of
# the batch is added, instead of streaming a fresh 4 MB array per mask through memory.
_ACC_CHUNK_BYTES = 1 << 17
# The same per thread when accumulate_masks runs on several threads: each call into
# ``update_into`` or a ufunc releases the GIL and must take it back, and with 128 KiB
# steps (numpy adds of ~4 us) the threads spend much of their time handing the GIL to
# each other; 512 KiB steps (scratch + slice of out = 1 MiB, a server core's L2) make
# 4x fewer hand-offs, measured 1.3x -> 1.6x on two cores for the server's unmasking.
_THREAD_CHUNK_BYTES = 1 << 19
assert _ACC_CHUNK_BYTES <= _CHUNK and _THREAD_CHUNK_BYTES <= _CHUNK  # _ZEROS covers a step
_AES_BLOCK_BYTES = 16
# accumulate_masks splits the accumulator between threads at multiples of this many
# bytes from its start: whole AES blocks (each slice's keystream starts on a counter
# value) and whole cache lines (two threads never write the same line).
_SLICE_ALIGN_BYTES = 64
# Default threading of accumulate_masks: at most this many threads, and only for at
# least this many elements and this much work (elements x masks, ~2 ms on one core);
# below, handing slices to threads costs about what it saves (measured on two cores:
# 2**18 elements x 1 mask 0.7x, 2**20 x 1 1.5x, 2**18 x 39 1.5x).
_MAX_DEFAULT_THREADS = 4
_THREAD_MIN_ELEMENTS = 1 << 18
_THREAD_MIN_WORK = 1 << 21

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


class MaskDomain(Enum):
    """IV prefix separating self-mask from pairwise-mask keystreams (12 bytes each)."""

    self_mask = b"fl-self-mask"
    pairwise = b"fl-pair-mask"


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
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 64:
        raise ValueError(f"bits must be an int in [1, 64], got {bits!r}")
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
    raw = _check_seed(seed)
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


def expand_mask(seed: bytes, length: int, bits: int, *, domain: MaskDomain) -> np.ndarray:
    """Expand a 32-byte seed into a uniform vector mod ``2**bits`` (AES-128-CTR keystream).

    Parameters
    ----------
    seed
        32-byte key: a self-mask seed ``b_u`` or a derived pairwise seed.
    length
        Number of elements ``d``.
    bits
        Modulus exponent; the result has dtype :func:`storage_dtype` and, below the
        storage width, is reduced to ``[0, 2**bits)``.
    domain
        :class:`MaskDomain`, the first 12 bytes of the CTR IV, so a self-mask and a
        pairwise mask never share a keystream even under an equal seed.

    The keystream is written straight into the result (``update_into``) in 1 MiB
    chunks: about 0.5 ms per million uint32 elements on one AES-NI core. To add or
    subtract many masks, :func:`accumulate_masks` avoids materialising each one.
    """
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != KEY_BYTES:
        raise ValueError(f"mask seed must be {KEY_BYTES} bytes")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    if length > _MAX_MASK_ELEMENTS:
        raise ValueError(f"length={length} exceeds the AES-CTR keystream limit")
    dtype = storage_dtype(bits)
    out = np.empty(length, dtype=dtype)
    buf = out.data.cast("B")
    enc = _mask_cipher(seed, domain)
    for start in range(0, len(buf), _CHUNK):
        stop = min(start + _CHUNK, len(buf))
        enc.update_into(_ZEROS[: stop - start], buf[start:stop])
    width = 8 * out.itemsize
    if bits < width:
        np.bitwise_and(out, dtype((1 << bits) - 1), out=out)
    return out


def _mask_cipher(seed: bytes, domain: MaskDomain, block_offset: int = 0) -> CipherContext:
    # AES-128-CTR (AES-NI) expands ~1.6x faster than ChaCha20 here, and mask expansion
    # is a client's main cost (k + 1 masks a round). The first 16 bytes of the uniform
    # 32-byte seed are the key (128-bit security); the domain fills the IV's first 12
    # bytes and the last 4 are the block counter, so keystreams never overlap.
    # ``block_offset`` starts the keystream at that block of the mask (a thread's slice
    # in accumulate_masks): the same bytes as skipping 16 * block_offset bytes.
    iv = _ctr_offset(MaskDomain(domain).value + b"\x00\x00\x00\x00", block_offset)
    return Cipher(algorithms.AES(bytes(seed[:16])), modes.CTR(iv)).encryptor()


def _ctr_offset(iv: bytes, blocks: int) -> bytes:
    """The CTR counter block ``blocks`` AES blocks after ``iv``.

    Parameters
    ----------
    iv
        16-byte initial counter block.
    blocks
        Number of blocks to skip, ``>= 0``.

    Returns
    -------
    bytes
        ``iv + blocks`` as a 128-bit big-endian integer modulo ``2**128``: OpenSSL's
        CTR mode increments the whole 16-byte block that way (carrying out of the low
        32 bits, wrapping at ``2**128``), so a cipher started at the result produces
        exactly the keystream bytes ``16 * blocks`` onwards of one started at ``iv``.
    """
    if len(iv) != _AES_BLOCK_BYTES or blocks < 0:
        raise ValueError(f"need a 16-byte counter block and blocks >= 0, got {len(iv)}, {blocks}")
    counter = (int.from_bytes(iv, "big") + blocks) % (1 << 128)
    return counter.to_bytes(_AES_BLOCK_BYTES, "big")


def _check_seed(seed: object) -> bytes:
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != KEY_BYTES:
        raise ValueError(f"mask seed must be {KEY_BYTES} bytes")
    return bytes(seed)


def accumulate_masks(
    out: np.ndarray,
    bits: int,
    *,
    add: Sequence[tuple[bytes, MaskDomain]] = (),
    subtract: Sequence[tuple[bytes, MaskDomain]] = (),
    base: np.ndarray | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """``out += sum(PRG(a)) - sum(PRG(s)) mod 2**bits`` in place; returns ``out`` reduced.

    Each ``(seed, domain)`` names the same mask :func:`expand_mask` returns for it, so
    the result equals adding and subtracting those vectors one by one (tested), but no
    mask is ever materialised: every keystream is generated into a small reusable
    scratch buffer, a cache-sized slice at a time, and added to (or subtracted from)
    the matching slice of ``out`` while both are in cache. Working modulo the storage
    width and reducing once at the end is exact because ``2**bits`` divides it.

    Parameters
    ----------
    out
        Contiguous 1-d accumulator of dtype :func:`storage_dtype` ``(bits)``.
    bits
        Modulus exponent.
    add, subtract
        ``(32-byte seed, MaskDomain)`` pairs of the masks to add and to subtract.
    base
        If given (same dtype and length as ``out``), ``out`` is first overwritten with
        ``base``, slice by slice in the same pass: ``out = base + ...`` without a
        separate full-length copy. ``base`` itself is not modified.
    threads
        Number of threads sharing the work: ``out`` (and ``base``) is cut into that
        many contiguous slices at multiples of 64 bytes, and each thread generates
        every keystream for its slice only, with ciphers whose CTR counter starts at
        the slice's first AES block. Every element receives the same keystream word
        as in a single-threaded run, so the result is bit-identical for any value.
        ``1`` runs in the calling thread only; ``None`` (default) uses
        ``min(usable cores, 4)`` threads when ``out`` has at least ``2**18`` elements
        and ``len(out) * (len(add) + len(subtract)) >= 2**21``, else one.
        Both ``cryptography``'s ``update_into`` and numpy's ufuncs release the GIL,
        so the threads run in parallel.

    Raises
    ------
    ValueError
        Bad ``out``, ``base``, ``bits``, seed or ``threads``; nothing is modified then.
    """
    dtype = storage_dtype(bits)
    if not isinstance(out, np.ndarray) or out.dtype != dtype or out.ndim != 1:
        got = f"{out.dtype}{list(out.shape)}" if isinstance(out, np.ndarray) else type(out)
        raise ValueError(f"out must be a 1-d {np.dtype(dtype)} array for bits={bits}, got {got}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a writeable C-contiguous array")
    if out.size > _MAX_MASK_ELEMENTS:
        raise ValueError(f"length={out.size} exceeds the AES-CTR keystream limit")
    if base is not None and (
        not isinstance(base, np.ndarray) or base.dtype != dtype or base.shape != out.shape
    ):
        got = f"{base.dtype}{list(base.shape)}" if isinstance(base, np.ndarray) else type(base)
        raise ValueError(f"base must match out ({np.dtype(dtype)}{list(out.shape)}), got {got}")
    masks = [(_check_seed(s), MaskDomain(d), False) for s, d in add]
    masks += [(_check_seed(s), MaskDomain(d), True) for s, d in subtract]
    num_threads = _resolve_threads(threads, out.size, len(masks))
    width = 8 * out.itemsize
    modulus_mask = dtype((1 << bits) - 1) if bits < width else None
    if not masks or not out.size:
        if base is not None:
            np.copyto(out, base)
        if modulus_mask is not None:
            np.bitwise_and(out, modulus_mask, out=out)
        return out
    bounds = _slice_bounds(out.size, out.itemsize, num_threads)
    if len(bounds) == 1:
        _accumulate_slice(out, base, masks, 0, modulus_mask, _ACC_CHUNK_BYTES)
        return out
    # Hand-written rather than a library's: parallel AES-CTR needs each slice's cipher
    # to start at a counter offset (_ctr_offset), which no Python library offers over
    # ``cryptography``'s (GIL-releasing) CipherContext; a plain thread pool over
    # disjoint slices of ``out`` is all it takes. The calling thread does the first
    # slice itself, the pool the others; every slice is finished before we return.
    jobs = [
        (
            out[start:stop],
            None if base is None else base[start:stop],
            masks,
            start * out.itemsize // _AES_BLOCK_BYTES,
            modulus_mask,
            _THREAD_CHUNK_BYTES,
        )
        for start, stop in bounds
    ]
    pool = _thread_pool(len(jobs) - 1)
    futures: list[Future[None]] = [pool.submit(_accumulate_slice, *job) for job in jobs[1:]]
    try:
        _accumulate_slice(*jobs[0])
    finally:
        wait(futures)  # no worker may still write into ``out`` once we return or raise
    for future in futures:
        future.result()  # re-raise a worker's exception, if any
    return out


def _accumulate_slice(
    out: np.ndarray,
    base: np.ndarray | None,
    masks: Sequence[tuple[bytes, MaskDomain, bool]],
    block_offset: int,
    modulus_mask: np.unsignedinteger | None,
    chunk_bytes: int,
) -> None:
    """One thread's share of :func:`accumulate_masks`, on a slice of the accumulator.

    Parameters
    ----------
    out, base
        The slice of the accumulator (and of ``base``); it starts at AES block
        ``block_offset`` of the full vector.
    masks
        ``(seed, domain, subtract)`` triples, already validated.
    block_offset
        Index of the slice's first 16-byte keystream block in the full mask.
    modulus_mask
        ``2**bits - 1`` when ``bits`` is below the storage width, else ``None``.
    chunk_bytes
        Bytes of keystream per step (the scratch size, at most ``len(_ZEROS)``).
    """
    # Bound methods and positional ``out``: the Python work between two GIL-free calls
    # is what the threads of accumulate_masks serialise on.
    streams = [
        (_mask_cipher(s, d, block_offset).update_into, np.subtract if negative else np.add)
        for s, d, negative in masks
    ]
    step = chunk_bytes // out.itemsize
    scratch = np.empty(min(step, out.size), dtype=out.dtype)
    scratch_bytes = scratch.data.cast("B")
    try:
        for start in range(0, out.size, step):
            stop = min(start + step, out.size)
            nbytes = (stop - start) * out.itemsize
            part = out[start:stop]
            if base is not None:
                np.copyto(part, base[start:stop])
            ks = scratch[: stop - start]
            zeros = _ZEROS[:nbytes]
            ks_bytes = scratch_bytes[:nbytes]
            for update_into, ufunc in streams:
                update_into(zeros, ks_bytes)
                ufunc(part, ks, part)
            if modulus_mask is not None:
                np.bitwise_and(part, modulus_mask, part)
    finally:
        scratch.fill(0)  # the last keystream slice is mask material: do not leave it around


def _usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (where the OS reports it), capped
    by ``OMP_NUM_THREADS`` when that is a positive integer. A process handed a CPU share
    is told so there (Ray sets it to an actor's ``num_cpus``; torch and BLAS honour it),
    so several simulated clients on one machine do not each start a thread per core."""
    if hasattr(os, "sched_getaffinity"):
        cores = max(1, len(os.sched_getaffinity(0)))
    else:
        cores = max(1, os.cpu_count() or 1)
    share = os.environ.get("OMP_NUM_THREADS", "").strip()
    if share.isdigit() and int(share) >= 1:
        cores = min(cores, int(share))
    return cores


def _resolve_threads(threads: object, size: int, num_masks: int) -> int:
    """Validate ``threads`` of :func:`accumulate_masks`; ``None`` becomes the default."""
    if threads is None:
        if size < _THREAD_MIN_ELEMENTS or size * num_masks < _THREAD_MIN_WORK:
            return 1
        return min(_usable_cores(), _MAX_DEFAULT_THREADS)
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    return int(threads)


def _slice_bounds(size: int, itemsize: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``range(size)`` into at most ``parts`` non-empty contiguous slices.

    Every cut lies at a multiple of :data:`_SLICE_ALIGN_BYTES` bytes from the start, so
    each slice begins on an AES block; sizes differ by at most one 64-byte unit (the
    last slice may be shorter). Fewer slices result when there are fewer units.
    """
    per_unit = _SLICE_ALIGN_BYTES // itemsize
    units = -(-size // per_unit)
    parts = max(1, min(parts, units))
    cuts = [units * i // parts * per_unit for i in range(parts)] + [size]
    return list(itertools.pairwise(cuts))


# The worker threads of accumulate_masks: created on first use and grown when a call
# asks for more. A replaced pool is only dropped, not shut down: a call that already
# holds it can still submit, and its idle threads exit once it is garbage-collected.
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """The shared pool, with at least ``workers`` threads (beside the calling thread)."""
    global _pool, _pool_workers
    with _pool_lock:
        if _pool is None or _pool_workers < workers:
            _pool_workers = max(workers, _pool_workers)
            _pool = ThreadPoolExecutor(max_workers=_pool_workers, thread_name_prefix="secagg-mask")
        return _pool


def _forget_pool_after_fork() -> None:
    # A forked child inherits the pool object but none of its threads (work submitted
    # to it would never run) and possibly a held lock: start afresh.
    global _pool_lock, _pool, _pool_workers
    _pool_lock = threading.Lock()
    _pool = None
    _pool_workers = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)

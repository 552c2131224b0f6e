"""The mask PRG of secure aggregation: AES-128-CTR keystreams as ring vectors.

Bonawitz et al. (CCS 2017, §4) expand each self-mask seed and each pairwise seed into a
vector of ``Z_{2^bits}``; here the keystream is AES-128-CTR under the seed's first 16
bytes (:func:`expand_mask`), with distinct IV prefixes (:class:`MaskDomain`) separating
self-masks from pairwise masks (AES-NI makes it ~1.6x faster than ChaCha20, and masks
are a client's main cost). :func:`accumulate_masks` adds or subtracts many masks into
one accumulator in cache-sized steps, on several threads for large vectors; it is the
hot loop of both the masked input and the server's unmasking. Seeds come from
:mod:`fl_app.secagg.crypto` (key agreement and HKDF).

Trust assumptions: OpenSSL's AES is correct; a keystream never repeats (the length is
bounded so the 32-bit block counter cannot wrap).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from enum import Enum

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from fl_app.secagg.crypto import KEY_BYTES, check_seed, storage_dtype

__all__ = ["MaskDomain", "accumulate_masks", "expand_mask"]

# Longest mask the IV's 32-bit block counter allows (2**32 AES blocks of 16 bytes) in
# uint64 elements; far beyond any model, checked so the keystream can never repeat.
_MAX_MASK_ELEMENTS = (2**32 * 16) // 8
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


class MaskDomain(Enum):
    """IV prefix separating self-mask from pairwise-mask keystreams (12 bytes each)."""

    self_mask = b"fl-self-mask"
    pairwise = b"fl-pair-mask"


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
    # long: the hot loop of masking and unmasking, kept in one piece so its steps stay fused.
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
    masks = [(check_seed(s), MaskDomain(d), False) for s, d in add]
    masks += [(check_seed(s), MaskDomain(d), True) for s, d in subtract]
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

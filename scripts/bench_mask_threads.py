"""Micro-benchmark: single-threaded vs threaded ``masks.accumulate_masks``.

``accumulate_masks(..., threads=n)`` cuts the accumulator into ``n`` contiguous slices
and gives each thread its own AES-128-CTR ciphers started at the slice's counter
offset, so the result is bit-identical to ``threads=1`` (checked here once per case).
Two workloads of one round, 32-bit ring, ``d`` uint32 coordinates:

* client: ``out = encoded + sum of 39 masks`` (a self-mask and 38 pairwise masks,
  half added and half subtracted), the masking step of ``ClientSession``;
* server: ``total -= sum of 100 self-masks`` (unmasking ~100 survivors).

A third line times the keystream alone (``update_into`` spread over the same threads,
no numpy): when it scales with the threads, ``cryptography`` releases the GIL.

Prints the median of ``--reps`` runs per thread count, the speed-up over one thread
and how much of a core other processes used meanwhile (Linux): on a shared machine a
busy neighbour takes the cores the threads need, so rerun when that is not near 0%.

    .venv/bin/python scripts/bench_mask_threads.py                  # 1, 2, default
    .venv/bin/python scripts/bench_mask_threads.py --threads 1 2 4 8 --reps 9
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fl_app.secagg import masks


def _busy_seconds() -> float:
    """CPU seconds all processes have used (Linux ``/proc/stat``; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _median_time(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median wall time of ``fn`` and the share of a core other processes used meanwhile."""
    fn()  # warm-up: thread pool, page faults of fresh arrays
    times = []
    busy0, cpu0, wall0 = _busy_seconds(), time.process_time(), time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    others = (_busy_seconds() - busy0) - (time.process_time() - cpu0)
    return statistics.median(times), max(0.0, others) / (time.perf_counter() - wall0)


def _masks(count: int, domain: masks.MaskDomain) -> list[tuple[bytes, masks.MaskDomain]]:
    return [(os.urandom(32), domain) for _ in range(count)]


def bench_accumulate(
    label: str,
    d: int,
    add: list[tuple[bytes, masks.MaskDomain]],
    subtract: list[tuple[bytes, masks.MaskDomain]],
    with_base: bool,
    thread_counts: list[int | None],
    reps: int,
) -> None:
    base = np.random.default_rng(0).integers(0, 2**32, d, dtype=np.uint64).astype(np.uint32)
    out = np.empty(d, dtype=np.uint32)

    def run(threads: int | None) -> np.ndarray:
        if not with_base:
            np.copyto(out, base)
        return masks.accumulate_masks(
            out,
            32,
            add=add,
            subtract=subtract,
            base=base if with_base else None,
            threads=threads,
        )

    reference = run(1).copy()
    single = 0.0
    for threads in thread_counts:
        if not np.array_equal(run(threads), reference):
            raise AssertionError(f"threads={threads} differs from the single-threaded result")
        t, others = _median_time(functools.partial(run, threads), reps)
        single = single or t
        resolved = masks._resolve_threads(threads, d, len(add) + len(subtract))
        _report(label, threads, resolved, t, single, others)


def bench_keystream(num_masks: int, d: int, thread_counts: list[int | None], reps: int) -> None:
    """``num_masks`` keystreams of ``4 * d`` bytes, 128 KiB ``update_into`` calls, no numpy."""
    chunk = masks._ACC_CHUNK_BYTES
    zeros = memoryview(bytes(chunk))
    chunks = -(-4 * d // chunk) * num_masks

    def work(count: int) -> None:
        enc = Cipher(algorithms.AES(os.urandom(16)), modes.CTR(bytes(16))).encryptor()
        scratch = bytearray(chunk)
        for _ in range(count):
            enc.update_into(zeros, scratch)

    def run(threads: int) -> None:
        shares = [chunks * (i + 1) // threads - chunks * i // threads for i in range(threads)]
        pool = [threading.Thread(target=work, args=(n,)) for n in shares[1:]]
        for t in pool:
            t.start()
        work(shares[0])
        for t in pool:
            t.join()

    single = 0.0
    for threads in thread_counts:
        resolved = masks._resolve_threads(threads, d, num_masks)
        t, others = _median_time(functools.partial(run, resolved), reps)
        single = single or t
        _report(f"keystream only, {num_masks} x {d:,}", threads, resolved, t, single, others)


def _report(
    label: str, threads: int | None, resolved: int, t: float, single: float, others: float
) -> None:
    name = "default" if threads is None else str(threads)
    print(
        f"{label:<34} threads={name:<8}({resolved}) {t * 1e3:7.1f} ms   x{single / t:4.2f}"
        f"   (other processes: {others:4.0%} of a core)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=1_000_000, help="vector length (uint32)")
    parser.add_argument("--reps", type=int, default=5, help="runs per case (median)")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="thread counts to compare (default: 1, 2 and accumulate_masks' default)",
    )
    parser.add_argument("--client-masks", type=int, default=39)
    parser.add_argument("--server-masks", type=int, default=100)
    args = parser.parse_args()
    counts: list[int | None] = [1, *(t for t in (args.threads or [2]) if t != 1)]
    if args.threads is None:
        counts.append(None)
    print(
        f"usable cores {masks._usable_cores()}, load average "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    k = args.client_masks
    client_add = _masks(1, masks.MaskDomain.self_mask) + _masks(
        (k - 1) // 2, masks.MaskDomain.pairwise
    )
    client_sub = _masks(k - len(client_add), masks.MaskDomain.pairwise)
    bench_accumulate(
        f"client: {k} masks x {args.d:,}", args.d, client_add, client_sub, True, counts, args.reps
    )
    m = args.server_masks
    server_sub = _masks(m, masks.MaskDomain.self_mask)
    bench_accumulate(
        f"server: {m} self-masks x {args.d:,}", args.d, [], server_sub, False, counts, args.reps
    )
    bench_keystream(k, args.d, counts, args.reps)


if __name__ == "__main__":
    main()

"""Micro-benchmark of fl_app.secagg: mask PRG, codec, client stages 2-3 and the server.

Runs whole rounds in-process (no Flower), 32-bit ring, the app's default parameters
(dropout tolerance 0.2, corrupt fraction 0.1, as ``fl_app.secagg.settings.SecAggSettings``),
with and without dropouts at stage 3 (the costly case for the server: it must rebuild
the dropouts' pairwise masks). Prints median wall-clock times; the machine may be
shared, so compare ratios within a run.

The first lines compare the building blocks with their straightforward forms: ``k + 1``
masks expanded one by one and added (``expand_mask``) against the fused, chunked
``accumulate_masks``; the codec's encode and decode of one million coordinates.

    .venv/bin/python scripts/bench_secagg_core.py            # full table
    .venv/bin/python scripts/bench_secagg_core.py --quick    # N <= 50, d = 100k
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from fl_app.secagg import masks
from fl_app.secagg.client_session import ClientSession
from fl_app.secagg.derive import derive_params
from fl_app.secagg.encoding import FixedPointCodec
from fl_app.secagg.protocol import round_context
from fl_app.secagg.server_session import ServerSession

DROPOUT_TOLERANCE = 0.2
CORRUPT_FRACTION = 0.1


def _median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_mask(reps: int = 30) -> float:
    seed = os.urandom(32)
    return _median_time(
        lambda: masks.expand_mask(seed, 1_000_000, 32, domain=masks.MaskDomain.pairwise), reps
    )


def bench_mask_sum(num_masks: int, d: int = 1_000_000, reps: int = 5) -> tuple[float, float]:
    """``num_masks`` masks added to a vector: one by one (expand + add) vs fused."""
    pairs = [(os.urandom(32), masks.MaskDomain.pairwise) for _ in range(num_masks)]

    def one_by_one() -> None:
        y = np.zeros(d, dtype=np.uint32)
        for seed, domain in pairs:
            np.add(y, masks.expand_mask(seed, d, 32, domain=domain), out=y)

    def fused() -> None:
        masks.accumulate_masks(np.zeros(d, dtype=np.uint32), 32, add=pairs)

    return _median_time(one_by_one, reps), _median_time(fused, reps)


def bench_codec(n: int = 100, d: int = 1_000_000, reps: int = 7) -> tuple[float, float]:
    """Encode of ``d`` float64 coordinates and decode of a sum of ``n`` encodings."""
    codec = FixedPointCodec(bits=32, max_abs=10.0, max_contributors=n)
    x = np.random.default_rng(0).standard_normal(d) * (5.0 / np.sqrt(d))
    rng = np.random.default_rng(1)
    total = codec.encode(x, rng) * np.uint32(n)
    return (
        _median_time(lambda: codec.encode(x, rng), reps),
        _median_time(lambda: codec.decode_sum(total, n), reps),
    )


def bench_round(n: int, d: int, mode: str, drop_fraction: float) -> dict[str, float]:
    params = derive_params(
        n, mode=mode, dropout_tolerance=DROPOUT_TOLERANCE, corrupt_fraction=CORRUPT_FRACTION
    )
    ids = list(range(1, n + 1))
    ctx = round_context(1, 1)
    server = ServerSession(ids, params, vector_length=d, bits=32, context=ctx)
    clients = {u: ClientSession(u, ctx, params, vector_length=d, bits=32) for u in ids}
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, d, dtype=np.uint32)
    req2 = server.collect_public_keys({u: c.advertise() for u, c in clients.items()})
    t0 = time.perf_counter()
    bundles = {u: clients[u].share_keys(req2[u]) for u in ids}
    stage2 = (time.perf_counter() - t0) / n
    req3 = server.route_shares(bundles)
    dropped = set(ids[: round(drop_fraction * n)])
    ys = {}
    stage3 = []
    for u in ids:
        if u in dropped:
            continue
        t0 = time.perf_counter()
        ys[u] = clients[u].masked_input(req3[u], x)
        stage3.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    req4 = server.collect_masked_inputs(ys)
    collect = time.perf_counter() - t0
    replies = {u: clients[u].unmask(req4.survivors, req4.dropouts) for u in req4.survivors}
    t0 = time.perf_counter()
    result = server.unmask(replies)
    unmask = time.perf_counter() - t0
    assert np.array_equal(result.total, (x * np.uint32(len(result.survivors))))
    return {
        "k": params.degree,
        "t": params.threshold,
        "client_stage2": stage2,
        "client_stage3": statistics.median(stage3),
        "server_sum": collect,
        "server_unmask": unmask,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N <= 50 and d = 100k only")
    args = parser.parse_args()
    mask = bench_mask()
    print(f"mask expansion (AES-128-CTR, uint32): {mask * 1e3:.2f} ms per 1M params")
    separate, fused = bench_mask_sum(39)
    print(
        f"39 masks added to 1M params: one by one {separate * 1e3:.1f} ms, "
        f"accumulate_masks {fused * 1e3:.1f} ms"
    )
    enc, dec = bench_codec()
    print(f"codec, 1M params: encode {enc * 1e3:.1f} ms, decode a sum of 100 {dec * 1e3:.1f} ms\n")
    sizes = [10, 50] if args.quick else [10, 50, 100]
    dims = [100_000] if args.quick else [100_000, 1_000_000]
    header = (
        f"{'mode':<11}{'N':>5}{'d':>10}{'drop':>6}{'k':>5}{'t':>5}"
        f"{'cli st2 ms':>12}{'cli st3 ms':>12}{'srv sum ms':>12}{'srv unmask ms':>15}"
    )
    print(header)
    print("-" * len(header))
    for mode in ("secagg", "secaggplus"):
        for n in sizes:
            for d in dims:
                for drop in (0.0, DROPOUT_TOLERANCE / 2):
                    r = bench_round(n, d, mode, drop)
                    print(
                        f"{mode:<11}{n:>5}{d:>10}{drop:>6.0%}{r['k']:>5}{r['t']:>5}"
                        f"{r['client_stage2'] * 1e3:>12.1f}{r['client_stage3'] * 1e3:>12.1f}"
                        f"{r['server_sum'] * 1e3:>12.1f}{r['server_unmask'] * 1e3:>15.1f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()

"""Secure aggregation round vs plain round: fl-app's protocol and Flower's legacy SecAgg+.

For N ∈ {10, 50, 100} clients and P ∈ {100k, 1M} float32 parameters, four runs side by
side in one process, all on :class:`fl_app.runtime.inprocess.InProcessGrid` (clients one after
another, messages copied through Flower's record serialization) with trivial training
(a fixed update per client):

* fl-app plain and fl-app SecAgg (``scripts/bench_secagg.py``: the real
  :class:`~strategies.driver.RoundDriver` with and without
  :class:`~strategies.secagg.SecureAggregation`, SecAgg+ graph, 32-bit field);
* Flower's legacy plain FedAvg and legacy SecAgg+ (:mod:`benchmarks.legacy_secaggplus`:
  ``default_fit_workflow`` vs ``SecAggPlusWorkflow`` with the same graph degree and
  threshold).

Ratios are secure / plain of the same stack, round by round. The parallel-clients
estimate (round minus the summed client time plus, per stage, the slowest client) is
what a deployment with one machine per client would see.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.legacy_secaggplus import legacy_graph, legacy_rounds
from benchmarks.reuse import load_script
from benchmarks.section import Section, fmt_spread, time_left

__all__ = ["run"]

# Rough cost model of one legacy SecAgg+ round on this machine, used only to decide what
# fits in the time budget (never reported): pure-Python Shamir reconstruction on the
# server, ~n·t² (N=50, t=12: ~20 s), plus masks, ~n·(k+1)·P (N=100, 1M: ~40-90 s).
_LEGACY_S_PER_SHAMIR = 2.5e-3
_LEGACY_S_PER_MASK_ELEMENT = 2e-8
# Legacy secure configurations estimated above this many seconds a round run once.
_LEGACY_ONE_ROUND_ABOVE_S = 5.0


def _legacy_estimate_s(n: int, p: int) -> float:
    graph = legacy_graph(n)
    return (
        _LEGACY_S_PER_SHAMIR * n * graph.threshold**2
        + _LEGACY_S_PER_MASK_ELEMENT * n * (graph.degree + 1) * p
    )


def _ratios(secure: list[float], plain: list[float]) -> list[float]:
    return [s / p for s, p in zip(secure, plain, strict=False) if p > 0]


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _plain_note(measured: dict[tuple[int, int], dict[str, Any]], cells: list[Any]) -> str:
    """What the plain baselines cost at the largest cell, server side included."""
    n, p = cells[-1]
    m = measured[(n, p)]
    plain_server = _med(m["plain"]["server"])
    ours_server = _med(m["ours"]["server"])
    return (
        f"Plain baselines at N={n}, P={p:,}: fl-app plain {_med(m['plain']['round']):.2f} s a "
        f"round, of which {plain_server:.2f} s server side (RoundDriver and FedAvg's "
        f"ArrayRecord aggregation), against fl-app SecAgg's server side {ours_server:.2f} s "
        f"(summing uint32 vectors and decoding) and legacy plain "
        f"{_med(m['legacy_plain']['round']):.2f} s in all. So a fl-app ratio is "
        "relative to a slower plain round than Flower's legacy one, and a parallel-clients "
        "ratio below 1 means the secure round's server side is cheaper than plain FedAvg's: "
        "with one machine per client, secure aggregation then costs no extra round time."
    )


def _stage_note(
    measured: dict[tuple[int, int], dict[str, Any]],
    cells: list[Any],
    bench_steady: Callable[[list[Any]], list[Any]],
) -> str:
    """Per-stage exchange seconds (and the slowest client) at the largest cell."""
    n, p = cells[-1]
    per_round = measured[(n, p)]["ours"]["stages"]
    names = {"1": "advertise", "2": "share keys", "3": "masked input", "4": "unmask"}
    parts = []
    for label, rounds in (("round 1", per_round[:1]), ("steady", bench_steady(per_round))):
        stages = []
        for st in sorted({k for r in rounds for k in r}):
            vals = [r[st] for r in rounds if st in r]
            stages.append(
                f"{st} {names.get(st, st)} {_med([v['exchange'] for v in vals]):.3f} s "
                f"(clients {_med([v['client'] for v in vals]):.3f} s summed, slowest "
                f"{_med([v['slowest'] for v in vals]) * 1000:.1f} ms)"
            )
        parts.append(f"{label}: " + "; ".join(stages))
    return (
        f"Per stage at N={n}, P={p:,} (exchange seconds, i.e. instructions out and replies "
        "in, clients included; steady = rounds 2..R-1, whose stage 4 also carries the next "
        "round's stage 2): " + ". ".join(parts) + "."
    )


def run(quick: bool) -> Section:
    bench = load_script("bench_secagg")
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    flwr_log.propagate = False
    clients = [10, 50] if quick else [10, 50, 100]
    sizes = [100_000] if quick else [100_000, 1_000_000]
    rounds = 2 if quick else 5  # round 1 runs all four stages, later rounds two exchanges
    bench.one_config(3, 1000, True, 1)  # warm-up: imports, caches
    legacy_rounds(10, 1000, True, 1)

    cells = [(n, p) for p in sizes for n in clients]
    measured: dict[tuple[int, int], dict[str, Any]] = {}
    # First the cheap runs of every cell: fl-app plain and SecAgg, legacy plain.
    for n, p in cells:
        measured[(n, p)] = {
            "plain": bench.one_config_rounds(n, p, False, rounds),
            "ours": bench.one_config_rounds(n, p, True, rounds),
            "legacy_plain": legacy_rounds(n, p, False, rounds),
            "legacy": None,
            "floor": bench.floor_seconds(n, p),
        }
    # The malicious server model (signed keys, consistency check, complete graph: clients
    # refuse SecAgg+'s server-chosen graph) beside it; 3 rounds, so one steady round.
    mal_rounds = min(rounds, 3)
    for n, p in cells:
        measured[(n, p)]["malicious"] = bench.one_config_rounds(n, p, True, mal_rounds, "malicious")
    # Then legacy SecAgg+, cheapest first, as long as the section's time lasts.
    skipped: list[str] = []
    single: list[str] = []
    for n, p in sorted(cells, key=lambda c: _legacy_estimate_s(*c)):
        estimate = _legacy_estimate_s(n, p)
        legacy_n_rounds = rounds if estimate <= _LEGACY_ONE_ROUND_ABOVE_S else 1
        if estimate * legacy_n_rounds > time_left(1e9) - 5:
            skipped.append(f"N={n}, P={p:,} (estimated {estimate:.0f} s a round)")
            continue
        measured[(n, p)]["legacy"] = legacy_rounds(n, p, True, legacy_n_rounds)
        if legacy_n_rounds < rounds:
            single.append(f"N={n}, P={p:,}")

    rows: list[list[str]] = []
    data: list[dict[str, Any]] = []
    for n, p in cells:
        m = measured[(n, p)]
        plain, ours, legacy_plain, legacy = m["plain"], m["ours"], m["legacy_plain"], m["legacy"]
        steady = bench.steady
        our_ratio = _ratios(steady(ours["round"]), steady(plain["round"]))
        our_par = _ratios(steady(ours["critical"]), steady(plain["critical"]))
        first_par = ours["critical"][0] / plain["critical"][0]
        row = [
            str(n),
            f"{p:,}",
            fmt_spread(steady(plain["round"]), 3),
            fmt_spread(steady(ours["round"]), 3),
            fmt_spread(our_ratio, 2, "x"),
            f"{_med(our_par):.2f}x",
            f"{ours['round'][0]:.3f} ({first_par:.2f}x)",
            fmt_spread(steady(m["malicious"]["round"]), 3),
            f"{_med(steady(m['malicious']['round'])) / _med(steady(ours['round'])):.2f}x",
            f"{m['floor']['floor']:.3f}",
            fmt_spread(legacy_plain["round"], 3),
        ]
        err = float("nan")
        if legacy is not None:
            err = float(np.abs(legacy["model"] - legacy_plain["model"]).max())
            leg_ratio = _ratios(legacy["round"], legacy_plain["round"])
            leg_par = _ratios(legacy["critical"], legacy_plain["critical"])
            row += [
                fmt_spread(legacy["round"], 2),
                fmt_spread(leg_ratio, 1, "x"),
                f"{_med(leg_par):.1f}x",
                f"{_med(legacy['round']) / _med(ours['round']):.1f}x",
                f"k+1={legacy['num_shares']}, t={legacy['threshold']}",
            ]
        else:
            row += ["not run (budget)", "-", "-", "-", "-"]
        rows.append(row)
        data.append(
            {
                "clients": n,
                "params": p,
                "plain": plain,
                "fl_app_secagg": ours,
                "fl_app_secagg_malicious": m["malicious"],
                "legacy_plain": {k: v for k, v in legacy_plain.items() if k != "model"},
                "legacy_secaggplus": None
                if legacy is None
                else {k: v for k, v in legacy.items() if k != "model"},
                "legacy_max_abs_error": err,
                "floor": m["floor"],
            }
        )
    errors = [d["legacy_max_abs_error"] for d in data if d["legacy_secaggplus"] is not None]
    notes = [
        f"{rounds} rounds per configuration and stack, all in one process, clients "
        "sequential. fl-app columns are steady rounds (2..R-1, median [min-max]; the ratio is "
        "taken round by round): keys were advertised ahead in round 1 and each round's "
        "stage 2 rode on the previous round's unmask exchange, so a steady secure round is "
        "two message exchanges (masked input; unmask + next round's share keys) against "
        "plain FedAvg's one. 'round 1' is the first round (all four stages, plus the key "
        "batch), with its parallel-clients ratio. Legacy columns: median over its rounds. "
        "fl-app SecAgg is secagg.server_model=honest_but_curious (the default, SecAgg+ "
        f"graph); the malicious columns ran {mal_rounds} rounds (steady = rounds "
        "2..R-1) with secagg.server_model=malicious: Ed25519-signed keys, the "
        "consistency-check exchange and the complete graph (k = N-1).",
        "Floor: N mask expansions + N vector sums on one core (AES-128-CTR into one uint32 "
        "accumulator, then N uint32 additions), the least any masked sum of N inputs costs "
        "the server (it regenerates every survivor's self-mask).",
        _stage_note(measured, cells, bench.steady),
    ]
    if single:
        notes.append(
            "Legacy SecAgg+ ran 1 round (no spread) to fit the time budget at: "
            + "; ".join(single)
            + "."
        )
    if skipped:
        notes.append(
            "Legacy SecAgg+ not run (would not fit in the section's share of the time budget) at: "
            + "; ".join(skipped)
            + ". The last measured Flower figure (Flower 1.41, by hand): N=100, 1M: 19.6 s vs "
            "2.45 s plain (share count not recorded)."
        )
    if errors:
        notes.append(
            "Legacy SecAgg+ aggregate vs legacy plain aggregate: max |difference| "
            f"{max(errors):.1e} (its stochastic quantization, range 2^22 over ±8)."
        )
    notes += [
        "What bounds fl-app SecAgg: per client, k pairwise masks of P elements from AES-128-CTR "
        "(~0.6 ms per 1M on one core; mask expansion is split over up to 4 threads, 2 here), "
        "fixed-point encoding and the X25519/Shamir work for k neighbours; on the server, "
        "unmasking (regenerating one self-mask per survivor and summing uint32 vectors) and "
        "a second exchange's per-message cost. With clients in parallel only the slowest "
        "client of each stage counts.",
        "What bounds legacy SecAgg+: k+1 masks of P elements per client from "
        "np.random.RandomState (MT19937) seeded per pair, float64 stochastic quantization "
        "(~19 ms per 1M), int64 payloads, "
        "P-384 ECDH and pure-Python Shamir over GF(2^128) for every share; the server "
        "regenerates every survivor's self-mask.",
        _plain_note(measured, cells),
    ]
    return Section(
        title="Secure aggregation round vs plain, and vs Flower's legacy SecAgg+",
        columns=[
            "N",
            "params",
            "fl-app plain s",
            "fl-app SecAgg s",
            "fl-app ratio",
            "fl-app ratio, clients in parallel",
            "fl-app round 1 s (parallel ratio)",
            "fl-app SecAgg malicious s",
            "malicious / honest-but-curious",
            "floor s",
            "legacy plain s",
            "legacy SecAgg+ s",
            "legacy ratio",
            "legacy ratio, clients in parallel",
            "legacy SecAgg+ / fl-app SecAgg",
            "SecAgg+ graph",
        ],
        rows=rows,
        notes=notes,
        data={"cells": data, "finished_at": time.time()},
    )

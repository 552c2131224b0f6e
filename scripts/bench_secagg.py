"""Round time of fl-app's secure aggregation vs plain FedAvg on the same in-process Grid.

Both runs use the real :class:`~strategies.driver.RoundDriver` (FedAvg, example-weighted
mean) and :class:`~fl_app.runtime.inprocess.InProcessGrid` with Flower's record serialization;
clients do trivial training (a fixed random update of ``P`` float32 parameters, norm
below the clip bound) so the table shows the protocol's cost, not torch's:

* plain: the client replies with its update;
* secagg: stages 1, 2, 4 run the ClientApp's real torch-free handlers
  (:mod:`fl_app.secagg.client`); stage 3 runs the real encode and mask stages
  (:class:`~fl_app.secagg.client.MaskedInputStage`) on the same update.

Columns: median round seconds; client compute (sum over clients of handler time: the
in-process Grid runs clients one after another), serialization (exchange time minus
client time: record copies both ways), server compute (round minus exchange time);
ratio = secagg / plain, measured side by side in one process. The last column estimates
a deployment where clients run in parallel: the round minus the summed client time plus,
per stage, the slowest client.

    .venv/bin/python scripts/bench_secagg.py            # N in {10, 50, 100}, P in {100k, 1M}
    .venv/bin/python scripts/bench_secagg.py --quick    # N in {10, 50}, P = 100k, 1 repeat
    .venv/bin/python scripts/bench_secagg.py --server-model malicious  # signed keys + check

Flower's legacy SecAgg+ workflow is not run here: ``benchmarks/legacy_secaggplus.py``
runs it on the same in-process Grid with the same fixed updates (:func:`fixed_update`),
and ``python -m benchmarks --only secagg`` puts the three side by side.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fl_app.protocol import METRICS_KEY, NUM_EXAMPLES, SERVER_ROUND, UPDATE_KEY
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.secagg.client import MaskedInputStage, handle_key_stage, secagg_stage
from fl_app.secagg.params import GraphMode, ServerModel
from fl_app.secagg.settings import SecAggSettings
from fl_app.weights import from_array_record, to_array_record
from strategies.driver import RoundDriver
from strategies.driver_types import DriverSettings
from strategies.sampling import FixedSizeSampler
from strategies.secagg import SecureAggregation

CLIP = 10.0


class Timer:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls: list[tuple[Any, float]] = []

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.seconds += dt
                msg = args[0] if args and isinstance(args[0], Message) else None
                batch = args[1] if len(args) > 1 else None  # RoundDriver._exchange(grid, msgs)
                if msg is None and isinstance(batch, list) and batch:
                    msg = batch[0] if isinstance(batch[0], Message) else None
                self.calls.append((secagg_stage(msg) if msg is not None else None, dt))

        return timed


_UPDATES: dict[tuple[int, int], dict[str, np.ndarray]] = {}


def fixed_update(arrays: dict[str, np.ndarray], node: int) -> dict[str, np.ndarray]:
    """The client's "trained" update: drawn once per (node, size), so training costs ~0.

    Also the update of the legacy SecAgg+ baseline (``benchmarks/legacy_secaggplus.py``),
    so both protocols aggregate the same numbers.
    """
    key = (node, sum(v.size for v in arrays.values()))
    if key not in _UPDATES:
        rng = np.random.default_rng(node % 2**32)
        _UPDATES[key] = {
            k: (rng.standard_normal(v.shape) * (0.5 * CLIP / np.sqrt(v.size))).astype(v.dtype)
            for k, v in arrays.items()
        }
    return _UPDATES[key]


def make_client(timer: Timer) -> ClientApp:
    app = ClientApp()

    @app.train()
    @timer.wrap
    def train(msg: Message, context: Context) -> Message:
        stage = secagg_stage(msg)
        if stage is not None and stage != 3:  # key stages, consistency check, unmask
            return handle_key_stage(msg, context, stage)
        arrays = from_array_record(msg.content.array_records["arrays"])
        rnd = int(msg.content.config_records["config"][SERVER_ROUND])  # type: ignore[arg-type]
        update = fixed_update(arrays, int(context.node_id))
        if stage is None:
            metrics = MetricRecord({NUM_EXAMPLES: 100, SERVER_ROUND: rnd, "train-loss": 1.0})
            return Message(
                RecordDict({UPDATE_KEY: to_array_record(update), METRICS_KEY: metrics}),
                reply_to=msg,
            )
        secure = MaskedInputStage.from_instruction(msg, context)
        encoded = secure.encode(update, num_examples=100, loss=1.0, accuracy=0.5, unclipped=0.0)
        return secure.reply(msg, secure.mask(encoded, context))

    return app


def one_config(
    n: int, params: int, secure: bool, rounds: int, server_model: str = "honest_but_curious"
) -> dict[str, float]:
    """Medians over ``rounds`` rounds of :func:`one_config_rounds`."""
    return {
        k: statistics.median(v)
        for k, v in one_config_rounds(n, params, secure, rounds, server_model).items()
    }


def one_config_rounds(
    n: int, params: int, secure: bool, rounds: int, server_model: str = "honest_but_curious"
) -> dict[str, list[float]]:
    """Run ``rounds`` rounds of one configuration; every measure, round by round.

    ``server_model``: ``secagg.server_model`` of the secure runs (``malicious`` adds the
    signed keys and the consistency-check exchange, on the complete graph).
    """
    timer = Timer()
    grid = InProcessGrid(make_client(timer), n, seed=0)
    arrays = {"w": np.zeros(params, dtype=np.float32)}
    model = ServerModel(server_model)
    # The malicious model runs on the complete graph only (clients refuse SecAgg+'s).
    mode = GraphMode.secagg if model is ServerModel.malicious else GraphMode.secaggplus
    secagg = (
        SecureAggregation(SecAggSettings(mode=mode, clip=CLIP, bits=32, server_model=model))
        if secure
        else None
    )
    driver = RoundDriver(
        FedAvg(fraction_train=1.0, min_train_nodes=0, min_available_nodes=0),
        train_sampler=FixedSizeSampler(1.0, 0),
        evaluate_sampler=None,
        settings=DriverSettings(num_rounds=rounds, min_available_nodes=1),
        secagg=secagg,
    )
    exchange = Timer()
    driver._exchange = exchange.wrap(driver._exchange)  # type: ignore[method-assign]
    out: dict[str, list[Any]] = {
        "round": [],
        "client": [],
        "ser": [],
        "server": [],
        "critical": [],
        # Per round: {stage: {"exchange": s, "client": summed s, "slowest": s}}.
        "stages": [],
    }
    try:
        for rnd in range(1, rounds + 1):
            timer.seconds = exchange.seconds = 0.0
            timer.calls = []
            exchange.calls = []
            t0 = time.perf_counter()
            arrays, report = driver.run_round(grid, rnd, arrays, node_ids=grid.node_ids)
            wall = time.perf_counter() - t0
            assert report.model_updated, report.note
            out["round"].append(wall)
            out["client"].append(timer.seconds)
            out["ser"].append(exchange.seconds - timer.seconds)
            out["server"].append(wall - exchange.seconds)
            # Clients in parallel (deployment): the slowest client of each stage.
            slowest: dict[Any, float] = {}
            summed: dict[Any, float] = {}
            for stage, dt in timer.calls:
                slowest[stage] = max(slowest.get(stage, 0.0), dt)
                summed[stage] = summed.get(stage, 0.0) + dt
            out["critical"].append(wall - timer.seconds + sum(slowest.values()))
            out["stages"].append(
                {
                    str(stage): {
                        "exchange": dt,
                        "client": summed.get(stage, 0.0),
                        "slowest": slowest.get(stage, 0.0),
                    }
                    for stage, dt in exchange.calls
                }
            )
    finally:
        grid.close()
    return out


def floor_seconds(n: int, params: int, repeats: int = 3) -> dict[str, float]:
    """The issue's floor of a secure round: ``n`` mask expansions + ``n`` vector sums.

    One core (``threads=1``): ``n`` AES-128-CTR masks of ``params`` uint32 added into one
    accumulator, and ``n`` uint32 vectors of ``params`` summed. The minimum over
    ``repeats`` runs of each.
    """
    import os

    from fl_app.secagg.masks import MaskDomain, accumulate_masks

    seeds = [(os.urandom(32), MaskDomain.self_mask) for _ in range(n)]
    acc = np.zeros(params, dtype=np.uint32)
    vectors = [np.full(params, i, dtype=np.uint32) for i in range(min(n, 8))]
    expand, add = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        accumulate_masks(acc, 32, add=seeds, threads=1)
        expand.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(n):
            np.add(acc, vectors[i % len(vectors)], out=acc)
        add.append(time.perf_counter() - t0)
    return {"expand": min(expand), "sum": min(add), "floor": min(expand) + min(add)}


def steady(values: list[Any]) -> list[Any]:
    """Mid-run rounds: 2..R-1 (keys advertised ahead, stage 2 shared ahead, and the next
    round's stage 2 riding on stage 4, which the last round lacks); fewer rounds: 2..R,
    or all."""
    if len(values) > 2:
        return values[1:-1]
    return values[1:] if len(values) > 1 else values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N in {10, 50}, 100k params, 1 round")
    ap.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds per configuration: round 1 runs all four stages, later rounds two "
        "exchanges (the median of rounds 2..R-1 is reported as steady)",
    )
    ap.add_argument("--clients", type=int, nargs="*", default=None)
    ap.add_argument("--params", type=int, nargs="*", default=None)
    ap.add_argument(
        "--server-model",
        choices=[m.value for m in ServerModel],
        default=ServerModel.honest_but_curious.value,
        help="secagg.server_model of the secure runs",
    )
    args = ap.parse_args()
    clients = args.clients or ([10, 50] if args.quick else [10, 50, 100])
    params = args.params or ([100_000] if args.quick else [100_000, 1_000_000])
    rounds = 2 if args.quick else args.rounds
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    flwr_log.propagate = False
    one_config(3, 1000, True, 1)  # warm-up: imports, caches
    print(
        "| N | params | plain round s | secagg round s (steady) | ratio | secagg client s "
        "(sum / per client) | secagg serialization s | secagg server s | plain client / ser "
        "/ server s | clients in parallel: plain / secagg s (ratio) | round 1: secagg s "
        "(parallel ratio) | floor s: N masks + N sums |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in params:
        for n in clients:
            plain_r = one_config_rounds(n, p, False, rounds)
            sec_r = one_config_rounds(n, p, True, rounds, args.server_model)
            plain = {k: statistics.median(steady(v)) for k, v in plain_r.items() if k != "stages"}
            sec = {k: statistics.median(steady(v)) for k, v in sec_r.items() if k != "stages"}
            first = sec_r["critical"][0] / plain_r["critical"][0]
            fl = floor_seconds(n, p)
            print(
                f"| {n} | {p:,} | {plain['round']:.3f} | {sec['round']:.3f} | "
                f"{sec['round'] / plain['round']:.2f}x | {sec['client']:.3f} / "
                f"{sec['client'] / n * 1000:.1f} ms | {sec['ser']:.3f} | {sec['server']:.3f} | "
                f"{plain['client']:.3f} / {plain['ser']:.3f} / {plain['server']:.3f} | "
                f"{plain['critical']:.3f} / {sec['critical']:.3f} "
                f"({sec['critical'] / plain['critical']:.2f}x) | {sec_r['round'][0]:.3f} "
                f"({first:.2f}x) | {fl['floor']:.3f} |",
                flush=True,
            )
            for label, per_round in (
                ("round 1", sec_r["stages"][:1]),
                ("steady", steady(sec_r["stages"])),
            ):
                names = sorted({st for r in per_round for st in r})
                parts = []
                for st in names:
                    vals = [r[st] for r in per_round if st in r]
                    ex = statistics.median(v["exchange"] for v in vals)
                    sl = statistics.median(v["slowest"] for v in vals)
                    parts.append(f"stage {st}: {ex:.3f} s (slowest client {sl * 1000:.1f} ms)")
                print(f"  {label}: " + "; ".join(parts))


if __name__ == "__main__":
    main()

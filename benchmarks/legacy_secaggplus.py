"""Baseline: Flower 1.41's *legacy* SecAgg+ vs legacy plain FedAvg, on fl-app's in-process Grid.

The only place in fl-app that uses Flower's legacy API (``flwr.server.workflow``,
``flwr.client.mod.secaggplus_mod``, ``NumPyClient``, ``flwr.server.strategy.FedAvg``):
it is the baseline the ``secagg`` section compares fl-app's own secure aggregation
against, never part of the app.

Harness, chosen so the comparison with ``scripts/bench_secagg.py`` is apples to
apples:

* the same :class:`fl_app.runtime.inprocess.InProcessGrid` (clients run one after another in
  this process, every message copied through Flower's record serialization), instead
  of ``run_simulation`` on Ray, whose start-up and actor scheduling would dominate;
* the same update: each client's ``fit`` returns
  ``bench_secagg.fixed_update`` (float32, drawn once per node and size), so training
  costs nothing and both protocols sum the same numbers;
* the same SecAgg+ graph: ``num_shares = k + 1`` and ``reconstruction_threshold = t``
  from :func:`fl_app.secagg.derive.derive_params` for the cohort with fl-app's default
  tolerances (20 % dropouts, 10 % corrupt), so both protocols do the same number of
  key agreements and Shamir shares per client;
* the same round structure minus evaluation: parameter initialisation once (from the
  strategy), then ``fit`` rounds, each ``default_fit_workflow`` (plain) or
  ``SecAggPlusWorkflow`` (secure) under a :class:`LegacyContext`, timed one by one
  (``DefaultWorkflow`` would add federated and centralised evaluation).

The parallel-clients estimate is computed as in ``bench_secagg``: the round minus the
summed client time plus, per protocol stage, the slowest client.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.default_workflows import (
    default_fit_workflow,
    default_init_params_workflow,
)

from benchmarks.reuse import load_script
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.secagg.derive import derive_params
from fl_app.secagg.params import GraphMode, SecAggParams

__all__ = ["legacy_graph", "legacy_rounds"]

# fl-app's SecAggSettings defaults, so the graph matches the one fl-app derives.
_DROPOUT_TOLERANCE = 0.2
_CORRUPT_FRACTION = 0.1


class _FixedUpdateClient(NumPyClient):
    def __init__(self, node_id: int, update: Callable[..., dict[str, np.ndarray]]) -> None:
        self._node_id = node_id
        self._update = update

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        arrays = {"w": parameters[0]}
        return [self._update(arrays, self._node_id)["w"]], 100, {}


def legacy_graph(n: int) -> SecAggParams:
    """The SecAgg+ graph (degree k, threshold t) fl-app derives for ``n`` clients."""
    return derive_params(
        n,
        mode=GraphMode.secaggplus,
        dropout_tolerance=_DROPOUT_TOLERANCE,
        corrupt_fraction=_CORRUPT_FRACTION,
    )


def _stage(msg: Message) -> str:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None:
        return "fit"
    return str(configs.get(Key.STAGE, "fit"))


def _client_app(secure: bool, calls: list[tuple[str, float]]) -> ClientApp:
    update = load_script("bench_secagg").fixed_update

    def timing_mod(
        msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        # Outermost mod: the whole client-side cost of a message, SecAgg+ included.
        t0 = time.perf_counter()
        try:
            return call_next(msg, context)
        finally:
            calls.append((_stage(msg), time.perf_counter() - t0))

    def client_fn(context: Context) -> Any:
        return _FixedUpdateClient(int(context.node_id), update).to_client()

    mods: list[Any] = [timing_mod, secaggplus_mod] if secure else [timing_mod]
    return ClientApp(client_fn=client_fn, mods=mods)


def legacy_rounds(n: int, params: int, secure: bool, rounds: int) -> dict[str, Any]:
    """Run ``rounds`` legacy fit rounds of ``n`` clients and ``params`` float32 parameters.

    Returns per-round lists ``round`` (seconds), ``client`` (summed client seconds),
    ``critical`` (parallel-clients estimate), the final aggregate ``model`` and the
    SecAgg+ ``num_shares``/``threshold`` used.
    """
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    flwr_log.propagate = False
    calls: list[tuple[str, float]] = []
    grid = InProcessGrid(_client_app(secure, calls), n, seed=0)
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_evaluate_clients=0,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([np.zeros(params, dtype=np.float32)]),
    )
    context = LegacyContext(
        context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy,
    )
    graph = legacy_graph(n)
    workflow: Callable[[Any, Context], None] = (
        SecAggPlusWorkflow(num_shares=graph.degree + 1, reconstruction_threshold=graph.threshold)
        if secure
        else default_fit_workflow
    )
    out: dict[str, Any] = {"round": [], "client": [], "critical": []}
    thread, stop, registered = start_update_client_manager_thread(grid, context.client_manager)
    try:
        registered.wait()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy API deprecation warnings
            default_init_params_workflow(grid, context)
            cfg = ConfigRecord()
            cfg[WorkflowKey.START_TIME] = time.time()
            context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            for rnd in range(1, rounds + 1):
                cfg[WorkflowKey.CURRENT_ROUND] = rnd
                calls.clear()
                t0 = time.perf_counter()
                workflow(grid, context)
                wall = time.perf_counter() - t0
                client = sum(dt for _, dt in calls)
                slowest: dict[str, float] = {}
                for stage, dt in calls:
                    slowest[stage] = max(slowest.get(stage, 0.0), dt)
                out["round"].append(wall)
                out["client"].append(client)
                out["critical"].append(wall - client + sum(slowest.values()))
                if len(calls) < n:
                    raise RuntimeError(
                        f"legacy round {rnd}: {len(calls)} client calls for {n} clients "
                        f"(client errors: {grid.errors[:1]})"
                    )
    finally:
        stop.set()
        thread.join()
        grid.close()
    record: ArrayRecord = context.state.array_records[MAIN_PARAMS_RECORD]
    out["model"] = next(iter(record.values())).numpy()
    out["num_shares"] = graph.degree + 1
    out["threshold"] = graph.threshold
    return out

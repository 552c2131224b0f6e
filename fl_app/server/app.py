"""fl-app's ServerApp (Flower Message API: ``@app.main``).

Two ways in, one way through:

* simulation (``fl-app simulate``): :func:`make_server_app` takes the validated
  config and the run directory (``run_simulation`` leaves ``Context.run_config``
  empty, so configuration travels through the factory);
* deployment (``flwr run``): the module-level :data:`app` composes the Hydra config
  from the bundle's ``configs/`` given the ``hydra-config-name`` and
  ``hydra-overrides`` run-config keys, validates it, and runs the same code.

Both end in :func:`run_experiment`, which puts a run together: it opens the run
directory (:mod:`fl_app.server.session`, fresh or resumed), wires the round driver
with the run's listeners (:mod:`fl_app.server.listeners`), runs it, and finishes the
run (``summary.json``: :mod:`fl_app.server.summary`; terminal lines:
:mod:`fl_app.server.progress`). See docs/architecture.md, "Server".
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_app.client_spec import ClientDpSpec, encode_spec, spec_from_config
from fl_app.compression import RandK
from fl_app.compression_sketch import CountSketch
from fl_app.compression_topk import TopK
from fl_app.config.compose import compose_plan, parse_overrides
from fl_app.config.plan import RunPlan, resolve
from fl_app.config.schema import Accountant, AppConfig, ClippingMode, ClipSide, ShareCompression
from fl_app.protocol import SPEC_KEY
from fl_app.server.checkpoint import restore_strategy_state
from fl_app.server.layout import RunLayout
from fl_app.server.listeners import CheckpointWriter, LedgerWriter, StepsSeen, node_config_fn
from fl_app.server.progress import ProgressPrinter, print_run_end, print_run_start
from fl_app.server.rundir import MetricsWriter
from fl_app.server.session import RunSession, finish_run, open_run, record_crash
from fl_app.server.tracking import open_tracker
from fl_app.share_layers import split_shared
from strategies.aggregators import MeanAggregator
from strategies.dp_aggregators import AccountedDp
from strategies.dpsgd_forecast import DpSgdForecast
from strategies.driver import ReleaseHook, RoundDriver
from strategies.driver_types import RoundListener
from strategies.factory import build_driver
from strategies.local_dp import LocalDp
from strategies.noise_schedule import client_schedule_spec

__all__ = [
    "AUDIT_KEY_PASSPHRASE_ENV",
    "app",
    "configure_logging",
    "initial_arrays",
    "initial_model",
    "load_audit_signing_key",
    "make_server_app",
    "run_experiment",
]

log = logging.getLogger("fl_app.server")


def configure_logging(cfg: AppConfig) -> None:
    """Flower's log lines once (no double printing through Hydra's root handler)."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    flwr_logger.setLevel(cfg.runtime.flower_log_level.upper())


AUDIT_KEY_PASSPHRASE_ENV = "FL_APP_AUDIT_KEY_PASSPHRASE"


def load_audit_signing_key(cfg: AppConfig) -> Any:
    """The Ed25519 key of ``cfg.audit_signing_key`` (None when unset).

    The passphrase of an encrypted key is read from ``$FL_APP_AUDIT_KEY_PASSPHRASE``
    (never from the config). Raises :class:`ConfigError` naming the field when the
    key cannot be loaded, before anything of the run is written.
    """
    if cfg.audit_signing_key is None:
        return None
    from fl_app.audit import AuditKeyError, load_signing_key
    from fl_app.config.errors import ConfigError

    env = AUDIT_KEY_PASSPHRASE_ENV if os.environ.get(AUDIT_KEY_PASSPHRASE_ENV) else None
    try:
        return load_signing_key(cfg.audit_signing_key, passphrase_env=env)
    except AuditKeyError as err:
        raise ConfigError(
            "audit_signing_key",
            cfg.audit_signing_key,
            f"{err} (an encrypted key's passphrase goes in ${AUDIT_KEY_PASSPHRASE_ENV})",
        ) from None


def _server_evaluator(cfg: AppConfig) -> Any:
    """Centralised evaluation on the held-out test split, or None when disabled."""
    if not cfg.server_eval:
        return None
    import torch

    from fl_app.data import check_data_shape, load_server_test_set
    from fl_app.models import build_model
    from fl_app.server.fairness import class_metrics
    from fl_app.training import evaluate
    from fl_app.weights import load_ndarrays

    test = load_server_test_set(cfg.dataset, cfg.seed)
    if test is None or len(test) == 0:
        raise ValueError(
            "server_eval=true but the dataset has no server-side test split; set "
            "server_eval=false or dataset.test_fraction > 0"
        )
    check_data_shape(test, cfg.dataset)
    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=0)
    # Layers outside share.layers are not in the global model: the server evaluates its
    # shared layers with those layers' initial values (docs/personalization.md).
    _shared, kept = split_shared(initial_model(cfg), list(cfg.share.layers))

    def evaluate_fn(rnd: int, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        load_ndarrays(model, {**kept, **arrays})
        with torch.no_grad():
            stats = evaluate(model, test.x, test.y)
        # Per class too (fairness indicators): the released model on the server's own data.
        per_class = class_metrics(model, test.x, test.y, cfg.dataset.num_classes)
        return {"loss": float(stats.loss), "accuracy": float(stats.accuracy), **per_class}

    return evaluate_fn


def initial_model(cfg: AppConfig) -> dict[str, np.ndarray]:
    """Every layer of the initial model, initialised deterministically from ``cfg.seed``."""
    from fl_app.models import build_model
    from fl_app.weights import model_to_ndarrays

    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=cfg.seed)
    return model_to_ndarrays(model)


def initial_arrays(cfg: AppConfig) -> dict[str, np.ndarray]:
    """The initial global model: the layers that leave the sites (``share.layers``; all by
    default). The others stay at the sites and are never part of the global model."""
    shared, _kept = split_shared(initial_model(cfg), list(cfg.share.layers))
    return shared


def run_experiment(
    grid: Grid,
    cfg: AppConfig | RunPlan,
    run_dir: str | os.PathLike[str],
    *,
    extra_listeners: tuple[RoundListener, ...] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``cfg.num_rounds`` rounds on ``grid`` and write the run directory.

    With ``cfg.resume`` the run continues in that directory (``run_dir`` is ignored)
    from its newest checkpoint, or from ``cfg.rollback_to``'s (:mod:`fl_app.server.resume`).

    ``cfg`` is a config (resolved here) or the plan the caller resolved from it, so
    that a process resolves a run's plan once (docs/architecture.md, Configuration).

    Returns the summary (also written to ``summary.json``).
    """
    plan = cfg if isinstance(cfg, RunPlan) else resolve(cfg)
    configure_logging(plan.cfg)
    t0 = time.perf_counter()
    run = open_run(plan, run_dir, load_audit_signing_key(plan.cfg), initial_arrays)
    try:  # MLflow / TensorBoard (off by default): an unreachable one stops the run here
        tracker = open_tracker(plan.cfg, run.rd.path, run.rd.model_path)
    except BaseException as err:
        record_crash(run, None, err, time.perf_counter() - t0)
        raise
    if progress:
        print_run_start(run)
    wired = _wire_driver(run, (*extra_listeners, *tracker.listeners), progress)
    try:
        result = wired.driver.run(grid, run.arrays, start_round=run.start_round)
    except BaseException as err:
        record_crash(run, wired.ledger_writer, err, time.perf_counter() - t0)
        tracker.crash()
        raise
    summary = finish_run(
        run, result, wired.ledger_writer, wired.checkpoints.initial_server_metrics, t0
    )
    tracker.finish(summary, run.rd)
    if progress:
        print_run_end(run, summary, result)
    return summary


@dataclass
class _Wired:
    """The round driver and the run's own listeners it was built with."""

    driver: RoundDriver
    ledger_writer: LedgerWriter | None
    checkpoints: CheckpointWriter


def _wire_driver(
    run: RunSession, extra_listeners: tuple[RoundListener, ...], progress: bool
) -> _Wired:
    """Build the round driver with the run's hooks and listeners, in the order the
    guarantees need: the ledger (and its audit record) on disk before a round's
    instructions go out, checkpoint files before its model leaves, the checkpoint
    sealed after the round's metrics, ledger and audit records."""
    cfg, rd, audit, aggregator, plan = run.cfg, run.rd, run.audit, run.aggregator, run.plan
    spec = _client_spec(run)
    steps_seen = (
        StepsSeen.restored(plan.checkpoint.server_state) if plan is not None else StepsSeen()
    )
    listeners: list[RoundListener] = [MetricsWriter(rd.metrics_path), steps_seen, audit]
    ledger_writer = None
    begin_hooks = []
    if not isinstance(aggregator, MeanAggregator):
        ledger_writer = LedgerWriter(rd.layout.ledger, aggregator)
        listeners.insert(0, ledger_writer)
        begin_hooks.append(ledger_writer.on_round_begin)
        # The audit log records the spend just written, before instructions go out.
        begin_hooks.append(lambda rnd: audit.ledger_spend(rnd, aggregator.ledger, rd.layout.ledger))
    release_first: list[ReleaseHook] = []
    if ledger_writer is not None and isinstance(aggregator, LocalDp):
        # Local DP counts releases as replies arrive: on disk before anything else.
        writer = ledger_writer
        release_first.append(lambda rnd, arrays, train: writer.write())
    if progress:
        listeners.append(ProgressPrinter(cfg.num_rounds))
    checkpoints = CheckpointWriter(cfg, rd, run.run_key, audit, aggregator, steps_seen)
    # Sealed after the round's metrics, ledger and audit records.
    listeners.insert(listeners.index(audit) + 1, checkpoints)
    listeners.extend(extra_listeners)
    driver = build_driver(
        run.run_plan,
        train_config={SPEC_KEY: spec},
        evaluate_config={SPEC_KEY: spec},
        evaluate_fn=_server_evaluator(cfg),
        listeners=listeners,
        node_config_fn=node_config_fn(
            steps_seen if cfg.privacy.record_level else None,
            aggregator if isinstance(aggregator, LocalDp) else None,
        ),
        aggregator=aggregator,
        round_begin_hooks=begin_hooks,
        release_hooks=[*release_first, checkpoints.write_files],
    )
    driver.budget_forecast = _budget_forecast(cfg)
    driver.compressor = _compressor(cfg, run.run_key)
    if ShareCompression(cfg.share.compression) is ShareCompression.topk:
        driver.sparse = TopK(float(cfg.share.ratio))  # scattered per reply (docs/compression.md)
    checkpoints.strategy = driver.strategy
    if plan is not None:
        restore_strategy_state(driver.strategy, plan.checkpoint.strategy_arrays, run.arrays)
        checkpoints.initial_server_metrics = dict(
            plan.checkpoint.server_state["initial_server_metrics"]
        )
    checkpoints.driver = driver
    return _Wired(driver, ledger_writer, checkpoints)


def _compressor(cfg: AppConfig, run_key: str) -> RandK | CountSketch | None:
    """random-k's public per-round mask or the count sketch's public per-round hashes for
    this run (share.compression; docs/compression.md); None without compression and under
    top-k (its replies are scattered one by one)."""
    comp = ShareCompression(cfg.share.compression)
    if comp is ShareCompression.sketch:
        return CountSketch(run_key, float(cfg.share.ratio), int(cfg.share.sketch_rows))
    if comp is not ShareCompression.randk:
        return None
    return RandK(run_key, float(cfg.share.ratio))


def _budget_forecast(cfg: AppConfig) -> DpSgdForecast | None:
    """DP-SGD clients refuse a round past ``privacy.dpsgd.max_epsilon``: the driver
    forecasts it from their public metrics and stops before a round nobody could train."""
    d = cfg.privacy.dpsgd
    if not cfg.privacy.record_level or d.max_epsilon is None:
        return None
    return DpSgdForecast(float(d.max_epsilon), float(d.delta), d.accountant.value)


def _client_spec(run: RunSession) -> str:
    """The encoded instructions every client receives (run key, privacy duties)."""
    client_spec = spec_from_config(run.cfg, run.run_key, _client_dp_spec(run.aggregator))
    state_dir = str(RunLayout(Path(run.rd.path).resolve()).client_state)
    if client_spec.dpsgd is not None and client_spec.dpsgd.state_dir is None:
        # Simulation default; real SuperNodes pass --node-config "dp-state-dir=...".
        client_spec.dpsgd = dataclasses.replace(client_spec.dpsgd, state_dir=state_dir)
    if client_spec.client_dp is not None and client_spec.client_dp.local_noise_multiplier:
        # Local DP's release counts live there too (LocalDpStore), across restarts.
        client_spec.client_dp = dataclasses.replace(client_spec.client_dp, state_dir=state_dir)
    # The layers a site keeps (share.layers) persist there too, across restarts.
    client_spec.share_state_dir = state_dir
    return encode_spec(client_spec)


def _client_dp_spec(aggregator: MeanAggregator | AccountedDp | LocalDp) -> ClientDpSpec | None:
    """What clients must do for client-level DP (None: send raw updates)."""
    if isinstance(aggregator, MeanAggregator):
        return None
    s = aggregator.settings
    if isinstance(aggregator, LocalDp):
        return ClientDpSpec(
            local_noise_multiplier=s.noise_multiplier,
            delta=s.delta,
            accountant=Accountant(s.accountant.value),
            max_epsilon=s.max_epsilon,
        )
    if s.clip_side is ClipSide.client:
        return ClientDpSpec(
            report_unclipped=s.clipping is ClippingMode.adaptive,
            delta=s.delta,
            accountant=Accountant(s.accountant.value),
            # Distributed DP under a noise schedule: each client checks its round's z.
            ddp_schedule=client_schedule_spec(s),
        )
    return None


def make_server_app(cfg: AppConfig | RunPlan, run_dir: str | os.PathLike[str]) -> ServerApp:
    """A ServerApp bound to a validated config or its plan (for ``run_simulation``,
    which runs it in a thread of this process: the plan is not re-resolved)."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_experiment(grid, cfg, run_dir)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under ``flwr run``: compose the config from the bundle's configs/."""
    rc = context.run_config
    plan = compose_plan(
        str(rc.get("hydra-config-name", "config") or "config"),
        parse_overrides(str(rc.get("hydra-overrides", ""))),
    )
    run_dir = str(rc.get("run-dir", "") or "")
    if not run_dir:
        base = Path(os.environ.get("FL_APP_RUNS_DIR", "outputs"))
        run_dir = str(base / "flwr" / f"run-{context.run_id}")
    log.warning("fl-app run %s writes to %s", context.run_id, Path(run_dir).resolve())
    summary = run_experiment(grid, plan, run_dir)
    if summary["status"] == "failed":
        # Flower then records the run as finished:failed (what `flwr ls` and
        # `fl-app deploy submit` report) instead of a success that trained nothing.
        raise RuntimeError(f"fl-app run failed: {summary['status_reason']}")

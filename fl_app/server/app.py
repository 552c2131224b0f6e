"""fl-app's ServerApp (Flower Message API: ``@app.main``).

Two ways in, one way through:

* simulation (``fl-app simulate``): :func:`make_server_app` takes the validated
  config and the run directory (``run_simulation`` leaves ``Context.run_config``
  empty, so configuration travels through the factory);
* deployment (``flwr run``): the module-level :data:`app` composes the Hydra config
  from the bundle's ``configs/`` given the ``hydra-config-name`` and
  ``hydra-overrides`` run-config keys, validates it, and runs the same code.

Both end in :func:`run_experiment`, which owns building the model, strategy and round
driver, centralised evaluation, and the run directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_app.atomic import write_atomic
from fl_app.client_spec import ClientDpSpec, encode_spec, spec_from_config
from fl_app.config.compose import compose_config, parse_overrides
from fl_app.config.plan import resolve
from fl_app.config.schema import Accountant, AppConfig, ClippingMode, ClipSide
from fl_app.privacy.accounting import AccountingError
from fl_app.privacy.ledger import FederationLedger, branch_delta_total, unsampled_epsilon
from fl_app.privacy.noise import release_status
from fl_app.protocol import SPEC_KEY
from fl_app.server.checkpoint import (
    in_model_order,
    plan_resume,
    prune_checkpoints,
    restore_strategy_state,
    seal_checkpoint,
    set_aside_abandoned,
    strategy_state,
    write_checkpoint_files,
)
from fl_app.server.layout import AUDIT_FILE, LEDGER_FILE, RunLayout
from fl_app.server.rundir import (
    AuditTrail,
    MetricsWriter,
    ProgressPrinter,
    RunDirectory,
    read_round_records,
    run_outcome,
)
from strategies.aggregators import MeanAggregator
from strategies.dp_aggregators import AccountedDp
from strategies.dp_projection import projection_lines
from strategies.driver import (
    DriverResult,
    ReleaseHook,
    RoundDriver,
    RoundListener,
    RoundReport,
    StageReport,
)
from strategies.factory import build_aggregator, build_driver
from strategies.local_dp import LocalDp

__all__ = [
    "AUDIT_KEY_PASSPHRASE_ENV",
    "app",
    "configure_logging",
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

    def evaluate_fn(rnd: int, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        load_ndarrays(model, arrays)
        with torch.no_grad():
            stats = evaluate(model, test.x, test.y)
        return {"loss": float(stats.loss), "accuracy": float(stats.accuracy)}

    return evaluate_fn


def initial_arrays(cfg: AppConfig) -> dict[str, np.ndarray]:
    """The initial global model, initialised deterministically from ``cfg.seed``."""
    from fl_app.models import build_model
    from fl_app.weights import model_to_ndarrays

    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=cfg.seed)
    return model_to_ndarrays(model)


def run_experiment(
    grid: Grid,
    cfg: AppConfig,
    run_dir: str | os.PathLike[str],
    *,
    extra_listeners: tuple[RoundListener, ...] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``cfg.num_rounds`` rounds on ``grid`` and write the run directory.

    With ``cfg.resume`` the run continues in that directory (``run_dir`` is ignored)
    from its newest checkpoint, or from ``cfg.rollback_to``'s (:mod:`fl_app.server.checkpoint`).

    Returns the summary (also written to ``summary.json``).
    """
    configure_logging(cfg)
    t0 = time.perf_counter()
    signing_key = load_audit_signing_key(cfg)
    plan = plan_resume(cfg) if cfg.resume is not None else None
    if plan is not None:
        run_dir = plan.run_dir
    rd = RunDirectory(run_dir, cfg)
    noise_generation = 0
    if plan is None:
        # Identifies this run to clients (their privacy state is kept per run).
        run_key = uuid.uuid4().hex
        rd.manifest["run_key"] = run_key
        rd.start()
        audit = AuditTrail(rd.path, signing_key=signing_key)
        audit.run_start(
            rd.config_hash,
            rd.manifest["code_version"],
            num_rounds=cfg.num_rounds,
            privacy_mode=cfg.privacy.mode.value,
            threat_model=cfg.privacy.threat_model.value,
            record_level=cfg.privacy.record_level,
            secure_aggregation=cfg.secagg.mode.value,
        )
        arrays = initial_arrays(cfg)
        ledger = None
    else:
        run_key = str(plan.run_manifest["run_key"])
        audit = AuditTrail.reopen(rd.path, plan.audit_anchor, signing_key)
        state = plan.checkpoint.server_state
        noise_generation = int(state["aggregator"].get("noise_generation", 0))
        if plan.fresh_noise:
            # Rounds to redo were (or may have been) released: redo them with fresh noise.
            used = int(plan.run_manifest.get("noise_generation", 0))
            noise_generation = max(used, noise_generation) + 1
            set_aside_abandoned(rd.path, plan.abandoned, noise_generation)
        rd.resume(plan.run_manifest, plan.round, plan.rollback)
        rd.manifest["noise_generation"] = max(
            noise_generation, int(plan.run_manifest.get("noise_generation", 0))
        )
        arrays = in_model_order(plan.checkpoint.arrays, initial_arrays(cfg), "checkpoint model")
        ledger = (
            FederationLedger.from_json(plan.ledger_json) if plan.ledger_json is not None else None
        )
    aggregator = build_aggregator(resolve(cfg), ledger)
    if plan is not None and isinstance(aggregator, AccountedDp):
        aggregator.restore_state(plan.checkpoint.server_state["aggregator"], plan.round)
        aggregator.noise_generation = noise_generation
    if plan is not None:
        audit.log.append(
            "run.resume",
            {
                "role": "server",
                "config_hash": rd.config_hash,
                "code_version": rd.manifest["code_version"],
                "from_round": plan.round,
                "rollback_to": cfg.rollback_to,
                "abandoned_checkpoints": plan.abandoned,
                "ledger_releases": len(aggregator.ledger.events)
                if not isinstance(aggregator, MeanAggregator)
                else 0,
                "noise_generation": noise_generation,
            },
        )
        if progress:
            verb = "rolling back to" if plan.rollback else "resuming after"
            print(f"{verb} round {plan.round} in {rd.path}", flush=True)
    if progress and not isinstance(aggregator, MeanAggregator):
        for line in projection_lines(aggregator.settings):
            print(line, flush=True)
        if plan is not None and isinstance(aggregator, AccountedDp):
            # The plan above counts num_rounds releases; a resumed ledger already holds
            # those before the checkpoint and any interrupted round's (it stays spent),
            # so the run ends at the ledger plus the rounds left, not at the plan.
            rest = aggregator.settings.planned_events(plan.round + 1)
            print(
                f"resume projection: the ledger holds {len(aggregator.ledger.events)} "
                f"releases (an interrupted round's included); after the {len(rest)} "
                f"rounds left the run ends at epsilon {aggregator.ledger.project(rest):.4f}",
                flush=True,
            )
    release = release_status(cfg)
    if progress and not release["for_release"]:
        print("NOT FOR RELEASE: " + "; ".join(release["reasons"]), flush=True)
    client_spec = spec_from_config(cfg, run_key, _client_dp_spec(aggregator))
    if client_spec.dpsgd is not None and client_spec.dpsgd.state_dir is None:
        # Simulation default; real SuperNodes pass --node-config "dp-state-dir=...".
        client_spec.dpsgd = dataclasses.replace(
            client_spec.dpsgd, state_dir=str(RunLayout(Path(rd.path).resolve()).client_state)
        )
    if client_spec.client_dp is not None and client_spec.client_dp.local_noise_multiplier:
        # Local DP's release counts live there too (LocalDpStore), across restarts.
        client_spec.client_dp = dataclasses.replace(
            client_spec.client_dp, state_dir=str(RunLayout(Path(rd.path).resolve()).client_state)
        )
    spec = encode_spec(client_spec)
    steps_seen = StepsSeen()
    if plan is not None:
        steps_seen.steps = {
            int(k): int(v) for k, v in plan.checkpoint.server_state["steps_seen"].items()
        }
        steps_seen.rounds = {
            int(k): int(v) for k, v in plan.checkpoint.server_state.get("rounds_seen", {}).items()
        }
    listeners: list[RoundListener] = [MetricsWriter(rd.metrics_path), steps_seen, audit]
    ledger_writer = None
    begin_hooks = []
    if not isinstance(aggregator, MeanAggregator):
        ledger_writer = LedgerWriter(rd.path / LEDGER_FILE, aggregator)
        listeners.insert(0, ledger_writer)
        begin_hooks.append(ledger_writer.on_round_begin)
        # The audit log records the spend just written, before instructions go out.
        begin_hooks.append(
            lambda rnd: audit.ledger_spend(rnd, aggregator.ledger, rd.path / LEDGER_FILE)
        )
    release_first: list[ReleaseHook] = []
    if ledger_writer is not None and isinstance(aggregator, LocalDp):
        # Local DP counts releases as replies arrive: on disk before anything else.
        writer = ledger_writer
        release_first.append(lambda rnd, arrays, train: writer.write())
    if progress:
        listeners.append(ProgressPrinter(cfg.num_rounds))
    checkpoints = CheckpointWriter(cfg, rd, run_key, audit, aggregator, steps_seen)
    # Sealed after the round's metrics, ledger and audit records.
    listeners.insert(listeners.index(audit) + 1, checkpoints)
    listeners.extend(extra_listeners)
    driver = build_driver(
        cfg,
        train_config={SPEC_KEY: spec},
        evaluate_config={SPEC_KEY: spec},
        evaluate_fn=_server_evaluator(cfg),
        listeners=listeners,
        node_config_fn=_node_config_fn(
            steps_seen if cfg.privacy.record_level else None,
            aggregator if isinstance(aggregator, LocalDp) else None,
        ),
        aggregator=aggregator,
        round_begin_hooks=begin_hooks,
        release_hooks=[*release_first, checkpoints.write_files],
    )
    checkpoints.strategy = driver.strategy
    start_round = 1
    if plan is not None:
        restore_strategy_state(driver.strategy, plan.checkpoint.strategy_arrays, arrays)
        checkpoints.initial_server_metrics = dict(
            plan.checkpoint.server_state["initial_server_metrics"]
        )
        start_round = plan.round + 1
    checkpoints.driver = driver
    try:
        result = driver.run(grid, arrays, start_round=start_round)
    except BaseException as err:
        if ledger_writer is not None:
            ledger_writer.write()
        audit.run_end("failed", _file_hashes(rd.path, [LEDGER_FILE]))
        crashed = {
            "status": "failed",
            "status_reason": f"the server stopped: {type(err).__name__}: {err}",
            "seconds": time.perf_counter() - t0,
        }
        rd.finish(crashed, status="failed")
        raise
    if ledger_writer is not None:
        ledger_writer.write()
    from fl_app.weights import weights_digest

    last_round = result.reports[-1].server_round if result.reports else start_round - 1
    if plan is not None:
        # Evaluated at start_round - 1: the checkpoint's model (the final one if no
        # round was left); the run's initial metrics are the checkpoint's record.
        restored_metrics = result.initial_server_metrics
        result.initial_server_metrics = dict(checkpoints.initial_server_metrics or {})
    model_sha = rd.save_model(result.arrays, last_round)
    # Every site's latest public DP metrics over the whole run, resumed parts included:
    # a site that spent its budget before a restart and only refused afterwards (under
    # a new node id) still counts in the reported epsilon.
    result.client_metrics = clients_over_run(rd.metrics_path, result.client_metrics)
    summary = _summary(cfg, result, time.perf_counter() - t0, rd, model_sha, aggregator)
    summary["rounds"] = last_round
    if plan is not None:
        if not result.reports:
            summary["accuracy"] = restored_metrics.get("accuracy")
            summary["loss"] = restored_metrics.get("loss")
        summary["resumed"] = rd.manifest.get("resumed", [])
    summary["weights_sha256"] = weights_digest(result.arrays)
    # The status says what the run achieved over all its rounds (resumed ones included):
    # a run no round of which updated the model is a failure, whatever the loop did.
    summary.update(run_outcome(read_round_records(rd.metrics_path), result.stopped_early))
    seq, head = audit.run_end(
        summary["status"], _file_hashes(rd.path, [rd.model_path.name, LEDGER_FILE])
    )
    summary["audit"] = {"file": AUDIT_FILE, "seq": seq, "head": head}
    rd.finish(summary, status=summary["status"])
    if progress:
        acc = summary.get("accuracy")
        shown = f"{acc:.4f}" if isinstance(acc, float) else "n/a"
        if result.stopped_early:
            print(f"stopped early: {result.stopped_early}", flush=True)
        if summary["status_reason"]:
            print(f"run {summary['status'].upper()}: {summary['status_reason']}", flush=True)
        eps = summary["privacy"].get("record_level_epsilon_max")
        spent = f", max record-level epsilon {eps:.3f}" if eps is not None else ""
        fed_eps = summary["privacy"].get("epsilon")
        if fed_eps is not None:
            spent += f", client-level epsilon {fed_eps:.3f} (delta {summary['privacy']['delta']:g})"
        print(
            f"done: {summary['rounds']} rounds"
            + (f" ({len(result.reports)} after resuming)" if plan is not None else "")
            + f" in {summary['seconds']:.1f}s, "
            f"test accuracy {shown}{spent}; run directory {rd.path}",
            flush=True,
        )
    return summary


def _file_hashes(directory: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of each named file that exists (for the audit log's run.end)."""
    import hashlib

    out = {}
    for name in names:
        path = directory / name
        if path.is_file():
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class LedgerWriter:
    """Round hook and listener: persists the client-level privacy ledger.

    Written when a round begins (the aggregator has recorded it, no instruction has
    left yet: a crash mid-round leaves the round counted on disk, the source of truth
    for a resumed run) and again after the round (local DP counts releases then).
    Atomic writes: the file on disk is never behind the model.
    """

    def __init__(self, path: Path, aggregator: AccountedDp | LocalDp) -> None:
        self.path = path
        self.aggregator = aggregator

    def write(self) -> None:
        write_atomic(self.path, (self.aggregator.ledger.to_json() + "\n").encode())

    def on_round_begin(self, rnd: int) -> None:
        self.write()

    def on_round_end(self, report: RoundReport, arrays: Mapping[str, np.ndarray]) -> None:
        self.write()


class CheckpointWriter:
    """One checkpoint per round: files before the round's model leaves the server
    (release hook :meth:`write_files`), manifest when the round has ended (listener).

    See :mod:`fl_app.server.checkpoint` for the layout and guarantees.
    """

    def __init__(
        self,
        cfg: AppConfig,
        rd: RunDirectory,
        run_key: str,
        audit: AuditTrail,
        aggregator: MeanAggregator | AccountedDp | LocalDp,
        steps_seen: StepsSeen,
    ) -> None:
        self.cfg = cfg
        self.rd = rd
        self.run_key = run_key
        self.audit = audit
        self.aggregator = aggregator
        self.steps_seen = steps_seen
        self.strategy: object = None
        self.driver: RoundDriver | None = None
        # A resumed run carries the original run's round-0 metrics forward.
        self.initial_server_metrics: dict[str, float] | None = None
        self._pending: tuple[int, dict[str, str]] | None = None

    def server_state(self, rnd: int, train: StageReport) -> dict[str, Any]:
        steps = dict(self.steps_seen.steps)
        rounds = dict(self.steps_seen.rounds)
        for node, metrics in train.client_metrics.items():
            if "dp-steps" in metrics:
                steps[node] = max(steps.get(node, 0), int(metrics["dp-steps"]))
            if "dp-rounds" in metrics:
                rounds[node] = max(rounds.get(node, 0), int(metrics["dp-rounds"]))
        initial = self.initial_server_metrics
        if initial is None:
            result = self.driver.result if self.driver is not None else None
            initial = dict(result.initial_server_metrics) if result is not None else {}
        agg = self.aggregator
        aggregator_state: dict[str, Any] = {
            "kind": "none" if isinstance(agg, MeanAggregator) else agg.settings.mode.value
        }
        if isinstance(agg, AccountedDp):
            aggregator_state.update(agg.export_state())
        return {
            "format": 1,
            "round": rnd,
            "config_hash": self.rd.config_hash,
            "run_key": self.run_key,
            "seed": self.cfg.seed,
            "code_version": self.rd.manifest["code_version"],
            "strategy": self.cfg.strategy.name.value,
            "rng": {
                "scheme": (
                    "keystreams under OS-random keys (never saved): sampling and DP noise "
                    "are not reproduced; no generator state"
                    if self.cfg.privacy.secure_mode
                    else "derived: every draw from (seed, round, stream); no generator state"
                ),
                "seed": self.cfg.seed,
                "secure_mode_noise": bool(self.cfg.privacy.secure_mode),
            },
            "aggregator": aggregator_state,
            "ledger_releases": 0 if isinstance(agg, MeanAggregator) else len(agg.ledger.events),
            "steps_seen": {str(k): v for k, v in sorted(steps.items())},
            "rounds_seen": {str(k): v for k, v in sorted(rounds.items())},
            "initial_server_metrics": initial,
        }

    def write_files(self, rnd: int, arrays: Mapping[str, np.ndarray], train: StageReport) -> None:
        agg = self.aggregator
        self._pending = (
            rnd,
            write_checkpoint_files(
                self.rd.path,
                rnd=rnd,
                arrays=arrays,
                strategy_arrays=strategy_state(self.strategy),
                ledger_json=None if isinstance(agg, MeanAggregator) else agg.ledger.to_json(),
                server_state=self.server_state(rnd, train),
                config_hash=self.rd.config_hash,
            ),
        )

    def on_round_end(self, report: RoundReport, arrays: Mapping[str, np.ndarray]) -> None:
        if self._pending is None or self._pending[0] != report.server_round:
            raise RuntimeError(f"round {report.server_round} ended without checkpoint files")
        rnd, files = self._pending
        self._pending = None
        seal_checkpoint(
            self.rd.path,
            rnd=rnd,
            files=files,
            config_hash=self.rd.config_hash,
            audit=self.audit.log,
            signing_key=self.audit.signing_key,
        )
        prune_checkpoints(self.rd.path, self.cfg.checkpoint.keep)


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
        )
    return None


def _client_level_summary(
    aggregator: MeanAggregator | AccountedDp | LocalDp, result: DriverResult
) -> dict[str, Any]:
    if isinstance(aggregator, MeanAggregator):
        return {"epsilon": None, "delta": None}
    s = aggregator.settings
    ledger = aggregator.ledger
    base: dict[str, Any] = {
        "delta": s.delta,
        "accountant": s.accountant.value,
        "clip": s.clip,
        "noise_multiplier": s.noise_multiplier,
        "budget_max_epsilon": s.max_epsilon,
        "ledger_file": LEDGER_FILE,
    }
    if isinstance(aggregator, LocalDp):
        reported = [
            m["dp-local-epsilon"] for m in result.client_metrics.values() if "dp-local-epsilon" in m
        ]
        eps = max([*reported, *ledger.local_epsilons().values()], default=0.0)
        return {
            "epsilon": eps,
            "delta": s.delta,
            "client_level": {
                **base,
                "mechanism": "local DP: each client clips to C and adds N(0, (z*C)^2)",
                "epsilon_max_client": eps,
                "releases": dict(ledger.local),
            },
        }
    eps = ledger.epsilon()
    try:
        rdp = ledger.epsilon(Accountant.rdp.value) if s.accountant.value != "rdp" else eps
    except (AccountingError, ValueError):  # a cross-check never fails the run
        rdp = None
    against = _against_server_summary(aggregator)
    return {
        "epsilon": eps,
        "delta": s.delta,
        "epsilon_against_server": against["epsilon_max_over_clients"],
        "client_level": {
            "epsilon_against_outsiders": eps,
            "against_server": against,
            # δ taken by sampling-dependent branches (docs/privacy-branches.md).
            "delta_branches": branch_delta_total(ledger.events),
            **base,
            "mechanism": (
                "distributed DP: discrete Gaussian shares under secure aggregation "
                "(Kairouz et al. 2021), fixed clipping by the clients"
                if s.distributed is not None
                else f"central DP (DP-FedAvg), {s.clipping.value} clipping by the "
                f"{s.clip_side.value}, Gaussian noise z*C on the sum of clipped updates"
            ),
            **({"distributed": s.distributed.describe()} if s.distributed is not None else {}),
            "epsilon": eps,
            "epsilon_rdp_cross_check": rdp,
            "rounds_accounted": len(ledger.events),
            "sampling": s.sampling.value,
            "sample_rate": s.fraction,
            "update_noise_multiplier": s.update_noise_multiplier,
            "clipped_count_stddev": s.clipped_count_std,
            "clip_final": aggregator.clip,
            "neighbouring": (
                "replace one client"
                if ledger.events and ledger.events[-1].replace_one
                else "add or remove one client"
            ),
        },
    }


def _against_server_summary(aggregator: AccountedDp) -> dict[str, Any]:
    """ε against the server: no sampling amplification, the server picks the cohort.

    Distributed DP: each client's rounds in the cohort composed (the maximum over
    clients, and the planned worst case of a client in every round). Central DP: none,
    the server adds the noise after seeing the clipped updates (or their sum).
    """
    s = aggregator.settings
    ledger = aggregator.ledger
    if s.distributed is None:
        return {
            "epsilon_max_over_clients": None,
            "note": "central DP: the server adds the noise after seeing the clipped updates "
            "(or, under secure aggregation, their exact sum), so the guarantee holds against "
            "outsiders only",
        }
    template = s.round_event(1, s.planned_population, s.clip)
    per_client = ledger.server_epsilons()
    counts = dict(ledger.participation)
    return {
        "epsilon_max_over_clients": max(per_client.values(), default=0.0),
        # Includes the bound carried over from earlier server processes (a resume).
        "rounds_max_over_clients": ledger.most_participation(),
        "epsilon_planned_worst_case": unsampled_epsilon(
            template, s.num_rounds, s.delta, s.accountant
        ),
        "clients_counted": len(counts),
        "note": "composition of the rounds each client was in the cohort of, without "
        "amplification: the server samples and messages the cohort",
    }


class StepsSeen:
    """Round listener: the DP-SGD steps each node has reported, sent back to it.

    A client whose state file shows fewer steps than the server has seen it take
    refuses to train (its accounting would restart from zero).
    """

    def __init__(self) -> None:
        self.steps: dict[int, int] = {}
        # Rounds trained, where clients hide their steps (they give the record count).
        self.rounds: dict[int, int] = {}

    def on_round_end(self, report: RoundReport, arrays: Mapping[str, np.ndarray]) -> None:
        for node, metrics in report.train.client_metrics.items():
            if "dp-steps" in metrics:
                self.steps[node] = max(self.steps.get(node, 0), int(metrics["dp-steps"]))
            if "dp-rounds" in metrics:
                self.rounds[node] = max(self.rounds.get(node, 0), int(metrics["dp-rounds"]))

    def node_config(self, node_id: int) -> dict[str, int]:
        from fl_app.privacy.state import ROUNDS_SEEN_KEY, STEPS_SEEN_KEY

        return {
            STEPS_SEEN_KEY: self.steps.get(node_id, 0),
            ROUNDS_SEEN_KEY: self.rounds.get(node_id, 0),
        }


def _node_config_fn(
    steps_seen: StepsSeen | None, local_dp: LocalDp | None
) -> Callable[[int], dict[str, int]] | None:
    """Per-node instruction scalars: what the server has seen each site spend (DP-SGD
    steps, local-DP releases), so a client whose state was lost refuses to restart."""
    parts = [p.node_config for p in (steps_seen, local_dp) if p is not None]
    if not parts:
        return None
    return lambda node_id: {k: v for part in parts for k, v in part(node_id).items()}


def _site_key(node: int, metrics: Mapping[str, float]) -> str:
    """A site's stable key from its public metrics (as :meth:`LocalDp.site_key`)."""
    digest, pid = metrics.get("dp-site-hash"), metrics.get("dp-partition-id")
    if digest is not None:
        return f"site-{int(digest):012x}"
    if pid is not None:
        return f"partition-{int(pid)}"
    return f"node-{node}"


def clients_over_run(
    metrics_path: Path, current: Mapping[int, Mapping[str, float]]
) -> dict[int, dict[str, float]]:
    """Each site's public DP metrics with the largest epsilon it reported in the run.

    ``current`` holds this server process's latest report per node; ``metrics.jsonl``
    holds every round's, across resumes and rollbacks (node ids change when SuperNodes
    restart, so sites are matched by :func:`_site_key`). Keyed by the node id that
    reported it.
    """
    best: dict[str, tuple[int, dict[str, float], float]] = {}

    def offer(node: int, metrics: Mapping[str, float]) -> None:
        eps = max(
            float(metrics.get("dp-epsilon", 0.0)), float(metrics.get("dp-local-epsilon", 0.0))
        )
        site = _site_key(node, metrics)
        if site not in best or eps >= best[site][2]:
            best[site] = (node, dict(metrics), eps)

    for record in read_round_records(metrics_path):
        for node, metrics in (record.get("client_metrics") or {}).items():
            offer(int(node), {k.replace("_", "-"): v for k, v in metrics.items()})
    for node, metrics in current.items():
        offer(node, metrics)
    return {node: metrics for node, metrics, _ in best.values()}


def _record_level_summary(cfg: AppConfig, result: DriverResult) -> dict[str, Any]:
    if not cfg.privacy.record_level:
        return {"record_level_epsilon_max": None}
    d = cfg.privacy.dpsgd
    per_client = {
        str(node): {k.removeprefix("dp-"): v for k, v in m.items()}
        for node, m in sorted(result.client_metrics.items())
    }
    eps = [m["epsilon"] for m in per_client.values() if "epsilon" in m]
    return {
        "record_level_epsilon_max": max(eps) if eps else 0.0,
        "record_level": {
            "mechanism": "DP-SGD (Opacus), Poisson sampling of local records",
            "accountant": d.accountant.value,
            "delta": d.delta,
            "max_grad_norm": d.max_grad_norm,
            "budget_max_epsilon": d.max_epsilon,
            "epsilon_max": max(eps) if eps else 0.0,
            "per_client": per_client,
            "clients_budget_exhausted": sorted(str(n) for n in result.exhausted),
        },
    }


def _summary(
    cfg: AppConfig,
    result: DriverResult,
    seconds: float,
    rd: RunDirectory,
    model_sha: str,
    aggregator: MeanAggregator | AccountedDp | LocalDp,
) -> dict[str, Any]:
    last = result.reports[-1] if result.reports else None
    fed = None
    for report in reversed(result.reports):
        if report.evaluate is not None and report.evaluate.metrics:
            fed = report.evaluate.metrics
            break
    server = last.server_metrics if last else {}
    return {
        "status": "completed",
        "experiment_name": cfg.experiment_name,
        "accuracy": server.get("accuracy"),
        "loss": server.get("loss"),
        "initial_accuracy": result.initial_server_metrics.get("accuracy"),
        "federated_eval_accuracy": fed.get("eval-accuracy") if fed else None,
        "federated_eval_loss": fed.get("eval-loss") if fed else None,
        "rounds": len(result.reports),
        "rounds_planned": cfg.num_rounds,
        "stopped_early": result.stopped_early or None,
        "rounds_model_unchanged": sum(not r.model_updated for r in result.reports),
        "clients": cfg.dataset.num_partitions,
        "seconds": seconds,
        "seconds_per_round": result.seconds / max(1, len(result.reports)),
        "config_hash": rd.config_hash,
        "code_version": rd.manifest["code_version"],
        "model_file": rd.model_path.name,
        "model_sha256": model_sha,
        "privacy": {
            "mode": cfg.privacy.mode.value,
            "threat_model": cfg.privacy.threat_model.value,
            "note": _privacy_note(cfg),
            **_client_level_summary(aggregator, result),
            **_record_level_summary(cfg, result),
        },
        "secure_aggregation": cfg.secagg.mode.value,
        # What the secure-aggregation thresholds (and protocol) assumed of the server.
        "secure_aggregation_server_model": (
            None if cfg.secagg.mode.value == "off" else cfg.secagg.server_model.value
        ),
        "bandwidth": _bandwidth_summary(cfg, result),
        # "not for release" (and why) when a guarantee rests on seeded randomness.
        "release": release_status(cfg),
    }


def _bandwidth_summary(cfg: AppConfig, result: DriverResult) -> dict[str, Any] | None:
    """Mean payload bytes per client per round under secure aggregation (None without it).

    Payload bytes: array data, byte strings and scalars of the four stages' messages
    (protocol framing excluded); uploads are bit-packed at ``secagg.bits`` per coordinate.
    """
    rounds = [r.privacy for r in result.reports if "secagg_bytes_up_per_client" in r.privacy]
    if not rounds:
        return None
    up = [r["secagg_bytes_up_per_client"] for r in rounds]
    down = [r["secagg_bytes_down_per_client"] for r in rounds]
    return {
        "bits": int(cfg.secagg.bits),
        "rounds_measured": len(rounds),
        "upload_bytes_per_client_round": sum(up) / len(up),
        "download_bytes_per_client_round": sum(down) / len(down),
        "note": "payload bytes of the four secure-aggregation stages (framing excluded)",
    }


def _privacy_note(cfg: AppConfig) -> str:
    """summary.json's one-line account of what was protected, true of this combination.

    What the server saw depends on secure aggregation, not on the DP mode: with it, only
    the masked sum (said once, in the secure-aggregation part); without it, each update.
    """
    p = cfg.privacy
    secure = cfg.secagg.mode.value != "off"
    parts = []
    if p.mode.value == "central" and secure:
        parts.append(
            "client-level central DP: the released model is DP at the stated (epsilon, "
            "delta); each client clipped its update before masking and the server added "
            "the Gaussian noise to the unmasked sum"
        )
    elif p.mode.value == "central":
        seen = "clipped by its client" if p.clip_side.value == "client" else "unclipped"
        parts.append(
            "client-level central DP: the released model is DP at the stated (epsilon, "
            f"delta); the server saw every client's update ({seen}) and noised their clipped sum"
        )
    elif p.mode.value == "local":
        parts.append(
            "client-level local DP: each update was clipped and noised before leaving its "
            "client; epsilon is the largest per-client value"
        )
    elif p.mode.value == "distributed":
        parts.append(
            "client-level distributed DP: each client clipped, rotated and rounded its update "
            "and added a discrete Gaussian share (CSPRNG) before masking, so the sum the server "
            "unmasked was already DP; clients colluding with the server can subtract their own "
            "shares (the guarantee assumes the calibrated minimum of honest survivors); "
            "'epsilon' is against outsiders, who do not know the cohorts (Poisson "
            "amplification); against the server, which picks them, it is "
            "'epsilon_against_server' (each client's rounds composed without amplification)"
        )
    if p.record_level:
        parts.append("record-level DP-SGD per institution (record_level epsilon per client)")
    if cfg.secagg.mode.value != "off" and p.mode.value == "distributed":
        parts.append(
            f"secure aggregation ({cfg.secagg.mode.value}, {cfg.secagg.bits} bits per "
            "coordinate): in plaintext the server saw protocol public keys, encrypted shares, "
            "who dropped out and public dp-* metrics; no training metrics"
        )
    elif cfg.secagg.mode.value != "off":
        if not parts:
            parts.append("no differential privacy: the released model is not protected")
        parts.append(
            f"secure aggregation ({cfg.secagg.mode.value}): the server saw only the masked "
            "sum of each round's clipped, fixed-point encoded updates (weights and train "
            "metrics inside it); in plaintext it saw protocol public keys, encrypted "
            "shares, who dropped out, and public dp-* metrics"
        )
    if not parts:
        return "no differential privacy: updates and the model are not protected"
    if not p.secure_mode and p.mode.value == "central":
        parts.append(
            "noise drawn from a generator seeded by the config (privacy.secure_mode=false): "
            "reproducible, but whoever knows the seed can remove it; use secure_mode for releases"
        )
    return "; ".join(parts)


def make_server_app(cfg: AppConfig, run_dir: str | os.PathLike[str]) -> ServerApp:
    """A ServerApp bound to a validated config (for ``run_simulation``)."""
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
    cfg = compose_config(
        str(rc.get("hydra-config-name", "config") or "config"),
        parse_overrides(str(rc.get("hydra-overrides", ""))),
    )
    run_dir = str(rc.get("run-dir", "") or "")
    if not run_dir:
        base = Path(os.environ.get("FL_APP_RUNS_DIR", "outputs"))
        run_dir = str(base / "flwr" / f"run-{context.run_id}")
    log.warning("fl-app run %s writes to %s", context.run_id, Path(run_dir).resolve())
    summary = run_experiment(grid, cfg, run_dir)
    if summary["status"] == "failed":
        # Flower then records the run as finished:failed (what `flwr ls` and
        # `fl-app deploy submit` report) instead of a success that trained nothing.
        raise RuntimeError(f"fl-app run failed: {summary['status_reason']}")

"""A run's lifetime on the server: open its directory (fresh or resumed), finish it.

:func:`open_run` starts a new run directory, or continues one from the checkpoint
:func:`fl_app.server.resume.plan_resume` chose (run key, audit chain, model,
client-level ledger and aggregator state restored, the resume recorded in the audit
log); :func:`finish_run` writes the final model, ``summary.json`` and the audit log's
``run.end``; :func:`record_crash` marks a run the server stopped in as ``failed``
(docs/architecture.md, "Server").
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fl_app.config.plan import RunPlan
from fl_app.config.schema import AppConfig
from fl_app.device import run_manifest_device
from fl_app.privacy.ledger import FederationLedger
from fl_app.server.checkpoint import in_model_order
from fl_app.server.layout import AUDIT_FILE, LEDGER_FILE
from fl_app.server.listeners import LedgerWriter, file_hashes
from fl_app.server.resume import ResumePlan, plan_resume, set_aside_abandoned
from fl_app.server.rundir import AuditTrail, RunDirectory, read_round_records, run_outcome
from fl_app.server.summary import build_summary, clients_over_run
from strategies.aggregators import MeanAggregator
from strategies.dp_aggregators import AccountedDp
from strategies.driver_types import DriverResult
from strategies.factory import build_aggregator
from strategies.local_dp import LocalDp

__all__ = ["RunSession", "finish_run", "open_run", "record_crash"]

InitialArrays = Callable[[AppConfig], dict[str, np.ndarray]]


@dataclass
class RunSession:
    """What a run starts from: its directory, audit trail, run key, model, aggregator."""

    cfg: AppConfig
    rd: RunDirectory
    audit: AuditTrail
    # Identifies this run to clients (their privacy state is kept per run).
    run_key: str
    arrays: dict[str, np.ndarray]
    aggregator: MeanAggregator | AccountedDp | LocalDp
    # What resolve(cfg) built for ``cfg`` (the round driver reads it).
    run_plan: RunPlan
    plan: ResumePlan | None = None
    noise_generation: int = 0

    @property
    def start_round(self) -> int:
        return 1 if self.plan is None else self.plan.round + 1


def open_run(
    run_plan: RunPlan,
    run_dir: str | os.PathLike[str],
    signing_key: Any,
    initial: InitialArrays,
) -> RunSession:
    """A fresh run of ``run_plan.cfg`` in ``run_dir``, or, with ``cfg.resume``, that run
    continued (its directory replaces ``run_dir``) from the checkpoint :func:`plan_resume`
    chose. The plan is the caller's (resolved once per process, not here)."""
    cfg = run_plan.cfg
    plan = plan_resume(cfg) if cfg.resume is not None else None
    if plan is None:
        return _open_fresh(run_plan, run_dir, signing_key, initial)
    return _open_resumed(run_plan, plan, signing_key, initial)


def _open_fresh(
    run_plan: RunPlan, run_dir: str | os.PathLike[str], signing_key: Any, initial: InitialArrays
) -> RunSession:
    cfg = run_plan.cfg
    rd = RunDirectory(run_dir, cfg)
    run_key = uuid.uuid4().hex
    rd.manifest["run_key"] = run_key
    # train.device as configured and as resolved here (the simulated clients' device;
    # deployed sites report their own in public metrics): fl_app.device.
    rd.manifest["train_device"] = run_manifest_device(cfg.train.device)
    # What leaves a site (share.artifact, share.layers), declared per run.
    share: dict[str, Any] = {"artifact": cfg.share.artifact.value, "layers": list(cfg.share.layers)}
    if cfg.share.compression.value != "none":  # docs/compression.md (absent by default)
        share.update(compression=cfg.share.compression.value, ratio=float(cfg.share.ratio))
    if cfg.share.compression.value == "sketch":  # the rows fix the public hashes
        share["sketch_rows"] = int(cfg.share.sketch_rows)
    rd.manifest["share"] = share
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
        share=share,
    )
    arrays = initial(cfg)
    aggregator = build_aggregator(run_plan, None)
    return RunSession(cfg, rd, audit, run_key, arrays, aggregator, run_plan)


def _open_resumed(
    run_plan: RunPlan, plan: ResumePlan, signing_key: Any, initial: InitialArrays
) -> RunSession:
    cfg = run_plan.cfg
    rd = RunDirectory(plan.run_dir, cfg)
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
    arrays = in_model_order(plan.checkpoint.arrays, initial(cfg), "checkpoint model")
    ledger = FederationLedger.from_json(plan.ledger_json) if plan.ledger_json is not None else None
    aggregator = build_aggregator(run_plan, ledger)
    if isinstance(aggregator, AccountedDp):
        aggregator.restore_state(state["aggregator"], plan.round)
        aggregator.noise_generation = noise_generation
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
    return RunSession(cfg, rd, audit, run_key, arrays, aggregator, run_plan, plan, noise_generation)


def record_crash(
    run: RunSession, ledger_writer: LedgerWriter | None, err: BaseException, seconds: float
) -> None:
    """The server stopped mid-run: ledger on disk, ``run.end`` failed, status failed."""
    if ledger_writer is not None:
        ledger_writer.write()
    run.audit.run_end("failed", file_hashes(run.rd.path, [LEDGER_FILE]))
    crashed = {
        "status": "failed",
        "status_reason": f"the server stopped: {type(err).__name__}: {err}",
        "seconds": seconds,
    }
    run.rd.finish(crashed, status="failed")


def finish_run(
    run: RunSession,
    result: DriverResult,
    ledger_writer: LedgerWriter | None,
    checkpoint_initial_metrics: dict[str, float] | None,
    t0: float,
) -> dict[str, Any]:
    """Write the final model, ``summary.json`` and ``run.end``; return the summary.

    ``checkpoint_initial_metrics``: a resumed run's round-0 metrics, carried by its
    checkpoint (the run's own initial record, not the resumed process's evaluation).
    """
    from fl_app.weights import weights_digest

    cfg, rd, plan = run.cfg, run.rd, run.plan
    if ledger_writer is not None:
        ledger_writer.write()
    last_round = result.reports[-1].server_round if result.reports else run.start_round - 1
    restored_metrics: dict[str, float] = {}
    if plan is not None:
        # Evaluated at start_round - 1: the checkpoint's model (the final one if no
        # round was left); the run's initial metrics are the checkpoint's record.
        restored_metrics = result.initial_server_metrics
        result.initial_server_metrics = dict(checkpoint_initial_metrics or {})
    model_sha = rd.save_model(result.arrays, last_round)
    # Every site's latest public DP metrics over the whole run, resumed parts included:
    # a site that spent its budget before a restart and only refused afterwards (under
    # a new node id) still counts in the reported epsilon.
    result.client_metrics = clients_over_run(rd.metrics_path, result.client_metrics)
    summary = build_summary(cfg, result, time.perf_counter() - t0, rd, model_sha, run.aggregator)
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
    seq, head = run.audit.run_end(
        summary["status"], file_hashes(rd.path, [rd.model_path.name, LEDGER_FILE])
    )
    summary["audit"] = {"file": AUDIT_FILE, "seq": seq, "head": head}
    rd.finish(summary, status=summary["status"])
    return summary

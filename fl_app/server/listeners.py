"""The run's round listeners and hooks on the server: ledger, checkpoints, steps seen.

The round driver calls them (:class:`strategies.driver.RoundDriver`: round-begin
hooks, release hooks, listeners); :func:`fl_app.server.app.run_experiment` wires them
in the order the guarantees need (docs/architecture.md, "Server"):

* :class:`LedgerWriter`: the client-level privacy ledger on disk before a round's
  instructions leave (a crash never under-counts epsilon);
* :class:`CheckpointWriter`: a checkpoint's files before the round's model first
  leaves the server, sealed once the round's metrics and audit records are written;
* :class:`StepsSeen`: the DP-SGD steps and rounds each node reported, sent back so a
  client whose state file was lost refuses to restart its accounting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fl_app.atomic import write_atomic
from fl_app.config.schema import AppConfig
from fl_app.server.checkpoint import (
    prune_checkpoints,
    seal_checkpoint,
    strategy_state,
    write_checkpoint_files,
)
from fl_app.server.rundir import AuditTrail, RunDirectory
from strategies.aggregators import MeanAggregator
from strategies.dp_aggregators import AccountedDp
from strategies.driver import RoundDriver
from strategies.driver_types import RoundReport, StageReport
from strategies.local_dp import LocalDp

__all__ = ["CheckpointWriter", "LedgerWriter", "StepsSeen", "file_hashes", "node_config_fn"]


def file_hashes(directory: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of each named file that exists (for the audit log's run.end)."""
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


class StepsSeen:
    """Round listener: the DP-SGD steps each node has reported, sent back to it.

    A client whose state file shows fewer steps than the server has seen it take
    refuses to train (its accounting would restart from zero).
    """

    def __init__(self) -> None:
        self.steps: dict[int, int] = {}
        # Rounds trained, where clients hide their steps (they give the record count).
        self.rounds: dict[int, int] = {}

    @classmethod
    def restored(cls, server_state: Mapping[str, Any]) -> StepsSeen:
        """What a checkpoint's server state recorded (a resumed run starts from it)."""
        seen = cls()
        seen.steps = {int(k): int(v) for k, v in server_state["steps_seen"].items()}
        seen.rounds = {int(k): int(v) for k, v in server_state.get("rounds_seen", {}).items()}
        return seen

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


def node_config_fn(
    steps_seen: StepsSeen | None, local_dp: LocalDp | None
) -> Callable[[int], dict[str, int]] | None:
    """Per-node instruction scalars: what the server has seen each site spend (DP-SGD
    steps, local-DP releases), so a client whose state was lost refuses to restart."""
    parts = [p.node_config for p in (steps_seen, local_dp) if p is not None]
    if not parts:
        return None
    return lambda node_id: {k: v for part in parts for k, v in part(node_id).items()}

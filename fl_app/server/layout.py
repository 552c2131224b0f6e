"""The layout of a run directory: every name a run leaves there, defined once.

The server writes these files (:mod:`fl_app.server.rundir`,
:mod:`fl_app.server.checkpoint`), and the release, the sweep report, the privacy audit
and the deployment wrappers read them; all of them take the names from here, so a
renamed file cannot leave one reader looking for the old name
(docs/architecture.md, "Server").

``config.yaml``               the resolved, validated config
``run.json``                  manifest: config hash, seed, code version, status, and the
                              secret salt of the published config hash (never exported)
``metrics.jsonl``             one JSON object per round (appended and flushed each round)
``metrics.abandoned.jsonl``   rounds past the checkpoint a resume continued from
``model.safetensors``         the final global model
``summary.json``              the run's outcome, accuracy, privacy spent
``privacy_ledger.json``       the client-level privacy ledger (client-level DP runs)
``audit.jsonl``               the server's hash-chained audit log
``audit_head.sig.json``       the Ed25519-signed final audit head (``audit_signing_key``)
``checkpoints/round-NNNN/``   one sealed checkpoint per round (:data:`CHECKPOINT_FILES`)
``client-state/``             simulated clients' own privacy state (DP-SGD, local DP)
``mlruns/``                   MLflow's file store (``tracking.mlflow``, default URI)
``tensorboard/``              TensorBoard event files (``tracking.tensorboard``)
``tracking.json``             the run's MLflow run id and tracking URI (``tracking.mlflow``;
                              ``fl-app export`` attaches the model card to that run)

A leaf module (standard library only): importing it loads neither Flower nor the
strategies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AUDIT_FILE",
    "CHECKPOINTS_DIR",
    "CHECKPOINT_DIR_PATTERN",
    "CHECKPOINT_MANIFEST",
    "CLIENT_STATE_DIR",
    "CONFIG_FILE",
    "LEDGER_FILE",
    "METRICS_ABANDONED_FILE",
    "METRICS_FILE",
    "MLFLOW_DIR",
    "MODEL_FILE",
    "RUN_MANIFEST_FILE",
    "SERVER_STATE_FILE",
    "SIGNED_HEAD_FILE",
    "STRATEGY_FILE",
    "SUMMARY_FILE",
    "TENSORBOARD_DIR",
    "TRACKING_FILE",
    "RunLayout",
]

CONFIG_FILE = "config.yaml"
RUN_MANIFEST_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
METRICS_ABANDONED_FILE = "metrics.abandoned.jsonl"
MODEL_FILE = "model.safetensors"
SUMMARY_FILE = "summary.json"
LEDGER_FILE = "privacy_ledger.json"
AUDIT_FILE = "audit.jsonl"
# Beside the audit log, and in each checkpoint (that checkpoint's head);
# `fl-app audit verify --public-key PUB --signed-head <it>`.
SIGNED_HEAD_FILE = "audit_head.sig.json"
CHECKPOINTS_DIR = "checkpoints"
CLIENT_STATE_DIR = "client-state"
# Experiment trackers (fl_app.server.tracking): MLflow's default file store (a multirun's
# jobs share <sweep dir>/mlruns instead) and TensorBoard's event files.
MLFLOW_DIR = "mlruns"
TENSORBOARD_DIR = "tensorboard"
# Where the run's MLflow run is (written when the tracker opens; read by `fl-app export`,
# which attaches the model card it builds after the run: fl_app.release.tracking_card).
TRACKING_FILE = "tracking.json"

# Inside one checkpoint directory (checkpoints/round-NNNN/), besides MODEL_FILE,
# LEDGER_FILE and SIGNED_HEAD_FILE.
CHECKPOINT_MANIFEST = "manifest.json"
# A checkpoint directory's name, round-NNNN (RunLayout.checkpoint); a rolled-back one
# renamed round-NNNN.rolledback-K does not match (kept as evidence, never loaded).
CHECKPOINT_DIR_PATTERN = re.compile(r"round-(\d{4,})")
STRATEGY_FILE = "strategy_state.safetensors"
SERVER_STATE_FILE = "server_state.json"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (names from this module's constants)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def run_manifest(self) -> Path:
        return self.root / RUN_MANIFEST_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def metrics_abandoned(self) -> Path:
        return self.root / METRICS_ABANDONED_FILE

    @property
    def model(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER_FILE

    @property
    def audit(self) -> Path:
        return self.root / AUDIT_FILE

    @property
    def signed_head(self) -> Path:
        return self.root / SIGNED_HEAD_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def client_state(self) -> Path:
        return self.root / CLIENT_STATE_DIR

    @property
    def mlflow(self) -> Path:
        return self.root / MLFLOW_DIR

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    def checkpoint(self, rnd: int) -> Path:
        """Round ``rnd``'s checkpoint directory (zero-padded so names sort by round)."""
        return self.checkpoints / f"round-{rnd:04d}"

    @property
    def tracking(self) -> Path:
        return self.root / TRACKING_FILE

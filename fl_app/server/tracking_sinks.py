"""The trackers themselves: MLflow and TensorBoard, each imported only when opened.

:mod:`fl_app.server.tracking` decides what is logged and where; these classes only
write it. Both packages come with the ``tracking`` extra
(``pip install 'fl-app[tracking]'``: mlflow-skinny and tensorboard); the config check
(:mod:`fl_app.config.validate_tracking`) refuses a tracker that is on but not
installed before the run, and :func:`_require` says the same if one goes missing
between the check and the run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_app.config.errors import ConfigConflictError

__all__ = [
    "MLFLOW_FILE_STORE_OPT_IN",
    "PUBLIC_SUMMARY_ARTIFACT",
    "MlflowSink",
    "TensorBoardSink",
    "is_file_store",
]

# The reduced summary's name among the tracker's artifacts: not summary.json, so a
# file store inside a sweep directory is never mistaken for a job by `fl-app report`.
PUBLIC_SUMMARY_ARTIFACT = "summary_public.json"

# MLflow 3 keeps its file store in maintenance mode and refuses it unless this is set;
# fl-app's default store is a file store (no server, no database to migrate), so a
# file-store URI sets it for this process (docs/tracking.md).
MLFLOW_FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"
# MLflow's log_batch limits: 1000 metrics, 100 params per call.
_METRICS_PER_BATCH = 1000
_PARAMS_PER_BATCH = 100


def _require(module: str, key: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigConflictError(
            f"tracking.{key}",
            True,
            f"{err}: pip install 'fl-app[tracking]', or set tracking.{key}=false",
        ) from None


def is_file_store(uri: str) -> bool:
    """A path or ``file:`` URI (MLflow's file store), not a server or a database."""
    from urllib.parse import urlparse

    return urlparse(uri).scheme in ("", "file")


class MlflowSink:
    """One MLflow run in the scope's experiment (created if missing, as a sweep's jobs
    may race to create it) through :class:`mlflow.tracking.MlflowClient`."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    @classmethod
    def open(cls, scope: Any, params: Mapping[str, str]) -> MlflowSink:
        _require("mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        if is_file_store(scope.mlflow_uri):
            os.environ.setdefault(MLFLOW_FILE_STORE_OPT_IN, "true")
        try:
            client = MlflowClient(tracking_uri=scope.mlflow_uri)
            experiment_id = _experiment_id(client, scope.experiment, MlflowException)
            run = client.create_run(experiment_id, run_name=scope.run_name, tags=scope.tags)
            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), _PARAMS_PER_BATCH):
                client.log_batch(run.info.run_id, params=items[i : i + _PARAMS_PER_BATCH])
        except MlflowException as err:
            raise ConfigConflictError(
                "tracking.mlflow_uri",
                scope.mlflow_uri,
                f"MLflow refused the run ({err}); give a reachable tracking URI, or null "
                "for a local file store",
            ) from None
        return cls(client, run.info.run_id)

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in sorted(values.items())]
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _METRICS_PER_BATCH])

    def finish(
        self,
        step: int,
        values: Mapping[str, float],
        tags: Mapping[str, str],
        artifacts: list[Path],
        public: Mapping[str, Any] | None,
        failed: bool,
    ) -> None:
        from mlflow.entities import RunTag

        self.log_metrics(step, values)
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        if public is not None:
            self.client.log_dict(self.run_id, dict(public), PUBLIC_SUMMARY_ARTIFACT)
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _experiment_id(client: Any, name: str, error: type[Exception]) -> str:
    """The id of experiment ``name``, created when missing (another job of the sweep may
    create it first: then it is read again)."""
    for _ in range(3):
        found = client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(client.create_experiment(name))
        except error:
            time.sleep(0.2)
    raise RuntimeError(f"MLflow experiment {name!r} could be neither read nor created")


class TensorBoardSink:
    """Event files under the run directory's ``tensorboard/``; scalars as doubles (the
    values equal the run's own, not float32 roundings), the public summary as text."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    @classmethod
    def open(cls, logdir: Path) -> TensorBoardSink:
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        return cls(SummaryWriter(log_dir=str(logdir)))

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in sorted(values.items()):
            self.writer.add_scalar(key, value, step, new_style=True, double_precision=True)
        self.writer.flush()

    def finish(
        self,
        step: int,
        values: Mapping[str, float],
        tags: Mapping[str, str],
        artifacts: list[Path],
        public: Mapping[str, Any] | None,
        failed: bool,
    ) -> None:
        # Summary numbers under summary/ (their names would otherwise meet the rounds').
        self.log_metrics(step, {f"summary/{k}": v for k, v in values.items()})
        if public is not None:
            text = json.dumps(dict(public), indent=2, sort_keys=True, default=str)
            self.writer.add_text("summary", f"```\n{text}\n```", step)
        self.writer.close()

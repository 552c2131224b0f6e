"""The ``tracking`` section of the config: experiment trackers, off by default.

Kept beside :mod:`fl_app.config.schema` (which nests it as ``AppConfig.tracking``) so
the schema module stays a size a reader can hold. A leaf: standard library only.
What the trackers receive and who may see it: docs/tracking.md.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrackingConfig"]


@dataclass
class TrackingConfig:
    """Where a run's public numbers are mirrored (:mod:`fl_app.server.tracking`).

    Off by default: nothing is imported or written unless a key is on.
    """

    # MLflow (the `tracking` extra: mlflow-skinny): one MLflow run per fl-app run.
    mlflow: bool = False
    # null: a local file store, <sweep dir>/mlruns for a Hydra multirun's jobs (one
    # experiment for the whole sweep), else <run dir>/mlruns. Any MLflow tracking URI
    # otherwise (a path, file:..., http(s)://host:port, sqlite:///...).
    mlflow_uri: str | None = None
    # null: the sweep directory for a multirun's jobs, else experiment_name.
    mlflow_experiment: str | None = None
    # TensorBoard event files under <run dir>/tensorboard (the `tracking` extra).
    tensorboard: bool = False

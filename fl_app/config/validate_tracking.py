"""Checks of the ``tracking`` section (:class:`fl_app.config.schema_tracking.TrackingConfig`).

A tracker that is on must be importable before round 1 (the run would otherwise train
and then fail, or quietly track nothing), and a setting that would do nothing is
refused. The package is only looked up (:func:`importlib.util.find_spec`), never
imported here: a run with tracking off never loads MLflow or TensorBoard.
"""

from __future__ import annotations

import importlib.util

from fl_app.config.errors import ConfigConflictError, ConfigRangeError, require
from fl_app.config.schema import AppConfig

__all__ = ["EXTRA_HINT", "check_tracking"]

EXTRA_HINT = "pip install 'fl-app[tracking]'"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package reads as missing
        return False


def check_tracking(cfg: AppConfig) -> None:
    """Raise :class:`~fl_app.config.errors.ConfigError` naming the ``tracking`` field."""
    t = cfg.tracking
    for key in ("mlflow_uri", "mlflow_experiment"):
        value = getattr(t, key)
        require(
            value is None or t.mlflow,
            f"tracking.{key}",
            value,
            "only MLflow uses it: set tracking.mlflow=true, or leave it null",
            ConfigConflictError,
        )
        require(
            value is None or bool(value.strip()),
            f"tracking.{key}",
            value,
            "must not be empty: give a value, or null for the default",
            ConfigRangeError,
        )
    require(
        not t.mlflow or _installed("mlflow"),
        "tracking.mlflow",
        t.mlflow,
        f"MLflow is not installed: {EXTRA_HINT} (mlflow-skinny), or set tracking.mlflow=false",
        ConfigConflictError,
    )
    require(
        not t.tensorboard or _installed("tensorboard"),
        "tracking.tensorboard",
        t.tensorboard,
        f"TensorBoard is not installed: {EXTRA_HINT}, or set tracking.tensorboard=false",
        ConfigConflictError,
    )

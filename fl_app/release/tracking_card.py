"""Attaching an export's model card to the run's MLflow run (``tracking.mlflow``).

The card is built by ``fl-app export``, after the run, so the run's tracker never saw
it. A tracked run records where its MLflow run is (``tracking.json``, written by
:func:`fl_app.server.tracking.open_tracker`); the export then logs the card it wrote
(JSON and Markdown) to that run under ``model_card/<tier>/``.

Best effort: the exported files are the release's record, a tracker is one more reader.
When mlflow is not installed here, the store is unreachable, or the run is gone, the
export warns and completes. What the tracker receives is the card of the tier exported:
a public card is public; a restricted card holds no more than the restricted export,
which is the rule for everything a tracker already holds (docs/tracking.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from fl_app.release.evidence import read_run_file
from fl_app.server.layout import TRACKING_FILE

__all__ = ["CARD_ARTIFACT_DIR", "attach_card"]

#: The card's folder among the MLflow run's artifacts (then the tier: public, restricted).
CARD_ARTIFACT_DIR = "model_card"

# An export must not hang on an unreachable server: MLflow retries HTTP requests with
# exponential backoff (7 tries by default); these apply only where the user set none.
_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


@contextmanager
def _http_limits() -> Iterator[None]:
    unset = [k for k in _HTTP_LIMITS if k not in os.environ]
    os.environ.update({k: _HTTP_LIMITS[k] for k in unset})
    try:
        yield
    finally:
        for key in unset:
            os.environ.pop(key, None)


def attach_card(run_dir: Path, out_dir: Path, names: Sequence[str], tier: str) -> str | None:
    """Log ``out_dir``'s card files ``names`` to the run's MLflow run, if it was tracked.

    Returns a warning for the caller to print when the card could not be attached, and
    None when it was, or when the run was not tracked in MLflow (no ``tracking.json``).
    Never raises for the tracker: the export has already written its files.
    """
    data = read_run_file(run_dir, TRACKING_FILE)
    if data is None:
        return None
    try:
        where = json.loads(data)["mlflow"]
        run_id, uri = str(where["run_id"]), str(where["tracking_uri"])
    except (ValueError, KeyError, TypeError) as err:
        return (
            f"{TRACKING_FILE} does not name an MLflow run ({type(err).__name__}: {err}): the "
            "card was not attached to the run's tracker"
        )
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        return (
            f"the run was tracked in MLflow (run {run_id}) but mlflow is not installed "
            "here: the card was not attached (pip install 'fl-app[tracking]' and export "
            "again with --overwrite)"
        )
    from fl_app.server.tracking_sinks import MLFLOW_FILE_STORE_OPT_IN, is_file_store

    if is_file_store(uri):
        os.environ.setdefault(MLFLOW_FILE_STORE_OPT_IN, "true")
    try:
        with _http_limits():
            client = MlflowClient(tracking_uri=uri)
            for name in names:
                client.log_artifact(run_id, str(out_dir / name), f"{CARD_ARTIFACT_DIR}/{tier}")
    except Exception as err:  # a tracker is a reader, never the release's record
        return (
            f"the card could not be attached to MLflow run {run_id} at {uri} "
            f"({type(err).__name__}: {err}); the export itself is complete"
        )
    return None

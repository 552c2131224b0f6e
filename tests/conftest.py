"""Shared test set-up."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _absl_handler_off_the_capture() -> None:
    """dp-accounting imports absl, whose logging handler keeps the stream that was
    ``sys.stderr`` at import (pytest's capture). Hydra's logging set-up closes every
    handler ever created, and absl's closes that stream unless it is a standard one:
    point it at the real stderr so in-process CLI runs (``fl-app`` called inside a test)
    leave pytest's capture intact. An artefact of running ``fl-app`` inside pytest, not
    of ``fl-app``; one fixture for every test, wherever such a run happens."""
    import sys

    from absl import logging as absl_logging

    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__

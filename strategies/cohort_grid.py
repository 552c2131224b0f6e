"""The cohort view of a Grid that the wrapped Flower strategy sees (:mod:`strategies.driver`).

Sampling is the driver's; the strategy builds instructions for exactly the sampled
cohort and never sends (docs/architecture.md, One round).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["CohortGrid"]


class CohortGrid(Grid):
    """A view of a Grid that shows only the driver's sampled cohort.

    The strategy's own node sampling (global ``random``, waits for
    ``min_available_nodes``) then picks exactly this cohort, while sending stays with
    the driver.
    """

    def __init__(self, grid: Grid, cohort: Sequence[int]) -> None:
        self._grid = grid
        self._cohort = list(cohort)

    def set_run(self, run: Any) -> None:  # pragma: no cover - never called on a view
        raise RuntimeError("CohortGrid is a read-only view")

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._cohort)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise RuntimeError("strategies must not send through the cohort view")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise RuntimeError("strategies must not pull through the cohort view")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise RuntimeError("strategies must not send through the cohort view")

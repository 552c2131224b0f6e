"""The round driver's message exchange and reply ingestion (:mod:`strategies.driver`).

Push one stage's instructions, pull replies until all arrive or the stage times out,
then screen and parse them (:mod:`strategies.validation`): a malformed reply is
rejected with a logged reason and the round goes on with the rest. A mixin of
:class:`~strategies.driver.RoundDriver`, so tests and benchmarks can still wrap
``RoundDriver._exchange`` (docs/architecture.md, One round).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fl_app.protocol import CONFIG_KEY
from strategies.aggregation import weighted_mean_metrics
from strategies.driver_types import DriverSettings, StageReport
from strategies.validation import EvalReply, Rejection, TrainReply, screen_replies

__all__ = [
    "IN_MEMORY_GRID_WINDOW",
    "UNSENT_PREFIX",
    "WINDOW_STALL_S",
    "ReplyExchange",
    "in_flight_window",
]

# The driver's logger: one name for every part of the round loop.
log = logging.getLogger("fl_app.driver")

R = TypeVar("R", TrainReply, EvalReply)

# Instructions in flight at once under Flower's Ray simulation engine (its InMemoryGrid),
# when runtime.max_in_flight is null. That engine's fleet thread sweeps every node every
# 0.1 s, and each node's pull scans every stored instruction (flwr 1.42,
# vce_api.add_messages_to_queue and InMemoryLinkState.get_message_ins): O(nodes x in
# flight) under the GIL the ServerApp shares. With 1,000 instructions in flight that
# sweep was most of the driver's CPU (docs/performance.md, Ray driver at 1,000 clients).
# Measured on 2 cores, steady s/round at 1,000 clients: all 16.7, 128: 13.2, 64: 13.5,
# 32: 12.0, 16: 12.3, 8: 18.0 (too few for the 0.1 s sweep to keep the actors fed).
IN_MEMORY_GRID_WINDOW = 32
# With instructions waiting, a window that saw no reply for this long doubles.
WINDOW_STALL_S = 5.0
# The ``sent`` key of an instruction the stage ended before sending (no message id).
UNSENT_PREFIX = "unsent:"


def in_flight_window(max_in_flight: int | None, grid: Grid, n: int) -> int:
    """How many of a stage's ``n`` instructions may await replies at once.

    ``max_in_flight`` is ``runtime.max_in_flight``: 0 sends all at once, N > 0 at most N,
    null picks :data:`IN_MEMORY_GRID_WINDOW` for Flower's Ray simulation engine and all
    at once for every other grid (a deployment's sites work in parallel and the
    in-process grid runs a message when it is pushed).
    """
    if max_in_flight is None:
        from flwr.superlink.grid import InMemoryGrid

        max_in_flight = IN_MEMORY_GRID_WINDOW if isinstance(grid, InMemoryGrid) else 0
    return max(n, 1) if max_in_flight == 0 else max_in_flight


def _public(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith("fl-app.")}


class ReplyExchange:
    """Sending, collecting, screening and logging one stage's messages."""

    settings: DriverSettings
    node_config_fn: Callable[[int], Mapping[str, Any]] | None

    def _ingest(
        self,
        name: str,
        rnd: int,
        stage: StageReport,
        replies: list[Message],
        sent: Mapping[str, int],
        parse: Callable[[Message], R | Rejection],
    ) -> tuple[list[R], list[Rejection]]:
        """Screen and parse one stage's replies; fill ``stage``; log every refusal.

        Returns the accepted parsed replies and the clients' own error replies.
        """
        screened = screen_replies(replies, sent)
        accepted: list[R] = []
        for msg in screened.accepted:
            parsed = parse(msg)
            if isinstance(parsed, Rejection):
                screened.rejected.append(parsed)
            else:
                accepted.append(parsed)
        self._fill_stage(stage, replies, sent, screened.rejected, screened.failed, len(accepted))
        self._log_rejections(name, rnd, screened.rejected, screened.failed)
        # Protocol keys ("fl-app.*", e.g. adaptive clipping's per-client bit) are for the
        # privacy layer only and never averaged into the metrics files.
        stage.metrics = weighted_mean_metrics(
            [(r.num_examples, _public(r.metrics)) for r in accepted]
        )
        return accepted, screened.failed

    def _exchange(
        self, grid: Grid, messages: Iterable[Message], rnd: int, timeout: float
    ) -> tuple[list[Message], list[Message], dict[str, int]]:
        """Send one stage's instructions and collect replies until all or timeout.

        Returns the messages sent, the replies received and ``message_id -> node``.
        """
        outgoing = [
            Message(
                self._with_node_config(m.content, m.metadata.dst_node_id),
                dst_node_id=m.metadata.dst_node_id,
                message_type=m.metadata.message_type,
                group_id=str(rnd),
                ttl=max(timeout, 1.0) + 60.0,
            )
            for m in sorted(messages, key=lambda m: m.metadata.dst_node_id)
        ]
        window = in_flight_window(self.settings.max_in_flight, grid, len(outgoing))
        waiting = list(outgoing)
        pushed: list[Message] = []
        sent: dict[str, int] = {}
        pending: set[str] = set()
        replies: list[Message] = []
        now = time.monotonic()
        deadline, last_reply = now + timeout, now
        while True:
            if waiting and time.monotonic() - last_reply >= WINDOW_STALL_S:
                # Nothing came back for a while: silent nodes must not hold the window
                # until the deadline (it would starve every instruction behind them).
                window, last_reply = window * 2, time.monotonic()
            room = window - len(pending)
            if waiting and room > 0:
                batch, waiting = waiting[:room], waiting[room:]
                for m in self._push(grid, batch):
                    pushed.append(m)
                    sent[m.metadata.message_id] = m.metadata.dst_node_id
                    pending.add(m.metadata.message_id)
            got = list(grid.pull_messages(list(pending))) if pending else []
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if got:
                last_reply = time.monotonic()
            if not (pending or waiting) or time.monotonic() >= deadline:
                break
            if not got or not waiting:
                time.sleep(self.settings.poll_interval_s)
        if waiting:
            sent.update(self._never_sent(rnd, waiting, timeout, window))
        return pushed, replies, sent

    @staticmethod
    def _never_sent(
        rnd: int, waiting: list[Message], timeout: float, window: int
    ) -> dict[str, int]:
        """``sent`` entries for instructions the stage ended before sending: counted as
        sent and missing, as nodes that did not answer, without making a client work for
        a reply nobody would read (under local DP that reply would spend its budget)."""
        log.warning(
            "round %d: %d instructions not sent before the stage's %gs deadline "
            "(runtime.max_in_flight window %d); counted as missing",
            rnd,
            len(waiting),
            timeout,
            window,
        )
        return {f"{UNSENT_PREFIX}{m.metadata.dst_node_id}": m.metadata.dst_node_id for m in waiting}

    @staticmethod
    def _push(grid: Grid, batch: list[Message]) -> list[Message]:
        """Push ``batch``; return the messages the grid stored."""
        # Grids stamp each pushed message with its id (Flower's InMemoryGrid returns ids
        # only for the messages it stored, so the returned list cannot be zipped).
        ids = {mid for mid in grid.push_messages(batch) if mid}
        return [m for m in batch if m.metadata.message_id in ids]

    def _with_node_config(self, content: RecordDict, node_id: int) -> RecordDict:
        """The instruction for one node: shared records plus its own config scalars."""
        extra = dict(self.node_config_fn(node_id)) if self.node_config_fn else {}
        if not extra:
            return content
        records = {k: v for k, v in content.items()}
        records[CONFIG_KEY] = ConfigRecord({**content.config_records[CONFIG_KEY], **extra})
        return RecordDict(records)

    @staticmethod
    def _fill_stage(
        stage: StageReport,
        replies: list[Message],
        sent: Mapping[str, int],
        rejected: list[Rejection],
        failed: list[Rejection],
        accepted: int,
    ) -> None:
        answered = {m.metadata.reply_to_message_id for m in replies} & set(sent)
        stage.replied = len(answered)
        stage.missing = len(sent) - len(answered)
        stage.accepted = accepted
        stage.rejected = [(r.node_id, r.reason) for r in rejected]
        stage.failed = [(r.node_id, r.reason) for r in failed]

    @staticmethod
    def _log_rejections(
        stage: str, rnd: int, rejected: list[Rejection], failed: list[Rejection]
    ) -> None:
        for r in rejected:
            log.warning(
                "round %d %s: rejected reply from node %d: %s", rnd, stage, r.node_id, r.reason
            )
        for r in failed:
            log.warning("round %d %s: node %d failed: %s", rnd, stage, r.node_id, r.reason)

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.settings.wait_for_nodes_s
        announced = False
        while True:
            nodes = sorted(int(n) for n in grid.get_node_ids())
            if len(nodes) >= self.settings.min_available_nodes:
                return nodes
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"only {len(nodes)} nodes connected after {self.settings.wait_for_nodes_s:g}s "
                    f"(strategy.min_available_nodes={self.settings.min_available_nodes}); start "
                    "more SuperNodes or lower strategy.min_available_nodes"
                )
            if not announced:
                log.info(
                    "waiting for nodes: %d connected, %d required",
                    len(nodes),
                    self.settings.min_available_nodes,
                )
                announced = True
            time.sleep(1.0)

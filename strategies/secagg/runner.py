"""One protocol stage as one message exchange: send, screen, parse, feed the session.

:class:`StageRunner` times each stage, counts payload bytes, records rejections
(logged, never raised: a bad reply only drops its node) and hands the parsed payloads
to the :class:`~fl_app.secagg.ServerSession` step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from flwr.app import Message, MessageType, RecordDict

from fl_app.protocol import CONFIG_KEY, METRICS_KEY, PUBLIC_METRIC_PREFIX
from fl_app.secagg import wire
from fl_app.secagg.protocol import Stage
from fl_app.secagg.server_session import ServerSession
from strategies.secagg.messages import parse_stage_reply
from strategies.secagg.outcome import SecAggOutcome, StageLog
from strategies.validation import Rejection, screen_replies

log = logging.getLogger("fl_app.secagg")


#: ``exchange(messages, timeout) -> (sent messages, replies, message_id -> node)``: the
#: driver's push/pull loop (:meth:`strategies.driver.RoundDriver._exchange`).
Exchange = Callable[[list[Message], float], tuple[list[Message], list[Message], dict[str, int]]]
#: ``check(node, public dp-* metrics) -> rejection reason or None`` for a masked input.
PublicCheck = Callable[[int, Mapping[str, float]], "str | None"]


class StageRunner:
    """Sends one stage, screens and parses its replies, feeds the server session."""

    def __init__(
        self,
        server: ServerSession,
        outcome: SecAggOutcome,
        rnd: int,
        exchange: Exchange,
        timeout: float,
        public_check: PublicCheck | None = None,
    ) -> None:
        self.server = server
        self.public_check = public_check
        self.outcome = outcome
        self.rnd = rnd
        self.exchange = exchange
        self.timeout = timeout
        self._seen_rejections = 0

    def absorb_rejections(self) -> None:
        """Copy the session's new rejections into the outcome (node then counts as dropped)."""
        new = self.server.rejections[self._seen_rejections :]
        self._seen_rejections = len(self.server.rejections)
        for r in new:
            rej = Rejection(r.node, f"stage {r.stage.name}: {r.reason}")
            self.outcome.rejected.append(rej)
            log.warning("round %d secagg: rejected node %d: %s", self.rnd, rej.node_id, rej.reason)

    def stage(
        self,
        stage: Stage,
        contents: Mapping[int, RecordDict],
        parse_payload: Callable[[RecordDict], Any],
        feed: Callable[[dict[int, Any]], Any],
        optional: frozenset[str] = frozenset(),
    ) -> Any:
        # long: send, screen, parse, feed and time one stage as one unit (one log entry).
        t0 = time.perf_counter()
        messages = []
        for node, content in sorted(contents.items()):
            content.config_records[CONFIG_KEY][wire.SECAGG_STAGE_KEY] = int(stage)
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        if messages:
            sent_msgs, replies, sent = self.exchange(messages, self.timeout)
        else:  # every node already holds what this stage would ask for
            sent_msgs, replies, sent = [], [], {}
        t1 = time.perf_counter()
        self.outcome.bytes_down += sum(wire.payload_bytes(m.content) for m in sent_msgs)
        self.outcome.bytes_up += sum(
            wire.payload_bytes(m.content) for m in replies if m.has_content()
        )
        if stage is Stage.masked_input:
            self.outcome.masked_input_sent = sent_msgs
        log_entry = StageLog(stage, sent=len(sent))
        answered = {m.metadata.reply_to_message_id for m in replies} & set(sent)
        log_entry.replied = len(answered)
        self.outcome.missing.update(node for mid, node in sent.items() if mid not in answered)
        screened = screen_replies(replies, sent)
        payloads: dict[int, Any] = {}
        for msg in screened.accepted:
            parsed = parse_stage_reply(msg, server_round=self.rnd, stage=stage, optional=optional)
            if isinstance(parsed, Rejection):
                screened.rejected.append(parsed)
                continue
            node = int(msg.metadata.src_node_id)
            try:
                payload = parse_payload(parsed)
            except (ValueError, KeyError, TypeError) as err:
                screened.rejected.append(Rejection(node, f"stage {stage.name}: {err}"))
                continue
            if stage is Stage.masked_input:
                public = {
                    k: float(cast(float, v))
                    for k, v in parsed[METRICS_KEY].items()
                    if k.startswith(PUBLIC_METRIC_PREFIX)
                }
                # After the payload parsed: an unparsable reply claims no site identity.
                refused = self.public_check(node, public) if self.public_check else None
                if refused is not None:
                    # Not fed: a stage-3 dropout, whose masks unmasking removes.
                    screened.rejected.append(Rejection(node, f"stage {stage.name}: {refused}"))
                    continue
                if public:
                    self.outcome.client_metrics[node] = public
            payloads[node] = payload
        for r in screened.rejected:
            log.warning("round %d secagg: rejected node %d: %s", self.rnd, r.node_id, r.reason)
        for r in screened.failed:
            log.warning("round %d secagg: node %d failed: %s", self.rnd, r.node_id, r.reason)
        self.outcome.rejected.extend(screened.rejected)
        self.outcome.failed.extend(screened.failed)
        self.outcome.stages.append(log_entry)
        try:
            result = feed(payloads)
        finally:
            self.absorb_rejections()
            t2 = time.perf_counter()
            log_entry.server_seconds = (t2 - t1) + 0.0
            log_entry.seconds = t2 - t0
        log_entry.accepted = accepted_count(result)
        return result


def accepted_count(result: Any) -> int:
    if isinstance(result, Mapping):
        return len(result)
    survivors = getattr(result, "survivors", None)
    return len(survivors) if survivors is not None else 0

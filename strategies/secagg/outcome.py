"""What one secure train stage produced: the decoded sum (or ``None`` and why the round
was abandoned) and its public per-stage record (:class:`StageLog`, byte counts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flwr.app import Message

from fl_app.secagg.params import SecAggParams
from fl_app.secagg.protocol import Stage
from fl_app.secagg.vector import DecodedSum
from strategies.validation import Rejection

log = logging.getLogger("fl_app.secagg")


@dataclass
class StageLog:
    """What happened in one protocol stage."""

    stage: Stage
    sent: int = 0
    replied: int = 0
    accepted: int = 0
    seconds: float = 0.0
    server_seconds: float = 0.0


@dataclass
class SecAggOutcome:
    """The result of one secure train stage.

    ``decoded`` is ``None`` when the round was abandoned (``note`` says why).
    """

    decoded: DecodedSum | None
    num_contributors: int = 0
    note: str = ""
    params: SecAggParams | None = None
    stages: list[StageLog] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    failed: list[Rejection] = field(default_factory=list)
    # Cohort nodes whose reply to some stage never arrived.
    missing: set[int] = field(default_factory=set)
    # Stage-3 instructions (the synthetic aggregate reply answers the first one).
    masked_input_sent: list[Message] = field(default_factory=list)
    dropouts: int = 0
    # Public dp-* metrics (record-level DP-SGD) from the stage-3 replies, by node.
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    # Payload bytes sent to / received from the cohort over all four stages.
    bytes_down: int = 0
    bytes_up: int = 0
    cohort_size: int = 0
    bits: int = 0
    # The sum was unmasked (the server saw it) and then refused at decoding: the round is
    # abandoned, but under distributed DP the noised sum was released to the server, so
    # the mechanism ran and must be accounted.
    unmasked: bool = False

    def metrics(self) -> dict[str, float]:
        """Public per-round metrics for the round report."""
        out: dict[str, float] = {
            "secagg_contributors": float(self.num_contributors),
            "secagg_dropouts_after_sharing": float(self.dropouts),
            "secagg_server_seconds": sum(s.server_seconds for s in self.stages),
        }
        if self.params is not None:
            out["secagg_threshold"] = float(self.params.threshold)
            out["secagg_degree"] = float(self.params.degree)
        for s in self.stages:
            out[f"secagg_stage{int(s.stage)}_accepted"] = float(s.accepted)
            out[f"secagg_stage{int(s.stage)}_seconds"] = s.seconds
        if self.unmasked and self.decoded is None:
            out["secagg_abandoned_after_unmask"] = 1.0
        if self.cohort_size:
            out["secagg_bits"] = float(self.bits)
            out["secagg_bytes_down_per_client"] = self.bytes_down / self.cohort_size
            out["secagg_bytes_up_per_client"] = self.bytes_up / self.cohort_size
        return out

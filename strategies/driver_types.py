"""The round driver's settings and what it reports (:mod:`strategies.driver`).

Kept apart from the loop so the ServerApp's listeners, run directory and summary read
round reports without the driver's machinery (docs/architecture.md, One round).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fl_app.fairness import site_spread
from strategies.validation import ReplyLimits

__all__ = [
    "Arrays",
    "DriverResult",
    "DriverSettings",
    "RoundListener",
    "RoundReport",
    "StageReport",
]

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class DriverSettings:
    num_rounds: int
    train_timeout_s: float = 600.0
    evaluate_timeout_s: float = 300.0
    min_available_nodes: int = 1
    min_train_replies: int = 1
    federated_eval_every: int = 1
    # How long to wait for min_available_nodes before giving up.
    wait_for_nodes_s: float = 600.0
    poll_interval_s: float = 0.05
    # runtime.max_in_flight: instructions awaiting replies at once (0 = all; null = the
    # grid's default, strategies.exchange.in_flight_window).
    max_in_flight: int | None = None
    limits: ReplyLimits = field(default_factory=ReplyLimits)
    # share.artifact=weights: a train reply holds w_local; the driver takes Δ = w_local −
    # w_global at ingestion, before any check or aggregation sees it.
    replies_are_weights: bool = False

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, found {self.num_rounds}")
        if self.min_train_replies < 1:
            raise ValueError(f"min_train_replies must be >= 1, found {self.min_train_replies}")
        if self.max_in_flight is not None and self.max_in_flight < 0:
            raise ValueError(f"max_in_flight must be >= 0 or None, found {self.max_in_flight}")
        if self.min_available_nodes < 1:
            raise ValueError(f"min_available_nodes must be >= 1, found {self.min_available_nodes}")


@dataclass
class StageReport:
    """What happened in one exchange (train or evaluate) of a round."""

    sampled: int = 0
    replied: int = 0
    accepted: int = 0
    missing: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    # Public per-client metrics (keys starting with PUBLIC_METRIC_PREFIX), by node id.
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    # Nodes that refused because their privacy budget is exhausted.
    exhausted: list[int] = field(default_factory=list)
    seconds: float = 0.0
    # Evaluate stage only: each accepted reply's accuracy and example count, by node id
    # (the fairness indicators, fl_app.fairness). Filled only where the threat model lets
    # the server see per-client numbers: elsewhere federated evaluation does not run.
    client_eval: dict[int, tuple[float, float]] = field(default_factory=dict)


@dataclass
class RoundReport:
    server_round: int
    train: StageReport
    evaluate: StageReport | None
    model_updated: bool
    note: str = ""
    server_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    update_norm: float = 0.0
    # Public metrics of the privacy layer (clip norm, noise std, epsilon so far, ...).
    privacy: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """Flat JSON-able form for ``metrics.jsonl``."""
        rec: dict[str, Any] = {
            "round": self.server_round,
            "clients_sampled": self.train.sampled,
            "clients_replied": self.train.replied,
            "clients_accepted": self.train.accepted,
            "clients_rejected": len(self.train.rejected),
            "clients_failed": len(self.train.failed),
            "clients_missing": self.train.missing,
            "rejections": [{"node": n, "reason": r} for n, r in self.train.rejected],
            "failures": [{"node": n, "reason": r} for n, r in self.train.failed],
            "model_updated": self.model_updated,
            "mean_update_norm": self.update_norm,
            "round_seconds": round(self.seconds, 4),
            "train_seconds": round(self.train.seconds, 4),
        }
        if self.note:
            rec["note"] = self.note
        if self.train.exhausted:
            rec["clients_budget_exhausted"] = len(self.train.exhausted)
        if self.train.client_metrics:
            rec["client_metrics"] = {
                str(node): {k.replace("-", "_"): v for k, v in m.items()}
                for node, m in sorted(self.train.client_metrics.items())
            }
        for k, v in self.train.metrics.items():
            rec[k if k.startswith("train") else f"train_{k}"] = v
        if self.evaluate is not None:
            rec["eval_clients_sampled"] = self.evaluate.sampled
            rec["eval_clients_accepted"] = self.evaluate.accepted
            rec["eval_clients_rejected"] = len(self.evaluate.rejected) + len(self.evaluate.failed)
            for k, v in self.evaluate.metrics.items():
                rec[f"fed_{k}"] = v
            if self.evaluate.client_eval:
                spread = site_spread({str(n): a for n, (a, _) in self.evaluate.client_eval.items()})
                rec["fed_site_accuracy_mean"] = spread.mean
                rec["fed_site_accuracy_std"] = spread.std
                rec["fed_site_accuracy_range"] = spread.range
                rec["fed_site_accuracy_min"] = spread.worst_accuracy
        for k, v in self.server_metrics.items():
            rec[f"server_{k}"] = v
        rec.update(self.privacy)
        return {k.replace("-", "_"): v for k, v in rec.items()}


class RoundListener(Protocol):
    def on_round_end(self, report: RoundReport, arrays: Mapping[str, np.ndarray]) -> None: ...


@dataclass
class DriverResult:
    arrays: Arrays
    reports: list[RoundReport]
    initial_server_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    # Why the run ended before num_rounds (e.g. too few clients with budget left).
    stopped_early: str = ""
    # Latest public per-client metrics (e.g. each institution's epsilon), by node id.
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    exhausted: set[int] = field(default_factory=set)
    # Site identities refused in the run (12 hex digits) -> the nodes refused for them
    # (strategies.site_claims): a contest is in summary.json, not only in the log.
    contested_sites: dict[str, list[int]] = field(default_factory=dict)

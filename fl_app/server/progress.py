"""What the ServerApp prints for its operator: before, during and after the run.

Before round 1: the resume point, the client-level privacy projection (and, on a
resume, where the run will end given the ledger it already holds), and why a run is
not for release. Each round: one line (:class:`ProgressPrinter`). At the end: why
the run stopped early, a status that is not ``completed``, and the ``done:`` line.
``fl-app deploy submit`` streams these lines (docs/architecture.md, "Server").
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from fl_app.privacy.noise import release_status
from fl_app.server.session import RunSession
from strategies.aggregators import MeanAggregator
from strategies.dp_aggregators import AccountedDp
from strategies.dp_projection import projection_lines
from strategies.driver_types import DriverResult, RoundReport

__all__ = ["ProgressPrinter", "print_run_end", "print_run_start"]


def print_run_start(run: RunSession) -> None:
    """The lines printed before round 1 (resume point, projection, release status)."""
    plan, aggregator = run.plan, run.aggregator
    if plan is not None:
        verb = "rolling back to" if plan.rollback else "resuming after"
        print(f"{verb} round {plan.round} in {run.rd.path}", flush=True)
    if not isinstance(aggregator, MeanAggregator):
        for line in projection_lines(aggregator.settings):
            print(line, flush=True)
        if plan is not None and isinstance(aggregator, AccountedDp):
            # The plan above counts num_rounds releases; a resumed ledger already holds
            # those before the checkpoint and any interrupted round's (it stays spent),
            # so the run ends at the ledger plus the rounds left, not at the plan.
            rest = aggregator.settings.planned_events(plan.round + 1)
            print(
                f"resume projection: the ledger holds {len(aggregator.ledger.events)} "
                f"releases (an interrupted round's included); after the {len(rest)} "
                f"rounds left the run ends at epsilon {aggregator.ledger.project(rest):.4f}",
                flush=True,
            )
    release = release_status(run.cfg)
    if not release["for_release"]:
        print("NOT FOR RELEASE: " + "; ".join(release["reasons"]), flush=True)


def print_run_end(run: RunSession, summary: Mapping[str, Any], result: DriverResult) -> None:
    """The lines printed when the run has ended (its directory is complete)."""
    acc = summary.get("accuracy")
    shown = f"{acc:.4f}" if isinstance(acc, float) else "n/a"
    if result.stopped_early:
        print(f"stopped early: {result.stopped_early}", flush=True)
    if summary["status_reason"]:
        print(f"run {summary['status'].upper()}: {summary['status_reason']}", flush=True)
    eps = summary["privacy"].get("record_level_epsilon_max")
    spent = f", max record-level epsilon {eps:.3f}" if eps is not None else ""
    fed_eps = summary["privacy"].get("epsilon")
    if fed_eps is not None:
        spent += f", client-level epsilon {fed_eps:.3f} (delta {summary['privacy']['delta']:g})"
    print(
        f"done: {summary['rounds']} rounds"
        + (f" ({len(result.reports)} after resuming)" if run.plan is not None else "")
        + f" in {summary['seconds']:.1f}s, "
        f"test accuracy {shown}{spent}; run directory {run.rd.path}",
        flush=True,
    )


class ProgressPrinter:
    """Round listener: one human line per round on the terminal."""

    def __init__(self, num_rounds: int, stream: Any = None) -> None:
        self.num_rounds = num_rounds
        self.stream = stream

    def on_round_end(self, report: RoundReport, arrays: Mapping[str, np.ndarray]) -> None:
        t = report.train
        parts = [
            f"[round {report.server_round}/{self.num_rounds}]",
            f"clients {t.accepted}/{t.sampled} ok",
        ]
        if t.rejected or t.failed or t.missing:
            parts.append(
                f"({len(t.rejected)} rejected, {len(t.failed)} failed, {t.missing} missing)"
            )
        if "train-loss" in t.metrics:
            parts.append(f"train loss {t.metrics['train-loss']:.4f}")
        if report.evaluate is not None and "eval-accuracy" in report.evaluate.metrics:
            parts.append(f"fed acc {report.evaluate.metrics['eval-accuracy']:.4f}")
        if "accuracy" in report.server_metrics:
            parts.append(
                f"test acc {report.server_metrics['accuracy']:.4f} "
                f"loss {report.server_metrics['loss']:.4f}"
            )
        eps = [m["dp-epsilon"] for m in t.client_metrics.values() if "dp-epsilon" in m]
        if eps:
            parts.append(f"record-level eps max {max(eps):.3f}")
        if "dp_epsilon" in report.privacy:
            parts.append(f"client-level eps {report.privacy['dp_epsilon']:.3f}")
        if "dp_local_epsilon_max" in report.privacy:
            parts.append(f"local eps max {report.privacy['dp_local_epsilon_max']:.3f}")
        if t.exhausted:
            parts.append(f"{len(t.exhausted)} out of budget")
        if not report.model_updated:
            parts.append("MODEL UNCHANGED")
        parts.append(f"{report.seconds:.2f}s")
        print(" | ".join(parts), file=self.stream or sys.stdout, flush=True)

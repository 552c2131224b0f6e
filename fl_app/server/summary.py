"""``summary.json``: what a run achieved and the privacy it spent, as the run ends.

:func:`build_summary` assembles the summary from the driver's result, the config and
the aggregator's ledger: accuracy, rounds, the client-level guarantee (against
outsiders and against the server), each institution's record-level epsilon, the
secure-aggregation bandwidth, the release status, and the one-line account of what
was protected (the run's guarantee, :func:`fl_app.config.guarantee.privacy_note`;
docs/architecture.md, "Server").
:func:`fl_app.server.session.finish_run` adds the status and the audit anchor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_app.config.guarantee import privacy_note
from fl_app.config.schema import Accountant, AppConfig, NoiseSchedule
from fl_app.privacy.composition import branch_delta_total, unsampled_epsilon
from fl_app.privacy.history import AccountingError
from fl_app.privacy.noise import release_status
from fl_app.server.fairness import fairness_summary
from fl_app.server.layout import LEDGER_FILE
from fl_app.server.rundir import RunDirectory, read_round_records
from strategies.aggregators import MeanAggregator
from strategies.dp_aggregators import AccountedDp
from strategies.driver_types import DriverResult
from strategies.ftrl import ftrl_summary
from strategies.local_dp import LocalDp, site_key_of
from strategies.noise_schedule import server_projection

__all__ = ["build_summary", "clients_over_run"]


def build_summary(
    cfg: AppConfig,
    result: DriverResult,
    seconds: float,
    rd: RunDirectory,
    model_sha: str,
    aggregator: MeanAggregator | AccountedDp | LocalDp,
) -> dict[str, Any]:
    last = result.reports[-1] if result.reports else None
    fed = None
    for report in reversed(result.reports):
        if report.evaluate is not None and report.evaluate.metrics:
            fed = report.evaluate.metrics
            break
    server = last.server_metrics if last else {}
    return {
        "status": "completed",
        "experiment_name": cfg.experiment_name,
        "accuracy": server.get("accuracy"),
        "loss": server.get("loss"),
        "initial_accuracy": result.initial_server_metrics.get("accuracy"),
        "federated_eval_accuracy": fed.get("eval-accuracy") if fed else None,
        "federated_eval_loss": fed.get("eval-loss") if fed else None,
        "rounds": len(result.reports),
        "rounds_planned": cfg.num_rounds,
        "stopped_early": result.stopped_early or None,
        "rounds_model_unchanged": sum(not r.model_updated for r in result.reports),
        # Site identities refused (a second node, or a node's second identity) -> the
        # nodes refused for them (strategies.site_claims); empty in a clean run.
        "contested_site_identities": result.contested_sites,
        "clients": cfg.dataset.num_partitions,
        "seconds": seconds,
        "seconds_per_round": result.seconds / max(1, len(result.reports)),
        "config_hash": rd.config_hash,
        "code_version": rd.manifest["code_version"],
        "model_file": rd.model_path.name,
        "model_sha256": model_sha,
        "privacy": {
            "mode": cfg.privacy.mode.value,
            "threat_model": cfg.privacy.threat_model.value,
            "note": privacy_note(cfg),
            **_client_level_summary(aggregator, result),
            **_record_level_summary(cfg, result),
        },
        "secure_aggregation": cfg.secagg.mode.value,
        # What the secure-aggregation thresholds (and protocol) assumed of the server.
        "secure_aggregation_server_model": (
            None if cfg.secagg.mode.value == "off" else cfg.secagg.server_model.value
        ),
        "bandwidth": _bandwidth_summary(cfg, result),
        # Per-site and per-class accuracy, or why withheld (fl_app.server.fairness).
        "fairness": fairness_summary(cfg, result),
        # "not for release" (and why) when a guarantee rests on seeded randomness.
        "release": release_status(cfg),
    }


def _client_level_summary(
    aggregator: MeanAggregator | AccountedDp | LocalDp, result: DriverResult
) -> dict[str, Any]:
    if isinstance(aggregator, MeanAggregator):
        return {"epsilon": None, "delta": None}
    s = aggregator.settings
    ledger = aggregator.ledger
    base: dict[str, Any] = {
        "delta": s.delta,
        "accountant": s.accountant.value,
        "clip": s.clip,
        "noise_multiplier": s.noise_multiplier,
        "budget_max_epsilon": s.max_epsilon,
        "ledger_file": LEDGER_FILE,
    }
    if isinstance(aggregator, LocalDp):
        return _local_dp_summary(aggregator, result, base)
    eps = ledger.epsilon()
    try:
        rdp = ledger.epsilon(Accountant.rdp.value) if s.accountant.value != "rdp" else eps
    except (AccountingError, ValueError):  # a cross-check never fails the run
        rdp = None
    against = _against_server_summary(aggregator)
    return {
        "epsilon": eps,
        "delta": s.delta,
        "epsilon_against_server": against["epsilon_max_over_clients"],
        "client_level": {
            "epsilon_against_outsiders": eps,
            "against_server": against,
            # δ taken by sampling-dependent branches (docs/privacy-branches.md).
            "delta_branches": branch_delta_total(ledger.events),
            **base,
            "mechanism": (
                "distributed DP: discrete Gaussian shares under secure aggregation "
                "(Kairouz et al. 2021), fixed clipping by the clients"
                if s.distributed is not None
                else f"central DP (DP-FedAvg), {s.clipping.value} clipping by the "
                f"{s.clip_side.value}, Gaussian noise z*C on the sum of clipped updates"
            ),
            **({"distributed": s.distributed.describe()} if s.distributed is not None else {}),
            # DP-FTRL: its mechanism, and that its epsilon uses no amplification.
            **ftrl_summary(s),
            "epsilon": eps,
            "epsilon_rdp_cross_check": rdp,
            "rounds_accounted": len(ledger.events),
            "sampling": s.sampling.value,
            "sample_rate": s.fraction,
            "update_noise_multiplier": s.update_noise_multiplier,
            "clipped_count_stddev": s.clipped_count_std,
            "clip_final": aggregator.clip,
            "neighbouring": (
                "replace one client"
                if ledger.events and ledger.events[-1].replace_one
                else "add or remove one client"
            ),
        },
    }


def _local_dp_summary(
    aggregator: LocalDp, result: DriverResult, base: dict[str, Any]
) -> dict[str, Any]:
    """Local DP: epsilon is the largest per-client value, reported or ledger-counted."""
    s = aggregator.settings
    ledger = aggregator.ledger
    reported = [
        m["dp-local-epsilon"] for m in result.client_metrics.values() if "dp-local-epsilon" in m
    ]
    eps = max([*reported, *ledger.local_epsilons().values()], default=0.0)
    return {
        "epsilon": eps,
        "delta": s.delta,
        "client_level": {
            **base,
            "mechanism": "local DP: each client clips to C and adds N(0, (z*C)^2)",
            "epsilon_max_client": eps,
            "releases": dict(ledger.local),
        },
    }


def _against_server_summary(aggregator: AccountedDp) -> dict[str, Any]:
    """ε against the server: no sampling amplification, the server picks the cohort.

    Distributed DP: each client's rounds in the cohort composed (the maximum over
    clients, and the planned worst case of a client in every round). Central DP: none,
    the server adds the noise after seeing the clipped updates (or their sum).
    """
    s = aggregator.settings
    ledger = aggregator.ledger
    if s.distributed is None:
        return {
            "epsilon_max_over_clients": None,
            "note": "central DP: the server adds the noise after seeing the clipped updates "
            "(or, under secure aggregation, their exact sum), so the guarantee holds against "
            "outsiders only",
        }
    template = s.round_event(1, s.planned_population, s.clip)
    per_client = ledger.server_epsilons()
    counts = dict(ledger.participation)
    return {
        "epsilon_max_over_clients": max(per_client.values(), default=0.0),
        # Includes the bound carried over from earlier server processes (a resume).
        "rounds_max_over_clients": ledger.most_participation(),
        "epsilon_planned_worst_case": unsampled_epsilon(
            template, s.num_rounds, s.delta, s.accountant
        )
        if s.schedule is NoiseSchedule.constant
        # A noise schedule: every planned round at its own planned z.
        else server_projection(s.planned_events(), s.delta),
        "clients_counted": len(counts),
        "note": "composition of the rounds each client was in the cohort of, without "
        "amplification: the server samples and messages the cohort",
    }


def _record_level_summary(cfg: AppConfig, result: DriverResult) -> dict[str, Any]:
    if not cfg.privacy.record_level:
        return {"record_level_epsilon_max": None}
    d = cfg.privacy.dpsgd
    per_client = {
        str(node): {k.removeprefix("dp-"): v for k, v in m.items()}
        for node, m in sorted(result.client_metrics.items())
    }
    eps = [m["epsilon"] for m in per_client.values() if "epsilon" in m]
    return {
        "record_level_epsilon_max": max(eps) if eps else 0.0,
        "record_level": {
            "mechanism": "DP-SGD (Opacus), Poisson sampling of local records",
            "accountant": d.accountant.value,
            "delta": d.delta,
            "max_grad_norm": d.max_grad_norm,
            "budget_max_epsilon": d.max_epsilon,
            "epsilon_max": max(eps) if eps else 0.0,
            "per_client": per_client,
            "clients_budget_exhausted": sorted(str(n) for n in result.exhausted),
        },
    }


def _bandwidth_summary(cfg: AppConfig, result: DriverResult) -> dict[str, Any] | None:
    """Mean payload bytes per client per round (None before any train stage ran).

    Payload bytes: array data, byte strings and scalars of the messages (protocol framing
    excluded). Under secure aggregation, its four stages' messages; uploads are bit-packed
    at ``secagg.bits`` per coordinate. Otherwise the train instructions and replies
    (strategies/bandwidth.py). With ``share.compression`` the block names it and its ratio.
    """
    rounds = [r.privacy for r in result.reports if "secagg_bytes_up_per_client" in r.privacy]
    if not rounds:
        return _plain_bandwidth(cfg, result)
    up = [r["secagg_bytes_up_per_client"] for r in rounds]
    down = [r["secagg_bytes_down_per_client"] for r in rounds]
    return {
        "bits": int(cfg.secagg.bits),
        "rounds_measured": len(rounds),
        "upload_bytes_per_client_round": sum(up) / len(up),
        "download_bytes_per_client_round": sum(down) / len(down),
        "note": "payload bytes of the four secure-aggregation stages (framing excluded)",
        **_compression(cfg),
    }


def _compression(cfg: AppConfig) -> dict[str, Any]:
    comp = str(getattr(cfg.share.compression, "value", cfg.share.compression))
    if comp == "sketch":  # the count sketch's size is its rows and the ratio
        return {
            "compression": comp,
            "ratio": float(cfg.share.ratio),
            "sketch_rows": int(cfg.share.sketch_rows),
        }
    return {} if comp == "none" else {"compression": comp, "ratio": float(cfg.share.ratio)}


def _plain_bandwidth(cfg: AppConfig, result: DriverResult) -> dict[str, Any] | None:
    rounds = [r.privacy for r in result.reports if "bytes_up_per_client" in r.privacy]
    if not rounds:
        return None
    up = [r["bytes_up_per_client"] for r in rounds]
    down = [r["bytes_down_per_client"] for r in rounds]
    return {
        "rounds_measured": len(rounds),
        "upload_bytes_per_client_round": sum(up) / len(up),
        "download_bytes_per_client_round": sum(down) / len(down),
        "note": "payload bytes of the train instructions and replies (framing excluded)",
        **_compression(cfg),
    }


def _site_key(node: int, metrics: Mapping[str, float]) -> str:
    """A site's stable key from its public metrics (the local-DP count's key), else
    its node id."""
    return site_key_of(metrics) or f"node-{node}"


def clients_over_run(
    metrics_path: Path, current: Mapping[int, Mapping[str, float]]
) -> dict[int, dict[str, float]]:
    """Each site's public DP metrics with the largest epsilon it reported in the run.

    ``current`` holds this server process's latest report per node; ``metrics.jsonl``
    holds every round's, across resumes and rollbacks (node ids change when SuperNodes
    restart, so sites are matched by :func:`_site_key`). Keyed by the node id that
    reported it.
    """
    best: dict[str, tuple[int, dict[str, float], float]] = {}

    def offer(node: int, metrics: Mapping[str, float]) -> None:
        eps = max(
            float(metrics.get("dp-epsilon", 0.0)), float(metrics.get("dp-local-epsilon", 0.0))
        )
        site = _site_key(node, metrics)
        if site not in best or eps >= best[site][2]:
            best[site] = (node, dict(metrics), eps)

    for record in read_round_records(metrics_path):
        for node, metrics in (record.get("client_metrics") or {}).items():
            offer(int(node), {k.replace("_", "-"): v for k, v in metrics.items()})
    for node, metrics in current.items():
        offer(node, metrics)
    return {node: metrics for node, metrics, _ in best.values()}

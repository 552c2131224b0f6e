"""Build a Flower Message-API strategy and fl-app's round driver from typed config."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from fl_app.config.driver_plan import DriverPlan
from fl_app.config.plan import RunPlan
from fl_app.config.schema import (
    PrivacyMode,
    SamplingMode,
    ShareArtifact,
    StrategyConfig,
    StrategyName,
    ThreatModel,
)
from fl_app.privacy.distributed import DdpPlan
from fl_app.privacy.ledger import FederationLedger
from strategies.aggregators import MeanAggregator, UpdateAggregator
from strategies.budget import BudgetGuard
from strategies.dp_aggregators import CentralDp, DistributedDp
from strategies.driver import EvaluateFn, ReleaseHook, RoundBeginHook, RoundDriver
from strategies.driver_types import DriverSettings, RoundListener
from strategies.ftrl import DpFtrl
from strategies.ftrl_cap import with_participation_cap
from strategies.local_dp import LocalDp
from strategies.sampling import EVALUATE_STREAM, FixedSizeSampler, PoissonSampler
from strategies.secagg import SecureAggregation
from strategies.validation import ReplyLimits

__all__ = ["STRATEGIES", "build_aggregator", "build_driver", "build_strategy"]

# Sampling and node minimums belong to the driver; the wrapped strategy sees only the
# cohort and must take all of it (see strategies.cohort_grid.CohortGrid).
_DELEGATED: dict[str, Any] = {
    "fraction_train": 1.0,
    "fraction_evaluate": 1.0,
    "min_train_nodes": 0,
    "min_evaluate_nodes": 0,
    "min_available_nodes": 0,
}


def _fedavg(cfg: StrategyConfig) -> Strategy:
    return FedAvg(**_DELEGATED)


def _fedadam(cfg: StrategyConfig) -> Strategy:
    return FedAdam(
        **_DELEGATED,
        eta=cfg.eta,
        eta_l=cfg.eta_l,
        beta_1=cfg.beta_1,
        beta_2=cfg.beta_2,
        tau=cfg.tau,
    )


def _fedprox(cfg: StrategyConfig) -> Strategy:
    return FedProx(**_DELEGATED, proximal_mu=cfg.proximal_mu)


STRATEGIES: Mapping[StrategyName, Callable[[StrategyConfig], Strategy]] = {
    StrategyName.fedavg: _fedavg,
    StrategyName.fedadam: _fedadam,
    StrategyName.fedprox: _fedprox,
}


def build_strategy(cfg: StrategyConfig) -> Strategy:
    """The Flower strategy named by ``strategy.name``."""
    return STRATEGIES[cfg.name](cfg)


def build_driver(
    plan: RunPlan,
    *,
    train_config: Mapping[str, Any],
    evaluate_config: Mapping[str, Any],
    evaluate_fn: EvaluateFn | None,
    listeners: Sequence[RoundListener] = (),
    node_config_fn: Callable[[int], Mapping[str, Any]] | None = None,
    aggregator: UpdateAggregator | None = None,
    round_begin_hooks: Sequence[RoundBeginHook] = (),
    release_hooks: Sequence[ReleaseHook] = (),
) -> RoundDriver:
    """A :class:`RoundDriver` wired to the strategy, samplers, limits and (with
    ``secagg.mode != off``) the plan's secure-aggregation settings."""
    cfg, d = plan.cfg, plan.driver
    train_sampler, evaluate_sampler = _samplers(d, cfg.seed)
    capped = with_participation_cap(train_sampler, aggregator)  # DP-FTRL once per tree
    r = cfg.runtime
    settings = DriverSettings(
        num_rounds=cfg.num_rounds,
        train_timeout_s=r.train_timeout_s,
        evaluate_timeout_s=r.evaluate_timeout_s,
        min_available_nodes=d.min_available_nodes,
        min_train_replies=d.min_train_replies,
        federated_eval_every=d.federated_eval_every,
        wait_for_nodes_s=r.train_timeout_s,
        limits=ReplyLimits(r.validation.max_update_norm, r.validation.max_num_examples),
        replies_are_weights=cfg.share.artifact is ShareArtifact.weights,
        max_in_flight=r.max_in_flight,
    )
    secagg_settings = plan.secagg
    return RoundDriver(
        build_strategy(cfg.strategy),
        train_sampler=capped,
        evaluate_sampler=evaluate_sampler,
        settings=settings,
        train_config=train_config,
        evaluate_config=evaluate_config,
        evaluate_fn=evaluate_fn,
        listeners=listeners,
        node_config_fn=node_config_fn,
        aggregator=aggregator,
        secagg=SecureAggregation(
            secagg_settings,
            ddp=aggregator.plan if isinstance(aggregator, DistributedDp) else None,
            ddp_at=_round_plan(aggregator) if isinstance(aggregator, DistributedDp) else None,
        )
        if secagg_settings is not None
        else None,
        round_begin_hooks=round_begin_hooks,
        release_hooks=release_hooks,
    )


def _round_plan(aggregator: DistributedDp) -> Callable[[int], DdpPlan]:
    """Round ``rnd``'s distributed-DP plan at the ``z`` its ledger event records (a noise
    schedule changes ``z``, and with it the ring's ``γ`` and ``Δ₂``)."""
    return lambda rnd: aggregator.plan.at(aggregator.federation.current(rnd).noise_multiplier)


def _samplers(
    d: DriverPlan, seed: int
) -> tuple[FixedSizeSampler | PoissonSampler, FixedSizeSampler | None]:
    """The train sampler the plan names and the evaluation sampler (if any)."""
    # Secret sampling: a keystream under a key only this server process holds (drawn
    # here, never in the plan); otherwise seeded, so such experiments reproduce.
    key = os.urandom(32) if d.secret_sampling else None
    if d.sampling is SamplingMode.poisson:
        train_sampler: FixedSizeSampler | PoissonSampler = PoissonSampler(
            d.fraction_train, seed, key=key
        )
    else:
        train_sampler = FixedSizeSampler(d.fraction_train, seed, key=key)
    evaluate_sampler = (
        FixedSizeSampler(d.fraction_evaluate, seed, stream=EVALUATE_STREAM, key=key)
        if d.fraction_evaluate > 0
        else None
    )
    return train_sampler, evaluate_sampler


def build_aggregator(
    plan: RunPlan, ledger: FederationLedger | None = None
) -> MeanAggregator | CentralDp | DpFtrl | DistributedDp | LocalDp:
    """The aggregator ``privacy.mode`` asks for, from the run's resolved plan
    (:func:`fl_app.config.plan.resolve`: settings calibrated once, not here)."""
    cfg = plan.cfg
    mode = cfg.privacy.mode
    if mode is PrivacyMode.none:
        return MeanAggregator()
    settings = plan.client_dp
    if settings is None:  # resolve() builds them for every client-level mode
        raise ValueError(f"privacy.mode={mode.value}: the plan has no client-level DP settings")
    if mode is PrivacyMode.central:
        budget = BudgetGuard(settings.max_epsilon) if settings.max_epsilon is not None else None
        if settings.ftrl_restart is not None:  # privacy.ftrl.enabled
            return DpFtrl(settings, ledger, budget)
        return CentralDp(settings, ledger, budget)
    if mode is PrivacyMode.local:
        return LocalDp(settings, ledger)
    if mode is PrivacyMode.distributed:
        if ledger is not None:
            # A resumed run is a new server process: its node ids cannot be matched to
            # the ledger's, so the participation counted so far becomes a bound.
            ledger = ledger.new_participation_session()
        # threat_model=distributed_dp (the validator pairs them): the budget is against
        # the server, which knows the cohort (no amplification).
        budget = (
            BudgetGuard(
                settings.max_epsilon,
                against_server=cfg.privacy.threat_model is ThreatModel.distributed_dp,
            )
            if settings.max_epsilon is not None
            else None
        )
        return DistributedDp(settings, ledger, budget)
    raise ValueError(f"privacy.mode={mode.value} has no aggregator in this release")

"""The round driver's part of the run's plan: who is sampled, how many, and when.

:func:`driver_plan` reads ``strategy.*``, ``federated_eval_every`` and the privacy
mode once (docs/architecture.md, Configuration); the factory
(:func:`strategies.factory.build_driver`) builds the samplers and the driver's settings
from it instead of reading the config again. The planned cohort on the configured
federation is the one definition the accounting also counts
(:func:`fl_app.privacy.round_event.fixed_cohort_size`); the driver recomputes it from
the nodes actually connected in each round.
"""

from __future__ import annotations

from dataclasses import dataclass

from fl_app.config.schema import AppConfig, PrivacyMode, SamplingMode, federated_eval_interval
from fl_app.privacy.round_event import fixed_cohort_size

__all__ = ["DriverPlan", "driver_plan"]


@dataclass(frozen=True)
class DriverPlan:
    """What the round driver samples and waits for.

    ``train_cohort``: the clients a round trains on the configured federation
    (``dataset.num_partitions``): ``round(q·N)`` in ``[1, N]`` for fixed-size sampling,
    the expected ``q·N`` for Poisson sampling. ``fraction_evaluate`` is 0 when no
    federated evaluation runs (no evaluation sampler). ``secret_sampling``: cohorts come
    from a keystream under a key only the server process draws (the key itself is never
    in the plan), because the run's ε counts amplification by sampling.
    """

    sampling: SamplingMode
    fraction_train: float
    fraction_evaluate: float
    federated_eval_every: int
    min_available_nodes: int
    min_train_replies: int
    federation_size: int
    train_cohort: float
    secret_sampling: bool


def driver_plan(cfg: AppConfig) -> DriverPlan:
    """The driver's plan for a checked ``cfg`` (:func:`fl_app.config.plan.resolve`)."""
    s = cfg.strategy
    n = cfg.dataset.num_partitions
    every = federated_eval_interval(cfg)
    if s.sampling is SamplingMode.poisson:
        cohort = s.fraction_train * n
    else:
        cohort = float(fixed_cohort_size(s.fraction_train, n))
    # Amplification by sampling (central and distributed DP's epsilon) needs cohorts
    # nobody can recompute. Without it (no DP, local DP, DP-SGD only, or
    # secure_mode=false) sampling stays seeded, so such experiments reproduce.
    amplified = cfg.privacy.mode in (PrivacyMode.central, PrivacyMode.distributed)
    return DriverPlan(
        sampling=s.sampling,
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate if every > 0 else 0.0,
        federated_eval_every=every,
        min_available_nodes=s.min_available_nodes,
        min_train_replies=s.min_train_replies,
        federation_size=n,
        train_cohort=cohort,
        secret_sampling=bool(cfg.privacy.secure_mode and amplified),
    )

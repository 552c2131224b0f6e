"""Client-level differential privacy around any mean-based strategy (central and local DP).

The round driver (:mod:`strategies.driver`) delegates three things to an
:class:`UpdateAggregator`: extra per-round instruction scalars, a per-reply check,
and turning the accepted replies into the update the wrapped Flower strategy applies.
:class:`MeanAggregator` is the non-private weighted mean; this module adds

:class:`CentralDp`
    DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private
    Recurrent Language Models", ICLR): every update clipped to L2 norm ``C`` (by the
    server, or by each client's pipeline and re-clipped by the server), summed,
    ``N(0, (z_Δ·C)²)`` added to the *sum*, divided by the *expected* cohort size
    ``m`` (``q·N`` for Poisson, the fixed size otherwise), so one client moves the
    mean by at most ``C/m`` and the noise on the mean is ``z·C/m``. With
    ``clipping=adaptive`` the clip norm follows a noised quantile of the update norms
    (Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning with
    Adaptive Clipping", NeurIPS, Algorithm 1): each client contributes
    ``b_i = 1[‖Δ_i‖ ≤ C_t]``, the server releases ``Σ(b_i − ½) + N(0, σ_b²) + m/2``
    and sets ``C_{t+1} = C_t·exp(−η(b̃ − γ))``. The updates' noise multiplier is
    ``z_Δ = (z^{-2} − (2σ_b)^{-2})^{-1/2}`` so the round's total is ``z``, and the
    noise of round ``t`` is ``z_Δ·C_t`` with the ``C_t`` that clipped that round's
    updates (Flower's adaptive wrapper noises with the *next* round's norm).
:class:`LocalDp`
    Each client clips and noises its own update (``privacy.mode=local``); the server
    only averages, and counts each client's releases in the ledger.

Every round's mechanism is recorded in a :class:`~fl_app.privacy.ledger.FederationLedger`
*before* its instructions leave the server (a crash over-counts, never under-counts),
and :class:`~strategies.budget.BudgetGuard` stops the run before a round that would
exceed ``privacy.max_epsilon``.

Condition (as in TFF's DP factories): whatever sits between clipping and noise must not
increase sensitivity, or the noise must be calibrated to what it makes. In plaintext that
is a float64 sum; under secure aggregation the fixed-point encoding can move a clipped
update by ``√d`` rounding steps, and the noise is calibrated to ``C`` plus that slack
(:func:`fl_app.privacy.mechanisms.encoding_slack`). Every branch of a round releases the
mechanism its ledger event describes (docs/privacy-branches.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fl_app.config.schema import (
    AppConfig,
    ClippingMode,
    ClipSide,
    PrivacyMode,
    SamplingMode,
    SecAggMode,
    ThreatModel,
)
from fl_app.privacy.accounting import AccountantName
from fl_app.privacy.clipping import clip_l2
from fl_app.privacy.distributed import DdpPlan
from fl_app.privacy.ledger import (
    FederationLedger,
    RoundEvent,
    SamplingScheme,
    branch_delta_total,
    calibrate_round_noise,
    local_epsilon,
    unsampled_epsilon,
)
from fl_app.privacy.mechanisms import (
    AdaptiveClip,
    CentralGaussian,
    cohort_gate_delta,
    encoding_slack,
    update_noise_multiplier,
)
from fl_app.privacy.noise import noise_source
from fl_app.protocol import CLIP_NORM_KEY, UNCLIPPED_KEY
from strategies.aggregation import weighted_mean_update
from strategies.budget import BudgetGuard
from strategies.sampling import FixedSizeSampler
from strategies.validation import TrainReply

__all__ = [
    "Aggregate",
    "CentralDp",
    "ClientDpSettings",
    "DistributedDp",
    "LocalDp",
    "MeanAggregator",
    "UpdateAggregator",
    "build_aggregator",
    "likely_server_stop_round",
    "planned_population",
    "projection_lines",
    "rounds_within_budget",
    "server_budget_refusal",
]

# Noise stream ids (independent of the samplers' streams 0 and 1).
CENTRAL_NOISE_STREAM = 0xD1


@dataclass(frozen=True)
class Aggregate:
    """The mean update to apply, its weight, and public per-round metrics."""

    update: dict[str, np.ndarray]
    total_weight: float
    metrics: dict[str, float] = field(default_factory=dict)


class UpdateAggregator(Protocol):
    """What the driver asks of a privacy layer in each round."""

    def round_config(self, rnd: int) -> Mapping[str, Any]:
        """Scalars added to this round's train instructions."""
        ...

    def begin_round(self, rnd: int, population: int) -> str | None:
        """Called once per round before anything is sent: record the round's mechanism,
        or return why the run must stop before it (budget)."""
        ...

    def status(self) -> dict[str, float]:
        """Public metrics after a round (e.g. ε so far), for the round's report."""
        ...

    def check_reply(self, reply: TrainReply) -> str | None:
        """A reason to reject this reply, or ``None``."""
        ...

    def aggregate(self, rnd: int, replies: Sequence[TrainReply]) -> Aggregate:
        """The update the strategy applies; ``replies`` is non-empty."""
        ...

    @property
    def weighting(self) -> str:
        """``"examples"`` (clients weight Δ by their example count) or ``"uniform"``."""
        ...

    @property
    def releases_every_round(self) -> bool:
        """Whether the round releases its (noised) sum however few updates arrived.

        ``False``: fewer than ``min_train_replies`` leave the model unchanged."""
        ...

    def note_cohort(self, rnd: int, cohort: Sequence[int]) -> None:
        """The round's sampled cohort, before any instruction is sent."""
        ...

    def release_without_sum(self, rnd: int, like: Mapping[str, np.ndarray]) -> Aggregate | None:
        """The release of a round with no sum (empty cohort, secure round abandoned):
        an aggregate shaped like ``like``, or ``None`` for the unchanged model."""
        ...

    def aggregate_sum(
        self,
        rnd: int,
        sum_update: Mapping[str, np.ndarray],
        total_weight: float,
        num_contributors: int,
        extra: Mapping[str, float],
    ) -> Aggregate:
        """The same result from sums only (secure aggregation): ``Σ w_i·Δ_i``, ``Σ w_i``,
        the number of contributors and extra summed scalars (e.g. ``fl-app.unclipped``)."""
        ...


class MeanAggregator:
    """No client-level DP: the exact weighted mean ``Σ n_i Δ_i / Σ n_i``."""

    def round_config(self, rnd: int) -> Mapping[str, Any]:
        return {}

    def begin_round(self, rnd: int, population: int) -> str | None:
        return None

    def status(self) -> dict[str, float]:
        return {}

    def check_reply(self, reply: TrainReply) -> str | None:
        return None

    def aggregate(self, rnd: int, replies: Sequence[TrainReply]) -> Aggregate:
        mean = weighted_mean_update(replies)
        return Aggregate(mean.update, mean.total_weight)

    @property
    def weighting(self) -> str:
        return "examples"

    @property
    def releases_every_round(self) -> bool:
        return False

    def note_cohort(self, rnd: int, cohort: Sequence[int]) -> None:
        return None

    def release_without_sum(self, rnd: int, like: Mapping[str, np.ndarray]) -> Aggregate | None:
        return None

    def aggregate_sum(
        self,
        rnd: int,
        sum_update: Mapping[str, np.ndarray],
        total_weight: float,
        num_contributors: int,
        extra: Mapping[str, float],
    ) -> Aggregate:
        if not total_weight > 0:
            raise ValueError(f"total_weight must be > 0, found {total_weight}")
        mean = {k: np.asarray(v, dtype=np.float64) / total_weight for k, v in sum_update.items()}
        return Aggregate(mean, float(total_weight))


def planned_population(cfg: AppConfig) -> int:
    """The federation size used for projections: ``dataset.num_partitions``.

    The ledger records the population actually connected in each round; this is only
    the plan (pre-run projection, ``--dry-run``, target-ε calibration, ``σ_b``).
    """
    return int(cfg.dataset.num_partitions)


@dataclass(frozen=True)
class ClientDpSettings:
    """Client-level DP parameters, resolved and checked once when the run is built.

    ``noise_multiplier`` is the round's effective ``z`` (calibrated from
    ``privacy.target_epsilon`` if that was given); ``update_noise_multiplier`` is the
    part on the updates (``z_Δ``, smaller than ``z`` only with adaptive clipping).
    """

    mode: PrivacyMode
    clip_side: ClipSide
    clipping: ClippingMode
    noise_multiplier: float
    clip: float
    delta: float
    accountant: AccountantName
    sampling: SamplingScheme
    fraction: float
    num_rounds: int
    planned_population: int
    seed: int
    secure_mode: bool = False
    max_epsilon: float | None = None
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_std: float | None = None
    # privacy.mode=distributed: the run's distributed discrete Gaussian parameters.
    distributed: DdpPlan | None = None
    # Secure aggregation: the cohort sizes ``(low, high)`` a round can release (it is
    # abandoned outside them; ``high=None``: no upper limit). Under Poisson sampling the
    # gate is a data-dependent branch accounted as ``branch_delta`` (fl_app.privacy.mechanisms).
    cohort_gate: tuple[int, int | None] | None = None
    # ``(secagg.mode, dropout_tolerance, corrupt_fraction)``: the sizes inside the gate
    # that secure aggregation has no parameters for are abandoned too (holes, each one
    # more flip a client can cause); ``None``: every size in the gate is released.
    # (secagg.mode, dropout_tolerance, corrupt_fraction[, server_model]): which sizes
    # have secure-aggregation parameters (the server model changes the thresholds).
    cohort_secagg: tuple[str, float, float] | tuple[str, float, float, str] | None = None
    # Central DP under secure aggregation: ``(secagg.bits, model dimension)`` of the
    # fixed-point encoding, whose rounding the noise is calibrated to (encoding_slack).
    encoding: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.clipping is ClippingMode.adaptive:
            sb = self.clipped_count_std
            if sb is None or not 2 * sb > self.noise_multiplier:
                raise ValueError(
                    f"privacy.clipped_count_stddev={sb}: adaptive clipping needs "
                    f"2*clipped_count_stddev > noise_multiplier={self.noise_multiplier:g} "
                    "(the count's noise takes part of the budget); raise it or lower z"
                )

    @property
    def update_noise_multiplier(self) -> float:
        if self.clipping is ClippingMode.fixed or self.clipped_count_std is None:
            return self.noise_multiplier
        return update_noise_multiplier(self.noise_multiplier, self.clipped_count_std)

    def expected_cohort(self, population: int) -> float:
        """The divisor ``m``: ``q·N`` (Poisson) or the fixed cohort size."""
        if self.sampling is SamplingScheme.poisson:
            return self.fraction * population
        return float(FixedSizeSampler(self.fraction, 0).cohort_size(population))

    def branch_delta(self, population: int) -> float:
        """``η`` of a round at ``population`` (0 without a sampling-dependent gate)."""
        if self.cohort_gate is None or self.sampling is not SamplingScheme.poisson:
            return 0.0
        low, high = self.cohort_gate
        if self.cohort_secagg is None:
            return cohort_gate_delta(self.fraction, population, low, high)
        return _gate_delta(self.fraction, population, low, high, self.cohort_secagg)

    def hole_note(self, population: int) -> str:
        """``", and sizes 4, 6, 8, ..."``: the gate's holes near the expected cohort."""
        if self.cohort_gate is None or self.cohort_secagg is None:
            return ""
        low, high = self.cohort_gate
        a, b = _gate_window(self.fraction, population, low, high)
        holes = _cohort_holes(a, b, *self.cohort_secagg)
        if not holes:
            return ""
        shown = ", ".join(str(h) for h in holes[:4]) + (", ..." if len(holes) > 4 else "")
        mode, drop, corrupt = self.cohort_secagg[:3]
        return (
            f", and sizes {shown} that secagg.mode={mode} has no parameters for at "
            f"secagg.dropout_tolerance={drop:g}, secagg.corrupt_fraction={corrupt:g}"
        )

    def encoding_slack(self, population: int, clip: float) -> float:
        """How far SecAgg's encoding can move one clipped update (0 without encoding)."""
        if self.encoding is None:
            return 0.0
        bits, dim = self.encoding
        largest = population
        if self.sampling is SamplingScheme.fixed:
            largest = int(self.expected_cohort(population))
        elif self.cohort_gate is not None and self.cohort_gate[1] is not None:
            largest = min(population, self.cohort_gate[1])
        return encoding_slack(bits, clip, dim, max(1, largest))

    def round_event(self, rnd: int, population: int, clip: float) -> RoundEvent:
        ddp = self.distributed
        return RoundEvent(
            round=rnd,
            sampling=self.sampling,
            population=population,
            sample_rate=self.fraction
            if self.sampling is SamplingScheme.poisson
            else self.expected_cohort(population) / population,
            cohort=self.expected_cohort(population),
            noise_multiplier=self.noise_multiplier,
            clip=clip,
            update_noise_multiplier=self.update_noise_multiplier,
            clipped_count_std=self.clipped_count_std
            if self.clipping is ClippingMode.adaptive
            else None,
            mechanism="ddg" if ddp is not None else "gaussian",
            ddg_tau=ddp.tau if ddp is not None else None,
            ddg_dimension=ddp.padded if ddp is not None else None,
            branch_delta=self.branch_delta(population),
            encoding_slack=self.encoding_slack(population, clip),
        )

    def planned_events(self, start_round: int = 1) -> list[RoundEvent]:
        """The remaining planned rounds at the planned population (for projections)."""
        return [
            self.round_event(r, self.planned_population, self.clip)
            for r in range(start_round, self.num_rounds + 1)
        ]

    @classmethod
    def from_config(cls, cfg: AppConfig) -> ClientDpSettings:
        """Resolve ``cfg.privacy`` (validated) into settings; calibrates z from a target ε."""
        p = cfg.privacy
        if p.mode not in (PrivacyMode.central, PrivacyMode.local, PrivacyMode.distributed):
            raise ValueError(f"privacy.mode={p.mode.value} is not client-level DP")
        assert p.clip is not None and p.delta is not None
        population = planned_population(cfg)
        sampling = (
            SamplingScheme.poisson
            if cfg.strategy.sampling is SamplingMode.poisson
            else SamplingScheme.fixed
        )
        common: dict[str, Any] = dict(
            mode=p.mode,
            clip_side=ClipSide.client if p.mode is PrivacyMode.local else p.clip_side,
            clipping=p.clipping,
            clip=float(p.clip),
            delta=float(p.delta),
            accountant=AccountantName(p.accountant.value),
            sampling=sampling,
            fraction=float(cfg.strategy.fraction_train),
            num_rounds=int(cfg.num_rounds),
            planned_population=population,
            seed=int(cfg.seed),
            secure_mode=bool(p.secure_mode),
            max_epsilon=p.max_epsilon,
            target_quantile=float(p.target_quantile),
            clip_learning_rate=float(p.clip_learning_rate),
        )
        common["cohort_gate"] = secure_cohort_gate(cfg, sampling, population)
        if common["cohort_gate"] is not None:
            sa = cfg.secagg
            common["cohort_secagg"] = (
                sa.mode.value,
                float(sa.dropout_tolerance),
                float(sa.corrupt_fraction),
                sa.server_model.value,
            )
        # A fixed-clipping, z=1 probe of the same sampling: expected cohort and calibration.
        probe = cls(noise_multiplier=1.0, **{**common, "clipping": ClippingMode.fixed})
        eta = probe.num_rounds * probe.branch_delta(population)
        if eta >= probe.delta / 2:
            raise ValueError(
                f"privacy.delta={probe.delta:g}: with strategy.sampling=poisson at "
                f"strategy.fraction_train={probe.fraction:g} of {population} clients, the "
                f"chance that one client decides whether a secure round is abandoned (cohort "
                f"outside {probe.cohort_gate}{probe.hole_note(population)}) adds {eta:.3g} "
                f"to delta over {probe.num_rounds} rounds (docs/privacy-branches.md); raise "
                "strategy.fraction_train or dataset.num_partitions, or use "
                "strategy.sampling=fixed"
                + (
                    ", or choose secagg.dropout_tolerance / secagg.corrupt_fraction with "
                    "parameters for every cohort size"
                    if probe.hole_note(population)
                    else ""
                )
            )
        if cfg.secagg.mode is not SecAggMode.off and p.mode is PrivacyMode.central:
            common["encoding"] = (int(cfg.secagg.bits), model_dimension(cfg))
        if p.clipping is ClippingMode.adaptive:
            sb = p.clipped_count_stddev
            common["clipped_count_std"] = (
                float(sb) if sb is not None else probe.expected_cohort(population) / 20.0
            )
        if p.mode is PrivacyMode.distributed:
            resolved = cls._distributed(cfg, probe, common)
            if (
                resolved.max_epsilon is not None
                and p.threat_model is ThreatModel.distributed_dp
                and server_rounds_within_budget(resolved) == 0
            ):
                one = unsampled_epsilon(
                    resolved.round_event(1, population, resolved.clip),
                    1,
                    resolved.delta,
                    resolved.accountant,
                )
                raise ValueError(
                    f"privacy.max_epsilon={resolved.max_epsilon:g}: one cohort alone costs a "
                    f"client epsilon {one:.4g} against the server (no amplification: it picks "
                    "the cohort), so every run would stop before round 1; raise "
                    "privacy.max_epsilon, or the noise (privacy.noise_multiplier, or a lower "
                    "privacy.target_epsilon)"
                )
            return resolved
        if p.noise_multiplier is not None:
            z = float(p.noise_multiplier)
        else:
            assert p.target_epsilon is not None
            if p.mode is PrivacyMode.local:
                z = _calibrate_local(float(p.target_epsilon), probe)
            else:
                # The branches take eta of delta; the mechanism gets the rest.
                z = calibrate_round_noise(
                    float(p.target_epsilon),
                    probe.delta - eta,
                    dataclasses.replace(
                        probe.round_event(1, population, probe.clip), branch_delta=0.0
                    ),
                    probe.num_rounds,
                    probe.accountant,
                )
        return cls(noise_multiplier=z, **common)

    @classmethod
    def _distributed(
        cls, cfg: AppConfig, probe: ClientDpSettings, common: dict[str, Any]
    ) -> ClientDpSettings:
        """Distributed DP: the ring plan, and ``z`` (given, or calibrated by the DDG bound)."""
        p = cfg.privacy
        population = probe.planned_population
        dim = model_dimension(cfg)

        def plan(z: float) -> DdpPlan:
            return DdpPlan(
                clip=probe.clip,
                dim=dim,
                bits=int(cfg.secagg.bits),
                noise_multiplier=z,
                max_cohort=max_cohort(probe.sampling, probe.fraction, population),
                dropout_tolerance=float(cfg.secagg.dropout_tolerance),
                beta=float(p.distributed.beta),
                overflow_probability=float(p.distributed.overflow_probability),
            )

        def settings(z: float) -> ClientDpSettings:
            return cls(noise_multiplier=z, distributed=plan(z), **common)

        if p.noise_multiplier is not None:
            return settings(float(p.noise_multiplier))
        assert p.target_epsilon is not None
        target = float(p.target_epsilon)
        empty = FederationLedger(probe.delta, AccountantName.rdp)

        def eps(z: float) -> float:
            return empty.project(settings(z).planned_events())

        low, high = 0.05, 1.0
        while eps(high) > target:
            low, high = high, high * 2.0
            if high > 1e4:
                raise ValueError(f"privacy.target_epsilon={target:g} is out of reach")
        for _ in range(40):  # ε decreases in z: smallest z with ε(z) <= target
            mid = (low + high) / 2.0
            if eps(mid) <= target:
                high = mid
            else:
                low = mid
            if high - low < 1e-4 * high:
                break
        return settings(high)


_DIMENSIONS: dict[tuple[str, tuple[int, ...], int], int] = {}


def model_dimension(cfg: AppConfig) -> int:
    """Number of parameters of ``cfg.model`` (builds the model once per model config)."""
    key = (repr(cfg.model), tuple(cfg.dataset.input_shape), int(cfg.dataset.num_classes))
    if key not in _DIMENSIONS:
        from fl_app.models import build_model

        model = build_model(cfg.model, list(key[1]), key[2], seed=0)
        _DIMENSIONS[key] = int(sum(t.numel() for t in model.state_dict().values()))
    return _DIMENSIONS[key]


@functools.lru_cache(maxsize=32)
def smallest_secure_cohort(
    mode: str, dropout_tolerance: float, corrupt_fraction: float, server_model: str = "malicious"
) -> int:
    """The smallest cohort secure aggregation has parameters for (smaller: abandoned)."""
    for n in range(3, 100_000):
        if _has_secure_params(n, mode, dropout_tolerance, corrupt_fraction, server_model):
            return n
    raise ValueError(
        f"secagg.dropout_tolerance={dropout_tolerance:g} with secagg.corrupt_fraction="
        f"{corrupt_fraction:g}: no cohort size has secure-aggregation parameters"
    )


@functools.lru_cache(maxsize=4096)
def _has_secure_params(
    n: int,
    mode: str,
    dropout_tolerance: float,
    corrupt_fraction: float,
    server_model: str = "malicious",
) -> bool:
    from fl_app.secagg.graph import SecAggConfigError, derive_params

    try:
        derive_params(
            n,
            mode=mode,
            dropout_tolerance=dropout_tolerance,
            corrupt_fraction=corrupt_fraction,
            server_model=server_model,
        )
    except SecAggConfigError:
        return False
    return True


def _gate_window(q: float, population: int, low: int, high: int | None) -> tuple[int, int]:
    """The cohort sizes checked one by one for secure-aggregation parameters.

    The mean of the other clients' count ± 12 standard deviations (+10), inside the
    gate: every size a round can plausibly have. Beyond it :func:`cohort_gate_delta`
    bounds the flips by the binomial tails (below 1e-30 a round), so a 1,000-client run
    checks a few hundred sizes, not a thousand.
    """
    mean = q * (population - 1)
    spread = 12.0 * math.sqrt(mean * (1.0 - q)) + 10.0
    top = population if high is None else min(high, population)
    return max(low, math.floor(mean - spread)), min(top, math.ceil(mean + spread) + 1)


@functools.lru_cache(maxsize=64)
def _cohort_holes(
    a: int,
    b: int,
    mode: str,
    dropout_tolerance: float,
    corrupt_fraction: float,
    server_model: str = "malicious",
) -> tuple[int, ...]:
    return tuple(
        n
        for n in range(a, b + 1)
        if not _has_secure_params(n, mode, dropout_tolerance, corrupt_fraction, server_model)
    )


@functools.lru_cache(maxsize=256)
def _gate_delta(
    q: float,
    population: int,
    low: int,
    high: int | None,
    secagg: tuple[str, float, float] | tuple[str, float, float, str],
) -> float:
    """``η`` of the gate with the sizes secure aggregation has no parameters for.

    ``derive_params`` fails for some sizes inside ``[low, high]`` with some settings
    (``dropout_tolerance=0.5``: every even cohort), so the released sizes are not an
    interval and each hole is two more places where one client flips the round between
    released and abandoned (red-team finding: accounted 5.7e-29 a round, true ≈ 0.3).
    """
    a, b = _gate_window(q, population, low, high)
    holes = _cohort_holes(a, b, *secagg)
    return cohort_gate_delta(q, population, low, high, holes=holes, checked=(a, b))


def secure_cohort_gate(
    cfg: AppConfig, sampling: SamplingScheme, population: int
) -> tuple[int, int | None] | None:
    """The cohort sizes a secure round can release, ``(low, high)``; ``None`` without SecAgg.

    ``low``: secure aggregation's smallest cohort; ``high``: distributed DP's
    :func:`max_cohort` (``None``: no upper limit).
    """
    # Local DP: each release is its client's own, whatever the server then abandons.
    if cfg.secagg.mode is SecAggMode.off or cfg.privacy.mode is PrivacyMode.local:
        return None
    sa = cfg.secagg
    low = smallest_secure_cohort(
        sa.mode.value,
        float(sa.dropout_tolerance),
        float(sa.corrupt_fraction),
        sa.server_model.value,
    )
    high = None
    if cfg.privacy.mode is PrivacyMode.distributed:
        high = max_cohort(sampling, float(cfg.strategy.fraction_train), population)
    return (low, high)


def max_cohort(sampling: SamplingScheme, fraction: float, population: int) -> int:
    """The largest cohort distributed DP sizes its ring for.

    Fixed-size sampling and full participation: the cohort itself. Poisson: the mean
    plus six standard deviations (a larger cohort has probability below 1e-9 and is
    abandoned, model unchanged, rather than wrapped around the ring).
    """
    if sampling is SamplingScheme.fixed:
        return max(1, FixedSizeSampler(fraction, 0).cohort_size(population))
    mean = fraction * population
    return min(population, math.ceil(mean + 6.0 * math.sqrt(mean * (1.0 - fraction))) + 1)


def _calibrate_local(target: float, s: ClientDpSettings) -> float:
    """Local DP: z whose ``num_rounds`` releases of one client stay within ``target``."""
    from fl_app.privacy.accounting import calibrate_noise_multiplier

    # Each release is GaussianDpEvent(z/2) = a q=1 Poisson step at multiplier z/2.
    return 2.0 * calibrate_noise_multiplier(target, s.delta, 1.0, s.num_rounds, s.accountant)


class CentralDp:
    """Central client-level DP with fixed or adaptive clipping (see the module doc).

    Parameters
    ----------
    settings
        Resolved parameters (:meth:`ClientDpSettings.from_config`).
    ledger
        The run's ledger so far (a resumed run passes the restored one).
    budget
        Stops the run before a round that would exceed ``privacy.max_epsilon``.
    """

    _MODE = PrivacyMode.central

    def __init__(
        self,
        settings: ClientDpSettings,
        ledger: FederationLedger | None = None,
        budget: BudgetGuard | None = None,
    ) -> None:
        if settings.mode is not self._MODE:
            raise ValueError(
                f"{type(self).__name__} needs privacy.mode={self._MODE.value}, "
                f"found {settings.mode.value}"
            )
        self.settings = settings
        self.ledger = ledger or FederationLedger(settings.delta, settings.accountant)
        self.budget = budget
        self.clip = settings.clip
        # Resume/rollback (fl_app.checkpoint): the ledger's event ``round`` is a release
        # index, ``server round + release_offset``; the offset grows when a resumed run
        # redoes rounds the ledger already counted (an interrupted round, or the rounds
        # after a rollback), because the ledger only appends and ε is never rewound.
        self.release_offset = 0
        # Rounds redone after a rollback draw fresh noise (their first noised sums were
        # released: the same noise on different sums would cancel in the difference).
        self.noise_generation = 0
        self._event: RoundEvent | None = None
        self._round: int | None = None
        self._epsilon = self.ledger.epsilon()

    def export_state(self) -> dict[str, float | int]:
        """What a checkpoint must keep besides the ledger (adaptive clipping's norm)."""
        return {
            "clip": float(self.clip),
            "release_offset": int(self.release_offset),
            "noise_generation": int(self.noise_generation),
        }

    def restore_state(self, state: Mapping[str, Any], server_round: int) -> None:
        """Continue after ``server_round`` from a checkpoint's :meth:`export_state`.

        The ledger must already be the latest one on disk (passed to the constructor);
        the next round's release index follows its last event.
        """
        clip = state["clip"]
        gen = state["noise_generation"]
        if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
            raise ValueError(f"checkpoint clip must be a finite number > 0, found {clip!r}")
        if isinstance(gen, bool) or not isinstance(gen, int) or gen < 0:
            raise ValueError(f"checkpoint noise_generation must be an int >= 0, found {gen!r}")
        last = self.ledger.events[-1].round if self.ledger.events else 0
        if last < server_round + int(state["release_offset"]):
            raise ValueError(
                f"the ledger's last release {last} is behind the checkpoint (round "
                f"{server_round}, release offset {state['release_offset']}): the ledger on "
                "disk was rewound; refusing to under-count epsilon"
            )
        self.clip = float(clip)
        self.release_offset = last - server_round
        self.noise_generation = gen
        self._epsilon = self.ledger.epsilon()

    def round_config(self, rnd: int) -> Mapping[str, Any]:
        if self.settings.clip_side is ClipSide.client:
            return {CLIP_NORM_KEY: float(self.clip)}
        return {}

    def begin_round(self, rnd: int, population: int) -> str | None:
        event = self.settings.round_event(rnd + self.release_offset, max(1, population), self.clip)
        if self.budget is not None:
            verdict = self.budget.check(self.ledger, event)
            if not verdict.allowed:
                return verdict.reason
        after = self.ledger.project([event])
        # Recorded before any instruction leaves: a crash over-counts, never under-counts.
        self.ledger = self.ledger.add(event)
        self._event = event
        self._round = rnd
        self._epsilon = after
        return None

    def note_cohort(self, rnd: int, cohort: Sequence[int]) -> None:
        """Count the sampled cohort's participation (ε against the server) before sending."""
        self._current(rnd)
        self.ledger = self.ledger.add_participation([str(n) for n in cohort])

    @property
    def releases_every_round(self) -> bool:
        """The ledger accounted this round before it ran: the round releases its noised sum
        over whatever arrived, however few (a ``min_train_replies`` gate would be a
        data-dependent branch the ledger does not describe)."""
        return True

    def release_without_sum(self, rnd: int, like: Mapping[str, np.ndarray]) -> Aggregate | None:
        """No sum exists (empty cohort, secure round abandoned): noise on a zero sum.

        The release is the same mechanism over an empty set of contributions, so the
        round still looks like every other round and its ledger event describes it.
        """
        zeros = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in like.items()}
        return self.aggregate_sum(rnd, zeros, 0.0, 0, {})

    def status(self) -> dict[str, float]:
        out = {"dp_epsilon": self._epsilon, "dp_delta": self.ledger.delta}
        eta = branch_delta_total(self.ledger.events)
        if eta > 0:  # the part of δ the cohort-size gate takes (docs/privacy-branches.md)
            out["dp_delta_branches"] = eta
        if self.settings.distributed is not None:
            against = self.ledger.server_epsilons()
            out["dp_epsilon_server_max"] = max(against.values(), default=0.0)
        return out

    def check_reply(self, reply: TrainReply) -> str | None:
        if (
            self.settings.clip_side is ClipSide.client
            and self.settings.clipping is ClippingMode.adaptive
        ):
            bit = reply.metrics.get(UNCLIPPED_KEY)
            if bit not in (0.0, 1.0):
                return f"'{UNCLIPPED_KEY}' must be 0 or 1 for adaptive clipping, got {bit!r}"
        return None

    @property
    def weighting(self) -> str:
        return "uniform"

    def aggregate(self, rnd: int, replies: Sequence[TrainReply]) -> Aggregate:
        event = self._current(rnd)
        names = list(replies[0].update)
        total = {k: np.zeros(replies[0].update[k].shape, dtype=np.float64) for k in names}
        unclipped = 0
        reclipped = 0
        for r in replies:
            clipped = clip_l2(r.update, event.clip)
            if self.settings.clip_side is ClipSide.server:
                unclipped += int(clipped.unclipped)
            else:
                reclipped += int(not clipped.unclipped)
                unclipped += int(r.metrics.get(UNCLIPPED_KEY, 0.0) == 1.0)
            for k in names:
                total[k] += clipped.arrays[k].astype(np.float64, copy=False)
        out = self.aggregate_sum(
            rnd, total, float(len(replies)), len(replies), {UNCLIPPED_KEY: float(unclipped)}
        )
        if reclipped:
            out.metrics["dp_server_reclipped"] = float(reclipped)
        return out

    def _current(self, rnd: int) -> RoundEvent:
        event = self._event
        if event is None or self._round != rnd:
            raise RuntimeError(f"aggregate({rnd}) without begin_round({rnd})")
        return event

    def aggregate_sum(
        self,
        rnd: int,
        sum_update: Mapping[str, np.ndarray],
        total_weight: float,
        num_contributors: int,
        extra: Mapping[str, float],
    ) -> Aggregate:
        """Noise the sum of clipped updates and divide by the expected cohort.

        ``sum_update`` must be ``Σ clip(Δ_i)`` with unit weights (``weighting`` is
        ``"uniform"``); ``extra["fl-app.unclipped"]`` is ``Σ b_i`` for adaptive clipping.
        """
        event = self._current(rnd)
        s = self.settings
        unclipped = float(extra.get(UNCLIPPED_KEY, 0.0))
        # Keyed by the server round, so a resumed run redoes an interrupted round with
        # the noise it drew first (that sum never left the server: checkpoints are
        # written before a round's model is sent); a new generation after a rollback.
        stream: tuple[int, ...] = (rnd, CENTRAL_NOISE_STREAM)
        if self.noise_generation:
            stream = (*stream, self.noise_generation)
        noise = noise_source(s.secure_mode, s.seed, stream)
        std = event.noise_std
        m = event.cohort
        mean = CentralGaussian(std, m).release(sum_update, noise.normal)
        metrics: dict[str, float] = {
            "dp_clip": event.clip,
            "dp_noise_std_sum": std,
            "dp_noise_std_mean": std / m,
            "dp_expected_cohort": m,
        }
        if event.encoding_slack:
            metrics["dp_encoding_slack"] = event.encoding_slack
        if s.clipping is ClippingMode.adaptive:
            assert s.clipped_count_std is not None
            # Σ(b_i − ½) has add/remove sensitivity ½ (Andrew et al. §3.2).
            step = AdaptiveClip(s.clipped_count_std, s.clip_learning_rate, s.target_quantile)
            fraction, self.clip = step.step(
                event.clip,
                unclipped,
                num_contributors,
                m,
                float(noise.normal(s.clipped_count_std, 1)[0]),
            )
            metrics["dp_unclipped_fraction_noised"] = fraction
            metrics["dp_next_clip"] = self.clip
        return Aggregate(mean, float(num_contributors), metrics)


class DistributedDp(CentralDp):
    """Distributed DP: the unmasked sum already carries the clients' noise shares.

    Runs only under secure aggregation (the validator refuses anything else): each
    client clips to ``C``, encodes with its discrete Gaussian share
    (:mod:`fl_app.privacy.distributed`), and the server divides the decoded sum by the
    expected cohort, adding nothing. Ledger, budget guard and checkpoints are the same
    as :class:`CentralDp`'s; the events are ``mechanism="ddg"``.
    """

    _MODE = PrivacyMode.distributed

    def __init__(
        self,
        settings: ClientDpSettings,
        ledger: FederationLedger | None = None,
        budget: BudgetGuard | None = None,
    ) -> None:
        if settings.distributed is None:
            raise ValueError("DistributedDp needs settings.distributed (a DdpPlan)")
        super().__init__(settings, ledger, budget)

    @property
    def plan(self) -> DdpPlan:
        assert self.settings.distributed is not None
        return self.settings.distributed

    def aggregate(self, rnd: int, replies: Sequence[TrainReply]) -> Aggregate:
        raise RuntimeError(
            "distributed DP needs secure aggregation: plaintext updates must never reach "
            "the server (the config validator refuses secagg=off)"
        )

    def release_without_sum(self, rnd: int, like: Mapping[str, np.ndarray]) -> Aggregate | None:
        """An abandoned round leaves the model unchanged: the noise is the clients', and
        noise the server drew would protect nothing against the server. The release does
        not depend on any client's update; the chance that one client's presence decides
        the abandonment (the cohort gate) is the event's ``branch_delta``."""
        self._current(rnd)
        return None

    def aggregate_sum(
        self,
        rnd: int,
        sum_update: Mapping[str, np.ndarray],
        total_weight: float,
        num_contributors: int,
        extra: Mapping[str, float],
    ) -> Aggregate:
        """``(Σ clip(Δ_i) + Σ shares) / m`` with ``m`` the expected cohort."""
        event = self._current(rnd)
        m = event.cohort
        mean = {k: np.asarray(v, dtype=np.float64) / m for k, v in sum_update.items()}
        plan = self.plan
        std = plan.gamma * plan.sigma
        metrics: dict[str, float] = {
            "dp_clip": event.clip,
            "dp_noise_std_sum": std,
            "dp_noise_std_mean": std / m,
            "dp_expected_cohort": m,
            "ddp_bits": float(plan.bits),
            "ddp_gamma": plan.gamma,
            "ddp_noise_inflation": plan.inflation,
        }
        return Aggregate(mean, float(num_contributors), metrics)


class LocalDp:
    """Local DP: clients clip and noise; the server averages and counts releases.

    The server's own guard is keyed by each site's stable identity, the partition id it
    reports (``dp-partition-id``), never by the node id, which changes when a SuperNode
    restarts (and between Ray actors): keyed by node id, a restarted client's releases
    were split over two keys and ε under-reported. Every local-DP reply the server
    receives is a release to it and is counted, also one it then rejects; it rejects a
    reply whose own release count is below the server's (the site's state was lost or
    reset) and one past the budget, and tells each node in its instruction how many
    releases it has received from it, so a client whose state was lost refuses.
    """

    def __init__(self, settings: ClientDpSettings, ledger: FederationLedger | None = None) -> None:
        if settings.mode is not PrivacyMode.local:
            raise ValueError(f"LocalDp needs privacy.mode=local, found {settings.mode.value}")
        self.settings = settings
        self.ledger = ledger or FederationLedger(
            settings.delta, settings.accountant, local_noise_multiplier=settings.noise_multiplier
        )
        # node id -> site key, learned from replies (a node's first reply of a run, or
        # after a restart gave it a new id, finds the site's count under its key).
        self.sites: dict[int, str] = {}
        self._allowed = rounds_within_budget(settings) if settings.max_epsilon is not None else None

    def round_config(self, rnd: int) -> Mapping[str, Any]:
        return {CLIP_NORM_KEY: float(self.settings.clip)}

    def node_config(self, node_id: int) -> dict[str, int]:
        """The releases the server has received from ``node_id``'s site (0 if unknown)."""
        from fl_app.privacy.state import LOCAL_RELEASES_SEEN_KEY

        site = self.sites.get(node_id)
        return {LOCAL_RELEASES_SEEN_KEY: dict(self.ledger.local).get(site, 0) if site else 0}

    def begin_round(self, rnd: int, population: int) -> str | None:
        return None

    def status(self) -> dict[str, float]:
        eps = self.ledger.local_epsilons()
        return {"dp_local_epsilon_max": max(eps.values(), default=0.0)}

    @staticmethod
    def site_key(reply: TrainReply) -> str | None:
        """The site's stable key: ``site-<digest>`` from a deployed site's ``dp-site-hash``
        (deployed sites share partition id 0), else ``partition-<id>``."""
        digest = reply.metrics.get("dp-site-hash")
        if digest is not None:
            ok = math.isfinite(digest) and 0 <= digest < 2**48 and digest == int(digest)
            return f"site-{int(digest):012x}" if ok else None
        pid = reply.metrics.get("dp-partition-id")
        if pid is None or not math.isfinite(pid) or pid < 0 or pid != int(pid):
            return None
        return f"partition-{int(pid)}"

    def check_reply(self, reply: TrainReply) -> str | None:
        # The noise makes the norm unbounded, so no norm check; the release is counted
        # here, before any reason to reject it, because the server has received it.
        site = self.site_key(reply)
        if site is None:
            self.ledger = self.ledger.add_local([f"node-{reply.node_id}"])
            return "local DP reply without a valid dp-partition-id: its releases cannot be counted"
        self.sites[reply.node_id] = site
        before = dict(self.ledger.local).get(site, 0)
        self.ledger = self.ledger.add_local([site])
        claimed = reply.metrics.get("dp-local-releases", 0.0)
        if claimed < before + 1:
            return (
                f"local DP: {site} counts {claimed:g} releases, the server has received "
                f"{before + 1}: its privacy state was lost or reset"
            )
        if self._allowed is not None and before + 1 > self._allowed:
            return (
                f"local DP: {site} is past its budget (release {before + 1}, "
                f"max_epsilon={self.settings.max_epsilon:g} allows {self._allowed})"
            )
        return None

    @property
    def weighting(self) -> str:
        return "examples"

    # Each reply is its client's own noised release, counted by the client and by
    # check_reply: what the server then does with it is post-processing.
    @property
    def releases_every_round(self) -> bool:
        return False

    def note_cohort(self, rnd: int, cohort: Sequence[int]) -> None:
        return None

    def release_without_sum(self, rnd: int, like: Mapping[str, np.ndarray]) -> Aggregate | None:
        return None

    def aggregate_sum(
        self,
        rnd: int,
        sum_update: Mapping[str, np.ndarray],
        total_weight: float,
        num_contributors: int,
        extra: Mapping[str, float],
    ) -> Aggregate:
        # Under secure aggregation the server cannot tell who contributed; each client's
        # own dp-local-epsilon (computed before it sent) is the record.
        return MeanAggregator().aggregate_sum(
            rnd, sum_update, total_weight, num_contributors, extra
        )

    def aggregate(self, rnd: int, replies: Sequence[TrainReply]) -> Aggregate:
        # Releases were counted by check_reply (accepted or not). Clients weigh 1 each:
        # a local-DP client sends no example count (it would not be noised).
        mean = weighted_mean_update(replies)
        return Aggregate(mean.update, mean.total_weight, {"dp_local_releases": len(replies)})


def build_aggregator(
    cfg: AppConfig, ledger: FederationLedger | None = None
) -> MeanAggregator | CentralDp | DistributedDp | LocalDp:
    """The aggregator ``cfg.privacy.mode`` asks for (validated config)."""
    mode = cfg.privacy.mode
    if mode is PrivacyMode.none:
        return MeanAggregator()
    settings = ClientDpSettings.from_config(cfg)
    if mode is PrivacyMode.central:
        budget = BudgetGuard(settings.max_epsilon) if settings.max_epsilon is not None else None
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


def rounds_within_budget(settings: ClientDpSettings) -> int:
    """How many of the planned rounds fit in ``max_epsilon`` (all if no budget)."""
    s = settings
    if s.max_epsilon is None:
        return s.num_rounds
    planned = s.planned_events()
    empty = FederationLedger(s.delta, s.accountant)

    def epsilon_after(k: int) -> float:
        if s.mode is PrivacyMode.local:  # a client taking part in every round
            return local_epsilon(s.noise_multiplier, k, s.delta, s.accountant)
        return empty.project(planned[:k])

    low, high = 0, s.num_rounds
    while low < high:  # ε grows with rounds: largest k with ε(k) <= budget
        mid = (low + high + 1) // 2
        if epsilon_after(mid) <= s.max_epsilon:
            low = mid
        else:
            high = mid - 1
    return low


def projection_lines(settings: ClientDpSettings) -> list[str]:
    """The pre-run privacy projection printed before training and by ``--dry-run``."""
    s = settings
    n = s.planned_population
    m = s.expected_cohort(n)
    empty = FederationLedger(s.delta, s.accountant)
    sampling = (
        f"Poisson q={s.fraction:g} of {n} clients (expected cohort {m:g})"
        if s.sampling is SamplingScheme.poisson
        else f"fixed-size {int(m)} of {n} clients per round"
    )
    if s.mode is PrivacyMode.local:
        eps = local_epsilon(s.noise_multiplier, s.num_rounds, s.delta, s.accountant)
        lines = [
            f"client-level DP (local): each client clips to C={s.clip:g} and adds "
            f"N(0, ({s.noise_multiplier:.4g}*C)^2) before its update leaves",
            f"projection: a client in all {s.num_rounds} rounds reaches epsilon "
            f"{eps:.4g} at delta={s.delta:g} ({s.accountant.value})",
        ]
        if s.max_epsilon is not None:
            k = rounds_within_budget(s)
            lines.append(
                f"budget: max_epsilon={s.max_epsilon:g} per client: "
                + (
                    "all planned rounds fit"
                    if k == s.num_rounds
                    else f"a client refuses after taking part in {k} rounds"
                )
            )
        return lines
    planned = s.planned_events()
    eps = empty.project(planned)
    cross = "rdp" if s.accountant is not AccountantName.rdp and s.distributed is None else None
    cross_text = f"; rdp cross-check {empty.project(planned, cross):.4g}" if cross else ""
    if s.distributed is not None:
        ddp = s.distributed
        lines = [
            "client-level DP (distributed discrete Gaussian under secure aggregation, "
            f"C={s.clip:g}): z={s.noise_multiplier:.4g} in rounded units, {sampling}; "
            f"each client adds a share calibrated to {ddp.min_survivors(ddp.max_cohort)} "
            f"of up to {ddp.max_cohort} clients surviving",
            f"ring: secagg.bits={ddp.bits} for {ddp.dim} parameters (rotated in {ddp.padded}), "
            f"step {ddp.gamma:.3g}, noise {ddp.inflation:.4f}x central DP's at the same z; noise "
            f"std on the mean {ddp.gamma * ddp.sigma / m:.4g}; "
            f"{ddp.bandwidth_bytes():,} bytes per client upload",
            f"projection: {s.num_rounds} planned rounds -> epsilon {eps:.4g} at delta={s.delta:g} "
            "against outsiders (RDP bound of Kairouz et al. 2021 with Zhu & Wang's Poisson "
            "amplification; the cohorts are secret from them)",
            *against_server_lines(s),
        ]
        return lines + _budget_lines(s)
    lines = [
        f"client-level DP (central, {s.clipping.value} clipping by the {s.clip_side.value}, "
        f"C={s.clip:g}): z={s.noise_multiplier:.4g}, {sampling}, noise std on the mean "
        f"{s.update_noise_multiplier * s.clip / m:.4g}",
        f"projection: {s.num_rounds} planned rounds -> epsilon {eps:.4g} at delta={s.delta:g} "
        f"({s.accountant.value}{cross_text})",
    ]
    return lines + _budget_lines(s)


def server_rounds_within_budget(s: ClientDpSettings) -> int:
    """How many cohorts one client may join before its ε against the server passes
    ``max_epsilon`` (all planned rounds without a budget)."""
    template = s.round_event(1, s.planned_population, s.clip)
    if s.max_epsilon is None:
        return s.num_rounds
    low, high = 0, s.num_rounds
    while low < high:
        mid = (low + high + 1) // 2
        if unsampled_epsilon(template, mid, s.delta, s.accountant) <= s.max_epsilon:
            low = mid
        else:
            high = mid - 1
    return low


def likely_server_stop_round(s: ClientDpSettings) -> int | None:
    """The round before which the against-server budget guard stops the run in half the
    draws of cohorts, or ``None`` when no draw can stop it within the planned rounds.

    The guard (:class:`strategies.budget.BudgetGuard` with ``against_server``) stops
    before round ``r + 1`` once some client has been in ``k`` cohorts
    (:func:`server_rounds_within_budget`). Each client's count after ``r`` rounds is
    ``Bin(r, p)`` (``p`` its chance to be in a cohort); the median stop is the smallest
    ``r`` with ``1 − (1 − P[Bin(r, p) >= k])^N >= ½`` (clients taken as independent, exact
    under Poisson sampling). A sweep must not take the worst case (a client in every
    round) for its refusal: almost every distributed-DP config would be refused.
    """
    k = server_rounds_within_budget(s)
    if k >= s.num_rounds:
        return None
    if k == 0:
        return 1
    n = s.planned_population
    p = min(1.0, s.expected_cohort(n) / n)

    def some_client_reached(r: int) -> float:
        if r < k:
            return 0.0
        if p >= 1.0:
            return 1.0
        below = sum(
            math.exp(
                math.lgamma(r + 1)
                - math.lgamma(j + 1)
                - math.lgamma(r - j + 1)
                + j * math.log(p)
                + (r - j) * math.log1p(-p)
            )
            for j in range(k)
        )
        one = min(1.0, max(0.0, 1.0 - below))
        return 1.0 - (1.0 - one) ** n

    # Round r + 1 runs only while no client has k cohorts after r rounds.
    if some_client_reached(s.num_rounds - 1) < 0.5:
        return None
    low, high = k, s.num_rounds - 1
    while low < high:
        mid = (low + high) // 2
        if some_client_reached(mid) >= 0.5:
            high = mid
        else:
            low = mid + 1
    return low + 1


def server_budget_refusal(s: ClientDpSettings) -> str | None:
    """Why a distributed-DP sweep job would likely not finish its planned rounds within
    ``max_epsilon`` against the server (``privacy.threat_model=distributed_dp``)."""
    if s.max_epsilon is None:
        return None
    stop = likely_server_stop_round(s)
    if stop is None:
        return None
    k = server_rounds_within_budget(s)
    return (
        f"privacy.max_epsilon={s.max_epsilon:g} against the server allows one client {k} "
        f"cohorts, so the run likely stops before round {stop} of {s.num_rounds} (once some "
        f"client of {s.planned_population} has been in {k}); raise the noise "
        "(privacy.noise_multiplier, or a lower privacy.target_epsilon), lower num_rounds or "
        "strategy.fraction_train, or raise privacy.max_epsilon"
    )


def against_server_lines(s: ClientDpSettings) -> list[str]:
    """ε against the server, which picks and messages each cohort (no amplification)."""
    template = s.round_event(1, s.planned_population, s.clip)
    expected = max(1, math.ceil(s.fraction * s.num_rounds))

    def eps(k: int) -> float:
        return unsampled_epsilon(template, k, s.delta, s.accountant)

    return [
        "against the server (it picks the cohort, so sampling amplifies nothing): a client "
        f"in 1 cohort reaches epsilon {eps(1):.4g}, in {expected} (q*rounds, the expected "
        f"count) {eps(expected):.4g}; planned worst case, a client in all {s.num_rounds} "
        f"rounds: {eps(s.num_rounds):.4g}"
    ]


def _budget_lines(s: ClientDpSettings) -> list[str]:
    """The federation budget's verdict on the planned rounds (central and distributed)."""
    if s.max_epsilon is None:
        return []
    if s.distributed is not None:
        k = server_rounds_within_budget(s)
        return [
            f"budget: max_epsilon={s.max_epsilon:g} against the server (privacy.threat_model="
            f"distributed_dp) allows one client {k} cohorts: "
            + (
                "all planned rounds fit"
                if k >= s.num_rounds
                else f"the run stops before a round in which a client already in {k} cohorts "
                "could be sampled again" + _likely_stop_text(s)
            )
        ]
    k = rounds_within_budget(s)
    verdict = (
        "all planned rounds fit"
        if k == s.num_rounds
        else f"the run will stop before round {k + 1} (after {k} rounds)"
    )
    return [f"budget: max_epsilon={s.max_epsilon:g}: {verdict}"]


def _likely_stop_text(s: ClientDpSettings) -> str:
    stop = likely_server_stop_round(s)
    if stop is None:
        return " (unlikely within the planned rounds)"
    return f" (likely before round {stop} of {s.num_rounds}, the median over cohort draws)"

"""Client-level DP settings: ``cfg.privacy`` resolved, checked and calibrated once.

Part of the run's plan (:func:`fl_app.config.plan.resolve`, docs/architecture.md,
Configuration): this module is the only place that calibrates ``z`` or counts the
model's parameters. Every failure is a typed :class:`~fl_app.config.errors.ConfigError`
naming the field and the fix.

:class:`ClientDpSettings` is what every part of a client-level DP run reads (the
aggregators of :mod:`strategies.dp_aggregators`, the projections of
:mod:`strategies.dp_projection`, the ServerApp's client spec and summary): the mode, who
clips, ``C``, the round's noise multiplier ``z`` (given, or calibrated from
``privacy.target_epsilon``: Gaussian rounds by the ledger's accountant, local DP's
releases as Gaussian events, distributed DP by the discrete Gaussian bound of Kairouz
et al. 2021), the sampling the accountant must match, and each round's ledger event
(:meth:`ClientDpSettings.round_event`).

It also resolves what secure aggregation changes in the accounting: the cohort sizes a
secure round can release (:mod:`fl_app.config.cohort_gate`; outside it, and at the sizes
secure aggregation has no parameters for, a round is abandoned, a data-dependent branch
accounted as ``branch_delta``), the fixed-point encoding's slack that the noise is
calibrated to, and the model's parameter count (:func:`model_dimension`, built once per
model config). Every branch of a round releases the mechanism its ledger event
describes (docs/privacy-branches.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fl_app.config.cohort_gate import (
    cohort_holes,
    gate_delta,
    gate_window,
    max_cohort,
    secure_cohort_gate,
)
from fl_app.config.errors import ConfigConflictError, ConfigPlanError
from fl_app.config.schema import (
    AppConfig,
    ClippingMode,
    ClipSide,
    NoiseSchedule,
    PrivacyMode,
    SamplingMode,
    SecAggMode,
    ThreatModel,
)
from fl_app.privacy.composition import calibrate_round_noise, unsampled_epsilon
from fl_app.privacy.ddp_schedule import plan_floor
from fl_app.privacy.distributed import DdpPlan
from fl_app.privacy.history import AccountantName
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.mechanisms import (
    cohort_gate_delta,
    encoding_slack,
    update_noise_multiplier,
)
from fl_app.privacy.round_event import RoundEvent, SamplingScheme, fixed_cohort_size
from fl_app.privacy.schedule import decayed_noise
from fl_app.privacy.tree import ftrl_round_event, tree_position
from fl_app.share_layers import split_shared

__all__ = [
    "ClientDpSettings",
    "model_dimension",
    "planned_population",
    "server_rounds_within_budget",
    "shared_dimension",
]


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
    # privacy.schedule (fl_app.privacy.schedule): ``noise_multiplier`` is round 1's z;
    # decay lowers it by ``decay_rate`` per round, spend recalibrates it before each one.
    schedule: NoiseSchedule = NoiseSchedule.constant
    decay_rate: float = 1.0
    # DP-FTRL (privacy.ftrl.enabled): rounds per tree; ``None``: DP-FedAvg's per-round
    # noise. Each round's event is then its released tree node (fl_app.privacy.tree).
    ftrl_restart: int | None = None
    # privacy.ftrl.participation: "arbitrary" or "once" (the server's once-per-tree cap).
    ftrl_participation: str = "arbitrary"

    def __post_init__(self) -> None:
        if self.clipping is ClippingMode.adaptive:
            sb = self.clipped_count_std
            if sb is None or not 2 * sb > self.noise_multiplier:
                raise ConfigConflictError(
                    "privacy.clipped_count_stddev",
                    sb,
                    f"privacy.clipped_count_stddev={sb}: adaptive clipping needs "
                    f"2*clipped_count_stddev > noise_multiplier={self.noise_multiplier:g} "
                    "(the count's noise takes part of the budget; null means expected "
                    "cohort / 20); raise it or lower z",
                )

    @property
    def update_noise_multiplier(self) -> float:
        return self._update_noise(self.noise_multiplier)

    def _update_noise(self, z: float) -> float:
        if self.clipping is ClippingMode.fixed or self.clipped_count_std is None:
            return z
        return update_noise_multiplier(z, self.clipped_count_std)

    def planned_noise(self, rnd: int) -> float:
        """The planned ``z`` of round ``rnd``: decay's stated schedule, else ``z`` (spend
        plans its calibrated ``z`` and recalibrates it against the ledger each round)."""
        if self.schedule is NoiseSchedule.decay:
            return decayed_noise(self.noise_multiplier, self.decay_rate, rnd)
        return self.noise_multiplier

    def expected_cohort(self, population: int) -> float:
        """The divisor ``m``: ``q·N`` (Poisson) or the fixed cohort size."""
        if self.sampling is SamplingScheme.poisson:
            return self.fraction * population
        return float(fixed_cohort_size(self.fraction, population))

    def branch_delta(self, population: int) -> float:
        """``η`` of a round at ``population`` (0 without a sampling-dependent gate)."""
        if self.cohort_gate is None or self.sampling is not SamplingScheme.poisson:
            return 0.0
        low, high = self.cohort_gate
        if self.cohort_secagg is None:
            return cohort_gate_delta(self.fraction, population, low, high)
        return gate_delta(self.fraction, population, low, high, self.cohort_secagg)

    def hole_note(self, population: int) -> str:
        """``", and sizes 4, 6, 8, ..."``: the gate's holes near the expected cohort."""
        if self.cohort_gate is None or self.cohort_secagg is None:
            return ""
        low, high = self.cohort_gate
        a, b = gate_window(self.fraction, population, low, high)
        holes = cohort_holes(a, b, *self.cohort_secagg)
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
        z = self.planned_noise(rnd)
        event = RoundEvent(
            round=rnd,
            sampling=self.sampling,
            population=population,
            sample_rate=self.fraction
            if self.sampling is SamplingScheme.poisson
            else self.expected_cohort(population) / population,
            cohort=self.expected_cohort(population),
            noise_multiplier=z,
            clip=clip,
            update_noise_multiplier=self._update_noise(z),
            clipped_count_std=self.clipped_count_std
            if self.clipping is ClippingMode.adaptive
            else None,
            mechanism="ddg" if ddp is not None else "gaussian",
            ddg_tau=ddp.at(z).tau if ddp is not None else None,
            ddg_dimension=ddp.padded if ddp is not None else None,
            branch_delta=self.branch_delta(population),
            encoding_slack=self.encoding_slack(population, clip),
        )
        if self.ftrl_restart is not None:  # DP-FTRL: the plan's tree positions
            position = tree_position(rnd, self.ftrl_restart)
            return ftrl_round_event(event, position, population, self.ftrl_participation)
        return event

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
            raise ConfigConflictError(
                "privacy.mode", p.mode.value, "is not client-level DP (central, local, distributed)"
            )
        population = planned_population(cfg)
        common = _common_fields(cfg, population)
        # A fixed-clipping, z=1 probe of the same sampling: expected cohort and calibration.
        probe = cls(noise_multiplier=1.0, **{**common, "clipping": ClippingMode.fixed})
        eta = probe.num_rounds * probe.branch_delta(population)
        _refuse_branches_over_delta(probe, population, eta)
        if cfg.secagg.mode is not SecAggMode.off and p.mode is PrivacyMode.central:
            common["encoding"] = (int(cfg.secagg.bits), model_dimension(cfg))
        if p.clipping is ClippingMode.adaptive:
            sb = p.clipped_count_stddev
            common["clipped_count_std"] = (
                float(sb) if sb is not None else probe.expected_cohort(population) / 20.0
            )
        if p.mode is PrivacyMode.distributed:
            resolved = cls._distributed(cfg, probe, common)
            if p.threat_model is ThreatModel.distributed_dp:
                _refuse_server_budget_before_round_one(resolved, population)
            return resolved
        if p.noise_multiplier is not None:
            z = float(p.noise_multiplier)
        else:
            # spend plans every round at the z that spends max_epsilon (then recalibrates).
            target = p.max_epsilon if p.schedule is NoiseSchedule.spend else p.target_epsilon
            assert target is not None
            if p.mode is PrivacyMode.local:
                z = _calibrate_local(float(target), probe)
            else:
                # The branches take eta of delta; the mechanism gets the rest.
                z = calibrate_round_noise(
                    float(target),
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

        if p.noise_multiplier is not None or p.schedule is NoiseSchedule.spend:
            z = p.noise_multiplier or plan_floor(plan, probe.num_rounds, p.max_epsilon, probe.delta)
            return settings(float(z))  # spend: the floor the clients recompute
        assert p.target_epsilon is not None
        target = float(p.target_epsilon)
        empty = FederationLedger(probe.delta, AccountantName.rdp)

        def eps(z: float) -> float:
            return empty.project(settings(z).planned_events())

        low, high = 0.05, 1.0
        while eps(high) > target:
            low, high = high, high * 2.0
            if high > 1e4:
                raise ConfigPlanError(
                    "privacy.target_epsilon",
                    target,
                    f"privacy.target_epsilon={target:g} is out of reach (no noise multiplier "
                    "up to 1e4 meets it); raise it",
                )
        for _ in range(40):  # ε decreases in z: smallest z with ε(z) <= target
            mid = (low + high) / 2.0
            if eps(mid) <= target:
                high = mid
            else:
                low = mid
            if high - low < 1e-4 * high:
                break
        return settings(high)


_DIMENSIONS: dict[tuple[str, tuple[int, ...], int, tuple[str, ...]], int] = {}


def model_dimension(cfg: AppConfig) -> int:
    """Length of the vector that leaves a site: the shared parameters (``share.layers``),
    or what ``share.compression`` makes of them (docs/compression.md)."""
    d = shared_dimension(cfg)
    comp = str(getattr(cfg.share.compression, "value", cfg.share.compression))
    if comp == "randk":
        # random-k: only k coordinates leave a site (docs/compression.md).
        from fl_app.compression import compressed_length

        return compressed_length(d, float(cfg.share.ratio))
    if comp == "sketch":
        # count sketch: its r·c cells leave a site (fl_app/compression_sketch.py).
        from fl_app.compression_sketch import sketch_shape

        rows, cols = sketch_shape(d, float(cfg.share.ratio), int(cfg.share.sketch_rows))
        return rows * cols
    return d


def shared_dimension(cfg: AppConfig) -> int:
    """Number of parameters of ``cfg.model`` that leave a site (``share.layers``; builds
    the model once per model config)."""
    key = (
        repr(cfg.model),
        tuple(cfg.dataset.input_shape),
        int(cfg.dataset.num_classes),
        tuple(cfg.share.layers),
    )
    if key not in _DIMENSIONS:
        from fl_app.models import build_model

        model = build_model(cfg.model, list(key[1]), key[2], seed=0)
        # Only the shared layers leave a site (share.layers): DP and secure aggregation
        # size their vectors by them.
        shared, _kept = split_shared(model.state_dict(), list(cfg.share.layers))
        _DIMENSIONS[key] = int(sum(t.numel() for t in shared.values()))
    return _DIMENSIONS[key]


def _calibrate_local(target: float, s: ClientDpSettings) -> float:
    """Local DP: z whose ``num_rounds`` releases of one client stay within ``target``."""
    from fl_app.privacy.calibration import calibrate_noise_multiplier

    # Each release is GaussianDpEvent(z/2) = a q=1 Poisson step at multiplier z/2.
    return 2.0 * calibrate_noise_multiplier(target, s.delta, 1.0, s.num_rounds, s.accountant)


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


def _common_fields(cfg: AppConfig, population: int) -> dict[str, Any]:
    """The settings every client-level mode shares, read from ``cfg`` (validated)."""
    p = cfg.privacy
    assert p.clip is not None and p.delta is not None
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
        schedule=p.schedule,
        decay_rate=float(p.decay_rate) if p.decay_rate is not None else 1.0,
    )
    if p.ftrl.enabled:
        restart = p.ftrl.restart_every
        common["ftrl_restart"] = int(restart) if restart is not None else int(cfg.num_rounds)
        once = p.ftrl.participation.value == "once_per_tree"
        common["ftrl_participation"] = "once" if once else "arbitrary"
    common["cohort_gate"] = secure_cohort_gate(cfg, sampling, population)
    if common["cohort_gate"] is not None:
        sa = cfg.secagg
        common["cohort_secagg"] = (
            sa.mode.value,
            float(sa.dropout_tolerance),
            float(sa.corrupt_fraction),
            sa.server_model.value,
        )
    return common


def _refuse_branches_over_delta(probe: ClientDpSettings, population: int, eta: float) -> None:
    """The sampling-dependent branches may take at most half of δ (docs/privacy-branches.md)."""
    if eta < probe.delta / 2:
        return
    holes = probe.hole_note(population)
    raise ConfigPlanError(
        "privacy.delta",
        probe.delta,
        f"privacy.delta={probe.delta:g}: with strategy.sampling=poisson at "
        f"strategy.fraction_train={probe.fraction:g} of {population} clients, the "
        f"chance that one client decides whether a secure round is abandoned (cohort "
        f"outside {probe.cohort_gate}{holes}) adds {eta:.3g} "
        f"to delta over {probe.num_rounds} rounds (docs/privacy-branches.md); raise "
        "strategy.fraction_train or dataset.num_partitions, or use "
        "strategy.sampling=fixed"
        + (
            ", or choose secagg.dropout_tolerance / secagg.corrupt_fraction with "
            "parameters for every cohort size"
            if holes
            else ""
        ),
    )


def _refuse_server_budget_before_round_one(resolved: ClientDpSettings, population: int) -> None:
    """Under distributed_dp the budget is against the server: one cohort must fit in it."""
    if resolved.max_epsilon is None or server_rounds_within_budget(resolved) > 0:
        return
    one = unsampled_epsilon(
        resolved.round_event(1, population, resolved.clip),
        1,
        resolved.delta,
        resolved.accountant,
    )
    raise ConfigPlanError(
        "privacy.max_epsilon",
        resolved.max_epsilon,
        f"privacy.max_epsilon={resolved.max_epsilon:g}: one cohort alone costs a "
        f"client epsilon {one:.4g} against the server (no amplification: it picks "
        "the cohort), so every run would stop before round 1; raise "
        "privacy.max_epsilon, or the noise (privacy.noise_multiplier, or a lower "
        "privacy.target_epsilon)",
    )

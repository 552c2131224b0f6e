"""Privacy checks on a composed :class:`AppConfig`: threat model, client-level DP, DP-SGD.

Each threat model is a promise (docs/architecture.md, Threat models); a combination
that would run but not keep it is refused here, before any client starts, naming the
field and the fix. The checks that need the resolved plan (calibration of ``z`` from a
target ε, the budget against the server, the distributed-DP ring) are made when
:func:`fl_app.config.plan.resolve` builds it.
"""

from __future__ import annotations

import math

from fl_app.config.errors import require as _check
from fl_app.config.errors import require_in as _in
from fl_app.config.errors import require_positive as _positive
from fl_app.config.guarantee import THREAT_MODEL_PROMISES
from fl_app.config.schema import (
    Accountant,
    AppConfig,
    ClippingMode,
    ClipSide,
    NoiseSchedule,
    PrivacyMode,
    SamplingMode,
    SecAggMode,
    ThreatModel,
    evaluation_hidden_from_server,
    metrics_hidden_from_server,
)
from fl_app.config.validate_ftrl import check_ftrl_participation

__all__ = ["check_metrics_stay_hidden", "check_privacy", "evaluation_hidden_reason"]


_CLIENT_LEVEL_FIELDS = (
    "noise_multiplier",
    "clip",
    "target_epsilon",
    "delta",
    "max_epsilon",
    "decay_rate",
)


def check_privacy(cfg: AppConfig) -> None:
    p = cfg.privacy
    # Each threat model is a promise (docs/architecture.md, Threat models); a combination
    # that would run but not keep it is refused here, before any client starts.
    _check(
        (p.mode is PrivacyMode.distributed) == (p.threat_model is ThreatModel.distributed_dp),
        "privacy.threat_model",
        p.threat_model.value,
        "privacy.mode=distributed and privacy.threat_model=distributed_dp go together ("
        f"{THREAT_MODEL_PROMISES[ThreatModel.distributed_dp]}); use privacy=distributed",
    )
    if p.mode is PrivacyMode.none:
        _check(
            p.threat_model is ThreatModel.none,
            "privacy.threat_model",
            p.threat_model.value,
            "privacy.mode=none protects no update from the server, so it cannot claim a "
            "threat model; set privacy.mode=central (trusted_server) or local, or "
            "privacy.threat_model=none",
        )
        for name in _CLIENT_LEVEL_FIELDS:
            value = getattr(p, name)
            _check(
                value is None,
                f"privacy.{name}",
                value,
                "has no effect with privacy.mode=none; remove it (a parameter that silently "
                "does nothing is worse than an error); DP-SGD settings live under privacy.dpsgd",
            )
        _check(
            p.clipping is ClippingMode.fixed,
            "privacy.clipping",
            p.clipping.value,
            "adaptive clipping is part of client-level DP; set privacy.mode=central",
        )
        _check(
            p.schedule is NoiseSchedule.constant,
            "privacy.schedule",
            p.schedule.value,
            "a noise schedule is part of client-level DP; set privacy.mode=central",
        )
    else:
        _check_client_level(cfg)
    if p.ftrl.enabled:
        _check_ftrl(cfg)
    if p.record_level:
        _check_dpsgd(cfg)


def _check_ftrl(cfg: AppConfig) -> None:
    """DP-FTRL (fl_app/privacy/tree.py) runs as central DP with fixed clipping, a given z,
    constant noise, a plaintext sum and a FedAvg-style server step (the model is
    θ_0 + P̃_t/m only if the server adds the released step as it is)."""
    p = cfg.privacy
    fix = "DP-FTRL (privacy=ftrl) "
    _check(
        p.mode is PrivacyMode.central,
        "privacy.ftrl.enabled",
        True,
        fix + "is central DP: set privacy.mode=central (privacy=ftrl does)",
    )
    k = p.ftrl.restart_every
    _in(
        k is None or (not isinstance(k, bool) and isinstance(k, int) and k >= 1),
        "privacy.ftrl.restart_every",
        k,
        "must be an integer >= 1 (rounds per tree) or null",
    )
    _check(
        p.noise_multiplier is not None and p.target_epsilon is None,
        "privacy.target_epsilon",
        p.target_epsilon,
        fix + "takes the node noise privacy.noise_multiplier; set it and "
        "privacy.target_epsilon=null (the dry run prints the epsilon it gives)",
    )
    _check(
        p.clipping is ClippingMode.fixed,
        "privacy.clipping",
        p.clipping.value,
        fix + "needs one clip norm for every node of a tree; set privacy.clipping=fixed",
    )
    _check(
        p.schedule is NoiseSchedule.constant,
        "privacy.schedule",
        p.schedule.value,
        fix + "draws every node with the same noise; set privacy.schedule=constant",
    )
    _check(
        cfg.secagg.mode is SecAggMode.off,
        "secagg.mode",
        cfg.secagg.mode.value,
        fix + "is implemented for the trusted server's plaintext sum; set secagg=off",
    )
    # The tree sums one vector space across rounds; random-k's mask and the count
    # sketch's hashes change every round, so node noises would not cancel (the model
    # would carry every leaf's noise).
    _check(
        cfg.share.compression.value == "none",
        "share.compression",
        cfg.share.compression.value,
        fix + "sums one fixed coordinate space per tree, and random-k picks new coordinates "
        "(the count sketch new hashes) every round; set share.compression=none (share=all)",
    )
    _check(
        cfg.strategy.name.value in ("fedavg", "fedprox"),
        "strategy.name",
        cfg.strategy.name.value,
        fix + "needs the server to add the released step as it is; use strategy.name=fedavg",
    )
    check_ftrl_participation(cfg)


def _check_client_level(cfg: AppConfig) -> None:
    p = cfg.privacy
    s = cfg.strategy
    if p.mode is PrivacyMode.distributed:
        _check_distributed(cfg)
    _check_who_sees_updates(cfg)
    _check_schedule(cfg)
    _check_noise_and_budget(cfg)
    # DP-FTRL's events are rate-1 add/remove Gaussians (no amplification), whoever
    # samples the cohort and however: replace-one subsampling never enters its account.
    replace_one = (
        s.sampling is SamplingMode.fixed
        and round(s.fraction_train * cfg.dataset.num_partitions) < cfg.dataset.num_partitions
        and not p.ftrl.enabled
    )
    if p.mode is PrivacyMode.central and replace_one:
        _check(
            p.accountant is Accountant.rdp,
            "privacy.accountant",
            p.accountant.value,
            "fixed-size sampling without replacement (strategy.sampling=fixed with "
            "fraction_train < 1) is accounted only by dp-accounting's RDP accountant "
            "(replace-one); set privacy.accountant=rdp, or strategy.sampling=poisson for "
            "PLD and tighter epsilon",
        )
    if p.clipping is ClippingMode.adaptive:
        _check_adaptive(cfg)


def _check_who_sees_updates(cfg: AppConfig) -> None:
    """The threat model, who clips, and secure aggregation must keep the same promise."""
    p = cfg.privacy
    _check(
        p.threat_model
        in (ThreatModel.trusted_server, ThreatModel.honest_but_curious, ThreatModel.distributed_dp),
        "privacy.threat_model",
        p.threat_model.value,
        f"privacy.mode={p.mode.value} needs a threat model: trusted_server ("
        f"{THREAT_MODEL_PROMISES[ThreatModel.trusted_server]}) or honest_but_curious ("
        f"{THREAT_MODEL_PROMISES[ThreatModel.honest_but_curious]})",
    )
    if p.mode is PrivacyMode.central and p.threat_model is ThreatModel.honest_but_curious:
        _check(
            p.clip_side is ClipSide.client,
            "privacy.clip_side",
            p.clip_side.value,
            "under honest_but_curious the server must never see an update, so it cannot clip "
            "one: set privacy.clip_side=client",
        )
        _check(
            cfg.secagg.mode is not SecAggMode.off,
            "secagg.mode",
            cfg.secagg.mode.value,
            "central DP under honest_but_curious needs secure aggregation to hide each update "
            "from the server; set secagg=secaggplus, or privacy.threat_model=trusted_server, "
            "or privacy.mode=local",
        )
    if cfg.secagg.mode is not SecAggMode.off:
        _check(
            p.clip_side is ClipSide.client,
            "privacy.clip_side",
            p.clip_side.value,
            "with secure aggregation the server sees only the masked sum and cannot clip; "
            "set privacy.clip_side=client",
        )


def _check_noise_and_budget(cfg: AppConfig) -> None:
    """Exactly one of z or a target epsilon, a clip norm, delta, and the budget."""
    p = cfg.privacy
    _check(
        # spend calibrates z from max_epsilon before each round (_check_schedule).
        p.schedule is NoiseSchedule.spend
        or (p.noise_multiplier is None) != (p.target_epsilon is None),
        "privacy.noise_multiplier",
        p.noise_multiplier,
        "give exactly one of privacy.noise_multiplier or privacy.target_epsilon",
    )
    if p.noise_multiplier is not None:
        _positive(p.noise_multiplier, "privacy.noise_multiplier")
    if p.target_epsilon is not None:
        _positive(p.target_epsilon, "privacy.target_epsilon")
    _check(p.clip is not None, "privacy.clip", p.clip, "set the L2 clip norm C (e.g. 1.0)")
    assert p.clip is not None
    _positive(p.clip, "privacy.clip")
    _check(
        p.delta is not None and math.isfinite(p.delta) and 0 < p.delta < 1,
        "privacy.delta",
        p.delta,
        "set delta in (0, 1), well below 1/number of clients (e.g. 1e-5)",
    )
    if p.max_epsilon is not None:
        _positive(p.max_epsilon, "privacy.max_epsilon")
        if p.target_epsilon is not None:
            _check(
                p.target_epsilon <= p.max_epsilon,
                "privacy.target_epsilon",
                p.target_epsilon,
                f"exceeds the budget privacy.max_epsilon={p.max_epsilon:g}",
            )


def _check_schedule(cfg: AppConfig) -> None:
    """``privacy.schedule`` (fl_app/privacy/schedule.py): the server's noise over rounds.

    Central DP's noise is the server's to vary. Distributed DP's shares are the
    clients': the schedule is stated in the client spec and each client recomputes its
    round's least ``z`` and refuses less (fl_app/privacy/ddp_schedule.py). Local DP's
    clients fix their own noise and account it per release: no schedule.
    """
    p = cfg.privacy
    if p.schedule is NoiseSchedule.constant:
        _check(
            p.decay_rate is None,
            "privacy.decay_rate",
            p.decay_rate,
            "is used only by privacy.schedule=decay; remove it or set privacy.schedule=decay",
        )
        return
    _check(
        p.mode in (PrivacyMode.central, PrivacyMode.distributed),
        "privacy.schedule",
        p.schedule.value,
        f"privacy.schedule={p.schedule.value} varies the noise of client-level DP's rounds "
        "(privacy=central, central_adaptive or distributed); local DP's clients fix their "
        "own noise per release; set privacy.schedule=constant",
    )
    if p.schedule is NoiseSchedule.decay:
        rate = p.decay_rate
        _check(
            rate is not None,
            "privacy.decay_rate",
            rate,
            "privacy.schedule=decay needs privacy.decay_rate in (0, 1]: round t runs at "
            "noise_multiplier * decay_rate^(t-1)",
        )
        assert rate is not None
        _in(
            math.isfinite(rate) and 0 < rate <= 1,
            "privacy.decay_rate",
            rate,
            "must lie in (0, 1] (round t runs at noise_multiplier * decay_rate^(t-1))",
        )
        _check(
            p.noise_multiplier is not None,
            "privacy.noise_multiplier",
            p.noise_multiplier,
            "privacy.schedule=decay states z per round from privacy.noise_multiplier (round "
            "1); set it and privacy.target_epsilon=null (to spend a budget, use "
            "privacy.schedule=spend with privacy.max_epsilon)",
        )
        return
    _check(
        p.max_epsilon is not None,
        "privacy.max_epsilon",
        p.max_epsilon,
        "privacy.schedule=spend spends privacy.max_epsilon by the last planned round; set it",
    )
    _check(
        p.noise_multiplier is None and p.target_epsilon is None,
        "privacy.noise_multiplier" if p.noise_multiplier is not None else "privacy.target_epsilon",
        p.noise_multiplier if p.noise_multiplier is not None else p.target_epsilon,
        "privacy.schedule=spend calibrates z before each round from privacy.max_epsilon and "
        "the ledger; set privacy.noise_multiplier=null and privacy.target_epsilon=null",
    )


def _check_adaptive(cfg: AppConfig) -> None:
    """Adaptive clipping (Andrew et al. 2021) is central DP's, with its own rates."""
    p = cfg.privacy
    _check(
        p.mode is PrivacyMode.central,
        "privacy.clipping",
        p.clipping.value,
        "adaptive clipping needs privacy.mode=central (local DP fixes C per client)",
    )
    _in(
        0 < p.target_quantile < 1,
        "privacy.target_quantile",
        p.target_quantile,
        "must lie in (0, 1) (0.5: half the updates unclipped)",
    )
    _positive(p.clip_learning_rate, "privacy.clip_learning_rate")
    if p.clipped_count_stddev is not None:
        _positive(p.clipped_count_stddev, "privacy.clipped_count_stddev")


def _check_distributed(cfg: AppConfig) -> None:
    """Distributed DP: shares under secure aggregation, fixed client-side clipping, RDP."""
    p = cfg.privacy
    _check(
        cfg.secagg.mode is not SecAggMode.off,
        "secagg.mode",
        cfg.secagg.mode.value,
        "distributed DP adds each client's noise share under secure aggregation; set "
        "secagg=secaggplus (or secagg=secagg)",
    )
    _check(
        p.clip_side is ClipSide.client,
        "privacy.clip_side",
        p.clip_side.value,
        "under distributed DP the server never sees an update; set privacy.clip_side=client",
    )
    _check(
        p.clipping is ClippingMode.fixed,
        "privacy.clipping",
        p.clipping.value,
        "adaptive clipping's noised count is released by the server (central DP); distributed "
        "DP supports privacy.clipping=fixed",
    )
    _check(
        p.accountant is Accountant.rdp,
        "privacy.accountant",
        p.accountant.value,
        "the distributed discrete Gaussian is accounted by its RDP bound (Kairouz et al. 2021; "
        "dp-accounting has no PLD for it); set privacy.accountant=rdp",
    )
    n = cfg.dataset.num_partitions
    _check(
        cfg.strategy.sampling is SamplingMode.poisson
        or round(cfg.strategy.fraction_train * n) >= n,
        "strategy.sampling",
        cfg.strategy.sampling.value,
        "distributed DP is accounted for Poisson sampling or full participation; set "
        "strategy.sampling=poisson or strategy.fraction_train=1",
    )
    d = p.distributed
    _in(0 <= d.beta < 1, "privacy.distributed.beta", d.beta, "must lie in [0, 1) (e.g. 0.6065)")
    _in(
        0 < d.overflow_probability < 1e-3,
        "privacy.distributed.overflow_probability",
        d.overflow_probability,
        "must lie in (0, 1e-3) (default 1e-9: a wrap in any round is that unlikely)",
    )


def evaluation_hidden_reason(cfg: AppConfig) -> str | None:
    """The setting that keeps every client's evaluation numbers from the server, or
    ``None`` where the threat model lets the server see them
    (:func:`~fl_app.config.schema.evaluation_hidden_from_server`).

    One wording for the refusal below and for ``summary.json``'s withheld per-site
    accuracies (:mod:`fl_app.server.fairness`).
    """
    if not evaluation_hidden_from_server(cfg):
        return None
    if cfg.privacy.mode is PrivacyMode.local:
        return "privacy.mode=local"
    if cfg.secagg.mode is not SecAggMode.off and cfg.privacy.threat_model in (
        ThreatModel.none,
        ThreatModel.trusted_server,
    ):
        return f"secagg={cfg.secagg.mode.value} (secure aggregation hides each client's numbers)"
    if metrics_hidden_from_server(cfg):
        return f"privacy.threat_model={cfg.privacy.threat_model.value}"
    return "privacy.record_level=true (DP-SGD's epsilon does not cover evaluation numbers)"


def check_metrics_stay_hidden(cfg: AppConfig) -> None:
    """Nothing un-noised per client reaches a server the threat model does not trust.

    A federated evaluation reply is one client's loss, accuracy and example count in
    plaintext; under these threat models it would leak what the masked sum (or the
    local noise) hides, so asking for it explicitly is an error.
    """
    why = evaluation_hidden_reason(cfg)
    if why is None:
        return
    every = cfg.federated_eval_every
    _check(
        every is None or every == 0 or cfg.strategy.fraction_evaluate == 0,
        "federated_eval_every",
        every,
        f"under {why} the server must not see any client's un-noised numbers, and federated "
        "evaluation sends each client's loss, accuracy and example count in plaintext; set "
        "federated_eval_every=0 (or null: off under this threat model) and rely on server_eval",
    )


def _check_dpsgd(cfg: AppConfig) -> None:
    d = cfg.privacy.dpsgd
    _check(
        (d.noise_multiplier is None) != (d.target_epsilon is None),
        "privacy.dpsgd.noise_multiplier",
        d.noise_multiplier,
        "give exactly one of privacy.dpsgd.noise_multiplier or privacy.dpsgd.target_epsilon",
    )
    if d.noise_multiplier is not None:
        _positive(d.noise_multiplier, "privacy.dpsgd.noise_multiplier")
    if d.target_epsilon is not None:
        _positive(d.target_epsilon, "privacy.dpsgd.target_epsilon")
    _positive(d.max_grad_norm, "privacy.dpsgd.max_grad_norm")
    _in(
        math.isfinite(d.delta) and 0 < d.delta < 1,
        "privacy.dpsgd.delta",
        d.delta,
        "must lie in (0, 1); use well below 1/records per institution (e.g. 1e-5)",
    )
    if d.max_epsilon is not None:
        _positive(d.max_epsilon, "privacy.dpsgd.max_epsilon")
        if d.target_epsilon is not None:
            _check(
                d.target_epsilon <= d.max_epsilon,
                "privacy.dpsgd.target_epsilon",
                d.target_epsilon,
                f"exceeds the budget privacy.dpsgd.max_epsilon={d.max_epsilon:g}: no client "
                "could finish the planned rounds",
            )
    _check(
        cfg.strategy.proximal_mu == 0,
        "strategy.proximal_mu",
        cfg.strategy.proximal_mu,
        "FedProx's proximal term is not supported with DP-SGD yet; use strategy=fedavg "
        "or strategy=fedadam",
    )
    # Opacus must accept the model: checked here, before any client starts.
    from fl_app.models import build_model, opacus_incompatibilities

    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=0)
    problems = opacus_incompatibilities(model)
    _check(
        not problems,
        "model.name",
        cfg.model.name.value,
        "Opacus cannot train this model with DP-SGD: " + "; ".join(problems),
    )

"""What a release does not protect, in words.

The card's ``not_protected`` list is rendered here (its ``threat_model_description``
by :func:`fl_app.config.guarantee.threat_model_text`, the run's one statement of its
guarantee) from the config alone, for every combination of privacy mode, record-level
DP-SGD, secure aggregation, sampling and ``privacy.secure_mode``
(tests/test_card_claims.py pins each claim to what the code sends and draws).
"""

from __future__ import annotations

from fl_app.config.schema import (
    AppConfig,
    ClippingMode,
    PrivacyMode,
    SecAggMode,
    SecAggServerModel,
    federated_eval_interval,
    metrics_hidden_from_server,
)

__all__ = [
    "central_noise_seeded",
    "not_protected",
    "record_noise_seeded",
]


def _sampling_caveat(cfg: AppConfig) -> str:
    if not cfg.privacy.secure_mode:
        return (
            "Client sampling was drawn from a generator seeded by the run's config; the "
            "accountant's amplification by sampling assumes the cohorts are secret from "
            "whoever the guarantee is stated against."
        )
    return (
        "Client sampling was drawn by the server from a keystream under its own secret "
        "key: the cohorts are secret from outsiders, not from the server, which picks and "
        "messages them; the amplification by sampling in epsilon holds against outsiders."
    )


_FTRL_CAVEAT = {
    "arbitrary": "DP-FTRL: epsilon is accounted at sampling rate 1 for arbitrary "
    "participation, so it does not rest on the cohorts being secret.",
    "once_per_tree": "DP-FTRL: epsilon is accounted at sampling rate 1 and rests on each "
    "client being in at most one round per tree, a cap the server enforced by cohort "
    "selection (privacy.ftrl.participation=once_per_tree); it does not rest on the "
    "cohorts being secret.",
}


def central_noise_seeded(cfg: AppConfig) -> bool:
    return cfg.privacy.mode is PrivacyMode.central and not cfg.privacy.secure_mode


def record_noise_seeded(cfg: AppConfig) -> bool:
    return cfg.privacy.record_level and not cfg.privacy.secure_mode


def _secagg_server_model_caveat(cfg: AppConfig) -> str:
    """What secure aggregation's server model (secagg.server_model) does not cover."""
    if cfg.secagg.server_model is SecAggServerModel.malicious:
        return (
            "Secure aggregation assumed a possibly deviating server (secagg.server_model="
            "malicious: signed keys from the federation roster, a signed survivor set, "
            "thresholds that survive a split view with up to the assumed colluders); more "
            "colluding clients than secagg.corrupt_fraction assumes are not covered."
        )
    return (
        "Secure aggregation assumed a server that follows the protocol (secagg.server_model="
        "honest_but_curious): a server that tells clients different stories about who "
        "dropped out, or substitutes keys, together with a colluding client could recover "
        "one client's update; run with secagg.server_model=malicious where the server is "
        "not trusted to follow it."
    )


def not_protected(cfg: AppConfig) -> list[str]:
    """What the release does not protect, honestly, for this configuration."""
    p = cfg.privacy
    evaluated = federated_eval_interval(cfg) > 0 and cfg.strategy.fraction_evaluate > 0
    if p.mode is PrivacyMode.none and not p.record_level:
        return _no_dp_items(cfg, evaluated)
    return [
        *_server_side_items(cfg),
        *_record_level_items(cfg),
        *_plaintext_items(cfg, evaluated),
        *([_secagg_server_model_caveat(cfg)] if cfg.secagg.mode is not SecAggMode.off else []),
        *_closing_items(cfg, evaluated),
    ]


def _no_dp_items(cfg: AppConfig, evaluated: bool) -> list[str]:
    return [
        "Nothing: no differential privacy was applied. The model may memorise and reveal "
        "individual training records, and the server saw "
        + (
            "every client's update in the clear."
            if cfg.secagg.mode is SecAggMode.off
            else "the exact sum of each round's cohort of updates (secure aggregation "
            "hid each client's own)."
        ),
        "Per-round training loss/accuracy averages, "
        + ("federated evaluation results " if evaluated else "")
        + "and the reported test accuracy were computed without DP.",
    ]


def _server_side_items(cfg: AppConfig) -> list[str]:
    """Central, distributed and local DP: what the server saw and what ε assumes."""
    p = cfg.privacy
    items: list[str] = []
    if p.mode is PrivacyMode.central:
        if cfg.secagg.mode is SecAggMode.off:
            items.append(
                "The server saw every client's (clipped) update in the clear (trusted_server): "
                "DP protects the released model, not the clients from the server operator."
            )
        else:
            items.append(
                "The server saw the exact sum of each round's cohort of clipped updates "
                "before adding noise: DP protects the released model, not that sum from "
                "the server."
            )
        if central_noise_seeded(cfg):
            items.append(
                "The DP noise was drawn from a generator seeded by the run's config "
                "(privacy.secure_mode=false): whoever knows or guesses the seed can regenerate "
                "and remove it, recovering the exact non-private aggregate. The seed is "
                "withheld from the public card, but small seeds are easily guessed; rerun "
                "with privacy.secure_mode=true for a public release."
            )
        if p.ftrl.enabled:  # DP-FTRL's epsilon uses no amplification (docs/dp-ftrl.md)
            items.append(_FTRL_CAVEAT[p.ftrl.participation.value])
        elif cfg.strategy.fraction_train < 1:
            items.append(_sampling_caveat(cfg))
    if p.mode is PrivacyMode.distributed:
        items.append(
            "Clients that colluded with the server know their own noise shares and can "
            "subtract them: the stated epsilon assumes at least the calibrated minimum of "
            "surviving clients were honest."
        )
        if cfg.strategy.fraction_train < 1:
            items.append(_sampling_caveat(cfg))
    if p.mode is PrivacyMode.local:
        items.append(
            "Who took part in which round is visible to the server (local DP has no "
            "amplification by sampling; epsilon is each client's own)."
        )
    return items


def _record_level_items(cfg: AppConfig) -> list[str]:
    p = cfg.privacy
    items: list[str] = []
    if p.record_level:
        if p.mode is PrivacyMode.none and cfg.secagg.mode is not SecAggMode.off:
            items.append(
                "Record-level DP only: secure aggregation showed the server only the exact "
                "sum of each round's cohort of (DP-SGD-trained) updates, not each "
                "institution's; no client-level noise was added to that sum, so an "
                "institution's participation and data distribution are not hidden, only its "
                "individual records are bounded."
            )
        elif p.mode is PrivacyMode.none:
            items.append(
                "Record-level DP only: the server saw each institution's whole (DP-SGD-trained) "
                "update; an institution's participation and data distribution are not hidden, "
                "only its individual records are bounded."
            )
        if record_noise_seeded(cfg):
            items.append(
                "DP-SGD noise and record sampling in each client were drawn from generators "
                "seeded by the run's config (privacy.secure_mode=false): the noise is "
                "predictable by whoever knows the seed."
            )
        items.append(
            "Per-institution epsilons differ; the stated record-level epsilon is the largest "
            "reported, and an institution that reported none is not covered."
        )
    return items


def _hidden_metrics_item(cfg: AppConfig) -> str:
    """What the server saw per client when the threat model hides every metric."""
    p = cfg.privacy
    public = ["who took part and who dropped out"]
    if p.mode is PrivacyMode.local:
        public.append("its partition id, local-DP epsilon and release count")
    if p.record_level:
        public.append(
            "its partition id, record-level epsilon, delta and rounds trained (epsilon is "
            "a function of the institution's record count: with the run's public noise "
            "settings, batch size, epochs and delta it gives that count to within about "
            "a batch, so the record count is not secret)"
        )
    if p.mode is PrivacyMode.local or p.record_level:
        # fl_app.client: dp-site-hash rides with the dp-* metrics of a deployed site.
        public.append(
            "for a deployed site, a 48-bit hash of its site identity (the same in every "
            "run, so its runs can be linked)"
        )
    return (
        "Per client, the server saw in plaintext only what the protocol needs: "
        + "; ".join(public)
        + ". No client's loss, accuracy or example count reached it (no federated "
        "evaluation under this threat model)."
    )


def _plaintext_items(cfg: AppConfig, evaluated: bool) -> list[str]:
    """What each client sent the server in the clear, per threat model."""
    p = cfg.privacy
    items: list[str] = []
    if metrics_hidden_from_server(cfg):
        items.append(_hidden_metrics_item(cfg))
    elif cfg.secagg.mode is SecAggMode.off and p.record_level:
        unclipped = (
            " whether its update exceeded the clip norm (adaptive clipping),"
            if p.mode is PrivacyMode.central and p.clipping is ClippingMode.adaptive
            else ""
        )
        # fl_app.client: a DP-SGD client leaves its loss and accuracy out (un-noised
        # functions of its records) and never evaluates for the server.
        items.append(
            "Per institution, the server saw in plaintext its example count (its "
            "aggregation weight), partition id, record-level epsilon, delta, DP-SGD steps, "
            "rounds trained, sample rate and noise multiplier,"
            + unclipped
            + " and, for a deployed site, a "
            "48-bit hash of its site identity (stable across runs). The example count and "
            "the sample rate each give the record count. No loss or accuracy was sent (no "
            "federated evaluation with DP-SGD)."
        )
    elif cfg.secagg.mode is SecAggMode.off:
        items.append(
            "Each client's example count (its aggregation weight), training loss and "
            "accuracy"
            + (
                ", whether its update exceeded the clip norm (adaptive clipping)"
                if p.mode is PrivacyMode.central and p.clipping is ClippingMode.adaptive
                else ""
            )
            + (
                ", and its federated evaluation loss, accuracy and example count,"
                if evaluated
                else ""
            )
            + " were sent to the server in the clear."
        )
    return items


def _closing_items(cfg: AppConfig, evaluated: bool) -> list[str]:
    """The un-noised metrics and what ε does not cover (every DP configuration)."""
    p = cfg.privacy
    items: list[str] = []
    # fl_app.client/secagg.client: local-DP and distributed-DP clients, and DP-SGD clients
    # without secure aggregation, send no loss or accuracy; under other secure
    # aggregation they ride in the masked sum.
    trained = p.mode not in (PrivacyMode.local, PrivacyMode.distributed) and not (
        p.record_level and cfg.secagg.mode is SecAggMode.off
    )
    reported = [
        what
        for what, ran in (
            ("per-round training loss/accuracy averages", trained),
            ("federated evaluation results", evaluated),
        )
        if ran
    ]
    items.extend(
        [
            (
                " and ".join(reported).capitalize()
                + " (metrics.jsonl, restricted tier) were computed from the clients' reports "
                "without DP; the reported test accuracy uses the server's held-out split and "
                "is not DP either."
                if reported
                else "The reported test accuracy uses the server's held-out split and is not DP."
            ),
            "Hyper-parameter tuning, earlier runs and any other use of the same data are not "
            "accounted: epsilon covers this run's training only.",
        ]
    )
    return items

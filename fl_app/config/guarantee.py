"""The guarantee a run gives, as one object every report renders.

:class:`Guarantee` says, for one configuration, which threat model the run is stated
under (docs/architecture.md, Threat models), what it protects and against whom, what
the server sees, and which ε covers which party. The texts live here once and are
rendered by ``summary.json``'s ``privacy.note`` (:func:`privacy_note`), the model card's
``threat_model_description`` (:func:`threat_model_text`), the ``--dry-run`` output
(:meth:`Guarantee.lines`) and the validator's threat-model messages
(:data:`THREAT_MODEL_PROMISES`). It is derived from the config alone, so a run
directory's card states what the run's summary stated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from fl_app.config.schema import (
    AppConfig,
    ClipSide,
    PrivacyMode,
    SecAggMode,
    ThreatModel,
)

__all__ = [
    "THREAT_MODEL_PROMISES",
    "Guarantee",
    "PartyEpsilon",
    "guarantee_of",
    "privacy_note",
    "threat_model_text",
]

# What each threat model promises, in the words the validator's refusals use.
THREAT_MODEL_PROMISES: dict[ThreatModel, str] = {
    ThreatModel.trusted_server: "the server may see updates; DP protects the released model",
    ThreatModel.honest_but_curious: "updates hidden from the server",
    ThreatModel.distributed_dp: (
        "each client adds a discrete Gaussian share under secure aggregation, so the "
        "server never sees an un-noised sum"
    ),
}


class PartyEpsilon(NamedTuple):
    """One party the run states an ε against, and the ``summary.json`` key stating it."""

    party: str
    summary_key: str


@dataclass(frozen=True)
class Guarantee:
    """What one run promises (built by :func:`guarantee_of`)."""

    threat_model: ThreatModel
    # Whom the guarantee holds against, and how (the card's threat_model_description).
    protects: str
    # What the server sees of one client's update.
    server_sees: str
    # summary.json's privacy.note: what was protected in this run.
    note: str
    # Each party with its own epsilon (empty without DP).
    epsilon: tuple[PartyEpsilon, ...]

    def lines(self) -> list[str]:
        """The dry run's statement of the guarantee."""
        parties = "; ".join(f"{e.party}: {e.summary_key}" for e in self.epsilon)
        return [
            f"guarantee ({self.threat_model.value}): {self.protects}",
            f"the server sees: {self.server_sees}",
            f"epsilon per party: {parties or 'none (no differential privacy)'}",
        ]


def guarantee_of(cfg: AppConfig) -> Guarantee:
    """The guarantee ``cfg`` (validated) gives."""
    p = cfg.privacy
    return Guarantee(
        threat_model=p.threat_model,
        protects=threat_model_text(cfg),
        server_sees=_server_sees(cfg),
        note=privacy_note(cfg),
        epsilon=_epsilon_parties(cfg),
    )


def _server_sees(cfg: AppConfig) -> str:
    mode = cfg.privacy.mode
    if cfg.secagg.mode is not SecAggMode.off:
        noised = " (each with its noise share)" if mode is PrivacyMode.distributed else ""
        return (
            f"only the masked sum of the cohort's clipped, encoded updates{noised}, which it "
            "unmasks exactly; in plaintext also each client's public dp-* metrics"
        )
    if mode is PrivacyMode.local:
        return "each client's update, clipped and noised on its client"
    if mode is PrivacyMode.central:
        seen = "clipped by its client" if cfg.privacy.clip_side.value == "client" else "unclipped"
        return f"each client's update ({seen})"
    return "each client's update in the clear"


def _epsilon_parties(cfg: AppConfig) -> tuple[PartyEpsilon, ...]:
    mode = cfg.privacy.mode
    out: list[PartyEpsilon] = []
    if mode is PrivacyMode.central:
        out.append(PartyEpsilon("outsiders", "privacy.epsilon"))
    elif mode is PrivacyMode.local:
        out.append(PartyEpsilon("everyone, the server included", "privacy.epsilon"))
    elif mode is PrivacyMode.distributed:
        out.append(PartyEpsilon("outsiders", "privacy.epsilon"))
        out.append(
            PartyEpsilon("the server (it picks the cohorts)", "privacy.epsilon_against_server")
        )
    if cfg.privacy.record_level:
        out.append(
            PartyEpsilon("each institution's records (DP-SGD)", "privacy.record_level_epsilon_max")
        )
    return tuple(out)


# privacy_note's part for DP-FTRL (docs/dp-ftrl.md).
_FTRL_NOTE = (
    "DP-FTRL (tree aggregation): the noise went into tree nodes of prefix sums and "
    "epsilon is accounted for arbitrary participation with no amplification by "
    "sampling, so it holds even against whoever knows or picks the cohorts"
)
# ... with privacy.ftrl.participation=once_per_tree (strategies/ftrl_cap.py).
_FTRL_ONCE_NOTE = (
    "DP-FTRL (tree aggregation): the noise went into tree nodes of prefix sums and "
    "epsilon is accounted with each client at most once per tree, a cap the server "
    "enforced by cohort selection, with no amplification by sampling, so it holds even "
    "against whoever knows the cohorts"
)


def privacy_note(cfg: AppConfig) -> str:
    """summary.json's one-line account of what was protected, true of this combination.

    What the server saw depends on secure aggregation, not on the DP mode: with it, only
    the masked sum (said once, in the secure-aggregation part); without it, each update.
    """
    p = cfg.privacy
    secure = cfg.secagg.mode.value != "off"
    parts = []
    if p.mode.value == "central" and secure:
        parts.append(
            "client-level central DP: the released model is DP at the stated (epsilon, "
            "delta); each client clipped its update before masking and the server added "
            "the Gaussian noise to the unmasked sum"
        )
    elif p.mode.value == "central":
        seen = "clipped by its client" if p.clip_side.value == "client" else "unclipped"
        parts.append(
            "client-level central DP: the released model is DP at the stated (epsilon, "
            f"delta); the server saw every client's update ({seen}) and noised their clipped sum"
        )
    elif p.mode.value == "local":
        parts.append(
            "client-level local DP: each update was clipped and noised before leaving its "
            "client; epsilon is the largest per-client value"
        )
    elif p.mode.value == "distributed":
        parts.append(
            "client-level distributed DP: each client clipped, rotated and rounded its update "
            "and added a discrete Gaussian share (CSPRNG) before masking, so the sum the server "
            "unmasked was already DP; clients colluding with the server can subtract their own "
            "shares (the guarantee assumes the calibrated minimum of honest survivors); "
            "'epsilon' is against outsiders, who do not know the cohorts (Poisson "
            "amplification); against the server, which picks them, it is "
            "'epsilon_against_server' (each client's rounds composed without amplification)"
        )
    if p.ftrl.enabled:
        once = p.ftrl.participation.value == "once_per_tree"
        parts.append(_FTRL_ONCE_NOTE if once else _FTRL_NOTE)
    if p.record_level:
        parts.append("record-level DP-SGD per institution (record_level epsilon per client)")
    if cfg.secagg.mode.value != "off" and p.mode.value == "distributed":
        parts.append(
            f"secure aggregation ({cfg.secagg.mode.value}, {cfg.secagg.bits} bits per "
            "coordinate): in plaintext the server saw protocol public keys, encrypted shares, "
            "who dropped out and public dp-* metrics; no training metrics"
        )
    elif cfg.secagg.mode.value != "off":
        if not parts:
            parts.append("no differential privacy: the released model is not protected")
        parts.append(
            f"secure aggregation ({cfg.secagg.mode.value}): the server saw only the masked "
            "sum of each round's clipped, fixed-point encoded updates (weights and train "
            "metrics inside it); in plaintext it saw protocol public keys, encrypted "
            "shares, who dropped out, and public dp-* metrics"
        )
    if not parts:
        return "no differential privacy: updates and the model are not protected"
    if not p.secure_mode and p.mode.value == "central":
        parts.append(
            "noise drawn from a generator seeded by the config (privacy.secure_mode=false): "
            "reproducible, but whoever knows the seed can remove it; use secure_mode for releases"
        )
    return "; ".join(parts)


def threat_model_text(cfg: AppConfig) -> str:
    """The card's ``threat_model_description``: whom the guarantee holds against."""
    p = cfg.privacy
    if p.mode is PrivacyMode.none:
        if p.record_level and cfg.secagg.mode is not SecAggMode.off:
            return (
                "none at the client level; secure aggregation: the server sees only the "
                "masked sum of the cohort's updates (exact, with no client-level noise); "
                "DP-SGD bounds what the sum and the model reveal about any one record"
            )
        if p.record_level:
            return (
                "none at the client level: the server sees every institution's update; "
                "DP-SGD bounds what the update and the model reveal about any one record"
            )
        if cfg.secagg.mode is not SecAggMode.off:
            return (
                "none: secure aggregation shows the server only the exact sum of each "
                "round's cohort of updates, with no noise"
            )
        return "none: the server sees every client's update in the clear"
    if p.mode is PrivacyMode.local:
        # Checked before the threat model: local DP's clients noise their own updates,
        # so the guarantee holds against the server whichever threat model is named.
        return (
            "honest-but-curious server: each update is clipped and noised on its client "
            "before it leaves, so the guarantee holds against the server too"
        )
    if p.threat_model is ThreatModel.trusted_server:
        return _trusted_server_text(cfg)
    if p.mode is PrivacyMode.distributed:
        return (
            "distributed DP: each client added a discrete Gaussian noise share before secure "
            "aggregation masked its update, so even the sum the server unmasked was DP; the "
            "guarantee holds against the server too, assuming the calibrated minimum of "
            "survivors were honest (colluders can subtract their own shares)"
        )
    return (
        "honest-but-curious server with secure aggregation: the server sees only the sum of "
        "the cohort's clipped updates and adds the noise to it"
    )


def _trusted_server_text(cfg: AppConfig) -> str:
    """Central DP with a trusted server: what it sees depends on SecAgg and the clip side."""
    against = "the guarantee holds for the released model against anyone but the server"
    if cfg.privacy.ftrl.enabled:  # DP-FTRL: epsilon does not rest on a secret sample
        against += ", including whoever knows or picks the cohorts (DP-FTRL, no amplification)"
    if cfg.secagg.mode is not SecAggMode.off:
        return (
            "trusted server with secure aggregation: the server sees only the masked sum of "
            f"the cohort's clipped updates (exact, before its noise) and adds the noise; {against}"
        )
    if cfg.privacy.clip_side is ClipSide.server:
        return (
            "trusted server: the server sees the clients' unclipped updates, clips them and "
            f"adds the noise; {against}"
        )
    return (
        "trusted server: the server sees the clients' clipped updates and adds the noise; "
        + against
    )

"""The privacy claims of a run, checked against the evidence that accounts them.

A run that claims client-level DP is releasable only with the ledger that accounts it
(present, parsable, its ε and δ those of ``summary.json``, every round accounted); a
run that claims record-level DP-SGD only when its clients reported their ε. A run
without any DP passes: its card says prominently that the model carries no
differential-privacy guarantee. The card's ε is the accountant's figure for this run
alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fl_app.config.schema import AppConfig, PrivacyMode
from fl_app.release.evidence import (
    SUMMARY_FIX,
    ExportRefused,
    sha256_hex,
    summary_edited,
)
from fl_app.server.layout import LEDGER_FILE

__all__ = ["PrivacyEvidence", "check_privacy"]

_REL_TOL = 1e-9


def _finite(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _REL_TOL * max(abs(a), abs(b), 1e-300)


@dataclass(frozen=True)
class PrivacyEvidence:
    """The checked privacy claims of a run."""

    client_level: bool
    record_level: bool
    ledger: Any  # FederationLedger | None (imported lazily)
    ledger_sha256: str | None


def check_privacy(
    cfg: AppConfig,
    summary: Mapping[str, Any],
    ledger_data: bytes | None,
    audited: Mapping[str, str] | None = None,
) -> PrivacyEvidence:
    """Check the summary's privacy claims against the config and the ledger.

    ``audited``: file SHA-256s the audit log's ``run.end`` recorded, to blame an edited
    summary rather than the ledger when the ledger is the recorded one.
    """
    privacy = summary["privacy"]
    p = cfg.privacy
    if privacy.get("mode") != p.mode.value:
        raise ExportRefused(
            f"summary.json privacy mode {privacy.get('mode')!r} differs from the config's "
            f"{p.mode.value!r}",
            SUMMARY_FIX,
        )
    client_level = p.mode is not PrivacyMode.none
    ledger = None
    ledger_sha = None
    if client_level:
        if ledger_data is None:
            raise ExportRefused(f"{LEDGER_FILE} is missing", _client_level_fix(cfg))
        ledger_sha = sha256_hex(ledger_data)
        ledger = _check_ledger(cfg, privacy, ledger_data, audited or {})
    if p.record_level:
        _check_record_level(privacy)
    return PrivacyEvidence(client_level, p.record_level, ledger, ledger_sha)


def _client_level_fix(cfg: AppConfig) -> str:
    return (
        f"the run claims client-level DP (privacy.mode={cfg.privacy.mode.value}); its model "
        f"can be released only with the ledger that accounts it: restore {LEDGER_FILE} from "
        "the run (or rerun it). Never export this model without it"
    )


def _check_ledger(
    cfg: AppConfig,
    privacy: Any,
    ledger_data: bytes,
    audited: Mapping[str, str],
) -> Any:
    """The parsed ledger, once its ε, δ and rounds match the summary's."""
    from fl_app.privacy.ledger import FederationLedger, LedgerError

    fix = _client_level_fix(cfg)
    try:
        ledger = FederationLedger.from_json(ledger_data.decode("utf-8"))
    except (LedgerError, UnicodeDecodeError) as err:
        raise ExportRefused(f"{LEDGER_FILE} is invalid ({err})", fix) from None
    # From here the ledger parses: a disagreement with summary.json is the summary's
    # fault when the ledger is the one the audit log recorded at the run's end.
    fix = summary_edited(LEDGER_FILE, ledger_data, audited) or fix
    eps = privacy.get("epsilon")
    if not _finite(eps):
        raise ExportRefused(f"summary.json has no client-level epsilon (found {eps!r})", fix)
    if cfg.privacy.mode is PrivacyMode.local:
        if ledger.local_noise_multiplier is None:
            raise ExportRefused(f"{LEDGER_FILE} holds no local-DP releases", fix)
        accounted = max(ledger.local_epsilons().values(), default=0.0)
    else:
        if not ledger.events:
            raise ExportRefused(f"{LEDGER_FILE} holds no round", fix)
        accounted = ledger.epsilon()
        cl = privacy.get("client_level", {})
        rounds = cl.get("rounds_accounted") if isinstance(cl, dict) else None
        if rounds != len(ledger.events):
            raise ExportRefused(
                f"{LEDGER_FILE} has {len(ledger.events)} rounds, summary.json says "
                f"{rounds!r} were accounted",
                fix,
            )
    if not _close(accounted, float(eps)):
        raise ExportRefused(
            f"{LEDGER_FILE} accounts epsilon={accounted!r}, summary.json reports "
            f"{eps!r} (relative tolerance {_REL_TOL:g})",
            fix,
        )
    delta = privacy.get("delta")
    if not _finite(delta) or not _close(float(delta), ledger.delta):
        raise ExportRefused(
            f"{LEDGER_FILE} has delta={ledger.delta!r}, summary.json reports {delta!r}", fix
        )
    return ledger


def _check_record_level(privacy: Any) -> None:
    """Refuse a record-level claim whose clients reported no ε, or whose max is not theirs."""
    fix = (
        "the run claims record-level DP-SGD (privacy.record_level=true) but its summary "
        "does not state the epsilon its clients spent; the model cannot be released as DP: "
        "rerun it, or export a run whose clients reported their epsilon"
    )
    rl = privacy.get("record_level")
    eps_max = privacy.get("record_level_epsilon_max")
    if not isinstance(rl, dict) or not _finite(eps_max):
        raise ExportRefused(f"record-level epsilon missing (found {eps_max!r})", fix)
    per_client = rl.get("per_client")
    reported = [
        float(m["epsilon"])
        for m in (per_client or {}).values()
        if isinstance(m, dict) and _finite(m.get("epsilon"))
    ]
    if not reported:
        raise ExportRefused("no institution reported a record-level epsilon", fix)
    if not _close(max(reported), float(eps_max)):
        raise ExportRefused(
            f"record_level_epsilon_max {eps_max!r} is not the largest reported epsilon "
            f"{max(reported)!r}",
            fix,
        )

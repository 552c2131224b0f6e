"""The model card's citation of an empirical privacy audit (``fl-app audit-privacy``).

The audit runs after the run, so its ``audit.json`` is *not* run evidence: the export
reads only the whitelisted run files (:data:`fl_app.release.evidence.RUN_FILES`), the
audit log's ``run.end`` hashes only the files the run wrote, and writing
``<run dir>/privacy_audit/audit.json`` later changes neither (tests/test_export.py).
The card therefore states the audit file's own SHA-256 beside what it cites, so a
reader can check that the numbers come from that file, and cites it only when the
audit attacked *this* release (its ``model_sha256`` and ``config_hash`` equal the
summary's); a stale audit is named and not cited.

Each one-run bound is cited as "accounted ε 3.0; audited lower bound 0.8 at 95 %
confidence" (:mod:`fl_app.privacy_audit.one_run`): the accounted ε is what the analysis
promises at most, the lower bound what the attack proved; a bound above the accounted
ε fails the audit (exit 3), and the card says so if a cited file records one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fl_app.release.evidence import sha256_hex

__all__ = ["PRIVACY_AUDIT_DIR", "PRIVACY_AUDIT_FILE", "bound_statement", "cite_audit"]

# Where `fl-app audit-privacy <run dir>` writes by default (its --out):
# fl_app.cli.audit_privacy and fl_app.privacy_audit.run.
PRIVACY_AUDIT_DIR = "privacy_audit"
PRIVACY_AUDIT_FILE = "audit.json"

_SECTIONS = (
    ("one_run", None, "record-level canaries, released model"),
    ("client_one_run", "released_model", "client-level canaries, released model"),
    ("client_one_run", "server_view", "client-level canaries, what the server sees"),
)


def bound_statement(bound: Mapping[str, Any]) -> str:
    """One bound in words: "accounted ε 3; audited lower bound 0.812 at 95 % confidence"."""
    acc = bound.get("accounted_epsilon")
    accounted = "no accounted ε (not compared)" if acc is None else f"accounted ε {acc:.3g}"
    return (
        f"{accounted}; audited lower bound {float(bound['epsilon_lower_bound']):.3g} at "
        f"{float(bound['confidence']) * 100:.0f} % confidence"
    )


def _cited(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, view, what in _SECTIONS:
        section = doc.get(key)
        bound = (section or {}).get(view) if view else section
        if not bound:
            continue
        acc = bound.get("accounted_epsilon")
        out.append(
            {
                "audit": what,
                "statement": bound_statement(bound),
                "epsilon_lower_bound": bound["epsilon_lower_bound"],
                "accounted_epsilon": acc,
                "confidence": bound["confidence"],
                "delta": bound["delta"],
                "canaries": bound["canaries"],
                "exceeds_accounted": acc is not None and bound["epsilon_lower_bound"] > acc,
            }
        )
    return out


def cite_audit(run_dir: Path, summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """The card's ``privacy.empirical_audit``, or ``None`` when the run has no audit."""
    path = run_dir / PRIVACY_AUDIT_DIR / PRIVACY_AUDIT_FILE
    if not path.is_file():
        return None
    data = path.read_bytes()
    where = {"file": f"{PRIVACY_AUDIT_DIR}/{PRIVACY_AUDIT_FILE}", "sha256": sha256_hex(data)}
    try:
        doc = json.loads(data)
    except ValueError:
        return {**where, "cited": False, "why_not": "the file is not valid JSON"}
    if not isinstance(doc, dict):
        return {**where, "cited": False, "why_not": "the file is not a JSON object"}
    for key in ("model_sha256", "config_hash"):
        if doc.get(key) != summary.get(key):
            return {
                **where,
                "cited": False,
                "why_not": f"it audits another release ({key} differs from summary.json's); "
                "rerun `fl-app audit-privacy` on this run directory",
            }
    bounds = _cited(doc)
    exposure = (doc.get("one_run") or {}).get("exposure")
    return {
        **where,
        "cited": True,
        "outside_run_evidence": "written after the run; not covered by the run's audit log "
        "or the export's checks: its SHA-256 is stated here",
        "bounds": bounds,
        "summary": "; ".join(f"{b['audit']}: {b['statement']}" for b in bounds) or None,
        "exposure_bits": None if not exposure else exposure.get("exposure_bits"),
        "failed": any(b["exceeds_accounted"] for b in bounds),
    }

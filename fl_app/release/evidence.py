"""Reading a finished run's directory as evidence for a release, and checking it.

Only a whitelist of run-directory files is read (:data:`RUN_FILES`), never the
client-state directory or anything else a run leaves. Each check raises
:class:`ExportRefused` naming what is wrong and the fix: a run that did not end as
``completed`` or ``degraded``, no round that updated the model, a missing or invalid
summary, a model file that is not the one the run released (file SHA-256 or content
digest differs from ``summary.json``), a config that does not hash to the run's config
hash, an audit log that is broken or truncated behind the summary's anchor. The
privacy claims are checked in :mod:`fl_app.release.privacy_evidence`.

Trust assumptions: the run directory was written by fl-app and is checked for internal
consistency (hashes, ledger, audit chain), not against an attacker who can rewrite all
of it consistently; the audit log's external anchors (signed heads) are what protect
against that (``fl-app audit verify``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fl_app.config.schema import AppConfig
from fl_app.server.layout import (
    AUDIT_FILE,
    CONFIG_FILE,
    LEDGER_FILE,
    METRICS_FILE,
    MODEL_FILE,
    RUN_MANIFEST_FILE,
    SUMMARY_FILE,
    TRACKING_FILE,
)
from fl_app.share_layers import split_shared

__all__ = [
    "RELEASABLE",
    "RUN_FILES",
    "RUN_FIX",
    "SUMMARY_FIX",
    "ExportRefused",
    "audited_hashes",
    "check_audit",
    "check_status",
    "check_summary",
    "check_trained",
    "json_object",
    "load_config",
    "load_model",
    "parse_metrics",
    "read_run_file",
    "sha256_hex",
    "summary_edited",
]

#: The only run-directory files an export reads (names: fl_app.server.layout).
RUN_FILES = (
    RUN_MANIFEST_FILE,
    SUMMARY_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    METRICS_FILE,
    LEDGER_FILE,
    AUDIT_FILE,
    # Where the run's MLflow run is: the card is attached there (fl_app.release.tracking_card).
    TRACKING_FILE,
)


class ExportRefused(RuntimeError):
    """The run cannot be exported; ``reason`` says why and ``fix`` what to do."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"{reason}; {fix}")
        self.reason = reason
        self.fix = fix


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_run_file(run_dir: Path, name: str) -> bytes | None:
    assert name in RUN_FILES, name
    path = run_dir / name
    if not path.is_file():
        return None
    return path.read_bytes()


def json_object(data: bytes | None, name: str, fix: str) -> dict[str, Any]:
    if data is None:
        raise ExportRefused(f"{name} is missing from the run directory", fix)
    try:
        obj = json.loads(data)
    except ValueError as err:
        raise ExportRefused(f"{name} is not valid JSON ({err})", fix) from None
    if not isinstance(obj, dict):
        raise ExportRefused(f"{name} is not a JSON object", fix)
    return obj


SUMMARY_FIX = (
    "export only a run that completed and wrote its summary (rerun it, or resume it to "
    "completion); summary.json must not be edited"
)
RUN_FIX = (
    "run.json is the run's manifest written by fl-app: restore it from the run (or rerun "
    "the run); run.json must not be edited"
)
# Statuses whose model some client trained: ``degraded`` lost rounds but released a
# trained model (its card states the lost rounds); ``failed`` released the initial model.
RELEASABLE = ("completed", "degraded")


def check_status(status: Any, where: str, reason: Any) -> None:
    """Refuse a run whose status says no client trained its model (or it never ended)."""
    if status in RELEASABLE:
        return
    why = f": {reason}" if isinstance(reason, str) and reason else ""
    if status == "failed":
        fix = (
            "a failed run's model is not one its clients trained (it may be the random "
            "initial model); fix the cause it names and rerun, then export that run"
        )
    else:
        fix = "only a run that ended released a model: resume or rerun it to completion"
    raise ExportRefused(
        f"the run's status is {status!r} ({where}), not 'completed' or 'degraded'{why}", fix
    )


def check_trained(metrics: Iterable[Mapping[str, Any]]) -> None:
    """Refuse a model no round updated, whatever the status claims (metrics.jsonl)."""
    if not any(rec.get("model_updated") is True for rec in metrics):
        raise ExportRefused(
            "metrics.jsonl records no round that updated the model: no client trained it "
            "(it is the initial model)",
            "export a run in which clients' updates were aggregated; its summary.json "
            "status_reason says why this one's were not",
        )


_SUMMARY_KEYS = {
    "status": str,
    "config_hash": str,
    "code_version": str,
    "model_file": str,
    "model_sha256": str,
    "weights_sha256": str,
    "privacy": dict,
    "rounds": int,
    "rounds_planned": int,
    "secure_aggregation": str,
}


def check_summary(summary: dict[str, Any]) -> None:
    for key, kind in _SUMMARY_KEYS.items():
        value = summary.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ExportRefused(
                f"summary.json: {key!r} is {value!r}, expected a {kind.__name__}", SUMMARY_FIX
            )
    check_status(summary["status"], SUMMARY_FILE, summary.get("status_reason"))
    if summary["model_file"] != MODEL_FILE:
        raise ExportRefused(
            f"summary.json names model file {summary['model_file']!r}, expected {MODEL_FILE!r}",
            SUMMARY_FIX,
        )


def load_config(data: bytes | None, summary: Mapping[str, Any]) -> AppConfig:
    from fl_app.config.compose import run_config_hash, to_app_config
    from fl_app.config.errors import ConfigError

    fix = "export the run with the config.yaml it wrote (the config must not be edited)"
    if data is None:
        raise ExportRefused("config.yaml is missing from the run directory", fix)
    try:
        raw = yaml.safe_load(data)
        if not isinstance(raw, dict):
            raise ExportRefused("config.yaml is not a mapping", fix)
        cfg = to_app_config(raw)
    except (yaml.YAMLError, ConfigError, ValueError) as err:
        raise ExportRefused(
            f"config.yaml does not validate with this code version ({err})",
            fix + "; export with the code version that ran it (summary.json code_version)",
        ) from None
    # config.yaml records how the run ran too (e.g. audit_signing_key); the run's hash not.
    found = run_config_hash(cfg)
    if found != summary["config_hash"]:
        raise ExportRefused(
            f"config.yaml hashes to {found[:16]}…, but the run's config hash is "
            f"{summary['config_hash'][:16]}…",
            fix,
        )
    return cfg


def audited_hashes(run_dir: Path, summary: Mapping[str, Any]) -> dict[str, str]:
    """File SHA-256s the audit log's ``run.end`` (the summary's anchor) recorded.

    Only to name the right file in a refusal: when a file still hashes to what the
    audit log recorded at the run's end, the summary is what changed since. The
    log's integrity is checked by :func:`check_audit`; nothing here is trusted more.
    """
    anchor = summary.get("audit")
    data = read_run_file(run_dir, AUDIT_FILE)
    if not isinstance(anchor, dict) or data is None or type(anchor.get("seq")) is not int:
        return {}
    lines = data.splitlines()
    try:
        record = json.loads(lines[anchor["seq"]])
    except (IndexError, ValueError):
        return {}
    if not isinstance(record, dict) or not isinstance(record.get("data"), dict):
        return {}
    files = record["data"].get("files")
    if record.get("event") != "run.end" or not isinstance(files, dict):
        return {}
    return {str(k): str(v) for k, v in files.items()}


def summary_edited(name: str, data: bytes, audited: Mapping[str, str]) -> str | None:
    """The fix when ``name`` is the file the audit log recorded: summary.json changed."""
    if audited.get(name) == sha256_hex(data):
        return (
            f"{name} is the file the audit log recorded at the run's end, so summary.json "
            "was edited after the run: restore summary.json from the run (or rerun it)"
        )
    return None


def load_model(
    data: bytes | None,
    summary: Mapping[str, Any],
    cfg: AppConfig,
    audited: Mapping[str, str] | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """The released arrays (checked against the summary and the config's model)."""
    import safetensors.numpy

    from fl_app.models import build_model
    from fl_app.weights import load_ndarrays, model_to_ndarrays, weights_digest

    fix = (
        "export the model the run released: restore model.safetensors from the run (or rerun "
        "it); never export a model trained or edited elsewhere under this run's card"
    )
    if data is None:
        raise ExportRefused(f"{MODEL_FILE} is missing from the run directory", fix)
    found = sha256_hex(data)
    if found != summary["model_sha256"]:
        edited = summary_edited(MODEL_FILE, data, audited or {})
        raise ExportRefused(
            f"{MODEL_FILE} has SHA-256 {found[:16]}…, but summary.json's model_sha256 is "
            f"{summary['model_sha256'][:16]}…"
            + ("" if edited else ": this is not the model the run released"),
            edited or fix,
        )
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as err:  # the library raises its own error types
        raise ExportRefused(
            f"{MODEL_FILE} is not a readable safetensors file ({err})", fix
        ) from None
    arrays = {k: np.require(v, requirements=["C", "W"]) for k, v in tensors.items()}
    digest = weights_digest(arrays)
    if digest != summary["weights_sha256"]:
        raise ExportRefused(
            f"{MODEL_FILE}'s content digest {digest[:16]}… differs from the run's "
            f"weights_sha256 {summary['weights_sha256'][:16]}…",
            fix,
        )
    model = build_model(cfg.model, cfg.dataset.input_shape, cfg.dataset.num_classes, seed=0)
    ordered = {k: arrays[k] for k in model.state_dict() if k in arrays}
    # Layers outside share.layers stayed at the sites: the released model is the rest.
    _shared, kept = split_shared(model_to_ndarrays(model), list(cfg.share.layers))
    if set(kept) & set(arrays):
        raise ExportRefused(
            f"{MODEL_FILE} holds {sorted(set(kept) & set(arrays))}, layers the run kept at "
            "the sites (share.layers)",
            fix,
        )
    try:
        load_ndarrays(model, {**kept, **arrays})
    except ValueError as err:
        raise ExportRefused(f"{MODEL_FILE} does not fit the config's model ({err})", fix) from None
    return ordered, int(sum(int(a.size) for a in ordered.values()))


def parse_metrics(data: bytes | None) -> list[dict[str, Any]]:
    fix = "metrics.jsonl must be the file the run wrote; rerun the run if it was damaged"
    if data is None:
        raise ExportRefused("metrics.jsonl is missing from the run directory", fix)
    records = []
    for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as err:
            raise ExportRefused(f"metrics.jsonl line {i} is not JSON ({err})", fix) from None
        if not isinstance(rec, dict):
            raise ExportRefused(f"metrics.jsonl line {i} is not a JSON object", fix)
        records.append(rec)
    return records


def _audit_anchor(summary: Mapping[str, Any]) -> tuple[str, int] | None:
    anchor = summary.get("audit")
    if anchor is None:
        return None
    if (
        not isinstance(anchor, dict)
        or anchor.get("file") != AUDIT_FILE
        or not isinstance(anchor.get("head"), str)
        or type(anchor.get("seq")) is not int
    ):
        raise ExportRefused(f"summary.json audit anchor is malformed: {anchor!r}", SUMMARY_FIX)
    return anchor["head"], anchor["seq"]


def check_audit(
    run_dir: Path,
    summary: Mapping[str, Any],
    model_sha: str,
    ledger_sha: str | None,
) -> tuple[bool, tuple[str, int] | None]:
    """Verify the run's audit log against the summary's anchor.

    Returns ``(has_log, anchor)``: whether the run has an audit log, and the summary's
    ``(head, seq)`` anchor in it (None for a log the summary does not anchor).
    """
    from fl_app.audit import verify

    anchor = _audit_anchor(summary)
    path = run_dir / AUDIT_FILE
    fix = (
        f"the audit log must be intact: check it with `fl-app audit verify {path}`; a torn "
        "tail can be repaired (`fl-app audit repair`), tampering cannot"
    )
    if not path.is_file():
        if anchor is not None:
            raise ExportRefused(f"{AUDIT_FILE} is missing but summary.json anchors it", fix)
        return False, None
    try:
        if anchor is None:
            result = verify(path)
        else:
            result = verify(path, expected_head=anchor[0], expected_seq=anchor[1])
    except (OSError, ValueError) as err:
        raise ExportRefused(f"{AUDIT_FILE} cannot be verified ({err})", fix) from None
    if not result.ok:
        raise ExportRefused(
            f"{AUDIT_FILE} is broken at line {result.first_broken}: {result.reason}", fix
        )
    if anchor is None:
        return True, None
    # The anchored record is the run's end: the files it names must be the ones exported.
    seq = anchor[1]
    line = read_run_file(run_dir, AUDIT_FILE) or b""
    record = json.loads(line.splitlines()[seq])
    files = record.get("data", {}).get("files", {}) if record.get("event") == "run.end" else None
    if not isinstance(files, dict):
        raise ExportRefused(
            f"{AUDIT_FILE} record {seq} (the summary's anchor) is not the run's run.end", fix
        )
    if files.get(MODEL_FILE) != model_sha:
        raise ExportRefused(
            f"{AUDIT_FILE} run.end records {MODEL_FILE} SHA-256 "
            f"{str(files.get(MODEL_FILE))[:16]}…, not the file's {model_sha[:16]}…",
            fix,
        )
    if ledger_sha is not None and files.get(LEDGER_FILE) != ledger_sha:
        raise ExportRefused(
            f"{AUDIT_FILE} run.end records a different {LEDGER_FILE} than the one present", fix
        )
    return True, anchor


# ---- the model card -------------------------------------------------------------

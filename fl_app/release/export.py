"""Write a release: a checked run's model, its card and a manifest, by tier.

``public``
    The DP-released weights (``model.safetensors``, re-saved with whitelisted metadata
    only), the model card (``model_card.json`` and ``model_card.md``) and
    ``MANIFEST.json`` (each file's SHA-256, the tier, the source run's config hash,
    export time, code version).
``restricted``
    Adds the redacted per-round metrics, ledger and per-institution record-level ε
    (:mod:`fl_app.release.redact`).

Nothing is written unless every check passed (:mod:`fl_app.release.evidence`,
:mod:`fl_app.release.privacy_evidence`) and the run's audit log can take the
``model.export`` record; an output directory that is not empty is refused (without
``overwrite``, which only ever replaces an earlier export's files).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fl_app.atomic import write_atomic
from fl_app.config.schema import AppConfig
from fl_app.release.audit_citation import cite_audit
from fl_app.release.card import Tier, build_card, render_card_markdown
from fl_app.release.evidence import (
    RELEASABLE,
    RUN_FIX,
    SUMMARY_FIX,
    ExportRefused,
    audited_hashes,
    check_audit,
    check_status,
    check_summary,
    check_trained,
    json_object,
    load_config,
    load_model,
    parse_metrics,
    read_run_file,
    sha256_hex,
)
from fl_app.release.privacy_evidence import PrivacyEvidence, check_privacy
from fl_app.release.redact import (
    aggregate_metrics,
    anonymous_ledger,
    leak_guard,
    node_ids,
    record_level_table,
    secret_guard,
)
from fl_app.release.tracking_card import attach_card
from fl_app.server.layout import (
    AUDIT_FILE,
    CONFIG_FILE,
    LEDGER_FILE,
    METRICS_FILE,
    MODEL_FILE,
    RUN_MANIFEST_FILE,
    SUMMARY_FILE,
)

__all__ = ["EXPORT_FILES", "ExportResult", "export_run"]

CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
MANIFEST = "MANIFEST.json"
RECORD_LEVEL_FILE = "record_level_epsilon.json"
#: Every file an export may write (``overwrite`` only ever replaces these).
EXPORT_FILES = (
    MODEL_FILE,
    CARD_JSON,
    CARD_MD,
    METRICS_FILE,
    LEDGER_FILE,
    RECORD_LEVEL_FILE,
    MANIFEST,
)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_run` wrote.

    Attributes
    ----------
    out_dir
        The export directory.
    tier
        The tier exported.
    files
        File name -> SHA-256 of its bytes, for every file written (the manifest too).
    card
        The model card (the content of ``model_card.json``).
    warnings
        Human lines the caller should show (e.g. no DP guarantee).
    audit_seq
        Seq of the ``model.export`` audit record, or None when the run has no audit log.
    """

    out_dir: Path
    tier: Tier
    files: dict[str, str]
    card: dict[str, Any]
    warnings: tuple[str, ...]
    audit_seq: int | None


@dataclass(frozen=True)
class _CheckedRun:
    """Everything an export needs from a run directory, once every check passed."""

    manifest_run: dict[str, Any]
    summary: dict[str, Any]
    cfg: AppConfig
    arrays: dict[str, np.ndarray]
    parameter_count: int
    evidence: PrivacyEvidence
    metrics: list[dict[str, Any]]
    has_audit: bool
    anchor: tuple[str, int] | None
    node_ids: set[str]


def _check_paths(src: Path, dst: Path) -> tuple[Path, Path]:
    if not src.is_dir():
        raise ExportRefused(f"run directory {src} does not exist", "pass a run directory")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ExportRefused(
            f"--out {dst} lies inside the run directory", "export to a directory outside the run"
        )
    return src, dst


def _check_run(src: Path) -> _CheckedRun:
    """Read and check the run directory, in the order whose first failure is reported."""
    manifest_run = json_object(read_run_file(src, RUN_MANIFEST_FILE), RUN_MANIFEST_FILE, RUN_FIX)
    summary_data = read_run_file(src, SUMMARY_FILE)
    reason = None
    if summary_data is not None and manifest_run.get("status") not in RELEASABLE:
        # The summary says why the run failed; quote it in the refusal when it parses.
        try:
            reason = json.loads(summary_data).get("status_reason")
        except (ValueError, AttributeError):
            reason = None
    check_status(manifest_run.get("status"), RUN_MANIFEST_FILE, reason)
    summary = json_object(summary_data, SUMMARY_FILE, SUMMARY_FIX)
    check_summary(summary)
    if manifest_run.get("config_hash") != summary["config_hash"]:
        raise ExportRefused(
            f"run.json names config {str(manifest_run.get('config_hash'))[:16]}…, summary.json "
            f"{summary['config_hash'][:16]}…",
            "the two files come from different runs: restore both from the same run directory",
        )
    cfg = load_config(read_run_file(src, CONFIG_FILE), summary)
    audited = audited_hashes(src, summary)
    arrays, n_params = load_model(read_run_file(src, MODEL_FILE), summary, cfg, audited)
    ledger_data = read_run_file(src, LEDGER_FILE)
    evidence = check_privacy(cfg, summary, ledger_data, audited)
    metrics = parse_metrics(read_run_file(src, METRICS_FILE))
    check_trained(metrics)
    has_audit, anchor = check_audit(src, summary, summary["model_sha256"], evidence.ledger_sha256)
    ids = node_ids(
        metrics, summary, ledger_data.decode("utf-8", "replace") if ledger_data else None
    )
    return _CheckedRun(
        manifest_run, summary, cfg, arrays, n_params, evidence, metrics, has_audit, anchor, ids
    )


def _release_warnings(run: _CheckedRun, tier: Tier) -> list[str]:
    """Warnings for the caller; refuses a public export of a 'not for release' run."""
    from fl_app.privacy.noise import release_status

    warnings: list[str] = []
    if not (run.evidence.client_level or run.evidence.record_level):
        warnings.append(
            "this model carries NO differential-privacy guarantee (privacy=none, "
            "record_level=false); its card says so"
            + (
                ", and a public export of it is a plain model release"
                if tier is Tier.public
                else ""
            )
        )
    release = release_status(run.cfg)
    if tier is Tier.public and not release["for_release"]:
        reasons = list(release["reasons"])
        raise ExportRefused(
            "the run is marked 'not for release' (privacy.secure_mode=false): "
            + "; ".join(reasons[:-1]),
            "rerun with privacy.secure_mode=true (the default) for a public release; "
            "`--tier restricted` exports this run for internal use, marked not for release",
        )
    if not release["for_release"]:
        warnings.append("the run is marked NOT FOR RELEASE (seeded randomness); see its card")
    return warnings


def _published_hash(manifest_run: dict[str, Any], config_hash: str) -> str | None:
    """The salted config hash to publish, or None when the run has no salt."""
    from fl_app.server.rundir import CONFIG_HASH_SALT, published_config_hash

    salt = manifest_run.get(CONFIG_HASH_SALT)
    if not isinstance(salt, str):
        return None
    try:
        return published_config_hash(config_hash, salt)
    except ValueError:
        raise ExportRefused(f"run.json: {CONFIG_HASH_SALT} is not 64 hex digits", RUN_FIX) from None


def _outputs(run: _CheckedRun, tier: Tier, card: dict[str, Any]) -> dict[str, bytes]:
    """The card and, for the restricted tier, the redacted files; guarded for leaks."""
    from fl_app.server.rundir import CONFIG_HASH_SALT

    outputs: dict[str, bytes] = {
        CARD_JSON: _jsonb(card),
        CARD_MD: render_card_markdown(card).encode(),
    }
    if tier is Tier.restricted:
        outputs[METRICS_FILE] = aggregate_metrics(run.metrics, run.node_ids)
        if run.evidence.ledger is not None:
            outputs[LEDGER_FILE] = anonymous_ledger(run.evidence.ledger)
        if run.evidence.record_level:
            outputs[RECORD_LEVEL_FILE] = record_level_table(run.summary)
    leak_guard(outputs, run.node_ids)
    secret_guard(outputs, run.summary["config_hash"], run.manifest_run.get(CONFIG_HASH_SALT))
    return outputs


def _open_audit(src: Path, run: _CheckedRun) -> Any:
    """The run's audit log opened (verified and locked) for the export record, or None.

    Opened before ``--out`` is touched, so a log that cannot take the record stops the
    export before any file is replaced or written.
    """
    from fl_app.audit import AuditError, AuditLog

    if not run.has_audit:
        return None
    head, seq = run.anchor if run.anchor is not None else (None, None)
    try:
        return AuditLog(src / AUDIT_FILE, expected_head=head, expected_seq=seq)
    except AuditError as err:
        raise ExportRefused(
            f"{AUDIT_FILE} cannot take the export record ({err})",
            "wait until no other process writes the run's audit log, then export again",
        ) from None


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportRefused(f"{out_dir} exists and is not a directory", "choose another --out")
    if not out_dir.exists():
        return
    present = sorted(p.name for p in out_dir.iterdir())
    if not present:
        return
    if not overwrite:
        raise ExportRefused(
            f"output directory {out_dir} is not empty ({', '.join(present[:5])})",
            "choose an empty or new --out, or pass --overwrite to replace an earlier export",
        )
    unknown = [name for name in present if name not in EXPORT_FILES]
    if MANIFEST not in present or unknown:
        raise ExportRefused(
            f"--overwrite replaces only an earlier export, but {out_dir} "
            + (
                f"holds other files ({', '.join(unknown[:5])})"
                if unknown
                else "has no MANIFEST.json"
            ),
            "choose an empty or new --out",
        )
    for name in present:
        (out_dir / name).unlink()


def _jsonb(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _write_files(
    dst: Path,
    tier: Tier,
    run: _CheckedRun,
    outputs: dict[str, bytes],
    published_hash: str | None,
    exporter_version: str,
) -> dict[str, str]:
    """Write the model, the outputs and the manifest; return each file's SHA-256."""
    from fl_app.weights import load_safetensors, save_safetensors, weights_digest

    summary, anchor = run.summary, run.anchor
    meta = {
        "format": "fl-app-export",
        "tier": tier.value,
        "config_hash": published_hash or "withheld",
        "code_version": summary["code_version"],
        "rounds": str(summary["rounds"]),
        "weights_sha256": summary["weights_sha256"],
    }
    files = {MODEL_FILE: save_safetensors(dst / MODEL_FILE, run.arrays, meta)}
    reloaded, _ = load_safetensors(dst / MODEL_FILE)
    if weights_digest(reloaded) != summary["weights_sha256"]:  # pragma: no cover
        raise RuntimeError("export bug: the re-saved weights differ from the released ones")
    for name, data in outputs.items():
        write_atomic(dst / name, data)
        files[name] = sha256_hex(data)
    manifest = {
        "format": "fl-app-export",
        "format_version": 1,
        "tier": tier.value,
        "files": dict(sorted(files.items())),
        "source": {
            "config_hash": published_hash,
            "code_version": summary["code_version"],
            "model_sha256": summary["model_sha256"],
            "weights_sha256": summary["weights_sha256"],
            "audit_head": anchor[0] if anchor else None,
            "audit_seq": anchor[1] if anchor else None,
        },
        "exported_at": datetime.now(timezone.utc).isoformat(),
        "code_version": exporter_version,
    }
    manifest_bytes = _jsonb(manifest)
    write_atomic(dst / MANIFEST, manifest_bytes)
    files[MANIFEST] = sha256_hex(manifest_bytes)
    return files


def export_run(
    run_dir: str | os.PathLike[str],
    tier: Tier | str,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> ExportResult:
    """Export a completed run's DP-released model and its model card.

    Parameters
    ----------
    run_dir
        A run directory written by :func:`fl_app.server.app.run_experiment`.
    tier
        ``public`` (weights + card + manifest) or ``restricted`` (adds aggregate
        per-round metrics, the client-level ledger and per-institution record-level ε).
    out_dir
        Where to write; created if missing, must be empty unless ``overwrite``.
    overwrite
        Replace an earlier export in ``out_dir`` (a directory holding a MANIFEST.json and
        only export files); anything else there is refused, never deleted.

    Returns
    -------
    ExportResult

    Raises
    ------
    ExportRefused
        When the run must not be exported (see :mod:`fl_app.release`); nothing is
        written then.
    ValueError
        For an unknown ``tier``.
    """
    from fl_app.server.rundir import code_version

    try:
        tier = Tier(tier)
    except ValueError:
        raise ValueError(f"tier is {tier!r}; use 'public' or 'restricted'") from None
    src, dst = _check_paths(Path(run_dir), Path(out_dir))
    run = _check_run(src)
    warnings = _release_warnings(run, tier)
    published_hash = _published_hash(run.manifest_run, run.summary["config_hash"])
    exporter_version = code_version()
    card = build_card(
        run.cfg,
        run.summary,
        run.evidence,
        tier,
        run.parameter_count,
        exporter_version,
        published_hash,
        audit=cite_audit(src, run.summary),
    )
    outputs = _outputs(run, tier, card)
    audit = _open_audit(src, run)
    try:
        _prepare_out_dir(dst, overwrite)
        dst.mkdir(parents=True, exist_ok=True)
        files = _write_files(dst, tier, run, outputs, published_hash, exporter_version)
        audit_seq = None
        if audit is not None:
            record = audit.append("model.export", {"tier": tier.value, "files": dict(files)})
            audit_seq = record.seq
    finally:
        if audit is not None:
            audit.close()
    # After the files are written: a tracker that cannot take the card only warns.
    tracked = attach_card(src, dst, [CARD_JSON, CARD_MD], tier.value)
    if tracked is not None:
        warnings.append(tracked)
    return ExportResult(
        out_dir=dst,
        tier=tier,
        files=dict(sorted(files.items())),
        card=card,
        warnings=tuple(warnings),
        audit_seq=audit_seq,
    )

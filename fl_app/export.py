"""Release a finished run's model by tier: ``fl-app export <run dir> --tier ... --out DIR``.

``public``
    The DP-released weights (``model.safetensors``, re-saved with whitelisted metadata
    only), a model card (``model_card.json`` and ``model_card.md``: task, data,
    mechanism and threat model, z, C, sampling, rounds, ε, δ, accountant, seed, config
    hash, code version, and what the release does *not* protect), and ``MANIFEST.json``
    (each file's SHA-256, the tier, the source run's config hash, export time, code
    version). The config hash published (card, manifest, model metadata) is keyed by
    the run's secret salt (:func:`fl_app.rundir.published_config_hash`): an unsalted
    hash of a config whose other fields are on the card lets anyone search for its seed.
``restricted``
    Adds ``metrics.jsonl`` reduced to per-round aggregate scalars (no per-client entry,
    nothing keyed by or naming a node), ``privacy_ledger.json`` (client-level DP; local-DP
    clients re-keyed by anonymous index) and, for record-level DP-SGD,
    ``record_level_epsilon.json`` (each institution's ε, by anonymous index).

What is read: only a whitelist of run-directory files (:data:`RUN_FILES`), never the
client-state directory or anything else a run leaves. What is never written: client
updates, pre-noise aggregates, per-client metrics, node ids, the run key, key material.

An export is refused (:class:`ExportRefused`, naming the reason and the fix) when the
run did not end as ``completed`` or ``degraded`` (a ``failed`` run's model is not one its
clients trained), no round of ``metrics.jsonl`` updated the model, its summary is
missing or invalid, the model file is not the one the run released (file SHA-256 or
content digest differs from ``summary.json``), the config does not hash to the run's
config hash, the audit log is broken or truncated behind the summary's anchor, the run
claims DP but its evidence is missing or inconsistent (client-level: ledger missing,
unparsable, or its ε differs from the summary's; record-level: no ε reported), or the
output directory is not empty (without ``overwrite``). A run without any DP exports,
but its card says prominently that the model carries no differential-privacy guarantee.
A public export of a run marked "not for release" (DP noise or the sampling its ε
relies on drawn from generators seeded by the config, ``privacy.secure_mode=false``)
is refused; its restricted export says "not for release" and why on the card.

Trust assumptions: the run directory was written by fl-app and is checked for internal
consistency (hashes, ledger, audit chain), not against an attacker who can rewrite all
of it consistently; the audit log's external anchors (signed heads) are what protect
against that (``fl-app audit verify``). The card's ε is the accountant's figure for this
run alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fl_app.atomic import write_atomic
from fl_app.config.schema import (
    AppConfig,
    ClippingMode,
    DatasetKind,
    ModelName,
    PartitionerName,
    PrivacyMode,
    SecAggMode,
    SecAggServerModel,
    ThreatModel,
    federated_eval_interval,
    metrics_hidden_from_server,
)

__all__ = [
    "CARD_VERSION",
    "EXPORT_FILES",
    "RUN_FILES",
    "ExportRefused",
    "ExportResult",
    "Tier",
    "export_main",
    "export_run",
    "render_card_markdown",
]

CARD_VERSION = 1
MODEL_FILE = "model.safetensors"
LEDGER_FILE = "privacy_ledger.json"  # == fl_app.server_app.LEDGER_FILE (no server import here)
AUDIT_FILE = "audit.jsonl"
#: The only run-directory files an export reads.
RUN_FILES = (
    "run.json",
    "summary.json",
    "config.yaml",
    MODEL_FILE,
    "metrics.jsonl",
    LEDGER_FILE,
    AUDIT_FILE,
)
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
MANIFEST = "MANIFEST.json"
METRICS_FILE = "metrics.jsonl"
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

# metrics.jsonl fields that hold per-client entries (node ids, reasons, metrics).
_PER_CLIENT_FIELDS = frozenset({"client_metrics", "rejections", "failures"})
# Key fragments that name a client rather than the round (e.g. the mean of partition ids
# DP-SGD clients report).
_CLIENT_KEY_FRAGMENTS = ("node", "partition", "client_id")
# Node ids shorter than this are not scanned for in the output (they would match any
# digit run); Flower's node ids are random 64-bit integers.
_MIN_GUARD_DIGITS = 6
_REL_TOL = 1e-9
_NO_DP_BANNER = (
    "NO DIFFERENTIAL PRIVACY: this model carries NO differential-privacy guarantee. "
    "It was trained on the clients' data without clipping or noise and may memorise and "
    "reveal individual training records."
)


class Tier(str, Enum):
    public = "public"
    restricted = "restricted"


class ExportRefused(RuntimeError):
    """The run cannot be exported; ``reason`` says why and ``fix`` what to do."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"{reason}; {fix}")
        self.reason = reason
        self.fix = fix


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


# ---- reading the run directory ---------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(run_dir: Path, name: str) -> bytes | None:
    assert name in RUN_FILES, name
    path = run_dir / name
    if not path.is_file():
        return None
    return path.read_bytes()


def _json_object(data: bytes | None, name: str, fix: str) -> dict[str, Any]:
    if data is None:
        raise ExportRefused(f"{name} is missing from the run directory", fix)
    try:
        obj = json.loads(data)
    except ValueError as err:
        raise ExportRefused(f"{name} is not valid JSON ({err})", fix) from None
    if not isinstance(obj, dict):
        raise ExportRefused(f"{name} is not a JSON object", fix)
    return obj


def _finite(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _REL_TOL * max(abs(a), abs(b), 1e-300)


_SUMMARY_FIX = (
    "export only a run that completed and wrote its summary (rerun it, or resume it to "
    "completion); summary.json must not be edited"
)
_RUN_FIX = (
    "run.json is the run's manifest written by fl-app: restore it from the run (or rerun "
    "the run); run.json must not be edited"
)
# Statuses whose model some client trained: ``degraded`` lost rounds but released a
# trained model (its card states the lost rounds); ``failed`` released the initial model.
_RELEASABLE = ("completed", "degraded")


def _check_status(status: Any, where: str, reason: Any) -> None:
    """Refuse a run whose status says no client trained its model (or it never ended)."""
    if status in _RELEASABLE:
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


def _check_trained(metrics: Iterable[Mapping[str, Any]]) -> None:
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


def _check_summary(summary: dict[str, Any]) -> None:
    for key, kind in _SUMMARY_KEYS.items():
        value = summary.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ExportRefused(
                f"summary.json: {key!r} is {value!r}, expected a {kind.__name__}", _SUMMARY_FIX
            )
    _check_status(summary["status"], "summary.json", summary.get("status_reason"))
    if summary["model_file"] != MODEL_FILE:
        raise ExportRefused(
            f"summary.json names model file {summary['model_file']!r}, expected {MODEL_FILE!r}",
            _SUMMARY_FIX,
        )


def _load_config(data: bytes | None, summary: Mapping[str, Any]) -> AppConfig:
    from fl_app.config.compose import config_hash, to_app_config
    from fl_app.config.validate import ConfigError

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
    found = config_hash(cfg)
    if found != summary["config_hash"]:
        raise ExportRefused(
            f"config.yaml hashes to {found[:16]}…, but the run's config hash is "
            f"{summary['config_hash'][:16]}…",
            fix,
        )
    return cfg


def _audited_hashes(run_dir: Path, summary: Mapping[str, Any]) -> dict[str, str]:
    """File SHA-256s the audit log's ``run.end`` (the summary's anchor) recorded.

    Only to name the right file in a refusal: when a file still hashes to what the
    audit log recorded at the run's end, the summary is what changed since. The
    log's integrity is checked by :func:`_check_audit`; nothing here is trusted more.
    """
    anchor = summary.get("audit")
    data = _read(run_dir, AUDIT_FILE)
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


def _summary_edited(name: str, data: bytes, audited: Mapping[str, str]) -> str | None:
    """The fix when ``name`` is the file the audit log recorded: summary.json changed."""
    if audited.get(name) == _sha256(data):
        return (
            f"{name} is the file the audit log recorded at the run's end, so summary.json "
            "was edited after the run: restore summary.json from the run (or rerun it)"
        )
    return None


def _load_model(
    data: bytes | None,
    summary: Mapping[str, Any],
    cfg: AppConfig,
    audited: Mapping[str, str] | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """The released arrays (checked against the summary and the config's model)."""
    import safetensors.numpy

    from fl_app.models import build_model
    from fl_app.weights import load_ndarrays, weights_digest

    fix = (
        "export the model the run released: restore model.safetensors from the run (or rerun "
        "it); never export a model trained or edited elsewhere under this run's card"
    )
    if data is None:
        raise ExportRefused(f"{MODEL_FILE} is missing from the run directory", fix)
    found = _sha256(data)
    if found != summary["model_sha256"]:
        edited = _summary_edited(MODEL_FILE, data, audited or {})
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
    try:
        load_ndarrays(model, arrays)
    except ValueError as err:
        raise ExportRefused(f"{MODEL_FILE} does not fit the config's model ({err})", fix) from None
    return ordered, int(sum(int(a.size) for a in ordered.values()))


def _parse_metrics(data: bytes | None) -> list[dict[str, Any]]:
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


def _node_ids(
    metrics: Iterable[Mapping[str, Any]], summary: Mapping[str, Any], ledger_text: str | None
) -> set[str]:
    """Every node id the run directory mentions (what the export must never contain)."""
    ids: set[str] = set()
    for rec in metrics:
        cm = rec.get("client_metrics")
        if isinstance(cm, dict):
            ids.update(str(k) for k in cm)
        for name in ("rejections", "failures"):
            items = rec.get(name)
            if isinstance(items, list):
                ids.update(str(x["node"]) for x in items if isinstance(x, dict) and "node" in x)
    privacy = summary.get("privacy", {})
    rl = privacy.get("record_level") if isinstance(privacy, dict) else None
    if isinstance(rl, dict):
        ids.update(str(k) for k in rl.get("per_client", {}) or {})
        ids.update(str(k) for k in rl.get("clients_budget_exhausted", []) or [])
    cl = privacy.get("client_level") if isinstance(privacy, dict) else None
    if isinstance(cl, dict):
        ids.update(str(k) for k in cl.get("releases", {}) or {})
    if ledger_text is not None:
        try:
            raw = json.loads(ledger_text)
            ids.update(str(k) for k in raw.get("local", {}) or {})
            ids.update(str(k) for k in raw.get("participation", {}) or {})
        except (ValueError, AttributeError):
            pass
    return ids


# ---- privacy evidence -----------------------------------------------------------


@dataclass(frozen=True)
class _Evidence:
    """The checked privacy claims of a run."""

    client_level: bool
    record_level: bool
    ledger: Any  # FederationLedger | None (imported lazily)
    ledger_sha256: str | None


def _check_privacy(
    cfg: AppConfig,
    summary: Mapping[str, Any],
    ledger_data: bytes | None,
    audited: Mapping[str, str] | None = None,
) -> _Evidence:
    from fl_app.privacy.ledger import FederationLedger, LedgerError

    privacy = summary["privacy"]
    p = cfg.privacy
    if privacy.get("mode") != p.mode.value:
        raise ExportRefused(
            f"summary.json privacy mode {privacy.get('mode')!r} differs from the config's "
            f"{p.mode.value!r}",
            _SUMMARY_FIX,
        )
    client_level = p.mode is not PrivacyMode.none
    ledger = None
    ledger_sha = None
    if client_level:
        fix = (
            f"the run claims client-level DP (privacy.mode={p.mode.value}); its model can be "
            f"released only with the ledger that accounts it: restore {LEDGER_FILE} from the "
            "run (or rerun it). Never export this model without it"
        )
        if ledger_data is None:
            raise ExportRefused(f"{LEDGER_FILE} is missing", fix)
        ledger_sha = _sha256(ledger_data)
        try:
            ledger = FederationLedger.from_json(ledger_data.decode("utf-8"))
        except (LedgerError, UnicodeDecodeError) as err:
            raise ExportRefused(f"{LEDGER_FILE} is invalid ({err})", fix) from None
        # From here the ledger parses: a disagreement with summary.json is the summary's
        # fault when the ledger is the one the audit log recorded at the run's end.
        fix = _summary_edited(LEDGER_FILE, ledger_data, audited or {}) or fix
        eps = privacy.get("epsilon")
        if not _finite(eps):
            raise ExportRefused(f"summary.json has no client-level epsilon (found {eps!r})", fix)
        if p.mode is PrivacyMode.local:
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
    if p.record_level:
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
    return _Evidence(client_level, p.record_level, ledger, ledger_sha)


# ---- audit log --------------------------------------------------------------------


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
        raise ExportRefused(f"summary.json audit anchor is malformed: {anchor!r}", _SUMMARY_FIX)
    return anchor["head"], anchor["seq"]


def _check_audit(
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
    line = _read(run_dir, AUDIT_FILE) or b""
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


def _dataset_description(cfg: AppConfig) -> dict[str, Any]:
    d = cfg.dataset
    if d.kind is DatasetKind.digits:
        name = "scikit-learn digits (8x8 grey-scale handwritten digits)"
    elif d.kind is DatasetKind.hub:
        name = f"Hugging Face hub dataset {d.hub_path}"
    else:
        name = "per-institution local files (not described here)"
    return {"kind": d.kind.value, "name": name}


def _data_section(cfg: AppConfig) -> dict[str, Any]:
    from fl_app.config.compose import config_to_dict

    d = cfg.dataset
    partitioning: dict[str, Any] = {"partitioner": d.partitioner.value}
    if d.partitioner is PartitionerName.dirichlet:
        partitioning["dirichlet_alpha"] = d.dirichlet_alpha
    elif d.partitioner is PartitionerName.shard:
        partitioning["shards_per_partition"] = d.shards_per_partition
    elif d.partitioner is PartitionerName.natural:
        partitioning["natural_id_key"] = d.natural_id_key
    section = config_to_dict(cfg)["dataset"]
    canonical = json.dumps(section, sort_keys=True, separators=(",", ":")).encode()
    return {
        **_dataset_description(cfg),
        "num_clients": d.num_partitions,
        **partitioning,
        "server_test_split": (
            "none (the server holds no data)"
            if d.kind is DatasetKind.local
            else f"stratified hold-out of {d.test_fraction:g} of the rows, taken before "
            "partitioning (a hub dataset's own test split when it has one)"
        ),
        "test_fraction": d.test_fraction,
        "client_validation_fraction": d.val_fraction,
        "dataset_config_sha256": _sha256(canonical),
        "dataset_config_sha256_note": (
            "SHA-256 of the run's dataset configuration (canonical JSON): a fingerprint of "
            "how the data was chosen and split, not of the data bytes"
        ),
    }


def _model_section(cfg: AppConfig, parameter_count: int, weights_sha: str) -> dict[str, Any]:
    m = cfg.model
    arch: dict[str, Any] = {"name": m.name.value}
    if m.name is ModelName.mlp:
        arch["hidden"] = list(m.hidden)
    else:
        arch["channels"] = list(m.channels)
        arch["norm_groups"] = m.norm_groups
    arch["dropout"] = m.dropout
    return {
        **arch,
        "parameter_count": parameter_count,
        "file": MODEL_FILE,
        "format": "safetensors, float32, state_dict names of fl_app.models.build_model",
        "weights_sha256": weights_sha,
    }


def _training_section(cfg: AppConfig, summary: Mapping[str, Any]) -> dict[str, Any]:
    s, t = cfg.strategy, cfg.train
    return {
        "rounds_run": summary["rounds"],
        "rounds_planned": summary["rounds_planned"],
        "stopped_early": summary.get("stopped_early"),
        # A degraded run's card says how many rounds updated the model and which were
        # lost (summary.json status and status_reason; absent in older run directories).
        "run_status": summary["status"],
        "rounds_model_updated": summary.get("rounds_model_updated"),
        "rounds_lost": summary.get("rounds_lost"),
        "status_reason": summary.get("status_reason"),
        "strategy": s.name.value,
        "client_sampling": s.sampling.value,
        "sample_rate": s.fraction_train,
        "local_epochs": t.local_epochs,
        "batch_size": t.batch_size,
        "optimizer": t.optimizer.value,
        "lr": t.lr,
        "momentum": t.momentum,
        "weight_decay": t.weight_decay,
        "proximal_mu": s.proximal_mu,
    }


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


def _central_noise_seeded(cfg: AppConfig) -> bool:
    return cfg.privacy.mode is PrivacyMode.central and not cfg.privacy.secure_mode


def _record_noise_seeded(cfg: AppConfig) -> bool:
    return cfg.privacy.record_level and not cfg.privacy.secure_mode


def _client_level_noise_source(cfg: AppConfig) -> str:
    """Where the client-level noise came from, for the card's ``noise_source``.

    Distributed DP's noise shares and randomised rounding are drawn in each client from
    SecureNoise (a ChaCha20 keystream under an OS-random key) whatever
    ``privacy.secure_mode`` says: a seed the server could know would let it subtract
    them. Only central DP's server-side noise follows ``privacy.secure_mode``.
    """
    if cfg.privacy.mode is PrivacyMode.distributed:
        return (
            "CSPRNG in each client (discrete Gaussian shares and rounding; "
            "privacy.secure_mode does not apply to them)"
        )
    if cfg.privacy.secure_mode:
        return "CSPRNG (privacy.secure_mode=true)"
    return "generator seeded by the run's config (privacy.secure_mode=false)"


def _client_level_card(cfg: AppConfig, summary: Mapping[str, Any], ledger: Any) -> dict[str, Any]:
    p = cfg.privacy
    priv = summary["privacy"]
    cl = priv.get("client_level", {})
    out: dict[str, Any] = {
        "mechanism": cl.get("mechanism"),
        "unit": "client (one institution's whole contribution)",
        "noise_multiplier_z": cl.get("noise_multiplier"),
        "clip_C": cl.get("clip"),
        "epsilon": priv["epsilon"],
        "delta": priv["delta"],
        "accountant": ledger.accountant.value,
        "budget_max_epsilon": cl.get("budget_max_epsilon"),
    }
    if p.mode is PrivacyMode.local:
        counts = [n for _, n in ledger.local]
        out.update(
            {
                "epsilon_is": "the largest per-client epsilon (each client accounts its own "
                "releases; no amplification by sampling)",
                "clients_accounted": len(counts),
                "max_releases_per_client": max(counts, default=0),
                "noise_source": "CSPRNG in each client",
            }
        )
        return out
    last = ledger.events[-1]
    out.update(
        {
            "clipping": p.clipping.value,
            "clip_side": p.clip_side.value,
            "clip_final": cl.get("clip_final"),
            "update_noise_multiplier": cl.get("update_noise_multiplier"),
            "clipped_count_stddev": cl.get("clipped_count_stddev"),
            "sampling": last.sampling.value,
            "sample_rate_q": last.sample_rate,
            "population": last.population,
            "expected_cohort": last.cohort,
            "neighbouring": cl.get("neighbouring"),
            "rounds_accounted": len(ledger.events),
            "epsilon_rdp_cross_check": cl.get("epsilon_rdp_cross_check"),
            "noise_source": _client_level_noise_source(cfg),
        }
    )
    # epsilon per party (docs/privacy-branches.md): amplification by sampling holds only
    # against whoever does not know the cohorts.
    against = cl.get("against_server")
    if isinstance(against, dict):
        out["epsilon_is"] = (
            "against outsiders, who do not know the cohorts (amplification by sampling); "
            "part of delta covers sampling-dependent round branches (delta_branches)"
        )
        out["delta_branches"] = cl.get("delta_branches")
        out["epsilon_against_server"] = {
            k: against.get(k)
            for k in (
                "epsilon_max_over_clients",
                "epsilon_planned_worst_case",
                "rounds_max_over_clients",
                "note",
            )
            if k in against
        }
    return out


def _record_level_card(cfg: AppConfig, summary: Mapping[str, Any]) -> dict[str, Any]:
    d = cfg.privacy.dpsgd
    priv = summary["privacy"]
    rl = priv["record_level"]
    per_client = [m for m in (rl.get("per_client") or {}).values() if isinstance(m, dict)]
    zs = sorted({float(m["noise-multiplier"]) for m in per_client if "noise-multiplier" in m})
    return {
        "mechanism": rl.get("mechanism"),
        "unit": "one training record of one institution",
        "noise_multiplier_z": d.noise_multiplier if d.noise_multiplier is not None else zs,
        "target_epsilon": d.target_epsilon,
        "clip_C": d.max_grad_norm,
        "sampling": "Poisson sampling of each institution's local records",
        "epsilon_max": priv["record_level_epsilon_max"],
        "epsilon_is": "the largest epsilon any institution reported (per-institution values "
        "only in the restricted tier)",
        "delta": d.delta,
        "accountant": d.accountant.value,
        "budget_max_epsilon": d.max_epsilon,
        "institutions_reporting": len(per_client),
        "institutions_budget_exhausted": len(rl.get("clients_budget_exhausted") or []),
        "noise_source": (
            "CSPRNG (privacy.secure_mode=true)"
            if cfg.privacy.secure_mode
            else "generators seeded by the run's config (privacy.secure_mode=false)"
        ),
    }


def _threat_model_text(cfg: AppConfig) -> str:
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
    if p.threat_model is ThreatModel.trusted_server:
        return (
            "trusted server: the server sees the clients' (clipped) updates and adds the "
            "noise; the guarantee holds for the released model against anyone but the server"
        )
    if p.mode is PrivacyMode.local:
        return (
            "honest-but-curious server: each update is clipped and noised on its client "
            "before it leaves, so the guarantee holds against the server too"
        )
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


def _not_protected(cfg: AppConfig) -> list[str]:
    """What the release does not protect, honestly, for this configuration."""
    p = cfg.privacy
    items: list[str] = []
    evaluated = federated_eval_interval(cfg) > 0 and cfg.strategy.fraction_evaluate > 0
    if p.mode is PrivacyMode.none and not p.record_level:
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
        if _central_noise_seeded(cfg):
            items.append(
                "The DP noise was drawn from a generator seeded by the run's config "
                "(privacy.secure_mode=false): whoever knows or guesses the seed can regenerate "
                "and remove it, recovering the exact non-private aggregate. The seed is "
                "withheld from the public card, but small seeds are easily guessed; rerun "
                "with privacy.secure_mode=true for a public release."
            )
        if cfg.strategy.fraction_train < 1:
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
        if _record_noise_seeded(cfg):
            items.append(
                "DP-SGD noise and record sampling in each client were drawn from generators "
                "seeded by the run's config (privacy.secure_mode=false): the noise is "
                "predictable by whoever knows the seed."
            )
        items.append(
            "Per-institution epsilons differ; the stated record-level epsilon is the largest "
            "reported, and an institution that reported none is not covered."
        )
    if metrics_hidden_from_server(cfg):
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
            # client_app: dp-site-hash rides with the dp-* metrics of a deployed site.
            public.append(
                "for a deployed site, a 48-bit hash of its site identity (the same in every "
                "run, so its runs can be linked)"
            )
        items.append(
            "Per client, the server saw in plaintext only what the protocol needs: "
            + "; ".join(public)
            + ". No client's loss, accuracy or example count reached it (no federated "
            "evaluation under this threat model)."
        )
    elif cfg.secagg.mode is SecAggMode.off and p.record_level:
        unclipped = (
            " whether its update exceeded the clip norm (adaptive clipping),"
            if p.mode is PrivacyMode.central and p.clipping is ClippingMode.adaptive
            else ""
        )
        # client_app: a DP-SGD client leaves its loss and accuracy out (un-noised
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
    if cfg.secagg.mode is not SecAggMode.off:
        items.append(_secagg_server_model_caveat(cfg))
    # client_app/secagg_stages: local-DP and distributed-DP clients, and DP-SGD clients
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


def _build_card(
    cfg: AppConfig,
    summary: Mapping[str, Any],
    evidence: _Evidence,
    tier: Tier,
    parameter_count: int,
    exporter_version: str,
    published_hash: str | None,
) -> dict[str, Any]:
    from fl_app.privacy.noise import release_status

    p = cfg.privacy
    dp = evidence.client_level or evidence.record_level
    privacy: dict[str, Any] = {
        "differential_privacy": dp,
        "guarantee": (
            _NO_DP_BANNER
            if not dp
            else "The released weights are differentially private at the (epsilon, delta) "
            "stated below, under the threat model and exceptions stated on this card."
        ),
        "mode": p.mode.value,
        "threat_model": p.threat_model.value,
        "threat_model_description": _threat_model_text(cfg),
        "secure_aggregation": cfg.secagg.mode.value,
        "secure_aggregation_server_model": (
            None if cfg.secagg.mode is SecAggMode.off else cfg.secagg.server_model.value
        ),
        "record_level": p.record_level,
        "client_level": (
            _client_level_card(cfg, summary, evidence.ledger) if evidence.client_level else None
        ),
        "record_level_dp": _record_level_card(cfg, summary) if evidence.record_level else None,
    }
    seeded = _central_noise_seeded(cfg) or _record_noise_seeded(cfg)
    reproducibility: dict[str, Any] = {
        "config_hash": published_hash,
        "config_hash_is": _PUBLISHED_HASH_NOTE
        if published_hash is not None
        else "withheld: the run directory holds no config-hash salt (a run from before "
        "salted hashes); an unsalted hash would let anyone search for the seed",
        "code_version": summary["code_version"],
        "exported_with": exporter_version,
    }
    if tier is Tier.public and seeded:
        reproducibility["seed"] = None
        reproducibility["seed_withheld"] = (
            "the DP noise was drawn from generators seeded by it (privacy.secure_mode=false); "
            "publishing it would let anyone remove the noise"
        )
    else:
        reproducibility["seed"] = cfg.seed
    evaluation = {
        "test_accuracy": summary.get("accuracy"),
        "test_loss": summary.get("loss"),
        "evaluated_on": (
            "the server's held-out test split (see data.server_test_split), after the last "
            "round, with the exported weights"
        ),
    }
    d = cfg.dataset
    return {
        "card_version": CARD_VERSION,
        "tier": tier.value,
        "release": release_status(cfg),
        "experiment_name": summary.get("experiment_name"),
        "task": {
            "type": "image classification",
            "dataset": _dataset_description(cfg)["name"],
            "num_classes": d.num_classes,
            "input_shape": list(d.input_shape),
            "input_scaling": f"pixel values divided by {d.pixel_scale:g}",
        },
        "data": _data_section(cfg),
        "model": _model_section(cfg, parameter_count, summary["weights_sha256"]),
        "training": _training_section(cfg, summary),
        "evaluation": evaluation,
        "privacy": privacy,
        "not_protected": _not_protected(cfg),
        "reproducibility": reproducibility,
    }


_PUBLISHED_HASH_NOTE = (
    "HMAC-SHA256 of the run's config hash under a secret per-run salt kept in the run "
    "directory (run.json): whoever holds the run can show which config produced this "
    "model; nobody else can test guessed configs (e.g. seeds) against it"
)


def _published_hash(manifest_run: Mapping[str, Any], config_hash: str) -> str | None:
    """The salted config hash to publish, or None when the run has no salt."""
    from fl_app.rundir import CONFIG_HASH_SALT, published_config_hash

    salt = manifest_run.get(CONFIG_HASH_SALT)
    if not isinstance(salt, str):
        return None
    try:
        return published_config_hash(config_hash, salt)
    except ValueError:
        raise ExportRefused(
            f"run.json: {CONFIG_HASH_SALT} is not 64 hex digits", _RUN_FIX
        ) from None


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value) or "n/a"
    return str(value)


def _table(rows: Mapping[str, Any], nested: bool = False) -> list[str]:
    """A two-column Markdown table of ``rows``.

    Dict values are skipped unless ``nested``, then flattened to ``key.sub`` rows: the
    Privacy table's dicts have sections of their own, but a DP section's dicts are
    part of the guarantee (distributed DP's epsilon against the server) and must not
    vanish from the Markdown card while the JSON card has them.
    """
    lines = ["| field | value |", "|---|---|"]
    for key, value in rows.items():
        if isinstance(value, dict) and nested:
            lines += _table({f"{key}.{k}": v for k, v in value.items()}, nested=True)[2:]
            continue
        if value is None or isinstance(value, dict):
            continue
        lines.append(f"| {key} | {_fmt(value).replace('|', '/')} |")
    return lines


def render_card_markdown(card: Mapping[str, Any]) -> str:
    """The Markdown form of a model card (the same content as its JSON)."""
    priv = card["privacy"]
    title = card.get("experiment_name") or "fl-app model"
    out = [f"# Model card: {title}", ""]
    release = card.get("release") or {}
    if release.get("for_release") is False:
        why = "; ".join(release.get("reasons") or [])
        out += [f"> **{str(release.get('status', '')).upper()}: {why}**", ""]
    if not priv["differential_privacy"]:
        out += [f"> **WARNING: {priv['guarantee']}**", ""]
    else:
        out += [f"> {priv['guarantee']}", ""]
    out += [f"Export tier: **{card['tier']}**.", ""]
    sections = [
        ("Task", card["task"]),
        ("Data", card["data"]),
        ("Model", card["model"]),
        ("Training", card["training"]),
        ("Evaluation", card["evaluation"]),
    ]
    for heading, rows in sections:
        out += [f"## {heading}", "", *_table(rows), ""]
    out += ["## Privacy", "", *_table(priv), ""]
    if priv.get("client_level"):
        out += ["### Client-level DP", "", *_table(priv["client_level"], nested=True), ""]
    if priv.get("record_level_dp"):
        out += [
            "### Record-level DP-SGD",
            "",
            *_table(priv["record_level_dp"], nested=True),
            "",
        ]
    out += ["## What is NOT protected", ""]
    out += [f"- {item}" for item in card["not_protected"]]
    out += ["", "## Reproducibility", "", *_table(card["reproducibility"]), ""]
    return "\n".join(out)


# ---- restricted-tier files --------------------------------------------------------


def _aggregate_metrics(records: list[dict[str, Any]], node_ids: set[str]) -> bytes:
    """metrics.jsonl reduced to per-round aggregate scalars.

    Kept: numbers, booleans and nulls under keys that name neither a node nor a
    partition. Dropped: per-client fields, lists, objects and free-text strings (a
    round's ``note`` can quote a protocol error).
    """
    lines = []
    for rec in records:
        out: dict[str, Any] = {}
        for key, value in rec.items():
            lowered = key.lower()
            if key in _PER_CLIENT_FIELDS or any(f in lowered for f in _CLIENT_KEY_FRAGMENTS):
                continue
            if any(n in key for n in node_ids):
                continue
            if value is None or isinstance(value, bool):
                out[key] = value
            elif isinstance(value, (int, float)):
                if isinstance(value, int) and str(value) in node_ids:
                    continue
                out[key] = value
        lines.append(json.dumps(out, sort_keys=True, allow_nan=False))
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _anonymous_ledger(ledger: Any) -> bytes:
    """The ledger with local-DP clients (and per-client cohort counts, keyed by node id)
    re-keyed ``client-1``, ``client-2``, ... ."""
    from dataclasses import replace

    def anonymous(counts: Any) -> tuple[tuple[str, int], ...]:
        ordered = sorted(counts, key=lambda kv: (-kv[1], kv[0]))
        return tuple((f"client-{i}", n) for i, (_, n) in enumerate(ordered, start=1))

    participation = anonymous(getattr(ledger, "participation", ()))
    out = replace(ledger, local=anonymous(ledger.local), participation=participation)
    return (out.to_json() + "\n").encode()


def _record_level_table(summary: Mapping[str, Any]) -> bytes:
    rl = summary["privacy"]["record_level"]
    fields = ("epsilon", "delta", "noise-multiplier", "sample-rate", "steps")
    rows = [
        {f.replace("-", "_"): m.get(f) for f in fields}
        for m in (rl.get("per_client") or {}).values()
        if isinstance(m, dict)
    ]
    rows.sort(key=lambda r: (-(r["epsilon"] or 0.0), -(r["steps"] or 0.0)))
    table = {
        "note": "each institution's record-level DP-SGD spend, by anonymous index "
        "(not a node or partition id)",
        "accountant": rl.get("accountant"),
        "institutions": [{"institution": i, **r} for i, r in enumerate(rows, start=1)],
    }
    return (json.dumps(table, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


# ---- writing ------------------------------------------------------------------------


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


def _leak_guard(outputs: Mapping[str, bytes], node_ids: set[str]) -> None:
    """Refuse to write output that mentions a node id (a bug here, never a user error)."""
    for name, data in outputs.items():
        for node in node_ids:
            if len(node) >= _MIN_GUARD_DIGITS and node.encode() in data:
                raise RuntimeError(
                    f"export bug: {name} would contain node id {node}; nothing was written"
                )


def _secret_guard(outputs: Mapping[str, bytes], config_hash: str, salt: Any) -> None:
    """Refuse output holding the unsalted config hash or the salt (an export bug)."""
    secrets = [config_hash, *([salt] if isinstance(salt, str) and salt else [])]
    for name, data in outputs.items():
        for secret in secrets:
            if secret[:16].encode() in data:
                raise RuntimeError(
                    f"export bug: {name} would contain the unsalted config hash or its "
                    "salt; nothing was written"
                )


def _jsonb(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


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
        A run directory written by :func:`fl_app.server_app.run_experiment`.
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
        When the run must not be exported (see the module docstring); nothing is
        written then.
    ValueError
        For an unknown ``tier``.
    """
    from fl_app.audit import AuditError, AuditLog
    from fl_app.privacy.noise import release_status
    from fl_app.rundir import CONFIG_HASH_SALT, code_version
    from fl_app.weights import load_safetensors, save_safetensors, weights_digest

    try:
        tier = Tier(tier)
    except ValueError:
        raise ValueError(f"tier is {tier!r}; use 'public' or 'restricted'") from None
    src = Path(run_dir)
    dst = Path(out_dir)
    if not src.is_dir():
        raise ExportRefused(f"run directory {src} does not exist", "pass a run directory")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ExportRefused(
            f"--out {dst} lies inside the run directory", "export to a directory outside the run"
        )

    manifest_run = _json_object(_read(src, "run.json"), "run.json", _RUN_FIX)
    summary_data = _read(src, "summary.json")
    reason = None
    if summary_data is not None and manifest_run.get("status") not in _RELEASABLE:
        # The summary says why the run failed; quote it in the refusal when it parses.
        try:
            reason = json.loads(summary_data).get("status_reason")
        except (ValueError, AttributeError):
            reason = None
    _check_status(manifest_run.get("status"), "run.json", reason)
    summary = _json_object(summary_data, "summary.json", _SUMMARY_FIX)
    _check_summary(summary)
    if manifest_run.get("config_hash") != summary["config_hash"]:
        raise ExportRefused(
            f"run.json names config {str(manifest_run.get('config_hash'))[:16]}…, summary.json "
            f"{summary['config_hash'][:16]}…",
            "the two files come from different runs: restore both from the same run directory",
        )
    cfg = _load_config(_read(src, "config.yaml"), summary)
    model_bytes = _read(src, MODEL_FILE)
    audited = _audited_hashes(src, summary)
    arrays, n_params = _load_model(model_bytes, summary, cfg, audited)
    ledger_data = _read(src, LEDGER_FILE)
    evidence = _check_privacy(cfg, summary, ledger_data, audited)
    metrics = _parse_metrics(_read(src, "metrics.jsonl"))
    _check_trained(metrics)
    has_audit, anchor = _check_audit(src, summary, summary["model_sha256"], evidence.ledger_sha256)
    node_ids = _node_ids(
        metrics, summary, ledger_data.decode("utf-8", "replace") if ledger_data else None
    )

    warnings: list[str] = []
    if not (evidence.client_level or evidence.record_level):
        warnings.append(
            "this model carries NO differential-privacy guarantee (privacy=none, "
            "record_level=false); its card says so"
            + (
                ", and a public export of it is a plain model release"
                if tier is Tier.public
                else ""
            )
        )
    release = release_status(cfg)
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
    published_hash = _published_hash(manifest_run, summary["config_hash"])

    exporter_version = code_version()
    card = _build_card(cfg, summary, evidence, tier, n_params, exporter_version, published_hash)
    outputs: dict[str, bytes] = {
        CARD_JSON: _jsonb(card),
        CARD_MD: render_card_markdown(card).encode(),
    }
    if tier is Tier.restricted:
        outputs[METRICS_FILE] = _aggregate_metrics(metrics, node_ids)
        if evidence.ledger is not None:
            outputs[LEDGER_FILE] = _anonymous_ledger(evidence.ledger)
        if evidence.record_level:
            outputs[RECORD_LEVEL_FILE] = _record_level_table(summary)
    _leak_guard(outputs, node_ids)
    _secret_guard(outputs, summary["config_hash"], manifest_run.get(CONFIG_HASH_SALT))

    # Open (verify + lock) the audit log before touching --out, so a log that cannot take
    # the export record stops the export before any file is replaced or written.
    audit = None
    if has_audit:
        head, seq = anchor if anchor is not None else (None, None)
        try:
            audit = AuditLog(src / AUDIT_FILE, expected_head=head, expected_seq=seq)
        except AuditError as err:
            raise ExportRefused(
                f"{AUDIT_FILE} cannot take the export record ({err})",
                "wait until no other process writes the run's audit log, then export again",
            ) from None
    try:
        _prepare_out_dir(dst, overwrite)
        dst.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": "fl-app-export",
            "tier": tier.value,
            "config_hash": published_hash or "withheld",
            "code_version": summary["code_version"],
            "rounds": str(summary["rounds"]),
            "weights_sha256": summary["weights_sha256"],
        }
        files = {MODEL_FILE: save_safetensors(dst / MODEL_FILE, arrays, meta)}
        reloaded, _ = load_safetensors(dst / MODEL_FILE)
        if weights_digest(reloaded) != summary["weights_sha256"]:  # pragma: no cover
            raise RuntimeError("export bug: the re-saved weights differ from the released ones")
        for name, data in outputs.items():
            write_atomic(dst / name, data)
            files[name] = _sha256(data)
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
        files[MANIFEST] = _sha256(manifest_bytes)
        audit_seq = None
        if audit is not None:
            record = audit.append("model.export", {"tier": tier.value, "files": dict(files)})
            audit_seq = record.seq
    finally:
        if audit is not None:
            audit.close()
    return ExportResult(
        out_dir=dst,
        tier=tier,
        files=dict(sorted(files.items())),
        card=card,
        warnings=tuple(warnings),
        audit_seq=audit_seq,
    )


# ---- command line -------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-app export",
        description="Export a completed run's DP-released model with its model card.",
    )
    parser.add_argument("run_dir", help="the run directory (holds summary.json)")
    parser.add_argument(
        "--tier",
        required=True,
        choices=[t.value for t in Tier],
        help="public: weights + model card; restricted: adds per-round aggregates and the ledger",
    )
    parser.add_argument("--out", required=True, help="export directory (new or empty)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier export in --out"
    )
    return parser


def export_main(argv: list[str] | None = None) -> int:
    """``fl-app export <run dir> --tier public|restricted --out DIR [--overwrite]``.

    Exit status: 0 exported, 1 refused (the reason and the fix are printed), 2 usage error.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help is 0, usage errors are 2
        return exc.code if isinstance(exc.code, int) else 2
    try:
        result = export_run(args.run_dir, args.tier, args.out, overwrite=args.overwrite)
    except ExportRefused as err:
        print(f"fl-app export: refused: {err.reason}", file=sys.stderr)
        print(f"  fix: {err.fix}", file=sys.stderr)
        return 1
    for line in result.warnings:
        print(f"fl-app export: WARNING: {line}", file=sys.stderr)
    priv = result.card["privacy"]
    if priv["client_level"]:
        cl = priv["client_level"]
        claim = (
            f"client-level epsilon {cl['epsilon']:.4g} (delta {cl['delta']:g}, {cl['accountant']})"
        )
    elif priv["record_level_dp"]:
        rl = priv["record_level_dp"]
        claim = f"record-level epsilon max {rl['epsilon_max']:.4g} (delta {rl['delta']:g})"
    else:
        claim = "NO differential privacy"
    if priv["client_level"] and priv["record_level_dp"]:
        claim += f"; record-level epsilon max {priv['record_level_dp']['epsilon_max']:.4g}"
    acc = result.card["evaluation"]["test_accuracy"]
    print(
        f"exported {args.run_dir} ({result.tier.value} tier) to {result.out_dir}: {claim}; "
        f"test accuracy {_fmt(acc)}"
    )
    for name, digest in result.files.items():
        print(f"  {name}  sha256 {digest}")
    if result.audit_seq is not None:
        print(f"  audit: model.export recorded at seq {result.audit_seq}")
    return 0

"""Server checkpoints, resume and rollback.

Every round the server writes one checkpoint into the run directory: its files after
the round's train stage and *before* the new model first leaves the server (federated
evaluation, the next round's instructions; :class:`strategies.driver.RoundDriver`
``release_hooks``), its manifest when the round has ended (after the round's metrics
and audit records)::

    checkpoints/round-0003/
        model.safetensors            the global model after round 3
        strategy_state.safetensors   the wrapped Flower strategy's numpy state
                                     (FedAdam: m_t/, v_t/, current_arrays/ + name)
        privacy_ledger.json          the client-level ledger at that point (DP runs)
        server_state.json            round, config hash, run key, seed, code version,
                                     RNG scheme, the aggregator's state (adaptive
                                     clip, release offset, noise generation), the
                                     DP-SGD steps the server has seen per node
        audit_head.sig.json          with audit_signing_key: that (seq, head), signed
        manifest.json                written last: {file: sha256}, round, config hash,
                                     audit {seq, head}

A checkpoint is complete when its ``manifest.json`` exists (written atomically, last);
a directory without one is an interrupted write and is ignored. A manifest whose files
do not hash to what it lists is refused (:class:`CheckpointError`), never skipped.
Before the manifest is written a ``checkpoint.saved`` audit record (round, file
hashes) is appended, and the manifest carries the log's ``(seq, head)`` after it: the
anchor that :func:`fl_app.audit.verify` checks (``fl-app audit verify --head --seq``).

RNG state: with ``privacy.secure_mode=true`` (the default) noise and sampling come from
keystreams under keys drawn from ``os.urandom`` by the process that uses them (never
saved: a resumed server samples under a new key, and CSPRNG noise is never
reproduced); with ``secure_mode=false`` every random draw of the server is derived
from ``(seed, round, stream)`` (samplers, seeded DP noise) and every client's from
``(seed, round, partition)``. Either way there is no generator state to save:
``server_state.json`` records the scheme and the seed.

Resume and rollback from these checkpoints: :mod:`fl_app.server.resume`.

``checkpoint.keep`` keeps only the newest K complete checkpoints (0 keeps all).
No pickle anywhere: safetensors and JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fl_app.atomic import write_atomic
from fl_app.config.schema import AppConfig
from fl_app.server.layout import (
    AUDIT_FILE,
    CHECKPOINT_DIR_PATTERN,
    CHECKPOINT_MANIFEST,
    CHECKPOINTS_DIR,
    LEDGER_FILE,
    MODEL_FILE,
    SERVER_STATE_FILE,
    SIGNED_HEAD_FILE,
    STRATEGY_FILE,
    RunLayout,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "restore_strategy_state",
    "run_config_hash",
    "seal_checkpoint",
    "strategy_state",
    "write_checkpoint_files",
]

log = logging.getLogger("fl_app.server.checkpoint")

FORMAT_VERSION = 1
_REQUIRED = frozenset({MODEL_FILE, STRATEGY_FILE, SERVER_STATE_FILE})
_ALLOWED = _REQUIRED | {LEDGER_FILE}
_MANIFEST_KEYS = frozenset({"format", "round", "config_hash", "files", "audit", "created_at"})


class CheckpointError(RuntimeError):
    """A checkpoint (or the run directory around it) cannot be used; says why and the fix."""


def run_config_hash(cfg: AppConfig) -> str:
    """The run's config hash (:func:`fl_app.config.compose.run_config_hash`: ``resume``,
    ``rollback_to`` and ``audit_signing_key`` say how to run, not what)."""
    from fl_app.config.compose import run_config_hash as _run_config_hash

    return _run_config_hash(cfg)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _round_dir(run_dir: Path, rnd: int) -> Path:
    return RunLayout(run_dir).checkpoint(rnd)


# ---- the wrapped strategy's state ------------------------------------------------


def strategy_state(strategy: object) -> dict[str, np.ndarray]:
    """Every ``dict[str, ndarray]`` attribute of a Flower strategy, as ``attr/name``.

    Generic on purpose: FedAdam/FedYogi/FedAdagrad keep ``m_t``, ``v_t`` and
    ``current_arrays`` this way; FedAvg and FedProx have none (empty result).
    """
    out: dict[str, np.ndarray] = {}
    for attr, value in sorted(vars(strategy).items()):
        if (
            isinstance(value, dict)
            and value
            and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items())
        ):
            for key, arr in value.items():
                out[f"{attr}/{key}"] = arr
    return out


def in_model_order(
    arrays: Mapping[str, np.ndarray], template: Mapping[str, np.ndarray], what: str
) -> dict[str, np.ndarray]:
    """``arrays`` in ``template``'s key order (safetensors sorts names; clients and
    strategies pair arrays by position), checked for the same names and shapes."""
    if set(arrays) != set(template):
        raise CheckpointError(
            f"{what}: array names {sorted(arrays)} differ from the model's {sorted(template)}"
        )
    for k, v in template.items():
        if np.shape(arrays[k]) != np.shape(v):
            raise CheckpointError(
                f"{what}: {k!r} has shape {np.shape(arrays[k])}, the model {np.shape(v)}"
            )
    return {k: np.array(arrays[k]) for k in template}


def restore_strategy_state(
    strategy: object, arrays: Mapping[str, np.ndarray], template: Mapping[str, np.ndarray]
) -> None:
    """Set the attributes :func:`strategy_state` saved back on ``strategy`` (each dict
    in ``template``'s key order when it holds the model's names)."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in arrays.items():
        attr, sep, key = name.partition("/")
        if not sep or not key:
            raise CheckpointError(f"strategy state entry {name!r} is not 'attribute/name'")
        grouped.setdefault(attr, {})[key] = np.array(arr)
    for attr, value in grouped.items():
        if set(value) == set(template):
            value = in_model_order(value, template, f"strategy state {attr!r}")
        current = getattr(strategy, attr, _MISSING)
        if current is _MISSING or not (current is None or isinstance(current, dict)):
            raise CheckpointError(
                f"the checkpoint holds strategy state {attr!r}, which "
                f"{type(strategy).__name__} does not keep: the strategy differs from the run's"
            )
        setattr(strategy, attr, value)


_MISSING = object()


# ---- writing ---------------------------------------------------------------------


def write_checkpoint_files(
    run_dir: str | os.PathLike[str],
    *,
    rnd: int,
    arrays: Mapping[str, np.ndarray],
    strategy_arrays: Mapping[str, np.ndarray],
    ledger_json: str | None,
    server_state: Mapping[str, Any],
    config_hash: str,
) -> dict[str, str]:
    """Write round ``rnd``'s checkpoint files (no manifest yet); return their SHA-256.

    Called before the round's model leaves the server; :func:`seal_checkpoint` makes
    the checkpoint complete once the round has ended. A leftover directory without a
    manifest (an interrupted round) is replaced; a complete checkpoint is never
    overwritten.
    """
    from fl_app.weights import save_safetensors

    directory = _round_dir(Path(run_dir), rnd)
    if (directory / CHECKPOINT_MANIFEST).exists():
        raise CheckpointError(
            f"{directory} already holds a complete checkpoint; checkpoints are never "
            "overwritten (a rollback renames the abandoned ones first)"
        )
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    meta = {"config_hash": config_hash, "round": str(rnd)}
    files = {
        MODEL_FILE: save_safetensors(directory / MODEL_FILE, arrays, meta),
        STRATEGY_FILE: save_safetensors(directory / STRATEGY_FILE, strategy_arrays, meta),
    }
    blobs = {SERVER_STATE_FILE: json.dumps(dict(server_state), indent=1, sort_keys=True) + "\n"}
    if ledger_json is not None:
        blobs[LEDGER_FILE] = ledger_json + "\n"
    for name, text in blobs.items():
        data = text.encode()
        write_atomic(directory / name, data)
        files[name] = _sha256(data)
    return dict(sorted(files.items()))


def seal_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    rnd: int,
    files: Mapping[str, str],
    config_hash: str,
    audit: Any,
    signing_key: Any = None,
) -> dict[str, Any]:
    """Complete round ``rnd``'s checkpoint; return its manifest.

    Appends a ``checkpoint.saved`` record to ``audit`` (an
    :class:`fl_app.audit.AuditLog`), then writes the manifest with the log's
    ``(seq, head)`` after it, atomically and last. With ``signing_key`` (Ed25519) the
    same ``(seq, head)`` is signed into ``audit_head.sig.json`` beside it, first.
    """
    directory = _round_dir(Path(run_dir), rnd)
    files = dict(sorted(files.items()))
    audit.append("checkpoint.saved", {"round": rnd, "files": files})
    if signing_key is not None:
        from fl_app.audit import sign_head

        signed = sign_head(signing_key, audit.head, audit.seq)
        write_atomic(
            directory / SIGNED_HEAD_FILE,
            (json.dumps(signed, sort_keys=True, indent=2) + "\n").encode(),
        )
    manifest = {
        "format": FORMAT_VERSION,
        "round": rnd,
        "config_hash": config_hash,
        "files": files,
        "audit": {"file": AUDIT_FILE, "seq": audit.seq, "head": audit.head},
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    write_atomic(directory / CHECKPOINT_MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints (a manifest exists), oldest first; incomplete ones are logged."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        m = CHECKPOINT_DIR_PATTERN.fullmatch(child.name)
        if m is None or not child.is_dir():
            continue
        if (child / CHECKPOINT_MANIFEST).is_file():
            out.append((int(m.group(1)), child))
        else:
            log.warning("checkpoint %s has no manifest (interrupted write): ignored", child)
    return sorted(out)


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int) -> list[int]:
    """Delete all but the newest ``keep`` complete checkpoints (0: keep all)."""
    if keep <= 0:
        return []
    doomed = list_checkpoints(run_dir)[:-keep]
    for _, path in doomed:
        shutil.rmtree(path)
    return [r for r, _ in doomed]


# ---- reading ---------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """One verified checkpoint (every file matched its manifest hash)."""

    path: Path
    round: int
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]
    strategy_arrays: dict[str, np.ndarray]
    server_state: dict[str, Any]
    ledger_json: str | None

    @property
    def audit_anchor(self) -> tuple[int, str]:
        return int(self.manifest["audit"]["seq"]), str(self.manifest["audit"]["head"])


def read_manifest(directory: Path) -> dict[str, Any]:
    """A checkpoint's manifest, checked for shape (not the files' hashes)."""
    fix = "restore the checkpoint from a backup, or roll back to an earlier one"
    try:
        manifest = json.loads((directory / CHECKPOINT_MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{directory / CHECKPOINT_MANIFEST}: unreadable ({err}); {fix}"
        ) from None
    m = CHECKPOINT_DIR_PATTERN.fullmatch(directory.name)
    if (
        not isinstance(manifest, dict)
        or set(manifest) != _MANIFEST_KEYS
        or manifest["format"] != FORMAT_VERSION
        or m is None
        or manifest["round"] != int(m.group(1))
        or not isinstance(manifest["files"], dict)
        or not _REQUIRED <= set(manifest["files"]) <= _ALLOWED
        or not isinstance(manifest["audit"], dict)
        or not isinstance(manifest["audit"].get("seq"), int)
        or not isinstance(manifest["audit"].get("head"), str)
    ):
        raise CheckpointError(
            f"{directory / CHECKPOINT_MANIFEST}: not a valid checkpoint manifest; {fix}"
        )
    return manifest


def load_checkpoint(directory: str | os.PathLike[str]) -> Checkpoint:
    """Read and verify one checkpoint directory (every file against the manifest)."""
    from fl_app.weights import load_safetensors

    path = Path(directory)
    manifest = read_manifest(path)
    blobs: dict[str, bytes] = {}
    for name, expected in manifest["files"].items():
        try:
            data = (path / name).read_bytes()
        except OSError as err:
            raise CheckpointError(f"{path / name}: missing or unreadable ({err})") from None
        found = _sha256(data)
        if found != expected:
            raise CheckpointError(
                f"{path / name} has SHA-256 {found[:16]}…, but the manifest lists "
                f"{str(expected)[:16]}…: the checkpoint was modified; refusing to resume "
                "from it (restore it, or roll back to an earlier checkpoint)"
            )
        blobs[name] = data
    arrays, _ = load_safetensors(path / MODEL_FILE)
    strategy_arrays, _ = load_safetensors(path / STRATEGY_FILE)
    state = json.loads(blobs[SERVER_STATE_FILE])
    if state.get("round") != manifest["round"]:
        raise CheckpointError(f"{path}: server_state round differs from the manifest's")
    ledger = blobs.get(LEDGER_FILE)
    return Checkpoint(
        path=path,
        round=int(manifest["round"]),
        manifest=manifest,
        arrays=arrays,
        strategy_arrays=strategy_arrays,
        server_state=state,
        ledger_json=ledger.decode() if ledger is not None else None,
    )


# ---- resume ----------------------------------------------------------------------

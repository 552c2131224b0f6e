"""Resume and rollback: choose and verify the checkpoint a run continues from.

Resume (``resume=<run dir>``) continues the same run directory from its newest
complete checkpoint; ``rollback_to=<r>`` from round ``r``'s. In both cases:

* the config must equal the one the run was started with (its hash, ``resume`` and
  ``rollback_to`` excluded); a difference is refused naming the first differing field;
* the privacy ledger restored is the *latest* ``privacy_ledger.json`` of the run
  directory, not the checkpoint's: it was written before each round's instructions
  were sent, so it may count an interrupted round, whose ε stays spent. The
  checkpoint's ledger must be a prefix of it (else the ledger was rewound: refused);
* the ledger is append-only, so a round redone after a crash or a rollback is a new
  release: the ledger's event ``round`` is a *release index*, ``server round +
  release_offset``, and the offset is the number of releases counted beyond the
  checkpoint's round (:meth:`strategies.dp_aggregators.AccountedDp.restore_state`). ε after
  a resume is therefore never below an uninterrupted run's, and equal when no round
  was interrupted;
* seeded central DP noise is keyed by the server round, so a resumed run redoes an
  interrupted round with the same noise (identical final weights under fixed seeds).
  That is safe only if the interrupted round's model never left the server: when its
  checkpoint files exist (written just before the model is first sent) but its
  manifest does not, it may have, and the redo starts a new noise generation (fresh
  noise), as does a rollback (the rounds it redoes were released). Re-using noise on
  a different sum would let the difference of two releases cancel it;
* the audit log is reopened and verified against the newest checkpoint's anchor; a
  torn last line left by a kill is removed first by
  :func:`fl_app.audit.truncate_torn_tail`, which records an ``audit.repair`` event;
  then ``run.resume`` is appended;
* the run key is reused, so record-level DP-SGD clients find their own privacy state
  files (``client-state/``) and continue their accounting (those files are written
  before training, so an interrupted round is over-counted, never under-counted);
* metrics lines of rounds after the checkpoint (and a torn last line) move to
  ``metrics.abandoned.jsonl``; after a rollback the abandoned checkpoints are renamed
  ``round-NNNN.rolledback-K`` (kept as evidence, never loaded).

The checkpoints themselves (layout, sealing, verification): :mod:`fl_app.server.checkpoint`;
:func:`fl_app.server.session.open_run` acts on the :class:`ResumePlan`
(docs/architecture.md, "Server").
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_app.config.errors import ConfigError
from fl_app.config.schema import AppConfig
from fl_app.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_manifest,
    run_config_hash,
)
from fl_app.server.layout import (
    AUDIT_FILE,
    CHECKPOINT_MANIFEST,
    CONFIG_FILE,
    LEDGER_FILE,
    RUN_MANIFEST_FILE,
    RunLayout,
)

__all__ = ["ResumePlan", "check_resume", "plan_resume", "set_aside_abandoned"]


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                return where
            found = _first_difference(a[key], b[key], where)
            if found is not None:
                return found
        return None
    return None if a == b else (prefix or "<config>")


def check_resume(cfg: AppConfig) -> Path:
    """The run directory ``cfg.resume`` names, checked against ``cfg``.

    Raises
    ------
    ConfigError
        When the directory is not a run directory, or its config differs from ``cfg``
        (naming the first differing field).
    """
    import yaml

    from fl_app.config.compose import config_to_dict

    assert cfg.resume is not None
    run_dir = Path(cfg.resume)
    manifest_path = run_dir / RUN_MANIFEST_FILE
    if not manifest_path.is_file():
        raise ConfigError(
            "resume",
            cfg.resume,
            "is not a run directory (no run.json); give the directory of the run to continue",
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        recorded = str(manifest["config_hash"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError("resume", cfg.resume, f"its run.json is unreadable ({err})") from None
    if recorded == run_config_hash(cfg):
        return run_dir
    ours = config_to_dict(dataclasses.replace(cfg, resume=None, rollback_to=None))
    field = None
    theirs: Any = None
    try:
        theirs = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
        field = _first_difference(theirs, ours)
    except (OSError, yaml.YAMLError):
        pass
    found = (
        f"{field}: run has {_lookup(theirs, field)!r}, now {_lookup(ours, field)!r}"
        if field
        else f"config hash {run_config_hash(cfg)[:16]}… != run's {recorded[:16]}…"
    )
    raise ConfigError(
        field or "resume",
        found,
        "a resumed run must use the config it started with (resume and rollback_to aside); "
        "pass the same overrides, or start a new run",
    )


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return "<absent>"
        tree = tree[part]
    return tree


@dataclass
class ResumePlan:
    """What a resumed run starts from (see the module docstring)."""

    run_dir: Path
    checkpoint: Checkpoint
    run_manifest: dict[str, Any]
    # The latest privacy_ledger.json of the run directory (None: no client-level DP).
    ledger_json: str | None
    # Anchor of the newest complete checkpoint, which the audit log must contain.
    audit_anchor: tuple[int, str]
    # Rounds of complete checkpoints after the one resumed from (rolled back).
    abandoned: list[int]
    # The next round's checkpoint files exist without a manifest: that round's model
    # may have left the server before the run stopped, so its redo needs fresh noise.
    released_unfinished: bool = False

    @property
    def round(self) -> int:
        return self.checkpoint.round

    @property
    def rollback(self) -> bool:
        return bool(self.abandoned)

    @property
    def fresh_noise(self) -> bool:
        """Whether rounds to redo were (possibly) released: redo them with new noise."""
        return self.rollback or self.released_unfinished


def _check_ledger_against_audit(run_dir: Path, ledger: Any, disk: Path) -> None:
    """Refuse a ledger holding less spend than the audit log recorded before a round's
    instructions went out (``ledger.spend``, :meth:`fl_app.server.rundir.AuditTrail.ledger_spend`).

    The checkpoint comparison alone cannot see the interrupted round: its event is in
    the ledger but in no checkpoint, so deleting it would let the resumed run
    under-count ε. The audit log's chain is verified when the run reopens it.
    """
    path = run_dir / AUDIT_FILE
    if not path.is_file():
        return
    last: dict[str, Any] | None = None
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line; the reopen repairs and records it
        if isinstance(rec, dict) and rec.get("event") == "ledger.spend":
            last = rec.get("data")
    if not isinstance(last, dict):
        return
    events = len(ledger.events)
    releases = sum(n for _, n in ledger.local)
    want_events = int(last.get("events", 0))
    want_releases = int(last.get("local_releases", 0))
    if events < want_events or releases < want_releases:
        raise CheckpointError(
            f"{disk} holds {events} rounds and {releases} local releases, but the audit log "
            f"recorded {want_events} rounds and {want_releases} releases spent before round "
            f"{last.get('round')}'s instructions went out: the ledger lost spend; refusing "
            "to under-count epsilon (restore the ledger file the run wrote)"
        )


def _latest_ledger(run_dir: Path, ck: Checkpoint) -> str | None:
    """The run directory's latest ``privacy_ledger.json`` (None: no client-level DP),
    refused unless it extends the checkpoint's ledger and holds every spend the audit
    log recorded (the ε already spent is never under-counted)."""
    from fl_app.privacy.ledger import FederationLedger, LedgerError

    if ck.ledger_json is None:
        return None
    disk = run_dir / LEDGER_FILE
    if not disk.is_file():
        raise CheckpointError(
            f"{disk} is missing: the privacy already spent is unknown; refusing to resume "
            "(restore the ledger file)"
        )
    ledger_json = disk.read_text()
    try:
        latest = FederationLedger.from_json(ledger_json)
        saved = FederationLedger.from_json(ck.ledger_json)
    except LedgerError as err:
        raise CheckpointError(f"privacy ledger unreadable: {err}") from None
    counts = dict(latest.local)
    if (
        (saved.delta, saved.accountant) != (latest.delta, latest.accountant)
        or latest.events[: len(saved.events)] != saved.events
        or any(counts.get(k, 0) < n for k, n in saved.local)
    ):
        raise CheckpointError(
            f"{disk} does not extend the checkpoint's ledger (it was rewound or "
            "replaced); refusing to under-count epsilon"
        )
    _check_ledger_against_audit(run_dir, latest, disk)
    return ledger_json


def plan_resume(cfg: AppConfig) -> ResumePlan:
    """Choose and verify the checkpoint ``cfg.resume`` / ``cfg.rollback_to`` ask for."""
    run_dir = check_resume(cfg)
    manifest = json.loads((run_dir / RUN_MANIFEST_FILE).read_text())
    if manifest.get("status") in ("completed", "degraded") and cfg.rollback_to is None:
        raise CheckpointError(
            f"run {run_dir} already completed; nothing to resume (rollback_to=<round> redoes "
            "rounds after a checkpoint)"
        )
    available = list_checkpoints(run_dir)
    if not available:
        raise CheckpointError(
            f"run {run_dir} has no complete checkpoint (no checkpoints/round-*/manifest.json); "
            "start a new run"
        )
    newest = available[-1][1]
    if cfg.rollback_to is not None:
        chosen = dict(available).get(cfg.rollback_to)
        if chosen is None:
            raise CheckpointError(
                f"rollback_to={cfg.rollback_to}: no complete checkpoint of that round in "
                f"{run_dir} (available: {[r for r, _ in available]})"
            )
    else:
        chosen = newest
    ck = load_checkpoint(chosen)
    anchor_manifest = ck.manifest if chosen == newest else read_manifest(newest)
    anchor = (int(anchor_manifest["audit"]["seq"]), str(anchor_manifest["audit"]["head"]))
    if ck.manifest["config_hash"] != manifest["config_hash"]:
        raise CheckpointError(f"{ck.path}: written under another config hash than run.json's")
    if ck.server_state.get("run_key") != manifest.get("run_key"):
        raise CheckpointError(f"{ck.path}: its run key differs from run.json's")
    following = RunLayout(run_dir).checkpoint(ck.round + 1)
    return ResumePlan(
        run_dir=run_dir,
        checkpoint=ck,
        run_manifest=manifest,
        ledger_json=_latest_ledger(run_dir, ck),
        audit_anchor=anchor,
        abandoned=[r for r, _ in available if r > ck.round],
        released_unfinished=following.is_dir() and not (following / CHECKPOINT_MANIFEST).exists(),
    )


def set_aside_abandoned(run_dir: Path, rounds: list[int], generation: int) -> None:
    """Rename the checkpoints a rollback abandons (kept as evidence, never loaded)."""
    for rnd in rounds:
        src = RunLayout(run_dir).checkpoint(rnd)
        src.rename(src.with_name(f"{src.name}.rolledback-{generation}"))

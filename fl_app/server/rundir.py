"""What a run leaves in its directory, written as the run goes.

The files and their names are :mod:`fl_app.server.layout`'s; this module writes the
manifest (``run.json``), the config, the per-round metrics, the final model and
summary, and the server's hash-chained audit trail, and says what a run achieved
(:func:`run_outcome`).

A resumed run (``resume=<run dir>``) writes into the same directory:
:meth:`RunDirectory.resume` keeps ``config.yaml``, appends to ``metrics.jsonl`` (after
moving lines of rounds past the checkpoint to ``metrics.abandoned.jsonl``) and records
the resume in ``run.json``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fl_app.atomic import write_atomic
from fl_app.config.compose import config_to_dict
from fl_app.config.schema import AppConfig
from fl_app.server.checkpoint import run_config_hash
from fl_app.server.layout import (
    AUDIT_FILE,
    METRICS_FILE,
    SIGNED_HEAD_FILE,
    RunLayout,
)
from strategies.driver_types import RoundReport

__all__ = [
    "MetricsWriter",
    "RunDirectory",
    "code_version",
    "published_config_hash",
    "read_round_records",
    "run_outcome",
]

# A run's status in summary.json and run.json (and the audit log's run.end):
# ``completed``: every round that sampled clients updated the model;
# ``degraded``: some rounds that sampled clients left the model unchanged (lost rounds);
# ``failed``: no round updated the model (the model is the initial one), or the run crashed.
STATUS_COMPLETED = "completed"
STATUS_DEGRADED = "degraded"
STATUS_FAILED = "failed"
# A sweep job refused before it trained (``fl-app simulate -m``); nothing ran.
STATUS_REFUSED = "refused"


def read_round_records(path: Path) -> list[dict[str, Any]]:
    """The complete per-round records of ``metrics.jsonl`` (a torn last line is skipped)."""
    records: list[dict[str, Any]] = []
    if not path.is_file():
        return records
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "round" in rec:
            records.append(rec)
    return records


def _top_reasons(reasons: Sequence[str], limit: int = 3) -> str:
    """The most frequent reasons, grouped when they differ only in numbers (norms, ids)."""
    groups: dict[str, list[str]] = {}
    for reason in reasons:
        groups.setdefault(re.sub(r"\d+(?:\.\d+)?", "#", reason), []).append(reason)
    ranked = sorted(groups.values(), key=lambda g: (-len(g), g[0]))
    shown = "; ".join(f"{g[0]!r} x{len(g)}" for g in ranked[:limit])
    more = len(ranked) - limit
    return shown + (f"; and {more} other reason(s)" if more > 0 else "")


def run_outcome(records: Sequence[Mapping[str, Any]], stopped_early: str | None) -> dict[str, Any]:
    """What a run achieved, from its per-round records (``metrics.jsonl``, resumed rounds included).

    A run whose rounds all left the model unchanged released the initial (random) model:
    it must not read as a success, so it is ``failed`` with the clients' own reasons
    (every client refused for budget, every client's data failed to load, ...). A run that
    lost some rounds is ``degraded``. Rounds whose sampled cohort was empty (Poisson
    sampling drawing nobody: part of the accounted mechanism) and rounds every sampled
    client refused for its privacy budget are not counted as lost.

    Returns ``status``, ``status_reason`` (``None`` when completed), ``rounds_run``,
    ``rounds_model_updated`` and ``rounds_lost``.
    """
    updated = sum(bool(r.get("model_updated")) for r in records)
    # A round every sampled client refused for its privacy budget is the budget doing
    # its job (the run stops after it), not a lost round.
    lost = [
        r
        for r in records
        if not r.get("model_updated")
        and int(r.get("clients_sampled", 0)) > 0
        and int(r.get("clients_budget_exhausted", 0)) < int(r.get("clients_sampled", 0))
    ]
    out: dict[str, Any] = {
        "rounds_run": len(records),
        "rounds_model_updated": updated,
        "rounds_lost": len(lost),
    }
    if updated == 0:
        failures = [str(i.get("reason", "?")) for r in records for i in r.get("failures") or []]
        rejections = [str(i.get("reason", "?")) for r in records for i in r.get("rejections") or []]
        notes = [str(r["note"]) for r in records if r.get("note")]
        parts = [f"no round updated the model ({len(records)} rounds run)"]
        if stopped_early:
            parts.append(f"stopped: {stopped_early}")
        if failures:
            parts.append(f"client failures: {_top_reasons(failures)}")
        if rejections:
            parts.append(f"rejected replies: {_top_reasons(rejections)}")
        if notes and not (failures or rejections):
            parts.append(f"rounds: {_top_reasons(notes)}")
        out.update(status=STATUS_FAILED, status_reason="; ".join(parts))
    elif lost:
        out.update(
            status=STATUS_DEGRADED,
            status_reason=(
                f"{len(lost)} of {len(records)} rounds left the model unchanged (rounds "
                + ", ".join(str(r["round"]) for r in lost[:10])
                + (", ..." if len(lost) > 10 else "")
                + f"); see {METRICS_FILE}"
            ),
        )
    else:
        out.update(status=STATUS_COMPLETED, status_reason=None)
    return out


# run.json key of the per-run secret that keys the published config hash.
CONFIG_HASH_SALT = "config_hash_salt"


def published_config_hash(config_hash: str, salt_hex: str) -> str:
    """The config hash a model card and export manifest publish: HMAC-SHA256 of the
    run's config hash under the run's secret salt (``run.json``).

    The plain SHA-256 of the config is a test for guesses: with the rest of the config
    on the card, anyone could try seeds until one hashes to it (done in under a minute
    by a review), then regenerate seeded noise. Keyed by 256 secret bits, the published
    value matches no guessed config, while the run's holder can still show which
    config produced a model (config.yaml + run.json recompute it).
    """
    salt = bytes.fromhex(salt_hex)
    if len(salt) != 32:
        raise ValueError(f"{CONFIG_HASH_SALT} must be 32 bytes (64 hex digits)")
    msg = b"fl-app published config hash v1\x00" + config_hash.encode()
    return hmac.new(salt, msg, hashlib.sha256).hexdigest()


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("fl-app")
    except PackageNotFoundError:
        ver = "0+unknown"
    src = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{ver}+g{commit}" if commit else ver


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n").encode())


class RunDirectory:
    """The run directory of one experiment (Hydra's output dir in simulation)."""

    def __init__(self, path: str | os.PathLike[str], cfg: AppConfig) -> None:
        self.path = Path(path)
        self.layout = RunLayout(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.config_hash = run_config_hash(cfg)
        self.started = time.time()
        self.manifest: dict[str, Any] = {
            "config_hash": self.config_hash,
            "seed": cfg.seed,
            "code_version": code_version(),
            "python": sys.version.split()[0],
            "started_at": datetime.now(timezone.utc).isoformat(),
            "status": "running",
            # Secret: keys the published config hash (kept by resume; never exported).
            CONFIG_HASH_SALT: os.urandom(32).hex(),
        }

    @property
    def metrics_path(self) -> Path:
        return self.layout.metrics

    @property
    def summary_path(self) -> Path:
        return self.layout.summary

    @property
    def model_path(self) -> Path:
        return self.layout.model

    def start(self) -> None:
        self.layout.config.write_text(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
        self.metrics_path.write_text("")
        _write_json_atomic(self.layout.run_manifest, self.manifest)

    def resume(self, previous: Mapping[str, Any], from_round: int, rollback: bool) -> None:
        """Continue this directory's run after ``from_round`` (see the module doc).

        ``previous`` is the run's ``run.json``: its start time, run key and history are
        kept; the status goes back to ``running``.
        """
        kept: list[str] = []
        dropped: list[str] = []
        if self.metrics_path.is_file():
            for line in self.metrics_path.read_text().splitlines(keepends=True):
                try:
                    ok = line.endswith("\n") and int(json.loads(line)["round"]) <= from_round
                except (ValueError, KeyError, TypeError):
                    ok = False
                (kept if ok else dropped).append(line)
        if dropped:
            with self.layout.metrics_abandoned.open("a") as fh:
                fh.writelines(x if x.endswith("\n") else x + "\n" for x in dropped)
        write_atomic(self.metrics_path, "".join(kept).encode())
        history = list(previous.get("resumed", []))
        history.append(
            {
                "at": datetime.now(timezone.utc).isoformat(),
                "from_round": from_round,
                "rollback": rollback,
                "code_version": self.manifest["code_version"],
            }
        )
        self.manifest = {
            **previous,
            "status": "running",
            "resumed": history,
            "code_version": self.manifest["code_version"],
        }
        self.manifest.pop("finished_at", None)
        _write_json_atomic(self.layout.run_manifest, self.manifest)

    def save_model(self, arrays: Mapping[str, np.ndarray], rounds: int) -> str:
        from fl_app.weights import save_safetensors

        # The salted hash, never the plain one: the export manifest publishes this file's
        # SHA-256 and the weights are public, so a plain config hash in here would let
        # anyone rebuild the file for each guessed seed and compare (a seed oracle).
        salt = self.manifest.get(CONFIG_HASH_SALT)
        meta = {
            "config_hash": (
                published_config_hash(self.config_hash, salt)
                if isinstance(salt, str) and salt
                else "withheld"
            ),
            "rounds": str(rounds),
            "code_version": self.manifest["code_version"],
        }
        return save_safetensors(self.model_path, arrays, meta)

    def finish(self, summary: Mapping[str, Any], status: str = "completed") -> None:
        _write_json_atomic(self.summary_path, dict(summary))
        self.manifest["status"] = status
        self.manifest["finished_at"] = datetime.now(timezone.utc).isoformat()
        _write_json_atomic(self.layout.run_manifest, self.manifest)


class MetricsWriter:
    """Round listener: appends one line per round to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_round_end(self, report: RoundReport, arrays: Mapping[str, np.ndarray]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(_clean(report.to_record()), sort_keys=True) + "\n")
            fh.flush()


class AuditTrail:
    """The server's hash-chained audit log of a run (``audit.jsonl``, :mod:`fl_app.audit`).

    Records the run's start (config hash, code version), each round's stage outcomes
    (cohort size, dropouts, rejections by reason), the aggregate, the privacy spent,
    and the run's end with the SHA-256 of the model and ledger files. Only counts and
    reasons: no update, no metric of a single client, no secret.
    """

    def __init__(
        self,
        run_dir: Path,
        anchor: tuple[int, str] | None = None,
        signing_key: Any = None,
    ) -> None:
        """Open (or create) the log; with ``anchor`` (a checkpoint manifest's
        ``(seq, head)``) the existing log must contain it (resume). With
        ``signing_key`` (Ed25519, :func:`fl_app.audit.load_signing_key`) :meth:`run_end`
        signs the final head into ``audit_head.sig.json``, and checkpoints theirs."""
        from fl_app.audit import AuditLog

        self.signing_key = signing_key
        self.path = run_dir / AUDIT_FILE
        if anchor is None:
            self.log = AuditLog(self.path)
        else:
            self.log = AuditLog(self.path, expected_seq=anchor[0], expected_head=anchor[1])

    @classmethod
    def reopen(cls, run_dir: Path, anchor: tuple[int, str], signing_key: Any = None) -> AuditTrail:
        """Continue a killed run's log: remove a torn last line (recorded as an
        ``audit.repair`` event), then verify the chain against ``anchor``."""
        from fl_app.audit import truncate_torn_tail

        removed = truncate_torn_tail(run_dir / AUDIT_FILE)
        if removed:
            print(
                f"audit log: removed a torn last line ({len(removed)} bytes) left by the "
                "interrupted run; recorded as audit.repair",
                flush=True,
            )
        return cls(run_dir, anchor, signing_key)

    def run_start(self, config_hash: str, code_version: str, **extra: Any) -> None:
        self.log.append(
            "run.start",
            {"role": "server", "config_hash": config_hash, "code_version": code_version, **extra},
        )

    @staticmethod
    def _reasons(items: list[tuple[int, str]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, reason in items:
            out[reason] = out.get(reason, 0) + 1
        return out

    def ledger_spend(self, rnd: int, ledger: Any, ledger_path: Path) -> None:
        """``ledger.spend``: the privacy ledger as written for round ``rnd``, recorded
        *before* the round's instructions go out (a round begin hook, after the ledger
        file is written). A resume refuses a ledger holding fewer rounds or releases
        than the last such record (:func:`fl_app.server.resume.plan_resume`), so deleting
        an interrupted round's spend from ``privacy_ledger.json`` is detected."""
        self.log.append(
            "ledger.spend",
            {
                "round": int(rnd),
                "events": len(ledger.events),
                "local_releases": int(sum(n for _, n in ledger.local)),
                "ledger_sha256": hashlib.sha256(ledger_path.read_bytes()).hexdigest(),
            },
        )

    def on_round_end(self, report: RoundReport, arrays: Mapping[str, np.ndarray]) -> None:
        rnd = int(report.server_round)
        t = report.train
        self.log.append("round.start", {"round": rnd, "cohort_size": int(t.sampled)})
        stages = [("train", t)]
        if report.evaluate is not None:
            stages.append(("evaluate", report.evaluate))
        for name, st in stages:
            self.log.append(
                "stage.outcome",
                {
                    "round": rnd,
                    "stage": name,
                    "sampled": int(st.sampled),
                    "accepted": int(st.accepted),
                    "dropouts": int(st.missing),
                    "rejections": self._reasons(st.rejected),
                    "failures": self._reasons(st.failed),
                },
            )
        self.log.append(
            "aggregation.done",
            {
                "round": rnd,
                "num_updates": int(t.accepted),
                "model_updated": bool(report.model_updated),
                "note": report.note,
            },
        )
        if "dp_epsilon" in report.privacy:
            self.log.append(
                "privacy.epsilon",
                {
                    "round": rnd,
                    "epsilon": float(report.privacy["dp_epsilon"]),
                    "delta": float(report.privacy.get("dp_delta", 0.0)),
                },
            )

    def run_end(self, status: str, files: Mapping[str, str]) -> tuple[int, str]:
        """Append ``run.end`` with file hashes; return the log's ``(seq, head)``.

        With a signing key, the head is signed into ``audit_head.sig.json`` beside
        the log (``fl-app audit verify --public-key PUB --signed-head ...``)."""
        from fl_app.audit import sign_head

        self.log.append("run.end", {"status": status, "files": dict(files)})
        seq, head = self.log.seq, self.log.head
        self.log.close()
        if self.signing_key is not None:
            signed = sign_head(self.signing_key, head, seq)
            write_atomic(
                self.path.parent / SIGNED_HEAD_FILE,
                (json.dumps(signed, sort_keys=True, indent=2) + "\n").encode(),
            )
        return seq, head

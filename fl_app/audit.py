"""Tamper-evident, append-only audit log (JSONL hash chain) for the server and every client.

Every process of a run (the ServerApp and each ClientApp) keeps one log. Each line is
one record, and each record holds the SHA-256 of the record before it, so the log is a
hash chain (Haber & Stornetta 1991, "How to Time-Stamp a Digital Document"; the linear
chain of Schneier & Kelsey 1999, "Secure Audit Logs to Support Computer Forensics",
ACM TISSEC, without their forward-secure MAC keys; Crosby & Wallach 2009, "Efficient
Data Structures for Tamper-Evident Logging", USENIX Security, §3). The hash of the last
record, the *head*, commits to every byte before it: it is written into each checkpoint
manifest and can be signed with Ed25519 (RFC 8032).

Record format
-------------
One JSON object per line, in canonical form: ``json.dumps(obj, sort_keys=True,
separators=(",", ":"), ensure_ascii=False, allow_nan=False)`` encoded as UTF-8, then
``b"\\n"``. The keys are exactly:

``seq``    int, 0-based, the record's line number minus one (consecutive, no gaps)
``ts``     str, the writer's UTC time, ISO-8601 with microseconds
           (``2024-05-01T12:00:00.000000+00:00``); informational, not trusted
``event``  str, a lowercase dotted name matching :data:`EVENT_NAME_PATTERN`;
           :data:`KNOWN_EVENTS` documents the names the app writes
``data``   JSON object with the event's fields (see :func:`check_json_safe`)
``prev``   hex SHA-256 of the previous record, i.e. the previous record's ``hash``;
           :data:`GENESIS_HASH` (64 zeros) for record 0
``hash``   hex SHA-256 of the canonical encoding of this record *without* ``hash``

``prev`` is the previous record's ``hash`` rather than a digest of its whole line:
verification rejects any line that is not byte-for-byte the canonical encoding of
its parsed fields, so a line is a function of its hash-covered fields and the two
commit to the same bytes. The genesis value is a constant, not a run-specific digest:
the first record (``run.start``) binds the run (config hash, code version), and a
verifier needs nothing but the file to check the chain.

What verification detects, and what it cannot
----------------------------------------------
:func:`verify` recomputes every hash, ``prev`` link and ``seq``. Editing any record
(hash mismatch, or, if its hash was recomputed, the next record's ``prev``), deleting,
inserting or reordering records anywhere *before the last record* is detected from the
file alone. Changes at the *end* are not: dropping the last records, or rewriting the
chain from some record onwards with recomputed hashes, yields a valid, shorter or
different chain. Those are detected only against an external anchor the attacker
cannot rewrite: a checkpoint manifest's ``(seq, head)`` (``expected_seq`` /
``expected_head``) or an Ed25519-signed head (``public_key`` / ``signed_head``). An
anchor fixes the log up to its seq; records appended after the newest anchor remain
unprotected until the next one.

Anchoring a checkpoint: append ``checkpoint.saved`` (with the SHA-256 of the
checkpoint's files) first, then write :attr:`AuditLog.seq` and :attr:`AuditLog.head`
into the checkpoint manifest (which therefore cannot itself be hashed into the log).

Trust assumptions:

* the attacker cannot alter the anchors (checkpoint manifests kept elsewhere, or the
  signing key);
* one writer per log (one process, one :class:`AuditLog`); a second writer is refused
  by an ``fcntl.flock`` lock on POSIX, not on Windows;
* a writer's own compromise is out of scope: a process that holds the signing key can
  sign any history it likes;
* ``ts`` is the writer's clock; order is given by ``seq``, never by time.

Crashes
-------
Each append is one ``write`` on an ``O_APPEND`` descriptor followed by ``fsync``: a
record is durable when :meth:`AuditLog.append` returns. A crash mid-write can leave an
unterminated last line. :func:`verify` reports it as a *torn tail*
(:attr:`VerifyResult.torn_tail`), distinct from tampering; :class:`AuditLog` refuses to
append after one and :func:`truncate_torn_tail` (``fl-app audit repair``) removes it
and records the repair in the log. An attacker could pass off a cut last line as a
torn tail: the anchor check still catches it if the line was anchored (anchors are
only written after the record was fsynced).

No pickle: records are JSON, keys are PEM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fl_app.atomic import write_atomic
from fl_app.strict_json import reject_duplicate_keys

if sys.platform != "win32":
    import fcntl

__all__ = [
    "EVENT_NAME_PATTERN",
    "GENESIS_HASH",
    "HEAD_SIGNATURE_DOMAIN",
    "KNOWN_EVENTS",
    "AuditError",
    "AuditKeyError",
    "AuditLog",
    "AuditLogBrokenError",
    "AuditRecord",
    "TornTailError",
    "VerifyResult",
    "audit_main",
    "canonical_json",
    "check_json_safe",
    "generate_signing_key",
    "load_signing_key",
    "load_verify_key",
    "make_record",
    "sign_head",
    "truncate_torn_tail",
    "verify",
    "verify_head_signature",
]

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
EVENT_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*")
# Signed message: domain || seq (8-byte big-endian, signed) || head (32 raw bytes).
HEAD_SIGNATURE_DOMAIN = b"fl-app-audit-head-v1\x00"

KNOWN_EVENTS: Mapping[str, str] = {
    "run.start": "a process starts its part of a run: config_hash, code_version, role",
    "round.start": "a round starts: round, cohort_size",
    "stage.outcome": "a stage ends: round, stage, dropouts, rejections {reason: count}",
    "aggregation.done": "the round's aggregate is computed: round, num_updates",
    "privacy.epsilon": "privacy spent after the round: round, epsilon, delta, accountant",
    "checkpoint.saved": "a checkpoint is written: round, files {name: sha256}",
    "model.export": "the model is exported: tier, files {name: sha256}",
    "run.end": "a process ends its part of a run: status",
    "audit.repair": "a torn tail was removed: removed_bytes, removed_sha256",
    "client.round": "a client answered an instruction: round, message_type, artifact "
    "(what left it), epsilon {record_level, local}, policy",
    "client.refused": "a client refused an instruction: round, message_type, code, "
    "policy_field, reason",
}

_FIELDS = frozenset({"seq", "ts", "event", "data", "prev", "hash"})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REPAIR_HINT = "run `fl-app audit repair {path}` (fl_app.audit.truncate_torn_tail) to remove it"


class AuditError(RuntimeError):
    """The audit log cannot be opened or written."""


class AuditLogBrokenError(AuditError):
    """The existing log fails verification; appending to it is refused."""

    def __init__(self, message: str, result: VerifyResult) -> None:
        super().__init__(message)
        self.result = result


class TornTailError(AuditLogBrokenError):
    """The log ends in an unterminated line (a crash during an append)."""


class AuditKeyError(ValueError):
    """A signing or verification key cannot be loaded or written."""


# ---- canonical encoding -----------------------------------------------------


def check_json_safe(value: Any, where: str = "data") -> None:
    """Raise unless ``value`` is plain JSON: nothing is converted.

    Allowed: ``str``, ``int``, finite ``float``, ``bool``, ``None``, ``list``/``tuple``
    of allowed values, ``dict`` with ``str`` keys. Types are checked exactly, so
    subclasses are refused too: numpy scalars (``np.float64`` is a ``float``
    subclass), enums. Converting them here would hide which value the caller meant
    to log; convert with ``int()``, ``float()`` or ``.item()`` first.

    Raises
    ------
    TypeError
        For a value of another type, naming its path (``data['stage']['count']``).
    ValueError
        For NaN or ±Infinity, naming its path.
    """
    kind = type(value)
    if value is None or kind in (str, bool, int):
        return
    if kind is float:
        if not math.isfinite(value):
            raise ValueError(
                f"{where} is {value!r}; audit records allow finite floats only "
                "(log None or a string such as 'inf' instead)"
            )
        return
    if kind in (list, tuple):
        for i, item in enumerate(value):
            check_json_safe(item, f"{where}[{i}]")
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(
                    f"{where} has key {key!r} of type {type(key).__name__}; "
                    "audit record keys must be str"
                )
            check_json_safe(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} has type {kind.__module__}.{kind.__qualname__}; audit records hold "
        "plain JSON types only (str, int, finite float, bool, None, list, dict with str "
        "keys): convert it with int(), float(), str() or .item() before logging"
    )


def canonical_json(value: Any) -> bytes:
    """The canonical UTF-8 JSON encoding of ``value`` (no newline).

    Raises
    ------
    TypeError, ValueError
        When ``value`` is not plain JSON (:func:`check_json_safe`) or holds a string
        that is not valid Unicode (a lone surrogate).
    """
    check_json_safe(value, "value")
    return _dumps(value)


def _dumps(value: Any) -> bytes:
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"a string is not valid Unicode: {err}") from None


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    """One record of the log, as written (see the module docstring for the fields).

    ``data`` is the dict that was hashed; do not mutate it.
    """

    seq: int
    ts: str
    event: str
    data: dict[str, Any]
    prev: str
    hash: str

    def body(self) -> dict[str, Any]:
        """The hash-covered fields (everything but ``hash``)."""
        return {
            "seq": self.seq,
            "ts": self.ts,
            "event": self.event,
            "data": self.data,
            "prev": self.prev,
        }

    def to_line(self) -> bytes:
        """The record's line in the file, newline included."""
        return _dumps({**self.body(), "hash": self.hash}) + b"\n"


def _check_event(event: Any) -> None:
    if not isinstance(event, str) or not EVENT_NAME_PATTERN.fullmatch(event):
        raise ValueError(
            f"event is {event!r}; an event name is lowercase dotted words matching "
            f"{EVENT_NAME_PATTERN.pattern!r}, e.g. 'round.start' (known: "
            f"{', '.join(sorted(KNOWN_EVENTS))})"
        )


def make_record(seq: int, ts: str, event: str, data: Mapping[str, Any], prev: str) -> AuditRecord:
    """Build a record and compute its hash (pure; nothing is written).

    Raises
    ------
    ValueError, TypeError
        For a negative or non-int ``seq``, a bad event name, a ``prev`` that is not
        64 lowercase hex characters, or ``data`` that is not plain JSON.
    """
    if type(seq) is not int or seq < 0:
        raise ValueError(f"seq is {seq!r}; it must be an int >= 0")
    if not isinstance(ts, str):
        raise TypeError(f"ts is {ts!r}; it must be an ISO-8601 string")
    _check_event(event)
    if not isinstance(prev, str) or not _HEX64.fullmatch(prev):
        raise ValueError(f"prev is {prev!r}; it must be 64 lowercase hex characters")
    if not isinstance(data, Mapping):
        raise TypeError(f"data is a {type(data).__name__}; it must be a dict (JSON object)")
    payload = dict(data)
    check_json_safe(payload, "data")
    body = {"seq": seq, "ts": ts, "event": event, "data": payload, "prev": prev}
    digest = _sha256_hex(_dumps(body))
    return AuditRecord(seq=seq, ts=ts, event=event, data=payload, prev=prev, hash=digest)


# ---- verification -----------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    Attributes
    ----------
    ok
        True when every line is intact and every anchor matches.
    records
        Number of intact records before the first problem (all of them when ``ok``).
    head
        Hash of the last intact record (:data:`GENESIS_HASH` for none).
    first_broken
        1-based line number of the first broken, torn or missing line; ``None`` when
        ``ok`` or when only the signature is bad.
    reason
        ``"ok"`` or what is wrong, in words.
    torn_tail
        True when the *only* problem is an unterminated last line (a crash during an
        append, not tampering): :func:`truncate_torn_tail` repairs it.
    """

    ok: bool
    records: int
    head: str
    first_broken: int | None
    reason: str
    torn_tail: bool = False

    @property
    def seq(self) -> int:
        """Seq of the last intact record (-1 for none)."""
        return self.records - 1


class _LineError(Exception):
    """Internal: a line is malformed; the message is the reason."""


_NO_DUPLICATES = reject_duplicate_keys(_LineError)


def _reject_constant(name: str) -> Any:
    raise _LineError(f"non-finite number {name} (not JSON)")


def _parse_line(raw: bytes) -> AuditRecord:
    """Parse one line (without its newline) strictly; raise :class:`_LineError`."""
    if not raw:
        raise _LineError("empty line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _LineError(f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_NO_DUPLICATES, parse_constant=_reject_constant)
    except _LineError:
        raise
    except (ValueError, RecursionError) as err:
        raise _LineError(f"not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise _LineError(f"not a JSON object but {type(obj).__name__}")
    if set(obj) != _FIELDS:
        missing = sorted(_FIELDS - set(obj))
        extra = sorted(set(obj) - _FIELDS)
        raise _LineError(f"wrong fields (missing {missing}, unexpected {extra})")
    seq, ts, event, data, prev, digest = (
        obj["seq"],
        obj["ts"],
        obj["event"],
        obj["data"],
        obj["prev"],
        obj["hash"],
    )
    if type(seq) is not int or seq < 0:
        raise _LineError(f"seq is {seq!r}, not an int >= 0")
    if not isinstance(ts, str):
        raise _LineError(f"ts is {ts!r}, not a string")
    try:
        parsed_ts = datetime.fromisoformat(ts)
    except ValueError:
        raise _LineError(f"ts {ts!r} is not ISO-8601") from None
    if parsed_ts.tzinfo is None:
        raise _LineError(f"ts {ts!r} has no time zone")
    if not isinstance(event, str) or not EVENT_NAME_PATTERN.fullmatch(event):
        raise _LineError(f"event {event!r} is not a lowercase dotted name")
    if not isinstance(data, dict):
        raise _LineError(f"data is {type(data).__name__}, not a JSON object")
    for name, value in (("prev", prev), ("hash", digest)):
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise _LineError(f"{name} is {value!r:.80}, not 64 lowercase hex characters")
    record = AuditRecord(seq=seq, ts=ts, event=event, data=data, prev=prev, hash=digest)
    try:
        canonical = record.to_line()[:-1]
        expected = _sha256_hex(_dumps(record.body()))
    except (TypeError, ValueError, RecursionError) as err:
        # e.g. 1e400 parses to inf, "\ud800" to a lone surrogate.
        raise _LineError(f"cannot be re-encoded canonically ({err})") from None
    if canonical != raw:
        raise _LineError("not in canonical form (bytes differ from the canonical encoding)")
    if expected != digest:
        raise _LineError(
            f"hash mismatch: the record's content hashes to {expected[:16]}…, "
            f"not its stored {digest[:16]}… (record edited)"
        )
    return record


@dataclass
class _Scan:
    records: int = 0
    head: str = GENESIS_HASH
    first_broken: int | None = None
    reason: str = "ok"
    torn: bool = False
    torn_bytes: int = 0
    wanted: dict[int, str] = field(default_factory=dict)


def _scan(fh: BinaryIO, wanted_seqs: Iterable[int] = ()) -> _Scan:
    """Walk the chain; stop at the first broken or torn line. Never raises on content."""
    want = set(wanted_seqs)
    scan = _Scan()
    for line_no, raw in enumerate(fh, start=1):
        if not raw.endswith(b"\n"):
            scan.first_broken = line_no
            scan.torn = True
            scan.torn_bytes = len(raw)
            scan.reason = (
                f"torn tail: line {line_no} is incomplete ({len(raw)} bytes, no newline); "
                "a crash during an append, not a broken link"
            )
            return scan
        try:
            record = _parse_line(raw[:-1])
        except _LineError as err:
            scan.first_broken = line_no
            scan.reason = str(err)
            return scan
        expected_seq = scan.records
        if record.seq != expected_seq:
            scan.first_broken = line_no
            scan.reason = (
                f"seq is {record.seq}, expected {expected_seq} "
                "(a record was deleted, inserted or moved)"
            )
            return scan
        if record.prev != scan.head:
            scan.first_broken = line_no
            scan.reason = (
                f"prev link broken: prev is {record.prev[:16]}…, but the previous record's "
                f"hash is {scan.head[:16]}… (a record before it was edited, deleted, "
                "inserted or moved)"
            )
            return scan
        if record.seq in want:
            scan.wanted[record.seq] = record.hash
        scan.records += 1
        scan.head = record.hash
    return scan


def _check_anchor_args(head: Any, seq: Any, what: str) -> None:
    if not isinstance(head, str) or not _HEX64.fullmatch(head):
        raise ValueError(f"{what} head is {head!r}; it must be 64 lowercase hex characters")
    if type(seq) is not int or seq < -1:
        raise ValueError(f"{what} seq is {seq!r}; it must be an int >= -1")
    if seq == -1 and head != GENESIS_HASH:
        raise ValueError(f"{what} seq is -1 (empty log), so its head must be GENESIS_HASH")


def verify(
    path: str | os.PathLike[str],
    *,
    expected_head: str | None = None,
    expected_seq: int | None = None,
    public_key: Ed25519PublicKey | None = None,
    signed_head: Mapping[str, Any] | None = None,
) -> VerifyResult:
    """Verify a log's hash chain, and optionally an anchor and a signed head.

    Parameters
    ----------
    path
        The JSONL log.
    expected_head, expected_seq
        An anchor from a checkpoint manifest (give both): the log must hold a record
        with seq ``expected_seq`` whose hash is ``expected_head``. A log that ends
        before it is reported as truncated behind the checkpoint head.
    public_key, signed_head
        A trusted Ed25519 public key and a dict from :func:`sign_head` (give both):
        the signature must be valid, and its ``(seq, head)`` is then checked as an
        anchor like the one above.

    Returns
    -------
    VerifyResult
        Never raises on the log's content: a malformed line (not UTF-8, not JSON,
        duplicate keys, missing fields, wrong types, not canonical) is the first
        broken link.

    Raises
    ------
    ValueError
        For arguments given without their partner, or malformed anchor values.
    OSError
        When the file cannot be read (a missing log is an I/O error, not a verdict).
    """
    if (expected_head is None) != (expected_seq is None):
        raise ValueError(
            f"expected_head={expected_head!r} and expected_seq={expected_seq!r}: "
            "give both (the checkpoint manifest's audit head and seq) or neither"
        )
    if (public_key is None) != (signed_head is None):
        raise ValueError("public_key and signed_head: give both (to check a signature) or neither")
    with open(path, "rb") as fh:
        return _verify_stream(
            fh,
            expected_head=expected_head,
            expected_seq=expected_seq,
            public_key=public_key,
            signed_head=signed_head,
        )


def _verify_stream(
    fh: BinaryIO,
    *,
    expected_head: str | None,
    expected_seq: int | None,
    public_key: Ed25519PublicKey | None,
    signed_head: Mapping[str, Any] | None,
) -> VerifyResult:
    anchors: list[tuple[str, int, str]] = []
    if expected_head is not None and expected_seq is not None:
        _check_anchor_args(expected_head, expected_seq, "expected")
        anchors.append((expected_head, expected_seq, "checkpoint"))
    signature_ok = True
    if public_key is not None and signed_head is not None:
        signature_ok = verify_head_signature(public_key, signed_head)
        if signature_ok:
            anchors.append((signed_head["head"], signed_head["seq"], "signed"))

    scan = _scan(fh, [seq for _, seq, _ in anchors])

    def broken(line: int | None, reason: str, torn: bool = False) -> VerifyResult:
        return VerifyResult(
            ok=False,
            records=scan.records,
            head=scan.head,
            first_broken=line,
            reason=reason,
            torn_tail=torn,
        )

    # The earliest anchored record that the (intact) prefix contradicts comes first:
    # it means the chain up to it was rewritten consistently.
    for head, seq, kind in sorted(anchors, key=lambda a: a[1]):
        if seq == -1 or seq >= scan.records:
            continue
        if scan.wanted[seq] != head:
            return broken(
                seq + 1,
                f"record seq {seq} hashes to {scan.wanted[seq][:16]}…, but the {kind} head "
                f"is {head[:16]}… (the log was rewritten up to this record)",
            )
    if scan.first_broken is not None and not scan.torn:
        return broken(scan.first_broken, scan.reason)
    for head, seq, kind in sorted(anchors, key=lambda a: a[1]):
        if seq >= scan.records:
            tail = f"; line {scan.first_broken} is a torn tail" if scan.torn else ""
            return broken(
                scan.records + 1,
                f"truncated behind {kind} head: it anchors seq {seq} ({head[:16]}…) but the "
                f"log has only {scan.records} intact records{tail}",
            )
    if not signature_ok:
        return broken(None, "bad signature: the signed head does not verify with the public key")
    if scan.torn:
        return broken(scan.first_broken, scan.reason, torn=True)
    return VerifyResult(
        ok=True, records=scan.records, head=scan.head, first_broken=None, reason="ok"
    )


# ---- writing ----------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _fsync_dir(directory: Path) -> None:
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(fd: int, path: Path) -> None:
    if sys.platform == "win32":
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise AuditError(
            f"audit log {path} is open by another writer (flock held); a log has one "
            "writer: close the other AuditLog or use a separate log per process"
        ) from None


class AuditLog:
    """Appends records to one log; the only writer of that file.

    Opening an existing log verifies it first and refuses a broken one
    (:class:`AuditLogBrokenError`, naming the first broken line) or one with a torn
    tail (:class:`TornTailError`, naming the fix). A missing file is created (with its
    parent directories). An exclusive ``flock`` (POSIX) refuses a second writer, in
    this process or another, until :meth:`close`.

    Not thread-safe: one thread appends.

    Parameters
    ----------
    path
        The JSONL log.
    clock
        Returns the current time as an aware :class:`datetime` (converted to UTC);
        defaults to the system clock. Injectable for tests.
    expected_head, expected_seq
        Optional anchor (e.g. the checkpoint a run resumes from) the existing log must
        contain; see :func:`verify`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], datetime] | None = None,
        expected_head: str | None = None,
        expected_seq: int | None = None,
    ) -> None:
        self.path = Path(path)
        self._clock = clock or _utc_now
        self._failed: str | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            fd = os.open(self.path, flags)
            created = False
        try:
            _lock(fd, self.path)
            if created:
                _fsync_dir(self.path.parent)
            if (expected_head is None) != (expected_seq is None):
                raise ValueError(
                    f"expected_head={expected_head!r} and expected_seq={expected_seq!r}: "
                    "give both (the anchor the log must contain) or neither"
                )
            # Verify under the lock, through the locked descriptor (the same file).
            with os.fdopen(os.dup(fd), "rb") as fh:
                fh.seek(0)
                result = _verify_stream(
                    fh,
                    expected_head=expected_head,
                    expected_seq=expected_seq,
                    public_key=None,
                    signed_head=None,
                )
        except BaseException:
            os.close(fd)
            raise
        if not result.ok:
            os.close(fd)
            if result.torn_tail:
                raise TornTailError(
                    f"audit log {self.path}: {result.reason}; refusing to append. "
                    + _REPAIR_HINT.format(path=self.path),
                    result,
                )
            raise AuditLogBrokenError(
                f"audit log {self.path} is broken at line {result.first_broken}: "
                f"{result.reason}; refusing to append. Keep the file as evidence and "
                "start a new log",
                result,
            )
        self._fd = fd
        self._head = result.head
        self._records = result.records

    @property
    def head(self) -> str:
        """Hash of the last record (:data:`GENESIS_HASH` for an empty log)."""
        return self._head

    @property
    def seq(self) -> int:
        """Seq of the last record (-1 for an empty log); the anchor pairs it with :attr:`head`."""
        return self._records - 1

    @property
    def records(self) -> int:
        """Number of records in the log."""
        return self._records

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _timestamp(self) -> str:
        now = self._clock()
        if not isinstance(now, datetime) or now.tzinfo is None:
            raise ValueError(
                f"clock returned {now!r}; it must return a timezone-aware datetime "
                "(e.g. datetime.now(timezone.utc))"
            )
        return now.astimezone(timezone.utc).isoformat(timespec="microseconds")

    def append(self, event: str, data: Mapping[str, Any] | None = None) -> AuditRecord:
        """Append one record and fsync it; return it once it is durable.

        Raises
        ------
        ValueError, TypeError
            For a bad event name or data that is not plain JSON (nothing is written).
        AuditError
            When the log is closed, or an earlier write failed (the file may now end
            in a torn line: reopen it to find out).
        """
        if self._fd < 0:
            raise AuditError(f"audit log {self.path} is closed")
        if self._failed is not None:
            raise AuditError(
                f"audit log {self.path}: an earlier append failed ({self._failed}); "
                "reopen the log to verify it before appending"
            )
        record = make_record(self._records, self._timestamp(), event, data or {}, self._head)
        line = record.to_line()
        try:
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError as err:
            self._failed = str(err)
            raise AuditError(
                f"audit log {self.path}: append of seq {record.seq} failed ({err}); the "
                "record may be partly written"
            ) from err
        self._records += 1
        self._head = record.hash
        return record

    def close(self) -> None:
        """Release the lock and the file (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def truncate_torn_tail(
    path: str | os.PathLike[str],
    *,
    record: bool = True,
    clock: Callable[[], datetime] | None = None,
) -> bytes:
    """Remove an unterminated last line left by a crash; touch nothing else.

    The file is changed only when :func:`verify` reports a torn tail as its only
    problem. The removed bytes are logged (``logging`` warning) and, with ``record``,
    an ``audit.repair`` record with their length and SHA-256 is appended, so the
    repair is itself part of the chain.

    Returns
    -------
    bytes
        What was removed (``b""`` when there was no torn tail).

    Raises
    ------
    AuditLogBrokenError
        When the log is broken by something other than a torn tail (nothing is changed).
    AuditError
        When another writer holds the log.
    """
    target = Path(path)
    fd = os.open(target, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        _lock(fd, target)
        result = verify(target)
        if result.ok:
            return b""
        if not result.torn_tail:
            raise AuditLogBrokenError(
                f"audit log {target} is broken at line {result.first_broken}: "
                f"{result.reason}; only a torn tail can be repaired, nothing was changed",
                result,
            )
        with open(target, "rb") as fh:
            content = fh.read()
        keep = content.rfind(b"\n") + 1
        removed = content[keep:]
        os.ftruncate(fd, keep)
        os.fsync(fd)
    finally:
        os.close(fd)
    digest = _sha256_hex(removed)
    logger.warning(
        "audit log %s: removed a torn tail of %d bytes (sha256 %s): %r",
        target,
        len(removed),
        digest,
        removed[:200],
    )
    if record:
        with AuditLog(target, clock=clock) as log:
            log.append(
                "audit.repair",
                {"removed_bytes": len(removed), "removed_sha256": digest},
            )
    return removed


# ---- signing ----------------------------------------------------------------


def _head_message(head_hex: str, seq: int) -> bytes:
    return HEAD_SIGNATURE_DOMAIN + struct.pack(">q", seq) + bytes.fromhex(head_hex)


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_head(private_key: Ed25519PrivateKey, head_hex: str, seq: int) -> dict[str, Any]:
    """Sign a log head: Ed25519 over ``HEAD_SIGNATURE_DOMAIN || seq || head``.

    ``seq`` is packed as an 8-byte big-endian signed int and ``head`` as its 32 raw
    bytes, so the message is unambiguous and cannot be confused with another
    protocol's signature.

    Returns
    -------
    dict
        ``{"alg": "ed25519", "seq", "head", "key_id", "signature"}`` (JSON-safe);
        ``key_id`` is the SHA-256 of the raw public key, for diagnostics only:
        :func:`verify_head_signature` trusts the key it is given, never this field.
    """
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError(
            f"private_key is a {type(private_key).__name__}; it must be an "
            "Ed25519PrivateKey (load_signing_key)"
        )
    _check_anchor_args(head_hex, seq, "signed")
    signature = private_key.sign(_head_message(head_hex, seq))
    return {
        "alg": "ed25519",
        "seq": seq,
        "head": head_hex,
        "key_id": _sha256_hex(_raw_public(private_key.public_key())),
        "signature": signature.hex(),
    }


def verify_head_signature(public_key: Ed25519PublicKey, signed: Mapping[str, Any]) -> bool:
    """True when ``signed`` (from :func:`sign_head`) verifies with ``public_key``.

    Any malformed ``signed`` (missing fields, wrong types, bad hex) gives False.
    """
    if not isinstance(public_key, Ed25519PublicKey):
        raise TypeError(
            f"public_key is a {type(public_key).__name__}; it must be an "
            "Ed25519PublicKey (load_verify_key)"
        )
    if not isinstance(signed, Mapping) or signed.get("alg") != "ed25519":
        return False
    head, seq, signature = signed.get("head"), signed.get("seq"), signed.get("signature")
    if not isinstance(head, str) or not _HEX64.fullmatch(head):
        return False
    if type(seq) is not int or not -1 <= seq < 2**63:
        return False
    if not isinstance(signature, str) or not re.fullmatch(r"[0-9a-f]{128}", signature):
        return False
    try:
        public_key.verify(bytes.fromhex(signature), _head_message(head, seq))
    except InvalidSignature:
        return False
    return True


def _passphrase(passphrase_env: str | None) -> bytes | None:
    if passphrase_env is None:
        return None
    value = os.environ.get(passphrase_env)
    if not value:
        raise AuditKeyError(
            f"passphrase_env is {passphrase_env!r} but that environment variable is unset "
            "or empty; export it with the key's passphrase"
        )
    return value.encode("utf-8")


def load_signing_key(
    path: str | os.PathLike[str], *, passphrase_env: str | None = None
) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PEM file.

    Parameters
    ----------
    path
        PEM (PKCS#8) file, unencrypted or encrypted.
    passphrase_env
        Name of the environment variable holding the passphrase of an encrypted key
        (the passphrase itself never goes in a config file).

    Raises
    ------
    AuditKeyError
        When the file is unreadable, not PEM, encrypted without a passphrase (or with
        the wrong one), or not an Ed25519 key.
    """
    try:
        pem = Path(path).read_bytes()
    except OSError as err:
        raise AuditKeyError(f"signing key {path}: cannot read it ({err})") from None
    password = _passphrase(passphrase_env)
    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except TypeError as err:
        hint = (
            "the key is encrypted: set passphrase_env to the name of the environment "
            "variable holding its passphrase"
            if password is None
            else "the key is not encrypted: drop passphrase_env"
        )
        raise AuditKeyError(f"signing key {path}: {hint} ({err})") from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise AuditKeyError(
            f"signing key {path}: not a readable PEM private key, or a wrong passphrase ({err})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(
            f"signing key {path} is a {type(key).__name__}; audit heads are signed with "
            "Ed25519 (generate one with `fl-app audit keygen`)"
        )
    return key


def load_verify_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file (SubjectPublicKeyInfo).

    Raises
    ------
    AuditKeyError
        When the file is unreadable, a private key, not PEM, or not Ed25519.
    """
    try:
        pem = Path(path).read_bytes()
    except OSError as err:
        raise AuditKeyError(f"public key {path}: cannot read it ({err})") from None
    if b"PRIVATE KEY" in pem:
        raise AuditKeyError(
            f"public key {path} holds a private key; verify with the public key "
            "(the .pub file written by `fl-app audit keygen`), and keep the private key away "
            "from verifiers"
        )
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise AuditKeyError(f"public key {path}: not a readable PEM public key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(
            f"public key {path} is a {type(key).__name__}; audit heads are signed with Ed25519"
        )
    return key


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    except FileExistsError:
        raise AuditKeyError(f"{path} already exists; refusing to overwrite a key") from None
    try:
        if sys.platform != "win32":
            os.fchmod(fd, mode)  # the umask cannot widen it, but be explicit
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)


def generate_signing_key(
    path: str | os.PathLike[str],
    *,
    public_path: str | os.PathLike[str] | None = None,
    passphrase_env: str | None = None,
) -> Ed25519PrivateKey:
    """Create an Ed25519 key pair: private PEM (mode 0600) and public PEM (0644).

    Parameters
    ----------
    path
        Where the private key (PKCS#8 PEM) goes; must not exist.
    public_path
        Where the public key goes; defaults to ``<path>.pub``. Must not exist.
    passphrase_env
        Encrypt the private key with the passphrase in this environment variable.

    Raises
    ------
    AuditKeyError
        When a target exists or the passphrase variable is unset.
    """
    private_target = Path(path)
    public_target = Path(public_path) if public_path is not None else Path(f"{path}.pub")
    if private_target.exists() or public_target.exists():
        existing = private_target if private_target.exists() else public_target
        raise AuditKeyError(f"{existing} already exists; refusing to overwrite a key")
    password = _passphrase(passphrase_env)
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password is not None
        else serialization.NoEncryption()
    )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new_file(private_target, private_pem, 0o600)
    _write_new_file(public_target, public_pem, 0o644)
    return key


# ---- command line -----------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-app audit", description="Verify and maintain tamper-evident audit logs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="verify a log; report the first broken link")
    p.add_argument("log")
    p.add_argument("--head", help="anchor: head hash from a checkpoint manifest")
    p.add_argument("--seq", type=int, help="anchor: seq of that head")
    p.add_argument("--public-key", help="Ed25519 public key PEM (with --signed-head)")
    p.add_argument("--signed-head", help="JSON file written by `fl-app audit sign`")
    p = sub.add_parser("repair", help="remove a torn tail left by a crash (nothing else)")
    p.add_argument("log")
    p = sub.add_parser("sign", help="sign the head of a verified log")
    p.add_argument("log")
    p.add_argument("--key", required=True, help="Ed25519 private key PEM")
    p.add_argument("--passphrase-env", help="environment variable holding the passphrase")
    p.add_argument("-o", "--output", help="write the signed head JSON here (default stdout)")
    p = sub.add_parser("keygen", help="create an Ed25519 signing key pair")
    p.add_argument("key", help="private key PEM to create (mode 0600)")
    p.add_argument("--public", help="public key PEM to create (default <key>.pub)")
    p.add_argument("--passphrase-env", help="encrypt with the passphrase in this variable")
    return parser


def _usage_error(message: str) -> int:
    print(f"fl-app audit: error: {message}", file=sys.stderr)
    return 2


def _report(log: str, result: VerifyResult) -> int:
    if result.ok:
        print(f"OK {log}: {result.records} records, head {result.head} (seq {result.seq})")
        return 0
    where = f"line {result.first_broken}" if result.first_broken is not None else "signature"
    kind = "TORN" if result.torn_tail else "BROKEN"
    print(f"{kind} {log}: {where}: {result.reason} ({result.records} intact records)")
    if result.torn_tail:
        print(_REPAIR_HINT.format(path=log))
    return 1


def _cmd_verify(args: argparse.Namespace) -> int:
    if (args.head is None) != (args.seq is None):
        return _usage_error("--head and --seq go together (a checkpoint's audit anchor)")
    if (args.public_key is None) != (args.signed_head is None):
        return _usage_error("--public-key and --signed-head go together")
    head = args.head.lower() if args.head is not None else None
    public_key = None
    signed = None
    try:
        if args.public_key is not None:
            public_key = load_verify_key(args.public_key)
            signed = json.loads(Path(args.signed_head).read_text(encoding="utf-8"))
        return _report(
            args.log,
            verify(
                args.log,
                expected_head=head,
                expected_seq=args.seq,
                public_key=public_key,
                signed_head=signed,
            ),
        )
    except (OSError, ValueError) as err:  # unreadable files, bad anchors, bad key
        return _usage_error(str(err))


def _cmd_repair(args: argparse.Namespace) -> int:
    try:
        removed = truncate_torn_tail(args.log)
    except AuditLogBrokenError as err:
        print(f"BROKEN {args.log}: {err}")
        return 1
    except (OSError, AuditError) as err:
        return _usage_error(str(err))
    if removed:
        print(f"repaired {args.log}: removed a torn tail of {len(removed)} bytes")
    else:
        print(f"OK {args.log}: no torn tail, nothing changed")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    try:
        key = load_signing_key(args.key, passphrase_env=args.passphrase_env)
        result = verify(args.log)
    except (OSError, ValueError) as err:
        return _usage_error(str(err))
    if not result.ok:
        return _report(args.log, result)
    text = json.dumps(sign_head(key, result.head, result.seq), sort_keys=True, indent=2) + "\n"
    if args.output:
        write_atomic(args.output, text.encode("utf-8"))
    else:
        print(text, end="")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    try:
        generate_signing_key(args.key, public_path=args.public, passphrase_env=args.passphrase_env)
    except (OSError, AuditKeyError) as err:
        return _usage_error(str(err))
    print(f"wrote {args.key} (private, 0600) and {args.public or f'{args.key}.pub'} (public)")
    return 0


def audit_main(argv: list[str] | None = None) -> int:
    """``fl-app audit {verify,repair,sign,keygen} ...``; returns the exit status.

    ``verify`` exits 0 when the log is intact, 1 when it is broken (or torn, or a
    signature is bad), 2 on a usage error or an unreadable file.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help is 0, usage errors are 2
        return exc.code if isinstance(exc.code, int) else 2
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "verify": _cmd_verify,
        "repair": _cmd_repair,
        "sign": _cmd_sign,
        "keygen": _cmd_keygen,
    }
    return commands[args.command](args)

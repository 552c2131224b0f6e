"""Verifying an audit log's hash chain, and what verification can and cannot detect.

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

A crash mid-append can leave an unterminated last line: :func:`verify` reports it as a
*torn tail* (:attr:`VerifyResult.torn_tail`), distinct from tampering
(:func:`fl_app.audit.log.truncate_torn_tail` repairs it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fl_app.audit.record import (
    EVENT_NAME_PATTERN,
    GENESIS_HASH,
    HEX64,
    AuditRecord,
    check_anchor_args,
    encode_canonical,
    sha256_hex,
)
from fl_app.audit.signing import verify_head_signature
from fl_app.strict_json import reject_duplicate_keys

__all__ = ["VerifyResult", "verify", "verify_stream"]

_FIELDS = frozenset({"seq", "ts", "event", "data", "prev", "hash"})


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
        if not isinstance(value, str) or not HEX64.fullmatch(value):
            raise _LineError(f"{name} is {value!r:.80}, not 64 lowercase hex characters")
    record = AuditRecord(seq=seq, ts=ts, event=event, data=data, prev=prev, hash=digest)
    try:
        canonical = record.to_line()[:-1]
        expected = sha256_hex(encode_canonical(record.body()))
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
    wanted: dict[int, str] = field(default_factory=dict)


def _scan(fh: BinaryIO, wanted_seqs: Iterable[int] = ()) -> _Scan:
    """Walk the chain; stop at the first broken or torn line. Never raises on content."""
    want = set(wanted_seqs)
    scan = _Scan()
    for line_no, raw in enumerate(fh, start=1):
        if not raw.endswith(b"\n"):
            scan.first_broken = line_no
            scan.torn = True
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
        return verify_stream(
            fh,
            expected_head=expected_head,
            expected_seq=expected_seq,
            public_key=public_key,
            signed_head=signed_head,
        )


def verify_stream(
    fh: BinaryIO,
    *,
    expected_head: str | None,
    expected_seq: int | None,
    public_key: Ed25519PublicKey | None,
    signed_head: Mapping[str, Any] | None,
) -> VerifyResult:
    anchors: list[tuple[str, int, str]] = []
    if expected_head is not None and expected_seq is not None:
        check_anchor_args(expected_head, expected_seq, "expected")
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

"""The audit log's one writer (:class:`AuditLog`) and the repair of a crash's torn tail.

Crashes
-------
Each append is one ``write`` on an ``O_APPEND`` descriptor followed by ``fsync``: a
record is durable when :meth:`AuditLog.append` returns. A crash mid-write can leave an
unterminated last line. :func:`fl_app.audit.chain.verify` reports it as a *torn tail*,
distinct from tampering; :class:`AuditLog` refuses to append after one and
:func:`truncate_torn_tail` (``fl-app audit repair``) removes it and records the repair
in the log. An attacker could pass off a cut last line as a torn tail: the anchor check
still catches it if the line was anchored (anchors are only written after the record
was fsynced).

Anchoring a checkpoint: append ``checkpoint.saved`` (with the SHA-256 of the
checkpoint's files) first, then write :attr:`AuditLog.seq` and :attr:`AuditLog.head`
into the checkpoint manifest (which therefore cannot itself be hashed into the log).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fl_app.atomic import fsync_dir
from fl_app.audit.chain import VerifyResult, verify, verify_stream
from fl_app.audit.record import AuditRecord, make_record, sha256_hex

if sys.platform != "win32":
    import fcntl

__all__ = [
    "REPAIR_HINT",
    "AuditError",
    "AuditLog",
    "AuditLogBrokenError",
    "TornTailError",
    "truncate_torn_tail",
]

logger = logging.getLogger(__name__)

REPAIR_HINT = "run `fl-app audit repair {path}` (fl_app.audit.truncate_torn_tail) to remove it"


class AuditError(RuntimeError):
    """The audit log cannot be opened or written."""


class AuditLogBrokenError(AuditError):
    """The existing log fails verification; appending to it is refused."""

    def __init__(self, message: str, result: VerifyResult) -> None:
        super().__init__(message)
        self.result = result


class TornTailError(AuditLogBrokenError):
    """The log ends in an unterminated line (a crash during an append)."""


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


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
                fsync_dir(self.path.parent)
            if (expected_head is None) != (expected_seq is None):
                raise ValueError(
                    f"expected_head={expected_head!r} and expected_seq={expected_seq!r}: "
                    "give both (the anchor the log must contain) or neither"
                )
            # Verify under the lock, through the locked descriptor (the same file).
            with os.fdopen(os.dup(fd), "rb") as fh:
                fh.seek(0)
                result = verify_stream(
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
                    + REPAIR_HINT.format(path=self.path),
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
    digest = sha256_hex(removed)
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

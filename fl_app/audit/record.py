"""The audit log's record format: canonical JSON, one hash-chained record a line.

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
verification (:mod:`fl_app.audit.chain`) rejects any line that is not byte-for-byte the
canonical encoding of its parsed fields, so a line is a function of its hash-covered
fields and the two commit to the same bytes. The genesis value is a constant, not a
run-specific digest: the first record (``run.start``) binds the run (config hash, code
version), and a verifier needs nothing but the file to check the chain.

Pure: nothing here reads or writes a file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EVENT_NAME_PATTERN",
    "GENESIS_HASH",
    "HEX64",
    "KNOWN_EVENTS",
    "AuditRecord",
    "canonical_json",
    "check_anchor_args",
    "check_json_safe",
    "encode_canonical",
    "make_record",
    "sha256_hex",
]

GENESIS_HASH = "0" * 64
EVENT_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*")
# Signed message: domain || seq (8-byte big-endian, signed) || head (32 raw bytes).


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

HEX64 = re.compile(r"[0-9a-f]{64}")


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
    return encode_canonical(value)


def encode_canonical(value: Any) -> bytes:
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"a string is not valid Unicode: {err}") from None


def sha256_hex(data: bytes) -> str:
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
        return encode_canonical({**self.body(), "hash": self.hash}) + b"\n"


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
    if not isinstance(prev, str) or not HEX64.fullmatch(prev):
        raise ValueError(f"prev is {prev!r}; it must be 64 lowercase hex characters")
    if not isinstance(data, Mapping):
        raise TypeError(f"data is a {type(data).__name__}; it must be a dict (JSON object)")
    payload = dict(data)
    check_json_safe(payload, "data")
    body = {"seq": seq, "ts": ts, "event": event, "data": payload, "prev": prev}
    digest = sha256_hex(encode_canonical(body))
    return AuditRecord(seq=seq, ts=ts, event=event, data=payload, prev=prev, hash=digest)


# ---- verification -----------------------------------------------------------


def check_anchor_args(head: Any, seq: Any, what: str) -> None:
    if not isinstance(head, str) or not HEX64.fullmatch(head):
        raise ValueError(f"{what} head is {head!r}; it must be 64 lowercase hex characters")
    if type(seq) is not int or seq < -1:
        raise ValueError(f"{what} seq is {seq!r}; it must be an int >= -1")
    if seq == -1 and head != GENESIS_HASH:
        raise ValueError(f"{what} seq is -1 (empty log), so its head must be GENESIS_HASH")

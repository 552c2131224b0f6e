"""Tamper-evident, append-only audit log (JSONL hash chain) for the server and every client.

Every process of a run (the ServerApp and each ClientApp) keeps one log. Each line is
one record, and each record holds the SHA-256 of the record before it, so the log is a
hash chain (Haber & Stornetta 1991, "How to Time-Stamp a Digital Document"; the linear
chain of Schneier & Kelsey 1999, "Secure Audit Logs to Support Computer Forensics",
ACM TISSEC, without their forward-secure MAC keys; Crosby & Wallach 2009, "Efficient
Data Structures for Tamper-Evident Logging", USENIX Security, §3). The hash of the last
record, the *head*, commits to every byte before it: it is written into each checkpoint
manifest and can be signed with Ed25519 (RFC 8032).

Where each part lives
---------------------
:mod:`fl_app.audit.record`   the record format and its canonical encoding (pure)
:mod:`fl_app.audit.chain`    :func:`verify`: the chain, anchors, what is detectable
:mod:`fl_app.audit.log`      :class:`AuditLog`, the one locked writer; torn-tail repair
:mod:`fl_app.audit.signing`  Ed25519 signed heads and key files
:mod:`fl_app.cli.audit`      ``fl-app audit verify | repair | sign | keygen``

This package's names below are its interface; import them from ``fl_app.audit``.

Trust assumptions:

* the attacker cannot alter the anchors (checkpoint manifests kept elsewhere, or the
  signing key);
* one writer per log (one process, one :class:`AuditLog`); a second writer is refused
  by an ``fcntl.flock`` lock on POSIX, not on Windows;
* a writer's own compromise is out of scope: a process that holds the signing key can
  sign any history it likes;
* ``ts`` is the writer's clock; order is given by ``seq``, never by time.

No pickle: records are JSON, keys are PEM.
"""

from fl_app.audit.chain import VerifyResult, verify
from fl_app.audit.log import (
    AuditError,
    AuditLog,
    AuditLogBrokenError,
    TornTailError,
    truncate_torn_tail,
)
from fl_app.audit.record import (
    EVENT_NAME_PATTERN,
    GENESIS_HASH,
    KNOWN_EVENTS,
    AuditRecord,
    canonical_json,
    check_json_safe,
    make_record,
)
from fl_app.audit.signing import (
    HEAD_SIGNATURE_DOMAIN,
    AuditKeyError,
    generate_signing_key,
    load_signing_key,
    load_verify_key,
    sign_head,
    verify_head_signature,
)

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

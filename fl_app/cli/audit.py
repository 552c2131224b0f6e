"""``fl-app audit verify | repair | sign | keygen``: the tamper-evident audit log by hand.

The log itself (format, verifier, writer, signatures) is :mod:`fl_app.audit`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from fl_app.atomic import write_atomic
from fl_app.audit import (
    AuditError,
    AuditKeyError,
    AuditLogBrokenError,
    VerifyResult,
    generate_signing_key,
    load_signing_key,
    load_verify_key,
    sign_head,
    truncate_torn_tail,
    verify,
)
from fl_app.audit.log import REPAIR_HINT

__all__ = ["audit_main"]


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
        print(REPAIR_HINT.format(path=log))
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

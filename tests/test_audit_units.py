"""Unit tests of the audit package's checks, pinned to the record format its docstrings
specify (fl_app.audit.record / chain / signing / log), written to kill the mutants that
tests/test_audit.py's end-to-end cases let through.

Guarantees: each malformed line is rejected as the first broken link with the reason
that names what is wrong (the verdict ``fl-app audit verify`` prints); the canonical
encoding is UTF-8 without escapes and never holds NaN; a signed head is Ed25519 over
``domain || seq (8-byte big-endian, signed) || head`` and nothing malformed verifies;
anchors accept seq -1 only with the genesis head; key files name the fix when refused.
Expected hashes and signed messages are built here with hashlib, json and struct
directly, not with the code under test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import struct
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fl_app.audit import (
    GENESIS_HASH,
    HEAD_SIGNATURE_DOMAIN,
    AuditError,
    AuditKeyError,
    AuditLog,
    AuditLogBrokenError,
    canonical_json,
    check_json_safe,
    load_signing_key,
    load_verify_key,
    sign_head,
    truncate_torn_tail,
    verify,
    verify_head_signature,
)
from fl_app.audit.record import encode_canonical
from fl_app.audit.signing import generate_signing_key

TS = "2024-05-01T12:00:00.000000+00:00"


def _dumps(obj: Any) -> bytes:
    """The canonical encoding, written out from the format's definition."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _fields(**over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "seq": 0,
        "ts": TS,
        "event": "run.start",
        "data": {},
        "prev": GENESIS_HASH,
    }
    fields.update(over)
    if "hash" not in fields:
        body = {k: fields[k] for k in ("seq", "ts", "event", "data", "prev") if k in fields}
        fields["hash"] = "0" * 64 if len(body) < 5 else hashlib.sha256(_dumps(body)).hexdigest()
    return fields


def _line(**over: Any) -> bytes:
    return json.dumps(_fields(**over), sort_keys=True, separators=(",", ":")).encode()


def _valid_hash_of(fields: dict[str, Any]) -> str:
    body = {k: v for k, v in fields.items() if k != "hash"}
    return hashlib.sha256(_dumps(body)).hexdigest()


# (raw line without newline, exact reason verify() reports for it as line 1)
MALFORMED: list[tuple[bytes, str]] = [
    (b"", "empty line"),
    (b"\xff", "not valid UTF-8 (invalid start byte at byte 0)"),
    (b"[1]", "not a JSON object but list"),
    (
        _line().replace(b'"data":{}', b'"data":{"x":NaN}'),
        "non-finite number NaN (not JSON)",
    ),
    (
        json.dumps({k: v for k, v in _fields().items() if k != "ts"}).encode(),
        "wrong fields (missing ['ts'], unexpected [])",
    ),
    (
        json.dumps({**_fields(), "extra": 1}).encode(),
        "wrong fields (missing [], unexpected ['extra'])",
    ),
    (_line(seq=-1), "seq is -1, not an int >= 0"),
    (_line(seq=True), "seq is True, not an int >= 0"),
    (_line(ts=5), "ts is 5, not a string"),
    (_line(ts="yesterday"), "ts 'yesterday' is not ISO-8601"),
    (_line(ts="2024-05-01T12:00:00"), "ts '2024-05-01T12:00:00' has no time zone"),
    (_line(event=5), "event 5 is not a lowercase dotted name"),
    (_line(event="Run.Start"), "event 'Run.Start' is not a lowercase dotted name"),
    (_line(data=[1]), "data is list, not a JSON object"),
    (_line(prev=5), "prev is 5, not 64 lowercase hex characters"),
    (_line(prev="AB" * 32), f"prev is {'AB' * 32!r:.80}, not 64 lowercase hex characters"),
    (_line(hash=7), "hash is 7, not 64 lowercase hex characters"),
    (_line(hash="x"), "hash is 'x', not 64 lowercase hex characters"),
]


@pytest.mark.parametrize("index", range(len(MALFORMED)))
def test_a_malformed_line_is_the_first_broken_link_with_its_reason(
    tmp_path: Path, index: int
) -> None:
    raw, reason = MALFORMED[index]
    path = tmp_path / "audit.jsonl"
    path.write_bytes(raw + b"\n")
    result = verify(path)
    assert (result.ok, result.first_broken, result.records, result.torn_tail) == (
        False,
        1,
        0,
        False,
    )
    assert result.reason == reason


def test_invalid_json_and_edited_records_name_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"{not json\n")
    assert verify(path).reason.startswith("not valid JSON (")
    # Content edited, stored hash kept: the reason quotes both digests' first 16 hex.
    fields = _fields()
    stored = fields["hash"]
    fields["data"] = {"edited": True}
    path.write_bytes(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    expected = _valid_hash_of(fields)
    assert verify(path).reason == (
        f"hash mismatch: the record's content hashes to {expected[:16]}…, "
        f"not its stored {stored[:16]}… (record edited)"
    )
    # 1e400 parses to inf, which has no canonical encoding.
    path.write_bytes(_line().replace(b'"data":{}', b'"data":{"x":1e400}') + b"\n")
    assert verify(path).reason.startswith("cannot be re-encoded canonically (")


def test_verify_refuses_half_an_anchor_or_half_a_signature(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    with pytest.raises(
        ValueError,
        match=r"^expected_head='0{64}' and expected_seq=None: give both \(the checkpoint "
        r"manifest's audit head and seq\) or neither$",
    ):
        verify(path, expected_head=GENESIS_HASH)
    key = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(
        ValueError,
        match=r"^public_key and signed_head: give both \(to check a signature\) or neither$",
    ):
        verify(path, public_key=key)


# ---- canonical encoding -----------------------------------------------------


def test_canonical_json_is_utf8_without_escapes_and_never_nan() -> None:
    assert canonical_json({"b": "é", "a": [1, 2.5]}) == '{"a":[1,2.5],"b":"é"}'.encode()
    # The raw encoder refuses NaN itself (verification re-encodes parsed lines with it).
    with pytest.raises(ValueError):
        encode_canonical(float("nan"))
    with pytest.raises(ValueError, match=r"^a string is not valid Unicode: "):
        canonical_json("\ud800")


def test_canonical_json_names_the_path_of_a_value_that_is_not_plain_json() -> None:
    with pytest.raises(ValueError, match=r"^value\[0\] is nan; audit records allow finite"):
        canonical_json([float("nan")])
    with pytest.raises(TypeError, match=r"^value\['k'\] has type numpy.float64; "):
        canonical_json({"k": np.float64(1.0)})


def test_check_json_safe_names_paths_and_the_fix() -> None:
    with pytest.raises(
        ValueError, match=r"^data is inf; .*\(log None or a string such as 'inf' instead\)$"
    ):
        check_json_safe(float("inf"))
    with pytest.raises(TypeError, match=r"^data\[1\]\['a'\] has type numpy.int64; "):
        check_json_safe([1, {"a": np.int64(2)}])
    with pytest.raises(TypeError, match=r"^data has key 1 of type int; audit record keys"):
        check_json_safe({1: "x"})
    with pytest.raises(TypeError, match=r"^x\[0\] has key \(1,\) of type tuple; "):
        check_json_safe([{(1,): 0}], "x")


# ---- anchors and signed heads -------------------------------------------------


def _message(head: str, seq: int) -> bytes:
    return b"fl-app-audit-head-v1\x00" + struct.pack(">q", seq) + bytes.fromhex(head)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _raw_signed(key: Ed25519PrivateKey, head: str, seq: int) -> dict[str, Any]:
    """A well-formed signed head made with the key directly (any seq, no checks)."""
    signature = key.sign(b"fl-app-audit-head-v1\x00" + struct.pack(">q", seq) + bytes.fromhex(head))
    return {"alg": "ed25519", "seq": seq, "head": head, "signature": signature.hex()}


def test_a_signed_head_is_ed25519_over_domain_seq_head(key: Ed25519PrivateKey) -> None:
    assert HEAD_SIGNATURE_DOMAIN == b"fl-app-audit-head-v1\x00"
    head = "ab" * 32
    for seq in (-1, 0, 5, 2**63 - 1):
        h = GENESIS_HASH if seq == -1 else head
        signed = sign_head(key, h, seq)
        key.public_key().verify(bytes.fromhex(signed["signature"]), _message(h, seq))
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        assert signed["key_id"] == hashlib.sha256(raw).hexdigest()
        assert (signed["alg"], signed["seq"], signed["head"]) == ("ed25519", seq, h)
        assert verify_head_signature(key.public_key(), signed)


def test_anchor_seq_bounds_and_the_genesis_rule(key: Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError, match=r"^signed seq is True; it must be an int >= -1$"):
        sign_head(key, "ab" * 32, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^signed seq is -2; it must be an int >= -1$"):
        sign_head(key, "ab" * 32, -2)
    with pytest.raises(
        ValueError, match=r"^signed seq is -1 \(empty log\), so its head must be GENESIS_HASH$"
    ):
        sign_head(key, "ab" * 32, -1)
    with pytest.raises(ValueError, match=r"^signed head is 'AB"):
        sign_head(key, "AB" * 32, 0)
    with pytest.raises(
        TypeError, match=r"^private_key is a str; it must be an Ed25519PrivateKey \(load_signing"
    ):
        sign_head("key", GENESIS_HASH, -1)  # type: ignore[arg-type]


# (mutation applied to a valid signed head, whether it must still verify)
SIGNED_CASES: list[tuple[Callable[[dict[str, Any]], Any], bool]] = [
    (lambda s: s, True),
    (lambda s: [s], False),
    (lambda s: {k: v for k, v in s.items() if k != "alg"}, False),
    (lambda s: {**s, "alg": "rsa"}, False),
    (lambda s: {**s, "head": 5}, False),
    (lambda s: {**s, "head": s["head"].upper()}, False),
    (lambda s: {**s, "seq": "3"}, False),
    (lambda s: {**s, "seq": True}, False),
    (lambda s: {**s, "signature": s["signature"].upper()}, False),
    (lambda s: {**s, "signature": s["signature"][:-2]}, False),
    (lambda s: {**s, "signature": 5}, False),
]


@pytest.mark.parametrize("index", range(len(SIGNED_CASES)))
def test_nothing_malformed_verifies_as_a_signed_head(key: Ed25519PrivateKey, index: int) -> None:
    change, ok = SIGNED_CASES[index]
    assert verify_head_signature(key.public_key(), change(sign_head(key, "cd" * 32, 3))) is ok


def test_signed_seq_range_is_minus_one_to_two_to_the_63(key: Ed25519PrivateKey) -> None:
    public = key.public_key()
    assert verify_head_signature(public, _raw_signed(key, GENESIS_HASH, -1))
    assert verify_head_signature(public, _raw_signed(key, "cd" * 32, 0))
    assert verify_head_signature(public, _raw_signed(key, "cd" * 32, 200))
    assert verify_head_signature(public, _raw_signed(key, "cd" * 32, 2**63 - 1))
    # Outside the range: refused before the message is built, even if signed.
    assert not verify_head_signature(public, _raw_signed(key, "cd" * 32, -2))
    out_of_range = {**_raw_signed(key, "cd" * 32, 0), "seq": 2**63}
    assert not verify_head_signature(public, out_of_range)
    assert not verify_head_signature(public, {**out_of_range, "seq": 2**64})
    with pytest.raises(
        TypeError, match=r"^public_key is a str; it must be an Ed25519PublicKey \(load_verify"
    ):
        verify_head_signature("key", {})  # type: ignore[arg-type]


# ---- key files ------------------------------------------------------------------


def _pem_private(key: Any, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def test_key_loading_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "plain.pem"
    plain.write_bytes(_pem_private(Ed25519PrivateKey.generate()))
    locked = tmp_path / "locked.pem"
    locked.write_bytes(_pem_private(Ed25519PrivateKey.generate(), b"pw"))
    monkeypatch.setenv("AUDIT_PW", "pw")
    assert isinstance(load_signing_key(locked, passphrase_env="AUDIT_PW"), Ed25519PrivateKey)
    with pytest.raises(
        AuditKeyError,
        match=rf"^signing key {locked}: the key is encrypted: set passphrase_env to the name of "
        r"the environment variable holding its passphrase \(",
    ):
        load_signing_key(locked)
    with pytest.raises(
        AuditKeyError,
        match=rf"^signing key {plain}: the key is not encrypted: drop passphrase_env \(",
    ):
        load_signing_key(plain, passphrase_env="AUDIT_PW")
    monkeypatch.setenv("AUDIT_EMPTY", "")
    with pytest.raises(AuditKeyError, match=r"or empty; export it with the key's passphrase$"):
        load_signing_key(plain, passphrase_env="AUDIT_EMPTY")
    curve = tmp_path / "ec.pem"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    curve.write_bytes(_pem_private(ec_key))
    with pytest.raises(
        AuditKeyError,
        match=rf"is a {type(ec_key).__name__}; audit heads are signed with Ed25519 "
        r"\(generate one with `fl-app audit keygen`\)$",
    ):
        load_signing_key(curve)


def test_verify_key_loading_names_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pub"
    with pytest.raises(AuditKeyError, match=rf"^public key {missing}: cannot read it \("):
        load_verify_key(missing)
    private = tmp_path / "k.pem"
    private.write_bytes(_pem_private(Ed25519PrivateKey.generate()))
    with pytest.raises(
        AuditKeyError,
        match=r"holds a private key; verify with the public key \(the \.pub file written by "
        r"`fl-app audit keygen`\), and keep the private key away from verifiers$",
    ):
        load_verify_key(private)
    curve = tmp_path / "ec.pub"
    ec_public = ec.generate_private_key(ec.SECP256R1()).public_key()
    curve.write_bytes(
        ec_public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(
        AuditKeyError,
        match=rf"^public key {curve} is a {type(ec_public).__name__}; audit heads are signed with "
        "Ed25519$",
    ):
        load_verify_key(curve)


def test_keygen_modes_paths_and_refusals(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)  # a strict umask must not narrow the public key's 0644
    try:
        key = generate_signing_key(tmp_path / "a" / "b" / "k.pem", public_path=tmp_path / "v.pub")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "a" / "b" / "k.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "v.pub").stat().st_mode) == 0o644
    assert not (tmp_path / "a" / "b" / "k.pem.pub").exists()
    public = load_verify_key(tmp_path / "v.pub")
    assert public.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    ) == key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    # Either target existing refuses, naming the one that exists; nothing is replaced.
    (tmp_path / "only.pub").write_bytes(b"keep")
    with pytest.raises(AuditKeyError, match=rf"^{tmp_path / 'only.pub'} already exists; "):
        generate_signing_key(tmp_path / "only")
    assert not (tmp_path / "only").exists()
    with pytest.raises(AuditKeyError, match=rf"^{tmp_path / 'v.pub'} already exists; refusing"):
        generate_signing_key(tmp_path / "new.pem", public_path=tmp_path / "v.pub")
    with pytest.raises(AuditKeyError, match=rf"^{tmp_path / 'a' / 'b' / 'k.pem'} already exists"):
        generate_signing_key(tmp_path / "a" / "b" / "k.pem", public_path=tmp_path / "w.pub")


def test_key_writer_never_overwrites_even_past_the_exists_check(tmp_path: Path) -> None:
    from fl_app.audit.signing import _write_new_file

    target = tmp_path / "k.pem"
    target.write_bytes(b"old")
    with pytest.raises(
        AuditKeyError, match=rf"^{target} already exists; refusing to overwrite a key$"
    ):
        _write_new_file(target, b"new", 0o600)
    assert target.read_bytes() == b"old"


# ---- torn-tail repair -------------------------------------------------------------


def test_repair_logs_what_it_removed_and_records_it_with_the_given_clock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.append("run.start", {})
    torn = b'{"seq":1,' + b"x" * 300  # longer than the 200 bytes the warning quotes
    with open(path, "ab") as fh:
        fh.write(torn)
    fixed = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    with caplog.at_level(logging.WARNING, logger="fl_app.audit.log"):
        assert truncate_torn_tail(path, clock=lambda: fixed) == torn
    digest = hashlib.sha256(torn).hexdigest()
    assert caplog.messages == [
        f"audit log {path}: removed a torn tail of {len(torn)} bytes (sha256 {digest}): "
        f"{torn[:200]!r}"
    ]
    last = json.loads(path.read_bytes().splitlines()[-1])
    assert last["event"] == "audit.repair"
    assert last["ts"] == "2030-01-02T03:04:05.000000+00:00"
    assert last["data"] == {"removed_bytes": len(torn), "removed_sha256": digest}


def test_repair_refuses_a_broken_log_and_a_held_one(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"[1]\n")
    with pytest.raises(AuditLogBrokenError) as broken:
        truncate_torn_tail(path)
    assert (broken.value.result.first_broken, broken.value.result.reason) == (
        1,
        "not a JSON object but list",
    )
    held = tmp_path / "held.jsonl"
    with AuditLog(held), pytest.raises(AuditError, match=rf"^audit log {held} is open by another"):
        truncate_torn_tail(held)


# ---- chain links and anchors ------------------------------------------------------


def _fixed_clock() -> Callable[[], datetime]:
    times = iter(datetime(2024, 5, 1, 12, 0, s, tzinfo=timezone.utc) for s in range(60))
    return lambda: next(times)


def _chain(path: Path, n: int = 5) -> list[dict[str, Any]]:
    with AuditLog(path, clock=_fixed_clock()) as log:
        for i in range(n):
            log.append("round.start", {"round": i})
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def _rewrite_from(records: list[dict[str, Any]], start: int) -> bytes:
    """Records from ``start`` on with new content and consistent seq/prev/hash (a forger)."""
    out, prev = [], records[start - 1]["hash"]
    for rec in records:
        if rec["seq"] < start:
            out.append(_dumps(rec))
            continue
        body = {**{k: rec[k] for k in ("seq", "ts", "event", "prev")}, "prev": prev}
        body["data"] = {"forged": rec["seq"]}
        digest = hashlib.sha256(_dumps(body)).hexdigest()
        out.append(_dumps({**body, "hash": digest}))
        prev = digest
    return b"\n".join(out) + b"\n"


def test_link_reasons_name_the_kind_of_break(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = _chain(path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[2])
    assert verify(path).reason == ("seq is 2, expected 1 (a record was deleted, inserted or moved)")
    moved = {**records[1], "prev": records[3]["hash"]}
    moved["hash"] = _valid_hash_of(moved)
    path.write_bytes(lines[0] + _dumps(moved) + b"\n")
    assert verify(path).reason == (
        f"prev link broken: prev is {records[3]['hash'][:16]}…, but the previous record's "
        f"hash is {records[0]['hash'][:16]}… (a record before it was edited, deleted, "
        "inserted or moved)"
    )
    path.write_bytes(lines[0] + b'{"seq"')
    result = verify(path)
    assert (result.ok, result.torn_tail, result.first_broken) == (False, True, 2)
    assert result.reason == (
        "torn tail: line 2 is incomplete (6 bytes, no newline); "
        "a crash during an append, not a broken link"
    )
    path.write_bytes(lines[0].replace(b'"data":', b'"data": '))
    assert verify(path).reason == (
        "not in canonical form (bytes differ from the canonical encoding)"
    )


def test_the_earliest_contradicted_anchor_is_reported_whatever_its_kind(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    path = tmp_path / "audit.jsonl"
    records = _chain(path)
    path.write_bytes(_rewrite_from(records, 1))
    signed = sign_head(key, records[1]["hash"], 1)
    forged = json.loads(path.read_bytes().splitlines()[1])["hash"]
    for expected_head, expected_seq in ((records[3]["hash"], 3), (GENESIS_HASH, -1)):
        result = verify(
            path,
            expected_head=expected_head,
            expected_seq=expected_seq,
            public_key=key.public_key(),
            signed_head=signed,
        )
        assert (result.ok, result.first_broken) == (False, 2)
        assert result.reason == (
            f"record seq 1 hashes to {forged[:16]}…, but the signed head "
            f"is {records[1]['hash'][:16]}… (the log was rewritten up to this record)"
        )


def test_an_empty_log_anchor_and_truncation_reasons(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = _chain(path)
    assert verify(path, expected_head=GENESIS_HASH, expected_seq=-1).ok
    with pytest.raises(ValueError, match=r"^expected head is 'x'; it must be 64 lowercase hex"):
        verify(path, expected_head="x", expected_seq=0)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]))
    head = records[4]["hash"]
    assert verify(path, expected_head=head, expected_seq=4).reason == (
        f"truncated behind checkpoint head: it anchors seq 4 ({head[:16]}…) but the "
        "log has only 3 intact records"
    )
    # Two anchors past the end: the earlier one is named, whatever its kind.
    key = Ed25519PrivateKey.generate()
    signed = sign_head(key, records[3]["hash"], 3)
    assert verify(
        path,
        expected_head=head,
        expected_seq=4,
        public_key=key.public_key(),
        signed_head=signed,
    ).reason == (
        f"truncated behind signed head: it anchors seq 3 ({records[3]['hash'][:16]}…) but the "
        "log has only 3 intact records"
    )
    path.write_bytes(b"".join(lines[:3]) + b'{"seq":3')
    assert verify(path, expected_head=head, expected_seq=4).reason == (
        f"truncated behind checkpoint head: it anchors seq 4 ({head[:16]}…) but the "
        "log has only 3 intact records; line 4 is a torn tail"
    )


# ---- records and the writer ------------------------------------------------------


def test_make_record_checks_name_the_field() -> None:
    from fl_app.audit import KNOWN_EVENTS, make_record

    with pytest.raises(ValueError, match=r"^seq is -1; it must be an int >= 0$"):
        make_record(-1, TS, "run.start", {}, GENESIS_HASH)
    with pytest.raises(TypeError, match=r"^ts is 5; it must be an ISO-8601 string$"):
        make_record(0, 5, "run.start", {}, GENESIS_HASH)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^prev is 5; it must be 64 lowercase hex characters$"):
        make_record(0, TS, "run.start", {}, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^data is a list; it must be a dict \(JSON object\)$"):
        make_record(0, TS, "run.start", [], GENESIS_HASH)  # type: ignore[arg-type]
    known = ", ".join(sorted(KNOWN_EVENTS))
    with pytest.raises(ValueError) as bad_event:
        make_record(0, TS, "Bad", {}, GENESIS_HASH)
    assert str(bad_event.value).endswith(f"(known: {known})")
    with pytest.raises(
        TypeError,
        match=r"plain JSON types only \(str, int, finite float, bool, None, list, dict with str "
        r"keys\): convert it with int\(\), float\(\), str\(\) or \.item\(\) before logging$",
    ):
        make_record(0, TS, "run.start", {"x": {1, 2}}, GENESIS_HASH)


def test_writer_creates_nested_dirs_with_mode_0644_and_fsyncs_the_new_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    monkeypatch.setattr("fl_app.audit.log.fsync_dir", lambda d: synced.append(Path(d)))
    path = tmp_path / "a" / "b" / "audit.jsonl"
    old_umask = os.umask(0o022)
    try:
        AuditLog(path).close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert synced == [path.parent]  # the new directory entry is made durable
    AuditLog(path).close()
    assert synced == [path.parent]  # reopening creates nothing


def test_writer_refusals_name_the_log_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.append("run.start", {})
        with pytest.raises(
            AuditError,
            match=rf"^audit log {path} is open by another writer \(flock held\); a log has one "
            "writer: close the other AuditLog or use a separate log per process$",
        ):
            AuditLog(path)
    with pytest.raises(
        ValueError,
        match=r"^expected_head=None and expected_seq=0: give both \(the anchor the log must "
        r"contain\) or neither$",
    ):
        AuditLog(path, expected_seq=0)
    with open(path, "ab") as fh:
        fh.write(b'{"seq"')
    with pytest.raises(AuditLogBrokenError) as torn:
        AuditLog(path)
    assert torn.value.result.torn_tail
    assert str(torn.value).endswith(
        f"run `fl-app audit repair {path}` (fl_app.audit.truncate_torn_tail) to remove it"
    )
    path.write_bytes(b"[1]\n")
    with pytest.raises(
        AuditLogBrokenError, match=r"Keep the file as evidence and start a new log$"
    ):
        AuditLog(path)


def test_a_failed_append_names_its_cause_and_blocks_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "EIO")

    monkeypatch.setattr("fl_app.audit.log.os.fsync", failing_fsync)
    with pytest.raises(AuditError, match=r"failed \(\[Errno 5\] EIO\); the record may be partly"):
        log.append("run.start", {})
    monkeypatch.undo()
    with pytest.raises(
        AuditError,
        match=r"an earlier append failed \(\[Errno 5\] EIO\); reopen the log to verify it "
        "before appending$",
    ):
        log.append("run.start", {})
    log.close()


def test_timestamps_are_utc_whatever_the_clock_and_local_zone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time
    from datetime import timedelta

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        plus_two = timezone(timedelta(hours=2))
        clock = lambda: datetime(2024, 5, 1, 14, 0, tzinfo=plus_two)  # noqa: E731
        with AuditLog(tmp_path / "audit.jsonl", clock=clock) as log:
            assert log.append("run.start", {}).ts == "2024-05-01T12:00:00.000000+00:00"
        naive = lambda: datetime(2024, 5, 1)  # noqa: E731
        with (
            AuditLog(tmp_path / "b.jsonl", clock=naive) as log,
            pytest.raises(ValueError, match=r"\(e\.g\. datetime\.now\(timezone\.utc\)\)$"),
        ):
            log.append("run.start", {})
    finally:
        monkeypatch.undo()
        time.tzset()


def test_of_two_anchors_past_the_end_the_earlier_seq_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = _chain(path, n=8)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]))
    # A pair whose later record has the smaller hash: neither the anchors' kind nor
    # their head may decide which one is named, only the seq.
    i, j = next(
        (i, j)
        for i in range(3, 8)
        for j in range(i + 1, 8)
        if records[i]["hash"] > records[j]["hash"]
    )
    key = Ed25519PrivateKey.generate()
    result = verify(
        path,
        expected_head=records[j]["hash"],
        expected_seq=j,
        public_key=key.public_key(),
        signed_head=sign_head(key, records[i]["hash"], i),
    )
    assert result.reason.startswith(f"truncated behind signed head: it anchors seq {i} ")


def test_a_short_write_still_appends_the_whole_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    real_write = os.write
    with AuditLog(path, clock=_fixed_clock()) as log, monkeypatch.context() as patch:
        patch.setattr("fl_app.audit.log.os.write", lambda fd, data: real_write(fd, bytes(data[:7])))
        record = log.append("round.start", {"round": 1})
    assert path.read_bytes() == record.to_line()
    assert verify(path).ok

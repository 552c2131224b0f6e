"""Tests for fl_app.audit: the hash-chained audit log, its verifier, signing and CLI.

The guarantee under test: editing, deleting, inserting or reordering any record, or
truncating the log behind a checkpoint's head, makes :func:`verify` fail and name the
first broken line; a crash's torn tail is reported as such, not as tampering. Changes
at the very end of the log are only detectable against an anchor (checkpoint head or
signed head); the tests pin that limit down too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import stat
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_app.audit import (
    GENESIS_HASH,
    AuditError,
    AuditKeyError,
    AuditLog,
    AuditLogBrokenError,
    AuditRecord,
    TornTailError,
    canonical_json,
    generate_signing_key,
    load_signing_key,
    load_verify_key,
    make_record,
    sign_head,
    truncate_torn_tail,
    verify,
    verify_head_signature,
)
from fl_app.cli.audit import audit_main

N = 5  # records in the standard test log
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def _clock() -> Iterator[datetime]:
    t = T0
    while True:
        yield t
        t += timedelta(seconds=1)


def make_clock() -> Any:
    it = _clock()
    return lambda: next(it)


EVENTS: list[tuple[str, dict[str, Any]]] = [
    ("run.start", {"config_hash": "ab" * 32, "code_version": "0.1.0+gabc", "role": "server"}),
    ("round.start", {"round": 1, "cohort_size": 10}),
    (
        "stage.outcome",
        {"round": 1, "stage": "train", "dropouts": 1, "rejections": {"norm": 2, "nan": 1}},
    ),
    ("privacy.epsilon", {"round": 1, "epsilon": 0.731, "delta": 1e-5, "accountant": "prv"}),
    ("checkpoint.saved", {"round": 1, "files": {"model.safetensors": "cd" * 32}}),
]


def write_log(path: Path, n: int = N) -> list[AuditRecord]:
    with AuditLog(path, clock=make_clock()) as log:
        return [log.append(*EVENTS[i % len(EVENTS)]) for i in range(n)]


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, content: list[bytes]) -> None:
    path.write_bytes(b"".join(content))


def encode(obj: dict[str, Any]) -> bytes:
    return canonical_json(obj) + b"\n"


def rechain(records: list[dict[str, Any]], start: int = 0) -> list[bytes]:
    """Rewrite records from ``start`` on with consistent seq/prev/hash (a forger's job)."""
    prev = records[start - 1]["hash"] if start else GENESIS_HASH
    out: list[bytes] = []
    for i, rec in enumerate(records):
        if i < start:
            out.append(encode(rec))
            continue
        new = make_record(i, rec["ts"], rec["event"], rec["data"], prev)
        out.append(new.to_line())
        prev = new.hash
    return out


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    return path


# ---- writing, reopening, format ---------------------------------------------


def test_append_reopen_continue(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "audit.jsonl"
    with AuditLog(path, clock=make_clock()) as log:
        assert (log.seq, log.records, log.head) == (-1, 0, GENESIS_HASH)
        first = log.append("run.start", {"config_hash": "x"})
        second = log.append("round.start", {"round": 1, "cohort_size": 3})
        assert (log.seq, log.head) == (1, second.hash)
    assert second.prev == first.hash and first.prev == GENESIS_HASH

    with AuditLog(path, clock=make_clock()) as log:
        assert (log.seq, log.head) == (1, second.hash)
        third = log.append("run.end", {"status": "completed"})
    assert (third.seq, third.prev) == (2, second.hash)

    result = verify(path)
    assert result.ok and result.reason == "ok"
    assert (result.records, result.head, result.seq) == (3, third.hash, 2)


def test_record_format_is_canonical_and_hash_covers_body(log_path: Path) -> None:
    raw = lines(log_path)
    assert len(raw) == N
    prev = GENESIS_HASH
    for i, line in enumerate(raw):
        obj = json.loads(line)
        assert set(obj) == {"seq", "ts", "event", "data", "prev", "hash"}
        assert obj["seq"] == i and obj["prev"] == prev
        assert obj["ts"] == (T0 + timedelta(seconds=i)).isoformat(timespec="microseconds")
        body = {k: v for k, v in obj.items() if k != "hash"}
        body_bytes = json.dumps(
            body, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
        assert obj["hash"] == hashlib.sha256(body_bytes).hexdigest()
        assert line == encode(obj)
        prev = obj["hash"]


def test_empty_log_verifies_with_genesis_head(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    AuditLog(path).close()
    result = verify(path)
    assert result.ok and (result.records, result.head, result.seq) == (0, GENESIS_HASH, -1)


def test_unicode_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as log:
        log.append("stage.outcome", {"reason": "zu groß \u2028 ε", "nested": [1, 2.5, None, True]})
    assert verify(path).ok


@pytest.mark.parametrize(
    "data",
    [
        {"eps": float("nan")},
        {"eps": float("inf")},
        {"deep": {"list": [1, float("-inf")]}},
    ],
)
def test_non_finite_floats_are_rejected(tmp_path: Path, data: dict[str, Any]) -> None:
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as log, pytest.raises(ValueError, match="finite"):
        log.append("privacy.epsilon", data)
    assert path.read_bytes() == b""


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"count": np.int64(3)}, r"data\['count'\].*numpy\.int64"),
        ({"stage": {"eps": np.float64(0.5)}}, r"data\['stage'\]\['eps'\].*numpy\.float64"),
        ({"ids": {1, 2}}, r"data\['ids'\].*set"),
        ({"m": {1: "a"}}, r"data\['m'\] has key 1"),
    ],
)
def test_non_json_types_are_rejected_naming_the_key(
    tmp_path: Path, data: dict[str, Any], where: str
) -> None:
    with AuditLog(tmp_path / "a.jsonl") as log, pytest.raises(TypeError, match=where):
        log.append("stage.outcome", data)


@pytest.mark.parametrize("event", ["", "Round.start", "round start", "round..start", "1round", 3])
def test_bad_event_names_are_rejected(tmp_path: Path, event: Any) -> None:
    with AuditLog(tmp_path / "a.jsonl") as log, pytest.raises(ValueError, match="event"):
        log.append(event, {})


def test_unknown_but_well_formed_event_is_allowed(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.jsonl") as log:
        assert log.append("secagg.unmask_done", {}).event == "secagg.unmask_done"


def test_naive_clock_is_rejected(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", clock=lambda: datetime(2024, 1, 1))
    with log, pytest.raises(ValueError, match="timezone-aware"):
        log.append("run.start", {})


def test_second_writer_is_refused(log_path: Path) -> None:
    with AuditLog(log_path), pytest.raises(AuditError, match="another writer"):
        AuditLog(log_path)
    AuditLog(log_path).close()  # free again once the first is closed


def test_failed_write_blocks_further_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(tmp_path / "a.jsonl")

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "EIO")

    monkeypatch.setattr("fl_app.audit.log.os.fsync", failing_fsync)
    with pytest.raises(AuditError, match="failed"):
        log.append("run.start", {})
    monkeypatch.undo()
    with pytest.raises(AuditError, match="earlier append failed"):
        log.append("run.start", {})
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append("run.start", {})


# ---- tampering ----------------------------------------------------------------


def _edited(obj: dict[str, Any], name: str) -> dict[str, Any]:
    new = dict(obj)
    if name == "seq":
        new["seq"] = obj["seq"] + 1
    elif name == "ts":
        new["ts"] = "2030-01-01T00:00:00.000000+00:00"
    elif name == "event":
        new["event"] = "run.end"
    elif name == "data":
        new["data"] = {**obj["data"], "forged": 1}
    elif name in ("prev", "hash"):
        new[name] = "f" * 64 if obj[name] != "f" * 64 else "e" * 64
    return new


@pytest.mark.parametrize("name", ["seq", "ts", "event", "data", "prev", "hash"])
@pytest.mark.parametrize("pos", [0, 2, N - 1])
def test_editing_any_field_of_any_record_is_detected(log_path: Path, pos: int, name: str) -> None:
    raw = lines(log_path)
    raw[pos] = encode(_edited(json.loads(raw[pos]), name))
    write_lines(log_path, raw)
    result = verify(log_path)
    assert not result.ok and not result.torn_tail
    assert result.first_broken == pos + 1
    assert result.records == pos


@pytest.mark.parametrize("pos", [0, 2])
def test_edit_with_recomputed_hash_breaks_the_next_link(log_path: Path, pos: int) -> None:
    raw = lines(log_path)
    obj = _edited(json.loads(raw[pos]), "data")
    raw[pos] = make_record(obj["seq"], obj["ts"], obj["event"], obj["data"], obj["prev"]).to_line()
    write_lines(log_path, raw)
    result = verify(log_path)
    assert not result.ok and result.first_broken == pos + 2
    assert "prev link" in result.reason


def test_edit_of_last_record_with_recomputed_hash_needs_the_anchor(log_path: Path) -> None:
    anchor = verify(log_path)
    raw = lines(log_path)
    obj = _edited(json.loads(raw[-1]), "data")
    raw[-1] = make_record(obj["seq"], obj["ts"], obj["event"], obj["data"], obj["prev"]).to_line()
    write_lines(log_path, raw)
    # The file alone is a valid chain: nothing after the edited record links to it.
    assert verify(log_path).ok
    result = verify(log_path, expected_head=anchor.head, expected_seq=anchor.seq)
    assert not result.ok and result.first_broken == N
    assert "checkpoint head" in result.reason


@pytest.mark.parametrize("pos", [0, 2])
def test_deleting_first_or_middle_record_is_detected(log_path: Path, pos: int) -> None:
    raw = lines(log_path)
    del raw[pos]
    write_lines(log_path, raw)
    result = verify(log_path)
    assert not result.ok and result.first_broken == pos + 1
    assert f"seq is {pos + 1}, expected {pos}" in result.reason


def test_deleting_the_last_record_is_detected_only_against_an_anchor(log_path: Path) -> None:
    anchor = verify(log_path)
    write_lines(log_path, lines(log_path)[:-1])
    # Deleting the tail leaves a valid, shorter chain: only an external anchor
    # (a checkpoint manifest's head, a signed head) can tell.
    assert verify(log_path).ok
    result = verify(log_path, expected_head=anchor.head, expected_seq=anchor.seq)
    assert not result.ok and result.first_broken == N
    assert result.reason.startswith("truncated behind checkpoint head")


@pytest.mark.parametrize("pos", [0, 2, N - 1])
def test_inserting_a_forged_record_with_valid_hash_is_detected(log_path: Path, pos: int) -> None:
    raw = lines(log_path)
    prev = json.loads(raw[pos - 1])["hash"] if pos else GENESIS_HASH
    forged = make_record(pos, "2024-05-01T12:00:00.500000+00:00", "round.start", {"x": 1}, prev)
    raw.insert(pos, forged.to_line())
    write_lines(log_path, raw)
    result = verify(log_path)
    # The forged record itself is a perfect link; the record after it is not.
    assert not result.ok and result.first_broken == pos + 2
    assert result.records == pos + 1


def test_insert_near_the_end_with_rechained_tail_needs_the_anchor(log_path: Path) -> None:
    anchor = verify(log_path)
    objs = [json.loads(line) for line in lines(log_path)]
    objs.insert(N - 1, {**objs[1], "data": {"forged": True}})
    write_lines(log_path, rechain(objs, start=N - 1))
    assert verify(log_path).ok  # a consistent rewrite of the tail
    result = verify(log_path, expected_head=anchor.head, expected_seq=anchor.seq)
    assert not result.ok and result.first_broken == N


def test_records_after_the_newest_anchor_are_not_protected(log_path: Path) -> None:
    """The limit of any append-only log: a forged append after the last anchor verifies."""
    anchor = verify(log_path)
    forged = make_record(N, "2024-05-02T00:00:00.000000+00:00", "run.end", {}, anchor.head)
    with log_path.open("ab") as fh:
        fh.write(forged.to_line())
    assert verify(log_path, expected_head=anchor.head, expected_seq=anchor.seq).ok


@pytest.mark.parametrize(("i", "j"), [(0, 1), (1, 3), (N - 2, N - 1)])
def test_reordering_records_is_detected(log_path: Path, i: int, j: int) -> None:
    raw = lines(log_path)
    raw[i], raw[j] = raw[j], raw[i]
    write_lines(log_path, raw)
    result = verify(log_path)
    assert not result.ok and result.first_broken == i + 1


@pytest.mark.parametrize("keep", [0, 1, 3])
def test_truncation_behind_checkpoint_head_is_detected(log_path: Path, keep: int) -> None:
    head_seq = 3
    head = json.loads(lines(log_path)[head_seq])["hash"]
    assert verify(log_path, expected_head=head, expected_seq=head_seq).ok
    write_lines(log_path, lines(log_path)[:keep])
    result = verify(log_path, expected_head=head, expected_seq=head_seq)
    assert not result.ok and not result.torn_tail
    assert result.first_broken == keep + 1 and result.records == keep
    assert result.reason.startswith("truncated behind checkpoint head")


def test_truncation_mid_line_behind_checkpoint_is_not_passed_off_as_torn(log_path: Path) -> None:
    anchor = verify(log_path)
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-10])  # cut inside the anchored last record
    result = verify(log_path, expected_head=anchor.head, expected_seq=anchor.seq)
    assert not result.ok and not result.torn_tail
    assert "truncated behind checkpoint head" in result.reason and "torn tail" in result.reason


def test_whole_log_rewritten_is_caught_by_the_anchor(log_path: Path) -> None:
    head_seq = 1
    head = json.loads(lines(log_path)[head_seq])["hash"]
    objs = [json.loads(line) for line in lines(log_path)]
    objs[0]["data"] = {"config_hash": "forged"}
    write_lines(log_path, rechain(objs))
    assert verify(log_path).ok
    result = verify(log_path, expected_head=head, expected_seq=head_seq)
    assert not result.ok and result.first_broken == head_seq + 1


# ---- malformed content never raises --------------------------------------------


def _good(path: Path) -> dict[str, Any]:
    return json.loads(lines(path)[1])


MALFORMED: dict[str, Any] = {
    "not json": lambda o: b"this is not json\n",
    "json array": lambda o: b"[1,2,3]\n",
    "empty line": lambda o: b"\n",
    "invalid utf8": lambda o: encode(o)[:-2] + b"\xff}\n",
    "missing field": lambda o: encode({k: v for k, v in o.items() if k != "ts"}),
    "extra field": lambda o: encode({**o, "extra": 1}),
    "seq is str": lambda o: encode({**o, "seq": "1"}),
    "seq is bool": lambda o: encode({**o, "seq": True}),
    "data is list": lambda o: encode({**o, "data": [1]}),
    "hash upper": lambda o: encode({**o, "hash": o["hash"].upper()}),
    "ts not iso": lambda o: encode({**o, "ts": "yesterday"}),
    "ts naive": lambda o: encode({**o, "ts": "2024-05-01T12:00:01"}),
    "NaN literal": lambda o: encode(o).replace(b'"data":{', b'"data":{"x":NaN,'),
    "huge float": lambda o: encode(o).replace(b'"data":{', b'"data":{"x":1e400,'),
    "lone surrogate": lambda o: encode(o).replace(b'"data":{', b'"data":{"x":"\\ud800",'),
    "whitespace": lambda o: json.dumps(o, sort_keys=True).encode() + b"\n",
    "key order": lambda o: (
        json.dumps(dict(reversed(o.items())), separators=(",", ":")).encode() + b"\n"
    ),
    "deep nesting": lambda o: b'{"data":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_line_is_the_first_broken_link(log_path: Path, kind: str) -> None:
    raw = lines(log_path)
    raw[1] = MALFORMED[kind](_good(log_path))
    write_lines(log_path, raw)
    result = verify(log_path)
    assert not result.ok and not result.torn_tail
    assert (result.first_broken, result.records) == (2, 1)


def test_duplicate_keys_make_a_line_broken(log_path: Path) -> None:
    raw = lines(log_path)
    obj = _good(log_path)
    # Same parsed value either way, so only the duplicate check can object.
    raw[1] = encode(obj).replace(b'"event":', b'"seq":1,"event":', 1)
    write_lines(log_path, raw)
    result = verify(log_path)
    assert not result.ok and result.first_broken == 2
    assert "duplicate key 'seq'" in result.reason


# ---- torn tail versus tampering --------------------------------------------------


def test_torn_tail_is_reported_as_torn_not_tampered(log_path: Path) -> None:
    intact = verify(log_path)
    partial = b'{"data":{"round":2},"event":"round.st'
    with log_path.open("ab") as fh:
        fh.write(partial)
    result = verify(log_path)
    assert not result.ok and result.torn_tail
    assert (result.first_broken, result.records, result.head) == (N + 1, N, intact.head)
    assert result.reason.startswith("torn tail")

    with pytest.raises(TornTailError, match="fl-app audit repair"):
        AuditLog(log_path)

    removed = truncate_torn_tail(log_path, clock=make_clock())
    assert removed == partial
    repaired = verify(log_path)
    assert repaired.ok and repaired.records == N + 1
    last = json.loads(lines(log_path)[-1])
    assert last["event"] == "audit.repair"
    assert last["data"] == {
        "removed_bytes": len(partial),
        "removed_sha256": hashlib.sha256(partial).hexdigest(),
    }
    assert last["prev"] == intact.head


def test_a_full_record_without_its_newline_is_torn(log_path: Path) -> None:
    log_path.write_bytes(log_path.read_bytes()[:-1])
    result = verify(log_path)
    assert result.torn_tail and result.first_broken == N


def test_tampering_before_a_torn_tail_is_reported_as_tampering(log_path: Path) -> None:
    raw = lines(log_path)
    raw[1] = encode(_edited(json.loads(raw[1]), "data"))
    write_lines(log_path, [*raw, b'{"partial'])
    result = verify(log_path)
    assert not result.torn_tail and result.first_broken == 2
    before = log_path.read_bytes()
    with pytest.raises(AuditLogBrokenError, match="only a torn tail"):
        truncate_torn_tail(log_path)
    assert log_path.read_bytes() == before


def test_truncate_torn_tail_leaves_an_intact_log_alone(log_path: Path) -> None:
    before = log_path.read_bytes()
    assert truncate_torn_tail(log_path) == b""
    assert log_path.read_bytes() == before


def test_refuses_to_append_to_a_broken_log(log_path: Path) -> None:
    raw = lines(log_path)
    raw[2] = encode(_edited(json.loads(raw[2]), "ts"))
    write_lines(log_path, raw)
    before = log_path.read_bytes()
    with pytest.raises(AuditLogBrokenError, match="broken at line 3") as info:
        AuditLog(log_path)
    assert info.value.result.first_broken == 3
    assert log_path.read_bytes() == before


def test_refuses_to_open_a_log_missing_its_anchor(log_path: Path) -> None:
    anchor = verify(log_path)
    write_lines(log_path, lines(log_path)[:-1])
    with pytest.raises(AuditLogBrokenError, match="truncated behind checkpoint head"):
        AuditLog(log_path, expected_head=anchor.head, expected_seq=anchor.seq)
    AuditLog(log_path).close()


def test_anchor_arguments_are_checked(log_path: Path) -> None:
    with pytest.raises(ValueError, match="give both"):
        verify(log_path, expected_head="0" * 64)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        verify(log_path, expected_head="xyz", expected_seq=1)


# ---- signing --------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private = tmp_path / "keys" / "audit.pem"
    generate_signing_key(private)
    return private, Path(f"{private}.pub")


def test_signed_head_verifies_and_anchors(log_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = load_signing_key(keys[0]), load_verify_key(keys[1])
    state = verify(log_path)
    signed = sign_head(private, state.head, state.seq)
    assert json.loads(json.dumps(signed)) == signed
    assert verify_head_signature(public, signed)
    assert verify(log_path, public_key=public, signed_head=signed).ok

    write_lines(log_path, lines(log_path)[:-1])
    result = verify(log_path, public_key=public, signed_head=signed)
    assert not result.ok and result.reason.startswith("truncated behind signed head")


def test_bad_signatures_are_detected(log_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = load_signing_key(keys[0]), load_verify_key(keys[1])
    state = verify(log_path)
    signed = sign_head(private, state.head, state.seq)
    other = Ed25519PrivateKey.generate()
    flipped = signed["signature"][:-1] + ("0" if signed["signature"][-1] != "0" else "1")
    bad = [
        {**signed, "signature": flipped},
        {**signed, "seq": state.seq - 1},
        {**signed, "head": "0" * 64},
        sign_head(other, state.head, state.seq),
        {k: v for k, v in signed.items() if k != "signature"},
        {**signed, "signature": "zz"},
        {**signed, "alg": "rsa"},
    ]
    for signed_bad in bad:
        assert not verify_head_signature(public, signed_bad)
    result = verify(log_path, public_key=public, signed_head=bad[0])
    assert not result.ok and result.first_broken is None
    assert result.reason.startswith("bad signature")


def test_key_files_and_errors(
    tmp_path: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    private, _ = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(AuditKeyError, match="already exists"):
        generate_signing_key(private)
    with pytest.raises(AuditKeyError, match="holds a private key"):
        load_verify_key(private)
    with pytest.raises(AuditKeyError, match="cannot read"):
        load_signing_key(tmp_path / "missing.pem")

    monkeypatch.setenv("AUDIT_PASS", "correct horse")
    enc = tmp_path / "enc.pem"
    key = generate_signing_key(enc, passphrase_env="AUDIT_PASS")
    loaded = load_signing_key(enc, passphrase_env="AUDIT_PASS")
    assert loaded.public_key().public_bytes_raw() == key.public_key().public_bytes_raw()
    with pytest.raises(AuditKeyError, match="passphrase_env"):
        load_signing_key(enc)
    with pytest.raises(AuditKeyError, match="NO_SUCH_VAR"):
        load_signing_key(enc, passphrase_env="NO_SUCH_VAR")
    monkeypatch.setenv("AUDIT_PASS", "wrong")
    with pytest.raises(AuditKeyError, match="wrong passphrase"):
        load_signing_key(enc, passphrase_env="AUDIT_PASS")

    ec_pem = tmp_path / "ec.pem"
    ec_pem.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(AuditKeyError, match="Ed25519"):
        load_signing_key(ec_pem)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(AuditKeyError, match="not a readable PEM"):
        load_verify_key(garbage)


# ---- command line ----------------------------------------------------------------


def test_cli_verify_ok_and_broken(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head = verify(log_path).head
    assert audit_main(["verify", str(log_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK ") and f"{N} records, head {head} (seq {N - 1})" in out

    assert audit_main(["verify", str(log_path), "--head", head.upper(), "--seq", str(N - 1)]) == 0
    capsys.readouterr()

    raw = lines(log_path)
    del raw[2]
    write_lines(log_path, raw)
    assert audit_main(["verify", str(log_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("BROKEN ") and "line 3:" in out


def test_cli_truncated_torn_and_repair(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head = verify(log_path).head
    write_lines(log_path, lines(log_path)[:-1])
    assert audit_main(["verify", str(log_path), "--head", head, "--seq", str(N - 1)]) == 1
    assert "truncated behind checkpoint head" in capsys.readouterr().out

    with log_path.open("ab") as fh:
        fh.write(b'{"da')
    assert audit_main(["verify", str(log_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("TORN ") and "fl-app audit repair" in out
    assert audit_main(["repair", str(log_path)]) == 0
    assert "removed a torn tail of 4 bytes" in capsys.readouterr().out
    assert audit_main(["verify", str(log_path)]) == 0


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["verify"],
        ["verify", "LOG", "--head", "0" * 64],
        ["verify", "LOG", "--seq", "1"],
        ["verify", "LOG", "--head", "nothex", "--seq", "1"],
        ["verify", "LOG", "--public-key", "k.pub"],
        ["verify", "LOG", "--seq", "one", "--head", "0" * 64],
        ["verify", "MISSING"],
    ],
)
def test_cli_usage_errors_exit_2(
    log_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(log_path) if a == "LOG" else a for a in argv]
    argv = [str(log_path.parent / "missing.jsonl") if a == "MISSING" else a for a in argv]
    assert audit_main(argv) == 2
    assert capsys.readouterr().err


def test_cli_keygen_sign_verify(
    tmp_path: Path, log_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, pub, signed = tmp_path / "k.pem", tmp_path / "k.pem.pub", tmp_path / "head.json"
    assert audit_main(["keygen", str(key)]) == 0
    assert audit_main(["sign", str(log_path), "--key", str(key), "-o", str(signed)]) == 0
    argv = ["verify", str(log_path), "--public-key", str(pub), "--signed-head", str(signed)]
    assert audit_main(argv) == 0
    capsys.readouterr()

    doc = json.loads(signed.read_text())
    doc["seq"] -= 1
    signed.write_text(json.dumps(doc))
    assert audit_main(argv) == 1
    assert "bad signature" in capsys.readouterr().out
    signed.write_text("{not json")
    assert audit_main(argv) == 2


# ---- property: any single-byte change is detected ---------------------------------


@functools.cache
def _reference_log() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.jsonl"
        write_log(path, 4)
        return path.read_bytes()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_single_byte_change_is_detected(data: st.DataObject) -> None:
    original = _reference_log()
    pos = data.draw(st.integers(0, len(original) - 1), label="pos")
    op = data.draw(st.sampled_from(["replace", "insert", "delete"]), label="op")
    if op == "replace":
        byte = data.draw(st.integers(0, 255).filter(lambda b: b != original[pos]), label="byte")
        changed = original[:pos] + bytes([byte]) + original[pos + 1 :]
    elif op == "insert":
        byte = data.draw(st.integers(0, 255), label="byte")
        changed = original[:pos] + bytes([byte]) + original[pos:]
    else:
        changed = original[:pos] + original[pos + 1 :]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.jsonl"
        path.write_bytes(changed)
        result = verify(path)
    assert not result.ok
    assert result.first_broken is not None
    # Nothing before the change is blamed: the line holding it is the first broken one,
    # or the next when a newline was inserted right before a newline (an empty line).
    line = original[:pos].count(b"\n") + 1
    assert result.first_broken in (line, line + 1)

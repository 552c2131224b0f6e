"""Unit tests of fl_app.secagg.signing: the signed messages' exact bytes, the roster and
key files a site trusts, and the simulated identities (malicious server model).

Expected bytes are written out from the documented formats (label, big-endian fields,
length-prefixed identity), digests and derived keys recomputed from their formulas with
hashlib / cryptography directly: a change of format, label or check fails here, not
only in a federation test.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fl_app.secagg import signing
from fl_app.secagg.protocol import round_context

POSIX = os.name == "posix"
C_PK = bytes(range(32))
S_PK = bytes(range(32, 64))


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _keys(n: int) -> list[Ed25519PrivateKey]:
    return [Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i in range(n)]


# ---------------------------------------------------------------- signed messages
def test_key_advert_message_is_label_ids_identity_and_keys() -> None:
    got = signing.key_advert_message(1, 2, 3, "ab", C_PK, S_PK)
    want = (
        b"fl-app/secagg/key-advert/v1"
        + b"\x00\x00\x00\x00\x00\x00\x00\x01"  # run id
        + b"\x00\x00\x00\x00\x00\x00\x00\x02"  # round
        + b"\x00\x00\x00\x00\x00\x00\x00\x03"  # node
        + b"\x02ab"  # identity, length-prefixed
        + C_PK
        + S_PK
    )
    assert got == want


def test_node_ids_and_run_ids_are_unsigned_64_bit() -> None:
    # Flower node ids are uint64: the top of the range must encode, not overflow.
    top = 2**64 - 1
    got = signing.key_advert_message(top, 1, top, "a", C_PK, S_PK)
    assert (
        got[len(b"fl-app/secagg/key-advert/v1") :][:24]
        == b"\xff" * 8 + (1).to_bytes(8, "big") + b"\xff" * 8
    )
    ctx = b"\x01" * 40_000  # a length above 2**15 still encodes as two unsigned bytes
    msg = signing.survivors_message(ctx, top, "a", C_PK + S_PK, [top, 0])
    head = len(b"fl-app/secagg/survivors/v1")
    assert msg[head : head + 2] == b"\x9c\x40"
    assert msg[head + 2 + 40_000 :][:8] == b"\xff" * 8
    assert msg.endswith(b"\x00\x00\x00\x02" + b"\x00" * 8 + b"\xff" * 8)


def test_survivors_message_sorts_and_dedups_the_set_and_binds_the_round_keys() -> None:
    ctx = b"\x07" * 5
    got = signing.survivors_message(ctx, 9, "s-1", C_PK + S_PK, [5, 2, 5, 3])
    want = (
        b"fl-app/secagg/survivors/v1"
        + b"\x00\x05"
        + ctx
        + b"\x00" * 7
        + b"\x09"
        + b"\x03s-1"
        + C_PK
        + S_PK
        + b"\x00\x00\x00\x03"
        + b"\x00" * 7
        + b"\x02"
        + b"\x00" * 7
        + b"\x03"
        + b"\x00" * 7
        + b"\x05"
    )
    assert got == want
    assert signing.survivors_message(ctx, 9, "s-1", C_PK + S_PK, [3, 5, 2]) == want


@pytest.mark.parametrize("size", [0, 63, 65])
def test_survivors_message_refuses_round_keys_of_another_size(size: int) -> None:
    with pytest.raises(signing.RosterError, match="64 bytes"):
        signing.survivors_message(b"c", 1, "a", b"\x01" * size, [1])


@pytest.mark.parametrize(
    "identity",
    ["a", "A", "0", "_", "-", "a.b", "x" * 64, "site_1-b.c"],
)
def test_identities_of_one_to_64_allowed_characters_are_accepted(identity: str) -> None:
    msg = signing.key_advert_message(0, 0, 0, identity, C_PK, S_PK)
    prefix = len(b"fl-app/secagg/key-advert/v1") + 24
    assert msg[prefix] == len(identity)
    assert msg[prefix + 1 : prefix + 1 + len(identity)] == identity.encode()


@pytest.mark.parametrize("index", range(7))
def test_identities_outside_the_alphabet_or_length_are_refused(index: int) -> None:
    identity = ["", "x" * 65, ".hidden", "a b", "a/b", "é", "a\n"][index]
    with pytest.raises(signing.RosterError, match=r"1-64 letters.*\(not starting with '\.'\)$"):
        signing.key_advert_message(0, 0, 0, identity, C_PK, S_PK)


def test_a_non_string_identity_is_refused() -> None:
    with pytest.raises(signing.RosterError):
        signing.key_advert_message(0, 0, 0, 7, C_PK, S_PK)  # type: ignore[arg-type]


def test_parse_context_reads_run_and_round_of_a_round_context() -> None:
    ctx = round_context(2**64 - 1, 12, nonce=b"\x00" * 16)
    assert signing.parse_context(ctx) == (2**64 - 1, 12)
    label = b"fl-app/secagg/round/v1"
    exact = label + (5).to_bytes(8, "big") + (6).to_bytes(8, "big")
    assert signing.parse_context(exact) == (5, 6)  # label + 16 bytes is enough
    refused = r"^round context is not an fl-app secure-aggregation context$"
    with pytest.raises(signing.RosterError, match=refused):
        signing.parse_context(exact[:-1])
    with pytest.raises(signing.RosterError, match=refused):
        signing.parse_context(b"fl-app/secagg/round/v2" + exact[len(label) :])


# ---------------------------------------------------------------- signer, verification
def test_signer_signs_under_its_public_key_and_checks_its_identity() -> None:
    key = _keys(1)[0]
    signer = signing.Signer("site-a", key)
    assert signer.public_bytes() == _raw(key)
    sig = signer.sign(b"m")
    assert len(sig) == signing.SIGNATURE_BYTES
    assert signing.verify_raw(_raw(key), b"m", sig)
    assert not signing.verify_raw(_raw(key), b"n", sig)
    assert not signing.verify_raw(_raw(key)[:31], b"m", sig)  # not a key: False, no raise
    with pytest.raises(signing.RosterError):
        signing.Signer(".bad", key)


def test_roster_verify_needs_a_listed_identity_and_a_64_byte_signature() -> None:
    a, b = _keys(2)
    roster = signing.FileRoster({"a": _raw(a), "b": _raw(b)})
    sig = a.sign(b"m")
    assert roster.verify("a", b"m", sig)
    assert not roster.verify("b", b"m", sig)  # another site's key
    assert not roster.verify("c", b"m", sig)  # not on the roster
    assert not roster.verify("a", b"x", sig)
    assert not roster.verify("a", b"m", sig[:63])
    assert not roster.verify("a", b"m", sig + b"\x00")
    assert not roster.verify("a", b"m", bytearray(sig))  # only bytes


def test_roster_verify_is_false_when_the_lookup_refuses() -> None:
    class Refusing(signing.Roster):
        def public_key(self, identity: str) -> None:
            raise signing.RosterError("no")

    assert not Refusing().verify("a", b"m", b"\x00" * 64)
    with pytest.raises(NotImplementedError):
        signing.Roster().public_key("a")


# ---------------------------------------------------------------- the roster file
def test_file_roster_digest_is_sha256_over_sorted_length_prefixed_entries() -> None:
    a, b = _keys(2)
    roster = signing.FileRoster({"zeta": _raw(a), "al": _raw(b)})
    h = hashlib.sha256(b"fl-app/secagg/roster/v1")
    h.update(b"\x00\x00\x00\x02al" + _raw(b))
    h.update(b"\x00\x00\x00\x04zeta" + _raw(a))
    assert roster.digest() == h.digest()
    assert signing.FileRoster({"al": _raw(b), "zeta": _raw(a)}).digest() == h.digest()
    assert signing.FileRoster({"zeta": _raw(b), "al": _raw(a)}).digest() != h.digest()
    assert len(roster) == 2


def test_file_roster_refuses_one_key_for_two_sites_and_bad_identities() -> None:
    (a,) = _keys(1)
    with pytest.raises(signing.RosterError, match="'b' reuses another site's key"):
        signing.FileRoster({"a": _raw(a), "b": _raw(a)})
    with pytest.raises(signing.RosterError):
        signing.FileRoster({"a b": _raw(a)})


def _write(path: Path, text: str, mode: int) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_load_roster_reads_hex_keys(tmp_path: Path) -> None:
    a, b = _keys(2)
    path = _write(
        tmp_path / "roster.json",
        json.dumps({"a": _raw(a).hex(), "b": _raw(b).hex().upper()}),
        0o644,
    )
    roster = signing.load_roster(path)
    assert len(roster) == 2
    assert roster.verify("a", b"m", a.sign(b"m"))
    assert roster.verify("b", b"m", b.sign(b"m"))


@pytest.mark.skipif(not POSIX, reason="file modes")
@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o624])
def test_load_roster_refuses_a_file_others_may_write(tmp_path: Path, mode: int) -> None:
    (a,) = _keys(1)
    path = _write(tmp_path / "r.json", json.dumps({"a": _raw(a).hex()}), mode)
    with pytest.raises(signing.RosterError, match=f"mode {mode:o}.*chmod 644"):
        signing.load_roster(path)


@pytest.mark.skipif(not POSIX, reason="file modes")
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o604, 0o444, 0o645, 0o651])
def test_load_roster_accepts_a_file_only_its_owner_may_write(tmp_path: Path, mode: int) -> None:
    (a,) = _keys(1)
    path = _write(tmp_path / "r.json", json.dumps({"a": _raw(a).hex()}), mode)
    assert len(signing.load_roster(path)) == 1


@pytest.mark.parametrize("index", range(7))
def test_load_roster_names_the_file_and_the_fault(tmp_path: Path, index: int) -> None:
    (a,) = _keys(1)
    text, match = [
        ("{", "cannot read it as JSON"),
        ("{}", "non-empty object"),
        ("[1]", "non-empty object"),
        (
            json.dumps({"a": _raw(a).hex()[:-2]}),
            r"entry 'a' must be 64 hex digits \(an Ed25519 public key, as "
            r"`fl-app deploy node-key` prints\)$",
        ),
        (json.dumps({"a": _raw(a).hex() + "00"}), "entry 'a' must be 64 hex digits"),
        (json.dumps({"a": "zz" * 32}), "entry 'a' must be 64 hex digits"),
        (json.dumps({"a": 5}), "entry 'a' must be 64 hex digits"),
    ][index]
    path = _write(tmp_path / "r.json", text, 0o644)
    with pytest.raises(signing.RosterError, match=match) as err:
        signing.load_roster(path)
    assert str(path) in str(err.value)


def test_load_roster_refuses_a_missing_file_and_a_shared_key(tmp_path: Path) -> None:
    with pytest.raises(signing.RosterError, match="cannot read it as JSON"):
        signing.load_roster(tmp_path / "absent.json")
    (a,) = _keys(1)
    path = _write(tmp_path / "r.json", json.dumps({"a": _raw(a).hex(), "b": _raw(a).hex()}), 0o644)
    with pytest.raises(signing.RosterError, match=r"r\.json: roster identity 'b' reuses"):
        signing.load_roster(path)


# ---------------------------------------------------------------- the signing key file
def test_signing_key_round_trips_through_pem(tmp_path: Path) -> None:
    (a,) = _keys(1)
    pem = signing.signing_key_pem(a)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    path = tmp_path / "site.sign"
    path.write_bytes(pem)
    path.chmod(0o600)
    assert _raw(signing.load_signing_key(path)) == _raw(a)


@pytest.mark.skipif(not POSIX, reason="file modes")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o610, 0o601, 0o644])
def test_a_signing_key_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "site.sign"
    path.write_bytes(signing.signing_key_pem(_keys(1)[0]))
    path.chmod(mode)
    with pytest.raises(signing.RosterError, match=f"mode {mode:o}.*chmod 600"):
        signing.load_signing_key(path)
    path.chmod(0o400)
    assert signing.load_signing_key(path) is not None


def test_load_signing_key_refuses_what_is_not_an_ed25519_pem(tmp_path: Path) -> None:
    with pytest.raises(signing.RosterError, match="cannot load it"):
        signing.load_signing_key(tmp_path / "absent.sign")
    junk = tmp_path / "junk.sign"
    junk.write_bytes(b"not a key")
    junk.chmod(0o600)
    with pytest.raises(signing.RosterError, match="cannot load it"):
        signing.load_signing_key(junk)
    other = tmp_path / "ed448.sign"
    other.write_bytes(
        Ed448PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    other.chmod(0o600)
    with pytest.raises(signing.RosterError, match="not an Ed25519 key"):
        signing.load_signing_key(other)


# ---------------------------------------------------------------- simulated identities
def test_simulated_keys_are_hkdf_of_the_process_secret() -> None:
    secret = bytes(range(16))
    roster = signing.SimulationRoster(secret)
    seed = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"fl-app/secagg/simulation-identity/v1",
        info=b"partition-3",
    ).derive(secret)
    want = _raw(Ed25519PrivateKey.from_private_bytes(seed))
    signer = roster.signer("partition-3")
    assert signer.identity == "partition-3"
    assert signer.public_bytes() == want
    assert roster.signer("partition-3").key is signer.key  # derived once
    key = roster.public_key("partition-3")
    assert key is not None and key.public_bytes_raw() == want
    assert roster.public_key("partition-3") is key
    assert roster.verify("partition-3", b"m", signer.sign(b"m"))
    other = signing.SimulationRoster(bytes(range(1, 17)))
    assert other.signer("partition-3").public_bytes() != want


@pytest.mark.parametrize("index", range(4))
def test_simulated_identities_are_partition_ids_only(index: int) -> None:
    name = ["site-a", "partition-", "partition-1234567890123", "partition-1x"][index]
    roster = signing.SimulationRoster(b"\x01" * 16)
    with pytest.raises(signing.RosterError, match="partition-<id>"):
        roster.signer(name)
    assert roster.public_key(name) is None
    assert roster.signer("partition-123456789012").identity == "partition-123456789012"


def test_the_simulation_secret_exists_only_where_an_entry_point_drew_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = signing.SIMULATION_SECRET_ENV
    monkeypatch.delenv(env, raising=False)
    assert not signing.in_simulation()
    with pytest.raises(signing.RosterError, match="not started by a simulation"):
        signing.simulation_secret()
    with pytest.raises(signing.RosterError):
        signing.SimulationRoster()
    secret = signing.start_simulation_roster()
    assert signing.in_simulation()
    assert len(secret) == 32 and os.environ[env] == secret.hex()
    assert signing.start_simulation_roster() == secret  # drawn once per process tree
    assert signing.SimulationRoster().secret == secret


@pytest.mark.parametrize("index", range(4))
def test_the_simulation_secret_must_be_16_bytes_of_hex(
    monkeypatch: pytest.MonkeyPatch, index: int
) -> None:
    value, ok = [("ab" * 15, False), ("ab" * 16, True), ("zz" * 16, False), ("", False)][index]
    monkeypatch.setenv(signing.SIMULATION_SECRET_ENV, value)
    if ok:
        assert signing.simulation_secret() == bytes.fromhex(value)
    else:
        with pytest.raises(signing.RosterError, match="at least 32 hex digits"):
            signing.simulation_secret()

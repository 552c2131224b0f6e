"""Ed25519 signatures over an audit log's head (RFC 8032), and the keys that make them.

A signed ``(seq, head)`` is an external anchor: it fixes the log up to ``seq`` against
anyone who does not hold the private key (:func:`fl_app.audit.chain.verify`). Keys are
PEM files (PKCS#8 private, SubjectPublicKeyInfo public), never pickled; an encrypted
private key's passphrase comes from an environment variable, never from a config file.
"""

from __future__ import annotations

import os
import re
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fl_app.atomic import fsync_dir
from fl_app.audit.record import HEX64, check_anchor_args, sha256_hex

__all__ = [
    "HEAD_SIGNATURE_DOMAIN",
    "AuditKeyError",
    "generate_signing_key",
    "load_signing_key",
    "load_verify_key",
    "sign_head",
    "verify_head_signature",
]

# Signed message: domain || seq (8-byte big-endian, signed) || head (32 raw bytes).
HEAD_SIGNATURE_DOMAIN = b"fl-app-audit-head-v1\x00"


class AuditKeyError(ValueError):
    """A signing or verification key cannot be loaded or written."""


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
    check_anchor_args(head_hex, seq, "signed")
    signature = private_key.sign(_head_message(head_hex, seq))
    return {
        "alg": "ed25519",
        "seq": seq,
        "head": head_hex,
        "key_id": sha256_hex(_raw_public(private_key.public_key())),
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
    if not isinstance(head, str) or not HEX64.fullmatch(head):
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
    fsync_dir(path.parent)


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

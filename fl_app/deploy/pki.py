"""Certificates and keys of a federation (``cryptography``, never the openssl CLI).

The CA and the SuperLink's TLS certificate (coordinator), each site's SuperNode
authentication key and Ed25519 signing key, and the roster of signing keys the sites
agree on out of band. Secrets are written 0600 from the start and never overwritten
without ``force`` (replacing a CA or key invalidates everything issued with it).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_app.deploy import DeployError

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "DEFAULT_SANS",
    "SERVER_CERT",
    "SERVER_KEY",
    "create_ca",
    "create_node_key",
    "create_server_cert",
    "create_signing_key",
    "write_roster",
]

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
DEFAULT_SANS = ("127.0.0.1", "::1", "localhost")


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600 from the start (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _refuse_overwrite(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise DeployError(
            f"refusing to overwrite {', '.join(existing)}; pass --force to replace "
            "(replacing a CA or key invalidates everything issued with the old one)"
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_usage(*, ca: bool) -> Any:
    """A CA signs certificates (and CRLs); the SuperLink's key signs and agrees keys (TLS)."""
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _pkcs8_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def create_ca(
    out_dir: str | os.PathLike[str],
    common_name: str = "fl-app federation CA",
    days: int = 3650,
    force: bool = False,
) -> tuple[Path, Path]:
    """Create a self-signed CA (ECDSA P-384, SHA-384); returns (cert, key) paths.

    The key signs the SuperLink's certificate; SuperNodes and the ``flwr`` CLI pin the
    certificate (``--root-certificates`` / ``root-certificates``).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if days < 1:
        raise DeployError(f"days must be >= 1, got {days}")
    out = Path(out_dir)
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    _refuse_overwrite([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(key_path, _pkcs8_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _san_entries(names: Sequence[str]) -> list[Any]:
    from cryptography import x509

    if not names:
        raise DeployError("a server certificate needs at least one --san (host name or IP)")
    out: list[Any] = []
    for raw in names:
        name = raw.strip()
        if not name:
            raise DeployError(f"empty subjectAltName in {list(names)!r}")
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?", name):
                raise DeployError(
                    f"subjectAltName {name!r} is neither an IP address nor a DNS name"
                ) from None
            out.append(x509.DNSName(name))
    return out


def create_server_cert(
    ca_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    sans: Sequence[str] = DEFAULT_SANS,
    days: int = 365,
    force: bool = False,
) -> tuple[Path, Path]:
    """Issue the SuperLink's TLS certificate, signed by the CA in ``ca_dir``.

    ``sans`` must list every address SuperNodes and the ``flwr`` CLI use to reach the
    SuperLink (IP addresses become iPAddress entries, names dNSName entries): TLS
    clients check the address they dial against these, not against the CN.
    Returns (cert, key) paths.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = Path(ca_dir)
    ca_cert_path, ca_key_path = ca / CA_CERT, ca / CA_KEY
    if not ca_cert_path.is_file() or not ca_key_path.is_file():
        raise DeployError(
            f"no CA in {ca}: expected {CA_CERT} and {CA_KEY}; run `fl-app deploy ca --out {ca}`"
        )
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"{ca_key_path} is not an EC private key")
    entries = _san_entries(sans)
    out = Path(out_dir)
    cert_path, key_path = out / SERVER_CERT, out / SERVER_KEY
    _refuse_overwrite([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(entries), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(key_path, _pkcs8_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    shutil.copyfile(ca_cert_path, out / CA_CERT)  # the SuperLink's --ssl-ca-certfile
    return cert_path, key_path


def create_node_key(
    out_dir: str | os.PathLike[str], name: str, force: bool = False
) -> tuple[Path, Path]:
    """Create a SuperNode authentication key pair: ECDSA P-384 in OpenSSH format.

    Flower loads the private key with ``load_ssh_private_key`` (``--auth-supernode-
    private-key``) and accepts NIST-curve OpenSSH public keys in ``flwr supernode
    register``. Returns (private, public) paths: ``<name>`` and ``<name>.pub``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise DeployError(f"key name {name!r} must be letters, digits, '.', '_' or '-'")
    out = Path(out_dir)
    priv_path, pub_path = out / name, out / f"{name}.pub"
    _refuse_overwrite([priv_path, pub_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        priv_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_public(pub_path, pub + f" {name}\n".encode())
    return priv_path, pub_path


def create_signing_key(
    out_dir: str | os.PathLike[str], name: str, force: bool = False
) -> tuple[Path, Path]:
    """Create a site's long-term Ed25519 signing pair for malicious-model secure aggregation.

    ``<name>.sign`` (PEM PKCS#8, mode 0600: the node config's ``signing-key-path``) and
    ``<name>.sign.pub`` (the public key as 64 hex digits: the site's roster entry, sent
    to the consortium out of band, never through the server). See
    :mod:`fl_app.secagg.signing`.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fl_app.secagg.signing import signing_key_pem

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise DeployError(f"key name {name!r} must be letters, digits, '.', '_' or '-'")
    out = Path(out_dir)
    priv_path, pub_path = out / f"{name}.sign", out / f"{name}.sign.pub"
    _refuse_overwrite([priv_path, pub_path], force)
    key = Ed25519PrivateKey.generate()
    _write_private(priv_path, signing_key_pem(key))
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    _write_public(pub_path, raw.hex().encode() + b"\n")
    return priv_path, pub_path


def write_roster(
    out: str | os.PathLike[str],
    entries: Mapping[str, str | os.PathLike[str]] | Sequence[tuple[str, str | os.PathLike[str]]],
) -> Path:
    """Write the federation roster: ``{site name: public key hex}`` from ``.sign.pub`` files.

    Every site needs the same file (``roster-path`` in its node config); the roster is
    what lets a client refuse keys the server substituted, so it is distributed out of
    band and checked by each site, not fetched from the coordinator. ``entries`` as
    (name, file) pairs: a site named twice is refused, naming both files, rather than
    one entry silently replacing the other.
    """
    from fl_app.secagg.signing import RosterError, load_roster

    pairs = list(entries.items()) if isinstance(entries, Mapping) else list(entries)
    files: dict[str, str] = {}
    for name, pub in pairs:
        if name in files:
            raise DeployError(
                f"site name {name!r} is given twice ({files[name]} and {pub}): every site "
                "needs its own name in the roster (it is the identity others check its "
                "signatures against)"
            )
        files[name] = str(pub)
    try:
        roster = {n: Path(pub).read_text(encoding="utf-8").strip() for n, pub in files.items()}
    except OSError as err:
        raise DeployError(f"cannot read a roster entry's public key file: {err}") from None
    path = Path(out)
    _write_public(path, (json.dumps(roster, indent=2, sort_keys=True) + "\n").encode())
    try:
        load_roster(path)
    except RosterError as err:
        path.unlink()
        raise DeployError(str(err)) from None
    return path

"""``fl-app deploy ...``: certificates, node keys, processes and runs for Flower deployment.

What each party runs (see ``docs/deployment.md`` for the step-by-step):

* coordinator: ``ca`` (once), ``server-cert`` (the SuperLink's TLS certificate, with a
  subjectAltName for every address SuperNodes and the CLI dial), ``connection`` (a
  ``flwr`` CLI connection with the CA pinned), ``register`` (a site's public key),
  ``superlink`` (TLS, SuperNode authentication, runtime dependency installation off),
  ``submit`` (``flwr run`` then wait for the run's real status);
* each site: ``node-key`` (an ECDSA P-384 key pair in OpenSSH format: the private key
  never leaves the site, the ``.pub`` goes to the coordinator), ``node-config``
  (a site YAML turned into ``--node-config``), ``supernode``;
* ``demo``: all of the above on 127.0.0.1 (1 SuperLink + 3 SuperNodes), torn down by PID.

Flower 1.41 flags used (checked against ``flower-superlink --help`` / the source):
SuperLink ``--ssl-ca-certfile --ssl-certfile --ssl-keyfile --enable-supernode-auth
--disable-runtime-dependency-installation --host --port``; SuperNode ``--superlink
--root-certificates --auth-supernode-private-key --node-config --port``; CLI
connections in ``$FLWR_HOME/config.toml`` (``[superlink.<name>]`` with ``address`` and
``root-certificates``); ``flwr supernode register <key.pub> <connection>``.

Insecure mode (no TLS, no node authentication) exists only behind ``--insecure``, which
prints a warning every time it is used.

Trust assumptions: the CA key signs the only certificate SuperNodes accept for the
SuperLink, so whoever holds it can impersonate the coordinator; keep it offline. TLS
authenticates the SuperLink to SuperNodes (not the reverse); SuperNodes authenticate
with their registered key. Neither hides model updates from the coordinator: that is
secure aggregation's job (``secagg=...``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "DeployError",
    "Federation",
    "ProcessGroup",
    "create_ca",
    "create_node_key",
    "create_server_cert",
    "create_signing_key",
    "deploy_main",
    "node_config_from_site",
    "register_node",
    "run_demo",
    "run_verdict",
    "submit_run",
    "superlink_command",
    "supernode_command",
    "write_connection",
    "write_roster",
]

INSECURE_WARNING = (
    "WARNING: --insecure: no TLS and no SuperNode authentication. Model updates, "
    "metrics and run configs cross the network in clear text and any process that "
    "reaches the port can join as a SuperNode. Use only on a trusted loopback for tests."
)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
DEFAULT_SANS = ("127.0.0.1", "::1", "localhost")


class DeployError(Exception):
    """A deployment step cannot proceed; the message names the input and the fix."""


# ---- certificates and keys (cryptography, never the openssl CLI) ---------------------


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
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
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
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
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
    out: str | os.PathLike[str], entries: Mapping[str, str | os.PathLike[str]]
) -> Path:
    """Write the federation roster: ``{site name: public key hex}`` from ``.sign.pub`` files.

    Every site needs the same file (``roster-path`` in its node config); the roster is
    what lets a client refuse keys the server substituted, so it is distributed out of
    band and checked by each site, not fetched from the coordinator.
    """
    from fl_app.secagg.signing import RosterError, load_roster

    roster = {
        name: Path(path).read_text(encoding="utf-8").strip() for name, path in entries.items()
    }
    path = Path(out)
    _write_public(path, (json.dumps(roster, indent=2, sort_keys=True) + "\n").encode())
    try:
        load_roster(path)
    except RosterError as err:
        path.unlink()
        raise DeployError(str(err)) from None
    return path


# ---- site YAML -> --node-config -------------------------------------------------------

_SITE_KEYS = {"name", "data", "partition", "dp_state_dir", "extra"}
_FORMATS = ("npz", "csv")
# Node-config keys whose values are paths (resolved against the site YAML's folder, in
# ``extra:`` too), and the suffixes that mark any other key as one.
_PATH_KEYS = ("audit-dir", "policy-path", "dp-state-dir", "data-path")
_PATH_SUFFIXES = ("-dir", "-path", "-file")
_SITE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def _literal(value: str, what: str) -> str:
    # TOML literal string: no escapes, so a path's backslashes survive. Flower's parser
    # splits on whitespace outside quotes and cannot carry a quote inside one.
    if "'" in value or "\n" in value or '"' in value:
        raise DeployError(
            f"{what} {value!r} contains a quote or newline, which --node-config cannot "
            "carry; rename it"
        )
    return f"'{value}'"


def node_config_from_site(site: Mapping[str, Any], base_dir: Path | None = None) -> dict[str, Any]:
    """Turn a site's settings into the SuperNode's node config (a flat dict).

    Site YAML (all keys optional except where noted)::

        name: hospital-a
        data:                       # the site's own file; omit for simulated partitions
          path: /srv/fl/hospital-a.npz
          format: npz               # npz | csv; must match the file suffix
        partition:                  # simulated partitions of a public dataset
          id: 0
          num: 3
        dp_state_dir: /var/lib/fl-app/dp-state   # required for DP-SGD (privacy budgets)
        extra:                      # any other node-config keys, passed through
          audit-dir: audit          # the site's audit log folder
          policy-path: policy.yaml  # the site's data-use policy

    Relative paths, ``extra:`` ones included (``audit-dir``, ``policy-path`` and any key
    ending in ``-dir``, ``-path`` or ``-file``), are resolved against ``base_dir`` (the
    YAML's folder), so a site's folder can be moved or started from anywhere. ``name``
    becomes node-config ``site-name``: the stable identity that names the site's own
    files (``audit-<run>-site-<name>.jsonl``), so sites sharing a folder never collide.
    """
    unknown = set(site) - _SITE_KEYS
    if unknown:
        raise DeployError(f"unknown site keys {sorted(unknown)}; allowed: {sorted(_SITE_KEYS)}")
    base = base_dir or Path.cwd()

    def _path(value: Any, what: str) -> str:
        if not isinstance(value, str) or not value:
            raise DeployError(f"{what} must be a non-empty string, got {value!r}")
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    out: dict[str, Any] = {}
    name = site.get("name")
    if name is not None:
        if not isinstance(name, str) or not _SITE_NAME.fullmatch(name):
            raise DeployError(
                f"name must be 1-64 letters, digits, '_', '-' or '.' (not starting with "
                f"'.'), got {name!r}: it names the site's audit log and state files"
            )
        out["site-name"] = name
    part = site.get("partition")
    if part is not None:
        if not isinstance(part, Mapping) or set(part) - {"id", "num"} or "id" not in part:
            raise DeployError(f"partition must be {{id: int, num: int}}, got {part!r}")
        pid, num = part.get("id"), part.get("num", 1)
        if not isinstance(pid, int) or not isinstance(num, int) or isinstance(pid, bool):
            raise DeployError(f"partition id/num must be integers, got {part!r}")
        if num < 1 or not 0 <= pid < num:
            raise DeployError(f"partition id must be in [0, num) and num >= 1, got {part!r}")
        out["partition-id"], out["num-partitions"] = pid, num
    data = site.get("data")
    if data is not None:
        if not isinstance(data, Mapping) or set(data) - {"path", "format"}:
            raise DeployError(f"data must be {{path: str, format: npz|csv}}, got {data!r}")
        path = _path(data.get("path"), "data.path")
        fmt = data.get("format", Path(path).suffix.lstrip("."))
        if fmt not in _FORMATS:
            raise DeployError(f"data.format must be one of {_FORMATS}, got {fmt!r}")
        if Path(path).suffix.lstrip(".") != fmt:
            raise DeployError(f"data.path {path!r} does not end in .{fmt} (data.format={fmt})")
        out["data-path"], out["data-format"] = path, fmt
    if site.get("dp_state_dir") is not None:
        out["dp-state-dir"] = _path(site["dp_state_dir"], "dp_state_dir")
    extra = site.get("extra") or {}
    if not isinstance(extra, Mapping):
        raise DeployError(f"extra must be a mapping of node-config keys, got {extra!r}")
    for key, value in extra.items():
        if key in out:
            raise DeployError(f"extra.{key} clashes with a key set by the site's other fields")
        if not isinstance(value, str | int | float | bool):
            raise DeployError(f"extra.{key} must be a scalar, got {value!r}")
        if str(key) in _PATH_KEYS or str(key).endswith(_PATH_SUFFIXES):
            value = _path(value, f"extra.{key}")
        out[str(key)] = value
    return out


def format_node_config(config: Mapping[str, Any]) -> str:
    """The ``--node-config`` string for ``config`` (round-trips through Flower's parser)."""
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise DeployError(f"node-config key {key!r} must be letters, digits, '_' or '-'")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = _literal(str(value), f"node-config {key}")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def load_site(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a site YAML and return its node config."""
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DeployError(f"cannot read site file {str(p)!r}: {err}") from err
    if not isinstance(raw, Mapping):
        raise DeployError(f"site file {str(p)!r} must hold a mapping, got {type(raw).__name__}")
    return node_config_from_site(raw, p.resolve().parent)


# ---- the flwr CLI's connection file ---------------------------------------------------


def flwr_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("FLWR_HOME"):
        return Path(env["FLWR_HOME"])
    return Path(env.get("HOME", str(Path.home()))) / ".flwr"


def write_connection(
    name: str,
    address: str,
    root_certificates: str | os.PathLike[str] | None,
    insecure: bool = False,
    home: Path | None = None,
) -> Path:
    """Add or replace ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``.

    With TLS the CA certificate is pinned (absolute path; Flower requires one).
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise DeployError(f"connection name {name!r} must be letters, digits, '_' or '-'")
    if insecure == (root_certificates is not None):
        raise DeployError("give exactly one of root_certificates (TLS) and insecure")
    import tomllib

    path = (home or flwr_home()) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise DeployError(f"{path} is not valid TOML ({err}); fix it first") from err
    # Drop an existing section of that name (up to the next table header).
    header = f"[superlink.{name}]"
    lines, skip = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            skip = stripped == header
        if not skip:
            lines.append(line)
    body = [header, f"address = {json.dumps(address)}"]
    if insecure:
        body.append("insecure = true")
    else:
        ca = Path(str(root_certificates)).resolve()
        if not ca.is_file():
            raise DeployError(f"root certificate {str(ca)!r} does not exist")
        body.append(f"root-certificates = {json.dumps(str(ca))}")
    new = "\n".join([*lines, "", *body]).strip() + "\n"
    tomllib.loads(new)
    path.write_text(new)
    return path


# ---- processes -----------------------------------------------------------------------


def _bin(name: str) -> str:
    """A Flower executable: next to this interpreter first (the venv), then PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def deploy_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """Environment for Flower processes: venv bin on PATH, no runtime installs, and never
    the simulation mark (:func:`_child_env`)."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return _child_env(env)


def _child_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the simulation roster secret, for every process fl-app starts for a
    deployment. The secret marks a process a simulation entry point started (its
    simulated sites sign with keys derived from it, :mod:`fl_app.secagg.signing`); a
    SuperNode or ClientApp that inherited it from a process that once simulated (a
    notebook, a CI job, LocalFederation's parent) would accept partition-<i> identities
    forged by whoever holds that secret, instead of refusing without a roster."""
    from fl_app.secagg.signing import SIMULATION_SECRET_ENV

    out = dict(env)
    out.pop(SIMULATION_SECRET_ENV, None)
    return out


def superlink_command(
    host: str,
    port: int,
    cert_dir: str | os.PathLike[str] | None,
    *,
    insecure: bool = False,
    node_auth: bool = True,
    database: str | None = None,
) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication and no runtime installs."""
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port)]
    if insecure:
        cmd.append("--insecure")
    else:
        if cert_dir is None:
            raise DeployError("TLS needs --certs (the folder `fl-app deploy server-cert` wrote)")
        d = Path(cert_dir)
        files = [d / CA_CERT, d / SERVER_CERT, d / SERVER_KEY]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DeployError(f"missing {missing}; run `fl-app deploy server-cert --out {d}`")
        cmd += [
            "--ssl-ca-certfile", str(files[0]),
            "--ssl-certfile", str(files[1]),
            "--ssl-keyfile", str(files[2]),
        ]  # fmt: skip
        if node_auth:
            cmd.append("--enable-supernode-auth")
    cmd.append("--disable-runtime-dependency-installation")
    if database:
        cmd += ["--database", database]
    return cmd


def supernode_command(
    superlink: str,
    *,
    root_certificates: str | os.PathLike[str] | None,
    private_key: str | os.PathLike[str] | None,
    node_config: str,
    port: int,
    insecure: bool = False,
    max_wait_time: float | None = None,
) -> list[str]:
    """``flower-supernode`` dialling ``superlink`` with the CA pinned and its auth key."""
    cmd = [_bin("flower-supernode"), "--superlink", superlink, "--port", str(port)]
    if insecure:
        cmd.append("--insecure")
    else:
        if root_certificates is None:
            raise DeployError("TLS needs --ca (the federation's ca.crt)")
        cmd += ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if node_config:
        cmd += ["--node-config", node_config]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    return cmd


@dataclass
class ProcessGroup:
    """Processes started here, each in its own session, stopped by PID (group) only."""

    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, cmd: Sequence[str], env: Mapping[str, str], cwd: Path) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            # A new session: the process and the ServerApp/ClientApp processes it spawns
            # share a process group whose id is its PID, so teardown reaches them all.
            proc = subprocess.Popen(
                list(cmd),
                env=_child_env(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc.pid

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str, timeout: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children that outlived their parent still carry its group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        # SuperNodes first, the SuperLink last (reverse start order).
        for name in reversed(list(self.procs)):
            self.stop(name)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"process {proc.pid} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.2)
    raise DeployError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


# ---- flwr CLI calls ------------------------------------------------------------------


def _flwr(
    args: Sequence[str], env: Mapping[str, str], cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_bin("flwr"), *args],
        env=_child_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _last_json(text: str) -> dict[str, Any]:
    """The JSON object ``flwr ... --format json`` printed (other lines may precede it)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    return obj
    start = text.find("{")
    if start >= 0:
        with contextlib.suppress(json.JSONDecodeError):
            obj = json.loads(text[start:])
            if isinstance(obj, dict):
                return obj
    raise DeployError(f"no JSON in flwr output: {text[-1500:]!r}")


def register_node(
    public_key: str | os.PathLike[str], connection: str, env: Mapping[str, str]
) -> int:
    """``flwr supernode register``; returns the node id the SuperLink assigned."""
    proc = _flwr(["supernode", "register", str(public_key), connection, "--format", "json"], env)
    out = proc.stdout + proc.stderr
    try:
        res = _last_json(proc.stdout)
    except DeployError:
        res = {}
    if proc.returncode != 0 or not res.get("success"):
        raise DeployError(f"registering {public_key} failed (rc={proc.returncode}): {out[-1500:]}")
    return int(res["node-id"])


def list_nodes(connection: str, env: Mapping[str, str]) -> list[dict[str, Any]]:
    """The SuperLink's node list (``flwr supernode ls --format json``)."""
    proc = _flwr(["supernode", "ls", connection, "--format", "json"], env)
    res = _last_json(proc.stdout) if proc.stdout.strip() else {}
    if proc.returncode != 0 or not res.get("success"):
        raise DeployError(f"flwr supernode ls failed: {(proc.stdout + proc.stderr)[-1500:]}")
    return list(res.get("nodes", []))


def run_status(run_id: int, connection: str, env: Mapping[str, str]) -> str:
    proc = _flwr(["ls", connection, "--run-id", str(run_id), "--format", "json"], env)
    res = _last_json(proc.stdout) if proc.stdout.strip() else {}
    runs = res.get("runs") or []
    if proc.returncode != 0 or not runs:
        raise DeployError(
            f"flwr ls --run-id {run_id} failed: {(proc.stdout + proc.stderr)[-1500:]}"
        )
    return str(runs[0]["status"])


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def submit_run(
    app_dir: str | os.PathLike[str],
    connection: str,
    env: Mapping[str, str],
    *,
    config_name: str = "config",
    overrides: Sequence[str] = (),
    run_dir: str | os.PathLike[str] | None = None,
    timeout: float = 1800.0,
    poll: float = 2.0,
    config_file_dir: Path | None = None,
    log_file: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[int, str]:
    """``flwr run`` the bundle, follow its log until it ends, then ask ``flwr ls``.

    ``flwr run --stream`` exits 0 even when the ServerApp fails, so the status comes
    from the SuperLink (the ServerApp raises when no round updated the model, so such a
    run ends ``finished:failed``). Returns (run id, final status, e.g.
    ``"finished:completed"``). Run config goes through a TOML file: overrides hold
    spaces and quotes. ``progress`` receives the ServerApp's progress lines as they
    arrive (one per round: clients accepted, ε, accuracy, seconds; then its verdict).
    """
    lines = [
        f"hydra-config-name = {_toml_str(config_name)}",
        f"hydra-overrides = {_toml_str(' '.join(overrides))}",
    ]
    if run_dir is not None:
        lines.append(f"run-dir = {_toml_str(str(Path(run_dir).resolve()))}")
    with tempfile.TemporaryDirectory(dir=config_file_dir) as tmp:
        cfg = Path(tmp) / "run-config.toml"
        cfg.write_text("\n".join(lines) + "\n")
        proc = _flwr(
            ["run", str(Path(app_dir).resolve()), connection, "--run-config", str(cfg),
             "--format", "json"],
            env,
            cwd=Path(app_dir),
            timeout=300,
        )  # fmt: skip
    try:
        res = _last_json(proc.stdout)
    except DeployError:
        res = {}
    if proc.returncode != 0 or not res.get("run-id"):
        raise DeployError(
            f"flwr run failed (rc={proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}"
        )
    run_id = int(res["run-id"])
    deadline = time.monotonic() + timeout
    # Follow the run with one idle `flwr log --stream` (it returns when the run ends)
    # rather than polling: every `flwr` call costs ~1-2 s of CPU that the run needs.
    with open(log_file, "ab") if log_file is not None else open(os.devnull, "wb") as sink:
        _follow_log(
            [_bin("flwr"), "log", str(run_id), connection, "--stream"],
            env, sink, deadline, progress,
        )  # fmt: skip
    status = "pending"
    while True:
        status = run_status(run_id, connection, env)
        if status.startswith("finished"):
            return run_id, status
        if time.monotonic() >= deadline:
            break
        time.sleep(poll)
    raise DeployError(f"run {run_id} still {status!r} after {timeout:.0f}s")


# The ServerApp's own progress lines (fl_app.rundir.ProgressPrinter and the run's end),
# which Flower mirrors from its stdout into the run log.
_PROGRESS = re.compile(r"(\[round \d+/\d+\]|run (FAILED|DEGRADED):|done: |stopped early: )")


def _follow_log(
    cmd: list[str],
    env: Mapping[str, str],
    sink: Any,
    deadline: float,
    progress: Callable[[str], None] | None,
) -> None:
    """Copy ``flwr log --stream`` into ``sink`` until the run ends (or ``deadline``),
    handing the ServerApp's progress lines to ``progress`` as they arrive."""
    import threading

    proc = subprocess.Popen(
        cmd, env=_child_env(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    timer = threading.Timer(max(1.0, deadline - time.monotonic()), proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            sink.write(raw)
            if progress is not None:
                line = raw.decode("utf-8", "replace").rstrip()
                found = _PROGRESS.search(line)
                if found:
                    progress(line[found.start() :])
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_verdict(status: str, run_dir: Path | None) -> str:
    """One line saying how a deployed run ended: the SuperLink's status, and, where the
    run directory is on this machine, its summary's status and reason."""
    summary_path = run_dir / "summary.json" if run_dir is not None else None
    if summary_path is not None and summary_path.is_file():
        try:
            s = json.loads(summary_path.read_text())
        except ValueError:
            s = {}
        acc = s.get("accuracy")
        shown = f", accuracy {acc:.4f}" if isinstance(acc, float) else ""
        reason = f": {s['status_reason']}" if s.get("status_reason") else ""
        return (
            f"verdict: {str(s.get('status', '?')).upper()} ({status}; "
            f"{s.get('rounds_model_updated', '?')} of {s.get('rounds_planned', '?')} rounds "
            f"updated the model{shown}){reason}"
        )
    ok = status == "finished:completed"
    return f"verdict: {'COMPLETED' if ok else 'FAILED'} ({status})"


def run_logs(run_id: int, connection: str, env: Mapping[str, str]) -> str:
    proc = _flwr(["log", str(run_id), connection, "--show"], env, timeout=60)
    return proc.stdout + proc.stderr


# ---- loopback federation (demo, tests, benchmark) ------------------------------------


@dataclass
class Federation:
    """A SuperLink and its SuperNodes on one machine, everything under ``workdir``."""

    workdir: Path
    num_nodes: int = 3
    insecure: bool = False
    host: str = "127.0.0.1"
    connection: str = "fed"
    group: ProcessGroup = field(init=False)
    port: int = field(init=False, default=0)
    env: dict[str, str] = field(init=False, default_factory=dict)
    node_keys: list[Path] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.insecure:
            _warn_insecure()
        self.workdir = Path(self.workdir).resolve()
        self.group = ProcessGroup(self.workdir / "logs")
        home = self.workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        # Isolated ~/.flwr: connections, installed FABs and the SuperLink's state.
        self.env = deploy_env(HOME=str(home), FLWR_HOME=str(home / ".flwr"))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ca(self) -> Path:
        return self.workdir / "pki" / CA_CERT

    def prepare(self) -> None:
        """CA, SuperLink certificate, one key pair per site, the CLI connection."""
        if not self.insecure:
            create_ca(self.workdir / "pki", force=True)
            create_server_cert(
                self.workdir / "pki",
                self.workdir / "superlink",
                [self.host, "localhost"],
                force=True,
            )
            self.node_keys = [
                create_node_key(self.workdir / f"site-{i}", f"site-{i}", force=True)[0]
                for i in range(self.num_nodes)
            ]

    def start_superlink(self, timeout: float = 60.0) -> int:
        self.port = free_port(self.host)
        cmd = superlink_command(
            self.host,
            self.port,
            None if self.insecure else self.workdir / "superlink",
            insecure=self.insecure,
            database=str(self.workdir / "superlink" / "state.db"),
        )
        pid = self.group.start("superlink", cmd, self.env, self.workdir)
        wait_for_port(self.host, self.port, timeout, self.group.procs["superlink"])
        write_connection(
            self.connection,
            self.address,
            None if self.insecure else self.ca,
            insecure=self.insecure,
            home=Path(self.env["FLWR_HOME"]),
        )
        return pid

    def register_all(self) -> list[int]:
        """Register every site's public key (in parallel: each ``flwr`` call takes ~2 s)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(self.node_keys))) as pool:
            return list(
                pool.map(
                    lambda k: register_node(f"{k}.pub", self.connection, self.env), self.node_keys
                )
            )

    def start_supernode(
        self,
        name: str,
        node_config: str,
        *,
        private_key: Path | None,
        tls: bool = True,
        max_wait_time: float | None = None,
    ) -> int:
        cmd = supernode_command(
            self.address,
            root_certificates=self.ca if tls and not self.insecure else None,
            private_key=private_key,
            node_config=node_config,
            port=free_port(self.host),
            insecure=self.insecure or not tls,
            max_wait_time=max_wait_time,
        )
        return self.group.start(name, cmd, self.env, self.workdir)

    def node_config(self, i: int, **extra: Any) -> str:
        state = self.workdir / f"site-{i}" / "dp-state"
        state.mkdir(parents=True, exist_ok=True)
        return format_node_config(
            {
                "partition-id": i,
                "num-partitions": self.num_nodes,
                "dp-state-dir": str(state),
                **extra,
            }
        )

    def start_supernodes(self, node_configs: Sequence[str] | None = None) -> list[int]:
        configs = (
            list(node_configs)
            if node_configs
            else [self.node_config(i) for i in range(self.num_nodes)]
        )
        return [
            self.start_supernode(
                f"supernode-{i}",
                configs[i],
                private_key=None if self.insecure else self.node_keys[i],
            )
            for i in range(self.num_nodes)
        ]

    def wait_online(self, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        nodes: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            nodes = list_nodes(self.connection, self.env)
            if sum(n.get("status") == "online" for n in nodes) >= count:
                return nodes
            for name, proc in self.group.procs.items():
                # Our own nodes must stay up; others (e.g. ones expected to be refused) may exit.
                if (
                    name == "superlink" or name.startswith("supernode-")
                ) and proc.poll() is not None:
                    raise DeployError(
                        f"{name} exited ({proc.returncode}): {self.group.log(name)[-2000:]}"
                    )
            time.sleep(1.0)
        raise DeployError(f"only {nodes!r} after {timeout:.0f}s; wanted {count} online")

    def submit(
        self, app_dir: Path, overrides: Sequence[str], run_dir: Path, **kw: Any
    ) -> tuple[int, str]:
        return submit_run(
            app_dir, self.connection, self.env, overrides=overrides, run_dir=run_dir,
            config_file_dir=self.workdir, log_file=self.group.log_dir / "runs.log", **kw,
        )  # fmt: skip

    def close(self) -> None:
        self.group.stop_all()

    @contextlib.contextmanager
    def running(self) -> Iterator[Federation]:
        """Prepare, start SuperLink (+ register) and SuperNodes; stop all on exit."""
        try:
            self.prepare()
            self.start_superlink()
            if not self.insecure:
                self.register_all()
            self.start_supernodes()
            self.wait_online(self.num_nodes)
            yield self
        finally:
            self.close()


def app_root() -> Path:
    """The Flower App Bundle folder (the project root holding pyproject.toml)."""
    here = Path(__file__).resolve().parents[1]
    if not (here / "pyproject.toml").is_file():
        raise DeployError(f"no pyproject.toml in {here}; pass --app with the bundle folder")
    return here


def run_demo(
    workdir: Path,
    overrides: Sequence[str],
    *,
    insecure: bool = False,
    app_dir: Path | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Loopback demo: 1 SuperLink + 3 SuperNodes, one run, teardown by PID."""
    fed = Federation(workdir, insecure=insecure)
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    defaults = {
        "num_rounds": "2",
        "dataset.num_partitions": str(fed.num_nodes),
        # Every site in every round (secure aggregation needs the whole cohort).
        "strategy.min_available_nodes": str(fed.num_nodes),
        "federated_eval_every": "0",
    }
    overrides = [*(f"{k}={v}" for k, v in defaults.items() if k not in given), *overrides]
    run_dir = Path(workdir).resolve() / "run"
    t0 = time.perf_counter()
    with fed.running():
        pid = fed.group.procs["superlink"].pid
        up = time.perf_counter() - t0
        print(f"SuperLink {fed.address} (pid {pid}); {fed.num_nodes} SuperNodes online after "
              f"{up:.1f}s", file=out)  # fmt: skip
        run_id, status = fed.submit(
            app_dir or app_root(),
            overrides,
            run_dir,
            progress=lambda line: print(f"  {line}", file=out, flush=True),
        )
        print(f"run {run_id}: {status}; run directory {run_dir}", file=out)
        print(run_verdict(status, run_dir), file=out, flush=True)
        if status != "finished:completed":
            print(run_logs(run_id, fed.connection, fed.env)[-4000:], file=out)
            return 1
    summary = run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        print(json.dumps({k: s.get(k) for k in ("status", "accuracy", "rounds")}), file=out)
    return 0


# ---- command line --------------------------------------------------------------------


def _warn_insecure() -> None:
    print(INSECURE_WARNING, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-app deploy", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("ca", help="create the federation's CA (coordinator; keep ca.key offline)")
    s.add_argument("--out", required=True)
    s.add_argument("--common-name", default="fl-app federation CA")
    s.add_argument("--days", type=int, default=3650)
    s.add_argument("--force", action="store_true")

    s = sub.add_parser("server-cert", help="issue the SuperLink's TLS certificate")
    s.add_argument("--ca-dir", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--san", action="append", help="address clients dial (repeat); default loopback")
    s.add_argument("--days", type=int, default=365)
    s.add_argument("--force", action="store_true")

    s = sub.add_parser(
        "node-key", help="create a SuperNode's auth key pair and its Ed25519 signing pair (site)"
    )
    s.add_argument("--out", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--force", action="store_true")

    s = sub.add_parser("roster", help="write the federation roster from sites' .sign.pub files")
    s.add_argument("--out", required=True)
    s.add_argument("entries", nargs="+", metavar="SITE=PUBFILE")

    s = sub.add_parser("node-config", help="print the --node-config for a site YAML")
    s.add_argument("site")
    s.add_argument("--json", action="store_true", help="print the dict as JSON instead")

    s = sub.add_parser("connection", help="add a SuperLink connection to $FLWR_HOME/config.toml")
    s.add_argument("--name", required=True)
    s.add_argument("--address", required=True)
    s.add_argument("--ca")
    s.add_argument("--insecure", action="store_true")

    s = sub.add_parser("register", help="register a SuperNode public key (coordinator)")
    s.add_argument("public_key")
    s.add_argument("--connection", required=True)

    s = sub.add_parser("superlink", help="run flower-superlink (TLS + node auth) in the foreground")
    s.add_argument("--certs", help="folder with ca.crt, server.pem, server.key")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=9093)
    s.add_argument("--database", help="SQLite file: registrations and runs survive restarts")
    s.add_argument("--insecure", action="store_true")
    s.add_argument("--print", action="store_true", help="print the command, do not run it")

    s = sub.add_parser("supernode", help="run flower-supernode in the foreground (site)")
    s.add_argument("--superlink", required=True, help="host:port")
    s.add_argument("--ca")
    s.add_argument("--key", help="private key from `fl-app deploy node-key`")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--site", help="site YAML (turned into --node-config)")
    g.add_argument("--node-config", default="")
    s.add_argument("--port", type=int, default=9094, help="local ClientApp API port")
    s.add_argument("--insecure", action="store_true")
    s.add_argument("--print", action="store_true", help="print the command, do not run it")

    s = sub.add_parser("submit", help="flwr run the bundle and wait for its real status")
    s.add_argument("--connection", required=True)
    s.add_argument("--app", help="bundle folder (default: this project)")
    s.add_argument("--config-name", default="config")
    s.add_argument("--run-dir")
    s.add_argument("--timeout", type=float, default=3600.0)
    s.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. privacy=dpsgd num_rounds=2")

    s = sub.add_parser("demo", help="loopback: 1 SuperLink + 3 SuperNodes, one run, teardown")
    s.add_argument("--workdir", help="default: a new temporary folder")
    s.add_argument("--insecure", action="store_true")
    s.add_argument("overrides", nargs="*")
    return p


def _exec(cmd: list[str]) -> int:
    env = deploy_env()
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover (exec does not return)


def deploy_main(argv: Sequence[str]) -> int:
    """``fl-app deploy <command> ...``; returns the exit status."""
    args = _parser().parse_args(list(argv))
    try:
        return _dispatch(args)
    except DeployError as err:
        print(f"fl-app deploy {args.cmd}: {err}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if getattr(args, "insecure", False) and args.cmd != "demo":  # Federation warns itself
        _warn_insecure()
    if args.cmd == "ca":
        cert, key = create_ca(args.out, args.common_name, args.days, args.force)
        print(f"{cert}\n{key}  (secret: keep offline, mode 0600)")
    elif args.cmd == "server-cert":
        cert, key = create_server_cert(
            args.ca_dir, args.out, args.san or list(DEFAULT_SANS), args.days, args.force
        )
        print(f"{cert}\n{key}  (secret: SuperLink host only)\n{Path(args.out) / CA_CERT}")
    elif args.cmd == "node-key":
        priv, pub = create_node_key(args.out, args.name, args.force)
        print(f"{priv}  (secret: this site only)\n{pub}  (send to the coordinator)")
        sign, sign_pub = create_signing_key(args.out, args.name, args.force)
        print(
            f"{sign}  (secret: this site only; node config signing-key-path)\n"
            f"{sign_pub}  (the site's roster entry: share with every site out of band)"
        )
    elif args.cmd == "roster":
        entries = {}
        for item in args.entries:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise DeployError(f"roster entry {item!r} must be SITE=PUBFILE")
            entries[name] = path
        print(write_roster(args.out, entries))
    elif args.cmd == "node-config":
        cfg = load_site(args.site)
        print(json.dumps(cfg, indent=2) if args.json else format_node_config(cfg))
    elif args.cmd == "connection":
        path = write_connection(args.name, args.address, args.ca, insecure=args.insecure)
        print(path)
    elif args.cmd == "register":
        node_id = register_node(args.public_key, args.connection, deploy_env())
        print(f"registered node {node_id}")
    elif args.cmd == "superlink":
        cmd = superlink_command(
            args.host, args.port, args.certs, insecure=args.insecure, database=args.database
        )
        if args.print:
            print(shlex.join(cmd))
            return 0
        return _exec(cmd)
    elif args.cmd == "supernode":
        node_config = format_node_config(load_site(args.site)) if args.site else args.node_config
        if not args.insecure and not args.key:
            raise DeployError("--key is required (SuperNode authentication); see node-key")
        cmd = supernode_command(
            args.superlink,
            root_certificates=None if args.insecure else args.ca,
            private_key=args.key,
            node_config=node_config,
            port=args.port,
            insecure=args.insecure,
        )
        if args.print:
            print(shlex.join(cmd))
            return 0
        # The SuperNode's start-up checks (`fl-app site check`): a bad data file, policy
        # or key stops it here, not as a refusal in every round of every run.
        from fl_app.site_check import check_site, parse_node_config

        checks = check_site(parse_node_config(node_config), key=args.key, ca=args.ca)
        failed = [c for c in checks if not c.ok]
        for check in checks:
            print(check.line(), file=sys.stderr if failed else sys.stdout, flush=True)
        if failed:
            print(
                f"fl-app deploy supernode: {len(failed)} start-up check(s) failed; "
                "the SuperNode was not started",
                file=sys.stderr,
            )
            return 1
        return _exec(cmd)
    elif args.cmd == "submit":
        app = Path(args.app) if args.app else app_root()
        run_id, status = submit_run(
            app,
            args.connection,
            deploy_env(),
            config_name=args.config_name,
            overrides=args.overrides,
            run_dir=args.run_dir,
            timeout=args.timeout,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
        print(json.dumps({"run-id": run_id, "status": status}))
        print(
            run_verdict(status, Path(args.run_dir) if args.run_dir else None),
            file=sys.stderr,
            flush=True,
        )
        if status != "finished:completed":
            print(run_logs(run_id, args.connection, deploy_env())[-4000:], file=sys.stderr)
            return 1
    elif args.cmd == "demo":
        workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fl-demo-"))
        return run_demo(workdir, args.overrides, insecure=args.insecure)
    return 0


if __name__ == "__main__":
    raise SystemExit(deploy_main(sys.argv[1:]))

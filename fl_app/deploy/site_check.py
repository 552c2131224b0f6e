"""``fl-app site check``: a SuperNode's start-up checks, run by hand or before it starts.

A site's mistakes (a mis-typed data path, a malformed policy, a key with the wrong
permissions, two sites naming their audit logs the same way) used to show only as
every round's refusal once a run was under way. :func:`check_site` reads the site's
node config the way its ClientApp will and reports each problem before the SuperNode
joins the federation:

* ``site``: the stable identity naming the site's own files
  (:func:`fl_app.client.identity.site_identity`);
* ``data``: the site's file (``data-path``) or simulated partition, loaded exactly as
  the ClientApp loads it (:func:`fl_app.data.sites.check_site_data`);
* ``policy``: the data-use policy (``policy-path``), parsed strictly
  (:func:`fl_app.client.policy_file.load_policy`);
* ``audit-dir`` and ``dp-state-dir``: folders the ClientApp must be able to write,
  and any audit log of this site already there must verify;
* ``roster``: with ``roster-path`` / ``signing-key-path`` (malicious-model secure
  aggregation), the site's ``site-name`` must be its own roster entry: a name the
  roster gives to a different key (another site's) is refused here, not at the
  first round;
* ``device``: the site's own ``train-device`` (site YAML ``device:``), present on
  this machine (:mod:`fl_app.device`);
* ``key``: the SuperNode's private key (OpenSSH ECDSA P-384, readable only by its
  owner) and ``ca``: the CA certificate it pins.

``fl-app deploy supernode`` and ``fl-app deploy demo`` run the same checks and refuse
to start a SuperNode when one fails (``fl-app site check``, :mod:`fl_app.cli.site`, runs
them by hand). Only sizes, names and verdicts are printed: nothing about the records.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SiteCheck", "check_site", "site_dataset_defaults"]


@dataclass(frozen=True)
class SiteCheck:
    """One check's verdict: ``name`` (what was checked), ``ok``, and a human ``detail``."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def _writable_dir(path: str, key: str) -> SiteCheck:
    p = Path(path)
    if p.exists() and not p.is_dir():
        return SiteCheck(key, False, f"{p} exists and is not a folder")
    probe = p if p.exists() else next((a for a in p.parents if a.exists()), None)
    if probe is None or not os.access(probe, os.W_OK | os.X_OK):
        return SiteCheck(key, False, f"{p} cannot be created or written by this user")
    return SiteCheck(key, True, f"{p} {'writable' if p.exists() else 'will be created'}")


def _audit_logs(directory: str, site: str) -> SiteCheck | None:
    """Verify this site's audit logs already in ``directory`` (a broken one stops it)."""
    from fl_app.audit import verify

    p = Path(directory)
    if not p.is_dir():
        return None
    logs = sorted(p.glob(f"audit-*-{site}.jsonl"))
    broken = []
    for log in logs:
        try:
            result = verify(log)
            if not result.ok:
                broken.append(f"{log.name} (line {result.first_broken}: {result.reason})")
        except (OSError, ValueError) as err:
            broken.append(f"{log.name} ({err})")
    if broken:
        return SiteCheck(
            "audit logs",
            False,
            "broken: " + "; ".join(broken) + " (move it aside, kept as evidence; the site "
            "refuses every instruction while it is there)",
        )
    return SiteCheck("audit logs", True, f"{len(logs)} earlier log(s) of this site verify")


def _check_key(path: str) -> SiteCheck:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    p = Path(path)
    try:
        data = p.read_bytes()
        mode = p.stat().st_mode
    except OSError as err:
        return SiteCheck("key", False, f"cannot read {p}: {err}")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return SiteCheck(
            "key", False, f"{p} is readable by others (mode {oct(mode & 0o777)}); chmod 600 {p}"
        )
    try:
        key = load_ssh_private_key(data, None)
    except (ValueError, TypeError) as err:
        return SiteCheck(
            "key", False, f"{p} is not an unencrypted OpenSSH private key ({err}); make one "
            "with `fl-app deploy node-key`",
        )  # fmt: skip
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        return SiteCheck(
            "key", False, f"{p} is not an ECDSA P-384 key (Flower's SuperNode authentication "
            "needs one: `fl-app deploy node-key`)",
        )  # fmt: skip
    return SiteCheck("key", True, f"{p}: ECDSA P-384, mode {oct(mode & 0o777)}")


def _check_ca(path: str) -> SiteCheck:
    from cryptography import x509

    p = Path(path)
    try:
        cert = x509.load_pem_x509_certificate(p.read_bytes())
    except (OSError, ValueError) as err:
        return SiteCheck("ca", False, f"{p} is not a readable PEM certificate ({err})")
    return SiteCheck("ca", True, f"{p}: {cert.subject.rfc4514_string()}")


def site_dataset_defaults(node_config: Mapping[str, Any]) -> Any:
    """The shipped dataset settings a node is checked against before any experiment.

    ``configs/dataset/local.yaml`` for a site's own file (``"data-path"``, with
    ``dataset.local_format`` from ``"data-format"``), else the default dataset of
    ``configs/config.yaml`` (a simulated partition). Raises ``DataError`` for a
    ``"data-format"`` that names no format.
    """
    from fl_app.config.compose import compose_config
    from fl_app.config.schema import LocalFormat
    from fl_app.data import DataError
    from fl_app.data.local_files import NODE_DATA_PATH_KEY
    from fl_app.data.sites import NODE_DATA_FORMAT_KEY

    if node_config.get(NODE_DATA_PATH_KEY) in (None, ""):
        return compose_config("config", []).dataset
    overrides = ["dataset=local", "server_eval=false"]
    node_format = node_config.get(NODE_DATA_FORMAT_KEY)
    if node_format not in (None, ""):
        if str(node_format) not in {f.value for f in LocalFormat}:
            raise DataError(
                f'node-config "{NODE_DATA_FORMAT_KEY}" is {node_format!r}; use one of '
                f"{sorted(f.value for f in LocalFormat)}"
            )
        overrides.append(f"dataset.local_format={node_format}")
    return compose_config("config", overrides).dataset


def check_site(
    node_config: Mapping[str, Any],
    *,
    key: str | None = None,
    ca: str | None = None,
    dataset: Any = None,
) -> list[SiteCheck]:
    """Every start-up check of one SuperNode (see the module doc); never raises for a
    problem of the site's: each becomes a failed :class:`SiteCheck`.

    ``dataset``: the experiment's ``DatasetConfig`` when known (default: the site file
    is read with ``configs/dataset/local.yaml``'s settings, as the SuperNode's check).
    """
    from fl_app.client.identity import AUDIT_DIR_KEY, POLICY_PATH_KEY, site_identity
    from fl_app.client.policy import PolicyError
    from fl_app.client.policy_file import load_policy
    from fl_app.client.refusal import ClientRefusal

    checks: list[SiteCheck] = []
    try:
        site = site_identity(node_config)
        checks.append(SiteCheck("site", True, f"{site} (names this site's audit log)"))
    except ClientRefusal as err:
        site = None
        checks.append(SiteCheck("site", False, str(err)))
    checks.append(_check_data(node_config, dataset))
    policy = node_config.get(POLICY_PATH_KEY)
    if policy:
        try:
            load_policy(str(policy))
            checks.append(SiteCheck("policy", True, f"{policy} parses"))
        except PolicyError as err:
            checks.append(SiteCheck("policy", False, f"{policy}: {err}"))
    audit_dir = node_config.get(AUDIT_DIR_KEY)
    if audit_dir:
        checks.append(_writable_dir(str(audit_dir), AUDIT_DIR_KEY))
        logs = _audit_logs(str(audit_dir), site) if site is not None else None
        if logs is not None:
            checks.append(logs)
    state_dir = node_config.get("dp-state-dir")
    if state_dir:
        checks.append(_writable_dir(str(state_dir), "dp-state-dir"))
    roster = _check_roster(node_config)
    if roster is not None:
        checks.append(roster)
    device = _check_device(node_config)
    if device is not None:
        checks.append(device)
    if key:
        checks.append(_check_key(key))
    if ca:
        checks.append(_check_ca(ca))
    return checks


def _check_device(node_config: Mapping[str, Any]) -> SiteCheck | None:
    """The site's own ``train-device``, resolved on this machine as its ClientApp will
    (:mod:`fl_app.device`); ``None`` when the site leaves the device to the server."""
    from fl_app.config.errors import ConfigError
    from fl_app.device import NODE_DEVICE_KEY, resolve_device, site_device

    if NODE_DEVICE_KEY not in node_config:
        return None
    value, field = site_device(node_config, "auto")
    try:
        return SiteCheck("device", True, f"{value} (trains on {resolve_device(value, field)})")
    except ConfigError as err:
        return SiteCheck("device", False, str(err))


def _check_data(node_config: Mapping[str, Any], dataset: Any) -> SiteCheck:
    """The site's file or partition, loaded as its ClientApp loads it."""
    from fl_app.data import DataError
    from fl_app.data.sites import check_site_data

    if not any(k in node_config for k in ("data-path", "partition-id")):
        return SiteCheck(
            "data",
            False,
            'node config names no data: set "data-path" (the site\'s file) '
            'or "partition-id"/"num-partitions" (a simulated partition)',
        )
    try:
        if dataset is None:
            dataset = site_dataset_defaults(node_config)
        return SiteCheck("data", True, check_site_data(node_config, dataset).line())
    except DataError as err:
        return SiteCheck("data", False, str(err))


def _check_roster(node_config: Mapping[str, Any]) -> SiteCheck | None:
    """The site's ``site-name`` is its own roster entry (None: the site names no roster).

    A roster entry is the public key every other site checks this site's signatures
    against. A ``site-name`` the roster gives to a different key (another site already
    holds the name) or does not list would have every signature of this site refused
    in every malicious-model round; the same test as the ClientApp's
    (:func:`fl_app.secagg.client.identity.site_identity_for_secagg`), before it starts.
    """
    from fl_app.secagg import signing
    from fl_app.secagg.client.identity import ROSTER_PATH, SIGNING_KEY_PATH

    key_path, roster_path = node_config.get(SIGNING_KEY_PATH), node_config.get(ROSTER_PATH)
    if not key_path and not roster_path:
        return None
    name = node_config.get("site-name")
    if not key_path or not roster_path or not name:
        return SiteCheck(
            "roster",
            False,
            f"'{SIGNING_KEY_PATH}', '{ROSTER_PATH}' and 'site-name' go together (found "
            f"{SIGNING_KEY_PATH}={key_path!r}, {ROSTER_PATH}={roster_path!r}, "
            f"site-name={name!r}); set all three (site YAML: name, extra)",
        )
    try:
        own = signing.Signer(str(name), signing.load_signing_key(str(key_path)))
        roster = signing.load_roster(str(roster_path))
    except (signing.RosterError, ValueError) as err:
        return SiteCheck("roster", False, str(err))
    listed = roster.public_key(str(name))
    if listed is None:
        return SiteCheck(
            "roster",
            False,
            f"site name {name!r} is not in the roster {roster_path} ({len(roster)} sites): "
            "add this site's .sign.pub to the roster (`fl-app deploy roster`) or fix `name`",
        )
    if listed.public_bytes_raw() != own.public_bytes():
        return SiteCheck(
            "roster",
            False,
            f"site name {name!r} is already taken in the roster {roster_path} by a different "
            f"key than this site's {key_path}: two sites share the name, or the roster holds "
            "an old key; give this site its own `name`, or rebuild the roster with its "
            ".sign.pub",
        )
    return SiteCheck("roster", True, f"{name!r} is this site's own entry in {roster_path}")

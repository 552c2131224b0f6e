"""Revoking a SuperNode and rotating its key: ``fl-app deploy revoke`` / ``rotate-key``.

Flower 1.42's CLI removes a SuperNode by node id (``flwr supernode unregister NODE_ID``),
not by public key, and ``flwr supernode ls`` does not show keys: the coordinator keeps
the node id ``fl-app deploy register`` printed for each site. Once a node is
unregistered the SuperLink's node-authentication check finds no live node for its key,
so every request signed with it is refused (a running SuperNode is cut off, a restarted
one is refused at start-up), and the key can never be registered again (the SuperLink's
state keeps it, unique) -- provided the SuperLink keeps its state in a database
(``fl-app deploy superlink --database FILE``): an in-memory SuperLink forgets the
revocation when it restarts. Rotation registers the new key *before* unregistering the old,
so a failure at either step leaves the site with a working registration and says which.
The procedures that use these (compromised key, site leaving): docs/operations.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fl_app.deploy import DeployError
from fl_app.deploy.flwr_cli import list_nodes, register_node, unregister_node

__all__ = ["Rotation", "check_node_id", "check_public_key", "revoke_node", "rotate_node_key"]

# Flower node ids are unsigned 64-bit integers; 0 is never assigned.
_MAX_NODE_ID = 2**64 - 1


def check_node_id(node_id: int | str) -> int:
    """``node_id`` as an int, or :class:`DeployError` saying where ids come from."""
    text = str(node_id)
    # Digits only: int() would also take " 7", "+7" and "7_0", which no flwr output prints.
    value = int(text) if re.fullmatch(r"[0-9]+", text) else -1
    if not 0 < value <= _MAX_NODE_ID:
        raise DeployError(
            f"node id {node_id!r} must be a positive integer below 2**64: the id "
            "`fl-app deploy register` printed for the site (or `flwr supernode ls <connection>`)"
        )
    return value


def check_public_key(path: str | os.PathLike[str]) -> Path:
    """The site's new ``.pub`` file, checked before anything is sent to the SuperLink:
    an OpenSSH NIST-curve ECDSA public key (what ``fl-app deploy node-key`` writes and
    Flower accepts), never the private key."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    p = Path(path)
    if not p.is_file():
        raise DeployError(
            f"public key {str(p)!r} does not exist; the site creates it with "
            "`fl-app deploy node-key --out DIR --name SITE` and sends DIR/SITE.pub"
        )
    data = p.read_bytes()
    if b"PRIVATE KEY" in data:
        raise DeployError(
            f"{str(p)!r} is a private key: send only the .pub file (the private key never "
            "leaves the site)"
        )
    try:
        key = load_ssh_public_key(data.strip())
    except (ValueError, TypeError) as err:
        raise DeployError(f"{str(p)!r} is not an OpenSSH public key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DeployError(
            f"{str(p)!r} is not an ECDSA key; Flower's SuperNode authentication needs one "
            "from `fl-app deploy node-key`"
        )
    return p


def _registered(node_id: int, connection: str, env: Mapping[str, str]) -> dict[str, object]:
    nodes = list_nodes(connection, env)
    for node in nodes:
        if str(node.get("node-id")) == str(node_id):
            if node.get("status") == "unregistered":
                raise DeployError(f"node {node_id} is already unregistered at {connection!r}")
            return node
    live = sorted(str(n.get("node-id")) for n in nodes if n.get("status") != "unregistered")
    raise DeployError(
        f"no node {node_id} at connection {connection!r} (registered: {', '.join(live) or 'none'})"
    )


def revoke_node(node_id: int | str, connection: str, env: Mapping[str, str]) -> int:
    """Unregister ``node_id`` after checking the SuperLink knows it; returns the id."""
    value = check_node_id(node_id)
    _registered(value, connection, env)
    unregister_node(value, connection, env)
    return value


@dataclass(frozen=True)
class Rotation:
    """A finished rotation: the site's new node id and the id that was unregistered."""

    new_node_id: int
    old_node_id: int


def rotate_node_key(
    new_public_key: str | os.PathLike[str],
    old_node_id: int | str,
    connection: str,
    env: Mapping[str, str],
) -> Rotation:
    """Register ``new_public_key``, then unregister ``old_node_id``.

    Both inputs are checked first (key file, old node known and live), so a typo changes
    nothing; if unregistering fails after the new key was registered, the error gives
    the new id and the ``revoke`` command that finishes the job.
    """
    old = check_node_id(old_node_id)
    key = check_public_key(new_public_key)
    _registered(old, connection, env)
    new = register_node(key, connection, env)
    try:
        unregister_node(old, connection, env)
    except DeployError as err:
        raise DeployError(
            f"new key registered as node {new}, but the old node {old} is still registered "
            f"({err}); finish with `fl-app deploy revoke {old} --connection {connection}`"
        ) from err
    return Rotation(new_node_id=new, old_node_id=old)

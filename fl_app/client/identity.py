"""Who this client is, from its SuperNode's ``--node-config``: the site's keys.

A site's files (audit log, DP state, budget ledger, protected-run marks) are named by
its stable identity (:func:`site_identity`), never by its partition id: deployed sites
all have partition id 0, and naming their files by it made sites sharing a directory
collide (issue 17).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes, hmac

from fl_app.client.refusal import ClientRefusal

if TYPE_CHECKING:
    from flwr.app import Context

__all__ = [
    "AUDIT_DIR_KEY",
    "DP_STATE_DIR_KEY",
    "POLICY_PATH_KEY",
    "SAFE_RUN_KEY",
    "SAFE_SITE_NAME",
    "SITE_NAME_KEY",
    "partition",
    "site_hash",
    "site_identity",
    "site_secret",
    "site_secret_path",
]

AUDIT_DIR_KEY = "audit-dir"
POLICY_PATH_KEY = "policy-path"
# The site's own directory for its DP state, budget ledger and protected-run marks: the
# spec's state_dir is the server's choice, and a server that names a fresh one must not
# reset the site's budget.
DP_STATE_DIR_KEY = "dp-state-dir"
# The site's stable name (the site YAML's ``name``): names its per-site files.
SITE_NAME_KEY = "site-name"
SAFE_SITE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
# A run key becomes part of a file name: anything else (a hostile server's "../x") is
# logged under "unknown".
SAFE_RUN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The secret keying a site's dp-site-hash (site_secret).
SITE_SECRET_BYTES = 32


def partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` of a simulated partition (defaults 0 of 1)."""
    cfg = context.node_config
    try:
        return int(cfg.get("partition-id", 0)), int(cfg.get("num-partitions", 1))
    except (TypeError, ValueError) as err:
        raise ClientRefusal(
            f"node-config partition-id/num-partitions must be integers, got {dict(cfg)!r}"
        ) from err


def site_secret_path(state_dir: str | Path, site: str) -> Path:
    """Where the site keeps the secret that keys its ``dp-site-hash``."""
    return Path(state_dir) / f"site-secret-{site}.key"


def site_secret(state_dir: str | Path, site: str) -> bytes:
    """The site's secret for its public identity, created on first use.

    32 bytes from ``os.urandom`` in the site's own DP state folder, owner-only (0600).
    Created atomically: written to a private temporary file, then hard-linked into place,
    which fails if another process (a second SuperNode sharing the folder) linked first;
    both then read the same secret, so the misconfiguration the server's site check
    exists for still shows as one identity.
    """
    path = site_secret_path(state_dir, site)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(SITE_SECRET_BYTES))
                f.flush()
                os.fsync(f.fileno())
            # Another process that linked first wins: both then read its secret.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink()
    secret = path.read_bytes()
    if len(secret) != SITE_SECRET_BYTES:
        raise ClientRefusal(
            f"{path} holds {len(secret)} bytes, not this site's {SITE_SECRET_BYTES}-byte "
            "identity secret: restore it from a backup of the dp-state-dir, or delete it "
            "to give the site a new identity (the server then counts its local-DP "
            "releases afresh)"
        )
    return secret


def site_hash(site: str, state_dir: str | Path) -> int:
    """The site's ``dp-site-hash``: 48 bits of HMAC-SHA256 of its identity under its
    secret (:func:`site_secret`), exact as a float64 metric value.

    Keyed, because an unkeyed digest of ``site-<name>`` is computable by any enrolled
    node from the roster's site names: one forged reply then took a victim's identity
    and moved the server's local-DP count for it (docs/architecture.md, Client: site
    identity). Stable across restarts (the secret is in the state folder) and equal for
    two SuperNodes sharing the folder. Only deployed sites send it, and DP-SGD and local
    DP refuse to run without a state folder, so there is no unkeyed fallback; simulated
    partitions send none (they run in one trusted process and are told apart by
    ``dp-partition-id``).
    """
    mac = hmac.HMAC(site_secret(state_dir, site), hashes.SHA256())
    mac.update(site.encode())
    return int.from_bytes(mac.finalize()[:6], "big")


def site_identity(node_config: Any) -> str:
    """The stable name of this site for its own files (audit log), from its node config.

    ``site-<name>`` from ``site-name`` (the site YAML's ``name``, set by ``fl-app deploy
    node-config``); else, for a site training on its own file (``data-path``),
    ``data-<hash of the file's absolute path>``; else the simulated partition,
    ``partition-<id>``. Deployed sites all have partition id 0, so naming their files by
    partition made sites that share a directory collide (issue 17).
    """
    name = node_config.get(SITE_NAME_KEY)
    if name is not None and name != "":
        if not SAFE_SITE_NAME.fullmatch(str(name)):
            raise ClientRefusal(
                f"node-config {SITE_NAME_KEY}={name!r} must be 1-64 letters, digits, '_', "
                "'-' or '.' (not starting with '.'): it names this site's files"
            )
        return f"site-{name}"
    data_path = node_config.get("data-path")
    if data_path:
        digest = hashlib.sha256(str(Path(str(data_path)).resolve()).encode()).hexdigest()
        return f"data-{digest[:16]}"
    try:
        pid = int(node_config.get("partition-id", 0))
    except (TypeError, ValueError) as err:
        raise ClientRefusal(
            f"node-config partition-id must be an integer, got {node_config.get('partition-id')!r}"
        ) from err
    return f"partition-{pid}"

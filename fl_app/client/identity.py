"""Who this client is, from its SuperNode's ``--node-config``: the site's keys.

A site's files (audit log, DP state, budget ledger, protected-run marks) are named by
its stable identity (:func:`site_identity`), never by its partition id: deployed sites
all have partition id 0, and naming their files by it made sites sharing a directory
collide (issue 17).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` of a simulated partition (defaults 0 of 1)."""
    cfg = context.node_config
    try:
        return int(cfg.get("partition-id", 0)), int(cfg.get("num-partitions", 1))
    except (TypeError, ValueError) as err:
        raise ClientRefusal(
            f"node-config partition-id/num-partitions must be integers, got {dict(cfg)!r}"
        ) from err


def site_hash(site: str) -> int:
    """48 bits of SHA-256 of a site identity: exact as a float64 metric value."""
    return int.from_bytes(hashlib.sha256(site.encode()).digest()[:6], "big")


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

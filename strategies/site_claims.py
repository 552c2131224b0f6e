"""One site, one node: refuse a second SuperNode claiming a site identity in a run.

Two deployed SuperNodes configured with the same ``site-name`` share one identity: the
same per-site files (audit log, DP-SGD state, site budget ledger) and, on the server,
one key in the local-DP release count. Each would account only its own rounds, so
neither the site's budget nor the server's count is right (issue 17).

What reaches the server: a deployed site running DP-SGD or local DP adds
``dp-site-hash`` to its public ``dp-*`` metrics (48 bits of SHA-256 of its identity,
:func:`fl_app.client.identity.site_hash`), already public to key the server's
local-DP count across SuperNode restarts; nothing new is sent for this check. Other
modes carry no site identity, and simulated partitions send none (they are told apart
by ``dp-partition-id``).

The rule: the first node to present an identity holds it; a reply from another node
presenting the same identity is rejected (logged with both node ids) while the holder
is still connected. A holder that is gone (a SuperNode restart gives the site a new
node id) hands the identity over. The round driver applies it to plain train replies
and, under secure aggregation, to each masked input's public metrics (a rejected input
is a stage-3 dropout: its masks are removed at unmasking, it never enters the sum).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

__all__ = ["SITE_HASH_METRIC", "SiteClaims"]

SITE_HASH_METRIC = "dp-site-hash"


class SiteClaims:
    """Which node holds each site identity presented in this run (server side)."""

    def __init__(self) -> None:
        self._holder: dict[int, int] = {}

    def check(
        self, node_id: int, metrics: Mapping[str, float], connected: Collection[int]
    ) -> str | None:
        """The rejection reason for ``node_id``'s reply, or None (and the claim recorded).

        ``connected``: the nodes connected when the round began; a holder among them
        keeps its identity.
        """
        value = metrics.get(SITE_HASH_METRIC)
        if value is None:
            return None
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            return f"{SITE_HASH_METRIC} is not a finite number: {value!r}"
        digest = int(value)
        holder = self._holder.get(digest)
        if holder is not None and holder != node_id and holder in connected:
            return (
                f"site identity {digest:012x} is already held by node {holder} in this run; "
                f"node {node_id} presents it too (two SuperNodes configured with the same "
                "site-name?): give each site its own name (fl-app deploy node-config)"
            )
        self._holder[digest] = node_id
        return None

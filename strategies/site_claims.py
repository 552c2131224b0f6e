"""One site, one node: refuse a second SuperNode claiming a site identity in a run.

Two deployed SuperNodes configured with the same ``site-name`` share one identity: the
same per-site files (audit log, DP-SGD state, site budget ledger) and, on the server,
one key in the local-DP release count. Each would account only its own rounds, so
neither the site's budget nor the server's count is right (issue 17).

What reaches the server: a deployed site running DP-SGD or local DP adds
``dp-site-hash`` to its public ``dp-*`` metrics: 48 bits of HMAC-SHA256 of its identity
under a secret the site keeps in its own DP state folder
(:func:`fl_app.client.identity.site_hash`), so no other node can compute it from the
roster's site names, and two SuperNodes sharing one state folder (the misconfiguration
this check exists for) present the same value. It keys the server's local-DP count
across SuperNode restarts; nothing new is sent for this check. Other modes carry no
site identity, and simulated partitions send none (they are told apart by
``dp-partition-id``). Values are validated in one place (:func:`parse_site_hash`), for
this check and for the local-DP count's key.

The rules: a node holds at most one identity in a run (an honest node presents exactly
one, its site's); the first node to present an identity holds it; a reply from another
node presenting the same identity is rejected (logged with both node ids) while the
holder is still connected. A holder that is gone (a SuperNode restart gives the site a
new node id) hands the identity over. Every refused identity and the nodes refused for
it are kept (:meth:`SiteClaims.contested`, in ``summary.json``). The round driver
applies the check to plain train replies before anything counts them, and, under secure
aggregation, to each masked input's public metrics once its payload parsed (a rejected
input is a stage-3 dropout: its masks are removed at unmasking, it never enters the
sum).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

__all__ = ["SITE_HASH_BITS", "SITE_HASH_METRIC", "SiteClaims", "parse_site_hash"]

SITE_HASH_METRIC = "dp-site-hash"
# 48 bits: an integer metric value stays exact as a float64.
SITE_HASH_BITS = 48


def parse_site_hash(value: object) -> int | None:
    """A ``dp-site-hash`` value as its integer, or None where it is not one: a finite
    integral number in ``[0, 2**48)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value != int(value):
        return None
    digest = int(value)
    return digest if 0 <= digest < 2**SITE_HASH_BITS else None


class SiteClaims:
    """Which node holds each site identity presented in this run (server side)."""

    def __init__(self) -> None:
        self._holder: dict[int, int] = {}
        # node id -> the one identity it presented (first accepted).
        self._held: dict[int, int] = {}
        self._contested: dict[int, set[int]] = {}

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
        digest = parse_site_hash(value)
        if digest is None:
            return f"{SITE_HASH_METRIC} is not an integer in [0, 2**{SITE_HASH_BITS}): {value!r}"
        own = self._held.get(node_id)
        if own is not None and own != digest:
            self._contested.setdefault(digest, set()).add(node_id)
            return (
                f"node {node_id} presents site identity {digest:012x} but holds "
                f"{own:012x} in this run: a node serves one site"
            )
        holder = self._holder.get(digest)
        if holder is not None and holder != node_id and holder in connected:
            self._contested.setdefault(digest, set()).add(node_id)
            return (
                f"site identity {digest:012x} is already held by node {holder} in this run; "
                f"node {node_id} presents it too (two SuperNodes configured with the same "
                "site-name?): give each site its own name (fl-app deploy node-config)"
            )
        self._holder[digest] = node_id
        self._held[node_id] = digest
        return None

    def contested(self) -> dict[str, list[int]]:
        """Each refused identity (12 hex digits) and the nodes refused for it, sorted."""
        return {f"{d:012x}": sorted(nodes) for d, nodes in sorted(self._contested.items())}

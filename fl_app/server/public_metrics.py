"""Which ``metrics.jsonl`` keys describe one client rather than the round.

One rule for every reader that publishes a run's per-round numbers: the restricted
export (:mod:`fl_app.release.redact`) and the experiment trackers
(:mod:`fl_app.server.tracking`). A copy per reader could drift, and a key one of them
let through would put a client's un-noised number where the threat model says it must
not be (docs/architecture.md, "Fairness" and "Experiment tracking").
"""

from __future__ import annotations

__all__ = ["CLIENT_KEY_FRAGMENTS", "PER_CLIENT_FIELDS", "key_names_a_client"]

# metrics.jsonl fields that hold per-client entries (node ids, reasons, metrics).
PER_CLIENT_FIELDS = frozenset({"client_metrics", "rejections", "failures"})
# Key fragments that name a client rather than the round (e.g. the mean of partition ids
# DP-SGD clients report; "site": the fairness indicators' per-site accuracies, each an
# un-noised function of one site's data that no epsilon covers, fl_app.server.fairness).
CLIENT_KEY_FRAGMENTS = ("node", "partition", "client_id", "site")


def key_names_a_client(key: str) -> bool:
    """``key`` contains a fragment naming a node, partition, client id or site."""
    lowered = key.lower()
    return any(f in lowered for f in CLIENT_KEY_FRAGMENTS)

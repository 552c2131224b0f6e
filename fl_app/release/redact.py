"""What a restricted export may show, reduced so that it names no client.

The restricted tier adds ``metrics.jsonl`` reduced to per-round aggregate scalars (no
per-client entry, nothing keyed by or naming a node), ``privacy_ledger.json``
(client-level DP; local-DP clients re-keyed by anonymous index) and, for record-level
DP-SGD, ``record_level_epsilon.json`` (each institution's ε, by anonymous index).
Before anything is written, every output is scanned for the run's node ids and for the
unsalted config hash or its salt: finding one is an export bug, and nothing is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from fl_app.server.public_metrics import PER_CLIENT_FIELDS, key_names_a_client

__all__ = [
    "aggregate_metrics",
    "anonymous_ledger",
    "leak_guard",
    "node_ids",
    "record_level_table",
    "secret_guard",
]

# Node ids shorter than this are not scanned for in the output (they would match any
# digit run); Flower's node ids are random 64-bit integers.
_MIN_GUARD_DIGITS = 6


def node_ids(
    metrics: Iterable[Mapping[str, Any]], summary: Mapping[str, Any], ledger_text: str | None
) -> set[str]:
    """Every node id the run directory mentions (what the export must never contain)."""
    ids: set[str] = set()
    for rec in metrics:
        cm = rec.get("client_metrics")
        if isinstance(cm, dict):
            ids.update(str(k) for k in cm)
        for name in ("rejections", "failures"):
            items = rec.get(name)
            if isinstance(items, list):
                ids.update(str(x["node"]) for x in items if isinstance(x, dict) and "node" in x)
    privacy = summary.get("privacy", {})
    rl = privacy.get("record_level") if isinstance(privacy, dict) else None
    if isinstance(rl, dict):
        ids.update(str(k) for k in rl.get("per_client", {}) or {})
        ids.update(str(k) for k in rl.get("clients_budget_exhausted", []) or [])
    cl = privacy.get("client_level") if isinstance(privacy, dict) else None
    if isinstance(cl, dict):
        ids.update(str(k) for k in cl.get("releases", {}) or {})
    if ledger_text is not None:
        try:
            raw = json.loads(ledger_text)
            ids.update(str(k) for k in raw.get("local", {}) or {})
            ids.update(str(k) for k in raw.get("participation", {}) or {})
        except (ValueError, AttributeError):
            pass
    return ids


# ---- privacy evidence -----------------------------------------------------------


def aggregate_metrics(records: list[dict[str, Any]], node_ids: set[str]) -> bytes:
    """metrics.jsonl reduced to per-round aggregate scalars.

    Kept: numbers, booleans and nulls under keys that name neither a node nor a
    partition. Dropped: per-client fields, lists, objects and free-text strings (a
    round's ``note`` can quote a protocol error).
    """
    lines = []
    for rec in records:
        out: dict[str, Any] = {}
        for key, value in rec.items():
            if key in PER_CLIENT_FIELDS or key_names_a_client(key):
                continue
            if any(n in key for n in node_ids):
                continue
            if value is None or isinstance(value, bool):
                out[key] = value
            elif isinstance(value, (int, float)):
                if isinstance(value, int) and str(value) in node_ids:
                    continue
                out[key] = value
        lines.append(json.dumps(out, sort_keys=True, allow_nan=False))
    return ("\n".join(lines) + "\n").encode() if lines else b""


def anonymous_ledger(ledger: Any) -> bytes:
    """The ledger with local-DP clients (and per-client cohort counts, keyed by node id)
    re-keyed ``client-1``, ``client-2``, ... ."""
    from dataclasses import replace

    def anonymous(counts: Any) -> tuple[tuple[str, int], ...]:
        ordered = sorted(counts, key=lambda kv: (-kv[1], kv[0]))
        return tuple((f"client-{i}", n) for i, (_, n) in enumerate(ordered, start=1))

    participation = anonymous(getattr(ledger, "participation", ()))
    out = replace(ledger, local=anonymous(ledger.local), participation=participation)
    return (out.to_json() + "\n").encode()


def record_level_table(summary: Mapping[str, Any]) -> bytes:
    rl = summary["privacy"]["record_level"]
    fields = ("epsilon", "delta", "noise-multiplier", "sample-rate", "steps")
    rows = [
        {f.replace("-", "_"): m.get(f) for f in fields}
        for m in (rl.get("per_client") or {}).values()
        if isinstance(m, dict)
    ]
    rows.sort(key=lambda r: (-(r["epsilon"] or 0.0), -(r["steps"] or 0.0)))
    table = {
        "note": "each institution's record-level DP-SGD spend, by anonymous index "
        "(not a node or partition id)",
        "accountant": rl.get("accountant"),
        "institutions": [{"institution": i, **r} for i, r in enumerate(rows, start=1)],
    }
    return (json.dumps(table, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


# ---- writing ------------------------------------------------------------------------


def leak_guard(outputs: Mapping[str, bytes], node_ids: set[str]) -> None:
    """Refuse to write output that mentions a node id (a bug here, never a user error)."""
    for name, data in outputs.items():
        for node in node_ids:
            if len(node) >= _MIN_GUARD_DIGITS and node.encode() in data:
                raise RuntimeError(
                    f"export bug: {name} would contain node id {node}; nothing was written"
                )


def secret_guard(outputs: Mapping[str, bytes], config_hash: str, salt: Any) -> None:
    """Refuse output holding the unsalted config hash or the salt (an export bug)."""
    secrets = [config_hash, *([salt] if isinstance(salt, str) and salt else [])]
    for name, data in outputs.items():
        for secret in secrets:
            if secret[:16].encode() in data:
                raise RuntimeError(
                    f"export bug: {name} would contain the unsalted config hash or its "
                    "salt; nothing was written"
                )

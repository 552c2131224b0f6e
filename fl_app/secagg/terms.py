"""The round terms a masked input is computed under, bound into its pairwise masks.

Why: a stage-3 instruction carries, besides the client spec (bound into the round context,
:func:`fl_app.secagg.protocol.spec_binding`), per-round numbers the server chooses: the
encoding bound, the weighting and its cap, the proximal term, a client-side clip norm, the
distributed-DP round and the global weights. Sent to one client only, any of them isolates
it: every other client encoded at a bound of 1e9 (or weighted ~0, or trained from a model
whose update vanishes) leaves the modular sum decodable as that one client's vector at its
own scale (red-team review; Pasquini et al. 2022 for the model variant). The terms'
digest goes into the key derivation of every pairwise mask (client and server), so a
client computing under other terms than its neighbours holds masks that cancel with
nobody's: its input stays masked, and the round's sum is noise the server cannot decode.
Honest rounds are unchanged (every client gets the same terms).

The digest covers the config keys in :data:`TERMS_KEYS` (the per-node ones, e.g. the
routed ciphertexts or ``partition-id``, legitimately differ) and the global weights'
content address (Flower's ``ArrayRecord.object_id``: SHA-256 of the serialised record, the
same bytes at both ends).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from fl_app.protocol import (
    ARRAYS_KEY,
    CLIP_NORM_KEY,
    CONFIG_KEY,
    PROXIMAL_MU,
    SERVER_ROUND,
    SPEC_KEY,
)
from fl_app.secagg import wire

__all__ = ["TERMS_KEYS", "content_terms", "round_terms"]

_LABEL = b"fl-app/secagg/terms/v1|"
TERMS_KEYS = (
    SPEC_KEY,
    SERVER_ROUND,
    PROXIMAL_MU,
    CLIP_NORM_KEY,
    wire.SECAGG_BOUND,
    wire.SECAGG_WEIGHTING,
    wire.SECAGG_MAX_WEIGHT,
    wire.SECAGG_DDP,
)


def _canonical(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return {"int": str(value)}
    if isinstance(value, float):
        return {"float": value.hex()}  # exact: 1.0 and 1.0000000001 differ
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    raise TypeError(f"round terms: unsupported config value type {type(value).__name__}")


def round_terms(config: Mapping[str, Any] | None, arrays_id: str | None) -> bytes:
    """SHA-256 (32 bytes) of a stage-3 instruction's terms: :data:`TERMS_KEYS` of its
    config record and ``arrays_id``, the content address of its global weights (Flower's
    ``ArrayRecord.object_id``; this core imports no Flower)."""
    terms = {k: _canonical(config[k]) for k in TERMS_KEYS if config is not None and k in config}
    doc = {"config": terms, "arrays": arrays_id}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(_LABEL + text.encode("utf-8")).digest()


def content_terms(content: Any) -> bytes:
    """:func:`round_terms` of a stage-3 instruction's content (a Flower ``RecordDict``,
    read by its ``config_records`` and ``array_records``: this core imports no Flower),
    as the client masks under and the server unmasks under."""
    arrays = content.array_records.get(ARRAYS_KEY)
    config = content.config_records.get(CONFIG_KEY)
    return round_terms(config, arrays.object_id if arrays is not None else None)

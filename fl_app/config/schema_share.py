"""The ``share`` section of the config: what leaves a site (docs/personalization.md).

Kept beside :mod:`fl_app.config.schema` (which nests it as ``AppConfig.share``) so the
schema module stays a size a reader can hold. A leaf: standard library only. Room is left
for ``share.compression`` (issue 19), which makes ``artifact=compressed`` usable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

__all__ = ["ShareArtifact", "ShareCompression", "ShareConfig"]


class ShareArtifact(str, Enum):
    delta = "delta"  # Δ = w_local − w_global of the shared layers (today's reply)
    weights = "weights"  # w_local of the shared layers (trusted server, no client-level DP)
    compressed = "compressed"  # a compressed Δ: needs share.compression != none


class ShareCompression(str, Enum):
    """How Δ is compressed before it is clipped and sent (docs/compression.md)."""

    none = "none"  # the whole Δ (today's behaviour)
    randk = "randk"  # the coordinates of a public per-round mask (works under SecAgg/DP)
    topk = "topk"  # the largest |Δ + residual| coordinates (trusted server only; validate_share)
    sketch = "sketch"  # a count sketch with public per-round hashes (works under SecAgg/DP)


@dataclass
class ShareConfig:
    """What leaves a site: the declared artifact and the layers (the rest stay there)."""

    artifact: ShareArtifact = ShareArtifact.delta
    # fnmatch globs over state_dict names that leave a site (["*"]: all, today's behaviour).
    layers: list[str] = field(default_factory=lambda: ["*"])
    # Compression of Δ (share.artifact=compressed) and the fraction of coordinates kept.
    compression: ShareCompression = ShareCompression.none
    ratio: float = 1.0
    # Rows r of the count sketch (share.compression=sketch): r·c ≈ ratio·d cells, c columns.
    sketch_rows: int = 5

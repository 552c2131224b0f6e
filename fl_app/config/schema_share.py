"""The ``share`` section of the config: what leaves a site (docs/personalization.md).

Kept beside :mod:`fl_app.config.schema` (which nests it as ``AppConfig.share``) so the
schema module stays a size a reader can hold. A leaf: standard library only. Room is left
for ``share.compression`` (issue 19), which makes ``artifact=compressed`` usable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

__all__ = ["ShareArtifact", "ShareConfig"]


class ShareArtifact(str, Enum):
    delta = "delta"  # Δ = w_local − w_global of the shared layers (today's reply)
    weights = "weights"  # w_local of the shared layers (trusted server, no client-level DP)
    compressed = "compressed"  # a compressed Δ: needs share.compression (not available yet)


@dataclass
class ShareConfig:
    """What leaves a site: the declared artifact and the layers (the rest stay there)."""

    artifact: ShareArtifact = ShareArtifact.delta
    # fnmatch globs over state_dict names that leave a site (["*"]: all, today's behaviour).
    layers: list[str] = field(default_factory=lambda: ["*"])

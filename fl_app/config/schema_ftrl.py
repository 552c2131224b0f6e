"""The ``privacy.ftrl`` section of the config: DP-FTRL with tree aggregation.

Kept beside :mod:`fl_app.config.schema` (which nests it as ``PrivacyConfig.ftrl``) so the
schema module stays a size a reader can hold. A leaf: standard library only. The
mechanism and its accounting: :mod:`fl_app.privacy.tree`, docs/dp-ftrl.md.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FtrlConfig"]


@dataclass
class FtrlConfig:
    """DP-FTRL (Kairouz et al. 2021): noisy prefix sums instead of per-round noise."""

    enabled: bool = False
    # Rounds per tree: a fresh tree (from the current model) every restart_every rounds;
    # null = one tree over num_rounds. Small trees keep each released node's sensitivity low.
    restart_every: int | None = None

"""The ``privacy.ftrl`` section of the config: DP-FTRL with tree aggregation.

Kept beside :mod:`fl_app.config.schema` (which nests it as ``PrivacyConfig.ftrl``) so the
schema module stays a size a reader can hold. A leaf: standard library only. The
mechanism and its accounting: :mod:`fl_app.privacy.tree`, docs/dp-ftrl.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["FtrlConfig", "FtrlParticipation"]


class FtrlParticipation(str, Enum):
    """What the account may assume about how often one client is in a tree's cohorts."""

    # Nothing: a client may be in every round (a node of 2^l rounds moves by 2^l·C).
    arbitrary = "arbitrary"
    # The server never samples a client twice within one tree (strategies/ftrl_cap.py),
    # so one client is in at most h = ceil(log2(k+1)) released nodes per tree.
    once_per_tree = "once_per_tree"


@dataclass
class FtrlConfig:
    """DP-FTRL (Kairouz et al. 2021): noisy prefix sums instead of per-round noise."""

    enabled: bool = False
    # Rounds per tree: a fresh tree (from the current model) every restart_every rounds;
    # null = one tree over num_rounds. Small trees keep each released node's sensitivity low.
    restart_every: int | None = None
    # once_per_tree: the server enforces the cap by cohort selection (fixed-size cohorts
    # from the clients not yet in the current tree) and the ledger uses the paper's
    # tighter bound (Kairouz et al. 2021, Appendix D); arbitrary assumes nothing.
    participation: FtrlParticipation = FtrlParticipation.arbitrary

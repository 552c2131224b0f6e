"""Server side of fl-app: the round driver and the strategies it wraps.

Privacy layers (client-level DP, secure aggregation, budget guards) plug in here as
wrappers and driver stages; see docs/architecture.md (One round, as data flows).
"""

from strategies.cohort_grid import CohortGrid
from strategies.driver import RoundDriver
from strategies.driver_types import (
    DriverResult,
    DriverSettings,
    RoundListener,
    RoundReport,
    StageReport,
)
from strategies.sampling import CohortSampler, FixedSizeSampler, PoissonSampler
from strategies.validation import ReplyLimits

__all__ = [
    "CohortGrid",
    "CohortSampler",
    "DriverResult",
    "DriverSettings",
    "FixedSizeSampler",
    "PoissonSampler",
    "ReplyLimits",
    "RoundDriver",
    "RoundListener",
    "RoundReport",
    "StageReport",
]

"""Differential privacy for fl-app clients and servers.

:mod:`fl_app.privacy.history` holds the record-level privacy ledger
(:class:`PrivacyHistory` of :class:`DpSgdEvent`), :mod:`fl_app.privacy.accounting` the
accountants that turn it into ε and :mod:`fl_app.privacy.calibration` the noise for a
budget.
"""

from fl_app.privacy.accounting import PRV_EPS_ERROR, PRV_MAX_GRID_POINTS, epsilon, project_epsilon
from fl_app.privacy.calibration import calibrate_noise_multiplier
from fl_app.privacy.history import (
    HISTORY_VERSION,
    AccountantName,
    AccountingError,
    DpSgdEvent,
    HistoryError,
    PrivacyHistory,
)

__all__ = [
    "HISTORY_VERSION",
    "PRV_EPS_ERROR",
    "PRV_MAX_GRID_POINTS",
    "AccountantName",
    "AccountingError",
    "DpSgdEvent",
    "HistoryError",
    "PrivacyHistory",
    "calibrate_noise_multiplier",
    "epsilon",
    "project_epsilon",
]

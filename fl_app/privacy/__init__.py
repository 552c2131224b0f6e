"""Differential privacy for fl-app clients and servers.

:mod:`fl_app.privacy.accounting` holds the record-level privacy ledger
(:class:`PrivacyHistory` of :class:`DpSgdEvent`) and the accountants that turn it
into ε.
"""

from fl_app.privacy.accounting import (
    HISTORY_VERSION,
    PRV_EPS_ERROR,
    PRV_MAX_GRID_POINTS,
    AccountantName,
    AccountingError,
    DpSgdEvent,
    HistoryError,
    PrivacyHistory,
    calibrate_noise_multiplier,
    epsilon,
    project_epsilon,
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

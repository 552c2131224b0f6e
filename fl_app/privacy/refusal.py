"""Why a client-side privacy mechanism will not run this round.

The mechanisms in :mod:`fl_app.privacy.local` and :mod:`fl_app.privacy.dpsgd_plan`
raise these; the ClientApp turns them into structured error replies (a budget refusal
tells the server to stop asking). The text goes to the server: it names the problem,
never the site's data (no record counts).
"""

from __future__ import annotations

__all__ = ["BudgetRefusal", "PrivacyRefusal"]


class PrivacyRefusal(Exception):
    """The mechanism cannot run safely this round (lost state, bad input, no ε)."""


class BudgetRefusal(PrivacyRefusal):
    """This release would take the client past its own privacy budget."""

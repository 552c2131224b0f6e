"""Why a client will not run an instruction: the refusals its handlers raise.

Every refusal becomes a structured error reply at the process boundary
(:func:`fl_app.client.app.refusals_as_errors`) and, where the site keeps one, a
``client.refused`` record in its audit log (:mod:`fl_app.client.audit`).
"""

from __future__ import annotations

from fl_app.client.policy import PolicyViolation
from fl_app.protocol import BUDGET_EXHAUSTED, CLIENT_REFUSED

__all__ = ["BudgetExhausted", "ClientRefusal", "PolicyRefusal", "secagg_refusal"]


class ClientRefusal(Exception):
    """This client will not run the instruction; the reason goes back to the server."""

    code = CLIENT_REFUSED


class BudgetExhausted(ClientRefusal):
    """Training this round would take the client past its privacy budget."""

    code = BUDGET_EXHAUSTED


class PolicyRefusal(ClientRefusal):
    """The site's data-use policy forbids this instruction; ``field`` names the rule.

    ``max_epsilon`` refusals carry ``BUDGET_EXHAUSTED`` (the site's budget will not
    grow back this run, so the server should stop asking), the others ``CLIENT_REFUSED``.
    """

    def __init__(self, violation: PolicyViolation) -> None:
        super().__init__(str(violation))
        self.field = violation.field
        self.code = BUDGET_EXHAUSTED if violation.field == "max_epsilon" else CLIENT_REFUSED


def secagg_refusal(err: Exception) -> ClientRefusal:
    """A secure-aggregation refusal; one resting on a site-policy field names it."""
    field = getattr(err, "field", None)
    if field is not None:
        detail = getattr(err, "detail", str(err))
        return PolicyRefusal(PolicyViolation(field, f"secure aggregation: {detail}"))
    return ClientRefusal(f"secure aggregation: {err}")

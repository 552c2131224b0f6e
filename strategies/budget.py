"""The federation's privacy budget: stop *before* a round that would exceed it.

Flower's DP wrappers account after the fact and lose the final model when the budget
runs out. Here the guard projects ε of the ledger plus the next round's planned event
before anything is sent; if it would exceed ``privacy.max_epsilon`` the driver stops
the run cleanly, the model of the last completed round (already DP-released) and the
ledger are saved, and the run ends with status ``completed`` and the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fl_app.privacy.composition import unsampled_epsilon
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.round_event import RoundEvent
from strategies.noise_schedule import server_projection

__all__ = ["BudgetGuard", "BudgetVerdict"]


@dataclass(frozen=True)
class BudgetVerdict:
    allowed: bool
    epsilon_after: float
    reason: str = ""


@dataclass(frozen=True)
class BudgetGuard:
    """Refuses a round whose projected ε exceeds ``max_epsilon``.

    ``against_server`` (``privacy.threat_model=distributed_dp``): the party the
    guarantee is stated against is the server, which picks the cohort, so the guard
    projects the against-server ε of the client that has taken part most often so far,
    were it in this round too (composition without amplification,
    :meth:`FederationLedger.server_epsilons`). Otherwise it projects the ε against
    outsiders (sampling amplification), the figure the released model carries.
    """

    max_epsilon: float
    against_server: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ValueError(
                f"privacy.max_epsilon must be finite and > 0, found {self.max_epsilon!r}"
            )

    def check(self, ledger: FederationLedger, planned: RoundEvent) -> BudgetVerdict:
        if self.against_server:
            most = ledger.most_participation()
            if all(e.noise_multiplier == planned.noise_multiplier for e in ledger.events):
                after = unsampled_epsilon(planned, most + 1, ledger.delta, ledger.accountant)
                now = unsampled_epsilon(planned, most, ledger.delta, ledger.accountant)
            else:  # a noise schedule: rounds differ in z
                after, now = _worst_client(ledger, planned, most)
            party = (
                f"against the server (a client already in {most} cohorts, in this one too; "
                "no sampling amplification)"
            )
        else:
            after = ledger.project([planned])
            now = ledger.epsilon()
            party = "against outsiders"
        if after <= self.max_epsilon:
            return BudgetVerdict(True, after)
        reason = (
            f"privacy budget: round {planned.round} would take epsilon {party} from "
            f"{now:.4g} to {after:.4g} > privacy.max_epsilon={self.max_epsilon:g} (delta="
            f"{ledger.delta:g}, {ledger.accountant.value}); stopping with the DP-released "
            "model of the last completed round"
        )
        return BudgetVerdict(False, after, reason)


def _worst_client(ledger: FederationLedger, planned: RoundEvent, most: int) -> tuple[float, float]:
    """ε against the server, after and before ``planned``, of a client already in
    ``most`` cohorts, when rounds differ in ``z``: the counts do not say which rounds it
    was in, so they are taken to be the ``most`` least-noised ones (an upper bound).
    Distributed DP's rounds compose each at its own ``z`` (and ``τ``); others at the
    least ``z`` of those rounds."""
    worst = sorted(ledger.events, key=lambda e: e.noise_multiplier)[:most]
    if all(e.mechanism == "ddg" for e in (planned, *worst)):
        return (
            server_projection([planned, *worst], ledger.delta),
            server_projection(worst, ledger.delta) if worst else 0.0,
        )
    least = min((planned, *worst), key=lambda e: e.noise_multiplier)
    return (
        unsampled_epsilon(least, most + 1, ledger.delta, ledger.accountant),
        unsampled_epsilon(least, most, ledger.delta, ledger.accountant),
    )

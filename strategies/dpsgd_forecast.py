"""Which clients will refuse the next round for their DP-SGD budget (issue 17).

A DP-SGD client refuses a round whose ε would exceed ``privacy.dpsgd.max_epsilon``
(:func:`fl_app.privacy.dpsgd_plan.plan_round`). Without a forecast, the round after a
client's last affordable one is sent anyway, comes back refused by everyone, and is
spent for nothing (under client-level DP it is even accounted in the federation's
ledger). The driver asks :class:`DpSgdForecast` before each round and stops first when
fewer than ``min_train_replies`` clients could train it.

The forecast repeats the client's own computation from what it already reports in its
public metrics: its steps so far (``dp-steps``), rounds (``dp-rounds``), sampling rate
(``dp-sample-rate``) and noise multiplier (``dp-noise-multiplier``). Every round takes
the same planned steps with the same ``(z, q)``, so the client's history is one block
``(z, q, steps)`` and ε after the next round is that of ``steps + steps / rounds``
steps, computed by the same accountant at the run's δ. Sites may hold stricter
budgets of their own (site policy): they refuse earlier, never later, so a predicted
refusal is certain; a refusal the forecast does not see still happens as before.

Where the steps, ``q`` and ``z`` are hidden (secure aggregation, local DP: with the
public batch size they give a site's record count to within a batch), the reply
carries only ``dp-epsilon`` and ``dp-rounds``. ε after one more round depends on
``q`` and the steps per round, i.e. on the hidden record count, so the server cannot
forecast it from what it may see, and the one refused round remains there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["DpSgdForecast"]

_NEEDED = ("dp-steps", "dp-rounds", "dp-sample-rate", "dp-noise-multiplier")


@dataclass(frozen=True)
class DpSgdForecast:
    """Predicts budget refusals of DP-SGD clients from their public metrics.

    Parameters
    ----------
    max_epsilon
        ``privacy.dpsgd.max_epsilon``, the budget every client checks.
    delta, accountant
        ``privacy.dpsgd.delta`` and ``.accountant``, as the clients account.
    """

    max_epsilon: float
    delta: float
    accountant: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ValueError(
                f"privacy.dpsgd.max_epsilon must be finite and > 0, found {self.max_epsilon!r}"
            )

    def epsilon_after_next_round(self, metrics: Mapping[str, float]) -> float | None:
        """ε the client reaches if it trains one more round, or None (not forecastable)."""
        from fl_app.privacy.dpsgd_plan import fresh_epsilon
        from fl_app.privacy.history import AccountingError

        if any(key not in metrics for key in _NEEDED):
            return None
        try:
            total, rounds = int(metrics["dp-steps"]), int(metrics["dp-rounds"])
            q, z = float(metrics["dp-sample-rate"]), float(metrics["dp-noise-multiplier"])
        except (TypeError, ValueError, OverflowError):
            return None
        if rounds < 1 or total < rounds or total % rounds:
            return None
        try:
            return fresh_epsilon(z, q, total + total // rounds, self.delta, self.accountant)
        except (AccountingError, ValueError):
            return None

    def refusing(
        self,
        nodes: Sequence[int],
        client_metrics: Mapping[int, Mapping[str, float]],
        enough: int | None = None,
    ) -> set[int]:
        """The nodes among ``nodes`` whose next round would exceed the budget.

        With ``enough``, the search stops once ``enough`` nodes are known to be able to
        train (the round can run; the set returned is then partial): each forecast is
        an accountant call, so the least-spent nodes are looked at first.
        """

        def spent(node: int) -> float:
            metrics = client_metrics.get(node)
            return -1.0 if metrics is None else float(metrics.get("dp-epsilon", -1.0))

        out: set[int] = set()
        able = 0
        for node in sorted(nodes, key=lambda n: (spent(n), n)):
            if enough is not None and able >= enough:
                break
            metrics = client_metrics.get(node)
            eps = None if metrics is None else self.epsilon_after_next_round(metrics)
            if eps is not None and eps > self.max_epsilon:
                out.add(node)
            else:
                able += 1
        return out

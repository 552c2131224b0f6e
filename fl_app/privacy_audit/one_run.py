"""An empirical lower bound on ε from one training run (Steinke, Nasr & Jagielski 2023).

"Privacy Auditing with One (1) Training Run" (NeurIPS 2023): ``m`` canaries are each
included in training independently with probability ½; after training the auditor
guesses "in" or "out" on ``r`` of them (abstaining on the rest) and gets ``v`` right.
If training is (ε, δ)-DP, the number of correct guesses is stochastically dominated
by ``Binomial(r, e^ε / (1 + e^ε))`` up to a δ term (their Theorem 3.1 / Proposition
5.2; the p-value below is their Algorithm's ``p_value_DP_audit``):

    p(ε) = P[Binom(r, q) >= v] + 2 m δ · max_{1<=i<=v} P[v-i <= Binom(r, q) < v] / i,
    q = e^ε / (1 + e^ε).

The audit reports the largest ε whose p-value is still below ``1 - confidence``: at
that confidence the run is *not* (ε, δ)-DP for any smaller ε. A bound above the ε the
run accounted for means the accounting (or the mechanism) is wrong.

The number of guesses ``k+`` / ``k-`` must be fixed before the scores are seen
(:func:`guess_from_scores` takes them as arguments); picking the best of several
would need a multiple-testing correction this module does not make.

Used by :mod:`fl_app.privacy_audit.canaries`; see docs/architecture.md (privacy audit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "AccountingBugSuspected",
    "Guesses",
    "OneRunBound",
    "check_against_accounted",
    "epsilon_lower_bound",
    "guess_from_scores",
    "one_run_p_value",
]

# Bisection steps on ε: the bracket [0, 2^j] halves 60 times (far below 1e-9).
_BISECTION_STEPS = 60
# No bound above this is searched for (q rounds to 1.0 in float64 well before it).
_EPS_CEILING = 64.0


class AccountingBugSuspected(RuntimeError):
    """The audited lower bound on ε exceeds the ε the run accounted for."""


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(
            f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m}); "
            "count guesses among the canaries only"
        )


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses correct] under an (ε, δ)-DP null (module doc).

    Parameters
    ----------
    m : int
        Canaries, each included independently with probability ½.
    r : int
        Guesses made (abstentions excluded).
    v : int
        Correct guesses.
    epsilon, delta : float
        The DP guarantee of the null hypothesis; ``epsilon >= 0``, ``0 <= delta <= 1``.
    """
    _check_counts(m, r, v)
    if not epsilon >= 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, found {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    # windows[i-1] = P[v - i <= Binom(r, q) < v] for i = 1..v (one vectorised pass).
    windows = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(windows / np.arange(1, v + 1))) if v > 0 else 0.0
    return min(1.0, tail + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """Largest ε the guesses reject at ``confidence`` (0 when none is rejected).

    ``p(ε)`` grows with ε, so bisection on ε finds where it crosses ``1 - confidence``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), found {confidence}")
    beta = 1.0 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi
        if hi > _EPS_CEILING:
            return lo
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if one_run_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Guesses:
    """The auditor's guesses on the canaries: how many, and how many were right."""

    canaries: int
    guesses: int
    correct: int


def guess_from_scores(
    scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int
) -> Guesses:
    """Guess "in" for the ``k_plus`` highest scores, "out" for the ``k_minus`` lowest.

    Higher score = more likely included. Ties are broken by a stable sort (canary
    order, which is itself random), never by the inclusion bits.
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1:
        raise ValueError("scores and included must be 1-D arrays of equal length")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(s):
        raise ValueError(
            f"k_plus ({k_plus}) + k_minus ({k_minus}) must be non-negative and at most "
            f"the number of canaries ({len(s)})"
        )
    order = np.argsort(-s, kind="stable")
    top, bottom = order[:k_plus], order[len(s) - k_minus :]
    correct = int(inc[top].sum()) + int((~inc[bottom]).sum())
    return Guesses(canaries=len(s), guesses=k_plus + k_minus, correct=correct)


@dataclass(frozen=True)
class OneRunBound:
    """``audit.json``'s ``one_run`` section: the guesses and the bound they give."""

    guesses: Guesses
    delta: float
    confidence: float
    epsilon_lower_bound: float
    accounted_epsilon: float | None

    @classmethod
    def of(
        cls, guesses: Guesses, delta: float, confidence: float, accounted: float | None
    ) -> OneRunBound:
        """The bound at ``delta`` and ``confidence`` for ``guesses``."""
        eps = epsilon_lower_bound(
            guesses.canaries, guesses.guesses, guesses.correct, delta, confidence
        )
        return cls(guesses, float(delta), float(confidence), eps, accounted)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready values, keys as documented in the README's audit section."""
        return {
            "canaries": self.guesses.canaries,
            "guesses": self.guesses.guesses,
            "correct": self.guesses.correct,
            "delta": self.delta,
            "confidence": self.confidence,
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "accounted_epsilon": self.accounted_epsilon,
        }


def check_against_accounted(bound: OneRunBound) -> None:
    """Raise when the audited lower bound exceeds the accounted ε.

    At the stated confidence a correct accountant is exceeded only with probability
    ``1 - confidence``; a bound above it means the ε was under-reported or the
    mechanism adds less noise than it accounts for.
    """
    acc = bound.accounted_epsilon
    if acc is not None and bound.epsilon_lower_bound > acc:
        raise AccountingBugSuspected(
            f"the one-run audit's lower bound epsilon >= {bound.epsilon_lower_bound:.3f} "
            f"(at {bound.confidence:.0%} confidence, delta={bound.delta:g}) exceeds the "
            f"accounted epsilon {acc:.3f}: this means an accounting bug (epsilon "
            "under-reported, or less noise added than accounted); do not release this run"
        )

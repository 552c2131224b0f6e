"""Weighted mean of the cohort's updates: the one number every mean-based strategy needs.

FedAvg, FedProx and the FedOpt family all start from
``Δ̄ = Σ_i n_i Δ_i / Σ_i n_i``. The round driver computes it here (and, with secure
aggregation, a masked-sum protocol will compute the same quantity without seeing any
Δ_i), then hands the strategy ``w + Δ̄`` as a single pre-aggregated reply, so the
strategy's own server-side step (plain replacement, Adam, ...) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from strategies.validation import TrainReply

__all__ = ["MeanUpdate", "apply_update", "weighted_mean_metrics", "weighted_mean_update"]


@dataclass(frozen=True)
class MeanUpdate:
    update: dict[str, np.ndarray]  # float64 weighted mean of the accepted Δ_i
    total_weight: float
    num_contributors: int


def weighted_mean_update(replies: Sequence[TrainReply]) -> MeanUpdate:
    """``Σ n_i Δ_i / Σ n_i``, accumulated in float64. ``replies`` must be non-empty."""
    if not replies:
        raise ValueError("weighted_mean_update needs at least one reply")
    total = float(sum(r.num_examples for r in replies))
    names = list(replies[0].update)
    acc = {k: np.zeros(replies[0].update[k].shape, dtype=np.float64) for k in names}
    for r in replies:
        w = r.num_examples / total
        for k in names:
            acc[k] += w * r.update[k].astype(np.float64, copy=False)
    return MeanUpdate(acc, total, len(replies))


def apply_update(
    arrays: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``w + Δ̄`` computed in float64 and cast back to each array's dtype."""
    return {
        k: (v.astype(np.float64) + mean[k]).astype(v.dtype, copy=False) for k, v in arrays.items()
    }


def weighted_mean_metrics(
    items: Sequence[tuple[float, Mapping[str, float]]],
) -> dict[str, float]:
    """Weighted mean of the metric keys every item reports (others are dropped)."""
    if not items:
        return {}
    common = set(items[0][1])
    for _, m in items[1:]:
        common &= set(m)
    total = sum(w for w, _ in items)
    return {k: sum(w * m[k] for w, m in items) / total for k in sorted(common)}

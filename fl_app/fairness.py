"""Fairness indicators as pure math: per-site accuracy spread and per-class accuracy.

A mean accuracy hides who pays for privacy: DP-SGD's clipping and noise cost the
under-represented classes and the atypical sites the most ("Differential Privacy Has
Disparate Impact on Model Accuracy", Bagdasaryan, Poursaeed & Shmatikov, NeurIPS 2019).
These functions turn a run's evaluations into the numbers that show the worst group:

* :func:`site_spread`: each site's accuracy on its own validation split (federated
  evaluation) summarised as the unweighted mean over sites, the population standard
  deviation, the range (max − min) and the worst site. Every site counts once, whatever
  its size: a large site's good accuracy must not hide a small site's bad one (the
  example-weighted mean is ``fed_eval_accuracy``).
* :func:`class_accuracy`: the server's held-out test set, per true class: the fraction
  of class ``c``'s examples predicted ``c`` (the recall of ``c``).

Who may see the inputs is not decided here: a per-site accuracy is an un-noised function
of that site's data, so it is computed only where the threat model lets the server see
per-client numbers (docs/architecture.md, Fairness; :mod:`fl_app.server.fairness`).
Pure numpy, no Flower, no torch: the round driver's metrics, the run summary and the
sweep report share it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SiteSpread", "class_accuracy", "site_spread", "worst_class"]


@dataclass(frozen=True)
class SiteSpread:
    """Per-site accuracies and their spread (unweighted: each site counts once).

    ``std`` is the population standard deviation (``ddof=0``): the sites evaluated are
    the whole population described, not a sample of a larger one.
    """

    mean: float
    std: float
    range: float
    worst_site: str
    worst_accuracy: float
    sites: int

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "mean": self.mean,
            "std": self.std,
            "range": self.range,
            "worst_site": self.worst_site,
            "worst_accuracy": self.worst_accuracy,
            "sites": self.sites,
        }


def site_spread(accuracies: Mapping[str, float]) -> SiteSpread:
    """The spread of per-site accuracies, keyed by site.

    Ties for the worst site go to the smallest key, so the result does not depend on
    the order replies arrived in.

    Raises
    ------
    ValueError
        If there is no site, or an accuracy is not a finite number in [0, 1].
    """
    if not accuracies:
        raise ValueError("site_spread needs at least one site's accuracy, found none")
    for site, acc in accuracies.items():
        if not (isinstance(acc, (int, float)) and math.isfinite(acc) and 0.0 <= acc <= 1.0):
            raise ValueError(f"accuracy of site {site!r} must be a number in [0, 1], found {acc!r}")
    values = np.array([float(a) for a in accuracies.values()], dtype=np.float64)
    worst = min(accuracies, key=lambda s: (float(accuracies[s]), s))
    return SiteSpread(
        mean=float(values.mean()),
        std=float(values.std()),
        range=float(values.max() - values.min()),
        worst_site=worst,
        worst_accuracy=float(accuracies[worst]),
        sites=len(values),
    )


def class_accuracy(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int
) -> list[float | None]:
    """Accuracy on each true class ``0 .. num_classes-1``; ``None`` for a class with no
    example (no number rather than a made-up 0 or 1).

    Raises
    ------
    ValueError
        If the arrays differ in shape, are not 1-d, or hold a label outside the classes.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, found {num_classes}")
    y = np.asarray(labels)
    p = np.asarray(predictions)
    if y.ndim != 1 or y.shape != p.shape:
        raise ValueError(
            f"labels and predictions must be 1-d of one length, found {y.shape} and {p.shape}"
        )
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}], found {int(y.min())}..{int(y.max())}"
        )
    y = y.astype(np.int64)
    total = np.bincount(y, minlength=num_classes)
    correct = np.bincount(y[y == p.astype(np.int64)], minlength=num_classes)
    return [float(correct[c] / total[c]) if total[c] else None for c in range(num_classes)]


def worst_class(per_class: Sequence[float | None]) -> tuple[int, float] | None:
    """The class with the lowest accuracy (the smallest index on a tie), or ``None``
    when no class was measured."""
    measured = [(acc, c) for c, acc in enumerate(per_class) if acc is not None]
    if not measured:
        return None
    acc, c = min(measured)
    return c, acc

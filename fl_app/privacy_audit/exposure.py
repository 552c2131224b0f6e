"""Exposure of an inserted secret (Carlini, Liu, Erlingsson, Kos & Song 2019).

"The Secret Sharer: Evaluating and Testing Unintended Memorization in Neural
Networks" (USENIX Security 2019) measures memorization by inserting one secret drawn
from a space of ``R`` candidates into the training data and ranking every candidate by
the trained model's loss on it:

    exposure = log2(R) - log2(rank),   rank = 1 + #{candidates with loss <= the secret's}

(rank 1: the secret is the model's likeliest candidate, exposure ``log2 R``; a rank in
the middle, exposure about 1 bit). Ties count against the secret, so exposure is never
overstated.

Here a candidate is a random pattern (pixels uniform on the data's range) with one
label drawn uniformly from the classes, the same for every candidate; the secret is
one candidate drawn uniformly, inserted once into site 0's data of the canary re-run
(:mod:`~fl_app.privacy_audit.canaries`). Without the secret every candidate is
exchangeable, so the rank is uniform and ``P[exposure >= t] = 2^-t``; under (ε, δ)-DP
for a record, ``P[exposure >= t] <= e^ε · 2^-t + δ``, which puts the exposure a DP run
exceeds with probability at most 5 % at ``log2(e^ε / (0.05 - δ))``
(:func:`dp_exposure_limit`; reported beside the exposure, not a pass/fail test: it is
one draw).

Randomness: the audit's explicit generator (module doc of
:mod:`~fl_app.privacy_audit.canaries`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fl_app.privacy_audit.membership import per_example_loss

__all__ = ["SecretCandidates", "dp_exposure_limit", "draw_secret", "exposure", "secret_exposure"]

CANDIDATES = 1000


@dataclass(frozen=True)
class SecretCandidates:
    """``R`` candidate patterns, their shared label, and which one is the secret."""

    x: np.ndarray
    label: int
    secret: int

    @property
    def secret_record(self) -> tuple[np.ndarray, np.ndarray]:
        """The inserted record as a one-record batch ``(x, y)``."""
        return self.x[self.secret : self.secret + 1], np.array([self.label], dtype=np.int64)


def draw_secret(
    input_shape: tuple[int, ...],
    num_classes: int,
    bounds: tuple[float, float],
    rng: np.random.Generator,
    num_candidates: int = CANDIDATES,
) -> SecretCandidates:
    """``num_candidates`` patterns uniform on ``bounds``, one label, one secret."""
    if num_candidates < 2:
        raise ValueError(f"exposure needs at least 2 candidates, found {num_candidates}")
    lo, hi = bounds
    x = rng.uniform(lo, hi, size=(num_candidates, *input_shape)).astype(np.float32)
    label = int(rng.integers(num_classes))
    return SecretCandidates(x=x, label=label, secret=int(rng.integers(num_candidates)))


def exposure(losses: np.ndarray, secret: int) -> tuple[int, float]:
    """``(rank, exposure)`` of candidate ``secret`` among ``losses`` (module doc)."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1 or not 0 <= secret < len(losses):
        raise ValueError(f"need 1-D losses and 0 <= secret < {len(losses)}, found {secret}")
    others = np.delete(losses, secret)
    rank = 1 + int(np.count_nonzero(others <= losses[secret]))
    return rank, math.log2(len(losses)) - math.log2(rank)


def dp_exposure_limit(epsilon: float | None, delta: float, alpha: float = 0.05) -> float | None:
    """The exposure an (ε, δ)-DP run exceeds with probability at most ``alpha``.

    ``P[exposure >= t] <= e^ε 2^-t + δ`` (module doc), so ``t = log2(e^ε / (alpha - δ))``;
    ``None`` without a finite ε or when ``δ >= alpha`` (no limit at that level).
    """
    if epsilon is None or not math.isfinite(epsilon) or delta >= alpha:
        return None
    return epsilon / math.log(2) + math.log2(1.0 / (alpha - delta))


def secret_exposure(
    model: torch.nn.Module, candidates: SecretCandidates, epsilon: float | None, delta: float
) -> dict[str, Any]:
    """``audit.json``'s ``exposure`` section for ``model`` trained with the secret."""
    labels = np.full(len(candidates.x), candidates.label, dtype=np.int64)
    rank, bits = exposure(per_example_loss(model, candidates.x, labels), candidates.secret)
    return {
        "candidates": len(candidates.x),
        "rank": rank,
        "exposure_bits": bits,
        "max_exposure_bits": math.log2(len(candidates.x)),
        "dp_limit_95_bits": dp_exposure_limit(epsilon, delta),
        "secret": "a pattern uniform on the data's range with a random label, one of "
        f"{len(candidates.x)} candidates sharing that label, inserted once into site 0",
        "reference": "Carlini et al., The Secret Sharer, USENIX Security 2019",
    }

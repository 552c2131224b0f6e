"""Cohort sampling the privacy accountant can describe.

Flower's strategies sample with the global ``random`` module; here every draw comes
from a generator derived from ``(seed, round, stream)``, so a run is reproducible and a
resumed run samples exactly what the interrupted one would have, with no RNG state
to checkpoint.

* :class:`FixedSizeSampler`: exactly ``max(1, round(fraction * N))`` clients without
  replacement (accounted as sampling without replacement).
* :class:`PoissonSampler`: each client independently with probability ``fraction``
  (what ``PoissonSampledDpEvent`` models); the cohort may be empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["CohortSampler", "FixedSizeSampler", "PoissonSampler", "round_generator"]

TRAIN_STREAM = 0
EVALUATE_STREAM = 1


def round_generator(seed: int, server_round: int, stream: int) -> np.random.Generator:
    """An independent generator for one (seed, round, stream) triple."""
    return np.random.default_rng(np.random.SeedSequence([seed, server_round, stream]))


class CohortSampler(Protocol):
    def sample(self, node_ids: Sequence[int], server_round: int) -> list[int]:
        """Return the sampled node ids (sorted)."""
        ...


@dataclass(frozen=True)
class FixedSizeSampler:
    fraction: float
    seed: int
    stream: int = TRAIN_STREAM

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], found {self.fraction}")

    def cohort_size(self, num_nodes: int) -> int:
        return min(num_nodes, max(1, round(self.fraction * num_nodes)))

    def sample(self, node_ids: Sequence[int], server_round: int) -> list[int]:
        # Node ids are unsigned 64-bit (Flower draws them at random): sample positions
        # in the sorted pool, never the ids themselves through a signed numpy dtype.
        pool = sorted(int(n) for n in node_ids)
        if not pool:
            return []
        rng = round_generator(self.seed, server_round, self.stream)
        chosen = rng.choice(len(pool), size=self.cohort_size(len(pool)), replace=False)
        return sorted(pool[i] for i in chosen)


@dataclass(frozen=True)
class PoissonSampler:
    rate: float
    seed: int
    stream: int = TRAIN_STREAM

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 1:
            raise ValueError(f"rate must lie in (0, 1], found {self.rate}")

    def sample(self, node_ids: Sequence[int], server_round: int) -> list[int]:
        pool = sorted(int(n) for n in node_ids)
        rng = round_generator(self.seed, server_round, self.stream)
        keep = rng.random(len(pool)) < self.rate
        return [n for n, k in zip(pool, keep, strict=True) if k]

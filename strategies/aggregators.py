"""Update aggregators composed from small parts, in the spirit of TFF's aggregator factories.

The round driver (:mod:`strategies.driver`) asks one :class:`UpdateAggregator` per run
for: extra per-round instruction scalars, a verdict on each reply, and the update the
wrapped Flower strategy applies, from plaintext replies (:meth:`~UpdateAggregator.aggregate`)
or from the sums secure aggregation unmasks (:meth:`~UpdateAggregator.aggregate_sum`).
A :class:`ComposedAggregator` answers by delegating to four parts, each a concern of its
own, so a mechanism is a choice of parts, never a subclass that overrides a default to
raise:

``account`` (:class:`Accounting`)
    What a round spends and may refuse: nothing (:class:`Unaccounted`), the
    federation's ledger and budget guard (central and distributed DP), or each site's
    local-DP releases (:mod:`strategies.dp_aggregators`).
``clipping`` (:class:`Clipping` or ``None``)
    The L2 bound ``C`` (fixed, or adaptive after Andrew et al. 2021), who applies it,
    and what it asks of replies.
``plaintext`` (:class:`PlaintextInput`)
    How plaintext replies become the sum the release takes: the weighted mean itself
    (:class:`WeightedMeanInput`), clip-then-sum, or a refusal where no plaintext update
    may ever reach the server (distributed DP).
``release`` (:class:`Release`)
    From a sum to the update applied: the exact mean (:class:`ExactMean`), central
    Gaussian noise on the sum divided by the expected cohort, or the distributed
    shares' sum divided by the expected cohort.

The condition TFF's DP factories state holds here too: whatever sits between clipping
and noise must not increase sensitivity, or the noise must be calibrated to what it
makes (secure aggregation's fixed-point encoding: ``encoding_slack`` in the ledger
event). :class:`MeanAggregator` (no client-level DP) is the composition of the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from strategies.aggregation import weighted_mean_update
from strategies.validation import TrainReply

__all__ = [
    "Accounting",
    "Aggregate",
    "Clipping",
    "ComposedAggregator",
    "ExactMean",
    "MeanAggregator",
    "PlaintextInput",
    "Release",
    "Unaccounted",
    "UpdateAggregator",
    "WeightedMeanInput",
]


@dataclass(frozen=True)
class Aggregate:
    """The mean update to apply, its weight, and public per-round metrics."""

    update: dict[str, np.ndarray]
    total_weight: float
    metrics: dict[str, float] = field(default_factory=dict)


class UpdateAggregator(Protocol):
    """What the driver asks of a privacy layer in each round."""

    def round_config(self, rnd: int) -> Mapping[str, Any]:
        """Scalars added to this round's train instructions."""
        ...

    def begin_round(self, rnd: int, population: int) -> str | None:
        """Called once per round before anything is sent: record the round's mechanism,
        or return why the run must stop before it (budget)."""
        ...

    def status(self) -> dict[str, float]:
        """Public metrics after a round (e.g. ε so far), for the round's report."""
        ...

    def check_reply(self, reply: TrainReply) -> str | None:
        """A reason to reject this reply, or ``None``."""
        ...

    def aggregate(self, rnd: int, replies: Sequence[TrainReply]) -> Aggregate:
        """The update the strategy applies; ``replies`` is non-empty."""
        ...

    @property
    def weighting(self) -> str:
        """``"examples"`` (clients weight Δ by their example count) or ``"uniform"``."""
        ...

    @property
    def releases_every_round(self) -> bool:
        """Whether the round releases its (noised) sum however few updates arrived.

        ``False``: fewer than ``min_train_replies`` leave the model unchanged."""
        ...

    def note_cohort(self, rnd: int, cohort: Sequence[int]) -> None:
        """The round's sampled cohort, before any instruction is sent."""
        ...

    def release_without_sum(self, rnd: int, like: Mapping[str, np.ndarray]) -> Aggregate | None:
        """The release of a round with no sum (empty cohort, secure round abandoned):
        an aggregate shaped like ``like``, or ``None`` for the unchanged model."""
        ...

    def aggregate_sum(
        self,
        rnd: int,
        sum_update: Mapping[str, np.ndarray],
        total_weight: float,
        num_contributors: int,
        extra: Mapping[str, float],
    ) -> Aggregate:
        """The same result from sums only (secure aggregation): ``Σ w_i·Δ_i``, ``Σ w_i``,
        the number of contributors and extra summed scalars (e.g. ``fl-app.unclipped``)."""
        ...


# ------------------------------------------------------------------------ the parts
class Accounting(Protocol):
    """What a round spends: recorded before it runs, checked per reply, reported."""

    def begin_round(self, rnd: int, population: int, clip: float) -> str | None:
        """Record round ``rnd`` (clipped at ``clip``) or say why the run must stop."""
        ...

    def note_cohort(self, rnd: int, cohort: Sequence[int]) -> None: ...

    def check_reply(self, reply: TrainReply) -> str | None: ...

    def status(self) -> dict[str, float]: ...


class Clipping(Protocol):
    """The L2 bound of one round's updates and who applies it."""

    @property
    def norm(self) -> float:
        """``C`` of the next round to begin (adaptive clipping moves it)."""
        ...

    def round_config(self) -> Mapping[str, Any]:
        """What the instructions carry (the clip norm, when clients clip)."""
        ...

    def check_reply(self, reply: TrainReply) -> str | None: ...


class Release(Protocol):
    """From the sum of the round's contributions to the update applied."""

    @property
    def weighting(self) -> str: ...

    @property
    def releases_every_round(self) -> bool: ...

    def from_sum(
        self,
        rnd: int,
        sum_update: Mapping[str, np.ndarray],
        total_weight: float,
        num_contributors: int,
        extra: Mapping[str, float],
    ) -> Aggregate: ...

    def without_sum(self, rnd: int, like: Mapping[str, np.ndarray]) -> Aggregate | None: ...


class PlaintextInput(Protocol):
    """How the accepted plaintext replies of a round become its aggregate."""

    def combine(self, rnd: int, replies: Sequence[TrainReply], release: Release) -> Aggregate: ...


class Unaccounted:
    """No client-level DP: nothing is spent, every reply is acceptable."""

    def begin_round(self, rnd: int, population: int, clip: float) -> str | None:
        return None

    def note_cohort(self, rnd: int, cohort: Sequence[int]) -> None:
        return None

    def check_reply(self, reply: TrainReply) -> str | None:
        return None

    def status(self) -> dict[str, float]:
        return {}


class ExactMean:
    """``Σ w_i Δ_i / Σ w_i`` with the clients' own weights; a round without enough
    replies (or without a sum) leaves the model unchanged."""

    weighting = "examples"
    releases_every_round = False

    def from_sum(
        self,
        rnd: int,
        sum_update: Mapping[str, np.ndarray],
        total_weight: float,
        num_contributors: int,
        extra: Mapping[str, float],
    ) -> Aggregate:
        if not total_weight > 0:
            raise ValueError(f"total_weight must be > 0, found {total_weight}")
        mean = {k: np.asarray(v, dtype=np.float64) / total_weight for k, v in sum_update.items()}
        return Aggregate(mean, float(total_weight))

    def without_sum(self, rnd: int, like: Mapping[str, np.ndarray]) -> Aggregate | None:
        return None


@dataclass(frozen=True)
class WeightedMeanInput:
    """Plaintext replies averaged as they are (:func:`weighted_mean_update`).

    ``count_metric``: a metric set to the number of replies averaged (local DP reports
    the releases it received this way).
    """

    count_metric: str | None = None

    def combine(self, rnd: int, replies: Sequence[TrainReply], release: Release) -> Aggregate:
        mean = weighted_mean_update(replies)
        metrics: dict[str, float] = {}
        if self.count_metric:
            metrics[self.count_metric] = len(replies)  # an int, as JSON writes it
        return Aggregate(mean.update, mean.total_weight, metrics)


class ComposedAggregator:
    """An :class:`UpdateAggregator` made of an accounting, an optional clipping, a
    plaintext input and a release (see the module doc)."""

    def __init__(
        self,
        account: Accounting,
        release: Release,
        plaintext: PlaintextInput | None = None,
        clipping: Clipping | None = None,
    ) -> None:
        self.account = account
        self.release = release
        self.plaintext: PlaintextInput = plaintext or WeightedMeanInput()
        self.clipping = clipping

    def round_config(self, rnd: int) -> Mapping[str, Any]:
        return self.clipping.round_config() if self.clipping is not None else {}

    def begin_round(self, rnd: int, population: int) -> str | None:
        clip = self.clipping.norm if self.clipping is not None else 0.0
        return self.account.begin_round(rnd, population, clip)

    def note_cohort(self, rnd: int, cohort: Sequence[int]) -> None:
        self.account.note_cohort(rnd, cohort)

    def status(self) -> dict[str, float]:
        return self.account.status()

    def check_reply(self, reply: TrainReply) -> str | None:
        # The account first, always: local DP counts every reply it received.
        reason = self.account.check_reply(reply)
        if reason is None and self.clipping is not None:
            reason = self.clipping.check_reply(reply)
        return reason

    @property
    def weighting(self) -> str:
        return self.release.weighting

    @property
    def releases_every_round(self) -> bool:
        return self.release.releases_every_round

    def release_without_sum(self, rnd: int, like: Mapping[str, np.ndarray]) -> Aggregate | None:
        return self.release.without_sum(rnd, like)

    def aggregate(self, rnd: int, replies: Sequence[TrainReply]) -> Aggregate:
        return self.plaintext.combine(rnd, replies, self.release)

    def aggregate_sum(
        self,
        rnd: int,
        sum_update: Mapping[str, np.ndarray],
        total_weight: float,
        num_contributors: int,
        extra: Mapping[str, float],
    ) -> Aggregate:
        return self.release.from_sum(rnd, sum_update, total_weight, num_contributors, extra)


class MeanAggregator(ComposedAggregator):
    """No client-level DP: the exact weighted mean ``Σ n_i Δ_i / Σ n_i``."""

    def __init__(self) -> None:
        super().__init__(Unaccounted(), ExactMean())

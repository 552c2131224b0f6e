"""Client-level DP as parts of a :class:`~strategies.aggregators.ComposedAggregator`.

The parts (see :mod:`strategies.aggregators` for the roles) and the three mechanisms
assembled from them:

:class:`CentralDp` = :class:`FederationAccount` + :class:`ClientLevelClipping` +
:class:`ClippedSumInput` + :class:`CentralGaussianRelease`
    DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private
    Recurrent Language Models", ICLR): every update clipped to L2 norm ``C`` (by the
    server, or by each client's pipeline and re-clipped by the server), summed,
    ``N(0, (z_Δ·C)²)`` added to the *sum*, divided by the *expected* cohort size
    ``m`` (``q·N`` for Poisson, the fixed size otherwise), so one client moves the
    mean by at most ``C/m`` and the noise on the mean is ``z·C/m``. With
    ``clipping=adaptive`` the clip norm follows a noised quantile of the update norms
    (Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning with
    Adaptive Clipping", NeurIPS, Algorithm 1): each client contributes
    ``b_i = 1[‖Δ_i‖ ≤ C_t]``, the server releases ``Σ(b_i − ½) + N(0, σ_b²) + m/2``
    and sets ``C_{t+1} = C_t·exp(−η(b̃ − γ))``. The updates' noise multiplier is
    ``z_Δ = (z^{-2} − (2σ_b)^{-2})^{-1/2}`` so the round's total is ``z``, and the
    noise of round ``t`` is ``z_Δ·C_t`` with the ``C_t`` that clipped that round's
    updates (Flower's adaptive wrapper noises with the *next* round's norm).
:class:`DistributedDp` = :class:`FederationAccount` + :class:`ClientLevelClipping` +
:class:`NoPlaintextInput` + :class:`DistributedRelease`
    The unmasked sum already carries the clients' discrete Gaussian shares (Kairouz,
    Liu & Steinke 2021); the server divides it by the expected cohort and adds nothing.
    Plaintext updates must never reach the server: that input refuses them.
:class:`~strategies.local_dp.LocalDp` (:mod:`strategies.local_dp`)
    Each client clips and noises its own update; the server only averages and counts
    each site's releases.

Every round's mechanism is recorded in a :class:`~fl_app.privacy.ledger.FederationLedger`
*before* its instructions leave the server (a crash over-counts, never under-counts),
and :class:`~strategies.budget.BudgetGuard` stops the run before a round that would
exceed ``privacy.max_epsilon``. Under secure aggregation the fixed-point encoding can
move a clipped update by ``√d`` rounding steps, and the noise is calibrated to ``C``
plus that slack (:func:`fl_app.privacy.mechanisms.encoding_slack`). Every branch of a
round releases the mechanism its ledger event describes (docs/privacy-branches.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fl_app.config.client_dp import ClientDpSettings
from fl_app.config.schema import ClippingMode, ClipSide, PrivacyMode
from fl_app.privacy.clipping import clip_l2
from fl_app.privacy.composition import branch_delta_total
from fl_app.privacy.distributed import DdpPlan
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.mechanisms import AdaptiveClip, CentralGaussian
from fl_app.privacy.noise import noise_source
from fl_app.privacy.round_event import RoundEvent
from fl_app.protocol import CLIP_NORM_KEY, UNCLIPPED_KEY
from strategies.aggregators import Aggregate, ComposedAggregator, Release
from strategies.budget import BudgetGuard
from strategies.noise_schedule import scheduled_event
from strategies.validation import TrainReply

__all__ = [
    "CENTRAL_NOISE_STREAM",
    "CentralDp",
    "CentralGaussianRelease",
    "ClientLevelClipping",
    "ClippedSumInput",
    "DistributedDp",
    "DistributedRelease",
    "FederationAccount",
    "NoPlaintextInput",
]

# Noise stream ids (independent of the samplers' streams 0 and 1).
CENTRAL_NOISE_STREAM = 0xD1


class FederationAccount:
    """The federation's ledger of rounds and its budget guard (central, distributed DP).

    Resume/rollback (fl_app.server.checkpoint): the ledger's event ``round`` is a release
    index, ``server round + release_offset``; the offset grows when a resumed run
    redoes rounds the ledger already counted (an interrupted round, or the rounds after
    a rollback), because the ledger only appends and ε is never rewound. Rounds redone
    after a rollback draw fresh noise (``noise_generation``): their first noised sums
    were released, and the same noise on different sums would cancel in the difference.
    """

    def __init__(
        self,
        settings: ClientDpSettings,
        ledger: FederationLedger | None = None,
        budget: BudgetGuard | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger or FederationLedger(settings.delta, settings.accountant)
        self.budget = budget
        self.release_offset = 0
        self.noise_generation = 0
        self._event: RoundEvent | None = None
        self._round: int | None = None
        self._epsilon = self.ledger.epsilon()

    def begin_round(self, rnd: int, population: int, clip: float) -> str | None:
        event = self.settings.round_event(rnd + self.release_offset, max(1, population), clip)
        event = scheduled_event(self.settings, self.ledger, rnd, event)  # privacy.schedule
        if self.budget is not None:
            verdict = self.budget.check(self.ledger, event)
            if not verdict.allowed:
                return verdict.reason
        after = self.ledger.project([event])
        # Recorded before any instruction leaves: a crash over-counts, never under-counts.
        self.ledger = self.ledger.add(event)
        self._event = event
        self._round = rnd
        self._epsilon = after
        return None

    def note_cohort(self, rnd: int, cohort: Sequence[int]) -> None:
        """Count the sampled cohort's participation (ε against the server) before sending."""
        self.current(rnd)
        self.ledger = self.ledger.add_participation([str(n) for n in cohort])

    def check_reply(self, reply: TrainReply) -> str | None:
        return None

    def status(self) -> dict[str, float]:
        out = {"dp_epsilon": self._epsilon, "dp_delta": self.ledger.delta}
        eta = branch_delta_total(self.ledger.events)
        if eta > 0:  # the part of δ the cohort-size gate takes (docs/privacy-branches.md)
            out["dp_delta_branches"] = eta
        if self.settings.distributed is not None:
            against = self.ledger.server_epsilons()
            out["dp_epsilon_server_max"] = max(against.values(), default=0.0)
        return out

    def current(self, rnd: int) -> RoundEvent:
        """The event :meth:`begin_round` recorded for ``rnd`` (refuses any other round)."""
        event = self._event
        if event is None or self._round != rnd:
            raise RuntimeError(f"aggregate({rnd}) without begin_round({rnd})")
        return event

    def continue_after(self, server_round: int, release_offset: int) -> None:
        """Resume after ``server_round``: the next release index follows the ledger's last
        event, which must not be behind the checkpoint (a rewound ledger)."""
        last = self.ledger.events[-1].round if self.ledger.events else 0
        if last < server_round + release_offset:
            raise ValueError(
                f"the ledger's last release {last} is behind the checkpoint (round "
                f"{server_round}, release offset {release_offset}): the ledger on "
                "disk was rewound; refusing to under-count epsilon"
            )
        self.release_offset = last - server_round
        self._epsilon = self.ledger.epsilon()


class ClientLevelClipping:
    """The round's clip norm ``C``, who clips, and adaptive clipping's update of ``C``.

    ``adaptive``: Andrew et al.'s quantile step (:class:`~fl_app.privacy.mechanisms.AdaptiveClip`),
    run after each release with the round's noise source; ``None``: ``C`` stays fixed.
    """

    def __init__(self, norm: float, side: ClipSide, adaptive: AdaptiveClip | None = None):
        self.norm = norm
        self.side = side
        self.adaptive = adaptive

    @classmethod
    def of(cls, s: ClientDpSettings) -> ClientLevelClipping:
        adaptive = None
        if s.clipping is ClippingMode.adaptive:
            assert s.clipped_count_std is not None
            adaptive = AdaptiveClip(s.clipped_count_std, s.clip_learning_rate, s.target_quantile)
        return cls(s.clip, s.clip_side, adaptive)

    def round_config(self) -> Mapping[str, Any]:
        if self.side is ClipSide.client:
            return {CLIP_NORM_KEY: float(self.norm)}
        return {}

    def check_reply(self, reply: TrainReply) -> str | None:
        if self.side is ClipSide.client and self.adaptive is not None:
            bit = reply.metrics.get(UNCLIPPED_KEY)
            if bit not in (0.0, 1.0):
                return f"'{UNCLIPPED_KEY}' must be 0 or 1 for adaptive clipping, got {bit!r}"
        return None

    def adapt(
        self, clip: float, unclipped: float, contributors: int, cohort: float, noise: Any
    ) -> dict[str, float]:
        """After a release clipped at ``clip``: the next round's ``C`` (adaptive only;
        draws the count's noise from ``noise``, after the update's)."""
        if self.adaptive is None:
            return {}
        # Σ(b_i − ½) has add/remove sensitivity ½ (Andrew et al. §3.2).
        fraction, self.norm = self.adaptive.step(
            clip,
            unclipped,
            contributors,
            cohort,
            float(noise.normal(self.adaptive.clipped_count_std, 1)[0]),
        )
        return {"dp_unclipped_fraction_noised": fraction, "dp_next_clip": self.norm}


class ClippedSumInput:
    """Plaintext replies clipped to the round's ``C`` and summed with unit weights.

    With client-side clipping the server re-clips (a no-op for honest clients; the
    count of those it had to clip is reported) and sums the clients' unclipped bits.
    """

    def __init__(self, account: FederationAccount, side: ClipSide) -> None:
        self.account = account
        self.side = side

    def combine(self, rnd: int, replies: Sequence[TrainReply], release: Release) -> Aggregate:
        event = self.account.current(rnd)
        names = list(replies[0].update)
        total = {k: np.zeros(replies[0].update[k].shape, dtype=np.float64) for k in names}
        unclipped = 0
        reclipped = 0
        for r in replies:
            clipped = clip_l2(r.update, event.clip)
            if self.side is ClipSide.server:
                unclipped += int(clipped.unclipped)
            else:
                reclipped += int(not clipped.unclipped)
                unclipped += int(r.metrics.get(UNCLIPPED_KEY, 0.0) == 1.0)
            for k in names:
                total[k] += clipped.arrays[k].astype(np.float64, copy=False)
        out = release.from_sum(
            rnd, total, float(len(replies)), len(replies), {UNCLIPPED_KEY: float(unclipped)}
        )
        if reclipped:
            out.metrics["dp_server_reclipped"] = float(reclipped)
        return out


class NoPlaintextInput:
    """Refuses plaintext replies: the mechanism runs only under secure aggregation."""

    def combine(self, rnd: int, replies: Sequence[TrainReply], release: Release) -> Aggregate:
        raise RuntimeError(
            "distributed DP needs secure aggregation: plaintext updates must never reach "
            "the server (the config validator refuses secagg=off)"
        )


class CentralGaussianRelease:
    """Noise on the sum of clipped updates, divided by the expected cohort.

    Every round releases (``releases_every_round``): the ledger accounted it before it
    ran, so it releases its noised sum over whatever arrived, however few (a
    ``min_train_replies`` gate would be a data-dependent branch the ledger does not
    describe).
    """

    weighting = "uniform"
    releases_every_round = True

    def __init__(
        self, settings: ClientDpSettings, account: FederationAccount, clipping: ClientLevelClipping
    ) -> None:
        self.settings = settings
        self.account = account
        self.clipping = clipping

    def without_sum(self, rnd: int, like: Mapping[str, np.ndarray]) -> Aggregate | None:
        """No sum exists (empty cohort, secure round abandoned): noise on a zero sum.

        The release is the same mechanism over an empty set of contributions, so the
        round still looks like every other round and its ledger event describes it.
        """
        zeros = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in like.items()}
        return self.from_sum(rnd, zeros, 0.0, 0, {})

    def from_sum(
        self,
        rnd: int,
        sum_update: Mapping[str, np.ndarray],
        total_weight: float,
        num_contributors: int,
        extra: Mapping[str, float],
    ) -> Aggregate:
        """``sum_update`` must be ``Σ clip(Δ_i)`` with unit weights (``weighting`` is
        ``"uniform"``); ``extra["fl-app.unclipped"]`` is ``Σ b_i`` for adaptive clipping."""
        event = self.account.current(rnd)
        s = self.settings
        unclipped = float(extra.get(UNCLIPPED_KEY, 0.0))
        # Keyed by the server round, so a resumed run redoes an interrupted round with
        # the noise it drew first (that sum never left the server: checkpoints are
        # written before a round's model is sent); a new generation after a rollback.
        stream: tuple[int, ...] = (rnd, CENTRAL_NOISE_STREAM)
        if self.account.noise_generation:
            stream = (*stream, self.account.noise_generation)
        noise = noise_source(s.secure_mode, s.seed, stream)
        std = event.noise_std
        m = event.cohort
        mean = CentralGaussian(std, m).release(sum_update, noise.normal)
        metrics: dict[str, float] = {
            "dp_clip": event.clip,
            "dp_noise_std_sum": std,
            "dp_noise_std_mean": std / m,
            "dp_expected_cohort": m,
        }
        if event.encoding_slack:
            metrics["dp_encoding_slack"] = event.encoding_slack
        metrics.update(self.clipping.adapt(event.clip, unclipped, num_contributors, m, noise))
        return Aggregate(mean, float(num_contributors), metrics)


class DistributedRelease:
    """``(Σ clip(Δ_i) + Σ shares) / m`` with ``m`` the expected cohort; nothing added.

    An abandoned round leaves the model unchanged: the noise is the clients', and noise
    the server drew would protect nothing against the server. That release does not
    depend on any client's update; the chance that one client's presence decides the
    abandonment (the cohort gate) is the event's ``branch_delta``.
    """

    weighting = "uniform"
    releases_every_round = True

    def __init__(self, plan: DdpPlan, account: FederationAccount) -> None:
        self.plan = plan
        self.account = account

    def without_sum(self, rnd: int, like: Mapping[str, np.ndarray]) -> Aggregate | None:
        self.account.current(rnd)
        return None

    def from_sum(
        self,
        rnd: int,
        sum_update: Mapping[str, np.ndarray],
        total_weight: float,
        num_contributors: int,
        extra: Mapping[str, float],
    ) -> Aggregate:
        event = self.account.current(rnd)
        m = event.cohort
        mean = {k: np.asarray(v, dtype=np.float64) / m for k, v in sum_update.items()}
        plan = self.plan.at(event.noise_multiplier)  # the round's z (privacy.schedule)
        std = plan.gamma * plan.sigma
        metrics: dict[str, float] = {
            "dp_clip": event.clip,
            "dp_noise_std_sum": std,
            "dp_noise_std_mean": std / m,
            "dp_expected_cohort": m,
            "ddp_bits": float(plan.bits),
            "ddp_gamma": plan.gamma,
            "ddp_noise_inflation": plan.inflation,
        }
        return Aggregate(mean, float(num_contributors), metrics)


class AccountedDp(ComposedAggregator):
    """A mechanism the federation's ledger accounts (central or distributed DP): the
    ledger, the clip norm and what a checkpoint keeps, over the composed parts."""

    _MODE: PrivacyMode

    def __init__(
        self,
        settings: ClientDpSettings,
        account: FederationAccount,
        clipping: ClientLevelClipping,
        release: Release,
        plaintext: ClippedSumInput | NoPlaintextInput,
    ) -> None:
        super().__init__(account, release, plaintext, clipping)
        self.settings = settings
        self.federation = account
        self.clip_norm = clipping

    @classmethod
    def _check_mode(cls, settings: ClientDpSettings) -> None:
        if settings.mode is not cls._MODE:
            raise ValueError(
                f"{cls.__name__} needs privacy.mode={cls._MODE.value}, found {settings.mode.value}"
            )

    @property
    def ledger(self) -> FederationLedger:
        return self.federation.ledger

    @property
    def budget(self) -> BudgetGuard | None:
        return self.federation.budget

    @property
    def clip(self) -> float:
        """``C`` of the next round (adaptive clipping moves it after each release)."""
        return self.clip_norm.norm

    @property
    def release_offset(self) -> int:
        return self.federation.release_offset

    @property
    def noise_generation(self) -> int:
        return self.federation.noise_generation

    @noise_generation.setter
    def noise_generation(self, value: int) -> None:
        self.federation.noise_generation = value

    def export_state(self) -> dict[str, float | int]:
        """What a checkpoint must keep besides the ledger (adaptive clipping's norm)."""
        return {
            "clip": float(self.clip),
            "release_offset": int(self.release_offset),
            "noise_generation": int(self.noise_generation),
        }

    def restore_state(self, state: Mapping[str, Any], server_round: int) -> None:
        """Continue after ``server_round`` from a checkpoint's :meth:`export_state`.

        The ledger must already be the latest one on disk (passed to the constructor);
        the next round's release index follows its last event.
        """
        clip = state["clip"]
        gen = state["noise_generation"]
        if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
            raise ValueError(f"checkpoint clip must be a finite number > 0, found {clip!r}")
        if isinstance(gen, bool) or not isinstance(gen, int) or gen < 0:
            raise ValueError(f"checkpoint noise_generation must be an int >= 0, found {gen!r}")
        self.federation.continue_after(server_round, int(state["release_offset"]))
        self.clip_norm.norm = float(clip)
        self.federation.noise_generation = gen


class CentralDp(AccountedDp):
    """Central client-level DP with fixed or adaptive clipping (see the module doc).

    Parameters
    ----------
    settings
        Resolved parameters (:meth:`ClientDpSettings.from_config`).
    ledger
        The run's ledger so far (a resumed run passes the restored one).
    budget
        Stops the run before a round that would exceed ``privacy.max_epsilon``.
    """

    _MODE = PrivacyMode.central

    def __init__(
        self,
        settings: ClientDpSettings,
        ledger: FederationLedger | None = None,
        budget: BudgetGuard | None = None,
    ) -> None:
        self._check_mode(settings)
        account = FederationAccount(settings, ledger, budget)
        clipping = ClientLevelClipping.of(settings)
        release = CentralGaussianRelease(settings, account, clipping)
        super().__init__(
            settings, account, clipping, release, ClippedSumInput(account, settings.clip_side)
        )


class DistributedDp(AccountedDp):
    """Distributed DP: the unmasked sum already carries the clients' noise shares.

    Runs only under secure aggregation (the validator refuses anything else): each
    client clips to ``C``, encodes with its discrete Gaussian share
    (:mod:`fl_app.privacy.distributed`), and the server divides the decoded sum by the
    expected cohort, adding nothing. Ledger, budget guard and checkpoints are the same
    as :class:`CentralDp`'s; the events are ``mechanism="ddg"``.
    """

    _MODE = PrivacyMode.distributed

    def __init__(
        self,
        settings: ClientDpSettings,
        ledger: FederationLedger | None = None,
        budget: BudgetGuard | None = None,
    ) -> None:
        if settings.distributed is None:
            raise ValueError("DistributedDp needs settings.distributed (a DdpPlan)")
        self._check_mode(settings)
        account = FederationAccount(settings, ledger, budget)
        release = DistributedRelease(settings.distributed, account)
        super().__init__(
            settings, account, ClientLevelClipping.of(settings), release, NoPlaintextInput()
        )

    @property
    def plan(self) -> DdpPlan:
        assert self.settings.distributed is not None
        return self.settings.distributed

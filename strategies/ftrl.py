"""DP-FTRL (``privacy.ftrl.enabled``): central client-level DP whose noise is tree-aggregated.

:class:`DpFtrl` = :class:`FtrlAccount` + :class:`~strategies.dp_aggregators.ClientLevelClipping`
+ :class:`~strategies.dp_aggregators.ClippedSumInput` + :class:`TreeRelease`.

Kairouz et al. 2021 ("Practical and Private (Deep) Learning without Sampling or
Shuffling", ICML), as the mechanism is described in :mod:`fl_app.privacy.tree`: the
clipped updates are summed as for DP-FedAvg, the round's sum becomes the next leaf of
the current tree, and the release is the difference of consecutive noisy prefix sums
divided by the expected cohort ``m``, ``(P̃_t − P̃_{t−1}) / m``. The wrapped FedAvg step
adds it to the model, so after round ``t`` of a tree the model is exactly
``θ_0 + P̃_t / m`` (FTRL with server learning rate 1; the validator refuses other
server steps). Every ``k = privacy.ftrl.restart_every`` rounds, and after a resume
(the tree's true node sums are not checkpointed), a fresh tree starts from the current
model.

Accounting: each round's ledger event is its released node at rate 1 (arbitrary
participation, no sampling amplification), ``z / 2^l`` for a node of ``2^l`` rounds;
the event is recorded before instructions leave, as for every accounted mechanism.
Noise: one draw per round from the server's source (``privacy.secure_mode``: a
ChaCha20 keystream under an OS-random key; seeded only for experiments), keyed like
central DP's by the server round and the rollback generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fl_app.config.client_dp import ClientDpSettings
from fl_app.config.schema import PrivacyMode
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.noise import noise_source
from fl_app.privacy.tree import (
    TreeAggregator,
    ftrl_round_event,
    node_level,
    tree_sensitivity_sq,
)
from strategies.aggregators import Aggregate
from strategies.budget import BudgetGuard
from strategies.dp_aggregators import (
    AccountedDp,
    ClientLevelClipping,
    ClippedSumInput,
    FederationAccount,
)

__all__ = ["FTRL_NOISE_STREAM", "DpFtrl", "FtrlAccount", "TreeRelease", "ftrl_summary"]

# Independent of central DP's 0xD1 and the samplers' streams.
FTRL_NOISE_STREAM = 0xD7


class FtrlAccount(FederationAccount):
    """The ledger account of DP-FTRL: the round's event is the node it will release.

    The tree position is the number of rounds the current tree already has, plus one
    (``1`` when the tree is full or after a resume), so the ledger describes the node the
    release draws, even when a resume restarted the tree mid-period.
    """

    def __init__(
        self,
        settings: ClientDpSettings,
        ledger: FederationLedger | None = None,
        budget: BudgetGuard | None = None,
    ) -> None:
        if settings.ftrl_restart is None:
            raise ValueError("FtrlAccount needs settings.ftrl_restart (privacy.ftrl.enabled)")
        super().__init__(settings, ledger, budget)
        self.restart_every = settings.ftrl_restart
        self.tree: TreeAggregator | None = None

    def next_position(self) -> int:
        """Position in its tree of the next round (a full tree restarts)."""
        if self.tree is None or self.tree.rounds >= self.restart_every:
            return 1
        return self.tree.rounds + 1

    def begin_round(self, rnd: int, population: int, clip: float) -> str | None:
        n = max(1, population)
        base = self.settings.round_event(rnd + self.release_offset, n, clip)
        event = ftrl_round_event(base, self.next_position(), n, self.settings.ftrl_participation)
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


class TreeRelease:
    """``(P̃_t − P̃_{t−1}) / m``: the round's sum becomes the tree's next leaf.

    Releases every round (an empty cohort adds a zero leaf, and its node's noise is
    released all the same), like central DP's release.
    """

    weighting = "uniform"
    releases_every_round = True

    def __init__(self, settings: ClientDpSettings, account: FtrlAccount) -> None:
        self.settings = settings
        self.account = account
        self._previous: dict[str, np.ndarray] | None = None

    def without_sum(self, rnd: int, like: Mapping[str, np.ndarray]) -> Aggregate | None:
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
        event = self.account.current(rnd)
        account = self.account
        position = account.next_position()
        if position == 1:  # a fresh tree from the current model
            account.tree = TreeAggregator(event.noise_std)
            self._previous = None
        assert account.tree is not None
        s = self.settings
        stream: tuple[int, ...] = (rnd, FTRL_NOISE_STREAM)
        if account.noise_generation:
            stream = (*stream, account.noise_generation)
        noise = noise_source(s.secure_mode, s.seed, stream)
        prefix = account.tree.add(sum_update, noise.normal)
        previous = self._previous
        m = event.cohort
        step = {k: (v - previous[k] if previous is not None else v) / m for k, v in prefix.items()}
        self._previous = prefix
        metrics: dict[str, float] = {
            "dp_clip": event.clip,
            "dp_noise_std_node": event.noise_std,
            "dp_expected_cohort": m,
            "dp_ftrl_tree_position": float(position),
            "dp_ftrl_node_rounds": float(2 ** node_level(position)),
        }
        return Aggregate(step, float(num_contributors), metrics)


class DpFtrl(AccountedDp):
    """DP-FTRL with tree aggregation and restarts (see the module doc).

    Parameters
    ----------
    settings
        Resolved parameters with ``ftrl_restart`` set (:meth:`ClientDpSettings.from_config`).
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
        account = FtrlAccount(settings, ledger, budget)
        self.tree_account = account  # the once-per-tree cap follows its tree positions
        clipping = ClientLevelClipping.of(settings)
        release = TreeRelease(settings, account)
        super().__init__(
            settings, account, clipping, release, ClippedSumInput(account, settings.clip_side)
        )


def ftrl_summary(settings: ClientDpSettings) -> dict[str, Any]:
    """summary.json's account of what DP-FTRL's ε rests on (empty for other mechanisms).

    Its keys replace DP-FedAvg's ``mechanism`` and add ``amplification`` and ``ftrl``:
    the run's ``sample_rate`` is the cohort fraction the sampler used, not an input of
    the account, which composes rate-1 events (no amplification by sampling).
    """
    k = settings.ftrl_restart
    if k is None:
        return {}
    once = settings.ftrl_participation == "once"
    return {
        "mechanism": "DP-FTRL (Kairouz et al. 2021): tree aggregation with restarts, fixed "
        "clipping by the server, Gaussian noise z*C on each released tree node",
        "amplification": "none: every round is accounted at sampling rate 1 (the released "
        "tree node's Gaussian mechanism), so epsilon holds even against whoever knows or "
        "picks the cohorts; sample_rate is only the cohort fraction",
        "sample_rate_accounted": 1.0,
        "ftrl": {
            "restart_every": k,
            "participation": "once_per_tree" if once else "arbitrary",
            "bound": (
                "each client at most once per tree, enforced by the server's cohort "
                "selection: one client's round lies in at most ceil(log2(k+1)) released "
                "nodes of a tree (Kairouz et al. 2021, Appendix D)"
                if once
                else "arbitrary participation: a node of 2^l rounds moves by up to 2^l*C"
            ),
            "node_noise_multiplier": settings.noise_multiplier,
            # One full tree's summed node sensitivities, in units of C^2.
            "sensitivity_sq_per_tree": tree_sensitivity_sq(k, "once" if once else "arbitrary"),
        },
    }

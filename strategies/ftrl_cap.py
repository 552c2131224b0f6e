"""DP-FTRL's once-per-tree cap (``privacy.ftrl.participation=once_per_tree``), enforced
by the server's cohort selection.

The tighter tree bound (Kairouz et al. 2021, Appendix D; dp-accounting's
``SingleEpochTreeAggregationDpEvent``) holds only if no client contributes to two leaves
of one tree: then one client's update lies in at most ``h = ⌈log2(k+1)⌉`` released
nodes (:mod:`fl_app.privacy.tree`). :class:`OncePerTreeSampler` keeps that true by
construction: each round's fixed-size cohort is drawn, with the plan's own sampler and
randomness, only from the nodes not yet selected in the current tree. A node counts as
used when it is *selected*, whether or not it replies, so a dropped client cannot come
back in a later round of the same tree. The tree boundaries are the account's own
(:meth:`strategies.ftrl.FtrlAccount.next_position`), so the cap restarts exactly when
the tree does, a resume included (a resumed run starts a fresh tree).

What the cap rests on: the server runs the sampler (``trusted_server``, the only
threat model DP-FTRL runs under) and on one node id per site within a tree: true in
simulation; in deployment a SuperNode restarted mid-tree gets a new node id, which this
sampler counts as a new client (docs/dp-ftrl.md says what to run then). The ε does not rest on the
cohorts being secret: they may be public.
"""

from __future__ import annotations

from collections.abc import Sequence

from strategies.ftrl import DpFtrl, FtrlAccount
from strategies.sampling import CohortSampler, FixedSizeSampler

__all__ = ["OncePerTreeSampler", "with_participation_cap"]


def with_participation_cap(sampler: CohortSampler, aggregator: object) -> CohortSampler:
    """The train sampler the driver gets: capped under DP-FTRL's once-per-tree bound."""
    if not isinstance(aggregator, DpFtrl) or aggregator.settings.ftrl_participation != "once":
        return sampler
    if not isinstance(sampler, FixedSizeSampler):
        raise ValueError(
            "privacy.ftrl.participation=once_per_tree needs strategy.sampling=fixed "
            "(the validator refuses anything else)"
        )
    return OncePerTreeSampler(sampler, aggregator.tree_account)


class OncePerTreeSampler:
    """A :class:`~strategies.sampling.FixedSizeSampler` that never selects a node twice
    within one DP-FTRL tree.

    The cohort size is the plan's, ``round(q·N)`` of all ``N`` available nodes (the
    divisor the release uses); a round whose eligible nodes are fewer gets them all (the
    validator requires ``restart_every · cohort <= clients`` so a full tree never does).
    Sampling a round again returns the same cohort.
    """

    def __init__(self, inner: FixedSizeSampler, account: FtrlAccount) -> None:
        self.inner = inner
        self.account = account
        self._cohorts: dict[int, list[int]] = {}  # the current tree's rounds -> cohort

    def used(self) -> set[int]:
        """Nodes already selected in the current tree."""
        return {n for cohort in self._cohorts.values() for n in cohort}

    def sample(self, node_ids: Sequence[int], server_round: int) -> list[int]:
        if server_round in self._cohorts:
            return list(self._cohorts[server_round])
        if self.account.next_position() == 1:  # this round starts a fresh tree
            self._cohorts.clear()
        used = self.used()
        eligible = [int(n) for n in node_ids if int(n) not in used]
        size = self.inner.cohort_size(len(node_ids))
        cohort = self.inner.sample_size(eligible, server_round, size)
        self._cohorts[server_round] = cohort
        return list(cohort)

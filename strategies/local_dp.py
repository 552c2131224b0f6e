"""Local DP on the server side: average the clients' noised updates, count each site's releases.

``privacy.mode=local``: each client clips its update to ``C`` and adds ``N(0, (z·C)²)``
before it leaves (:mod:`fl_app.privacy.local`), so every reply is its client's own
Gaussian release and what the server does with it is post-processing. The server's part
is the accounting: :class:`LocalReleaseCount` counts every release it receives per site
(also one it then rejects) in the ledger, refuses replies whose own count is below its
own (lost client state) or past the budget, and tells each node how many releases it
has received from its site. :class:`LocalDp` composes it with client-side fixed
clipping (the norm sent in each instruction), the plain weighted mean of the replies and
the exact mean of a secure sum (:mod:`strategies.aggregators`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from fl_app.config.client_dp import ClientDpSettings
from fl_app.config.schema import ClipSide, PrivacyMode
from fl_app.privacy.ledger import FederationLedger
from strategies.aggregators import ComposedAggregator, ExactMean, WeightedMeanInput
from strategies.dp_aggregators import ClientLevelClipping
from strategies.dp_projection import rounds_within_budget
from strategies.site_claims import SITE_HASH_METRIC, parse_site_hash
from strategies.validation import TrainReply

__all__ = ["LocalDp", "LocalReleaseCount", "site_key_of"]


def site_key_of(metrics: Mapping[str, float]) -> str | None:
    """A site's stable key from its public metrics: ``site-<digest>`` from a deployed
    site's ``dp-site-hash`` (deployed sites share partition id 0), else
    ``partition-<id>``; None where neither is valid. The run's summary matches a site's
    reports across SuperNode restarts by the same key."""
    value = metrics.get(SITE_HASH_METRIC)
    if value is not None:
        digest = parse_site_hash(value)  # the rule the site check applies
        return None if digest is None else f"site-{digest:012x}"
    pid = metrics.get("dp-partition-id")
    if pid is None or not math.isfinite(pid) or pid < 0 or pid != int(pid):
        return None
    return f"partition-{int(pid)}"


class LocalReleaseCount:
    """Each site's local-DP releases, counted as the server receives them.

    Sites are keyed by a stable identity (:meth:`site_key`: a deployed site's
    ``dp-site-hash``, else its partition id), never by the node id, which changes when a
    SuperNode restarts (and between Ray actors): keyed by node id, a restarted client's
    releases were split over two keys and ε under-reported. Every local-DP reply the
    server receives is a release to it and is counted, also one it then rejects for its
    count or budget (a reply the site-identity check refused never reaches
    :meth:`check_reply`: its site key is not the sender's, and counting it would put a
    victim's count ahead of its own); it
    rejects a reply whose own release count is below the server's (the site's state was
    lost or reset) and one past the budget, and tells each node in its instruction how
    many releases it has received from it, so a client whose state was lost refuses.
    """

    def __init__(self, settings: ClientDpSettings, ledger: FederationLedger | None = None):
        self.settings = settings
        self.ledger = ledger or FederationLedger(
            settings.delta, settings.accountant, local_noise_multiplier=settings.noise_multiplier
        )
        # node id -> site key, learned from replies (a node's first reply of a run, or
        # after a restart gave it a new id, finds the site's count under its key).
        self.sites: dict[int, str] = {}
        self._allowed = rounds_within_budget(settings) if settings.max_epsilon is not None else None

    def begin_round(self, rnd: int, population: int, clip: float) -> str | None:
        return None

    # Each reply is its client's own noised release, counted by the client and by
    # check_reply: what the server then does with it is post-processing.
    def note_cohort(self, rnd: int, cohort: Sequence[int]) -> None:
        return None

    def node_config(self, node_id: int) -> dict[str, int]:
        """The releases the server has received from ``node_id``'s site (0 if unknown)."""
        from fl_app.privacy.state import LOCAL_RELEASES_SEEN_KEY

        site = self.sites.get(node_id)
        return {LOCAL_RELEASES_SEEN_KEY: dict(self.ledger.local).get(site, 0) if site else 0}

    def status(self) -> dict[str, float]:
        eps = self.ledger.local_epsilons()
        return {"dp_local_epsilon_max": max(eps.values(), default=0.0)}

    @staticmethod
    def site_key(reply: TrainReply) -> str | None:
        """The site's stable key: ``site-<digest>`` from a deployed site's ``dp-site-hash``
        (deployed sites share partition id 0), else ``partition-<id>``."""
        return site_key_of(reply.metrics)

    def check_reply(self, reply: TrainReply) -> str | None:
        # The noise makes the norm unbounded, so no norm check; the release is counted
        # here, before any reason to reject it, because the server has received it.
        site = self.site_key(reply)
        if site is None:
            self.ledger = self.ledger.add_local([f"node-{reply.node_id}"])
            return "local DP reply without a valid dp-partition-id: its releases cannot be counted"
        self.sites[reply.node_id] = site
        before = dict(self.ledger.local).get(site, 0)
        self.ledger = self.ledger.add_local([site])
        claimed = reply.metrics.get("dp-local-releases", 0.0)
        if claimed < before + 1:
            return (
                f"local DP: {site} counts {claimed:g} releases, the server has received "
                f"{before + 1}: its privacy state was lost or reset"
            )
        if self._allowed is not None and before + 1 > self._allowed:
            return (
                f"local DP: {site} is past its budget (release {before + 1}, "
                f"max_epsilon={self.settings.max_epsilon:g} allows {self._allowed})"
            )
        return None


class LocalDp(ComposedAggregator):
    """Local DP: clients clip and noise (:mod:`fl_app.privacy.local`); the server
    averages (clients weigh 1 each: a local-DP client sends no example count, it would
    not be noised) and counts each site's releases (:class:`LocalReleaseCount`).

    Under secure aggregation the server cannot tell who contributed; each client's own
    ``dp-local-epsilon`` (computed before it sent) is the record.
    """

    def __init__(self, settings: ClientDpSettings, ledger: FederationLedger | None = None) -> None:
        if settings.mode is not PrivacyMode.local:
            raise ValueError(f"LocalDp needs privacy.mode=local, found {settings.mode.value}")
        self.settings = settings
        self.releases = LocalReleaseCount(settings, ledger)
        super().__init__(
            self.releases,
            ExactMean(),
            WeightedMeanInput("dp_local_releases"),
            ClientLevelClipping(settings.clip, ClipSide.client),
        )

    @property
    def ledger(self) -> FederationLedger:
        return self.releases.ledger

    @property
    def sites(self) -> dict[int, str]:
        return self.releases.sites

    def node_config(self, node_id: int) -> dict[str, int]:
        """The releases the server has received from ``node_id``'s site (0 if unknown)."""
        return self.releases.node_config(node_id)

    site_key = staticmethod(LocalReleaseCount.site_key)

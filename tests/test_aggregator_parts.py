"""The parts a server-side aggregator is composed of (strategies.aggregators,
strategies.dp_aggregators), each as a unit with values worked out by hand.

The assembled mechanisms (CentralDp, DistributedDp, LocalDp) are checked end to end in
test_client_dp.py, test_privacy_branches.py and test_distributed_dp.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from fl_app.config.client_dp import ClientDpSettings
from fl_app.config.schema import ClippingMode, ClipSide, PrivacyMode
from fl_app.privacy.distributed import DdpPlan
from fl_app.privacy.history import AccountantName
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.mechanisms import AdaptiveClip
from fl_app.privacy.round_event import SamplingScheme
from fl_app.protocol import CLIP_NORM_KEY, UNCLIPPED_KEY
from strategies.aggregators import (
    Aggregate,
    ComposedAggregator,
    ExactMean,
    MeanAggregator,
    Unaccounted,
    WeightedMeanInput,
)
from strategies.dp_aggregators import (
    CentralDp,
    ClientLevelClipping,
    ClippedSumInput,
    DistributedDp,
    FederationAccount,
    NoPlaintextInput,
)
from strategies.local_dp import LocalDp, LocalReleaseCount
from strategies.validation import TrainReply


def _reply(node: int, value: float, n: float = 1.0, **metrics: float) -> TrainReply:
    update = {"w": np.array([value], dtype=np.float32)}
    return TrainReply(node, update, n, dict(metrics), abs(value))


class _Noise:
    """A noise source double: returns queued values and records each draw."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)
        self.draws: list[tuple[float, int]] = []

    def normal(self, std: float, size: int) -> np.ndarray:
        self.draws.append((std, size))
        return np.array([self.values.pop(0) for _ in range(size)])


def test_exact_mean_divides_the_sum_by_the_total_weight() -> None:
    out = ExactMean().from_sum(1, {"w": np.array([2.0, 4.0])}, 2.0, 2, {})
    np.testing.assert_array_equal(out.update["w"], [1.0, 2.0])
    assert (out.total_weight, out.metrics) == (2.0, {})
    with pytest.raises(ValueError, match="total_weight must be > 0, found 0"):
        ExactMean().from_sum(1, {"w": np.array([2.0])}, 0.0, 0, {})
    # Any positive total, also below 1 (fractional weights); divided in float64.
    half = ExactMean().from_sum(1, {"w": np.array([1.5], dtype=np.float32)}, 0.5, 1, {})
    assert half.update["w"].dtype == np.float64 and float(half.update["w"][0]) == 3.0
    assert ExactMean().without_sum(1, {"w": np.zeros(1)}) is None


def test_weighted_mean_input_and_its_count_metric() -> None:
    # (1 * 0 + 3 * 4) / 4 = 3
    replies = [_reply(1, 0.0, n=1.0), _reply(2, 4.0, n=3.0)]
    out = WeightedMeanInput("releases").combine(1, replies, ExactMean())
    assert float(out.update["w"][0]) == 3.0
    assert out.total_weight == 4.0
    assert out.metrics == {"releases": 2} and isinstance(out.metrics["releases"], int)
    assert WeightedMeanInput().combine(1, replies, ExactMean()).metrics == {}


def test_mean_aggregator_is_the_composition_of_the_defaults() -> None:
    agg = MeanAggregator()
    assert agg.round_config(1) == {} and agg.begin_round(1, 10) is None
    assert agg.status() == {} and agg.check_reply(_reply(1, 1.0)) is None
    assert (agg.weighting, agg.releases_every_round) == ("examples", False)
    assert agg.release_without_sum(1, {"w": np.zeros(1)}) is None
    out = agg.aggregate_sum(1, {"w": np.array([6.0])}, 3.0, 2, {})
    assert float(out.update["w"][0]) == 2.0


class _Account(Unaccounted):
    def __init__(self, reason: str | None) -> None:
        self.reason = reason
        self.seen: list[int] = []

    def check_reply(self, reply: TrainReply) -> str | None:
        self.seen.append(reply.node_id)
        return self.reason


class _Clip:
    norm = 1.0

    def __init__(self) -> None:
        self.seen: list[int] = []

    def round_config(self) -> dict[str, float]:
        return {"c": self.norm}

    def check_reply(self, reply: TrainReply) -> str | None:
        self.seen.append(reply.node_id)
        return "clip says no"


def test_the_account_sees_every_reply_before_the_clipping_does() -> None:
    # Local DP counts every release it received, also one another part rejects.
    account, clip = _Account("account says no"), _Clip()
    agg = ComposedAggregator(account, ExactMean(), clipping=clip)
    assert agg.check_reply(_reply(5, 1.0)) == "account says no"
    assert (account.seen, clip.seen) == ([5], [])
    account.reason = None
    assert agg.check_reply(_reply(6, 1.0)) == "clip says no"
    assert (account.seen, clip.seen) == ([5, 6], [6])
    assert agg.round_config(1) == {"c": 1.0}


def test_fixed_clipping_never_adapts_or_draws_noise() -> None:
    noise = _Noise()
    clip = ClientLevelClipping(0.7, ClipSide.server)
    assert clip.adapt(0.7, 3.0, 4, 4.0, noise) == {}
    assert noise.draws == [] and clip.norm == 0.7
    assert clip.round_config() == {}
    assert clip.check_reply(_reply(1, 1.0)) is None
    assert ClientLevelClipping(0.7, ClipSide.client).round_config() == {CLIP_NORM_KEY: 0.7}


def test_adaptive_clipping_step_by_hand() -> None:
    # Andrew et al. Alg. 1 with sigma_b = 2, eta = 0.2, gamma = 0.5: 3 of 4 unclipped,
    # count noise 0.5, expected cohort 4: b~ = (3 - 4/2 + 0.5 + 4/2) / 4 = 0.875 and
    # C' = 1.0 * exp(-0.2 * (0.875 - 0.5)) = exp(-0.075).
    noise = _Noise(0.5)
    clip = ClientLevelClipping(1.0, ClipSide.client, AdaptiveClip(2.0, 0.2, 0.5))
    metrics = clip.adapt(1.0, 3.0, 4, 4.0, noise)
    assert noise.draws == [(2.0, 1)]
    assert metrics["dp_unclipped_fraction_noised"] == pytest.approx(0.875)
    assert metrics["dp_next_clip"] == pytest.approx(math.exp(-0.075))
    assert clip.norm == metrics["dp_next_clip"]
    assert clip.round_config() == {CLIP_NORM_KEY: clip.norm}


_BITS: Sequence[float | None] = [0.0, 1.0, 0.5, None]


@pytest.mark.parametrize("i", range(len(_BITS)))
def test_adaptive_client_clipping_needs_a_zero_or_one_bit(i: int) -> None:
    bit = _BITS[i]
    metrics = {} if bit is None else {UNCLIPPED_KEY: bit}
    reply = _reply(1, 1.0, **metrics)
    clip = ClientLevelClipping(1.0, ClipSide.client, AdaptiveClip(2.0, 0.2, 0.5))
    reason = clip.check_reply(reply)
    assert (reason is None) == (bit in (0.0, 1.0))
    # Server-side clipping counts the bits itself: it asks nothing of the reply.
    assert (
        ClientLevelClipping(1.0, ClipSide.server, AdaptiveClip(2.0, 0.2, 0.5)).check_reply(reply)
        is None
    )


NO_PLAINTEXT = (
    "distributed DP needs secure aggregation: plaintext updates must never reach the "
    "server (the config validator refuses secagg=off)"
)


def test_no_plaintext_input_refuses_every_plaintext_round() -> None:
    with pytest.raises(RuntimeError) as err:
        NoPlaintextInput().combine(1, [_reply(1, 1.0)], ExactMean())
    assert str(err.value) == NO_PLAINTEXT


def _settings(**kw: Any) -> ClientDpSettings:
    base: dict[str, Any] = dict(
        mode=PrivacyMode.central,
        clip_side=ClipSide.server,
        clipping=ClippingMode.fixed,
        noise_multiplier=1.3,
        clip=1.0,
        delta=1e-5,
        accountant=AccountantName.rdp,
        sampling=SamplingScheme.fixed,
        fraction=1.0,
        num_rounds=5,
        planned_population=4,
        seed=3,
        secure_mode=False,
    )
    base.update(kw)
    return ClientDpSettings(**base)


def _after_rounds(n: int) -> CentralDp:
    agg = CentralDp(_settings())
    for rnd in range(1, n + 1):
        assert agg.begin_round(rnd, 4) is None
    return agg


def test_restore_continues_after_the_ledgers_last_release() -> None:
    # 3 releases on disk, checkpoint after round 2 (round 3 was interrupted): the next
    # release index follows the ledger, so the offset is 3 - 2 = 1.
    first = _after_rounds(3)
    agg = CentralDp(first.settings, first.ledger)
    agg.restore_state({"clip": 0.5, "release_offset": 0, "noise_generation": 2}, 2)
    assert (agg.release_offset, agg.clip, agg.noise_generation) == (1, 0.5, 2)
    assert agg.export_state() == {"clip": 0.5, "release_offset": 1, "noise_generation": 2}
    # The ε reported is the restored ledger's: the run's ε after its 3 releases.
    assert agg.status()["dp_epsilon"] == pytest.approx(first.status()["dp_epsilon"])
    assert agg.round_config(3) == {}
    assert agg.begin_round(3, 4) is None
    assert agg.ledger.events[-1].round == 4  # release index = server round + offset
    # The boundary: a checkpoint exactly at the ledger's last release is not rewound.
    CentralDp(first.settings, first.ledger).restore_state(
        {"clip": 1.0, "release_offset": 1, "noise_generation": 0}, 2
    )
    # A run with no release yet restores from round 0.
    fresh = CentralDp(_settings())
    fresh.restore_state({"clip": 1.0, "release_offset": 0, "noise_generation": 0}, 0)
    assert fresh.release_offset == 0


def test_a_rewound_ledger_is_refused() -> None:
    first = _after_rounds(2)
    agg = CentralDp(first.settings, first.ledger)
    with pytest.raises(ValueError) as err:
        agg.restore_state({"clip": 1.0, "release_offset": 1, "noise_generation": 0}, 2)
    assert str(err.value) == (
        "the ledger's last release 2 is behind the checkpoint (round 2, release offset 1): "
        "the ledger on disk was rewound; refusing to under-count epsilon"
    )


_BAD_STATE: list[tuple[object, object, str]] = [
    (0.0, 0, "checkpoint clip must be a finite number > 0, found 0.0"),
    (-1.0, 0, "checkpoint clip must be a finite number > 0, found -1.0"),
    (math.inf, 0, "checkpoint clip must be a finite number > 0, found inf"),
    ("1", 0, "checkpoint clip must be a finite number > 0, found '1'"),
    (1.0, -1, "checkpoint noise_generation must be an int >= 0, found -1"),
    (1.0, True, "checkpoint noise_generation must be an int >= 0, found True"),
    (1.0, 1.5, "checkpoint noise_generation must be an int >= 0, found 1.5"),
]


@pytest.mark.parametrize("i", range(len(_BAD_STATE)))
def test_a_checkpoint_state_out_of_range_is_refused(i: int) -> None:
    clip, gen, message = _BAD_STATE[i]
    agg = _after_rounds(1)
    with pytest.raises(ValueError) as err:
        agg.restore_state({"clip": clip, "release_offset": 0, "noise_generation": gen}, 1)
    assert str(err.value) == message
    assert (agg.clip, agg.noise_generation) == (1.0, 0)


def _ddp_plan() -> DdpPlan:
    # z as in _settings (1.3): a run derives both from privacy.noise_multiplier, and the
    # aggregator reports each round's noise at the ledger's z (privacy.schedule).
    return DdpPlan(
        clip=1.0, dim=8, bits=20, noise_multiplier=1.3, max_cohort=4, dropout_tolerance=0.1
    )


def test_distributed_dp_is_assembled_from_its_parts() -> None:
    plan = _ddp_plan()
    s = _settings(mode=PrivacyMode.distributed, clip_side=ClipSide.client, distributed=plan)
    agg = DistributedDp(s)
    assert agg.plan is plan
    assert (agg.weighting, agg.releases_every_round) == ("uniform", True)
    assert agg.round_config(1) == {CLIP_NORM_KEY: 1.0}
    assert agg.begin_round(1, 4) is None
    with pytest.raises(RuntimeError) as err:
        agg.aggregate(1, [_reply(1, 1.0)])
    assert str(err.value) == NO_PLAINTEXT
    # Fixed-size cohort of all 4: the decoded sum divided by m = 4, nothing added.
    out = agg.aggregate_sum(1, {"w": np.array([2.0, -6.0])}, 3.0, 3, {})
    np.testing.assert_array_equal(out.update["w"], [0.5, -1.5])
    assert out.total_weight == 3.0
    assert set(out.metrics) == {
        "dp_clip",
        "dp_noise_std_sum",
        "dp_noise_std_mean",
        "dp_expected_cohort",
        "ddp_bits",
        "ddp_gamma",
        "ddp_noise_inflation",
    }
    assert out.metrics["ddp_bits"] == 20.0
    assert out.metrics["dp_expected_cohort"] == 4.0
    assert out.metrics["dp_noise_std_mean"] == pytest.approx(plan.gamma * plan.sigma / 4)
    assert agg.release_without_sum(1, {"w": np.zeros(2)}) is None


def test_distributed_dp_needs_its_plan_and_its_mode() -> None:
    with pytest.raises(ValueError) as err:
        DistributedDp(_settings(mode=PrivacyMode.distributed))
    assert str(err.value) == "DistributedDp needs settings.distributed (a DdpPlan)"
    with pytest.raises(ValueError) as err:
        DistributedDp(_settings(distributed=_ddp_plan()))
    assert str(err.value) == "DistributedDp needs privacy.mode=distributed, found central"
    with pytest.raises(ValueError) as err:
        CentralDp(_settings(mode=PrivacyMode.local))
    assert str(err.value) == "CentralDp needs privacy.mode=central, found local"


def test_status_reports_exactly_the_public_numbers() -> None:
    # Central DP, fixed-size sampling: no cohort gate, so no branch delta reported.
    agg = _after_rounds(1)
    assert set(agg.status()) == {"dp_epsilon", "dp_delta"}
    assert agg.status()["dp_delta"] == 1e-5
    # Distributed DP adds ε against the server: 0 before any cohort was noted.
    s = _settings(mode=PrivacyMode.distributed, clip_side=ClipSide.client, distributed=_ddp_plan())
    ddp = DistributedDp(s)
    assert ddp.begin_round(1, 4) is None
    assert ddp.status()["dp_epsilon_server_max"] == 0.0
    assert set(ddp.status()) == {"dp_epsilon", "dp_delta", "dp_epsilon_server_max"}


def test_a_round_without_a_sum_releases_noise_on_nothing() -> None:
    # No contributor: the release's weight is 0 (the driver applies no weight to it).
    agg = _after_rounds(1)
    out = agg.release_without_sum(1, {"w": np.zeros((2, 2), dtype=np.float32)})
    assert out is not None
    assert out.total_weight == 0.0
    assert out.update["w"].shape == (2, 2) and out.update["w"].dtype == np.float64


def _local(**kw: Any) -> LocalDp:
    return LocalDp(
        _settings(mode=PrivacyMode.local, clip_side=ClipSide.client, noise_multiplier=2.0, **kw)
    )


def test_local_status_starts_at_zero_and_follows_the_releases() -> None:
    agg = _local()
    assert agg.status() == {"dp_local_epsilon_max": 0.0}
    first = _reply(9, 1.0, **{"dp-partition-id": 2.0, "dp-local-releases": 1.0})
    assert agg.check_reply(first) is None
    assert agg.sites == {9: "partition-2"}
    # One release of z = 2: GaussianDpEvent(1), composed by dp-accounting's RDP.
    ref = RdpAccountant()
    ref.compose(dp_accounting.GaussianDpEvent(1.0))
    assert agg.status()["dp_local_epsilon_max"] == pytest.approx(ref.get_epsilon(1e-5))
    # The same count again: the site's state was reset; still counted as received.
    assert agg.check_reply(first) == (
        "local DP: partition-2 counts 1 releases, the server has received 2: its privacy "
        "state was lost or reset"
    )
    assert agg.node_config(9) == {"fl-app.local-releases-seen": 2}


_SITE_KEYS: list[tuple[dict[str, float], str | None]] = [
    ({"dp-site-hash": float(0xABC)}, "site-000000000abc"),
    ({"dp-site-hash": 0.0}, "site-000000000000"),
    ({"dp-site-hash": float(2**48 - 1), "dp-partition-id": 0.0}, "site-ffffffffffff"),
    ({"dp-site-hash": float(2**48)}, None),
    ({"dp-site-hash": -1.0}, None),
    ({"dp-site-hash": 1.5}, None),
    ({"dp-site-hash": math.nan}, None),
    ({"dp-partition-id": 7.0}, "partition-7"),
    ({"dp-partition-id": -1.0}, None),
    ({"dp-partition-id": 0.5}, None),
    ({"dp-partition-id": math.inf}, None),
    ({}, None),
]


@pytest.mark.parametrize("i", range(len(_SITE_KEYS)))
def test_site_key_is_the_sites_stable_identity(i: int) -> None:
    metrics, expected = _SITE_KEYS[i]
    reply = TrainReply(3, {"w": np.zeros(1)}, 1.0, dict(metrics), 0.0)
    assert LocalReleaseCount.site_key(reply) == expected
    assert LocalDp.site_key(reply) == expected


def _rdp_local(releases: int) -> float:
    # One local-DP release at z = 2 is GaussianDpEvent(z / 2 = 1).
    ref = RdpAccountant()
    ref.compose(dp_accounting.GaussianDpEvent(1.0), releases)
    return float(ref.get_epsilon(1e-5))


def _site_reply(node: int, pid: float, claimed: float | None) -> TrainReply:
    metrics = {"dp-partition-id": pid}
    if claimed is not None:
        metrics["dp-local-releases"] = claimed
    return TrainReply(node, {"w": np.array([1.0])}, 1.0, metrics, 1.0)


def test_local_dp_server_refuses_past_the_budget_counted_per_site() -> None:
    # A budget between the ε of 2 and of 3 releases allows each site 2.
    budget = (_rdp_local(2) + _rdp_local(3)) / 2
    agg = _local(max_epsilon=budget)
    # Node 9 restarts as node 10: the partition keys the count, not the node id.
    assert agg.check_reply(_site_reply(9, 2.0, 1.0)) is None
    assert agg.check_reply(_site_reply(10, 2.0, 2.0)) is None
    assert agg.node_config(9) == agg.node_config(10) == {"fl-app.local-releases-seen": 2}
    assert agg.node_config(11) == {"fl-app.local-releases-seen": 0}
    assert agg.check_reply(_site_reply(10, 2.0, 3.0)) == (
        f"local DP: partition-2 is past its budget (release 3, max_epsilon={budget:g} allows 2)"
    )
    # Counted although refused: the server received it.
    assert dict(agg.ledger.local) == {"partition-2": 3}
    assert agg.ledger.accountant is AccountantName.rdp
    assert agg.ledger.local_noise_multiplier == 2.0


def test_local_dp_counts_a_reply_it_cannot_attribute() -> None:
    agg = _local()
    assert agg.check_reply(_site_reply(4, -1.0, 1.0)) == (
        "local DP reply without a valid dp-partition-id: its releases cannot be counted"
    )
    assert dict(agg.ledger.local) == {"node-4": 1}
    # A reply that claims no count is one whose state was lost (0 < 1 received).
    assert agg.check_reply(_site_reply(5, 1.0, None)) == (
        "local DP: partition-1 counts 0 releases, the server has received 1: its privacy "
        "state was lost or reset"
    )


def test_local_dp_is_assembled_from_its_parts() -> None:
    s = _settings(mode=PrivacyMode.local, clip_side=ClipSide.client, noise_multiplier=2.0)
    ledger = FederationLedger(1e-5, AccountantName.rdp, local_noise_multiplier=2.0).add_local(
        ["partition-0"]
    )
    agg = LocalDp(s, ledger)
    assert agg.settings is s and agg.ledger is ledger
    assert agg.round_config(1) == {CLIP_NORM_KEY: 1.0}
    assert (agg.weighting, agg.releases_every_round) == ("examples", False)
    out = agg.aggregate(1, [_reply(1, 2.0), _reply(2, 4.0)])
    assert float(out.update["w"][0]) == 3.0 and out.metrics == {"dp_local_releases": 2}
    with pytest.raises(ValueError) as err:
        LocalDp(_settings())
    assert str(err.value) == "LocalDp needs privacy.mode=local, found central"


class _RecordingRelease(ExactMean):
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, np.ndarray], float, int, dict[str, float]]] = []

    def from_sum(
        self,
        rnd: int,
        sum_update: Any,
        total_weight: float,
        num_contributors: int,
        extra: Any,
    ) -> Aggregate:
        self.calls.append((dict(sum_update), total_weight, num_contributors, dict(extra)))
        return Aggregate(dict(sum_update), total_weight, {})


def _clipped_sum(side: ClipSide, replies: list[TrainReply]) -> tuple[Aggregate, tuple[Any, ...]]:
    account = FederationAccount(_settings())
    assert account.begin_round(1, 4, 1.0) is None  # C = 1 this round
    release = _RecordingRelease()
    out = ClippedSumInput(account, side).combine(1, replies, release)
    (call,) = release.calls
    return out, call


def test_server_clipping_sums_clipped_updates_and_counts_the_unclipped() -> None:
    # C = 1: 0.5 stays, 2.0 -> 1.0, -3.0 -> -1.0; sum 0.5, one update was within C.
    out, (total, weight, n, extra) = _clipped_sum(
        ClipSide.server, [_reply(1, 0.5), _reply(2, 2.0), _reply(3, -3.0)]
    )
    assert float(total["w"][0]) == pytest.approx(0.5)
    assert total["w"].dtype == np.float64
    assert (weight, n, extra) == (3.0, 3, {UNCLIPPED_KEY: 1.0})
    assert "dp_server_reclipped" not in out.metrics


def test_client_clipping_is_reclipped_and_the_clients_bits_summed() -> None:
    replies = [
        _reply(1, 2.0, **{UNCLIPPED_KEY: 1.0}),  # a client that did not clip: reclipped
        _reply(2, -4.0, **{UNCLIPPED_KEY: 0.0}),  # reclipped
        _reply(3, 0.25, **{UNCLIPPED_KEY: 1.0}),  # within C
    ]
    out, (total, weight, n, extra) = _clipped_sum(ClipSide.client, replies)
    assert float(total["w"][0]) == pytest.approx(1.0 - 1.0 + 0.25)
    assert (weight, n, extra) == (3.0, 3, {UNCLIPPED_KEY: 2.0})
    assert out.metrics == {"dp_server_reclipped": 2.0}
    # Honest clients (all within C): nothing reclipped, no metric.
    out, (_, _, _, extra) = _clipped_sum(ClipSide.client, [_reply(1, 0.5)])
    assert out.metrics == {} and extra == {UNCLIPPED_KEY: 0.0}


def test_round_bookkeeping_of_the_ledger_account() -> None:
    # Before any round (a resumed run whose first round the budget stops): the ε of the
    # ledger it was given, 0 for a fresh one.
    assert CentralDp(_settings()).status()["dp_epsilon"] == 0.0
    # A round of one client is accounted at population 1 (fixed fraction 1: cohort 1).
    agg = CentralDp(_settings())
    assert agg.begin_round(1, 1) is None
    event = agg.ledger.events[-1]
    assert (event.population, event.cohort) == (1, 1.0)
    # Only the round begun may aggregate.
    with pytest.raises(RuntimeError) as err:
        agg.aggregate_sum(2, {"w": np.zeros(1)}, 1.0, 1, {})
    assert str(err.value) == "aggregate(2) without begin_round(2)"


def test_central_noise_is_from_a_csprng_unless_seeded() -> None:
    # secure_mode: two servers with the same seed draw different noise; seeded: the same.
    def noised(secure: bool) -> np.ndarray:
        agg = CentralDp(_settings(secure_mode=secure))
        assert agg.begin_round(1, 4) is None
        out = agg.release_without_sum(1, {"w": np.zeros(64)})
        assert out is not None
        return out.update["w"]

    assert not np.array_equal(noised(True), noised(True))
    np.testing.assert_array_equal(noised(False), noised(False))


def test_central_release_metrics_name_the_mechanism() -> None:
    agg = CentralDp(_settings())
    assert agg.begin_round(1, 4) is None
    out = agg.aggregate_sum(1, {"w": np.zeros(8)}, 4.0, 4, {})
    assert set(out.metrics) == {
        "dp_clip",
        "dp_noise_std_sum",
        "dp_noise_std_mean",
        "dp_expected_cohort",
    }
    assert out.metrics["dp_expected_cohort"] == 4.0
    # Under secure aggregation the noise covers the encoding's slack, and says so.
    enc = CentralDp(_settings(encoding=(16, 8)))
    assert enc.begin_round(1, 4) is None
    slack = enc.ledger.events[-1].encoding_slack
    assert slack > 0
    out = enc.aggregate_sum(1, {"w": np.zeros(8)}, 4.0, 4, {})
    assert out.metrics["dp_encoding_slack"] == slack


def test_local_dp_without_a_budget_never_refuses_for_budget() -> None:
    agg = _local()
    for k in range(1, 8):  # past num_rounds = 5: no budget, no cap
        assert agg.check_reply(_site_reply(1, 0.0, float(k))) is None

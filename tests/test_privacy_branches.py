"""Every branch of a server round releases exactly what the privacy ledger accounts.

docs/privacy-branches.md tables the branches; each test below drives one through the
real round driver on the in-process grid (or a stub secure aggregation whose outcome
is that branch) and checks the model that left the round against the mechanism the
ledger's event for that round describes: ``w + (Σ clip(Δ_i) + N(0, σ²))/m`` with ``σ``
and ``m`` read from the event and the seeded noise replayed, or the unchanged model
where the mechanism releases nothing. Expected values (clipping, the cohort-gate ``η``,
the encoding slack, ε against the server) are worked out here by hand or with
dp-accounting directly, never taken from the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant, compute_epsilon
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fl_app.config.client_dp import ClientDpSettings
from fl_app.config.schema import ClipSide, PrivacyMode
from fl_app.privacy.distributed import DdpPlan, sensitivity
from fl_app.privacy.history import AccountantName
from fl_app.privacy.ledger import FederationLedger, LedgerError
from fl_app.privacy.mechanisms import (
    AdaptiveClip,
    CentralGaussian,
    cohort_gate_delta,
    encoding_slack,
    update_noise_multiplier,
)
from fl_app.privacy.noise import SeededNoise
from fl_app.privacy.round_event import RoundEvent, SamplingScheme
from fl_app.protocol import METRICS_KEY, NUM_EXAMPLES, SERVER_ROUND, UPDATE_KEY
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.secagg.encoding import FixedPointCodec
from fl_app.secagg.vector import DecodedSum
from fl_app.weights import to_array_record
from strategies.budget import BudgetGuard
from strategies.dp_aggregators import CENTRAL_NOISE_STREAM, CentralDp, DistributedDp
from strategies.dp_projection import projection_lines
from strategies.driver import RoundDriver
from strategies.driver_types import DriverSettings
from strategies.sampling import FixedSizeSampler, PoissonSampler
from strategies.secagg import SecAggOutcome

GLOBAL = {"w": np.zeros((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
SIZE = 8  # parameters in GLOBAL
SEED = 7


def _settings(**kw: Any) -> ClientDpSettings:
    base: dict[str, Any] = dict(
        mode=PrivacyMode.central,
        clip_side=ClipSide.server,
        clipping="fixed",
        noise_multiplier=1.3,
        clip=1.0,
        delta=1e-5,
        accountant=AccountantName.rdp,  # fast; PLD is pinned in test_client_dp.py
        sampling=SamplingScheme.fixed,
        fraction=1.0,
        num_rounds=3,
        planned_population=4,
        seed=SEED,
        secure_mode=False,
    )
    base.update(kw)
    return ClientDpSettings(**base)


def _app(fail: frozenset[int] | set[int] = frozenset()) -> ClientApp:
    """Client ``pid`` replies Δ = (pid + 1) everywhere; those in ``fail`` reply an error."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if pid in fail:
            return Message(Error(code=1, reason="boom"), reply_to=msg)
        rnd = int(msg.content["config"][SERVER_ROUND])
        update = {k: np.full(v.shape, float(pid + 1), np.float32) for k, v in GLOBAL.items()}
        content = RecordDict(
            {
                UPDATE_KEY: to_array_record(update),
                METRICS_KEY: MetricRecord({NUM_EXAMPLES: 10, SERVER_ROUND: rnd}),
            }
        )
        return Message(content, reply_to=msg)

    return app


def _driver(agg: Any, sampler: Any, *, rounds: int = 1, min_replies: int = 1, secagg: Any = None):
    return RoundDriver(
        FedAvg(fraction_train=1.0, min_train_nodes=0, min_available_nodes=0),
        train_sampler=sampler,
        evaluate_sampler=None,
        settings=DriverSettings(
            num_rounds=rounds, min_train_replies=min_replies, train_timeout_s=0.5
        ),
        aggregator=agg,
        secagg=secagg,
    )


def _clipped_sum(values: list[float], clip: float) -> float:
    """Σ clip(Δ_i) per coordinate for constant updates Δ_i = v_i·1 of SIZE coordinates:
    ‖Δ_i‖ = v_i·√SIZE, scaled by min(1, C/‖Δ_i‖)."""
    return sum(v * min(1.0, clip / (v * math.sqrt(SIZE))) for v in values)


def _expected_release(
    event: RoundEvent, per_coordinate_sum: float, stream: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """``w + (Σ + N(0, σ²))/m`` with σ and m from the ledger event, noise replayed."""
    noise = SeededNoise(SEED, stream)
    out = {}
    for k, v in GLOBAL.items():
        z = noise.normal(event.noise_std, v.size).reshape(v.shape)
        out[k] = (v.astype(np.float64) + (per_coordinate_sum + z) / event.cohort).astype(v.dtype)
    return out


def _check_central_release(agg: CentralDp, arrays: dict[str, np.ndarray], summed: float) -> None:
    (event,) = agg.ledger.events  # exactly one release recorded for the one round
    expected = _expected_release(event, summed, (1, CENTRAL_NOISE_STREAM))
    for k in GLOBAL:
        np.testing.assert_allclose(arrays[k], expected[k], rtol=1e-6, atol=1e-7)
    assert not np.allclose(arrays["w"], GLOBAL["w"])  # noise was released


# ------------------------------------------------------------- central DP, plaintext
@pytest.mark.parametrize(
    ("fail", "min_replies", "note"),
    [
        (set(), 1, ""),  # success
        ({1, 2}, 3, "only 1 valid train replies"),  # too few replies: released anyway
        ({0, 1, 2}, 1, "only 0 valid train replies"),  # nothing arrived: noise on zero
    ],
    ids=["success", "too-few-replies", "no-replies"],
)
def test_central_round_releases_the_noised_sum_of_what_arrived(
    fail: set[int], min_replies: int, note: str
) -> None:
    agg = CentralDp(_settings(planned_population=3))
    with InProcessGrid(_app(fail), 3, seed=1) as grid:
        result = _driver(agg, FixedSizeSampler(1.0, seed=0), min_replies=min_replies).run(
            grid, GLOBAL
        )
    report = result.reports[0]
    assert report.model_updated and note in report.note
    arrived = [float(p + 1) for p in range(3) if p not in fail]
    _check_central_release(agg, result.arrays, _clipped_sum(arrived, 1.0))


def test_empty_poisson_cohort_releases_noise_on_a_zero_sum() -> None:
    with InProcessGrid(_app(), 4, seed=1) as grid:
        nodes = list(grid.node_ids)
        # A sampler seed whose round-1 Poisson cohort is empty (probability 0.7^4 each).
        seed = next(s for s in range(500) if not PoissonSampler(0.3, s).sample(nodes, 1))
        agg = CentralDp(_settings(sampling=SamplingScheme.poisson, fraction=0.3))
        result = _driver(agg, PoissonSampler(0.3, seed)).run(grid, GLOBAL)
        assert not grid.sent  # nothing left the server
    report = result.reports[0]
    assert report.train.sampled == 0 and report.model_updated
    assert "empty cohort" in report.note and "noise" in report.note
    # m = q·N = 1.2 (expected cohort), as for every other Poisson round.
    assert agg.ledger.events[0].cohort == pytest.approx(1.2)
    _check_central_release(agg, result.arrays, 0.0)


# ------------------------------------------------------------- under secure aggregation
class _StubSecAgg:
    """A secure aggregation whose every round ends with ``outcome``."""

    def __init__(self, outcome: SecAggOutcome) -> None:
        self.outcome = outcome

    def encoding_bound(self, config: dict[str, Any], key: str) -> float:
        return 1.0

    def run_round(self, **_: Any) -> SecAggOutcome:
        return self.outcome


def test_abandoned_secure_round_releases_central_noise_on_a_zero_sum() -> None:
    outcome = SecAggOutcome(decoded=None, note="only 1 masked inputs: model unchanged")
    agg = CentralDp(_settings(clip_side=ClipSide.client, planned_population=3))
    with InProcessGrid(_app(), 3, seed=1) as grid:
        result = _driver(agg, FixedSizeSampler(1.0, seed=0), secagg=_StubSecAgg(outcome)).run(
            grid, GLOBAL
        )
    report = result.reports[0]
    assert report.model_updated and "model unchanged" not in report.note
    assert "only 1 masked inputs" in report.note
    _check_central_release(agg, result.arrays, 0.0)


def test_secure_sum_below_min_replies_is_released_with_its_noise() -> None:
    summed = {k: np.full(v.shape, 0.25) for k, v in GLOBAL.items()}
    outcome = SecAggOutcome(
        decoded=DecodedSum(summed, 1.0, 0.0, math.nan, math.nan), num_contributors=1
    )
    agg = CentralDp(_settings(clip_side=ClipSide.client, planned_population=3))
    with InProcessGrid(_app(), 3, seed=1) as grid:
        driver = _driver(
            agg, FixedSizeSampler(1.0, seed=0), min_replies=2, secagg=_StubSecAgg(outcome)
        )
        result = driver.run(grid, GLOBAL)
    assert "released the noised sum" in result.reports[0].note
    _check_central_release(agg, result.arrays, 0.25)


def _ddp_settings(
    population: int, q: float, gate: tuple[int, int] | None = (3, 4)
) -> ClientDpSettings:
    plan = DdpPlan(
        clip=1.0, dim=SIZE, bits=20, noise_multiplier=1.0, max_cohort=4, dropout_tolerance=0.1
    )
    return _settings(
        mode=PrivacyMode.distributed,
        noise_multiplier=1.0,
        clip_side=ClipSide.client,
        accountant=AccountantName.rdp,
        sampling=SamplingScheme.poisson,
        fraction=q,
        planned_population=population,
        distributed=plan,
        cohort_gate=gate,
    )


@pytest.mark.parametrize(
    ("note", "unmasked"),
    [
        ("a cohort of 5 exceeds the 4 clients the distributed-DP ring was sized for", False),
        ("only 2 masked inputs, distributed DP needs 3", False),
        ("the decoded sum is out of range", True),  # the server saw the noised sum
    ],
    ids=["ring-too-small", "abandoned", "refused-after-unmask"],
)
def test_distributed_dp_abandoned_round_leaves_the_model_and_accounts_the_gate(
    note: str, unmasked: bool
) -> None:
    outcome = SecAggOutcome(decoded=None, note=f"{note}: model unchanged", unmasked=unmasked)
    agg = DistributedDp(_ddp_settings(population=6, q=0.5))
    with InProcessGrid(_app(), 6, seed=1) as grid:
        result = _driver(agg, PoissonSampler(0.5, seed=2), secagg=_StubSecAgg(outcome)).run(
            grid, GLOBAL
        )
    report = result.reports[0]
    assert not report.model_updated and note in report.note
    for k in GLOBAL:
        np.testing.assert_array_equal(result.arrays[k], GLOBAL[k])
    (event,) = agg.ledger.events
    # η = q·(P[Bin(5, q) = 2] + P[Bin(5, q) = 4]) at q = 1/2: (10 + 5)/32 · 1/2.
    assert event.branch_delta == pytest.approx(15 / 64)
    assert report.privacy["dp_delta_branches"] == pytest.approx(15 / 64)
    # Whatever the server saw of this round is in its against-server count: every
    # sampled client has one round in the cohort.
    assert sum(n for _, n in agg.ledger.participation) == report.train.sampled > 0


# ------------------------------------------------------------- budget stop, resume, rollback
def test_budget_stop_releases_nothing_after_the_last_accounted_round() -> None:
    s = _settings(planned_population=3, noise_multiplier=1.0, num_rounds=10)
    one_round = FederationLedger(1e-5).add(s.round_event(1, 3, 1.0)).epsilon()
    two_rounds = (
        FederationLedger(1e-5).add(s.round_event(1, 3, 1.0)).project([s.round_event(2, 3, 1.0)])
    )
    agg = CentralDp(s, budget=BudgetGuard((one_round + two_rounds) / 2))
    with InProcessGrid(_app(), 3, seed=1) as grid:
        result = _driver(agg, FixedSizeSampler(1.0, seed=0), rounds=10).run(grid, GLOBAL)
        sent_rounds = {int(d.group_id) for d in grid.sent}
    assert len(result.reports) == 1 and "before round 2" in result.stopped_early
    assert sent_rounds == {1} and len(agg.ledger.events) == 1
    _check_central_release(agg, result.arrays, _clipped_sum([1.0, 2.0, 3.0], 1.0))


@pytest.mark.parametrize("generation", [0, 1], ids=["resume", "rollback"])
def test_redone_round_is_a_new_release_in_the_ledger(generation: int) -> None:
    s = _settings(planned_population=3)
    first = CentralDp(s)
    for rnd in (1, 2):  # rounds 1-2 accounted; the run stopped inside round 2
        first.begin_round(rnd, 3)
    agg = CentralDp(s, ledger=first.ledger)
    # Checkpoint of round 1; a rollback redraws the noise of rounds it redoes.
    agg.restore_state({"clip": 1.0, "release_offset": 0, "noise_generation": generation}, 1)
    agg.noise_generation = generation
    with InProcessGrid(_app(), 3, seed=1) as grid:
        result = _driver(agg, FixedSizeSampler(1.0, seed=0), rounds=2).run(
            grid, GLOBAL, start_round=2
        )
    assert [e.round for e in agg.ledger.events] == [1, 2, 3]  # never rewound
    event = agg.ledger.events[-1]
    stream = (2, CENTRAL_NOISE_STREAM) + ((generation,) if generation else ())
    expected = _expected_release(event, _clipped_sum([1.0, 2.0, 3.0], 1.0), stream)
    assert len(result.reports) == 1
    for k in GLOBAL:
        np.testing.assert_allclose(result.arrays[k], expected[k], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------- units, by hand
def test_cohort_gate_delta_by_hand() -> None:
    # N = 10, q = 0.3, secure aggregation needs 3: x flips the round when the other
    # nine give exactly 2: q·C(9,2)·q²·(1−q)^7.
    assert cohort_gate_delta(0.3, 10, 3, None) == pytest.approx(0.3 * 36 * 0.09 * 0.7**7, rel=1e-12)
    # An upper gate adds q·P[Bin(N−1, q) = high].
    assert cohort_gate_delta(0.5, 6, 3, 4) == pytest.approx(15 / 64, rel=1e-12)
    assert cohort_gate_delta(0.5, 6, 0, None) == 0.0


def test_cohort_gate_delta_with_holes_by_hand() -> None:
    # N = 6, q = 1/2, gate [3, 5] with size 4 abandoned: x flips the round when the
    # other five give s with "s released" != "s + 1 released": s = 2 (2 -> 3),
    # 3 (3 -> 4), 4 (4 -> 5), 5 (5 -> 6 is above the gate): C(5, s)/32 each.
    assert cohort_gate_delta(0.5, 6, 3, 5, holes=(4,)) == pytest.approx(
        0.5 * (10 + 10 + 5 + 1) / 32, rel=1e-12
    )
    # Only sizes 3..4 checked: whether 5 is released is unknown, so s = 4 and s = 5 are
    # counted as flips (4: 4 -> 5 unknown; 5: 5 itself unknown).
    assert cohort_gate_delta(0.5, 6, 3, 5, holes=(), checked=(3, 4)) == pytest.approx(
        0.5 * (10 + 5 + 1) / 32, rel=1e-12
    )
    # Only 4..5 checked: size 3 unknown, so s = 2 and s = 3 count; s = 5 flips (5 -> 6).
    assert cohort_gate_delta(0.5, 6, 3, 5, holes=(), checked=(4, 5)) == pytest.approx(
        0.5 * (10 + 10 + 1) / 32, rel=1e-12
    )


def _odd_sizes_only(n: int, mode: str, drop: float, corrupt: float, *model: str) -> bool:
    return n >= 3 and n % 2 == 1


def test_gate_with_holes_is_accounted_and_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Red-team finding: with secure-aggregation parameters for odd cohorts only (as
    ``dropout_tolerance=0.5`` gave), a client decides between release and abandonment
    whenever it is sampled; the accounted η was q·P[Bin(N−1, q) = 2] ≈ 6e-29 a round."""
    import fl_app.config.cohort_gate as cohort_gate
    from fl_app.config.compose import compose_config

    n, q = 203, 0.3
    cfg = compose_config(
        "config",
        [
            "runtime=inprocess",
            "privacy=central",
            "secagg=secagg",
            "secagg.dropout_tolerance=0.2",
            "strategy.sampling=poisson",
            f"strategy.fraction_train={q}",
            f"dataset.num_partitions={n}",
            "num_rounds=5",
            "privacy.clip_side=client",
        ],
    )

    def clear() -> None:
        for fn in (cohort_gate.cohort_holes, cohort_gate.gate_delta):
            fn.cache_clear()
        cohort_gate.smallest_secure_cohort.cache_clear()

    clear()
    monkeypatch.setattr(cohort_gate, "_has_secure_params", _odd_sizes_only)
    try:
        # Every s >= 3 is an edge, and s = 2 (2 -> 3): η = q·P[Bin(202, 0.3) >= 2].
        expected = q * (
            1.0 - sum(math.comb(n - 1, k) * q**k * (1 - q) ** (n - 1 - k) for k in (0, 1))
        )
        settings = _settings(
            sampling=SamplingScheme.poisson,
            fraction=q,
            planned_population=n,
            cohort_gate=(3, None),
            cohort_secagg=("secagg", 0.2, 0.1),
        )
        assert settings.branch_delta(n) == pytest.approx(expected, rel=1e-9)
        with pytest.raises(ValueError, match=r"secagg\.dropout_tolerance") as err:
            ClientDpSettings.from_config(cfg)
        assert "sizes 4, 6, 8, 10, ..." in str(err.value)
    finally:
        monkeypatch.undo()
        clear()


def test_gate_delta_matches_the_real_parameter_derivation() -> None:
    """η from every size ``derive_params`` accepts, enumerated here directly: whatever
    sizes it refuses inside the gate, the accounted η covers each flip."""
    from fl_app.secagg.derive import derive_params
    from fl_app.secagg.params import SecAggConfigError

    n, q, mode, drop, corrupt = 40, 0.3, "secagg", 0.45, 0.1

    def ok(size: int) -> bool:
        if size < 3:
            return False
        try:
            derive_params(size, mode=mode, dropout_tolerance=drop, corrupt_fraction=corrupt)
        except SecAggConfigError:
            return False
        return True

    low = next(size for size in range(3, n + 1) if ok(size))
    expected = q * sum(
        math.comb(n - 1, s) * q**s * (1 - q) ** (n - 1 - s) for s in range(n) if ok(s) != ok(s + 1)
    )
    settings = _settings(
        sampling=SamplingScheme.poisson,
        fraction=q,
        planned_population=n,
        cohort_gate=(low, None),
        cohort_secagg=(mode, drop, corrupt),
    )
    assert settings.branch_delta(n) == pytest.approx(expected, rel=1e-9)
    assert expected > 0


def test_epsilon_is_composed_at_delta_minus_the_branches() -> None:
    q, z, n, rounds = 0.3, 1.5, 10, 4
    eta = cohort_gate_delta(q, n, 3, None)
    events = [
        RoundEvent(r, "poisson", n, q, q * n, z, 1.0, z, branch_delta=eta)
        for r in range(1, rounds + 1)
    ]
    delta = 0.5  # η ≈ 0.08 a round: δ must cover it
    ledger = FederationLedger(delta, AccountantName.rdp, tuple(events))
    acc = RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    independent = acc.get_epsilon(delta - rounds * eta)
    assert ledger.epsilon() == pytest.approx(independent, rel=1e-2)
    assert ledger.epsilon() > acc.get_epsilon(delta)  # the branches cost ε
    # Branches that take all of δ leave no finite guarantee.
    assert FederationLedger(rounds * eta, AccountantName.rdp, tuple(events)).epsilon() == math.inf


def test_central_gaussian_release_by_hand() -> None:
    fixed = np.array([0.5, -1.0, 2.0])
    out = CentralGaussian(noise_std=2.0, divisor=4.0).release(
        {"a": np.array([1.0, 1.0, 1.0])}, lambda std, n: std * fixed[:n]
    )
    np.testing.assert_allclose(out["a"], [(1 + 1.0) / 4, (1 - 2.0) / 4, (1 + 4.0) / 4])
    with pytest.raises(ValueError, match="noise_std"):
        CentralGaussian(0.0, 1.0)


def test_ddp_sensitivity_matches_kairouz_theorem_1_by_hand() -> None:
    # A = 100, d' = 1024, β = e^{-1/2} so √(2 ln 1/β) = 1:
    # min{(A + √d')², A² + d'/4 + 1·(A + √d'/2)} = min{132², 10000 + 256 + 116} = 10372.
    assert sensitivity(100.0, 1024, math.exp(-0.5)) == pytest.approx(math.sqrt(10372.0))
    # β = 0: unconditional rounding, A + √d'.
    assert sensitivity(100.0, 1024, 0.0) == pytest.approx(132.0)


# ------------------------------------------------------------- encoding in the sensitivity
def test_encoding_slack_bounds_the_worst_rounding_at_the_edge() -> None:
    # bits=16, C=1 (codec bound B = 1 + 2^-10), n = 4: M = (2^15 − 1) // 4 = 8191 and s
    # is the largest power of two with B·s <= M − 1 = 8190: 4096 (8192·B > 8190).
    d = 256
    codec = FixedPointCodec(bits=16, max_abs=1.0 + 2.0**-10, max_contributors=4)
    assert codec.scale == 4096.0
    slack = math.sqrt(d) / 4096.0  # 1/256
    assert encoding_slack(16, 1.0, d, 4) == pytest.approx(slack)
    # Worst case at the edge: a norm-C vector whose coordinates sit just above grid
    # points (255/4096 + tiny), one coordinate completing the norm to exactly C; every
    # coordinate rounded up (a possible outcome of stochastic rounding).
    x = np.full(d, (255.0 + 1e-6) / 4096.0)
    x[0] = math.sqrt(1.0 - float(np.sum(x[1:] ** 2)))
    assert np.linalg.norm(x) == pytest.approx(1.0, abs=1e-12)
    worst = np.ceil(x * 4096.0) / 4096.0
    # 255 coordinates at 256/4096 and one at 443/4096: sqrt(255·256² + 443²)/4096.
    assert np.linalg.norm(worst) == pytest.approx(math.sqrt(255 * 256**2 + 443**2) / 4096)
    assert 1.0 + 0.9 * slack < np.linalg.norm(worst) <= 1.0 + slack  # C alone is too small
    # Any actual encoding of it stays within the post-encoding bound too.
    for seed in range(5):
        enc = codec.decode_sum(codec.encode(x, np.random.default_rng(seed)), 1)
        assert np.linalg.norm(enc) <= 1.0 + slack
    # The central noise under SecAgg is calibrated to C + slack (fixed cohort of 4).
    s = _settings(clip_side=ClipSide.client, planned_population=4, encoding=(16, d))
    event = s.round_event(1, 4, 1.0)
    assert event.encoding_slack == pytest.approx(slack)
    assert event.noise_std == pytest.approx(1.3 * (1.0 + 1.0 / 256))
    agg = CentralDp(s)
    agg.begin_round(1, 4)
    out = agg.aggregate_sum(1, {"w": np.zeros(3)}, 4.0, 4, {})
    assert out.metrics["dp_noise_std_sum"] == pytest.approx(1.3 * (1.0 + 1.0 / 256))


# ------------------------------------------------------------- ε against the server
# The RDP orders at which the bound is evaluated (integer orders: Zhu & Wang's bound
# holds there); a grid, not a parameter of the mechanism.
ORDERS = [*range(2, 65), 80, 96, 128, 160, 192, 256]


def _ddg_rdp_by_hand(order: int, z: float, tau: float, dim: int) -> float:
    """[KLS] Proposition 14 (L2 branch), one unsampled round: l = 1/z."""
    ell = 1.0 / z
    return min(order * ell**2 / 2 + tau * dim, order / 2 * (ell + math.sqrt(dim) * tau) ** 2)


def test_against_server_epsilon_composes_the_rounds_each_client_took_part_in() -> None:
    s = _ddp_settings(population=6, q=0.5, gate=None)
    agg = DistributedDp(s)
    rng = np.random.default_rng(5)
    counts: dict[str, int] = {}
    for rnd in range(1, 7):
        agg.begin_round(rnd, 6)
        cohort = [n for n in range(6) if rng.random() < 0.5]
        agg.note_cohort(rnd, cohort)
        for n in cohort:
            counts[str(n)] = counts.get(str(n), 0) + 1
    against = agg.ledger.server_epsilons()
    assert set(against) == set(counts)
    plan = s.distributed
    assert plan is not None
    orders = ORDERS
    for client, k in counts.items():
        rdp = [k * _ddg_rdp_by_hand(a, 1.0, plan.tau, plan.padded) for a in orders]
        independent, _ = compute_epsilon(orders, rdp, 1e-5)
        assert against[client] == pytest.approx(independent, rel=1e-3)
    # Outsiders get amplification: strictly less than the most-sampled client's figure.
    assert agg.ledger.epsilon() < max(against.values())
    assert agg.status()["dp_epsilon_server_max"] == pytest.approx(max(against.values()))


def test_central_unsampled_epsilon_is_a_composed_gaussian() -> None:
    s = _settings(planned_population=3)
    agg = CentralDp(s)
    for rnd in (1, 2, 3):
        agg.begin_round(rnd, 3)
        agg.note_cohort(rnd, [0, 1] if rnd < 3 else [1])
    acc = RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1.3), 2)
    assert agg.ledger.server_epsilons()["0"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-2)
    assert agg.ledger.server_epsilons()["1"] > agg.ledger.server_epsilons()["0"]


def test_budget_guard_against_the_server_counts_the_most_sampled_client() -> None:
    s = _ddp_settings(population=6, q=0.5, gate=None)
    plan = s.distributed
    assert plan is not None
    orders = ORDERS

    def by_hand(k: int) -> float:
        rdp = [k * _ddg_rdp_by_hand(a, 1.0, plan.tau, plan.padded) for a in orders]
        return float(compute_epsilon(orders, rdp, 1e-5)[0])

    budget = (by_hand(2) + by_hand(3)) / 2  # room for 2 rounds of one client, not 3
    agg = DistributedDp(s, budget=BudgetGuard(budget, against_server=True))
    for rnd in (1, 2):
        assert agg.begin_round(rnd, 6) is None
        agg.note_cohort(rnd, [4])
    reason = agg.begin_round(3, 6)
    assert reason and "against the server" in reason and "in 2 cohorts" in reason
    # The same budget against outsiders (amplified) lets round 3 run.
    outsider = DistributedDp(s, ledger=agg.ledger, budget=BudgetGuard(budget))
    assert outsider.begin_round(3, 6) is None


def test_dry_run_projection_states_both_parties() -> None:
    s = _ddp_settings(population=6, q=0.5, gate=None)
    plan = s.distributed
    assert plan is not None
    lines = "\n".join(projection_lines(s))
    assert "against outsiders" in lines and "against the server" in lines
    # Planned worst case: a client in all 3 rounds, unamplified, by hand.
    rdp = [3 * _ddg_rdp_by_hand(a, 1.0, plan.tau, plan.padded) for a in ORDERS]
    worst = compute_epsilon(ORDERS, rdp, 1e-5)[0]
    assert f"a client in all 3 rounds: {worst:.4g}" in lines


def test_adaptive_clip_step_and_noise_split_by_hand() -> None:
    step = AdaptiveClip(clipped_count_std=2.5, learning_rate=0.2, target_quantile=0.5)
    # 30 of 50 unclipped, no count noise, m = 50: b̃ = (30 − 25 + 0 + 25)/50 = 0.6 and
    # C' = 1·exp(−0.2·(0.6 − 0.5)) = e^{-0.02}.
    fraction, nxt = step.step(1.0, 30.0, 50, 50.0, 0.0)
    assert fraction == pytest.approx(0.6) and nxt == pytest.approx(math.exp(-0.02))
    # The count's noise moves b̃ by noise/m: +5 → 0.7, C' = e^{-0.04}.
    assert step.step(1.0, 30.0, 50, 50.0, 5.0)[1] == pytest.approx(math.exp(-0.04))
    # z = 1, σ_b = 2.5: z_Δ = (1 − 1/25)^{-1/2} = 0.96^{-1/2}.
    assert update_noise_multiplier(1.0, 2.5) == pytest.approx(0.96**-0.5)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        update_noise_multiplier(1.0, 0.5)


def test_config_whose_branches_use_up_delta_is_refused_naming_the_fields() -> None:
    from fl_app.config.compose import compose_config
    from fl_app.config.errors import ConfigError

    # The validator resolves the privacy settings, so the config fails when composed.
    with pytest.raises(ConfigError, match=r"strategy\.fraction_train.*strategy\.sampling=fixed"):
        compose_config(
            "config",
            [
                "privacy=central",
                "privacy.threat_model=honest_but_curious",
                "privacy.clip_side=client",
                "secagg=secaggplus",
                "strategy.sampling=poisson",
                "strategy.fraction_train=0.3",
                "dataset.num_partitions=10",
                "num_rounds=5",
            ],
        )


def test_ledger_round_trips_branches_slack_and_participation() -> None:
    event = RoundEvent(1, "poisson", 10, 0.3, 3.0, 1.0, 1.0, 1.0, branch_delta=1e-9)
    event = dataclasses.replace(event, encoding_slack=0.25)
    assert event.noise_std == pytest.approx(1.25)  # z_Δ·(C + slack)
    ledger = FederationLedger(1e-5, AccountantName.rdp, (event,)).add_participation(["7", "9"])
    ledger = ledger.add_participation(["7"])
    again = FederationLedger.from_json(ledger.to_json())
    assert again == ledger and dict(again.participation) == {"7": 2, "9": 1}
    # A ledger written before these fields existed still parses (nothing counted).
    old = json.loads(ledger.to_json())
    del old["participation"]
    for e in old["events"]:
        del e["branch_delta"], e["encoding_slack"]
    parsed = FederationLedger.from_json(json.dumps(old))
    assert parsed.participation == () and parsed.events[0].branch_delta == 0.0
    bad = json.loads(ledger.to_json())
    bad["participation"]["7"] = -1
    with pytest.raises(LedgerError, match="participation"):
        FederationLedger.from_json(json.dumps(bad))
    with pytest.raises(ValueError, match="branch_delta"):
        dataclasses.replace(event, branch_delta=1.5)


def test_distributed_budget_below_one_cohort_against_the_server_is_refused() -> None:
    from fl_app.config.compose import compose_config
    from fl_app.config.errors import ConfigError

    # z = 0.5: one unamplified round alone is far above epsilon 1 against the server.
    with pytest.raises(ConfigError, match=r"privacy\.max_epsilon=1.*against the server"):
        compose_config(
            "config",
            [
                "privacy=distributed",
                "secagg=secaggplus",
                "secagg.bits=16",
                "privacy.noise_multiplier=0.5",
                "privacy.max_epsilon=1",
            ],
        )


def test_gate_bound_holds_for_the_exact_privacy_profile_of_a_small_federation() -> None:
    """N = 4 clients with update +C (1-D, C = 1), Poisson q = 1/2, a secure round needs 3:
    the exact hockey-stick divergence of the released mixtures (abandoned rounds release
    noise on a zero sum) stays within δ_PSG(ε) + η, and exceeds δ_PSG(ε) alone."""
    from dp_accounting.pld import PLDAccountant
    from scipy import stats as st

    q, z, low, others = 0.5, 1.0, 3, 3
    y = np.linspace(-15.0, 20.0, 70_001)
    dy = y[1] - y[0]

    def density(with_x: bool) -> np.ndarray:
        out = np.zeros_like(y)
        for k in range(others + 1):
            p_k = math.comb(others, k) * q**k * (1 - q) ** (others - k)
            for joined, p_x in ((False, 1.0 - q), (True, q)) if with_x else ((False, 1.0),):
                n = k + int(joined)
                mean = float(n) if n >= low else 0.0  # abandoned: noise on a zero sum
                out += p_k * p_x * st.norm.pdf(y, loc=mean, scale=z)
        return out

    without, with_x = density(False), density(True)
    eta = cohort_gate_delta(q, others + 1, low, None)
    assert eta == pytest.approx(q * 3 / 8)  # q·P[Bin(3, 1/2) = 2]
    pld = PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    exceeded = False
    for eps in (0.5, 1.0, 2.0, 3.0):
        exact = max(
            float(np.sum(np.maximum(a - math.exp(eps) * b, 0.0)) * dy)
            for a, b in ((with_x, without), (without, with_x))
        )
        psg = pld.get_delta(eps)
        assert exact <= psg + eta + 1e-6
        exceeded |= exact > psg + 1e-6
    assert exceeded  # the gate is a real cost, not an artefact of the bound


def _unsampled_gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    acc = RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return float(acc.get_epsilon(delta))


def test_participation_of_an_earlier_server_process_is_carried_as_a_bound() -> None:
    """Node ids change when the server process restarts (a Ray restart): counts keyed by
    the old ids cannot be matched, so every client is taken to have been in as many
    cohorts as the most-counted old key. Without the carry a client in 2 cohorts before
    a restart and 1 after was accounted as 1 (ε of one cohort against the server)."""
    event = RoundEvent(1, "poisson", 10, 0.3, 3.0, 1.0, 1.0, 1.0)
    ledger = FederationLedger(1e-5, AccountantName.rdp, (event,))
    ledger = ledger.add_participation(["1", "2"]).add_participation(["1"])
    resumed = ledger.new_participation_session()
    assert resumed.participation == () and resumed.participation_carried == 2
    assert resumed.most_participation() == 2
    (only,) = resumed.server_epsilons().values()
    assert only == pytest.approx(_unsampled_gaussian_epsilon(1.0, 2, 1e-5), rel=1e-6)
    after = resumed.add_participation(["91"])
    assert after.server_epsilons()["91"] == pytest.approx(
        _unsampled_gaussian_epsilon(1.0, 3, 1e-5), rel=1e-6
    )
    # A second restart adds the new process's maximum to the bound.
    assert after.new_participation_session().participation_carried == 3
    # Persisted, and read back; older ledgers (no key) carry nothing; negatives refused.
    again = FederationLedger.from_json(after.to_json())
    assert again == after and again.participation_carried == 2
    assert "participation_carried" not in json.loads(ledger.to_json())
    bad = json.loads(after.to_json())
    bad["participation_carried"] = -1
    with pytest.raises(LedgerError, match="participation_carried"):
        FederationLedger.from_json(json.dumps(bad))


def test_guard_against_the_server_counts_the_carried_participation() -> None:
    event = RoundEvent(5, "poisson", 10, 0.3, 3.0, 1.0, 1.0, 1.0)
    two, three = (_unsampled_gaussian_epsilon(1.0, k, 1e-5) for k in (2, 3))
    guard = BudgetGuard((two + three) / 2, against_server=True)
    ledger = FederationLedger(1e-5, AccountantName.rdp, (dataclasses.replace(event, round=1),))
    ledger = ledger.add_participation(["1"]).add_participation(["1"])
    resumed = ledger.new_participation_session()  # no key counted yet in this process
    verdict = guard.check(resumed, event)
    assert not verdict.allowed and verdict.epsilon_after == pytest.approx(three, rel=1e-6)
    assert guard.check(ledger.add_participation(["2"]), event).allowed is False
    assert guard.check(
        FederationLedger(1e-5, AccountantName.rdp).add_participation(["1"]), event
    ).allowed


def test_resumed_distributed_run_starts_a_participation_session() -> None:
    from fl_app.config.compose import compose_config
    from fl_app.config.plan import resolve
    from strategies.factory import build_aggregator

    cfg = compose_config("config", ["privacy=distributed", "secagg=secaggplus", "secagg.bits=16"])
    event = RoundEvent(1, "poisson", 10, 0.3, 3.0, 1.0, 1.0, 1.0)
    ledger = FederationLedger(1e-5, AccountantName.rdp, (event,)).add_participation(["4", "4"])
    agg = build_aggregator(resolve(cfg), ledger)
    assert agg.ledger.participation == () and agg.ledger.participation_carried == 2

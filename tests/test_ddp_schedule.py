"""privacy.schedule=decay|spend under distributed DP, checked by the clients.

What is checked, each against values worked out independently of the code under test:

* decay: the least z a client accepts per round is z_1 * rate^(t-1) by hand; rounds
  outside the plan are refused; the server's ledger events and the round plan the
  secure round sends carry that z (share_std * sqrt(n_min) / Delta_2), and each event's
  tau is the [KLS] sum at its own z;
* the client's refusal: through the real secure-aggregation protocol (stage handlers of
  real clients), a server that sends a round's z below the schedule gets a structured
  refusal naming privacy.schedule and the round, and nothing is unmasked; at the
  schedule's z the same round is decoded (so the refusal is the schedule check, and a
  client that took the server's z would have released its share);
* spend: the ledger of the planned rounds ends with epsilon against the server within
  1 % below max_epsilon, by an RDP composition written here from [KLS] Eq. (17) and
  converted by dp-accounting; the floor the client recomputes is tight and the server
  never goes below it; a resumed ledger holding an extra release raises z;
* the schedule is pinned for the run (a changed or dropped schedule is refused); the
  budget guard against the server takes every round at the least noise;
* config: distributed DP accepts decay and spend; the dry run prints z and epsilon per
  round.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import compute_epsilon
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fl_app.client.app import app as client_app
from fl_app.client.downgrade import refuse_downgrade
from fl_app.client.refusal import PolicyRefusal, secagg_refusal
from fl_app.client_spec import ClientDpSpec, ClientSpec, DdpScheduleSpec, encode_spec
from fl_app.config.compose import compose_config, compose_plan
from fl_app.config.schema import NoiseSchedule
from fl_app.privacy.ddp_schedule import (
    ScheduleViolation,
    check_round_noise,
    least_noise,
    plan_floor,
    spend_floor,
)
from fl_app.privacy.distributed import RDP_ORDERS, DdpPlan
from fl_app.privacy.history import AccountantName
from fl_app.privacy.ledger import FederationLedger
from fl_app.privacy.round_event import RoundEvent, SamplingScheme
from fl_app.privacy.schedule import decayed_noise
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.secagg.params import GraphMode
from fl_app.secagg.settings import SecAggSettings
from fl_app.server.app import run_experiment
from fl_app.testing.secagg_client import fixed_update_client, grid_exchange
from strategies.budget import BudgetGuard
from strategies.dp_aggregators import DistributedDp
from strategies.dp_projection import projection_lines
from strategies.factory import _round_plan
from strategies.noise_schedule import client_schedule_spec, schedule_lines
from strategies.secagg import SecureAggregation

DELTA = 1e-5


def _spec(**kw: Any) -> DdpScheduleSpec:
    base: dict[str, Any] = dict(
        schedule=NoiseSchedule.decay,
        noise_multiplier=2.0,
        decay_rate=0.5,
        num_rounds=4,
        max_epsilon=None,
        delta=DELTA,
        sample_rate=1.0,
        max_cohort=4,
        dropout_tolerance=0.25,
        beta=math.exp(-0.5),
        overflow_probability=1e-9,
    )
    base.update(kw)
    return DdpScheduleSpec(**base)


_EVENT = RoundEvent(
    round=1,
    sampling=SamplingScheme.poisson,
    population=4,
    sample_rate=1.0,
    cohort=4.0,
    noise_multiplier=1.0,
    clip=1.0,
    update_noise_multiplier=1.0,
    mechanism="ddg",
    ddg_tau=0.0,
    ddg_dimension=1,
)


def _tau_by_hand(z: float, bound: float, n_min: int, n: int) -> float:
    """[KLS] Theorem 1's tau: 10 * sum_{k=1}^{n-1} exp(-2 pi^2 (sigma^2/n_min) k/(k+1))."""
    share_var = (z * bound) ** 2 / n_min
    return 10.0 * sum(math.exp(-2 * math.pi**2 * share_var * k / (k + 1)) for k in range(1, n))


def _rdp_by_hand(order: int, z: float, tau: float, dim: int) -> float:
    """[KLS] Eq. (17), L2 branch, one unsampled round (written here, not imported)."""
    first = order / (2.0 * z * z) + tau * dim
    second = (order / 2.0) * (1.0 / z + math.sqrt(dim) * tau) ** 2
    return min(first, second)


def _server_epsilon_by_hand(events: list[RoundEvent]) -> float:
    """A client in every round: unsampled RDP summed over the events, then dp-accounting."""
    orders = list(RDP_ORDERS)
    rdp = [
        sum(
            _rdp_by_hand(a, e.noise_multiplier, e.ddg_tau or 0.0, e.ddg_dimension or 1)
            for e in events
        )
        for a in orders
    ]
    eps, _ = compute_epsilon(orders, rdp, DELTA)
    return float(eps)


# ------------------------------------------------------------------ decay, by hand
def test_decay_least_noise_is_the_stated_formula_by_hand() -> None:
    spec = _spec()
    ring = dict(clip=1.0, dim=8, bits=16)
    # z_1 = 2, rate 1/2: 2, 1, 1/2, 1/4.
    assert [least_noise(spec, t, **ring) for t in (1, 2, 3, 4)] == [2.0, 1.0, 0.5, 0.25]
    # The client's copy of the formula is the server's (fl_app.privacy.schedule).
    odd = _spec(noise_multiplier=1.7, decay_rate=0.83, num_rounds=9)
    assert [least_noise(odd, t, **ring) for t in range(1, 10)] == [
        decayed_noise(1.7, 0.83, t) for t in range(1, 10)
    ]
    for bad in (0, 5, -1, True):
        with pytest.raises(ScheduleViolation, match=f"round {bad!r} lies outside the 4"):
            least_noise(spec, bad, **ring)
    assert check_round_noise(spec, 3, declared=0.5, **ring) == 0.5
    with pytest.raises(ScheduleViolation, match="round 3") as info:
        check_round_noise(spec, 3, declared=0.49, **ring)
    assert info.value.field == "privacy.schedule"
    with pytest.raises(ScheduleViolation, match="states no schedule"):
        least_noise(_spec(schedule=NoiseSchedule.constant), 1, **ring)


def _small_ring(**kw: Any) -> DdpScheduleSpec:
    """A ring so small (8 bits, one coordinate) that every plan parameter moves tau."""
    base: dict[str, Any] = dict(
        schedule=NoiseSchedule.spend,
        num_rounds=2,
        max_epsilon=60.0,
        max_cohort=4,
        dropout_tolerance=0.25,
        beta=0.5,
        overflow_probability=1e-7,
    )
    base.update(kw)
    return _spec(**base)


def test_spend_floor_by_hand_on_a_small_ring() -> None:
    from fl_app.privacy import ddp_schedule

    ddp_schedule._spend_floor.cache_clear()  # compute it here, not from an earlier test
    spec = _small_ring()
    ring = dict(clip=2.0, dim=1, bits=8)
    floor = spend_floor(spec, **ring)

    def eps(z: float) -> float:
        plan = DdpPlan(
            clip=2.0,
            dim=1,
            bits=8,
            noise_multiplier=z,
            max_cohort=4,
            dropout_tolerance=0.25,
            beta=0.5,
            overflow_probability=1e-7,
        )
        tau = _tau_by_hand(z, plan.bound, 3, 4)  # n_min = ceil(0.75 * 4) = 3
        assert tau * plan.padded > 0.05  # tau matters on this ring
        event = dataclasses.replace(_EVENT, noise_multiplier=z, ddg_tau=tau, ddg_dimension=1)
        return _server_epsilon_by_hand([event, event])

    # The smallest z within the budget, to the search's precision (1e-6 relative).
    assert eps(floor) <= 60.0 < eps(floor * (1 - 1e-6))
    # What the client checks in a spend round is that floor, in every planned round.
    assert least_noise(spec, 1, **ring) == least_noise(spec, 2, **ring) == floor
    assert check_round_noise(spec, 2, declared=floor, **ring) == floor
    with pytest.raises(ScheduleViolation, match=r"round 2: .* privacy\.schedule=spend"):
        check_round_noise(spec, 2, declared=floor * 0.999, **ring)
    with pytest.raises(ScheduleViolation, match=r"^privacy\.schedule=spend states no max_epsilon$"):
        spend_floor(_small_ring(max_epsilon=None), **ring)
    with pytest.raises(ScheduleViolation, match=r"^privacy\.schedule=spend states no max_epsilon$"):
        plan_floor(lambda z: DdpPlan(1.0, 1, 8, z, 4, 0.25), 2, None, DELTA)


def test_spend_floor_stops_at_what_the_ring_holds() -> None:
    from fl_app.privacy import ddp_schedule
    from fl_app.privacy.ddg_encoding import DdpConfigError

    ddp_schedule._spend_floor.cache_clear()
    # A budget so small that no 8-bit ring holds the noise it needs: the floor is the
    # ring's capacity (about 19 here), never the search's cap of 1e4, and the config's
    # plan at it then fails naming secagg.bits.
    spec = _small_ring(max_epsilon=0.05)
    floor = spend_floor(spec, clip=2.0, dim=1, bits=8)
    assert 1.0 < floor < 100.0
    with pytest.raises(DdpConfigError, match=r"secagg\.bits="):
        DdpPlan(2.0, 1, 8, floor, 4, 0.25, beta=0.5, overflow_probability=1e-7)
    DdpPlan(2.0, 1, 8, floor * (1 - 1e-5), 4, 0.25, beta=0.5, overflow_probability=1e-7)


def _decay_settings(rounds: int = 3) -> Any:
    plan = compose_plan(
        "config",
        [
            "privacy=distributed",
            "secagg=secaggplus",
            f"num_rounds={rounds}",
            "privacy.noise_multiplier=2.0",
            "privacy.schedule=decay",
            "privacy.decay_rate=0.5",
        ],
    )
    assert plan.client_dp is not None
    return plan.client_dp


def test_decay_ledger_and_round_plans_carry_the_stated_z_and_its_tau() -> None:
    s = _decay_settings()
    agg = DistributedDp(s)
    population = s.planned_population
    for t, z in zip((1, 2, 3), (2.0, 1.0, 0.5), strict=True):
        assert agg.begin_round(t, population) is None
        event = agg.ledger.events[-1]
        assert event.noise_multiplier == pytest.approx(z, rel=1e-12)
        plan = _round_plan(agg)(t)  # what the factory hands SecureAggregation
        n = plan.max_cohort
        assert event.ddg_tau == pytest.approx(
            _tau_by_hand(z, plan.bound, plan.min_survivors(n), n), rel=1e-9
        )
        rnd = plan.round(n)
        assert rnd.share_std * math.sqrt(rnd.min_survivors) / rnd.bound == pytest.approx(
            z, rel=1e-12
        )
    spec = client_schedule_spec(s)
    assert spec is not None and spec.schedule is NoiseSchedule.decay
    assert (spec.noise_multiplier, spec.decay_rate, spec.num_rounds) == (2.0, 0.5, 3)


# ------------------------------------------------------ the client refuses, for real
UPDATES: dict[int, dict[str, np.ndarray]] = {}


def _config(rnd: int, spec: DdpScheduleSpec) -> ConfigRecord:
    client_spec = ClientSpec(client_dp=ClientDpSpec(ddp_schedule=spec))
    return ConfigRecord({"server-round": rnd, "fl-app.spec": encode_spec(client_spec)})


def _instructions(nodes: list[int], rnd: int, spec: DdpScheduleSpec) -> list[Message]:
    return [
        Message(
            RecordDict({"arrays": ArrayRecord(), "config": _config(rnd, spec)}),
            dst_node_id=node,
            message_type="train",
        )
        for node in nodes
    ]


def _secure_round(server_z: float, rnd: int = 2) -> Any:
    dim, n = 64, 4
    spec = _spec(noise_multiplier=1.0, decay_rate=0.5, num_rounds=3, max_cohort=n)
    plan = DdpPlan(
        clip=1.0, dim=dim, bits=20, noise_multiplier=server_z, max_cohort=n, dropout_tolerance=0.25
    )
    grid = InProcessGrid(fixed_update_client(lambda node: UPDATES[node]), n, seed=rnd)
    rng = np.random.default_rng(0)
    for node in grid.node_ids:
        u = rng.normal(size=dim)
        UPDATES[node] = {"w": (0.5 * u / np.linalg.norm(u)).astype(np.float32)}
    settings = SecAggSettings(
        mode=GraphMode.secaggplus, bits=20, dropout_tolerance=0.25, stage_timeout_s=5.0
    )
    try:
        return SecureAggregation(settings, ddp=plan).run_round(
            rnd=rnd,
            run_id=7,
            instructions=_instructions(grid.node_ids, rnd, spec),
            arrays={"w": np.zeros(dim, np.float32)},
            weighting="uniform",
            bound=1.0,
            exchange=grid_exchange(grid),
        )
    finally:
        grid.close()


def test_a_server_sending_less_noise_than_the_schedule_gets_refused_and_nothing_unmasked() -> None:
    # Round 2 of decay from z_1 = 1 at rate 1/2: the schedule's z is 0.5.
    refused = _secure_round(server_z=0.4)
    assert refused.decoded is None
    assert [int(s.stage) for s in refused.stages] == [1, 2, 3]  # no unmask stage sent
    assert refused.stages[-1].accepted == 0  # no masked input left any client
    # At the schedule's own z the very same round is decoded: the refusal above is the
    # schedule check (a client trusting the server's z would have sent its share).
    accepted = _secure_round(server_z=0.5)
    assert accepted.decoded is not None, accepted.note
    assert accepted.num_contributors == 4


def test_the_refusal_is_structured_and_names_the_schedule_and_the_round() -> None:
    from fl_app.privacy.ddg_encoding import DdpRound
    from fl_app.secagg.client.masked_input import _check_schedule
    from fl_app.secagg.client.state import SecAggStageError

    spec = _spec(noise_multiplier=1.0, decay_rate=0.5, num_rounds=3)
    plan = DdpPlan(
        clip=1.0, dim=8, bits=16, noise_multiplier=0.3, max_cohort=4, dropout_tolerance=0.25
    )
    ddp = DdpRound.from_json(plan.round(4).to_json())
    config = _config(3, spec)
    with pytest.raises(SecAggStageError) as info:  # round 3 needs 0.25, gets 0.24
        _check_schedule(config, dataclasses.replace(ddp, share_std=ddp.share_std * 0.8))
    err = info.value
    assert err.field == "privacy.schedule" and "round 3" in str(err)
    refusal = secagg_refusal(err)
    assert isinstance(refusal, PolicyRefusal) and refusal.field == "privacy.schedule"
    _check_schedule(config, ddp)  # 0.3 >= 0.25: accepted
    with pytest.raises(SecAggStageError, match=r"^client spec refused: client spec is not"):
        _check_schedule(ConfigRecord({"server-round": 3, "fl-app.spec": "{"}), ddp)
    # spend: the floor of the round's own ring (clip, dimension, bits of the parameters).
    ring = _small_ring()
    floor = spend_floor(ring, clip=2.0, dim=1, bits=8)
    at = DdpPlan(2.0, 1, 8, floor, 4, 0.25, beta=0.5, overflow_probability=1e-7).round(4)
    _check_schedule(_config(1, ring), at)
    with pytest.raises(SecAggStageError, match="round 1") as info:
        _check_schedule(_config(1, ring), dataclasses.replace(at, share_std=at.share_std * 0.999))
    assert info.value.field == "privacy.schedule"
    # No spec, or a spec without a schedule: nothing to check (constant noise).
    _check_schedule(ConfigRecord({"server-round": 3}), ddp)


# ------------------------------------------------------------------ spend, by hand
def _spend_settings(max_epsilon: float, rounds: int = 4) -> Any:
    plan = compose_plan(
        "config",
        [
            "privacy=distributed",
            "secagg=secaggplus",
            f"num_rounds={rounds}",
            "privacy.schedule=spend",
            "privacy.noise_multiplier=null",
            "privacy.target_epsilon=null",
            f"privacy.max_epsilon={max_epsilon}",
        ],
    )
    assert plan.client_dp is not None
    return plan.client_dp


def test_spend_ends_within_one_percent_below_max_epsilon_against_the_server() -> None:
    s = _spend_settings(12.0)
    agg = DistributedDp(s, budget=BudgetGuard(12.0, against_server=True))
    spec = client_schedule_spec(s)
    assert spec is not None
    assert s.distributed is not None
    floor = spend_floor(spec, clip=s.clip, dim=s.distributed.dim, bits=s.distributed.bits)
    nodes = [str(i) for i in range(s.planned_population)]
    for t in range(1, s.num_rounds + 1):
        assert agg.begin_round(t, s.planned_population) is None
        agg.federation.note_cohort(t, [int(n) for n in nodes])  # everyone, every round
        assert agg.ledger.events[-1].noise_multiplier >= floor  # what the clients accept
    events = list(agg.ledger.events)
    independent = _server_epsilon_by_hand(events)
    assert 0.99 * 12.0 <= independent <= 12.0
    assert agg.status()["dp_epsilon_server_max"] == pytest.approx(independent, rel=1e-6)
    # The DDG bound is never below the Gaussian's at the same z (dp-accounting's own).
    acc = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    for e in events:
        acc.compose(dp_accounting.GaussianDpEvent(e.noise_multiplier))
    assert acc.get_epsilon(DELTA) <= independent
    # The floor is tight: 0.1 % less noise over the planned rounds overruns the budget.
    z = floor * 0.999
    plan = s.distributed.at(z)
    tighter = dataclasses.replace(events[0], noise_multiplier=z, ddg_tau=plan.tau)
    assert _server_epsilon_by_hand([tighter] * s.num_rounds) > 12.0


def test_spend_resumed_with_an_extra_release_raises_z_and_ends_at_the_budget() -> None:
    s = _spend_settings(12.0)
    everyone = list(range(s.planned_population))
    first = DistributedDp(s, budget=BudgetGuard(12.0, against_server=True))
    for t in (1, 2):
        assert first.begin_round(t, s.planned_population) is None
        first.federation.note_cohort(t, everyone)
    floor = first.ledger.events[0].noise_multiplier
    # A resumed run redoing round 2: the ledger holds three releases (every client in
    # each) before round 3, and the new server process carries the count as a bound.
    ledger = first.ledger.add(dataclasses.replace(first.ledger.events[-1], round=3))
    ledger = ledger.add_participation([str(n) for n in everyone]).new_participation_session()
    resumed = DistributedDp(s, ledger, BudgetGuard(12.0, against_server=True))
    resumed.federation.continue_after(2, 1)
    for t in (3, 4):
        assert resumed.begin_round(t, s.planned_population) is None  # the guard agrees
        resumed.federation.note_cohort(t, everyone)
    later = [e.noise_multiplier for e in resumed.ledger.events[3:]]
    assert all(z > floor * 1.01 for z in later)
    # A client in all five releases: within 1 % below the budget, by hand.
    assert 0.99 * 12.0 <= _server_epsilon_by_hand(list(resumed.ledger.events)) <= 12.0


def test_spend_floor_is_what_the_config_plans_and_the_dry_run_prints() -> None:
    s = _spend_settings(12.0)
    lines = schedule_lines(s)
    assert lines[0].startswith("noise schedule (spend)") and "against the server" in lines[0]
    assert len(lines) == 1 + s.num_rounds
    assert lines[-1].startswith(f"  round {s.num_rounds}: z={s.noise_multiplier:.4g}")
    decay = schedule_lines(_decay_settings())
    assert [ln.split(",")[0] for ln in decay[1:]] == [
        "  round 1: z=2",
        "  round 2: z=1",
        "  round 3: z=0.5",
    ]


def test_dry_run_of_a_decayed_run_with_a_budget_stops_where_the_guard_would() -> None:
    plan = compose_plan(
        "config",
        [
            "privacy=distributed",
            "secagg=secaggplus",
            "num_rounds=5",
            "privacy.noise_multiplier=1.0",
            "privacy.schedule=decay",
            "privacy.decay_rate=0.8",
            "privacy.max_epsilon=20",
        ],
    )
    s = plan.client_dp
    assert s is not None
    events = s.planned_events()
    # Everyone in every round (10 of 10): by hand, rounds 1-4 fit in 20 and round 5 not.
    assert _server_epsilon_by_hand(events[:4]) <= 20.0 < _server_epsilon_by_hand(events)
    lines = projection_lines(s)
    assert any(ln.startswith("noise schedule (decay)") for ln in lines)
    assert any("round 5: z=0.4096 would take epsilon" in ln for ln in lines)
    assert any("allows one client 4 cohorts" in ln for ln in lines)


def test_a_decayed_run_through_the_real_client_app(tmp_path: Path) -> None:
    """Every client checks, pins and runs each round's stated z; the ledger records it."""
    cfg = compose_config(
        "config",
        [
            "runtime=inprocess",
            "federated_eval_every=0",
            "privacy=distributed",
            "secagg=secaggplus",
            "secagg.bits=16",
            "secagg.stage_timeout_s=5",
            "num_rounds=2",
            "privacy.noise_multiplier=0.6",
            "privacy.schedule=decay",
            "privacy.decay_rate=0.5",
        ],
    )
    grid = InProcessGrid(client_app, cfg.dataset.num_partitions, seed=cfg.seed)
    try:
        summary = run_experiment(grid, cfg, tmp_path / "run", progress=False)
    finally:
        grid.close()
    assert summary["status"] == "completed"
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["secagg_contributors"] for r in lines] == [10, 10]
    ledger = FederationLedger.from_json((tmp_path / "run" / "privacy_ledger.json").read_text())
    assert [e.noise_multiplier for e in ledger.events] == [0.6, 0.3]  # 0.6 * 0.5^(t-1)
    # The sum's noise in model units is z * gamma * Delta_2 of each round's own ring.
    for line, z in zip(lines, (0.6, 0.3), strict=True):
        plan = DdpPlan(1.0, 4810, 16, z, 10, 0.2)
        assert line["dp_noise_std_sum"] == pytest.approx(z * plan.gamma * plan.bound, rel=1e-9)
        assert line["ddp_gamma"] == pytest.approx(plan.gamma, rel=1e-12)


# -------------------------------------------------------------------- pin, guard
def test_the_schedule_is_pinned_for_the_run() -> None:
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    secure = type("Secure", (), {"ddp": object()})()

    def spec(schedule: DdpScheduleSpec | None) -> ClientSpec:
        return ClientSpec(run_key="r", client_dp=ClientDpSpec(ddp_schedule=schedule))

    refuse_downgrade(ctx, spec(_spec()), "train", secure, False)
    refuse_downgrade(ctx, spec(_spec()), "train", secure, False)  # the same: fine
    for other, word in ((_spec(decay_rate=0.9), "another"), (None, "none")):
        with pytest.raises(PolicyRefusal) as info:
            refuse_downgrade(ctx, spec(other), "train", secure, False)
        assert info.value.field == "privacy.schedule"
        assert str(info.value) == (
            "site policy `privacy.schedule`: this run's distributed-DP noise schedule was "
            f"stated at its start and this instruction states {word} (the client checks "
            "each round's noise against the first), refused"
        )
    # A distributed-DP spec without client-level DP settings states no schedule.
    refuse_downgrade(ctx, ClientSpec(run_key="t", client_dp=None), "train", secure, False)
    # Another run key starts unpinned.
    refuse_downgrade(ctx, ClientSpec(run_key="s", client_dp=ClientDpSpec()), "train", secure, False)
    # ... and pins "none": a run that began with constant noise cannot take a schedule later.
    later = ClientSpec(run_key="s", client_dp=ClientDpSpec(ddp_schedule=_spec()))
    with pytest.raises(PolicyRefusal, match="this instruction states another"):
        refuse_downgrade(ctx, later, "train", secure, False)


def test_guard_against_the_server_takes_every_round_at_the_least_noise() -> None:
    def event(rnd: int, z: float) -> RoundEvent:
        return RoundEvent(
            round=rnd,
            sampling=SamplingScheme.poisson,
            population=10,
            sample_rate=0.5,
            cohort=5.0,
            noise_multiplier=z,
            clip=1.0,
            update_noise_multiplier=z,
        )

    ledger = FederationLedger(DELTA, AccountantName.rdp).add(event(1, 0.8))
    ledger = ledger.add_participation(["a"])
    verdict = BudgetGuard(100.0, against_server=True).check(ledger, event(2, 3.0))
    # dp-accounting at Opacus' default orders (the ledger's RDP accountant is Opacus').
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    least = dp_accounting.rdp.RdpAccountant(orders)
    least.compose(dp_accounting.GaussianDpEvent(0.8), 2)  # both rounds at the least z
    assert verdict.epsilon_after == pytest.approx(least.get_epsilon(DELTA), rel=1e-3)
    planned = dp_accounting.rdp.RdpAccountant(orders)
    planned.compose(dp_accounting.GaussianDpEvent(3.0), 2)  # the old guard: planned z only
    assert planned.get_epsilon(DELTA) < 0.5 * verdict.epsilon_after

"""Issue 17 leftovers on the server: one node per site identity; no round spent on a
DP-SGD budget every client would refuse (strategies/site_claims.py,
strategies/dpsgd_forecast.py, their use in strategies/driver.py).

Expected ε values come from dp-accounting's RDP accountant, independently of the
forecast's code path (fl_app.privacy.accounting).
"""

from __future__ import annotations

import math
from typing import Any

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fl_app.config.client_dp import ClientDpSettings
from fl_app.config.schema import ClipSide, PrivacyMode
from fl_app.privacy.history import AccountantName
from fl_app.privacy.round_event import SamplingScheme
from fl_app.protocol import METRICS_KEY, NUM_EXAMPLES, SERVER_ROUND, UPDATE_KEY
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.weights import to_array_record
from strategies.dp_aggregators import CentralDp
from strategies.dpsgd_forecast import DpSgdForecast
from strategies.driver import RoundDriver
from strategies.driver_types import DriverSettings
from strategies.local_dp import LocalDp
from strategies.sampling import FixedSizeSampler
from strategies.site_claims import SiteClaims

GLOBAL = {"w": np.zeros((2, 2), dtype=np.float32)}
DELTA = 1e-5
Z, Q, STEPS = 1.0, 0.05, 10  # one round: 10 Poisson-sampled steps at q = 0.05, z = 1


def _rdp_epsilon(steps: int) -> float:
    acc = RdpAccountant()
    event = dpa.PoissonSampledDpEvent(Q, dpa.GaussianDpEvent(Z))
    acc.compose(dpa.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(DELTA))


def _app(public: dict[int, dict[str, float]], sent: list[int] | None = None) -> ClientApp:
    """Clients whose updates are Δ = pid + 1 (n = 1) and who report ``public[pid]``;
    ``sent`` records the round of every instruction received."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"][SERVER_ROUND])
        if sent is not None:
            sent.append(rnd)
        update = {
            k: np.full(v.numpy().shape, pid + 1.0, np.float32)
            for k, v in msg.content["arrays"].items()
        }
        metrics = {NUM_EXAMPLES: 1, SERVER_ROUND: rnd, **public.get(pid, {})}
        content = RecordDict(
            {UPDATE_KEY: to_array_record(update), METRICS_KEY: MetricRecord(metrics)}
        )
        return Message(content, reply_to=msg)

    return app


def _driver(rounds: int, min_replies: int = 1, aggregator: Any = None) -> RoundDriver:
    return RoundDriver(
        FedAvg(fraction_train=1.0, min_train_nodes=0, min_available_nodes=0),
        train_sampler=FixedSizeSampler(1.0, seed=3),
        evaluate_sampler=None,
        settings=DriverSettings(
            num_rounds=rounds,
            min_train_replies=min_replies,
            train_timeout_s=0.5,
            evaluate_timeout_s=0.5,
        ),
        aggregator=aggregator,
    )


# ------------------------------------------------------------------ site identity
def test_site_claims_first_holder_keeps_the_identity_while_connected() -> None:
    claims = SiteClaims()
    site = {"dp-site-hash": float(0xABCDEF012345)}
    assert claims.check(7, site, {7, 9}) is None
    assert claims.check(7, site, {7, 9}) is None  # the holder again
    reason = claims.check(9, site, {7, 9})
    assert reason is not None
    assert "abcdef012345" in reason and "node 7" in reason and "node 9" in reason
    assert reason.endswith(
        "(two SuperNodes configured with the same site-name?): give each site its own name "
        "(fl-app deploy node-config)"
    )
    # Another site, and a reply with no identity (simulation, plain modes), pass.
    assert claims.check(9, {"dp-site-hash": 5.0}, {7, 9}) is None
    assert claims.check(11, {}, {7, 9, 11}) is None


def test_site_claims_pass_to_a_new_node_when_the_holder_is_gone() -> None:
    claims = SiteClaims()
    site = {"dp-site-hash": 42.0}
    assert claims.check(7, site, {7}) is None
    # A SuperNode restart: the site comes back under node 8, node 7 is gone.
    assert claims.check(8, site, {8}) is None
    # Node 7 reappearing with the same identity is now the second claimant.
    assert claims.check(7, site, {7, 8}) is not None


def test_site_claims_refuse_a_non_finite_identity() -> None:
    assert SiteClaims().check(1, {"dp-site-hash": math.nan}, {1}) is not None


# dp-site-hash values: integers in [0, 2**48) only (48 bits stay exact in a float64).
_SITE_VALUES = [
    (0.0, 0),
    (float(2**48 - 1), 2**48 - 1),
    (7, 7),
    (float(2**48), None),
    (-1.0, None),
    (1.5, None),
    (math.inf, None),
    (math.nan, None),
    (True, None),
    ("7", None),
]


@pytest.mark.parametrize("index", range(len(_SITE_VALUES)))
def test_site_hash_values_follow_one_rule_for_the_check_and_the_local_dp_key(index: int) -> None:
    from strategies.local_dp import LocalReleaseCount
    from strategies.site_claims import parse_site_hash
    from strategies.validation import TrainReply

    value, expected = _SITE_VALUES[index]
    assert parse_site_hash(value) == expected
    reason = SiteClaims().check(3, {"dp-site-hash": value}, {3})  # type: ignore[dict-item]
    if expected is None:
        assert reason == f"dp-site-hash is not an integer in [0, 2**48): {value!r}"
    else:
        assert reason is None
    if isinstance(value, float):
        reply = TrainReply(3, {}, 1.0, {"dp-site-hash": value}, 0.0)
        key = LocalReleaseCount.site_key(reply)
        assert key == (None if expected is None else f"site-{expected:012x}")


def test_a_node_presenting_a_second_identity_is_refused_and_the_contest_recorded() -> None:
    claims = SiteClaims()
    assert claims.check(5, {"dp-site-hash": float(0xA)}, {5, 6}) is None
    reason = claims.check(5, {"dp-site-hash": float(0xB)}, {5, 6})
    assert reason == (
        "node 5 presents site identity 00000000000b but holds 00000000000a in this run: "
        "a node serves one site"
    )
    assert claims.check(5, {"dp-site-hash": float(0xA)}, {5, 6}) is None  # its own
    assert claims.check(6, {"dp-site-hash": float(0xB)}, {5, 6}) is None  # B's own node
    assert claims.check(7, {"dp-site-hash": float(0xA)}, {5, 6, 7}) is not None
    assert claims.contested() == {"00000000000a": [7], "00000000000b": [5]}


def test_driver_rejects_the_second_node_presenting_a_site_identity() -> None:
    shared = {"dp-site-hash": 123456.0}
    grid = InProcessGrid(_app({0: shared, 1: {"dp-site-hash": 99.0}, 2: shared}), 3, seed=1)
    nodes = grid.node_ids
    result = _driver(rounds=2).run(grid, GLOBAL)
    holders = []
    for report in result.reports:
        t = report.train
        assert (t.sampled, t.accepted, len(t.rejected)) == (3, 2, 1)
        ((rejected, reason),) = t.rejected
        assert rejected in (nodes[0], nodes[2])
        holder = nodes[2] if rejected == nodes[0] else nodes[0]
        assert f"node {holder}" in reason and f"node {rejected}" in reason
        holders.append(holder)
        assert report.model_updated  # the round goes on with the rest
    assert holders[0] == holders[1]  # the holder keeps the identity across rounds
    # The contest is in the result (summary.json), not only in the log.
    assert result.contested_sites == {f"{123456:012x}": sorted(set(nodes) - {holders[0], nodes[1]})}
    # Each round adds the mean of the two accepted updates (n = 1 each).
    kept = [pid for pid, node in enumerate(nodes) if node in (holders[0], nodes[1])]
    np.testing.assert_allclose(result.arrays["w"], 2 * np.mean([p + 1 for p in kept]))


def test_a_forged_site_identity_does_not_move_the_victims_local_dp_count() -> None:
    """Node 1 presents its own identity in round 1, then the victim's (node 0's): its
    replies are refused for the identity before the local-DP count sees them, so the
    victim's count stays its own and each of its replies is accepted."""
    victim, own = float(0xA), float(0xB)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"][SERVER_ROUND])
        site = victim if pid == 0 or rnd > 1 else own
        update = {
            k: np.zeros(v.numpy().shape, np.float32) for k, v in msg.content["arrays"].items()
        }
        # Each client counts its own releases: round r is its r-th.
        metrics = {
            NUM_EXAMPLES: 1,
            SERVER_ROUND: rnd,
            "dp-site-hash": site,
            "dp-local-releases": rnd,
        }
        content = RecordDict(
            {UPDATE_KEY: to_array_record(update), METRICS_KEY: MetricRecord(metrics)}
        )
        return Message(content, reply_to=msg)

    agg = LocalDp(
        ClientDpSettings(
            mode=PrivacyMode.local,
            clip_side=ClipSide.client,
            clipping="fixed",
            noise_multiplier=2.0,
            clip=1.0,
            delta=DELTA,
            accountant=AccountantName.rdp,
            sampling=SamplingScheme.fixed,
            fraction=1.0,
            num_rounds=3,
            planned_population=2,
            seed=7,
            secure_mode=False,
        )
    )
    grid = InProcessGrid(app, 2, seed=1)
    nodes = grid.node_ids
    result = _driver(rounds=3, aggregator=agg).run(grid, GLOBAL)
    assert [r.train.accepted for r in result.reports] == [2, 1, 1]
    for report in result.reports[1:]:
        ((rejected, reason),) = report.train.rejected
        assert rejected == nodes[1] and "holds 00000000000b" in reason
    assert dict(agg.ledger.local) == {"site-00000000000a": 3, "site-00000000000b": 1}
    assert result.contested_sites == {"00000000000a": [nodes[1]]}


# ------------------------------------------------------------- DP-SGD budget stop
def _reported(rounds: int) -> dict[str, float]:
    """A DP-SGD client's public metrics after ``rounds`` rounds of STEPS steps."""
    return {
        "dp-epsilon": _rdp_epsilon(rounds * STEPS),
        "dp-steps": rounds * STEPS,
        "dp-rounds": rounds,
        "dp-sample-rate": Q,
        "dp-noise-multiplier": Z,
    }


def test_forecast_is_epsilon_after_one_more_round() -> None:
    one, two = _rdp_epsilon(STEPS), _rdp_epsilon(2 * STEPS)
    forecast = DpSgdForecast(max_epsilon=math.sqrt(one * two), delta=DELTA, accountant="rdp")
    got = forecast.epsilon_after_next_round(_reported(1))
    assert got == pytest.approx(two, rel=1e-3)
    # The budget lies between one and two rounds: the client would refuse round 2.
    assert forecast.refusing([1, 2], {1: _reported(1), 2: {}}) == {1}
    # Hidden mode (secure aggregation, local DP): only epsilon and rounds are public.
    hidden = {"dp-epsilon": one, "dp-rounds": 1.0}
    assert forecast.epsilon_after_next_round(hidden) is None
    # Steps that are not a whole number of equal rounds: not the history it assumes.
    assert forecast.epsilon_after_next_round({**_reported(2), "dp-steps": 21}) is None
    assert forecast.epsilon_after_next_round({**_reported(1), "dp-rounds": 0}) is None
    # With enough=1 the unspent node 2 settles it: node 1 is never forecast.
    assert forecast.refusing([1, 2], {1: _reported(1), 2: {}}, enough=1) == set()


def test_forecast_boundaries() -> None:
    # One step a round is a history too: ε after round 2 is that of 2 steps.
    one_step = {**_reported(1), "dp-steps": 1, "dp-rounds": 1}
    forecast = DpSgdForecast(max_epsilon=1.0, delta=DELTA, accountant="rdp")
    got = forecast.epsilon_after_next_round(one_step)
    assert got is not None and got == pytest.approx(_rdp_epsilon(2), rel=1e-3)
    # A client refuses only past its budget (plan_round: eps_after > max_epsilon).
    exact = forecast.epsilon_after_next_round(_reported(1))
    assert exact is not None
    at_budget = DpSgdForecast(max_epsilon=exact, delta=DELTA, accountant="rdp")
    assert at_budget.refusing([1], {1: _reported(1)}) == set()
    # enough=2: one unspent node is not enough, so the spent one is looked at.
    over = DpSgdForecast(max_epsilon=_rdp_epsilon(STEPS), delta=DELTA, accountant="rdp")
    assert over.refusing([1, 2], {1: _reported(1)}, enough=2) == {1}
    assert over.refusing([1, 2, 3], {1: _reported(1)}, enough=2) == set()


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_forecast_refuses_a_budget_that_is_not_positive_and_finite(bad: float) -> None:
    with pytest.raises(ValueError, match=r"privacy\.dpsgd\.max_epsilon must be finite and > 0"):
        DpSgdForecast(max_epsilon=bad, delta=DELTA, accountant="rdp")
    assert DpSgdForecast(max_epsilon=0.5, delta=DELTA, accountant="rdp").max_epsilon == 0.5


def test_driver_stops_before_a_round_every_client_would_refuse() -> None:
    one, two = _rdp_epsilon(STEPS), _rdp_epsilon(2 * STEPS)
    sent: list[int] = []
    grid = InProcessGrid(_app({pid: _reported(1) for pid in range(3)}, sent), 3, seed=1)
    driver = _driver(rounds=3)
    driver.budget_forecast = DpSgdForecast(math.sqrt(one * two), DELTA, "rdp")
    result = driver.run(grid, GLOBAL)
    assert [r.server_round for r in result.reports] == [1]
    assert result.stopped_early is not None
    assert result.stopped_early.startswith("before round 2: only 0 clients")
    assert "3 of them" in result.stopped_early
    assert result.exhausted == set(grid.node_ids)
    assert sent == [1, 1, 1]  # no instruction of round 2 left the server


def test_driver_runs_a_round_some_clients_can_still_train() -> None:
    one, two = _rdp_epsilon(STEPS), _rdp_epsilon(2 * STEPS)
    # Partition 2 reports half the spend rate (q/2): it can afford round 2.
    public = {0: _reported(1), 1: _reported(1), 2: {**_reported(1), "dp-sample-rate": Q / 2}}
    grid = InProcessGrid(_app(public), 3, seed=1)
    driver = _driver(rounds=2)
    driver.budget_forecast = DpSgdForecast(math.sqrt(one * two), DELTA, "rdp")
    result = driver.run(grid, GLOBAL)
    assert [r.server_round for r in result.reports] == [1, 2]
    assert not result.stopped_early


def test_a_forecast_stop_leaves_no_ledger_event_for_the_round_not_run() -> None:
    """Client-level central DP beside DP-SGD: the federation's ledger records a round
    when it begins; a round stopped by the forecast never begins, so ε stays that of
    the rounds released."""
    one, two = _rdp_epsilon(STEPS), _rdp_epsilon(2 * STEPS)
    settings = ClientDpSettings(
        mode=PrivacyMode.central,
        clip_side=ClipSide.server,
        clipping="fixed",
        noise_multiplier=1.3,
        clip=1.0,
        delta=DELTA,
        accountant=AccountantName.rdp,
        sampling=SamplingScheme.fixed,
        fraction=1.0,
        num_rounds=3,
        planned_population=3,
        seed=7,
        secure_mode=False,
    )
    agg = CentralDp(settings)
    sent: list[int] = []
    grid = InProcessGrid(_app({pid: _reported(1) for pid in range(3)}, sent), 3, seed=1)
    driver = _driver(rounds=3, aggregator=agg)
    driver.budget_forecast = DpSgdForecast(math.sqrt(one * two), DELTA, "rdp")
    result = driver.run(grid, GLOBAL)
    assert [r.server_round for r in result.reports] == [1] and sent == [1, 1, 1]
    (event,) = agg.ledger.events
    assert event.round == 1


def _secure_round(
    site_by_index: list[float], corrupt: int | None = None
) -> tuple[Any, list[int], list[int]]:
    """One secure-aggregation round of four clients (update 0.25 each) whose masked
    inputs carry ``dp-site-hash`` ``site_by_index[i]``; client ``corrupt`` adds a
    second array to its masked record (an unparsable payload). Returns the outcome,
    the node ids and the nodes the site check was asked about, in order."""
    from flwr.app import Array

    from fl_app.secagg import wire
    from fl_app.secagg.client import MaskedInputStage, handle_key_stage, secagg_stage
    from fl_app.secagg.params import GraphMode
    from fl_app.secagg.settings import SecAggSettings
    from fl_app.testing.secagg_client import grid_exchange, train_instructions
    from strategies.secagg import SecureAggregation

    app = ClientApp()
    sites: dict[int, float] = {}
    bad: set[int] = set()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        stage = secagg_stage(msg)
        if stage != 3:
            return handle_key_stage(msg, context, stage, None)
        secure = MaskedInputStage.from_instruction(msg, context, None)
        update = {"w": np.full(4, 0.25, np.float32)}
        encoded = secure.encode(update, num_examples=1.0, loss=0.0, accuracy=0.0, unclipped=0.0)
        reply = secure.reply(msg, secure.mask(encoded, context))
        reply.content[METRICS_KEY]["dp-site-hash"] = sites[int(context.node_id)]
        if int(context.node_id) in bad:
            reply.content.array_records[wire.SECAGG_MASKED_KEY]["extra"] = Array(np.zeros(1))
        return reply

    grid = InProcessGrid(app, 4, seed=3)
    asked: list[int] = []
    try:
        nodes = grid.node_ids
        sites.update(zip(nodes, site_by_index, strict=True))
        if corrupt is not None:
            bad.add(nodes[corrupt])
        claims = SiteClaims()
        secagg = SecureAggregation(
            SecAggSettings(mode=GraphMode.secagg, clip=1.0, dropout_tolerance=0.25)
        )

        def check(node: int, m: Any) -> str | None:
            asked.append(node)
            return claims.check(node, m, set(nodes))

        secagg.public_check = check
        out = secagg.run_round(
            rnd=1,
            run_id=1,
            instructions=train_instructions(list(nodes), 1),
            arrays={"w": np.zeros(4, np.float32)},
            weighting="uniform",
            bound=1.0,
            exchange=grid_exchange(grid),
        )
    finally:
        grid.close()
    return out, list(nodes), asked


def test_secure_round_drops_the_masked_input_of_a_second_site_claimant() -> None:
    """Under secure aggregation the duplicate's masked input is not fed to the session:
    a stage-3 dropout, whose masks unmasking removes, so the sum holds the others."""
    out, nodes, _ = _secure_round([7.0, 8.0, 7.0, 9.0])
    assert out.decoded is not None, out.note
    assert out.num_contributors == 3
    np.testing.assert_allclose(out.decoded.update["w"], np.full(4, 0.75), atol=1e-3)
    (rejected,) = [r for r in out.rejected if "site identity" in r.reason]
    holder = nodes[2] if rejected.node_id == nodes[0] else nodes[0]
    assert rejected.node_id in (nodes[0], nodes[2])
    assert f"node {holder}" in rejected.reason and rejected.node_id not in out.client_metrics


def test_secure_round_claims_no_identity_for_an_unparsable_masked_input() -> None:
    """A masked input whose payload does not parse is rejected before the site check:
    it claims nothing, so the site's own node (same identity) is accepted."""
    out, nodes, asked = _secure_round([7.0, 8.0, 7.0, 9.0], corrupt=0)
    assert sorted(asked) == sorted(nodes[1:])
    assert out.decoded is not None, out.note
    assert out.num_contributors == 3
    np.testing.assert_allclose(out.decoded.update["w"], np.full(4, 0.75), atol=1e-3)
    ((rejected, reason),) = [(r.node_id, r.reason) for r in out.rejected]
    assert rejected == nodes[0] and "masked record must hold exactly" in reason

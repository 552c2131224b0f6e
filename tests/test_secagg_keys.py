"""Key pairs advertised ahead: stage 1 once per ``secagg.key_rounds`` rounds, never a reused key.

Guarantees stated here (through :class:`~strategies.secagg.SecureAggregation` and the
ClientApp's real stage handlers on the in-process Grid):

* a client that advertised a pair for the round skips stage 1; a round whose whole
  cohort did so has no stage-1 exchange (3 exchanges), and its sum is still exact;
* ``key_rounds=1`` exchanges fresh keys in every round; a batch never reaches past
  the last round, and after the last round no key and no round secret is left;
* each round's pair is used once: a replayed share-keys instruction is refused, and
  the store holds only pairs of rounds still to come;
* a node that failed, and every node after a server restart, advertises again;
* malformed stage-1 instructions and replies are refused with a reason;
* share-ahead: the next round's stage 2 rides on this round's unmask exchange when its
  whole cohort survived and holds keys (two exchanges a round), sums stay exact (fixed
  point and distributed DP), and any mismatch, dropout or malformed part falls back to
  the full stages without losing the round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fl_app.client.policy import SitePolicy
from fl_app.protocol import CONFIG_KEY, SERVER_ROUND
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.secagg.client import (
    KEYS_STATE_KEY,
    PROGRESS_STATE_KEY,
    STATE_KEY,
    SecAggStageError,
    handle_key_stage,
)
from fl_app.secagg.params import GraphMode
from fl_app.secagg.settings import SecAggSettings
from fl_app.secagg.wire import (
    SECAGG_KEY_ROUNDS,
    SECAGG_KEYS,
    SECAGG_NEXT_KEY,
    SECAGG_RECORD_KEY,
    SECAGG_REPLY_C_PK,
    SECAGG_REPLY_NODES,
    SECAGG_STAGE_KEY,
)
from fl_app.testing.secagg_client import fixed_update_client, grid_exchange, train_instructions
from strategies.secagg import SecAggOutcome, SecureAggregation

N = 10
DIM = 257
UPDATES: dict[int, dict[str, np.ndarray]] = {}


@pytest.fixture
def grid() -> Any:
    # No distributed-DP noise floor: the share-ahead DDP case checks exactness with
    # negligible noise (z = 1e-4), which the sites' default floor (z >= 0.25) refuses.
    lax = SitePolicy(ddp_min_noise_multiplier=None)
    g = InProcessGrid(fixed_update_client(lambda node: UPDATES[node], policy=lax), N, seed=3)
    rng = np.random.default_rng(3)
    UPDATES.clear()
    for node in g.node_ids:
        u = rng.normal(size=DIM)
        UPDATES[node] = {"w": (u / np.linalg.norm(u) * 0.9).astype(np.float32)}
    yield g
    g.close()


class Recorder:
    """The grid's exchange, recording each exchange's stage and its sent instructions."""

    def __init__(self, grid: InProcessGrid) -> None:
        self.inner = grid_exchange(grid)
        self.stages: list[int] = []
        self.sent: dict[int, list[Message]] = {}
        self.tamper: Callable[[Message], None] | None = None
        self.edit: Callable[[Message], None] | None = None

    def __call__(self, messages: list[Message], timeout: float) -> Any:
        stage = int(messages[0].content.config_records[CONFIG_KEY][SECAGG_STAGE_KEY])
        self.stages.append(stage)
        self.sent[stage] = messages
        if self.edit is not None and stage == 4:
            for msg in messages:
                self.edit(msg)
        sent, replies, ids = self.inner(messages, timeout)
        if self.tamper is not None and stage in (1, 4):
            for reply in replies:
                self.tamper(reply)
        return sent, replies, ids


def _round(
    server: SecureAggregation,
    grid: InProcessGrid,
    rnd: int,
    ex: Recorder,
    last_round: int,
    next_cohort: Callable[[set[int]], list[int] | None] | None = None,
) -> SecAggOutcome:
    ex.stages = []
    return server.run_round(
        rnd=rnd,
        run_id=7,
        instructions=train_instructions(grid.node_ids, rnd),
        arrays={"w": np.zeros(DIM, np.float32)},
        weighting="uniform",
        bound=1.0,
        exchange=ex,
        last_round=last_round,
        next_cohort=next_cohort,
    )


def _assert_exact(out: SecAggOutcome, nodes: list[int]) -> None:
    assert out.decoded is not None, out.note
    assert out.num_contributors == len(nodes)
    exact = np.sum([UPDATES[v]["w"].astype(np.float64) for v in nodes], axis=0)
    # 32-bit fixed point over a bound of 1 for 10 clients: resolution ~1e-8 a coordinate.
    np.testing.assert_allclose(out.decoded.update["w"], exact, rtol=0, atol=1e-6)


def _stored_rounds(grid: InProcessGrid, node: int) -> list[int]:
    record = grid.context(node).state.get(KEYS_STATE_KEY)
    return [] if record is None else sorted(int(k[1:]) for k in record)


def _settings(key_rounds: int = 16) -> SecAggSettings:
    return SecAggSettings(mode=GraphMode.secaggplus, key_rounds=key_rounds, stage_timeout_s=5.0)


def test_rounds_after_the_first_skip_stage_one_and_stay_exact(grid: InProcessGrid) -> None:
    server, ex = SecureAggregation(_settings()), Recorder(grid)
    for rnd in range(1, 5):
        out = _round(server, grid, rnd, ex, last_round=4)
        _assert_exact(out, grid.node_ids)
        assert ex.stages == ([1, 2, 3, 4] if rnd == 1 else [2, 3, 4])
        assert out.stages[0].stage == 1 and out.stages[0].sent == (N if rnd == 1 else 0)
        assert out.stages[0].accepted == N  # the round's keys: advertised now or ahead
        # Only pairs of rounds still to come wait on the client; no round secret does.
        for node in grid.node_ids:
            assert _stored_rounds(grid, node) == list(range(rnd + 1, 5))
            assert STATE_KEY not in grid.context(node).state
    # Round 1 asked for exactly the run's 4 rounds (the batch stops at the last round).
    assert all(m.content.config_records[CONFIG_KEY][SECAGG_KEY_ROUNDS] == 4 for m in ex.sent[1])
    assert all(KEYS_STATE_KEY not in grid.context(n).state for n in grid.node_ids)


def test_key_rounds_one_exchanges_fresh_keys_every_round(grid: InProcessGrid) -> None:
    server, ex = SecureAggregation(_settings(key_rounds=1)), Recorder(grid)
    seen: set[bytes] = set()
    for rnd in range(1, 4):
        _assert_exact(_round(server, grid, rnd, ex, last_round=10), grid.node_ids)
        assert ex.stages == [1, 2, 3, 4]
        # Every round's stage-2 instruction carries keys never seen before.
        keys = {bytes(m.content.config_records[CONFIG_KEY][SECAGG_KEYS]) for m in ex.sent[2]}
        assert not keys & seen
        seen |= keys
        assert all(KEYS_STATE_KEY not in grid.context(n).state for n in grid.node_ids)


def test_stage_one_returns_when_the_batch_runs_out(grid: InProcessGrid) -> None:
    server, ex = SecureAggregation(_settings(key_rounds=2)), Recorder(grid)
    stage_one = []
    for rnd in range(1, 6):
        _assert_exact(_round(server, grid, rnd, ex, last_round=5), grid.node_ids)
        stage_one.append(1 in ex.stages)
    assert stage_one == [True, False, True, False, True]


def test_a_replayed_share_keys_instruction_finds_no_key(grid: InProcessGrid) -> None:
    server, ex = SecureAggregation(_settings()), Recorder(grid)
    _round(server, grid, 1, ex, last_round=3)
    _assert_exact(_round(server, grid, 2, ex, last_round=3), grid.node_ids)
    replay = ex.sent[2][0]
    node = int(replay.metadata.dst_node_id)
    # Two independent refusals: the round is over for this client (monotonicity), and
    # even without that record the pair of round 2 is gone.
    with pytest.raises(SecAggStageError, match="already sent its masked input for round 2"):
        handle_key_stage(replay, grid.context(node), 2)
    progress = grid.context(node).state[PROGRESS_STATE_KEY]
    del grid.context(node).state[PROGRESS_STATE_KEY]
    with pytest.raises(SecAggStageError, match="no unused key pair for round 2"):
        handle_key_stage(replay, grid.context(node), 2)
    grid.context(node).state[PROGRESS_STATE_KEY] = progress
    # The refusal used up nothing else: round 3 still runs on the pairs advertised ahead.
    assert _stored_rounds(grid, node) == [3]
    _assert_exact(_round(server, grid, 3, ex, last_round=3), grid.node_ids)
    assert ex.stages == [2, 3, 4]


def test_a_node_that_dropped_advertises_again_and_contributes(grid: InProcessGrid) -> None:
    server, ex = SecureAggregation(_settings()), Recorder(grid)
    victim = grid.node_ids[4]
    _round(server, grid, 1, ex, last_round=4)
    grid.drop_at(victim, message_type="train", nth=1)  # round 2 starts at stage 2
    out = _round(server, grid, 2, ex, last_round=4)
    _assert_exact(out, [v for v in grid.node_ids if v != victim])
    out = _round(server, grid, 3, ex, last_round=4)
    assert ex.stages == [1, 2, 3, 4]
    assert [int(m.metadata.dst_node_id) for m in ex.sent[1]] == [victim]
    _assert_exact(out, grid.node_ids)
    assert _stored_rounds(grid, victim) == [4]


def test_a_restarted_server_asks_every_node_for_keys_again(grid: InProcessGrid) -> None:
    ex = Recorder(grid)
    _round(SecureAggregation(_settings()), grid, 1, ex, last_round=5)
    restarted = SecureAggregation(_settings())  # the public keys died with the process
    out = _round(restarted, grid, 2, ex, last_round=5)
    assert ex.stages == [1, 2, 3, 4]
    _assert_exact(out, grid.node_ids)
    # The new batch replaced the old one: pairs for rounds 3-5, freshly drawn.
    assert all(_stored_rounds(grid, n) == [3, 4, 5] for n in grid.node_ids)


def test_a_short_key_batch_is_rejected_and_the_round_goes_on(grid: InProcessGrid) -> None:
    server, ex = SecureAggregation(_settings()), Recorder(grid)
    victim = grid.node_ids[0]

    def cut(reply: Message) -> None:
        if int(reply.metadata.src_node_id) == victim:
            rec = reply.content.config_records[SECAGG_RECORD_KEY]
            rec[SECAGG_REPLY_C_PK] = bytes(rec[SECAGG_REPLY_C_PK])[:-32]  # one key short

    ex.tamper = cut
    out = _round(server, grid, 1, ex, last_round=3)
    assert any(r.node_id == victim and "c-pk" in r.reason for r in out.rejected), out.rejected
    _assert_exact(out, grid.node_ids[1:])
    ex.tamper = None
    _round(server, grid, 2, ex, last_round=3)
    assert [int(m.metadata.dst_node_id) for m in ex.sent[1]] == [victim]


@pytest.mark.parametrize("count", [0, -1, 1025, True])
def test_client_refuses_an_out_of_range_key_batch(grid: InProcessGrid, count: Any) -> None:
    node = grid.node_ids[0]
    config = {SERVER_ROUND: 1, SECAGG_STAGE_KEY: 1, SECAGG_KEY_ROUNDS: count}
    with grid.server_identity():
        msg = Message(
            RecordDict({CONFIG_KEY: ConfigRecord(config)}), dst_node_id=node, message_type="train"
        )
    with pytest.raises(SecAggStageError, match="key-rounds"):
        handle_key_stage(msg, grid.context(node), 1)
    assert KEYS_STATE_KEY not in grid.context(node).state


@pytest.mark.parametrize("key_rounds", [0, 1025])
def test_settings_refuse_key_rounds_out_of_range(key_rounds: int) -> None:
    with pytest.raises(ValueError, match=r"secagg\.key_rounds"):
        _settings(key_rounds)


# ------------------------------------------------------------------ share-ahead
def _everyone(grid: InProcessGrid) -> Callable[[set[int]], list[int]]:
    return lambda exhausted: [n for n in grid.node_ids if n not in exhausted]


def _rode_along(ex: Recorder) -> list[int]:
    """Nodes whose stage-4 instruction of the last round carried the next stage 2."""
    return sorted(int(m.metadata.dst_node_id) for m in ex.sent[4] if SECAGG_NEXT_KEY in m.content)


@pytest.mark.parametrize("ddp", [False, True], ids=["fixed-point", "distributed-dp"])
def test_share_ahead_runs_two_exchanges_a_round_and_stays_exact(
    grid: InProcessGrid, ddp: bool
) -> None:
    from fl_app.privacy.distributed import DdpPlan

    plan = None
    if ddp:  # negligible noise, so the decoded sum must match the inputs
        plan = DdpPlan(
            clip=1.0, dim=DIM, bits=20, noise_multiplier=1e-4, max_cohort=N, dropout_tolerance=0.0
        )
    settings = SecAggSettings(
        mode=GraphMode.secaggplus,
        bits=20 if ddp else 32,
        stage_timeout_s=5.0,
        dropout_tolerance=0.0 if ddp else 0.2,
    )
    server, ex = SecureAggregation(settings, ddp=plan), Recorder(grid)
    for rnd in range(1, 5):
        out = _round(server, grid, rnd, ex, last_round=4, next_cohort=_everyone(grid))
        assert out.decoded is not None, out.note
        exact = np.sum([UPDATES[v]["w"].astype(np.float64) for v in grid.node_ids], axis=0)
        # DDP: rounding to the γ grid in the rotated domain leaves an error of sd ~1e-4
        # a coordinate here (max of 257 ~ 3.5e-4), so 2e-3 is ~20 sd: no false failure.
        atol = 2e-3 if ddp else 1e-6
        np.testing.assert_allclose(out.decoded.update["w"], exact, rtol=0, atol=atol)
        assert ex.stages == ([1, 2, 3, 4] if rnd == 1 else [3, 4])
        # Every stage-4 instruction carries the next round's stage 2, but the last.
        assert _rode_along(ex) == ([] if rnd == 4 else sorted(grid.node_ids))
        # Between rounds each client holds the next round's session, nothing older.
        for node in grid.node_ids:
            session = grid.context(node).state.get(STATE_KEY)
            if rnd < 4:
                assert session is not None and session["_round"] == rnd + 1
            else:
                assert session is None and KEYS_STATE_KEY not in grid.context(node).state


def test_a_dropout_at_stage_three_stops_share_ahead_for_one_round(grid: InProcessGrid) -> None:
    server, ex = SecureAggregation(_settings()), Recorder(grid)
    victim = grid.node_ids[2]
    grid.drop_at(victim, message_type="train", nth=3)  # its round-1 masked input
    out = _round(server, grid, 1, ex, last_round=3, next_cohort=_everyone(grid))
    _assert_exact(out, [v for v in grid.node_ids if v != victim])
    assert _rode_along(ex) == []  # the next cohort includes a node that did not survive
    out = _round(server, grid, 2, ex, last_round=3, next_cohort=_everyone(grid))
    assert ex.stages == [1, 2, 3, 4]  # stage 1 for the victim only (it was forgotten)
    assert [int(m.metadata.dst_node_id) for m in ex.sent[1]] == [victim]
    _assert_exact(out, grid.node_ids)
    assert _rode_along(ex) == sorted(grid.node_ids)


def test_a_lost_unmask_reply_costs_that_node_the_next_round_only(grid: InProcessGrid) -> None:
    server, ex = SecureAggregation(_settings()), Recorder(grid)
    victim = grid.node_ids[5]
    grid.drop_at(victim, message_type="train", nth=4)  # its round-1 stage 4 (+ stage 2)
    out = _round(server, grid, 1, ex, last_round=3, next_cohort=_everyone(grid))
    _assert_exact(out, grid.node_ids)  # its masked input arrived: it counts
    out = _round(server, grid, 2, ex, last_round=3, next_cohort=_everyone(grid))
    assert ex.stages == [3, 4]
    assert victim in out.missing
    _assert_exact(out, [v for v in grid.node_ids if v != victim])
    out = _round(server, grid, 3, ex, last_round=3, next_cohort=_everyone(grid))
    assert ex.stages == [1, 2, 3, 4]
    _assert_exact(out, grid.node_ids)


def test_a_different_cohort_than_announced_runs_the_full_stages(grid: InProcessGrid) -> None:
    server, ex = SecureAggregation(_settings()), Recorder(grid)
    announced = grid.node_ids[:-1]  # the round then samples all N
    out = _round(server, grid, 1, ex, last_round=3, next_cohort=lambda exhausted: announced)
    _assert_exact(out, grid.node_ids)
    assert _rode_along(ex) == sorted(announced)
    out = _round(server, grid, 2, ex, last_round=3)
    # The announced nodes spent their round-2 pair on the discarded session: new batch.
    assert ex.stages == [1, 2, 3, 4]
    assert sorted(int(m.metadata.dst_node_id) for m in ex.sent[1]) == sorted(announced)
    _assert_exact(out, grid.node_ids)


def test_a_malformed_share_ahead_part_loses_only_the_next_round(grid: InProcessGrid) -> None:
    server, ex = SecureAggregation(_settings()), Recorder(grid)
    victim = grid.node_ids[1]

    def cut(reply: Message) -> None:
        if int(reply.metadata.src_node_id) == victim and SECAGG_NEXT_KEY in reply.content:
            rec = reply.content.config_records[SECAGG_NEXT_KEY]
            rec[SECAGG_REPLY_NODES] = bytes(rec[SECAGG_REPLY_NODES])[:-8]

    ex.tamper = cut
    out = _round(server, grid, 1, ex, last_round=3, next_cohort=_everyone(grid))
    _assert_exact(out, grid.node_ids)
    ex.tamper = None
    out = _round(server, grid, 2, ex, last_round=3, next_cohort=_everyone(grid))
    assert ex.stages == [3, 4]
    assert any(r.node_id == victim and "(ahead)" in r.reason for r in out.rejected)
    _assert_exact(out, [v for v in grid.node_ids if v != victim])


def test_client_refuses_share_ahead_for_a_round_other_than_the_next(
    grid: InProcessGrid,
) -> None:
    server, ex = SecureAggregation(_settings()), Recorder(grid)
    victim = grid.node_ids[3]

    def skip_a_round(msg: Message) -> None:
        if int(msg.metadata.dst_node_id) == victim and SECAGG_NEXT_KEY in msg.content:
            msg.content.config_records[SECAGG_NEXT_KEY][SERVER_ROUND] = 3

    ex.edit = skip_a_round
    out = _round(server, grid, 1, ex, last_round=3, next_cohort=_everyone(grid))
    _assert_exact(out, grid.node_ids)  # round 1 itself is answered in full
    assert STATE_KEY not in grid.context(victim).state  # refused: nothing kept
    ex.edit = None
    out = _round(server, grid, 2, ex, last_round=3, next_cohort=_everyone(grid))
    assert ex.stages == [3, 4] and victim in out.missing
    _assert_exact(out, [v for v in grid.node_ids if v != victim])


def test_the_round_driver_shares_ahead_and_its_next_cohort_matches() -> None:
    # Through the real RoundDriver: it announces round t+1's cohort (the sampler is a
    # function of (seed, round)), so mid-run rounds are the two exchanges 3 and 4.
    from benchmarks.reuse import load_script

    bench = load_script("bench_secagg")
    out = bench.one_config_rounds(6, 1_000, True, 4)
    stages = [sorted(r) for r in out["stages"]]
    assert stages == [["1", "2", "3", "4"], ["3", "4"], ["3", "4"], ["3", "4"]]
    assert bench.steady(out["round"]) == out["round"][1:3]


def test_a_failing_next_cohort_callback_only_turns_share_ahead_off(grid: InProcessGrid) -> None:
    server, ex = SecureAggregation(_settings()), Recorder(grid)

    def broken(exhausted: set[int]) -> list[int]:
        raise ConnectionError("SuperLink unreachable")

    out = _round(server, grid, 1, ex, last_round=3, next_cohort=broken)
    _assert_exact(out, grid.node_ids)
    assert _rode_along(ex) == []
    _round(server, grid, 2, ex, last_round=3, next_cohort=_everyone(grid))
    assert ex.stages == [2, 3, 4]  # keys were advertised ahead; stage 2 runs on its own

"""Flow control of a stage's instructions (``runtime.max_in_flight``, strategies/exchange.py).

Under Flower's Ray simulation engine the driver keeps at most a window of instructions
awaiting replies, because that engine's message sweep costs O(nodes x instructions in
flight) of the GIL the ServerApp shares (docs/performance.md, Ray driver profile). These
tests pin what the window must never change: every instruction is sent exactly once, every
reply is collected, a stage's deadline still pushes whatever is left (so its accounting of
sent and missing clients is what it is without a window), and the automatic choice is a
window only for Flower's in-memory grid.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import InMemoryGrid

from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigError
from fl_app.protocol import CONFIG_KEY
from strategies.driver_types import DriverSettings, StageReport
from strategies.exchange import (
    IN_MEMORY_GRID_WINDOW,
    UNSENT_PREFIX,
    ReplyExchange,
    in_flight_window,
)


@pytest.fixture(autouse=True)
def _server_identity() -> Iterator[None]:
    """Messages read the process-wide run and node ids; set a server's, restore after."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class _Grid:
    """A grid that answers at most ``per_pull`` of the oldest pending instructions per pull."""

    def __init__(self, per_pull: int | None) -> None:
        self.per_pull = per_pull
        self.pushed: list[Message] = []
        self.pending: list[Message] = []
        self.max_pending = 0

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.pushed.append(m)
            self.pending.append(m)
            ids.append(m.metadata.message_id)
        self.max_pending = max(self.max_pending, len(self.pending))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        if self.per_pull is None:
            return []
        done = [m for m in self.pending if m.metadata.message_id in wanted][: self.per_pull]
        for m in done:
            self.pending.remove(m)
        return [Message(RecordDict(), reply_to=m) for m in done]


class _Exchange(ReplyExchange):
    def __init__(self, max_in_flight: int | None) -> None:
        self.settings = DriverSettings(
            num_rounds=1, poll_interval_s=0.0, max_in_flight=max_in_flight
        )
        self.node_config_fn = None


def _instructions(n: int) -> list[Message]:
    content = RecordDict({CONFIG_KEY: ConfigRecord({"x": 1})})
    # Deliberately out of node order: the exchange sends in node order.
    return [
        Message(content, dst_node_id=100 + ((7 * i) % n), message_type="train") for i in range(n)
    ]


@pytest.mark.parametrize(("window", "per_pull"), [(3, 1), (3, 2), (5, 5), (1, 1)])
def test_window_bounds_in_flight_and_loses_nothing(window: int, per_pull: int) -> None:
    n = 17
    grid = _Grid(per_pull)
    pushed, replies, sent = _Exchange(window)._exchange(grid, _instructions(n), 1, timeout=30.0)
    assert grid.max_pending <= window
    assert grid.max_pending == min(window, n)  # the window is used, not just respected
    # Every instruction once, in node order; every reply collected and matched.
    assert [m.metadata.dst_node_id for m in grid.pushed] == sorted(100 + i for i in range(n))
    assert len({m.metadata.message_id for m in pushed}) == n
    assert sorted(sent.values()) == sorted(100 + i for i in range(n))
    assert {r.metadata.reply_to_message_id for r in replies} == set(sent)


def test_deadline_counts_the_unsent_as_missing_without_sending_them() -> None:
    """A stage that ends with instructions still waiting does not send them (a client
    would work, and under local DP spend budget, for a reply nobody reads): they are in
    ``sent`` under a key no reply can carry, so the stage counts them as missing."""
    grid = _Grid(per_pull=None)  # never answers
    pushed, replies, sent = _Exchange(2)._exchange(grid, _instructions(6), 1, timeout=0.0)
    assert len(pushed) == len(grid.pushed) == 2
    assert sorted(sent.values()) == list(range(100, 106))
    unsent = [k for k in sent if k.startswith(UNSENT_PREFIX)]
    assert sorted(sent[k] for k in unsent) == list(range(102, 106))
    assert replies == []
    stage = StageReport()
    ReplyExchange._fill_stage(stage, replies, sent, [], [], 0)
    assert (stage.replied, stage.missing) == (0, 6)


def test_silent_nodes_do_not_starve_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes that never answer hold window slots; after WINDOW_STALL_S without a reply
    the window doubles, so the live nodes behind them are still sent to and answer."""

    class _Silent(_Grid):
        def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
            wanted = set(message_ids)
            done = [
                m
                for m in self.pending
                if m.metadata.message_id in wanted and m.metadata.dst_node_id >= 102
            ]
            for m in done:
                self.pending.remove(m)
            return [Message(RecordDict(), reply_to=m) for m in done]

    monkeypatch.setattr("strategies.exchange.WINDOW_STALL_S", 0.05)
    grid = _Silent(per_pull=1)
    ex = _Exchange(2)
    _, replies, sent = ex._exchange(grid, _instructions(10), 1, timeout=5.0)
    answered = sorted(r.metadata.src_node_id for r in replies)
    assert answered == list(range(102, 110))  # nodes 100 and 101 are silent
    assert len(sent) == 10 and not any(k.startswith(UNSENT_PREFIX) for k in sent)


def test_zero_sends_everything_at_once() -> None:
    grid = _Grid(per_pull=1)
    _Exchange(0)._exchange(grid, _instructions(9), 1, timeout=30.0)
    assert grid.max_pending == 9


def test_automatic_window_only_for_flowers_in_memory_grid() -> None:
    in_memory = object.__new__(InMemoryGrid)  # the type is what counts, not its state
    assert in_flight_window(None, in_memory, 1000) == IN_MEMORY_GRID_WINDOW == 32
    assert in_flight_window(None, _Grid(1), 1000) == 1000
    assert in_flight_window(0, in_memory, 1000) == 1000
    assert in_flight_window(5, _Grid(1), 1000) == 5
    assert in_flight_window(0, _Grid(1), 0) == 1


def test_negative_max_in_flight_fails_before_the_run() -> None:
    with pytest.raises(ConfigError) as info:
        compose_config("config", ["runtime.max_in_flight=-1"])
    assert info.value.field == "runtime.max_in_flight"
    assert "0 (all at once)" in str(info.value)
    with pytest.raises(ValueError, match="max_in_flight"):
        DriverSettings(num_rounds=1, max_in_flight=-1)


def test_null_uses_the_in_memory_grids_window_in_the_exchange() -> None:
    """runtime.max_in_flight=null: the exchange itself applies IN_MEMORY_GRID_WINDOW when
    the grid is Flower's in-memory grid (the one Ray simulation runs on)."""

    class _MemGrid(_Grid, InMemoryGrid):  # the type is what counts, not Flower's state
        pass

    grid = _MemGrid(per_pull=1)
    n = IN_MEMORY_GRID_WINDOW + 9
    _, replies, _ = _Exchange(None)._exchange(grid, _instructions(n), 1, timeout=30.0)
    assert grid.max_pending == IN_MEMORY_GRID_WINDOW
    assert len(replies) == n


def test_waiting_for_replies_sleeps_between_pulls() -> None:
    """With instructions waiting and nothing answered, the exchange polls at
    poll_interval_s, not in a busy loop (under Ray it shares the GIL with the engine)."""

    class _Counting(_Grid):
        pulls = 0

        def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
            self.pulls += 1
            return super().pull_messages(message_ids)

    grid = _Counting(per_pull=None)  # never answers
    ex = _Exchange(1)
    ex.settings = DriverSettings(num_rounds=1, poll_interval_s=0.05, max_in_flight=1)
    ex._exchange(grid, _instructions(3), 1, timeout=0.3)
    assert 3 <= grid.pulls <= 9  # ~0.3 s / 0.05 s, not thousands


def test_each_pushed_instruction_carries_round_ttl_and_its_nodes_config() -> None:
    """What a window pushes is what the exchange built: group id = the round, TTL = the
    stage's timeout plus 60 s, and each node's own config scalars merged in."""
    grid = _Grid(per_pull=2)
    ex = _Exchange(3)
    ex.node_config_fn = lambda node: {"site": f"s{node}"}
    ex._exchange(grid, _instructions(7), 4, timeout=30.0)
    for m in grid.pushed:
        assert m.metadata.group_id == "4"
        assert m.metadata.ttl == 90.0
        config = m.content.config_records[CONFIG_KEY]
        assert config["site"] == f"s{m.metadata.dst_node_id}" and config["x"] == 1

"""Tests for :class:`fl_app.runtime.inprocess.InProcessGrid`, the in-process Flower Grid."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fl_app.runtime.copies import records_copy, wire_copy
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.runtime.link import Delivery

MODES = ["records", "wire"]
GridFactory = Callable[..., InProcessGrid]


# --------------------------------------------------------------------------- app
def make_app(stash: list[Message] | None = None, seen: list[dict[str, Any]] | None = None):
    """A tiny ClientApp: train (+1 to every array), evaluate, query (echo), one mod.

    ``stash`` receives every instruction the train handler got and every reply it
    returned; ``seen`` receives the TaskIdentity / config observed by the handler.
    """

    def tag_mod(msg: Message, context: Context, call_next):
        calls = context.state.get("mod", ConfigRecord({"calls": 0}))
        calls["calls"] = int(calls["calls"]) + 1
        context.state["mod"] = calls
        reply = call_next(msg, context)
        if reply.has_content():
            reply.content["mod"] = ConfigRecord(
                {"calls": calls["calls"], "type": msg.metadata.message_type}
            )
        return reply

    app = ClientApp(mods=[tag_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        if seen is not None:
            seen.append(
                {
                    "node": TaskIdentity.node_id,
                    "run": TaskIdentity.run_id,
                    "lr": cfg.get("lr"),
                    "meta": msg.metadata,
                }
            )
        if cfg.get("fail", False):
            raise ValueError("boom")
        counter = context.state.get("counter", MetricRecord({"n": 0}))
        counter["n"] = int(counter["n"]) + 1
        context.state["counter"] = counter
        pid = int(context.node_config["partition-id"])
        received = msg.content["arrays"]
        updated = ArrayRecord({k: Array(v.numpy() + 1) for k, v in received.items()})
        reply = Message(
            RecordDict(
                {
                    "arrays": updated,
                    "metrics": MetricRecord(
                        {"num-examples": 10 * (pid + 1), "count": counter["n"]}
                    ),
                    "echo": ConfigRecord({"lr": cfg.get("lr", 0.0)}),
                }
            ),
            reply_to=msg,
        )
        # Vandalize what we received: must not reach the server's objects.
        cfg["lr"] = -1.0
        received["w"] = Array(np.full(3, 99.0, dtype=np.float32))
        if stash is not None:
            stash.extend([msg, reply])
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        metrics = MetricRecord({"num-examples": 5, "loss": float(pid)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(msg.content, reply_to=msg)

    return app


def model(value: float = 0.0) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))})


def messages(
    grid: InProcessGrid,
    node_ids: list[int] | None = None,
    message_type: str = "train",
    group_id: str = "1",
    **config: Any,
) -> list[Message]:
    content = RecordDict({"arrays": model(), "config": ConfigRecord({"lr": 0.5, **config})})
    return [
        Message(content, node_id, message_type, group_id=group_id)
        for node_id in (grid.node_ids if node_ids is None else node_ids)
    ]


def by_node(replies: list[Message]) -> dict[int, Message]:
    return {r.metadata.src_node_id: r for r in replies}


@pytest.fixture
def make_grid() -> Iterator[GridFactory]:
    """Build grids and restore the process-wide TaskIdentity afterwards."""
    grids: list[InProcessGrid] = []

    def factory(*args: Any, **kwargs: Any) -> InProcessGrid:
        grid = InProcessGrid(*args, **kwargs)
        grids.append(grid)
        return grid

    yield factory
    for grid in reversed(grids):
        grid.close()


# ------------------------------------------------------------------------ nodes
def test_node_ids_are_seeded_distinct_and_partitioned(make_grid: GridFactory) -> None:
    a = make_grid(make_app(), 50, seed=3)
    b = make_grid(make_app(), 50, seed=3)
    c = make_grid(make_app(), 50, seed=4)
    assert a.node_ids == b.node_ids != c.node_ids
    assert len(set(a.node_ids)) == 50
    assert all(SUPERLINK_NODE_ID < n < 2**63 for n in a.node_ids)
    assert list(a.get_node_ids()) == a.node_ids
    for i, node_id in enumerate(a.node_ids):
        ctx = a.context(node_id)
        assert ctx.node_id == node_id and ctx.run_id == 1
        assert ctx.node_config == {"partition-id": i, "num-partitions": 50}
    with pytest.raises(KeyError):
        a.context(12345)


def test_custom_node_config_and_run_config(make_grid: GridFactory) -> None:
    grid = make_grid(
        make_app(),
        3,
        run_id=7,
        node_config_fn=lambda i, n: {"shard": f"{i}/{n}"},
        run_config={"lr": 0.1},
    )
    ctxs = [grid.context(n) for n in grid.node_ids]
    assert [c.node_config for c in ctxs] == [{"shard": "0/3"}, {"shard": "1/3"}, {"shard": "2/3"}]
    assert all(c.run_config == {"lr": 0.1} and c.run_id == 7 for c in ctxs)
    ctxs[0].run_config["lr"] = 9.0  # each node owns its copy
    assert ctxs[1].run_config == {"lr": 0.1}
    assert grid.run.run_id == 7 and grid.run.override_config == {"lr": 0.1}


# ---------------------------------------------------------------------- copying
@pytest.mark.parametrize("mode", MODES)
def test_round_trip_of_all_record_types(make_grid: GridFactory, mode: str) -> None:
    grid = make_grid(make_app(), 2, copy_mode=mode)
    content = RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    "w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
                    "i": Array(np.array([1, -2, 3], dtype=np.int64)),
                }
            ),
            "metrics": MetricRecord({"acc": 0.5, "n": 3, "hist": [1.0, 2.0]}),
            "config": ConfigRecord({"s": "x", "b": b"\x00\x01", "flag": True, "l": [1, 2]}),
        }
    )
    replies = grid.send_and_receive([Message(content, grid.node_ids[0], "query")])
    (reply,) = replies
    got = reply.content
    assert got is not content
    assert set(got.keys()) == {"arrays", "metrics", "config", "mod"}
    for key in ("w", "i"):
        want = content["arrays"][key]
        arr = got["arrays"][key]
        assert (arr.dtype, arr.shape) == (want.dtype, want.shape)
        np.testing.assert_array_equal(arr.numpy(), want.numpy())
    assert got["metrics"] == content["metrics"]
    assert got["config"] == content["config"]
    assert got["mod"] == ConfigRecord({"calls": 1, "type": "query"})


@pytest.mark.parametrize("mode", MODES)
def test_mutations_never_cross_the_wire(make_grid: GridFactory, mode: str) -> None:
    stash: list[Message] = []
    grid = make_grid(make_app(stash=stash), 3, copy_mode=mode)
    batch = messages(grid)  # one RecordDict shared by all three messages
    shared = batch[0].content
    replies = by_node(grid.send_and_receive(batch))

    # Every client vandalized its instruction; the server's content is intact ...
    assert shared["config"]["lr"] == 0.5
    np.testing.assert_array_equal(shared["arrays"]["w"].numpy(), np.zeros(3))
    # ... and no client saw another's vandalism (each echoes the original lr).
    assert [replies[n].content["echo"]["lr"] for n in grid.node_ids] == [0.5, 0.5, 0.5]
    # Client-side objects are not the server's.
    delivered, client_reply = stash[0], stash[1]
    assert delivered is not batch[0] and delivered.content is not shared
    server_reply = replies[grid.node_ids[0]]
    assert server_reply is not client_reply
    # A client mutating its reply after returning it does not change what arrived.
    client_reply.content["metrics"]["num-examples"] = -1
    assert server_reply.content["metrics"]["num-examples"] == 10
    # ... nor does the server mutating the reply reach the client's copy.
    server_reply.content["arrays"]["w"] = Array(np.zeros(1, dtype=np.float32))
    np.testing.assert_array_equal(client_reply.content["arrays"]["w"].numpy(), np.ones(3))


def test_copy_messages_false_hands_over_the_same_objects(make_grid: GridFactory) -> None:
    stash: list[Message] = []
    grid = make_grid(make_app(stash=stash), 1, copy_messages=False)
    batch = messages(grid)
    (reply,) = grid.send_and_receive(batch)
    assert stash[0] is batch[0] and reply is stash[1]
    assert batch[0].content["config"]["lr"] == -1.0  # no isolation in this mode


def test_copy_functions_agree_and_wire_deduplicates(make_grid: GridFactory) -> None:
    make_grid(make_app(), 1)  # sets the server TaskIdentity
    same = ConfigRecord({"k": 1})
    msg = Message(
        RecordDict({"a": same, "b": ConfigRecord({"k": 1}), "m": model(2.0)}),
        5,
        "train",
        group_id="3",
        ttl=120.0,
    )
    msg.metadata.__dict__["_message_id"] = "mid"
    for copy in (wire_copy(msg), records_copy(msg)):
        assert vars(copy.metadata) == vars(msg.metadata)
        assert copy.content == msg.content and copy.content is not msg.content
    # Flower's wire is content-addressed: identical records arrive as ONE object.
    wired = wire_copy(msg)
    assert wired.content["a"] is wired.content["b"]
    recorded = records_copy(msg)
    assert recorded.content["a"] is not recorded.content["b"]
    error = Message(Error(code=7, reason="r"), reply_to=msg)
    for copy in (wire_copy(error), records_copy(error)):
        assert (copy.error.code, copy.error.reason) == (7, "r")


# ---------------------------------------------------------------- context, mods
def test_context_state_persists_per_node_and_mods_apply(make_grid: GridFactory) -> None:
    grid = make_grid(make_app(), 3)
    a, b, c = grid.node_ids
    grid.send_and_receive(messages(grid, [a, b]))
    replies = by_node(grid.send_and_receive(messages(grid, [a], group_id="2")))
    assert replies[a].content["metrics"]["count"] == 2
    assert grid.context(a).state["counter"]["n"] == 2
    assert grid.context(b).state["counter"]["n"] == 1
    assert "counter" not in grid.context(c).state
    # The app-level mod ran around every handler call and tagged the reply.
    assert grid.context(a).state["mod"]["calls"] == 2
    assert replies[a].content["mod"] == ConfigRecord({"calls": 2, "type": "train"})
    ev = grid.send_and_receive(messages(grid, [c], message_type="evaluate"))
    assert ev[0].content["mod"]["type"] == "evaluate"


# ----------------------------------------------------------------------- errors
def test_handler_exception_becomes_flower_error_reply(make_grid: GridFactory) -> None:
    grid = make_grid(make_app(), 2)
    a, b = grid.node_ids
    batch = messages(grid, [a], fail=True) + messages(grid, [b], message_type="query.nope")
    replies = by_node(grid.send_and_receive(batch))
    err = replies[a]
    assert err.has_error() and not err.has_content()
    assert err.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert err.error.reason == "<class 'ValueError'>:<'boom'>"
    assert err.metadata.reply_to_message_id == batch[0].metadata.message_id
    assert err.metadata.src_node_id == a
    # Routing failures inside ClientApp.__call__ are ClientApp exceptions too.
    assert replies[b].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "No query function registered with name 'nope'" in replies[b].error.reason
    assert [(n, type(e)) for n, e in grid.errors] == [(a, ValueError), (b, ValueError)]


def test_invalid_or_unserializable_replies(make_grid: GridFactory) -> None:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        kind = msg.content["config"]["kind"]
        if kind == "none":
            return None  # type: ignore[return-value]
        if kind == "not-a-reply":
            return Message(RecordDict(), msg.metadata.dst_node_id, "train")
        bad = ConfigRecord({"x": [1, 2]})
        bad["x"].append("three")  # a mixed list cannot be serialized
        return Message(RecordDict({"bad": bad}), reply_to=msg)

    grid = make_grid(app, 3)
    a, b, c = grid.node_ids
    batch = (
        messages(grid, [a], kind="none")
        + messages(grid, [b], kind="not-a-reply")
        + messages(grid, [c], kind="bad")
    )
    replies = grid.send_and_receive(batch)
    # Returning a non-Message is reported like an exception ...
    assert len(replies) == 1 and replies[0].metadata.src_node_id == a
    assert "TypeError" in replies[0].error.reason
    # ... a non-reply or an unserializable reply never reaches the server.
    assert [r.node_id for r in grid.rejected] == [b, c]
    assert any("reply_to_message_id" in why for why in grid.rejected[0].reasons)
    assert any("cannot serialize" in why for why in grid.rejected[1].reasons)


def test_push_validation(make_grid: GridFactory) -> None:
    grid = make_grid(make_app(), 2)
    with pytest.raises(ValueError, match="Unknown destination"):
        grid.push_messages([Message(RecordDict(), 424242, "train")])
    msg = messages(grid)[0]
    with pytest.raises(ValueError, match="twice"):
        grid.push_messages([msg, msg])
    with pytest.raises(TypeError):
        grid.push_messages(["not a message"])  # type: ignore[list-item]
    reply = Message(RecordDict(), reply_to=msg)
    with pytest.raises(ValueError, match="Invalid message"):
        grid.push_messages([reply])
    assert grid.sent == []  # nothing was delivered
    assert grid.pull_messages(["unknown-id"]) == []


@pytest.mark.parametrize("mode", MODES)
def test_unserializable_instruction_fails_the_push(make_grid: GridFactory, mode: str) -> None:
    grid = make_grid(make_app(), 2, copy_mode=mode)
    bad = ConfigRecord({"x": [1, 2]})
    bad["x"].append("three")  # type: ignore[arg-type]
    batch = messages(grid)
    batch.append(Message(RecordDict({"config": bad}), grid.node_ids[1], "train"))
    with pytest.raises(TypeError, match="not allowed"):
        grid.push_messages(batch)
    assert grid.sent == []  # serialized up front: no node ran


# --------------------------------------------------------------------- metadata
def test_reply_and_delivered_metadata(make_grid: GridFactory) -> None:
    seen: list[dict[str, Any]] = []
    grid = make_grid(make_app(seen=seen), 4, run_id=11)
    batch = messages(grid, group_id="7")
    ids = grid.push_messages(batch)
    assert len(set(ids)) == 4 and [m.metadata.message_id for m in batch] == ids
    replies = grid.pull_messages(ids)
    assert grid.pull_messages(ids) == []  # each reply is handed out once
    assert len({r.metadata.message_id for r in replies}) == 4
    for msg, reply in zip(batch, replies, strict=True):
        meta = reply.metadata
        assert meta.src_node_id == msg.metadata.dst_node_id
        assert meta.dst_node_id == SUPERLINK_NODE_ID
        assert meta.reply_to_message_id == msg.metadata.message_id
        assert (meta.group_id, meta.message_type, meta.run_id) == ("7", "train", 11)
        assert meta.message_id and meta.message_id not in ids
    for msg, obs in zip(batch, seen, strict=True):
        # The handler ran as its node and got the instruction's metadata unchanged.
        assert obs["node"] == msg.metadata.dst_node_id and obs["run"] == 11
        assert vars(obs["meta"]) == vars(msg.metadata)
    assert grid.sent == [Delivery(n, "train", "7") for n in grid.node_ids]


def test_task_identity_is_set_for_the_server_and_restored(make_grid: GridFactory) -> None:
    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    with InProcessGrid(make_app(), 1, run_id=5) as grid:
        msg = Message(RecordDict(), grid.node_ids[0], "query")
        assert (msg.metadata.src_node_id, msg.metadata.run_id) == (SUPERLINK_NODE_ID, 5)
        grid.send_and_receive([msg])
        # Still the server identity after a handler ran as a node.
        assert (TaskIdentity.node_id, TaskIdentity.run_id) == (SUPERLINK_NODE_ID, 5)
        legacy = grid.create_message(RecordDict(), "query", grid.node_ids[0], "g")
        assert legacy.metadata.group_id == "g"
        grid.set_run(Run.create_empty(run_id=6))
        assert grid.run.run_id == 6 and grid.context(grid.node_ids[0]).run_id == 6
        assert TaskIdentity.run_id == 6
    assert (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id) == before

    quiet = make_grid(make_app(), 1, run_id=9, set_task_identity=False)
    with quiet.server_identity():
        msg = Message(RecordDict(), quiet.node_ids[0], "query")
    assert msg.metadata.run_id == 9
    assert (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id) == before


# -------------------------------------------------------------- fault injection
def test_drop_loses_reply_and_returns_promptly(make_grid: GridFactory) -> None:
    grid = make_grid(make_app(), 3, drop=lambda node, msg: node == grid.node_ids[1])
    a, b, c = grid.node_ids
    start = time.perf_counter()
    replies = grid.send_and_receive(messages(grid), timeout=30.0)
    assert time.perf_counter() - start < 5.0  # never waits for the timeout
    assert sorted(by_node(replies)) == sorted([a, c])
    assert len(grid.sent) == 3 and grid.dropped == [Delivery(b, "train", "1")]
    assert grid.context(b).state["counter"]["n"] == 1  # it did process the message
    # timeout=None does not hang either.
    assert len(grid.send_and_receive(messages(grid), timeout=None)) == 2


def test_drop_at_chosen_message(make_grid: GridFactory) -> None:
    grid = make_grid(make_app(), 3)
    a, b, _ = grid.node_ids
    grid.drop_at(a, "train", nth=2)  # lose a's reply to its 2nd train message only
    grid.drop_at(b, group_id=3, count=None)  # b dies for good in round 3
    missing = []
    for rnd in range(1, 5):
        got = by_node(grid.send_and_receive(messages(grid, group_id=str(rnd))))
        grid.send_and_receive(messages(grid, message_type="evaluate", group_id=str(rnd)))
        missing.append(sorted(set(grid.node_ids) - set(got)))
    assert missing == [[], [a], [b], [b]]
    with pytest.raises(ValueError):
        grid.drop_at(a, nth=0)
    with pytest.raises(KeyError):
        grid.drop_at(99)


def test_drop_at_forever_and_node_unavailable_errors(make_grid: GridFactory) -> None:
    grid = make_grid(make_app(), 2, drop_reply="node_unavailable")
    a, b = grid.node_ids
    grid.drop_at(b, "train", nth=2, count=None)
    for rnd in range(1, 4):
        replies = by_node(grid.send_and_receive(messages(grid, group_id=str(rnd))))
        assert replies[a].has_content()
        if rnd == 1:
            assert replies[b].has_content()
        else:
            # What Flower's SuperLink returns for a node that went offline.
            assert replies[SUPERLINK_NODE_ID].error.code == ErrorCode.NODE_UNAVAILABLE


def test_inject_reply(make_grid: GridFactory) -> None:
    grid = make_grid(make_app(), 2)
    a, b = grid.node_ids
    batch = messages(grid)
    ids = grid.push_messages(batch)
    forged = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 10**9})}), reply_to=batch[0]
    )
    grid.inject_reply(forged)
    stale = Message(Error(code=0, reason="old"), reply_to=batch[1])
    stale.metadata.__dict__["_reply_to_message_id"] = "previous-round-id"
    grid.inject_reply(stale, match_any=True)
    replies = grid.pull_messages([ids[0]])
    assert len(replies) == 3  # a's real reply, the forgery, the stale one
    assert sum(r.metadata.src_node_id == a for r in replies) == 2
    assert forged in replies and stale in replies and forged.metadata.message_id
    assert [r.metadata.src_node_id for r in grid.pull_messages(ids)] == [b]
    with pytest.raises(ValueError):
        grid.inject_reply(Message(RecordDict(), a, "train"))


def test_message_hook_replaces_duplicates_or_drops(make_grid: GridFactory) -> None:
    def hook(node_id: int, reply: Message):
        if node_id == grid.node_ids[0]:
            return [reply, reply]  # duplicate
        if node_id == grid.node_ids[1]:
            return None  # lost
        reply.content["metrics"]["num-examples"] = -5  # malformed
        return reply

    grid = make_grid(make_app(), 3, message_hook=hook)
    replies = grid.send_and_receive(messages(grid))
    nodes = [r.metadata.src_node_id for r in replies]
    assert nodes == [grid.node_ids[0], grid.node_ids[0], grid.node_ids[2]]
    assert replies[-1].content["metrics"]["num-examples"] == -5


# ----------------------------------------------------------------- scale, FedAvg
def test_thousand_nodes_one_round_trip(make_grid: GridFactory) -> None:
    grid = make_grid(make_app(), 1000)
    weights = np.random.default_rng(0).random(20_000, dtype=np.float32)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(weights)})})
    batch = [Message(content, n, "query") for n in grid.node_ids]
    replies = grid.send_and_receive(batch, timeout=60)
    assert len(replies) == 1000
    assert {r.metadata.src_node_id for r in replies} == set(grid.node_ids)
    np.testing.assert_array_equal(replies[-1].content["arrays"]["w"].numpy(), weights)
    # Its speed is measured by scripts/bench_rounds.py, not asserted here.


def test_fedavg_runs_end_to_end(make_grid: GridFactory) -> None:
    grid = make_grid(make_app(), 4)
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=4,
        min_evaluate_nodes=4,
        min_available_nodes=4,
    )
    result = strategy.start(grid=grid, initial_arrays=model(0.0), num_rounds=2, timeout=10)
    # Every client adds 1 to the model, so the weighted mean moves by 1 per round.
    # Flower's FedAvg averages in float32, in the order its unseeded random.sample
    # picked the nodes, so the result may be off by a few float32 ulps (CI saw
    # 2.0000002); our own driver's float64 mean is tested exactly in test_driver.
    np.testing.assert_allclose(
        result.arrays["w"].numpy(), np.full(3, 2.0), rtol=4 * np.finfo(np.float32).eps
    )
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert result.train_metrics_clientapp[2]["count"] == pytest.approx(2.0)
    # Evaluate: weighted (equal weights) mean of partition ids 0..3.
    assert result.evaluate_metrics_clientapp[2]["loss"] == pytest.approx(1.5)
    types = [d.message_type for d in grid.sent]
    assert types == (["train"] * 4 + ["evaluate"] * 4) * 2
    assert all(grid.context(n).state["counter"]["n"] == 2 for n in grid.node_ids)

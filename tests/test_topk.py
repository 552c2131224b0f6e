"""top-k with client-side error feedback (share.compression=topk; docs/compression.md).

Expected values are formed here independently: the top-k support with numpy's argsort
of |Δ + residual| (Δ from the same client trained without compression), the residuals
of two rounds worked out by hand, the clip as v · min(1, C / ‖v‖), the aggregate as the
weighted mean of the replies scattered by hand, the upload size from numpy's own .npy
bytes. Refusals under secure aggregation and local/distributed DP are unchanged.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from fl_app.client.error_feedback import RESIDUAL_KEY, TopKStage, load_residual, residual_path
from fl_app.client.refusal import ClientRefusal
from fl_app.compression_topk import INDICES_KEY, VALUES_KEY, TopK
from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigConflictError, ConfigError
from fl_app.weights import save_safetensors

RUN_KEY = "0123456789abcdef0123456789abcdef"
COMMON = ["runtime=inprocess", "dataset.num_partitions=4", "train.local_epochs=1"]
TOPK = ["share.artifact=compressed", "share.compression=topk", "share.ratio=0.1"]
D = 64 * 64 + 64 + 64 * 10 + 10  # the default MLP's coordinates
SHAPES = [(64, 64), (64,), (10, 64), (10,)]


def _hand_topk(acc: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.argsort(-np.abs(acc))[:k])


def test_residual_after_two_rounds_is_the_hand_computed_value(tmp_path: Path) -> None:
    """d = 5, ratio 0.4: k = 2. Round 1: Δ = (0.5, -3, 1, 2, 0.1), e = 0: sends
    coordinates 1, 3 (values -3, 2) and keeps e = (0.5, 0, 1, 0, 0.1). Round 2:
    Δ = (1, 0.2, -0.5, 0.3, 1.5), Δ + e = (1.5, 0.2, 0.5, 0.3, 1.6): sends 0, 4
    (1.5, 1.6) and keeps e = (0, 0.2, 0.5, 0.3, 0)."""
    stage = TopKStage(TopK(0.4), tmp_path / "r.safetensors")
    sent = stage({"a": np.array([0.5, -3.0, 1.0], np.float32), "b": np.array([2.0, 0.1])})
    assert list(sent) == [VALUES_KEY]
    np.testing.assert_array_equal(sent[VALUES_KEY], [-3.0, 2.0])
    reply = stage.reply(sent)
    np.testing.assert_array_equal(reply[INDICES_KEY], [1, 3])
    assert reply[INDICES_KEY].dtype == np.int32
    np.testing.assert_allclose(
        load_residual(stage.path, 5), [0.5, 0.0, 1.0, 0.0, 0.1], rtol=0, atol=1e-7
    )
    sent = stage({"a": np.array([1.0, 0.2, -0.5], np.float32), "b": np.array([0.3, 1.5])})
    np.testing.assert_allclose(sent[VALUES_KEY], [1.5, 1.6], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(stage.reply(sent)[INDICES_KEY], [0, 4])
    np.testing.assert_allclose(
        load_residual(stage.path, 5), [0.0, 0.2, 0.5, 0.3, 0.0], rtol=0, atol=1e-7
    )


def test_a_restarted_client_resumes_its_residual_bit_for_bit(tmp_path: Path) -> None:
    """A fresh stage (a restarted SuperNode) reads the residual the first one wrote and
    sends what the first one would have: same file bytes, same second reply."""
    rng = np.random.default_rng(3)
    d1, d2 = ({"w": rng.normal(size=(4, 5)).astype(np.float32)} for _ in range(2))
    kept = TopKStage(TopK(0.25), tmp_path / "kept.safetensors")
    kept(d1)
    restarted_path = tmp_path / "restarted.safetensors"
    TopKStage(TopK(0.25), restarted_path)(d1)
    assert restarted_path.read_bytes() == kept.path.read_bytes()
    restarted = TopKStage(TopK(0.25), restarted_path)  # a new process: nothing in memory
    before = load_residual(restarted_path, 20)
    assert before is not None and before.tobytes() == load_residual(kept.path, 20).tobytes()
    a, b = kept(d2), restarted(d2)
    assert a[VALUES_KEY].tobytes() == b[VALUES_KEY].tobytes()
    assert kept.indices[-1].tobytes() == restarted.indices[-1].tobytes()
    assert restarted_path.read_bytes() == kept.path.read_bytes()


def test_a_residual_of_another_shape_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "r.safetensors"
    save_safetensors(path, {RESIDUAL_KEY: np.zeros(4)}, {})
    with pytest.raises(ClientRefusal, match="move the file away"):
        TopKStage(TopK(0.5), path)({"w": np.ones(5, np.float32)})
    assert residual_path(tmp_path, RUN_KEY, "partition-0").name == (
        f"topk-residual-{RUN_KEY}-partition-0.safetensors"
    )
    with pytest.raises(ClientRefusal, match="safe file-name"):
        residual_path(tmp_path, "../x", "partition-0")


def test_decompress_refuses_repeated_or_out_of_range_indices() -> None:
    model = {"a": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    topk = TopK(0.5)  # k = 3 of 6
    full = topk.decompress(
        {INDICES_KEY: np.array([0, 3, 5]), VALUES_KEY: np.array([1.0, 2.0, 3.0])}, model
    )
    np.testing.assert_array_equal(full["a"], [[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_array_equal(full["b"], [0.0, 3.0])
    assert full["a"].dtype == np.float32
    for bad, words in (([0, 0, 5], "repeat"), ([0, 1, 6], r"\[0, 6\)"), ([-1, 1, 2], "lie in")):
        with pytest.raises(ValueError, match=words):
            topk.decompress({INDICES_KEY: np.array(bad), VALUES_KEY: np.ones(3)}, model)
    with pytest.raises(ValueError, match="shapes"):
        topk.decompress({INDICES_KEY: np.arange(2), VALUES_KEY: np.ones(2)}, model)


def _client_reply(overrides: list[str], state_dir: Path, clip: float | None = None) -> Message:
    """One real ClientApp train reply (round 1, partition 0) with its state in
    ``state_dir``; ``clip``: the client clips to it (central DP, clip_side=client)."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from fl_app.client.app import app as client_app
    from fl_app.client_spec import ClientDpSpec, encode_spec, spec_from_config
    from fl_app.protocol import CLIP_NORM_KEY
    from fl_app.runtime.inprocess import InProcessGrid
    from fl_app.server.app import initial_arrays
    from fl_app.weights import to_array_record

    cfg = compose_config("config", [*COMMON, *overrides])
    spec = spec_from_config(cfg, RUN_KEY, None if clip is None else ClientDpSpec())
    clip_config = {} if clip is None else {CLIP_NORM_KEY: clip}
    content = RecordDict(
        {
            "arrays": to_array_record(initial_arrays(cfg)),
            "config": ConfigRecord(
                {"fl-app.spec": encode_spec(spec), "server-round": 1, **clip_config}
            ),
        }
    )
    node_config = {"partition-id": 0, "num-partitions": 4, "dp-state-dir": str(state_dir)}
    context = Context(
        run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={}
    )
    grid = InProcessGrid(client_app, 4, seed=0)  # the server-side task identity
    try:
        msg = Message(content, dst_node_id=5, message_type="train")
        msg.metadata.__dict__["_message_id"] = "m1-5"
        reply = client_app(msg, context)
    finally:
        grid.close()
    assert not reply.has_error(), reply.error.reason
    return reply


def _update(reply: Message) -> dict[str, np.ndarray]:
    record = reply.content.array_records["update"]
    return {name: record[name].numpy() for name in record}


def _npy_bytes(shape: tuple[int, ...], dtype: Any) -> int:
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype), allow_pickle=False)
    return len(buf.getvalue())


def test_the_reply_carries_exactly_the_topk_of_delta_plus_residual(tmp_path: Path) -> None:
    """The same client trained without compression gives Δ; with a residual r already in
    its state folder, the top-k reply holds argsort's k largest |Δ + r| and their values,
    clipped by the client to C (privacy=central, clip_side=client); the residual left is
    (Δ + r) with those coordinates zeroed. The upload is k int32 indices and k float32
    values as .npy: 128 + 4k + 128 + 4k bytes of arrays."""
    from flwr.app import RecordDict

    from fl_app.secagg.wire import payload_bytes

    central = ["privacy=central", "privacy.clip_side=client", "privacy.clip=0.05"]
    plain = _client_reply([], tmp_path / "plain")  # no client-level DP: Δ unclipped
    full = _update(plain)
    delta = np.concatenate([full[n].astype(np.float64).ravel() for n in full])
    assert delta.size == D
    residual = np.random.default_rng(7).normal(scale=0.01, size=D)
    state = tmp_path / "topk"
    state.mkdir()
    path = residual_path(state, RUN_KEY, "partition-0")
    save_safetensors(path, {RESIDUAL_KEY: residual}, {})
    reply = _client_reply([*central, *TOPK], state, clip=0.05)
    sent = _update(reply)
    k = math.ceil(0.1 * D)
    acc = delta + residual
    idx = _hand_topk(acc, k)
    np.testing.assert_array_equal(sent[INDICES_KEY], idx)
    clip = 0.05 / np.linalg.norm(acc[idx])
    assert clip < 1  # the clip binds: the sent values are scaled to norm C
    np.testing.assert_allclose(sent[VALUES_KEY], acc[idx] * clip, rtol=1e-5, atol=1e-8)
    assert np.linalg.norm(sent[VALUES_KEY]) == pytest.approx(0.05, rel=1e-5)
    left = acc.copy()
    left[idx] = 0.0
    np.testing.assert_allclose(load_residual(path, D), left, rtol=0, atol=1e-7)

    # Bytes up, measured on the replies' update records: two arrays of k against four of d.
    def up(msg: Message) -> int:
        return payload_bytes(RecordDict({"update": msg.content.array_records["update"]}))

    assert up(plain) == sum(_npy_bytes(s, np.float32) for s in SHAPES) == 4 * 128 + 4 * D
    assert up(reply) == _npy_bytes((k,), np.int32) + _npy_bytes((k,), np.float32)
    assert up(reply) == 2 * 128 + 8 * k  # the data shrink by k (4 + 4) / (4 d)


@pytest.mark.slow  # the slice's one end-to-end test (3 in-process clients, 2 rounds)
def test_central_dp_sums_the_scattered_clipped_replies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Central DP (trusted server, server-side clip C), top-k at 10 %: in every round the
    sum the noise is added to is Σ_i clip(scatter(indices_i, values_i), C) over the
    replies the server received (scattered and clipped here by hand); each site keeps its
    residual in the run's client state; bytes up are the replies' measured payloads."""
    from fl_app.client.app import app as client_app
    from fl_app.runtime.inprocess import InProcessGrid
    from fl_app.secagg.wire import payload_bytes
    from fl_app.server.app import run_experiment
    from fl_app.server.layout import RunLayout
    from strategies.dp_aggregators import CentralGaussianRelease

    bound = 0.05
    cfg = compose_config(
        "config",
        [
            *COMMON,
            *TOPK,
            "dataset.num_partitions=3",
            "num_rounds=2",
            "server_eval=false",
            "privacy=central",
            f"privacy.clip={bound}",
        ],
    )
    sums: dict[int, dict[str, np.ndarray]] = {}
    real_from_sum = CentralGaussianRelease.from_sum

    def from_sum(self: Any, rnd: int, s: Any, w: float, n: int, extra: Any) -> Any:
        sums[rnd] = {k: np.asarray(v, np.float64).copy() for k, v in s.items()}
        return real_from_sum(self, rnd, s, w, n, extra)

    monkeypatch.setattr(CentralGaussianRelease, "from_sum", from_sum)
    replies: dict[int, list[Message]] = {}

    def hook(node: int, reply: Message) -> Message | None:
        if reply.has_content() and "update" in reply.content.array_records:
            rnd = int(reply.content.metric_records["metrics"]["server-round"])
            replies.setdefault(rnd, []).append(reply)
        return reply

    grid = InProcessGrid(client_app, 3, seed=cfg.seed, message_hook=hook)
    try:
        summary = run_experiment(grid, cfg, tmp_path / "run", progress=False)
    finally:
        grid.close()
    assert summary["rounds"] == 2 and summary["bandwidth"]["compression"] == "topk"
    k = math.ceil(0.1 * D)
    for rnd in (1, 2):
        expected = np.zeros(D)
        for reply in replies[rnd]:
            sent = _update(reply)
            assert sent[INDICES_KEY].shape == (k,) and np.unique(sent[INDICES_KEY]).size == k
            full = np.zeros(D)
            full[sent[INDICES_KEY]] = sent[VALUES_KEY]
            expected += full * min(1.0, bound / float(np.linalg.norm(full)))
        got = np.concatenate([v.ravel() for v in sums[rnd].values()])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    rounds = [
        json.loads(line)
        for line in RunLayout(tmp_path / "run").metrics.read_text().splitlines()
        if '"bytes_up_per_client"' in line
    ]
    for line in rounds:
        n = int(line["round"])
        measured = sum(payload_bytes(r.content) for r in replies[n]) / len(replies[n])
        assert line["bytes_up_per_client"] == pytest.approx(measured)
    state = RunLayout(tmp_path / "run").client_state
    assert len(rounds) == 2
    assert len(list(Path(state).glob("topk-residual-*.safetensors"))) == 3


@pytest.mark.parametrize(
    "extra",
    [
        [],  # privacy.mode=none, secagg off
        ["privacy=central"],  # trusted server, server-side clip
        ["privacy=central", "privacy.clip_side=client"],
        ["privacy=dpsgd"],  # record-level DP-SGD, the server sees each update
    ],
)
def test_topk_is_accepted_where_the_server_sees_each_update(extra: list[str]) -> None:
    cfg = compose_config("config", [*COMMON, *TOPK, *extra])
    assert cfg.share.compression.value == "topk" and cfg.secagg.mode.value == "off"
    assert compose_config("config", [*COMMON, "share=topk", *extra]).share.ratio == 0.1


@pytest.mark.parametrize(
    "extra",
    [
        ["secagg=secaggplus", "secagg.clip=5.0"],
        [
            "privacy=central",
            "privacy.threat_model=honest_but_curious",
            "privacy.clip_side=client",
            "secagg=secaggplus",
        ],
        ["privacy=central", "privacy.clip_side=client", "secagg=secaggplus"],
        ["privacy=local"],
        ["privacy=distributed", "secagg=secaggplus"],
        ["privacy=dpsgd", "secagg=secaggplus", "secagg.clip=5.0"],
    ],
)
def test_topk_stays_refused_where_the_server_must_not_see_an_update(extra: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        compose_config("config", [*COMMON, *TOPK, *extra])
    assert type(err.value) is ConfigConflictError
    assert err.value.field == "share.compression"
    assert "use share.compression=randk" in str(err.value)


def test_the_client_refuses_topk_under_secure_aggregation_or_local_dp(tmp_path: Path) -> None:
    """A server could send a top-k spec the config check would refuse: the site refuses
    it too where its support would leave outside what the server sees anyway."""
    from fl_app.client.error_feedback import topk_stage
    from fl_app.client_spec import ClientDpSpec, spec_from_config

    cfg = compose_config("config", [*COMMON, *TOPK])
    node = {"partition-id": 0, "num-partitions": 4, "dp-state-dir": str(tmp_path)}
    stage = topk_stage(spec_from_config(cfg, RUN_KEY), node, secure=False)
    assert stage.path == residual_path(tmp_path, RUN_KEY, "partition-0")
    assert stage.topk == TopK(0.1)
    with pytest.raises(ClientRefusal, match="refused under secure aggregation"):
        topk_stage(spec_from_config(cfg, RUN_KEY), node, secure=True)
    local = spec_from_config(cfg, RUN_KEY, ClientDpSpec(local_noise_multiplier=1.0))
    with pytest.raises(ClientRefusal, match="refused under local DP"):
        topk_stage(local, node, secure=False)
    central = spec_from_config(cfg, RUN_KEY, ClientDpSpec())  # the client only clips
    assert topk_stage(central, node, secure=False).path == stage.path
    spec = spec_from_config(cfg, RUN_KEY)
    spec.share_state_dir = str(tmp_path / "shared")
    no_dir = {"partition-id": 0, "num-partitions": 4}
    assert topk_stage(spec, no_dir, secure=False).path.parent == tmp_path / "shared"
    spec.share_state_dir = None
    with pytest.raises(ClientRefusal) as err:
        topk_stage(spec, no_dir, secure=False)
    assert str(err.value) == (
        "share.compression=topk keeps a residual at the site, which needs a state folder: "
        'run the SuperNode with --node-config "dp-state-dir=/path"'
    )


def _sparse_msg(indices: list[int], values: list[float]) -> Message:
    from flwr.app import MetricRecord, RecordDict

    from fl_app.protocol import NUM_EXAMPLES, SERVER_ROUND
    from fl_app.weights import to_array_record

    update = {
        INDICES_KEY: np.array(indices, np.int32),
        VALUES_KEY: np.array(values, np.float32),
    }
    content = RecordDict(
        {
            "update": to_array_record(update),
            "metrics": MetricRecord({NUM_EXAMPLES: 3.0, SERVER_ROUND: 1}),
        }
    )
    return Message(content, dst_node_id=0, message_type="train")


def test_the_server_parses_and_scatters_each_topk_reply() -> None:
    """Indices (0, 5) and values (3, 4) in a model of 6: the update is (3, 0, 0, 0, 0, 4)
    in the model's shapes, of norm 5 (with the index 5 counted it would be √50)."""
    from fl_app.client.app import app as client_app
    from fl_app.runtime.inprocess import InProcessGrid

    grid = InProcessGrid(client_app, 1, seed=0)  # the task identity messages need
    try:
        _check_parse_and_scatter()
    finally:
        grid.close()


def _check_parse_and_scatter() -> None:
    from strategies.topk_replies import parse_reply, reply_spec
    from strategies.validation import Rejection, ReplyLimits, TrainReply

    model = {"a": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    topk = TopK(0.3)  # k = ceil(1.8) = 2
    expected = reply_spec(topk, model, model)
    assert expected == {INDICES_KEY: ((2,), "int32"), VALUES_KEY: ((2,), "float32")}
    assert reply_spec(None, model, model) == {"a": ((2, 2), "float32"), "b": ((2,), "float32")}

    def parse(msg: Message, limit: float = 1e4) -> TrainReply | Rejection:
        return parse_reply(
            topk,
            msg,
            server_round=1,
            expected=expected,
            limits=ReplyLimits(max_update_norm=limit),
            reference=None,
            model=model,
        )

    reply = parse(_sparse_msg([0, 5], [3.0, 4.0]))
    assert isinstance(reply, TrainReply)
    np.testing.assert_array_equal(reply.update["a"], [[3.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(reply.update["b"], [0.0, 4.0])
    assert reply.update_norm == 5.0 and reply.num_examples == 3.0
    over = parse(_sparse_msg([0, 5], [3.0, 4.0]), limit=4.9)
    assert isinstance(over, Rejection) and "exceeds" in over.reason
    repeated = parse(_sparse_msg([5, 5], [3.0, 4.0]))
    assert isinstance(repeated, Rejection) and repeated.reason.startswith("top-k update: ")
    assert "repeat" in repeated.reason and repeated.node_id == reply.node_id is not None
    # share.artifact=weights' reference passes through: the update is w - w_global.
    weights = parse_reply(
        None,
        _sparse_msg([0, 5], [3.0, 4.0]),
        server_round=1,
        expected=expected,
        limits=ReplyLimits(),
        reference={INDICES_KEY: np.array([0, 1], np.int32), VALUES_KEY: np.ones(2)},
        model=model,
    )
    assert isinstance(weights, TrainReply)
    np.testing.assert_array_equal(weights.update[VALUES_KEY], [2.0, 3.0])
    plain = parse_reply(
        None,
        _sparse_msg([0, 5], [3.0, 4.0]),
        server_round=1,
        expected=expected,
        limits=ReplyLimits(),
        reference=None,
        model=model,
    )
    assert isinstance(plain, TrainReply) and sorted(plain.update) == [INDICES_KEY, VALUES_KEY]
    assert plain.update_norm == pytest.approx(math.sqrt(9 + 16 + 25))


def test_core_edges_dtypes_ties_and_messages(tmp_path: Path) -> None:
    """Mutation-driven: float64 accumulation, int32/float32 wire dtypes, ties to the lower
    index among equal magnitudes, the residual file's metadata, and each refusal's text."""
    from fl_app.compression_topk import flatten, topk_indices, unflatten
    from fl_app.weights import load_safetensors

    assert flatten({"a": np.array([0.1], np.float32)}).dtype == np.float64
    with pytest.raises(ValueError, match="does not fill a model of 2"):
        unflatten(np.zeros(3), {"a": np.zeros(2)})
    huge = np.broadcast_to(np.zeros(1), (2**31,))  # a view: no memory behind it
    with pytest.raises(ValueError, match=r"at most 2\*\*31 - 1 coordinates"):
        topk_indices(huge, 1)
    ties = np.where(np.arange(1000) % 2 == 0, 1.0, -1.0)
    np.testing.assert_array_equal(topk_indices(ties, 10), np.arange(10))
    # Two magnitudes, random signs: after every |2|, the first five |1| by position.
    mixed = np.random.default_rng(0).choice([1.0, 2.0, -1.0, -2.0], size=300)
    twos = np.flatnonzero(np.abs(mixed) == 2)
    firsts = np.flatnonzero(np.abs(mixed) == 1)[:5]
    got = topk_indices(mixed, twos.size + 5)
    np.testing.assert_array_equal(got, np.sort(np.concatenate([twos, firsts])))
    with pytest.raises(ValueError, match="residual has shape"):
        TopK(0.5).compress({"w": np.ones(4)}, np.zeros(3))
    sent, _ = TopK(0.5).compress({"w": np.arange(4, dtype=np.float32)}, None)
    assert sent[VALUES_KEY].dtype == np.float32 and sent[INDICES_KEY].dtype == np.int32
    with pytest.raises(ValueError, match="holds 'indices' and 'values', got \\['w'\\]"):
        TopK(0.5).decompress({"w": np.ones(2)}, {"w": np.ones(4)})
    with pytest.raises(ValueError, match=r"^top-k indices repeat a coordinate$"):
        TopK(0.5).decompress(
            {INDICES_KEY: np.array([1, 1]), VALUES_KEY: np.ones(2)}, {"w": np.ones(4)}
        )
    with pytest.raises(ClientRefusal, match="safe file-name"):
        residual_path(tmp_path, "", "partition-0")
    stage = TopKStage(TopK(0.5), tmp_path / "r.safetensors")
    stage({"w": np.arange(4, dtype=np.float32)})
    assert load_safetensors(stage.path)[1] == {"fl-app": "topk-residual"}
    save_safetensors(stage.path, {RESIDUAL_KEY: np.ones(4, np.float32)}, {})
    loaded = load_residual(stage.path, 4)
    assert loaded is not None and loaded.dtype == np.float64
    save_safetensors(stage.path, {RESIDUAL_KEY: np.ones(4), "other": np.ones(1)}, {})
    with pytest.raises(ClientRefusal, match=r"move the file away to start from a zero residual$"):
        load_residual(stage.path, 4)
    stage.path.write_bytes(b"not a safetensors file")
    with pytest.raises(ClientRefusal, match=r"^top-k residual: "):
        load_residual(stage.path, 4)

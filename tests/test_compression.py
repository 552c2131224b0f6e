"""Compressed updates (share.compression; docs/compression.md).

random-k's mask is a public function of the run key and the round, recomputed here from
its stated derivation (SHA-256 of the tag, run key and round seeding PCG64). Under secure
aggregation the server's decoded sum equals the sum of the surviving clients' short
vectors, each clipped to the bound and weighted, formed here from what each client
compressed (one client's masked input is lost, so its masks are reconstructed);
the reply carrying a compressed update is smaller by the ratio within a measured header.
Refused combinations fail at config time with the field named.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from fl_app.compression import COMPRESSED_KEY, RandK, compressed_length, randk_coordinates
from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigConflictError, ConfigError, ConfigRangeError

RUN_KEY = "0123456789abcdef0123456789abcdef"


def _hand_mask(run_key: str, rnd: int, d: int, k: int) -> np.ndarray:
    seed = hashlib.sha256(f"fl-app/randk/v1|{run_key}|{rnd}".encode()).digest()
    gen = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
    return np.sort(gen.choice(d, size=k, replace=False))


def test_decompress_places_every_array_at_its_own_offset() -> None:
    """Three arrays: each gets its own slice of the scattered vector (ratio 1 keeps all)."""
    model = {
        "a": np.arange(4, dtype=np.float32).reshape(2, 2),
        "b": np.arange(4, 7, dtype=np.float32),
        "c": np.arange(7, 9, dtype=np.float32),
    }
    randk = RandK(RUN_KEY, 1.0)
    full = randk.decompress(1, randk.compress(1, model), model)
    for name, values in model.items():
        np.testing.assert_array_equal(full[name], values)


def test_compressed_length_is_ceil_of_ratio_times_d() -> None:
    assert compressed_length(1000, 0.1) == 100
    assert compressed_length(10, 0.25) == 3  # ceil(2.5)
    assert compressed_length(10, 1.0) == 10
    assert compressed_length(7, 0.01) == 1  # at least one coordinate
    assert compressed_length(1, 0.5) == 1  # a one-coordinate model is valid
    for bad in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="ratio"):
            compressed_length(10, bad)
    with pytest.raises(ValueError, match="dimension"):
        compressed_length(0, 0.5)


def test_randk_mask_is_the_public_derivation_and_shared_by_every_client() -> None:
    idx = randk_coordinates(RUN_KEY, 3, 1000, 100)
    np.testing.assert_array_equal(idx, _hand_mask(RUN_KEY, 3, 1000, 100))
    assert len(set(idx.tolist())) == 100 and idx.min() >= 0 and idx.max() < 1000
    assert list(idx) == sorted(idx)
    # Another round, another run: another mask (the same in every client of each).
    assert not np.array_equal(idx, randk_coordinates(RUN_KEY, 4, 1000, 100))
    assert not np.array_equal(idx, randk_coordinates("f" * 32, 3, 1000, 100))


def test_randk_compress_keeps_the_masked_values_whatever_the_data() -> None:
    rng = np.random.default_rng(7)
    update = {
        "a": rng.normal(size=(4, 5)).astype(np.float32),
        "b": rng.normal(size=10).astype(np.float32),
    }
    randk = RandK(RUN_KEY, 0.2)
    short = randk.compress(2, update)
    assert list(short) == [COMPRESSED_KEY]
    flat = np.concatenate([update["a"].ravel(), update["b"]])
    idx = _hand_mask(RUN_KEY, 2, 30, 6)
    np.testing.assert_array_equal(short[COMPRESSED_KEY], flat[idx])
    assert short[COMPRESSED_KEY].dtype == np.float32
    # Other data, the same coordinates: the mask depends on no update.
    other = {k: v * 3 + 1 for k, v in update.items()}
    np.testing.assert_array_equal(randk.compress(2, other)[COMPRESSED_KEY], (flat * 3 + 1)[idx])
    # The server scatters into the model's shapes; unsent coordinates are 0.
    full = randk.decompress(2, short, update)
    assert {k: (v.shape, v.dtype) for k, v in full.items()} == {
        "a": ((4, 5), np.float32),
        "b": ((10,), np.float32),
    }
    got = np.concatenate([full["a"].ravel(), full["b"]])
    expected = np.zeros(30, np.float32)
    expected[idx] = flat[idx]
    np.testing.assert_array_equal(got, expected)
    template = randk.wire_template(2, update)
    assert template[COMPRESSED_KEY].shape == (6,)
    assert template[COMPRESSED_KEY].dtype == np.float32  # the replies' dtype
    with pytest.raises(ValueError, match="shape"):
        randk.decompress(2, {COMPRESSED_KEY: np.zeros(5)}, update)
    with pytest.raises(ValueError, match="holds only"):
        randk.decompress(2, {"a": np.zeros(6)}, update)


COMMON = ["runtime=inprocess", "dataset.num_partitions=4", "train.local_epochs=1"]
RANDK = ["share.artifact=compressed", "share.compression=randk", "share.ratio=0.1"]


TOPK = ["share.artifact=compressed", "share.compression=topk"]


@pytest.mark.parametrize(
    ("overrides", "field", "kind", "words"),
    [
        (["share.artifact=compressed"], "share.artifact", ConfigConflictError, "set both"),
        (["share.compression=randk"], "share.artifact", ConfigConflictError, "set both"),
        ([*RANDK[:2], "share.ratio=0"], "share.ratio", ConfigRangeError, "(0, 1]"),
        ([*RANDK[:2], "share.ratio=1.5"], "share.ratio", ConfigRangeError, "(0, 1]"),
        (
            [*TOPK, "secagg=secaggplus", "secagg.clip=5.0"],
            "share.compression",
            ConfigConflictError,
            "use share.compression=randk",
        ),
        ([*TOPK, "privacy=local"], "share.compression", ConfigConflictError, "leaks"),
        (
            [*TOPK, "privacy=distributed", "secagg=secaggplus"],
            "share.compression",
            ConfigConflictError,
            "leaks",
        ),
    ],
)
def test_refused_combinations_fail_before_the_run(
    overrides: list[str], field: str, kind: type[ConfigError], words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        compose_config("config", [*COMMON, *overrides])
    assert type(err.value) is kind
    assert err.value.field == field
    assert words in str(err.value)


def test_randk_group_composes_and_validates() -> None:
    cfg = compose_config("config", [*COMMON, "share=randk"])
    assert cfg.share.compression.value == "randk" and cfg.share.ratio == 0.1
    cfg = compose_config("config", [*COMMON, *RANDK, "secagg=secaggplus", "secagg.clip=5.0"])
    assert cfg.share.artifact.value == "compressed"


@pytest.mark.slow  # the slice's one end-to-end test (5 in-process clients, ~20 s)
def test_randk_under_secagg_is_the_exact_sum_of_the_survivors_short_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5 in-process clients, SecAgg+, random-k at 10 %; node 0 of the round loses its
    masked input (its masks are reconstructed). The decoded sum equals
    sum_u w_u * clip(v_u, C) over the other three, with v_u what client u compressed."""
    from fl_app.client.app import app as client_app
    from fl_app.runtime.inprocess import InProcessGrid
    from fl_app.secagg.vector import VectorLayout, round_codec
    from fl_app.server.app import initial_arrays, run_experiment
    from fl_app.server.layout import RunLayout
    from fl_app.weights import load_safetensors
    from strategies.aggregators import ExactMean

    bound = 0.5
    cfg = compose_config(
        "config",
        [
            *COMMON,
            *RANDK,
            "num_rounds=1",
            "server_eval=false",
            "secagg=secaggplus",
            f"secagg.clip={bound}",
            "dataset.num_partitions=5",
            "secagg.dropout_tolerance=0.4",
            "secagg.stage_timeout_s=3",
        ],
    )
    compressed: list[np.ndarray] = []
    weights: list[float] = []
    sums: list[tuple[dict[str, np.ndarray], float]] = []
    real_compress, real_flatten, real_from_sum = (
        RandK.compress,
        VectorLayout.flatten_input,
        ExactMean.from_sum,
    )

    def compress(self: RandK, rnd: int, update: Any) -> dict[str, np.ndarray]:
        out = real_compress(self, rnd, update)
        compressed.append(out[COMPRESSED_KEY].astype(np.float64))
        return out

    def flatten(self: VectorLayout, update: Any, **kw: Any) -> np.ndarray:
        weights.append(float(kw["weight"]))
        return real_flatten(self, update, **kw)

    def from_sum(self: ExactMean, rnd: int, s: Any, w: float, n: int, extra: Any) -> Any:
        sums.append(({k: np.asarray(v, np.float64) for k, v in s.items()}, w))
        return real_from_sum(self, rnd, s, w, n, extra)

    monkeypatch.setattr(RandK, "compress", compress)
    monkeypatch.setattr(VectorLayout, "flatten_input", flatten)
    monkeypatch.setattr(ExactMean, "from_sum", from_sum)
    per_node: dict[int, tuple[np.ndarray, float]] = {}
    lost: list[int] = []

    def hook(node: int, reply: Message) -> Message | None:
        if reply.has_content() and "masked" in reply.content:
            per_node[node] = (compressed[-1], weights[-1])
            if not lost:
                lost.append(node)
                return None
        return reply

    grid = InProcessGrid(client_app, 5, seed=cfg.seed, message_hook=hook)
    try:
        summary = run_experiment(grid, cfg, tmp_path / "run", progress=False)
    finally:
        grid.close()
    assert summary["rounds"] == 1
    assert summary["bandwidth"]["compression"] == "randk"
    assert len(per_node) == 5 and len(lost) == 1
    (total, total_weight) = sums[0]
    assert list(total) == [COMPRESSED_KEY]
    survivors = [n for n in per_node if n not in lost]
    k = compressed_length(64 * 64 + 64 + 64 * 10 + 10, 0.1)
    expected = np.zeros(k)
    for n in survivors:
        v, w = per_node[n]
        assert v.shape == (k,)
        expected += w * v * min(1.0, bound / float(np.linalg.norm(v)))
    assert total_weight == pytest.approx(sum(per_node[n][1] for n in survivors), abs=1e-6)
    # Exact up to the encoding: fixed-point stochastic rounding moves each client's
    # coordinate by less than one step, and the client clips in float32 (Δ's dtype), one
    # float32 rounding of a value of at most the bound.
    step = 1.0 / round_codec(32, bound, 5).scale
    atol = len(survivors) * (step + float(np.finfo(np.float32).eps) * bound)
    assert atol < 1e-6
    np.testing.assert_allclose(total[COMPRESSED_KEY], expected, rtol=0, atol=atol)
    # The model moves by that sum / the total weight on the round's public coordinates
    # (recomputed from the run key in run.json) and not at all elsewhere (FedAvg, lr 1).
    manifest = json.loads(RunLayout(tmp_path / "run").run_manifest.read_text())
    assert manifest["share"] == {
        "artifact": "compressed",
        "layers": ["*"],
        "compression": "randk",
        "ratio": 0.1,
    }
    run_key = manifest["run_key"]
    start, final = initial_arrays(cfg), load_safetensors(RunLayout(tmp_path / "run").model)[0]
    moved = np.concatenate([(final[n].astype(np.float64) - start[n]).ravel() for n in start])
    idx = _hand_mask(run_key, 1, moved.size, k)
    outside = np.ones(moved.size, bool)
    outside[idx] = False
    assert not moved[outside].any()
    np.testing.assert_allclose(moved[idx], expected / total_weight, rtol=0, atol=1e-6)


def _client_reply(overrides: list[str], ratio_overrides: list[str]) -> tuple[Message, int]:
    """One real ClientApp train reply (round 1, partition 0) and the model dimension."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from fl_app.client.app import app as client_app
    from fl_app.client_spec import encode_spec, spec_from_config
    from fl_app.runtime.inprocess import InProcessGrid
    from fl_app.server.app import initial_arrays
    from fl_app.weights import to_array_record

    cfg = compose_config("config", [*COMMON, *overrides, *ratio_overrides])
    start = initial_arrays(cfg)
    content = RecordDict(
        {
            "arrays": to_array_record(start),
            "config": ConfigRecord(
                {"fl-app.spec": encode_spec(spec_from_config(cfg, RUN_KEY)), "server-round": 1}
            ),
        }
    )
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 0, "num-partitions": 4},
        state=RecordDict(),
        run_config={},
    )
    grid = InProcessGrid(client_app, 4, seed=0)  # the server-side task identity
    try:
        msg = Message(content, dst_node_id=5, message_type="train")
        msg.metadata.__dict__["_message_id"] = "m1-5"
        reply = client_app(msg, context)
    finally:
        grid.close()
    assert not reply.has_error(), reply.error.reason
    return reply, sum(int(a.size) for a in start.values())


def _npy_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of a float32 array of ``shape`` in NumPy's .npy format (header + data), as
    Flower's ArrayRecord serializes it, written here by numpy itself."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, np.float32), allow_pickle=False)
    return len(buf.getvalue())


def test_bytes_up_shrink_by_the_ratio_within_the_header() -> None:
    """The reply's payload (fl_app.secagg.wire.payload_bytes: array data as serialized,
    8 bytes per scalar) is the same scalars plus each array as .npy (a 128-byte header
    and 4 bytes per float32 coordinate): 4 arrays of d coordinates uncompressed, one of
    ceil(0.1 d) under random-k at 10 %."""
    from fl_app.secagg.wire import payload_bytes

    full, d = _client_reply([], [])
    short, _ = _client_reply(RANDK, [])
    assert d == 64 * 64 + 64 + 64 * 10 + 10
    k = math.ceil(0.1 * d)
    shapes = [(64, 64), (64,), (10, 64), (10,)]
    scalars_full = payload_bytes(full.content) - sum(_npy_bytes(s) for s in shapes)
    scalars_short = payload_bytes(short.content) - _npy_bytes((k,))
    assert scalars_full == scalars_short and scalars_full % 8 == 0 and 0 < scalars_full <= 80
    assert _npy_bytes((k,)) == 128 + 4 * k
    # Array data alone shrinks by exactly k/d; the whole payload within the headers.
    assert (payload_bytes(short.content) - scalars_short - 128) / 4 == k
    update = short.content.array_records["update"]
    assert list(update) == [COMPRESSED_KEY]


def test_stage_bytes_are_the_payloads_per_sampled_client() -> None:
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from fl_app.client.app import app as client_app
    from fl_app.runtime.inprocess import InProcessGrid
    from strategies.bandwidth import stage_bytes

    grid = InProcessGrid(client_app, 1, seed=0)  # the server-side task identity
    try:
        down = Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": _array((100,))}),
                    "config": ConfigRecord({"a": 1, "b": 2.0}),
                }
            ),
            dst_node_id=5,
            message_type="train",
        )
        up = Message(
            RecordDict({"update": ArrayRecord({"w": _array((10,))})}),
            dst_node_id=5,
            message_type="train",
        )
    finally:
        grid.close()
    # 3 sampled, 2 instructions pushed, 1 reply: (2 * (128 + 400 + 16)) / 3 and (128 + 40) / 3.
    got = stage_bytes([down, down], [up], 3)
    assert got == {
        "bytes_up_per_client": (128 + 40) / 3,
        "bytes_down_per_client": 2 * (128 + 400 + 16) / 3,
    }
    assert stage_bytes([], [], 0) == {}
    assert stage_bytes([], [up], 1) == {"bytes_up_per_client": 168.0, "bytes_down_per_client": 0.0}


def _array(shape: tuple[int, ...]) -> Any:
    from flwr.app import Array

    return Array(np.zeros(shape, np.float32))


def test_summary_bandwidth_block_of_a_plain_run() -> None:
    from types import SimpleNamespace

    from fl_app.server.summary import _bandwidth_summary

    reports = [
        SimpleNamespace(privacy={"bytes_up_per_client": 100.0, "bytes_down_per_client": 400.0}),
        SimpleNamespace(privacy={"bytes_up_per_client": 300.0, "bytes_down_per_client": 400.0}),
    ]
    cfg = compose_config("config", [*COMMON, *RANDK])
    block = _bandwidth_summary(cfg, SimpleNamespace(reports=reports))  # type: ignore[arg-type]
    assert block == {
        "rounds_measured": 2,
        "upload_bytes_per_client_round": 200.0,
        "download_bytes_per_client_round": 400.0,
        "note": "payload bytes of the train instructions and replies (framing excluded)",
        "compression": "randk",
        "ratio": 0.1,
    }
    plain = _bandwidth_summary(compose_config("config", COMMON), SimpleNamespace(reports=reports))  # type: ignore[arg-type]
    assert plain is not None and "compression" not in plain
    assert _bandwidth_summary(cfg, SimpleNamespace(reports=[])) is None  # type: ignore[arg-type]

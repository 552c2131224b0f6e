"""Count-sketch compression (share.compression=sketch; fl_app/compression_sketch.py).

The hashes are recomputed here from their stated public derivation (SHA-256 of the tag,
run key and round seeding PCG64: buckets, then signs). The estimate is checked against a
table and medians worked by hand, recovery against a sparse vector built here, linearity
exactly on integer-valued vectors, clipping on a real client's reply (the sent sketch,
not Δ, is bounded), and under secure aggregation with a dropout the decoded sum against
the sketch of the survivors' clipped, weighted updates, formed here with the derived
hashes. Refused combinations fail at config time with the field named.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from fl_app.compression import COMPRESSED_KEY
from fl_app.compression_sketch import (
    CountSketch,
    estimate,
    sketch_hashes,
    sketch_shape,
    sketch_table,
    top_estimates,
)
from fl_app.config.compose import compose_config
from fl_app.config.errors import ConfigConflictError, ConfigError, ConfigRangeError
from tests.test_compression import COMMON, RUN_KEY, _client_reply, _npy_bytes

SKETCH = ["share.artifact=compressed", "share.compression=sketch", "share.ratio=0.1"]
D_MLP = 64 * 64 + 64 + 64 * 10 + 10  # the default MLP's parameters (4,810)


def _hand_hashes(run_key: str, rnd: int, d: int, r: int, c: int) -> tuple[Any, Any]:
    seed = hashlib.sha256(f"fl-app/sketch/v1|{run_key}|{rnd}".encode()).digest()
    gen = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
    buckets = gen.integers(0, c, size=(r, d))
    signs = 2 * gen.integers(0, 2, size=(r, d)) - 1
    return buckets, signs


def _hand_sketch(x: np.ndarray, buckets: np.ndarray, signs: np.ndarray, c: int) -> np.ndarray:
    """S[j, b] = sum of s_j(i) x_i over h_j(i) = b, by loops."""
    table = np.zeros((buckets.shape[0], c))
    for j in range(buckets.shape[0]):
        for i in range(x.size):
            table[j, buckets[j, i]] += signs[j, i] * x[i]
    return table


# A tiny sketch fixed by hand: d = 6, r = 3, c = 4.
H = np.array([[0, 1, 2, 3, 0, 1], [1, 1, 0, 2, 3, 3], [2, 0, 1, 3, 3, 0]])
S = np.array([[1, -1, 1, 1, -1, 1], [1, 1, -1, 1, 1, -1], [-1, 1, 1, 1, -1, 1]], dtype=float)
X = np.array([3.0, -1.0, 0.0, 2.0, 4.0, 5.0])


def test_tiny_sketch_and_its_estimates_worked_by_hand() -> None:
    """Row 0: bucket 0 = x0 - x4 = -1, 1 = -x1 + x5 = 6, 2 = x2 = 0, 3 = x3 = 2; row 1:
    0 = -x2 = 0, 1 = x0 + x1 = 2, 2 = x3 = 2, 3 = x4 - x5 = -1; row 2: 0 = x1 + x5 = 4,
    1 = x2 = 0, 2 = -x0 = -3, 3 = x3 - x4 = -2. Coordinate 0 reads (+1·-1, +1·2, -1·-3)
    = (-1, 2, 3), median 2; 1: (-6, 2, 4) -> 2; 2: (0, 0, 0) -> 0; 3: (2, 2, -2) -> 2;
    4: (1, -1, 2) -> 1; 5: (6, 1, 4) -> 4."""
    table = sketch_table(X, H, S, 4)
    np.testing.assert_array_equal(table, [[-1, 6, 0, 2], [0, 2, 2, -1], [4, 0, -3, -2]])
    np.testing.assert_array_equal(estimate(table, H, S), [2, 2, 0, 2, 1, 4])
    # Top 2 by magnitude: 4 (coordinate 5), then the lowest index among the 2s.
    np.testing.assert_array_equal(top_estimates(estimate(table, H, S), 2), [2, 0, 0, 0, 0, 4])
    np.testing.assert_array_equal(top_estimates(np.array([-3.0, 1.0, 2.0]), 1), [-3, 0, 0])
    # Ties among many equal magnitudes go to the lowest indices (an unstable sort would not).
    many = np.ones(100)
    many[50:] = -2.0
    want = np.zeros(100)
    want[50:60] = -2.0
    np.testing.assert_array_equal(top_estimates(many, 10), want)
    # A fifth column no coordinate hashes to stays in the table, as zeros.
    np.testing.assert_array_equal(
        sketch_table(X, H, S, 5), [[-1, 6, 0, 2, 0], [0, 2, 2, -1, 0], [4, 0, -3, -2, 0]]
    )
    with pytest.raises(ValueError, match="do not fit"):
        sketch_table(X[:5], H, S, 4)


def test_hashes_are_the_public_derivation_and_change_every_round() -> None:
    buckets, signs = sketch_hashes(RUN_KEY, 3, 500, 5, 40)
    hand_b, hand_s = _hand_hashes(RUN_KEY, 3, 500, 5, 40)
    np.testing.assert_array_equal(buckets, hand_b)
    np.testing.assert_array_equal(signs, hand_s)
    assert buckets.min() == 0 and buckets.max() == 39 and set(np.unique(signs)) == {-1, 1}
    assert not np.array_equal(buckets, sketch_hashes(RUN_KEY, 4, 500, 5, 40)[0])
    assert not np.array_equal(buckets, sketch_hashes("f" * 32, 3, 500, 5, 40)[0])


def test_sketch_shape_fits_the_ratio() -> None:
    # ceil(0.1 * 4810) = 481 cells at most: 5 rows of floor(481 / 5) = 96 columns.
    assert sketch_shape(D_MLP, 0.1, 5) == (5, 96)
    assert sketch_shape(10, 0.5, 3) == (3, 1)  # 5 cells, 3 rows: 1 column
    assert sketch_shape(10, 0.1, 3) == (3, 1)  # never fewer than 1 column
    assert sketch_shape(100, 1.0, 1) == (1, 100)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="rows"):
            sketch_shape(10, 0.5, bad)  # type: ignore[arg-type]


def test_compress_is_the_row_major_sketch_and_linear() -> None:
    """The sent vector is the table row by row; the sketch of a sum is the sum of the
    sketches, exactly (integer-valued updates: no float rounding)."""
    rng = np.random.default_rng(11)
    a = {"w": rng.integers(-50, 50, size=(6, 5)).astype(np.float32), "b": np.arange(10.0)}
    b = {"w": rng.integers(-50, 50, size=(6, 5)).astype(np.float32), "b": -(np.arange(10.0) ** 2)}
    sk = CountSketch(RUN_KEY, 0.5, 3)  # d = 40: 20 cells, 3 rows of 6 columns
    assert sk.shape(40) == (3, 6)
    sent_a, sent_b = sk.compress(2, a), sk.compress(2, b)
    assert list(sent_a) == [COMPRESSED_KEY] and sent_a[COMPRESSED_KEY].shape == (18,)
    assert sent_a[COMPRESSED_KEY].dtype == np.float64  # the update's (widest) dtype
    flat = np.concatenate([a["w"].ravel(), a["b"]]).astype(np.float64)
    hb, hs = _hand_hashes(RUN_KEY, 2, 40, 3, 6)
    np.testing.assert_array_equal(sent_a[COMPRESSED_KEY], _hand_sketch(flat, hb, hs, 6).ravel())
    both = {k: a[k].astype(np.float64) + b[k] for k in a}
    np.testing.assert_array_equal(
        sent_a[COMPRESSED_KEY] + sent_b[COMPRESSED_KEY], sk.compress(2, both)[COMPRESSED_KEY]
    )
    template = sk.wire_template(2, a)
    assert template[COMPRESSED_KEY].shape == (18,) and not template[COMPRESSED_KEY].any()


def test_a_sparse_vector_is_recovered_exactly_when_the_sketch_is_wide() -> None:
    """4 nonzeros among d = 2,000 in 7 rows of 285 columns (ratio 1): with so few heavy
    coordinates most rows hold each alone, so every median reads its exact value and every
    other coordinate reads 0. Each round draws new hashes; all recover."""
    d = 2000
    x = np.zeros(d, np.float32)
    x[[17, 500, 1203, 1999]] = [3.5, -2.0, 0.25, 8.0]
    model = {"a": np.zeros((1000, 2), np.float32)}
    sk = CountSketch(RUN_KEY, 1.0, 7)
    for rnd in range(1, 6):
        sent = sk.compress(rnd, {"a": x.reshape(1000, 2)})
        back = sk.decompress(rnd, sent, model)
        assert back["a"].dtype == np.float32
        np.testing.assert_array_equal(back["a"].ravel(), x)


def test_decompress_keeps_the_k_largest_estimates_of_the_ratio() -> None:
    """ratio 0.5 of d = 40 keeps k = 20 estimates: a vector with 20 large and 20 tiny
    coordinates comes back with at most 20 nonzeros, in the arrays' own shapes."""
    x = np.concatenate([np.full(20, 100.0), np.full(20, 1e-3)])
    model = {"w": np.zeros((5, 4)), "b": np.zeros(20)}
    sk = CountSketch(RUN_KEY, 0.5, 1)  # one row of 20 columns: estimates are bucket values
    back = sk.decompress(1, sk.compress(1, {"w": x[:20].reshape(5, 4), "b": x[20:]}), model)
    assert back["w"].shape == (5, 4) and back["b"].shape == (20,)
    flat = np.concatenate([back["w"].ravel(), back["b"]])
    assert np.count_nonzero(flat) <= 20
    hb, hs = _hand_hashes(RUN_KEY, 1, 40, 1, 20)
    est = hs[0] * _hand_sketch(x, hb, hs, 20)[0, hb[0]]
    keep = np.argsort(-np.abs(est), kind="stable")[:20]
    expected = np.zeros(40)
    expected[keep] = est[keep]
    np.testing.assert_array_equal(flat, expected)
    with pytest.raises(ValueError, match=r"expected \(20,\) \(1 rows x 20 columns\)"):
        sk.decompress(1, {COMPRESSED_KEY: np.zeros(19)}, model)
    with pytest.raises(ValueError, match="holds only"):
        sk.decompress(1, {"w": np.zeros(20)}, model)


def test_client_clips_the_sent_sketch_not_only_the_update(tmp_path: Path) -> None:
    """A real client under central DP with client-side clipping at C = 0.01 (binding)
    sends C · AΔ / ‖AΔ‖, with Δ the same client's update trained without compression and
    A the round's sketch (hashes derived here). A sketch's norm is about sqrt(rows) times
    Δ's (collisions add), so clipping Δ and then sketching, C · AΔ / ‖Δ‖, would not bound
    what is sent by C."""
    from tests.test_topk import _client_reply as reply_with_clip
    from tests.test_topk import _update

    bound = 0.01
    plain = _update(reply_with_clip([], tmp_path / "plain"))
    delta = np.concatenate([plain[k].astype(np.float64).ravel() for k in plain])
    central = ["privacy=central", "privacy.clip_side=client", f"privacy.clip={bound}"]
    sent = _update(reply_with_clip([*central, *SKETCH], tmp_path / "sk", clip=bound))
    assert list(sent) == [COMPRESSED_KEY]
    hb, hs = _hand_hashes(RUN_KEY, 1, D_MLP, 5, 96)
    table = _hand_sketch(delta, hb, hs, 96).ravel()
    assert np.linalg.norm(table) > 1.5 * np.linalg.norm(delta) > 1.5 * bound
    np.testing.assert_allclose(
        sent[COMPRESSED_KEY], bound * table / np.linalg.norm(table), rtol=1e-4, atol=1e-9
    )
    assert float(np.linalg.norm(sent[COMPRESSED_KEY].astype(np.float64))) <= bound * (1 + 1e-6)


def test_bytes_up_shrink_to_the_sketch_within_the_header() -> None:
    """One array of r·c = 480 float32 cells (128-byte .npy header) against 4 arrays of
    d = 4,810 coordinates: the array data shrink by exactly 480 / 4,810 (≈ ratio 0.1)."""
    from fl_app.secagg.wire import payload_bytes

    full, d = _client_reply([], [])
    short, _ = _client_reply(SKETCH, [])
    assert d == D_MLP
    shapes = [(64, 64), (64,), (10, 64), (10,)]
    scalars_full = payload_bytes(full.content) - sum(_npy_bytes(s) for s in shapes)
    scalars_short = payload_bytes(short.content) - _npy_bytes((480,))
    assert scalars_full == scalars_short and scalars_full % 8 == 0
    assert (payload_bytes(short.content) - scalars_short - 128) / 4 == 480
    assert 480 / d == pytest.approx(0.1, abs=0.001)


@pytest.mark.parametrize(
    ("overrides", "field", "kind", "words"),
    [
        ([*SKETCH, "share.sketch_rows=0"], "share.sketch_rows", ConfigRangeError, ">= 1"),
        # ceil(0.001 * 4810) = 5 cells cannot hold 6 rows.
        (
            [*SKETCH[:2], "share.ratio=0.001", "share.sketch_rows=6"],
            "share.sketch_rows",
            ConfigRangeError,
            "ceil(ratio * d) = 5",
        ),
        (["share.compression=sketch"], "share.artifact", ConfigConflictError, "set both"),
        (
            [*SKETCH, "privacy=ftrl"],
            "share.compression",
            ConfigConflictError,
            "the count sketch new hashes",
        ),
    ],
)
def test_refused_sketch_settings_fail_before_the_run(
    overrides: list[str], field: str, kind: type[ConfigError], words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        compose_config("config", [*COMMON, *overrides])
    assert type(err.value) is kind
    assert err.value.field == field
    assert words in str(err.value)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["secagg=secaggplus", "secagg.clip=1.0"],
        ["privacy=central"],
        ["privacy=distributed", "secagg=secaggplus"],
        ["privacy=local"],
        ["privacy=dpsgd"],
    ],
)
def test_sketch_composes_with_every_privacy_mode_but_ftrl(extra: list[str]) -> None:
    cfg = compose_config("config", [*COMMON, "share=sketch", *extra])
    assert cfg.share.compression.value == "sketch" and cfg.share.sketch_rows == 5


def test_distributed_dp_and_secagg_size_their_vectors_by_the_sketch() -> None:
    from fl_app.config.client_dp import model_dimension, shared_dimension

    cfg = compose_config("config", [*COMMON, "share=sketch"])
    assert model_dimension(cfg) == 480 and shared_dimension(cfg) == D_MLP
    cfg = compose_config("config", [*COMMON, "share=sketch", "share.sketch_rows=3"])
    assert model_dimension(cfg) == 3 * 160


def test_short_run_learns_and_uploads_the_sketch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5 in-process clients, 6 plain rounds at ratio 0.1 on digits, a fixed run key: the
    model beats chance (0.1) by far, each upload is the 480-cell sketch plus its scalars
    (as measured above), and summary.json and run.json name the sketch."""
    import uuid

    from fl_app.client.app import app as client_app
    from fl_app.runtime.inprocess import InProcessGrid
    from fl_app.server.app import run_experiment
    from fl_app.server.layout import RunLayout

    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(RUN_KEY))
    cfg = compose_config(
        "config", [*COMMON, "share=sketch", "dataset.num_partitions=5", "num_rounds=6"]
    )
    grid = InProcessGrid(client_app, 5, seed=cfg.seed)
    try:
        summary = run_experiment(grid, cfg, tmp_path / "run", progress=False)
    finally:
        grid.close()
    assert summary["accuracy"] >= 0.6, summary["accuracy"]  # 0.87 here; chance is 0.1
    band = summary["bandwidth"]
    assert band["compression"] == "sketch" and band["sketch_rows"] == 5 and band["ratio"] == 0.1
    # The reply: 128 + 4 * 480 bytes of the sketch and at most 10 scalars of 8 bytes.
    assert 128 + 4 * 480 < band["upload_bytes_per_client_round"] <= 128 + 4 * 480 + 80
    manifest = json.loads(RunLayout(tmp_path / "run").run_manifest.read_text())
    assert manifest["run_key"] == RUN_KEY
    assert manifest["share"] == {
        "artifact": "compressed",
        "layers": ["*"],
        "compression": "sketch",
        "ratio": 0.1,
        "sketch_rows": 5,
    }


@pytest.mark.slow  # the slice's one end-to-end test (5 in-process clients under SecAgg+)
def test_sketch_under_secagg_sums_the_survivors_sketches_and_unsketches_the_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5 in-process clients, SecAgg+, sketch at 10 %; one client loses its masked input.
    The decoded sum equals the sketch (hashes derived here) of sum_u w_u f_u Δ_u over the
    other four, with f_u = min(1, C / ‖sketch(Δ_u)‖) the clip of what u sent; the model
    moves by the top-k median estimates of that sum / the total weight, nowhere else."""
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
            *SKETCH,
            "num_rounds=1",
            "server_eval=false",
            "secagg=secaggplus",
            f"secagg.clip={bound}",
            "dataset.num_partitions=5",
            "secagg.dropout_tolerance=0.4",
            "secagg.stage_timeout_s=3",
        ],
    )
    deltas: list[np.ndarray] = []
    weights: list[float] = []
    sums: list[tuple[dict[str, np.ndarray], float]] = []
    real_compress, real_flatten, real_from_sum = (
        CountSketch.compress,
        VectorLayout.flatten_input,
        ExactMean.from_sum,
    )

    def compress(self: CountSketch, rnd: int, update: Any) -> dict[str, np.ndarray]:
        deltas.append(np.concatenate([np.asarray(a, np.float64).ravel() for a in update.values()]))
        return real_compress(self, rnd, update)

    def flatten(self: VectorLayout, update: Any, **kw: Any) -> np.ndarray:
        weights.append(float(kw["weight"]))
        return real_flatten(self, update, **kw)

    def from_sum(self: ExactMean, rnd: int, s: Any, w: float, n: int, extra: Any) -> Any:
        sums.append(({k: np.asarray(v, np.float64) for k, v in s.items()}, w))
        return real_from_sum(self, rnd, s, w, n, extra)

    monkeypatch.setattr(CountSketch, "compress", compress)
    monkeypatch.setattr(VectorLayout, "flatten_input", flatten)
    monkeypatch.setattr(ExactMean, "from_sum", from_sum)
    per_node: dict[int, tuple[np.ndarray, float]] = {}
    lost: list[int] = []

    def hook(node: int, reply: Message) -> Message | None:
        if reply.has_content() and "masked" in reply.content:
            per_node[node] = (deltas[-1], weights[-1])
            if not lost:
                lost.append(node)
                return None
        return reply

    grid = InProcessGrid(client_app, 5, seed=cfg.seed, message_hook=hook)
    try:
        summary = run_experiment(grid, cfg, tmp_path / "run", progress=False)
    finally:
        grid.close()
    assert summary["rounds"] == 1 and summary["bandwidth"]["compression"] == "sketch"
    assert len(per_node) == 5 and len(lost) == 1
    total, total_weight = sums[0]
    assert list(total) == [COMPRESSED_KEY] and total[COMPRESSED_KEY].shape == (480,)
    run_key = json.loads(RunLayout(tmp_path / "run").run_manifest.read_text())["run_key"]
    hb, hs = _hand_hashes(run_key, 1, D_MLP, 5, 96)
    combined = np.zeros(D_MLP)
    for node, (delta, w) in per_node.items():
        if node in lost:
            continue
        sent_norm = float(np.linalg.norm(_hand_sketch(delta, hb, hs, 96)))
        combined += w * min(1.0, bound / sent_norm) * delta
    expected = _hand_sketch(combined, hb, hs, 96).ravel()
    assert total_weight == pytest.approx(
        sum(w for n, (_, w) in per_node.items() if n not in lost), abs=1e-6
    )
    # Exact up to the encoding (stochastic rounding by less than one step per client)
    # and the client's float32 sketch and clip (a float32 rounding of values <= bound).
    step = 1.0 / round_codec(32, bound, 5).scale
    atol = 4 * (step + 4 * float(np.finfo(np.float32).eps) * bound)
    np.testing.assert_allclose(total[COMPRESSED_KEY], expected, rtol=0, atol=atol)
    # The model moves by the k = 481 largest median estimates of the mean sketch.
    start, final = initial_arrays(cfg), load_safetensors(RunLayout(tmp_path / "run").model)[0]
    moved = np.concatenate([(final[n].astype(np.float64) - start[n]).ravel() for n in start])
    table = total[COMPRESSED_KEY].reshape(5, 96) / total_weight
    est = np.median(hs * table[np.arange(5)[:, None], hb], axis=0)
    keep = np.argsort(-np.abs(est), kind="stable")[: math.ceil(0.1 * D_MLP)]
    want = np.zeros(D_MLP)
    want[keep] = est[keep]
    assert np.count_nonzero(moved) <= 481
    np.testing.assert_allclose(moved, want, rtol=0, atol=1e-6)

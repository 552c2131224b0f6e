"""Malformed replies, fuzzed with hypothesis through the in-process grid, never crash the server.

Every reply of a round is replaced by an arbitrary (often malformed) message; the
driver must finish the round, keep the model finite with the right shapes, and
either leave it unchanged or move it only by accepted replies.
"""

from __future__ import annotations

import copy

import numpy as np
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
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fl_app.protocol import METRICS_KEY, NUM_EXAMPLES, SERVER_ROUND, UPDATE_KEY
from fl_app.runtime.inprocess import InProcessGrid
from fl_app.weights import to_array_record
from strategies.driver import RoundDriver
from strategies.driver_types import DriverSettings
from strategies.sampling import FixedSizeSampler

GLOBAL = {
    "w": np.zeros((3, 2), np.float32),
    "b": np.zeros(2, np.float32),
    "s": np.array(0.0, np.float32),
}

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
anyfloat = st.floats(allow_nan=True, allow_infinity=True, width=32)
names = st.sampled_from(["w", "b", "s", "x", ""]) | st.text(min_size=1, max_size=4)
shapes = st.sampled_from([(3, 2), (2,), (), (2, 3), (6,), (0,), (1, 1, 1)])
dtypes = st.sampled_from([np.float32, np.float64, np.int32, np.float16, np.uint8])


@st.composite
def arrays(draw) -> Array:
    if draw(st.booleans()):  # a well-formed numpy array of some dtype/shape
        shape = draw(shapes)
        dtype = draw(dtypes)
        vals = draw(
            st.lists(
                anyfloat if draw(st.booleans()) else finite,
                min_size=int(np.prod(shape)),
                max_size=int(np.prod(shape)),
            )
        )
        with np.errstate(all="ignore"):
            return Array(np.array(vals, dtype=np.float64).astype(dtype).reshape(shape))
    # A lying Array: declared dtype/shape disagree with (or cannot decode) the bytes.
    return Array(
        dtype=draw(st.sampled_from(["float32", "float64", "int8", "junk"])),
        shape=draw(shapes),
        stype=draw(st.sampled_from(["numpy.ndarray", "torch"])),
        data=draw(st.binary(max_size=64)),
    )


@st.composite
def array_records(draw) -> ArrayRecord:
    if draw(st.booleans()):  # mostly right names, fuzzed values
        base = {k: np.full(v.shape, draw(anyfloat), dtype=v.dtype) for k, v in GLOBAL.items()}
        rec = to_array_record(base)
        for key in draw(st.lists(names, max_size=2)):
            rec[key] = draw(arrays())
        return rec
    return ArrayRecord({k: draw(arrays()) for k in draw(st.lists(names, max_size=4))})


metric_values = (
    st.integers(-(2**40), 2**40) | anyfloat | st.booleans() | st.lists(finite, max_size=3)
)


@st.composite
def metric_records(draw) -> MetricRecord:
    d = {}
    if draw(st.booleans()):
        d[NUM_EXAMPLES] = draw(st.integers(-5, 10**13) | anyfloat)
    if draw(st.booleans()):
        d[SERVER_ROUND] = draw(st.sampled_from([1, 0, 2, -1]))
    for key in draw(st.lists(st.text(min_size=1, max_size=6), max_size=3)):
        d[key] = draw(metric_values)
    clean = {}
    for k, v in d.items():
        try:
            MetricRecord({k: v})
        except Exception:
            continue
        clean[k] = v
    return MetricRecord(clean)


@st.composite
def near_valid(draw) -> RecordDict:
    """A valid reply with fuzzed values, sometimes with one field broken."""
    value = draw(finite if draw(st.integers(0, 3)) else anyfloat)
    update = {k: np.full(v.shape, value, dtype=v.dtype) for k, v in GLOBAL.items()}
    metrics = {
        NUM_EXAMPLES: draw(st.integers(1, 1000)),
        SERVER_ROUND: 1,
        "train-loss": draw(finite),
    }
    breakage = draw(st.sampled_from(["none", "none", "none", "round", "n", "array", "extra"]))
    if breakage == "round":
        metrics[SERVER_ROUND] = draw(st.sampled_from([0, 2]))
    elif breakage == "n":
        metrics[NUM_EXAMPLES] = draw(st.sampled_from([0, -3, 10**12]))
    rd = RecordDict({UPDATE_KEY: to_array_record(update), METRICS_KEY: MetricRecord(metrics)})
    if breakage == "array":
        rd[UPDATE_KEY][draw(st.sampled_from(list(GLOBAL)))] = draw(arrays())
    elif breakage == "extra":
        rd["other"] = ConfigRecord({"k": 1})
    return rd


@st.composite
def contents(draw) -> RecordDict | Error:
    if draw(st.booleans()):
        return draw(near_valid())
    if draw(st.integers(0, 9)) == 0:
        return Error(code=draw(st.integers(0, 2000)), reason=draw(st.text(max_size=20)))
    rd = RecordDict()
    keys = draw(
        st.lists(
            st.sampled_from([UPDATE_KEY, METRICS_KEY, "config", "other"]), max_size=4, unique=True
        )
    )
    for key in keys:
        kind = draw(st.sampled_from(["array", "metric", "config"]))
        if key == UPDATE_KEY and draw(st.booleans()):
            kind = "array"
        if key == METRICS_KEY and draw(st.booleans()):
            kind = "metric"
        if kind == "array":
            rd[key] = draw(array_records())
        elif kind == "metric":
            rd[key] = draw(metric_records())
        else:
            rd[key] = ConfigRecord({"k": draw(st.text(max_size=5))})
    return rd


def _app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:  # replaced by the hook
        return Message(RecordDict(), reply_to=msg)

    return app


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(contents(), min_size=3, max_size=3))
def test_fuzzed_replies_never_crash_the_round(replies: list) -> None:
    it = iter(replies)

    def hook(node_id: int, reply: Message) -> Message:
        body = next(it)
        # Keep the routing metadata, replace everything the client said.
        meta = copy.copy(reply.metadata)
        if isinstance(body, Error):
            return Message(error=body, metadata=meta)
        return Message(content=body, metadata=meta)

    grid = InProcessGrid(_app(), 3, seed=0, message_hook=hook)
    driver = RoundDriver(
        FedAvg(fraction_train=1.0, min_train_nodes=0, min_available_nodes=0),
        train_sampler=FixedSizeSampler(1.0, seed=0),
        evaluate_sampler=None,
        settings=DriverSettings(num_rounds=1, train_timeout_s=0.2),
    )
    result = driver.run(grid, GLOBAL)
    report = result.reports[0]
    stage = report.train
    assert stage.accepted + len(stage.rejected) + len(stage.failed) + stage.missing == 3
    for k, v in GLOBAL.items():
        out = result.arrays[k]
        assert out.shape == v.shape and out.dtype == v.dtype
        assert np.all(np.isfinite(out))
        if stage.accepted == 0:
            np.testing.assert_array_equal(out, v)
    assert report.model_updated == (stage.accepted > 0)
    event(f"accepted={stage.accepted} rejected={len(stage.rejected)} failed={len(stage.failed)}")

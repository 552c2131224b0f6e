"""Tests for fl_app.weights: conversions, ArrayRecord, safetensors, flat vectors."""

from __future__ import annotations

import hashlib
import math
import tempfile
import warnings
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from fl_app.config.schema import ModelConfig, ModelName
from fl_app.models import build_model
from fl_app.privacy.clipping import l2_norm
from fl_app.weights import (
    flatten,
    from_array_record,
    load_ndarrays,
    load_safetensors,
    model_to_ndarrays,
    save_safetensors,
    to_array_record,
    unflatten,
    weights_digest,
)


def _cnn(seed: int) -> torch.nn.Module:
    return build_model(ModelConfig(name=ModelName.cnn), (1, 8, 8), 10, seed=seed)


def _sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "z.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "scalar": np.array(-2.5, dtype=np.float32),
        "a.bias": rng.standard_normal(5),
        "count": np.array(7, dtype=np.int64),
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def _assert_same(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], *, ordered: bool = True
) -> None:
    # safetensors files keep names, not insertion order (the library lays tensors out
    # by alignment); ArrayRecord keeps order.
    assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
    for k in a:
        assert b[k].dtype == a[k].dtype, k
        assert b[k].shape == a[k].shape, k
        assert np.array_equal(b[k], a[k]), k


def test_model_to_ndarrays_is_ordered_float32_copy() -> None:
    model = _cnn(0)
    arrays = model_to_ndarrays(model)
    assert list(arrays) == list(model.state_dict())
    assert all(a.dtype == np.float32 for a in arrays.values())
    before = arrays["head.bias"].copy()
    with torch.no_grad():
        model.head.bias.add_(1.0)
    assert np.array_equal(arrays["head.bias"], before)


def test_model_to_ndarrays_casts_double_models() -> None:
    model = _cnn(0).double()
    assert all(a.dtype == np.float32 for a in model_to_ndarrays(model).values())


def test_load_ndarrays_round_trip() -> None:
    src, dst = _cnn(0), _cnn(1)
    load_ndarrays(dst, model_to_ndarrays(src))
    _assert_same(model_to_ndarrays(src), model_to_ndarrays(dst))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    src.eval(), dst.eval()
    assert torch.equal(src(x), dst(x))


def test_load_ndarrays_errors_name_the_key() -> None:
    model = _cnn(0)
    original = model_to_ndarrays(model)
    arrays = dict(original)
    arrays["head.weight"] = np.zeros((3, 3), np.float32)
    arrays["features.0.bias"] = np.full_like(arrays["features.0.bias"], 9.0)
    with pytest.raises(ValueError, match=r"head\.weight"):
        load_ndarrays(model, arrays)
    _assert_same(model_to_ndarrays(model), original)  # unchanged by a failed load

    missing = dict(original)
    del missing["head.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['head\.bias'\]"):
        load_ndarrays(model, missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        load_ndarrays(model, {**original, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match=r"head\.bias"):
        load_ndarrays(model, {**original, "head.bias": np.array(["a"] * 10)})


def test_array_record_round_trip_exact() -> None:
    arrays = _sample_arrays()
    record = to_array_record(arrays)
    assert isinstance(record, ArrayRecord)
    assert list(record) == list(arrays)
    _assert_same(arrays, from_array_record(record))
    # Through the wire form (deflated objects, re-inflated) as a Message carries it.
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    wire = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(wire, ArrayRecord)
    _assert_same(arrays, from_array_record(wire))


def test_array_record_from_model_state() -> None:
    model = _cnn(0)
    arrays = model_to_ndarrays(model)
    _assert_same(arrays, from_array_record(to_array_record(arrays)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        digest = save_safetensors(path, arrays, {"k": "v"})
        assert digest == save_safetensors(path, arrays, {"k": "v"})
        loaded, meta = load_safetensors(path)
    _assert_same(arrays, loaded, ordered=False)
    assert meta == {"k": "v"}
    # A record Flower built from the torch state_dict decodes the same.
    _assert_same(arrays, from_array_record(ArrayRecord(model.state_dict())))


def test_from_array_record_rejects_foreign_entries() -> None:
    record = ArrayRecord()
    record["w"] = Array(dtype="float32", shape=(2,), stype="torch.raw", data=b"\x00" * 8)
    with pytest.raises(ValueError, match="'w'"):
        from_array_record(record)
    lying = ArrayRecord()
    real = Array(np.zeros(3, np.float32))
    lying["v"] = Array(dtype=real.dtype, shape=(4,), stype=real.stype, data=real.data)
    with pytest.raises(ValueError, match="'v'"):
        from_array_record(lying)


def test_safetensors_round_trip_and_hash(tmp_path: Path) -> None:
    arrays = _sample_arrays()
    meta = {"round": "3", "dataset": "digits", "a": "first"}
    path = tmp_path / "sub" / "w.safetensors"
    digest = save_safetensors(path, arrays, meta)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded, loaded_meta = load_safetensors(path)
    _assert_same(arrays, loaded, ordered=False)
    assert loaded_meta == meta
    assert all(a.flags.writeable for a in loaded.values())
    # Readable by the reference implementation.
    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == meta
        assert f.get_tensor("scalar").shape == ()
    # The digest fingerprints content: any change to arrays or metadata changes it.
    changed = dict(arrays, scalar=np.array(-2.0, np.float32))
    assert save_safetensors(tmp_path / "c.safetensors", changed, meta) != digest
    assert save_safetensors(tmp_path / "m.safetensors", arrays, {**meta, "x": "y"}) != digest
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_safetensors_model_state(tmp_path: Path) -> None:
    model = _cnn(0)
    arrays = model_to_ndarrays(model)
    save_safetensors(tmp_path / "m.safetensors", arrays, {})
    loaded, meta = load_safetensors(tmp_path / "m.safetensors")
    assert meta == {}
    target = _cnn(5)
    load_ndarrays(target, loaded)
    _assert_same(arrays, model_to_ndarrays(target))


def test_safetensors_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ValueError, match="safetensors"):
        load_safetensors(bad)
    with pytest.raises(ValueError, match="'c'"):
        save_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex128)}, {})
    with pytest.raises(ValueError, match="metadata"):
        save_safetensors(tmp_path / "d.safetensors", {}, {"k": 1})  # type: ignore[dict-item]


_DTYPES = st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.float16])


@st.composite
def _named_arrays(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.text(min_size=1, max_size=8), max_size=6, unique=True))
    out: dict[str, np.ndarray] = {}
    for name in names:
        dtype = draw(_DTYPES)
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
        if np.issubdtype(dtype, np.integer):
            elements = st.integers(-(2**31), 2**31 - 1) if dtype == np.int64 else None
        else:
            elements = st.floats(allow_nan=False, allow_infinity=False, width=64)
            if dtype != np.float64:
                elements = st.floats(
                    allow_nan=False, allow_infinity=False, width=np.dtype(dtype).itemsize * 8
                )
        out[name] = draw(hnp.arrays(dtype, shape, elements=elements))
    return out


@settings(max_examples=150, deadline=None)
@given(_named_arrays())
def test_flatten_unflatten_round_trip(arrays: dict[str, np.ndarray]) -> None:
    vec = flatten(arrays)
    assert vec.dtype == np.float64 and vec.ndim == 1
    assert vec.size == sum(a.size for a in arrays.values())
    _assert_same(arrays, unflatten(vec, arrays))
    assert l2_norm(arrays) == pytest.approx(math.hypot(*vec.tolist()), rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(_named_arrays())
def test_array_record_and_safetensors_round_trip_property(
    arrays: dict[str, np.ndarray],
) -> None:
    _assert_same(arrays, from_array_record(to_array_record(arrays)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        digest = save_safetensors(path, arrays, {"k": "v"})
        assert digest == save_safetensors(path, arrays, {"k": "v"})
        loaded, meta = load_safetensors(path)
    _assert_same(arrays, loaded, ordered=False)
    assert meta == {"k": "v"}


def test_zero_dim_arrays_are_real_parameters() -> None:
    arrays = {"s": np.array(3.0, np.float32), "v": np.array([4.0], np.float64)}
    assert flatten(arrays).tolist() == [3.0, 4.0]
    assert l2_norm(arrays) == 5.0
    out = unflatten(np.array([1.0, 2.0]), arrays)
    assert out["s"].shape == () and out["s"].dtype == np.float32 and float(out["s"]) == 1.0
    assert flatten({}).shape == (0,) and l2_norm({}) == 0.0


def test_unflatten_rounds_integers_and_checks_length() -> None:
    like = {"i": np.zeros(2, np.int64), "b": np.zeros(2, bool), "f": np.zeros((), np.float32)}
    out = unflatten(np.array([1.6, -2.4, 0.0, 3.0, 0.5]), like)
    assert out["i"].tolist() == [2, -2] and out["b"].tolist() == [False, True]
    vec = np.zeros(5)
    out = unflatten(vec, like)
    vec[4] = 1.0
    assert float(out["f"]) == 0.0  # no aliasing
    with pytest.raises(ValueError, match="6 elements"):
        unflatten(np.zeros(6), like)
    with pytest.raises(ValueError, match="1-d"):
        unflatten(np.zeros((5, 1)), like)


def test_l2_norm_is_float64_and_does_not_overflow() -> None:
    big = {"w": np.full(4, 3e30, np.float32)}  # squares overflow float32
    assert l2_norm(big) == pytest.approx(6e30, rel=1e-6)
    huge = {"a": np.array(3e200), "b": np.array([4e200])}  # squares overflow float64
    with warnings.catch_warnings():
        # The overflow is expected and handled by rescaling: no RuntimeWarning on
        # every clipped update.
        warnings.simplefilter("error", RuntimeWarning)
        assert l2_norm(huge) == pytest.approx(5e200, rel=1e-12)
    assert l2_norm({"a": np.array([1.0, np.inf])}) == math.inf
    assert math.isnan(l2_norm({"a": np.array([np.nan, 1.0])}))


def test_weights_digest_fingerprints_content_not_order() -> None:
    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array(1.5, np.float32)}
    b = dict(reversed(list(a.items())))
    assert weights_digest(a) == weights_digest(b)
    assert weights_digest(a) != weights_digest({**a, "s": np.array(1.25, np.float32)})
    assert weights_digest(a) != weights_digest({**a, "w": a["w"].reshape(3, 2)})
    assert weights_digest(a) != weights_digest({**a, "w": a["w"].astype(np.float64)})


def test_array_view_reads_flower_arrays_in_place_and_refuses_mismatches() -> None:
    from flwr.app import Array

    from fl_app.weights import array_view

    rng = np.random.default_rng(0)
    for value in (
        rng.normal(size=(3, 4)).astype(np.float32),
        rng.integers(0, 2**32, size=7, dtype=np.uint64).astype(np.uint32),
        np.full((), 2.5),
    ):
        arr = Array(value)
        view = array_view(arr.data, value.dtype, value.shape)
        assert np.array_equal(view, arr.numpy()) and view.dtype == value.dtype
        assert not view.flags.writeable  # a view of the reply's bytes, never written
    arr = Array(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="expected float64"):
        array_view(arr.data, "float64", (2, 3))
    with pytest.raises(ValueError, match=r"expected float32\[3, 2\]"):
        array_view(arr.data, "float32", (3, 2))
    with pytest.raises(ValueError, match="data bytes"):
        array_view(arr.data[:-1], "float32", (2, 3))
    with pytest.raises(ValueError, match="data bytes"):
        array_view(arr.data + b"\0", "float32", (2, 3))
    fortran = Array(np.asfortranarray(np.zeros((2, 3), np.float32)))
    with pytest.raises(ValueError, match="Fortran"):
        array_view(fortran.data, "float32", (2, 3))
    with pytest.raises(ValueError):
        array_view(b"not an npy file at all", "float32", (2, 3))

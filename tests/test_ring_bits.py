"""The secure-aggregation ring width ``bits`` has one range, [8, 64], at every layer.

The config check, the run's SecAgg settings, the fixed-point codec, the protocol's
sessions and the distributed-DP plan each check the width where they are called from
(a wire value reaches the lower ones), with one pair of bounds
(``fl_app.secagg.crypto.MIN_BITS``/``MAX_BITS``); the storage dtype takes any width up
to 64. Edges and messages are written out here, not read from those constants.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fl_app.secagg.crypto import storage_dtype
from fl_app.secagg.encoding import FixedPointCodec, FixedPointConfigError
from fl_app.secagg.params import GraphMode
from fl_app.secagg.protocol import _check_bits_and_length
from fl_app.secagg.settings import SecAggSettings


def _codec(bits: int) -> object:
    return FixedPointCodec(bits=bits, max_abs=1.0, max_contributors=1, min_precision_bits=1)


def _protocol(bits: int) -> object:
    return _check_bits_and_length(bits, 1)


def _settings(bits: int) -> object:
    return SecAggSettings(mode=GraphMode.secagg, bits=bits)


# (check, exception, message for bits=7 and bits=65 with {} standing for the value)
_LAYERS: list[tuple[Callable[[int], object], type[Exception], str]] = [
    (
        _codec,
        FixedPointConfigError,
        "bits must be an int in [8, 64], got {}; use 32 or 64 for SecAgg",
    ),
    (_protocol, ValueError, "bits must be an int in [8, 64], got {}"),
    (_settings, ValueError, "secagg.bits must lie in [8, 64], found {}"),
]


@pytest.mark.parametrize("index", range(len(_LAYERS)))
@pytest.mark.parametrize("bits", [7, 65])
def test_each_layer_refuses_a_width_outside_8_to_64(index: int, bits: int) -> None:
    check, kind, message = _LAYERS[index]
    with pytest.raises(kind) as info:
        check(bits)
    assert str(info.value) == message.format(bits)


@pytest.mark.parametrize("index", range(len(_LAYERS)))
@pytest.mark.parametrize("bits", [8, 64])
def test_each_layer_accepts_the_edges(index: int, bits: int) -> None:
    check, _, _ = _LAYERS[index]
    check(bits)


def test_storage_takes_any_width_up_to_64() -> None:
    assert storage_dtype(1) is np.uint32
    assert storage_dtype(32) is np.uint32
    assert storage_dtype(33) is np.uint64
    assert storage_dtype(64) is np.uint64
    for bits in (0, 65):
        with pytest.raises(ValueError) as info:
            storage_dtype(bits)
        assert str(info.value) == f"bits must be an int in [1, 64], got {bits}"

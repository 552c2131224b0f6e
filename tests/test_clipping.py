"""Edge cases of L2 clipping that mutation testing found unpinned (``make mutate``).

The property tests in ``test_client_dp.py`` hold the bound ``‖clip(Δ)‖ ≤ C`` for any
shape; these pin what that property cannot see: the boundary of "unclipped" (the bit
adaptive clipping counts), the reported factor, argument checks, and that the
float32 path never moves an element that needed no correction. Expected values are
worked by hand: a (3, 4) vector has norm exactly 5.
"""

from __future__ import annotations

import numpy as np
import pytest

from fl_app.privacy.clipping import _scale_toward_zero, check_clip_norm, clip_l2


def test_norm_exactly_at_the_bound_counts_as_unclipped_and_is_returned_as_is() -> None:
    # Andrew et al. (2021) count b_i = 1[‖Δ_i‖ ≤ C]: equality is "unclipped".
    res = clip_l2({"w": np.array([3.0, 4.0])}, 5.0)
    assert res.unclipped is True
    assert res.factor == 1.0
    assert res.norm == 5.0
    np.testing.assert_array_equal(res.arrays["w"], [3.0, 4.0])


def test_reported_factor_is_a_hair_below_c_over_norm() -> None:
    res = clip_l2({"w": np.array([30.0, 40.0])}, 1.0)  # norm 50
    assert res.unclipped is False
    assert 1.0 / 50.0 * (1 - 1e-6) <= res.factor < 1.0 / 50.0
    np.testing.assert_allclose(res.arrays["w"], [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize("bad", ["1.0", None, True, [1.0]])
def test_clip_norm_that_is_not_a_number_is_refused_by_name(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^privacy\.clip_norm must be a number > 0, found"):
        check_clip_norm(bad, "privacy.clip_norm")
    with pytest.raises(ValueError, match=r"^clip_norm must be a number > 0"):
        check_clip_norm(bad)


def test_integer_update_is_refused_naming_the_array_and_dtype() -> None:
    msg = r"cannot clip array 'w' of dtype int64: updates must be floating point"
    with pytest.raises(ValueError, match=msg):
        clip_l2({"w": np.array([3, 4], dtype=np.int64)}, 1.0)


def test_float32_elements_whose_product_is_exact_are_not_stepped_down() -> None:
    # 1 * 0.5 and 3 * 0.5 are exact in float32: rounding cannot have pushed them up,
    # so the toward-zero correction must leave them alone.
    out = _scale_toward_zero(np.array([1.0, 3.0], dtype=np.float32), 0.5)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([0.5, 1.5], dtype=np.float32))

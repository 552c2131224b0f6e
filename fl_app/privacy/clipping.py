"""L2 clipping of a whole model update: the sensitivity bound of client-level DP.

Client-level DP (McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially
Private Recurrent Language Models", ICLR) bounds each client's influence on the sum
of updates by scaling its update ``Δ`` (every array taken together, as one vector)
to L2 norm at most ``C``: ``Δ · min(1, C / ‖Δ‖)``.

Unlike Flower's ``compute_clip_model_update``, every array is clipped, including
0-d arrays and empty ones, and the norm is computed in float64. The result is scaled
by a factor a hair below ``C/‖Δ‖`` so that casting back to float32 cannot push the
norm above ``C``: the guarantee tested is ``‖clip(Δ)‖ ≤ C·(1 + 1e-6)`` for any shapes.

:func:`l2_norm` lives here, beside the bound it measures, rather than with the weight
conversions of :mod:`fl_app.weights` (which import Flower): this package stays free of
Flower (docs/architecture.md, Layers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["ClipResult", "check_clip_norm", "clip_l2", "l2_norm"]

# Relative safety margin: float32 rounding moves a norm by at most ~6e-8 relative.
_MARGIN = 1e-7


@dataclass(frozen=True)
class ClipResult:
    """A clipped update and what clipping did.

    ``norm`` is the update's norm before clipping; ``unclipped`` is ``norm <= clip``
    (the bit adaptive clipping counts).
    """

    arrays: dict[str, np.ndarray]
    norm: float
    factor: float
    unclipped: bool


def check_clip_norm(clip_norm: object, name: str = "clip_norm") -> float:
    """Return ``clip_norm`` as a float if it is finite and > 0, else raise naming it."""
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float, np.floating)):
        raise ValueError(f"{name} must be a number > 0, found {clip_norm!r}")
    value = float(clip_norm)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, found {value!r}")
    return value


def clip_l2(arrays: Mapping[str, np.ndarray], clip_norm: float) -> ClipResult:
    """Scale ``arrays`` (as one vector) to L2 norm at most ``clip_norm``.

    Parameters
    ----------
    arrays : Mapping[str, numpy.ndarray]
        Named floating-point arrays of any shape (0-d and empty included).
    clip_norm : float
        The bound ``C > 0``.

    Returns
    -------
    ClipResult
        New arrays with the input dtypes and shapes (never views of the input).

    Raises
    ------
    ValueError
        If ``clip_norm`` is not finite and positive, an array is not floating point,
        or the update holds NaN/Inf (its norm, and so its clipping, is undefined).
    """
    bound = check_clip_norm(clip_norm)
    for key, value in arrays.items():
        if np.asarray(value).dtype.kind != "f":
            raise ValueError(
                f"cannot clip array {key!r} of dtype {np.asarray(value).dtype}: updates must "
                "be floating point"
            )
    norm = l2_norm(arrays)
    if not math.isfinite(norm):
        raise ValueError(f"update norm is {norm}: it holds NaN or Inf and cannot be clipped")
    unclipped = norm <= bound
    factor = 1.0 if unclipped else (bound / norm) * (1.0 - _MARGIN)
    out = {k: _scale_toward_zero(np.asarray(v), factor) for k, v in arrays.items()}
    return ClipResult(arrays=out, norm=norm, factor=factor, unclipped=unclipped)


def _scale_toward_zero(value: np.ndarray, factor: float) -> np.ndarray:
    """``value * factor`` in ``value``'s dtype, never larger in magnitude than the exact product.

    Rounding to nearest in a narrow dtype can round up (float16 subnormals by up to half
    of 2^-24, i.e. percent of a value near 1e-5), which would let a clipped update exceed
    its bound; stepping those elements one ulp toward zero keeps every element, and so the
    norm, at or below the float64 product. Always a new array, never a view of ``value``.
    """
    if factor == 1.0:  # unclipped: the product is exact, a copy is all it takes
        return np.array(value, copy=True)
    scaled = np.array(value, dtype=np.float64)  # a copy; 0-d stays an array
    scaled *= factor
    if value.dtype == np.float64:
        return scaled
    cast = scaled.astype(value.dtype)
    over = np.abs(cast.astype(np.float64)) > np.abs(scaled)
    if over.any():
        cast[over] = np.nextafter(cast[over], value.dtype.type(0))
    return cast


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """Return the Euclidean norm of all arrays taken together, computed in ``float64``.

    Parameters
    ----------
    arrays : Mapping[str, numpy.ndarray]
        Named arrays (0-d included).

    Returns
    -------
    float
        ``sqrt(sum of squares of every element)``; ``0.0`` for no arrays,
        ``inf``/``nan`` if an element is non-finite.
    """
    vectors = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays.values()]
    with np.errstate(over="ignore"):
        total = math.fsum(float(np.dot(v, v)) for v in vectors)
    if math.isfinite(total) or math.isnan(total):
        return math.sqrt(total)
    # Infinite: either an element is infinite, or the squares overflowed float64.
    scale = max(float(np.max(np.abs(v))) for v in vectors if v.size)
    if math.isinf(scale):
        return math.inf
    total = math.fsum(float(np.dot(v / scale, v / scale)) for v in vectors)
    return scale * math.sqrt(total)

"""A site's images and labels as the discrete table a marginal-based synthesizer fits.

MST and AIM (McKenna et al. 2021, 2022) model a table of *discrete* columns through
noisy low-order marginals; each marginal has one cell per combination of values, so the
domain size drives both run time and noise per cell. Features here are scaled to
``dataset.input_range`` (digits: raw pixels 0..16 divided by 16), so a feature is binned
into ``levels`` equal-width levels of that *configured* range, and the label keeps its
``dataset.num_classes`` values. Both domains come from the config, never from the data:
a domain inferred from the records (the observed categories, min and max) would itself
leak, unaccounted (the reason the synthesizer gets fixed bounds, :mod:`.mechanism`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["decode_table", "encode_table", "from_codes", "table_cardinalities", "to_codes"]


def to_codes(x: np.ndarray, levels: int, low: float, high: float) -> np.ndarray:
    """Bin ``x`` (values in ``[low, high]``) into ``levels`` equal-width levels 0..levels-1.

    Level ``k`` holds ``[low + k w, low + (k+1) w)`` with ``w = (high - low) / levels``;
    ``high`` itself falls in the top level. With 17 levels on digits (``x = v / 16``,
    ``v`` in 0..16) level ``k`` is exactly pixel value ``k``.
    """
    if levels < 2:
        raise ValueError(f"levels must be >= 2, found {levels}")
    if not high > low:
        raise ValueError(f"the feature range must have high > low, found [{low}, {high}]")
    frac = (np.asarray(x, dtype=np.float64) - low) / (high - low)
    return np.clip(np.floor(frac * levels), 0, levels - 1).astype(np.int64)


def from_codes(codes: np.ndarray, levels: int, low: float, high: float) -> np.ndarray:
    """Each level's representative value: ``low + k (high - low) / (levels - 1)``.

    The end levels map to the range's ends (a blank pixel stays 0, a full one 1), and 17
    levels on digits give back ``k / 16``, the scaled pixel itself.
    """
    step = (high - low) / (levels - 1)
    return (low + np.asarray(codes, dtype=np.float64) * step).astype(np.float32)


def table_cardinalities(num_features: int, levels: int, num_classes: int) -> list[int]:
    """The public domain: ``levels`` values per feature column, then the label's classes."""
    return [levels] * num_features + [num_classes]


def encode_table(x: np.ndarray, y: np.ndarray, levels: int, low: float, high: float) -> np.ndarray:
    """``[N, F + 1]`` int64: each image's binned features (row-major), then its label."""
    flat = to_codes(np.asarray(x).reshape(len(x), -1), levels, low, high)
    return np.concatenate([flat, np.asarray(y, dtype=np.int64).reshape(-1, 1)], axis=1)


def decode_table(
    table: np.ndarray,
    input_shape: tuple[int, ...],
    levels: int,
    low: float,
    high: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, *input_shape]`` (float32 in ``[low, high]``) and labels from a table."""
    table = np.asarray(table, dtype=np.int64)
    x = from_codes(table[:, :-1], levels, low, high).reshape((len(table), *input_shape))
    return x, table[:, -1].copy()

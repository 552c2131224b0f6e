"""In-memory containers for image-classification data, and their checks.

Every source (digits, hub, local files) ends as an :class:`ArrayDataset`: a float32
``[N, C, H, W]`` array already divided by ``dataset.pixel_scale`` and int64 labels.
Models, training and evaluation only ever see this one form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fl_app.config.schema import DatasetConfig
from fl_app.data.errors import DataError

__all__ = ["ArrayDataset", "ClientData", "check_data_shape"]


# eq=False: the generated __eq__ would compare arrays element-wise and fail on
# truthiness; identity comparison (and hashing) is what a container of arrays needs.
@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Images and labels as NumPy arrays.

    Attributes
    ----------
    x : np.ndarray
        float32, shape ``[N, C, H, W]``, already scaled by ``1 / dataset.pixel_scale``.
    y : np.ndarray
        int64, shape ``[N]``.

    Raises
    ------
    DataError
        If the dtypes, ranks or lengths do not match the above (so a wrong array is
        caught where it is built, not deep inside a training loop).
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or not isinstance(self.y, np.ndarray):
            raise DataError("ArrayDataset needs NumPy arrays for x and y")
        if self.x.dtype != np.float32 or self.x.ndim != 4:
            raise DataError(
                f"ArrayDataset.x must be float32 with shape [N, C, H, W], found "
                f"{self.x.dtype} with shape {list(self.x.shape)}"
            )
        if self.y.dtype != np.int64 or self.y.ndim != 1:
            raise DataError(
                f"ArrayDataset.y must be int64 with shape [N], found "
                f"{self.y.dtype} with shape {list(self.y.shape)}"
            )
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"ArrayDataset has {self.x.shape[0]} images but {self.y.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True, eq=False)
class ClientData:
    """One client's local data.

    Attributes
    ----------
    train : ArrayDataset
        What the client trains on.
    val : ArrayDataset
        Local validation split for federated evaluation; empty (length 0) when the
        partition is too small to spare examples or ``dataset.val_fraction`` is 0.
    """

    train: ArrayDataset
    val: ArrayDataset


def check_data_shape(data: ArrayDataset, cfg: DatasetConfig) -> None:
    """Check that data fits the model the config describes.

    Parameters
    ----------
    data : ArrayDataset
        Data to check.
    cfg : DatasetConfig
        Supplies ``input_shape`` and ``num_classes``.

    Raises
    ------
    DataError
        If ``data.x.shape[1:]`` differs from ``dataset.input_shape`` or a label lies
        outside ``[0, dataset.num_classes)``.
    """
    expected = tuple(int(d) for d in cfg.input_shape)
    found = tuple(int(d) for d in data.x.shape[1:])
    if found != expected:
        raise DataError(
            f"examples have shape {list(found)} (C, H, W) but dataset.input_shape is "
            f"{list(expected)}; set dataset.input_shape to {list(found)} or fix the data"
        )
    if len(data) == 0:
        return
    low, high = int(data.y.min()), int(data.y.max())
    if low < 0:
        raise DataError(
            f"found label {low}, but labels must be class ids in [0, dataset.num_classes="
            f"{cfg.num_classes}); re-encode the labels as 0 .. {cfg.num_classes - 1}"
        )
    if high >= cfg.num_classes:
        raise DataError(
            f"labels span [{low}, {high}] but dataset.num_classes is {cfg.num_classes} "
            f"(labels must lie in [0, {cfg.num_classes})); raise dataset.num_classes "
            f"to at least {high + 1} or fix the labels"
        )

"""Where examples come from: scikit-learn digits, a Hugging Face hub dataset, or a file.

Local files are read by :mod:`fl_app.data.local_files` into an :class:`InMemorySource`,
with the checks shared here (:func:`check_input_range`, :func:`check_labels`).

Each loader returns a :class:`Source`: every row's label (and natural id, if any) as
NumPy arrays, which is all that splitting and partitioning need, plus ``take(rows)``
to materialise chosen rows as an :class:`~fl_app.data.arrays.ArrayDataset`. Digits
and local files are small and fully in memory; a hub split stays an Arrow-backed
``datasets.Dataset`` and only the rows a client asks for are decoded, so a simulation
process serving a few clients of CIFAR-10 never converts all 50,000 images.

:func:`fetch_hub_dataset` is the only function here that touches the network; tests
replace it with a local ``datasets.DatasetDict``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import datasets
import numpy as np
from PIL import Image

from fl_app.config.schema import DatasetConfig
from fl_app.data.arrays import ArrayDataset, check_data_shape
from fl_app.data.errors import DataError

__all__ = [
    "HubSource",
    "InMemorySource",
    "Source",
    "check_input_range",
    "check_labels",
    "configured_input_shape",
    "fetch_hub_dataset",
    "hub_sources",
    "images_to_array",
    "load_digits_source",
]

# Rows decoded per batch when converting hub images: bounds peak memory of PIL objects.
_IMAGE_BATCH = 1024
# Raw intensity ranges a pixel_scale hint may name (4-bit digits, 8-bit, 16-bit images).
_STANDARD_SCALES = (16.0, 255.0, 65535.0)


class Source(Protocol):
    """Rows of one split: labels for splitting/partitioning, ``take`` for the data."""

    @property
    def labels(self) -> np.ndarray:
        """int64 ``[N]`` class ids."""
        ...

    @property
    def natural_ids(self) -> np.ndarray | None:
        """``[N]`` natural ids (``dataset.natural_id_key``), or None if absent."""
        ...

    @property
    def description(self) -> str:
        """Where the rows come from, for error messages."""
        ...

    def take(self, rows: np.ndarray) -> ArrayDataset:
        """Materialise the given rows (in that order)."""
        ...


@dataclass(frozen=True, eq=False)
class InMemorySource:
    """A source whose images are already a scaled float32 array (digits, local files)."""

    x: np.ndarray
    y: np.ndarray
    natural_ids: np.ndarray | None
    description: str

    @property
    def labels(self) -> np.ndarray:
        return self.y

    def take(self, rows: np.ndarray) -> ArrayDataset:
        # Fancy indexing copies, so callers may modify the result without touching
        # the cached source shared by every client of this process.
        return ArrayDataset(x=self.x[rows], y=self.y[rows])


@dataclass(frozen=True, eq=False)
class HubSource:
    """A source backed by a ``datasets.Dataset``; images are decoded on ``take``."""

    dataset: datasets.Dataset
    labels: np.ndarray
    natural_ids: np.ndarray | None
    description: str
    image_key: str
    input_shape: tuple[int, int, int]
    pixel_scale: float

    def take(self, rows: np.ndarray) -> ArrayDataset:
        subset = self.dataset.select_columns([self.image_key]).select(rows)
        images = (
            image
            for batch in subset.iter(batch_size=_IMAGE_BATCH)
            for image in batch[self.image_key]
        )
        x = images_to_array(images, self.input_shape, self.pixel_scale, self.description)
        return ArrayDataset(x=x, y=self.labels[rows])


# ---- digits ---------------------------------------------------------------------------


def load_digits_source(cfg: DatasetConfig) -> InMemorySource:
    """scikit-learn's ``load_digits`` (1,797 8x8 grey images, no download).

    Parameters
    ----------
    cfg : DatasetConfig
        Supplies ``pixel_scale`` (16 maps the raw 0..16 intensities to [0, 1]),
        ``input_shape`` and ``num_classes`` (checked).

    Returns
    -------
    InMemorySource
        x ``[1797, 1, 8, 8]`` float32, y int64.
    """
    # Imported here: scikit-learn is slow to import and only this source needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data.reshape(-1, 1, 8, 8) / float(cfg.pixel_scale)).astype(np.float32)
    data = ArrayDataset(x=x, y=bunch.target.astype(np.int64))
    try:
        check_data_shape(data, cfg)
        check_input_range(bunch.data, cfg, "sklearn digits (raw intensities 0..16)")
    except DataError as err:
        raise DataError(f"dataset.kind=digits (1x8x8 images, 10 classes): {err}") from None
    return InMemorySource(x=data.x, y=data.y, natural_ids=None, description="sklearn digits")


# ---- Hugging Face hub -----------------------------------------------------------------


def fetch_hub_dataset(hub_path: str) -> datasets.DatasetDict:
    """Download (or read from the Hugging Face cache) every split of a hub dataset.

    This is the only network access of the data package, kept tiny so tests and
    air-gapped sites can substitute a local ``datasets.DatasetDict``.

    Parameters
    ----------
    hub_path : str
        ``dataset.hub_path``, e.g. ``"ylecun/mnist"``.

    Returns
    -------
    datasets.DatasetDict
        All splits of the dataset.

    Raises
    ------
    DataError
        If the dataset cannot be loaded (no internet and no cached copy, unknown id).
    """
    try:
        loaded = datasets.load_dataset(path=hub_path)
    except Exception as err:  # the hub client raises many unrelated types
        raise DataError(
            f"could not load dataset.hub_path={hub_path!r} from the Hugging Face hub "
            f"({type(err).__name__}: {err}); check the id and the network, or pre-fill "
            "the Hugging Face cache and set HF_DATASETS_OFFLINE=1"
        ) from err
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"dataset.hub_path={hub_path!r} did not load as a DatasetDict")
    return loaded


def hub_sources(
    loaded: datasets.DatasetDict | datasets.Dataset, cfg: DatasetConfig
) -> tuple[HubSource, HubSource | None]:
    """Wrap a loaded hub dataset's ``train`` (and ``test``, if present) splits.

    Parameters
    ----------
    loaded : datasets.DatasetDict or datasets.Dataset
        What :func:`fetch_hub_dataset` returned, or any in-memory equivalent; a bare
        ``Dataset`` is treated as a lone ``train`` split.
    cfg : DatasetConfig
        Supplies ``image_key``, ``label_key``, ``natural_id_key``, ``input_shape``,
        ``num_classes`` and ``pixel_scale``.

    Returns
    -------
    (HubSource, HubSource or None)
        The train split, and the test split or None if the dataset has none (then the
        caller carves the server's test set out of train, as for FEMNIST).
    """
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    name = cfg.hub_path or "<in-memory hub dataset>"
    if "train" not in loaded:
        raise DataError(
            f"hub dataset {name!r} has splits {sorted(loaded)} but no 'train' split to "
            "partition among clients; choose another dataset.hub_path"
        )
    train = _hub_source(loaded["train"], f"{name}[train]", cfg)
    test = _hub_source(loaded["test"], f"{name}[test]", cfg) if "test" in loaded else None
    return train, test


def _hub_source(split: datasets.Dataset, description: str, cfg: DatasetConfig) -> HubSource:
    for field_name, key in (("image_key", cfg.image_key), ("label_key", cfg.label_key)):
        if key not in split.column_names:
            raise DataError(
                f"{description} has no column {key!r} (dataset.{field_name}); its columns "
                f"are {split.column_names}: set dataset.{field_name} to one of them"
            )
    labels = _column(split, cfg.label_key)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{description} column {cfg.label_key!r} (dataset.label_key) holds "
            f"{labels.dtype} values, not integer class ids; point dataset.label_key at "
            "the class-id column"
        )
    labels = labels.astype(np.int64)
    check_labels(labels, cfg, description)
    natural_ids = None
    if cfg.natural_id_key and cfg.natural_id_key in split.column_names:
        natural_ids = _column(split, cfg.natural_id_key)
    return HubSource(
        dataset=split,
        labels=labels,
        natural_ids=natural_ids,
        description=description,
        image_key=cfg.image_key,
        input_shape=configured_input_shape(cfg),
        pixel_scale=float(cfg.pixel_scale),
    )


def _column(split: datasets.Dataset, key: str) -> np.ndarray:
    # Through Arrow: datasets 4 returns a lazy Column whose np.asarray conversion is
    # element by element (seconds for FEMNIST's ~800k rows); Arrow is vectorised.
    return np.asarray(split.with_format("arrow")[key].to_numpy())


def images_to_array(
    images: Iterable[object],
    input_shape: tuple[int, int, int],
    pixel_scale: float,
    description: str,
) -> np.ndarray:
    """Convert PIL images (or array-likes) to a scaled float32 ``[N, C, H, W]`` array.

    PIL images are first converted to the mode the model expects (``"L"`` for one
    channel, ``"RGB"`` for three), so a grey model can read RGB images and vice versa.
    Array-likes may be ``(C, H, W)``, ``(H, W, C)`` or, for one channel, ``(H, W)``.

    Parameters
    ----------
    images : iterable
        The images.
    input_shape : (int, int, int)
        ``dataset.input_shape`` (C, H, W).
    pixel_scale : float
        Divisor for the raw pixel values (255 for 8-bit images).
    description : str
        Names the source in error messages.

    Returns
    -------
    np.ndarray
        float32 ``[N, C, H, W]``.
    """
    channels, height, width = input_shape
    mode = {1: "L", 3: "RGB"}.get(channels)
    out: list[np.ndarray] = []
    for index, image in enumerate(images):
        if isinstance(image, Image.Image):
            if mode is not None and image.mode != mode:
                image = image.convert(mode)
            array = np.asarray(image)
        else:
            array = np.asarray(image)
        if array.shape == (channels, height, width):
            chw = array
        elif array.shape == (height, width, channels):
            chw = np.moveaxis(array, -1, 0)
        elif channels == 1 and array.shape == (height, width):
            chw = array[None]
        else:
            raise DataError(
                f"{description}: image {index} has shape {list(array.shape)}, which does "
                f"not fit dataset.input_shape={list(input_shape)} (C, H, W); set "
                "dataset.input_shape to the images' size"
            )
        out.append(chw)
    if not out:
        return np.zeros((0, *input_shape), dtype=np.float32)
    return (np.stack(out).astype(np.float32)) / np.float32(pixel_scale)


def check_input_range(raw: np.ndarray, cfg: DatasetConfig, where: str) -> None:
    """Refuse features that ``dataset.pixel_scale`` does not map into ``dataset.input_range``.

    Why: a wrong scale is not an error anywhere else. Raw 0..16 digits divided by a
    ``pixel_scale`` of 1 train to chance accuracy (0.08 instead of 0.92), and the run
    reports success. The scale is never inferred from the data: a divisor computed
    from a site's own maximum would make every record's features depend on the other
    records (record-level DP assumes per-record preprocessing) and would scale sites
    differently.

    The message says which bound is crossed and suggests a standard scale (16, 255,
    65535) when one fits, but never states the data's own extremes: a client's refusal
    travels to the server, and a feature's maximum can be a private statistic.

    Parameters
    ----------
    raw : np.ndarray
        Features before scaling (finite; checked by the caller).
    cfg : DatasetConfig
        Supplies ``pixel_scale`` and ``input_range``.
    where : str
        Names the data in the message (e.g. the file).

    Raises
    ------
    DataError
        If ``raw / pixel_scale`` leaves ``[input_range[0], input_range[1]]``.
    """
    if raw.size == 0:
        return
    scale = float(cfg.pixel_scale)
    low, high = (float(v) for v in cfg.input_range)
    raw_min, raw_max = float(np.min(raw)), float(np.max(raw))
    # Compare in the raw domain (bounds times scale) so float rounding of the division
    # cannot refuse data that sits exactly on a bound, such as 16 / 16 = 1.
    if raw_min >= low * scale and raw_max <= high * scale:
        return
    crossed = "above" if raw_max > high * scale else "below"
    fits = [s for s in _STANDARD_SCALES if raw_min >= low * s and raw_max <= high * s]
    if fits:
        hint = f"set dataset.pixel_scale={fits[0]:g} if the raw values run 0..{fits[0]:g}"
    else:
        hint = "set dataset.pixel_scale to the raw values' full range"
    raise DataError(
        f"{where}: features divided by dataset.pixel_scale={scale:g} fall {crossed} "
        f"dataset.input_range={[low, high]}, so the model would train on mis-scaled "
        f"inputs; {hint}, rescale the file, or widen dataset.input_range"
    )


def check_labels(labels: np.ndarray, cfg: DatasetConfig, where: str) -> None:
    """Refuse labels outside ``[0, dataset.num_classes)`` (hub splits and local files)."""
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= cfg.num_classes:
        raise DataError(
            f"{where}: labels span [{low}, {high}] but must lie in [0, dataset.num_classes="
            f"{cfg.num_classes}); fix the labels or set dataset.num_classes"
        )


def configured_input_shape(cfg: DatasetConfig) -> tuple[int, int, int]:
    """``dataset.input_shape`` as ``(C, H, W)``; anything else is a :class:`DataError`."""
    shape = [int(d) for d in cfg.input_shape]
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(
            f"dataset.input_shape must be three positive ints (C, H, W), found "
            f"{list(cfg.input_shape)}"
        )
    channels, height, width = shape
    return channels, height, width

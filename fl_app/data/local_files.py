"""Per-site data files: where a site's file is, and reading it (``.npz`` or ``.csv``).

A deployed SuperNode names its file in ``--node-config "data-path=..."``; a simulation
on one machine names one file per site (``dataset.site_files``, or a directory in
``dataset.local_path``) or one file that gets partitioned. The file is read whole into
an :class:`~fl_app.data.sources.InMemorySource`, its shapes, labels and input range
checked against the config with errors that name the field to fix.
"""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Mapping
from math import prod
from pathlib import Path

import numpy as np

from fl_app.config.schema import DatasetConfig, LocalFormat
from fl_app.data.errors import DataError
from fl_app.data.sources import (
    InMemorySource,
    check_input_range,
    check_labels,
    configured_input_shape,
)

__all__ = ["NODE_DATA_PATH_KEY", "load_local_source", "resolve_local_path", "site_paths"]

# SuperNode --node-config key naming the site's data file (deployment).
NODE_DATA_PATH_KEY = "data-path"


def resolve_local_path(
    cfg: DatasetConfig,
    node_config: Mapping[str, bool | int | float | str] | None,
    partition_id: int | None = None,
) -> tuple[Path, bool]:
    """Find a site's data file.

    Parameters
    ----------
    cfg : DatasetConfig
        ``site_files`` (or ``local_path``, a file or a directory of site files) is the
        fallback for simulations on one machine.
    node_config : mapping or None
        The SuperNode's ``--node-config``; its ``"data-path"`` wins.
    partition_id : int, optional
        Which site file a simulated client reads (see :func:`site_paths`); needed
        only when the config lists one file per site.

    Returns
    -------
    (Path, bool)
        The path, and whether it is this site's own file, used whole (a node-config
        ``"data-path"`` or one of the per-site files) rather than a file the
        simulated clients share.

    Raises
    ------
    DataError
        If nothing names a path, or the file does not exist.
    """
    node_path = (node_config or {}).get(NODE_DATA_PATH_KEY)
    per_site = site_paths(cfg) if node_path in (None, "") else None
    if node_path not in (None, ""):
        path, from_node = Path(str(node_path)).expanduser(), True
        origin = f'node-config "{NODE_DATA_PATH_KEY}"'
    elif per_site is not None:
        field_name = "dataset.site_files" if cfg.site_files else "dataset.local_path"
        if partition_id is None or not 0 <= partition_id < len(per_site):
            raise DataError(
                f"{field_name} names {len(per_site)} site file(s), one client each, but "
                f"client {partition_id} asked for one; set dataset.num_partitions="
                f"{len(per_site)}"
            )
        path, from_node = per_site[partition_id], True
        origin = f"{field_name} (site {partition_id})"
    elif cfg.local_path:
        path, from_node = Path(cfg.local_path).expanduser(), False
        origin = "dataset.local_path"
    else:
        raise DataError(
            "dataset.kind=local needs a data file: start the SuperNode with "
            f'--node-config "{NODE_DATA_PATH_KEY}=/path/to/site.{cfg.local_format.value}" '
            "(deployment) or set dataset.local_path / dataset.site_files (simulation on "
            "one machine)"
        )
    if not path.is_file():
        raise DataError(
            f"data file {str(path)!r} from {origin} does not exist or is not a file; fix {origin}"
        )
    return path, from_node


def site_paths(cfg: DatasetConfig) -> list[Path] | None:
    """Per-site files of a simulated consortium, one client each, or None.

    ``dataset.site_files`` lists them; a ``dataset.local_path`` that is a directory
    stands for every ``*.<local_format>`` file in it, sorted by name (hidden files
    skipped). Client ``k`` (``partition-id`` ``k``) reads the ``k``-th file whole, as
    SuperNode ``k`` would read its ``data-path`` in deployment. Existence is not
    checked here (see :func:`fl_app.data.sites.check_local_data`).

    Raises
    ------
    DataError
        If the directory holds no file of the configured format.
    """
    if cfg.site_files:
        return [Path(p).expanduser() for p in cfg.site_files]
    if cfg.local_path and Path(cfg.local_path).expanduser().is_dir():
        folder = Path(cfg.local_path).expanduser()
        suffix = f".{cfg.local_format.value}"
        found = sorted(
            p for p in folder.iterdir() if p.suffix == suffix and not p.name.startswith(".")
        )
        if not found:
            raise DataError(
                f"dataset.local_path={cfg.local_path!r} is a directory without any "
                f"*{suffix} file (dataset.local_format={cfg.local_format.value}); put one "
                "file per site there or point dataset.local_path at a file"
            )
        return found
    return None


def load_local_source(path: Path, cfg: DatasetConfig) -> InMemorySource:
    """Read a site's ``.npz`` or ``.csv`` file (format from ``dataset.local_format``).

    ``.npz``: arrays ``x`` (``[N, C, H, W]`` or ``[N, C*H*W]``) and ``y`` (``[N]``),
    plus an optional array named ``dataset.natural_id_key``. Read with
    ``allow_pickle=False``: a data file must never be able to run code.

    ``.csv``: a header row; the column ``dataset.label_key`` holds labels, a column
    named ``dataset.natural_id_key`` (if set and present) holds natural ids, and every
    other column is a feature, reshaped to ``dataset.input_shape`` in row-major order.

    Parameters
    ----------
    path : Path
        The file.
    cfg : DatasetConfig
        Supplies format, keys, ``input_shape``, ``num_classes`` and ``pixel_scale``.

    Returns
    -------
    InMemorySource
        Scaled float32 images and int64 labels.

    Raises
    ------
    DataError
        Naming the file and the problem: unreadable/corrupt file, missing arrays or
        columns, wrong shape, non-numeric or non-finite values, bad labels.
    """
    where = f"data file {str(path)!r}"
    if cfg.local_format == LocalFormat.npz:
        x, y, natural_ids = _read_npz(path, cfg, where)
    else:
        x, y, natural_ids = _read_csv(path, cfg, where)
    if x.shape[0] == 0:
        raise DataError(f"{where} holds no examples")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(
            f"{where}: labels have shape {list(y.shape)} but there are {x.shape[0]} "
            "examples; labels must be one per example, shape [N]"
        )
    images = _reshape_features(x, cfg, where)
    if not np.all(np.isfinite(images)):
        raise DataError(f"{where}: features contain NaN or infinite values")
    labels = _integer_labels(y, cfg, where)
    check_labels(labels, cfg, where)
    check_input_range(images, cfg, where)
    scaled = (images / float(cfg.pixel_scale)).astype(np.float32)
    return InMemorySource(x=scaled, y=labels, natural_ids=natural_ids, description=where)


def _read_npz(
    path: Path, cfg: DatasetConfig, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    try:
        # Our own handle: np.load leaks the file it opened when the archive is corrupt.
        with path.open("rb") as handle:
            magic = handle.read(6)
            handle.seek(0)
            if magic.startswith(b"\x93NUMPY"):
                raise DataError(
                    f"{where} is a single .npy array, not an .npz archive with arrays 'x' "
                    "and 'y' (dataset.local_format=npz); save it with np.savez(path, "
                    "x=..., y=...)"
                )
            if not magic.startswith(b"PK"):
                # np.load would try to unpickle anything else; name the real problem.
                raise DataError(
                    f"{where} is not an .npz (zip) archive (dataset.local_format=npz); "
                    "save it with np.savez(path, x=..., y=...) or set "
                    "dataset.local_format"
                )
            with np.load(handle, allow_pickle=False) as archive:
                missing = [key for key in ("x", "y") if key not in archive.files]
                if missing:
                    raise DataError(
                        f"{where} lacks array(s) {missing}; it has {archive.files}. Save "
                        "the images as 'x' and the labels as 'y'"
                    )
                x, y = archive["x"], archive["y"]
                natural_ids = None
                if cfg.natural_id_key and cfg.natural_id_key in archive.files:
                    natural_ids = archive[cfg.natural_id_key]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        # np.load raises these for a truncated archive or an object (pickled) array.
        raise DataError(
            f"{where} could not be read as .npz (dataset.local_format=npz): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{where}: array 'x' has non-numeric dtype {x.dtype}")
    if natural_ids is not None and natural_ids.shape != (x.shape[0],):
        raise DataError(
            f"{where}: array {cfg.natural_id_key!r} (dataset.natural_id_key) has shape "
            f"{list(natural_ids.shape)}, expected one id per example [{x.shape[0]}]"
        )
    return x, y, natural_ids


def _read_csv(
    path: Path, cfg: DatasetConfig, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(
            f"{where} could not be read as CSV (dataset.local_format=csv): "
            f"{type(err).__name__}: {err}"
        ) from err
    if not rows:
        raise DataError(f"{where} is empty; expected a header row and one row per example")
    header = [name.strip() for name in rows[0]]
    if cfg.label_key not in header:
        raise DataError(
            f"{where} has no label column {cfg.label_key!r} (dataset.label_key) in its "
            f"header {header[:8]}{'...' if len(header) > 8 else ''}; rename the column or "
            "set dataset.label_key"
        )
    body = rows[1:]
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(
                f"{where} line {line} has {len(row)} fields but the header has {len(header)}"
            )
    table = np.array(body, dtype=str).reshape(len(body), len(header))
    label_col = header.index(cfg.label_key)
    id_col = (
        header.index(cfg.natural_id_key)
        if cfg.natural_id_key and cfg.natural_id_key in header
        else None
    )
    feature_cols = [i for i in range(len(header)) if i not in (label_col, id_col)]
    try:
        x = table[:, feature_cols].astype(np.float64)
        y = table[:, label_col].astype(np.float64)
    except ValueError as err:
        raise DataError(f"{where} holds a non-numeric feature or label: {err}") from err
    natural_ids = table[:, id_col] if id_col is not None else None
    return x, y, natural_ids


def _reshape_features(x: np.ndarray, cfg: DatasetConfig, where: str) -> np.ndarray:
    shape = configured_input_shape(cfg)
    if x.ndim == 4 and tuple(x.shape[1:]) == shape:
        return x
    if x.ndim == 2 and x.shape[1] == prod(shape):
        return x.reshape(x.shape[0], *shape)
    raise DataError(
        f"{where}: features have shape {list(x.shape)}, which fits neither "
        f"[N, *dataset.input_shape] = [N, {', '.join(map(str, shape))}] nor "
        f"[N, {prod(shape)}]; fix dataset.input_shape or the file"
    )


def _integer_labels(y: np.ndarray, cfg: DatasetConfig, where: str) -> np.ndarray:
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    # CSV labels parse as floats; accept 3.0 but not 3.5 or NaN.
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    raise DataError(
        f"{where}: labels ({cfg.label_key!r}) must be integer class ids in "
        f"[0, dataset.num_classes={cfg.num_classes}), found dtype {y.dtype} with "
        "non-integer values"
    )

"""Public entry points: the server's test set and each client's partition.

Pipeline (the same for every ``dataset.kind``)::

    source rows --stratified holdout--> server test set        (load_server_test_set)
                \\-> training pool --partitioner--> partition k --train/val--> ClientData

Both stages are cached per process (:func:`functools.lru_cache`): in simulation one
process serves many clients, and partitioning once makes each further
``load_client_data`` call an array slice. The cache key is the JSON form of the
config plus the seed and partition count (and, for files, the resolved path with its
size and modification time, so an edited file is re-read).

``dataset.kind=local`` differs on purpose: each site's file *is* its data, the server
has none (:func:`load_server_test_set` returns None), and the file is not partitioned
(see :func:`load_client_data` for the one exception, simulations sharing a file).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fl_app.config.schema import DatasetConfig, DatasetKind
from fl_app.data import local_files, sources, synthetic
from fl_app.data.arrays import ArrayDataset, ClientData, check_data_shape
from fl_app.data.errors import DataError
from fl_app.data.partition import (
    NODE_NUM_PARTITIONS_KEY,
    NODE_PARTITION_ID_KEY,
    check_partition_args,
    partition_rows,
    stratified_holdout,
    train_val_split,
)

__all__ = [
    "clear_caches",
    "load_client_data",
    "load_server_test_set",
    "partition_sizes",
]

NodeConfig = Mapping[str, bool | int | float | str]


@dataclass(frozen=True)
class _Request:
    """Hashable cache key: only ``key`` is compared; ``cfg``/``path`` ride along."""

    key: str
    cfg: DatasetConfig = field(compare=False, hash=False)
    path: Path | None = field(default=None, compare=False, hash=False)


@dataclass(frozen=True, eq=False)
class _Split:
    """A source divided into the training pool and the server's test rows."""

    pool: sources.Source
    pool_rows: np.ndarray
    test: sources.Source | None
    test_rows: np.ndarray | None


def load_server_test_set(cfg: DatasetConfig, seed: int) -> ArrayDataset | None:
    """The server's held-out test set for centralised evaluation.

    For ``digits`` (and hub datasets without a ``test`` split, e.g. FEMNIST) it is a
    stratified, seeded ``dataset.test_fraction`` of all rows, removed before
    partitioning so no client ever holds a test example. Hub datasets that ship a
    ``test`` split (MNIST, CIFAR-10) use that split whole and ignore
    ``dataset.test_fraction``: the published split is the standard benchmark.

    Parameters
    ----------
    cfg : DatasetConfig
        Dataset configuration.
    seed : int
        Experiment seed.

    Returns
    -------
    ArrayDataset or None
        The test set, or None when the server has no data: ``kind=local``, or
        ``dataset.test_fraction`` of 0.
    """
    _check_seed(seed)
    if cfg.kind == DatasetKind.local:
        return None
    split = _split(_request(cfg, None), int(seed))
    if split.test is None or split.test_rows is None or split.test_rows.size == 0:
        return None
    data = split.test.take(split.test_rows)
    check_data_shape(data, cfg)
    return data


def load_client_data(
    cfg: DatasetConfig,
    partition_id: int,
    num_partitions: int,
    seed: int,
    node_config: NodeConfig | None = None,
) -> ClientData:
    """One client's training and validation data.

    ``digits`` / ``hub``: partition ``partition_id`` of ``num_partitions`` of the
    training pool (all data minus the server's test set), split into train/val by
    ``dataset.val_fraction`` with a generator seeded by ``(seed, partition_id)``.

    ``local``: the file named by the node config's ``"data-path"`` (deployment), else
    ``dataset.local_path``. Rule for partitioning:

    * path from ``"data-path"``: the file is this site's data; it is used whole and
      ``partition_id`` / ``num_partitions`` are only range-checked;
    * ``dataset.site_files`` (or a ``dataset.local_path`` directory): a rehearsed
      consortium, client ``partition_id`` reads the ``partition_id``-th site file
      whole, exactly as that site's SuperNode would;
    * path from ``dataset.local_path`` *and* the node config carries Flower's
      simulation keys ``"partition-id"`` and ``"num-partitions"``: the simulated
      clients share one file, so it is partitioned like ``digits`` (no server test
      set is carved: the server never reads local data);
    * otherwise (``dataset.local_path``, no simulation keys): used whole.

    Parameters
    ----------
    cfg : DatasetConfig
        Dataset configuration.
    partition_id : int
        This client's partition, in ``[0, num_partitions)``.
    num_partitions : int
        Number of partitions: ``dataset.num_partitions`` in simulation, the
        SuperNode's ``"num-partitions"`` node-config value in deployment.
    seed : int
        Experiment seed; equal seeds give identical partitions in every process.
    node_config : mapping, optional
        The SuperNode's node config (``context.node_config``).

    Returns
    -------
    ClientData
        ``train`` (never empty) and ``val`` (may be empty).

    Raises
    ------
    DataError
        Bad partition id/count, impossible partitioning, empty partition, or a bad
        local file; the message names the field or key to fix.
    """
    _check_seed(seed)
    check_partition_args(partition_id, num_partitions)
    partition_id, num_partitions, seed = int(partition_id), int(num_partitions), int(seed)
    if cfg.kind == DatasetKind.local:
        path, from_node = local_files.resolve_local_path(cfg, node_config, partition_id)
        request = _request(cfg, path)
        split = _split(request, seed)
        keys = node_config or {}
        shared_file = (
            not from_node and NODE_PARTITION_ID_KEY in keys and NODE_NUM_PARTITIONS_KEY in keys
        )
        if shared_file:
            rows = _partitions(request, seed, num_partitions)[partition_id]
        else:
            rows = split.pool_rows
    else:
        request = _request(cfg, None)
        split = _split(request, seed)
        rows = _partitions(request, seed, num_partitions)[partition_id]
    if rows.size == 0:
        raise DataError(
            f"partition {partition_id} of {num_partitions} is empty; lower "
            f"dataset.num_partitions or raise dataset.min_partition_size"
        )
    data = split.pool.take(rows)
    check_data_shape(data, cfg)
    train_pos, val_pos = train_val_split(len(data), cfg.val_fraction, seed, partition_id)
    return ClientData(
        train=ArrayDataset(x=data.x[train_pos], y=data.y[train_pos]),
        val=ArrayDataset(x=data.x[val_pos], y=data.y[val_pos]),
    )


def partition_sizes(cfg: DatasetConfig, seed: int) -> list[int]:
    """Training-pool size (train + val) of each of ``dataset.num_partitions`` partitions.

    For ``kind=local`` this is the simulation view: each per-site file's size
    (``dataset.site_files`` or a ``dataset.local_path`` directory), else
    ``dataset.local_path`` shared by ``dataset.num_partitions`` simulated clients.
    """
    _check_seed(seed)
    per_site = local_files.site_paths(cfg) if cfg.kind == DatasetKind.local else None
    if per_site is not None:
        sizes = []
        for k in range(len(per_site)):
            site = local_files.resolve_local_path(cfg, None, k)[0]
            sizes.append(int(_split(_request(cfg, site), int(seed)).pool_rows.size))
        return sizes
    path = local_files.resolve_local_path(cfg, None)[0] if cfg.kind == DatasetKind.local else None
    parts = _partitions(_request(cfg, path), int(seed), int(cfg.num_partitions))
    return [int(rows.size) for rows in parts]


def clear_caches() -> None:
    """Forget every cached source and partitioning (tests; long-lived processes)."""
    _split.cache_clear()
    _partitions.cache_clear()


# ---- cached stages -------------------------------------------------------------------


# 16: a simulated consortium reads one file per site in the same process.
@functools.lru_cache(maxsize=16)
def _split(request: _Request, seed: int) -> _Split:
    cfg = request.cfg
    test: sources.Source | None = None
    if cfg.kind == DatasetKind.digits:
        pool: sources.Source = sources.load_digits_source(cfg)
        carve = True
    elif cfg.kind == DatasetKind.hub:
        if not cfg.hub_path:
            raise DataError(
                "dataset.kind=hub needs dataset.hub_path (e.g. ylecun/mnist, "
                "uoft-cs/cifar10, flwrlabs/femnist)"
            )
        # Through the module attribute so tests can substitute the network call.
        pool, test = sources.hub_sources(sources.fetch_hub_dataset(cfg.hub_path), cfg)
        carve = test is None
    elif cfg.kind == DatasetKind.local:
        if request.path is None:
            raise DataError("dataset.kind=local: no data file resolved")
        pool = local_files.load_local_source(request.path, cfg)
        carve = False
    elif cfg.kind == DatasetKind.synthetic:
        # A surrogate stands in for a whole data set: the same holdout and partitions.
        pool = synthetic.load_synthetic_source(cfg)
        carve = True
    else:
        raise DataError(f"unknown dataset.kind {cfg.kind!r}")

    if carve:
        pool_rows, test_rows = stratified_holdout(pool.labels, float(cfg.test_fraction), seed)
        return _Split(pool=pool, pool_rows=pool_rows, test=pool, test_rows=test_rows)
    all_rows = np.arange(pool.labels.shape[0], dtype=np.int64)
    published = None if test is None else np.arange(test.labels.shape[0], dtype=np.int64)
    return _Split(pool=pool, pool_rows=all_rows, test=test, test_rows=published)


@functools.lru_cache(maxsize=8)
def _partitions(request: _Request, seed: int, num_partitions: int) -> tuple[np.ndarray, ...]:
    split = _split(request, seed)
    natural = split.pool.natural_ids
    positions = partition_rows(
        split.pool.labels[split.pool_rows],
        None if natural is None else natural[split.pool_rows],
        request.cfg,
        num_partitions,
        seed,
    )
    # Positions index the pool; map them back to rows of the source.
    return tuple(split.pool_rows[pos] for pos in positions)


# ---- helpers --------------------------------------------------------------------------


def _request(cfg: DatasetConfig, path: Path | None) -> _Request:
    body: dict[str, object] = {"cfg": _jsonable(dataclasses.asdict(cfg))}
    if path is None and cfg.kind == DatasetKind.synthetic:
        # Re-read a surrogate replaced under the same folder (its hash is checked then).
        surrogate = synthetic.synthetic_data_path(cfg)
        path = surrogate if surrogate.is_file() else None
    if path is not None:
        stat = path.stat()
        body["file"] = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    return _Request(key=json.dumps(body, sort_keys=True), cfg=cfg, path=path)


def _jsonable(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative int, found {seed!r}")

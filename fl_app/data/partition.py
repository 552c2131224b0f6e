"""Splitting rows: the server's held-out test set, client partitions, train/val.

Everything here works on row indices and labels only, never on images, so the same
code serves digits, hub datasets and local files, and partitioning a 60,000-image
dataset costs what partitioning 60,000 integers costs.

Client partitions come from ``flwr_datasets.partitioner``, applied to a small
in-memory ``datasets.Dataset`` holding each row's label, natural id and original
index. Every client process partitions independently, so the result must be a pure
function of ``(labels, config, num_partitions, seed)``: the pool is shuffled by a
seeded generator first and every partitioner gets the seed explicitly.
"""

from __future__ import annotations

import logging
import warnings

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    ShardPartitioner,
)

from fl_app.config.schema import DatasetConfig, PartitionerName
from fl_app.data.errors import DataError

__all__ = [
    "NODE_NUM_PARTITIONS_KEY",
    "NODE_PARTITION_ID_KEY",
    "check_partition_args",
    "partition_rows",
    "stratified_holdout",
    "stream_generator",
    "train_val_split",
]

logger = logging.getLogger(__name__)

# Node-config keys Flower's simulation engine sets for every simulated SuperNode.
NODE_PARTITION_ID_KEY = "partition-id"
NODE_NUM_PARTITIONS_KEY = "num-partitions"

# Independent random streams derived from the one experiment seed.
_TEST_STREAM = 0
_SHUFFLE_STREAM = 1
_VAL_STREAM = 2

# Column names of the index table handed to the partitioners (internal, so they
# cannot collide with a dataset's own column names).
_LABEL = "label"
_NATURAL_ID = "natural_id"
_ROW = "row"

_NUM_PARTITIONS_FIELD = (
    f'dataset.num_partitions (node-config "{NODE_NUM_PARTITIONS_KEY}" in deployment)'
)


def stream_generator(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator for ``(seed, *stream)``; never the global RNG."""
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def check_partition_args(partition_id: int, num_partitions: int) -> None:
    """Reject a partition id outside ``[0, num_partitions)`` or a bad count.

    Raises
    ------
    DataError
        Naming ``dataset.num_partitions`` / the node-config keys.
    """
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)):
        raise DataError(f"{_NUM_PARTITIONS_FIELD} must be an int, found {num_partitions!r}")
    if num_partitions < 1:
        raise DataError(f"{_NUM_PARTITIONS_FIELD} must be >= 1, found {num_partitions}")
    if isinstance(partition_id, bool) or not isinstance(partition_id, (int, np.integer)):
        raise DataError(
            f'partition id (node-config "{NODE_PARTITION_ID_KEY}") must be an int, found '
            f"{partition_id!r}"
        )
    if not 0 <= partition_id < num_partitions:
        raise DataError(
            f'partition id (node-config "{NODE_PARTITION_ID_KEY}") is {partition_id} but '
            f"must lie in [0, {num_partitions}) for {num_partitions} partitions; fix the "
            f"SuperNode's node-config or {_NUM_PARTITIONS_FIELD}"
        )


def stratified_holdout(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into a pool and a held-out test set with the same label mix.

    ``round(fraction * N)`` rows are held out; each class contributes in proportion
    to its size, the rounding remainders going to the classes with the largest
    fractional parts (so the total is exact).

    Parameters
    ----------
    labels : np.ndarray
        int64 ``[N]``.
    fraction : float
        ``dataset.test_fraction`` in ``[0, 1)``.
    seed : int
        Experiment seed.

    Returns
    -------
    (pool_rows, test_rows) : (np.ndarray, np.ndarray)
        Sorted int64 row indices; disjoint, together all of ``range(N)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"dataset.test_fraction must lie in [0, 1), found {fraction}")
    n = labels.shape[0]
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * fraction
    per_class = np.floor(exact).astype(np.int64)
    remainder = round(fraction * n) - int(per_class.sum())
    if remainder > 0:
        # Stable sort: ties go to the smaller class id, deterministically.
        per_class[np.argsort(-(exact - per_class), kind="stable")[:remainder]] += 1
    rng = stream_generator(seed, _TEST_STREAM)
    test_parts = [
        rng.permutation(np.flatnonzero(labels == label))[:take]
        for label, take in zip(classes, per_class, strict=True)
    ]
    test_mask = np.zeros(n, dtype=bool)
    if test_parts:
        test_mask[np.concatenate(test_parts)] = True
    return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)


def partition_rows(
    labels: np.ndarray,
    natural_ids: np.ndarray | None,
    cfg: DatasetConfig,
    num_partitions: int,
    seed: int,
) -> list[np.ndarray]:
    """Assign every row of a pool to a client partition with a flwr-datasets partitioner.

    Parameters
    ----------
    labels : np.ndarray
        int64 ``[N]`` labels of the pool.
    natural_ids : np.ndarray or None
        ``[N]`` natural ids (needed by ``partitioner=natural``).
    cfg : DatasetConfig
        Supplies ``partitioner`` and its parameters.
    num_partitions : int
        Number of partitions (clients).
    seed : int
        Experiment seed.

    Returns
    -------
    list of np.ndarray
        ``num_partitions`` int64 arrays of positions into ``labels``. ``iid`` and
        ``dirichlet`` use every row exactly once; ``shard`` drops the rows that do not
        fill a whole shard; ``natural`` with fewer partitions than natural ids uses
        the first ``num_partitions`` ids (in sorted order) and drops the rest.

    Raises
    ------
    DataError
        If the partitioning is impossible with these settings (names the fields).
    """
    check_partition_args(0, num_partitions)
    num_partitions = int(num_partitions)
    n = int(labels.shape[0])
    if cfg.partitioner != PartitionerName.natural and num_partitions > n:
        raise DataError(
            f"{_NUM_PARTITIONS_FIELD} is {num_partitions} but the training pool holds only "
            f"{n} examples, so some clients would get none; lower it to at most {n}"
        )
    # Shuffle first: IidPartitioner cuts contiguous blocks and the others take rows
    # in dataset order, so the seeded shuffle is what makes the assignment random.
    order = stream_generator(seed, _SHUFFLE_STREAM).permutation(n)
    columns: dict[str, object] = {_LABEL: labels[order], _ROW: order}
    if cfg.partitioner == PartitionerName.natural:
        columns[_NATURAL_ID] = _natural_ids_for(natural_ids, cfg)[order].tolist()
    table = datasets.Dataset.from_dict(columns)

    partitioner = _build_partitioner(cfg, num_partitions, n, seed)
    partitioner.dataset = table
    try:
        # The Dirichlet partitioner warns on every resampling; its final failure is
        # turned into a DataError below, so the warnings would only be noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # pyarrow >= 25 deprecates an option datasets' sort (ShardPartitioner) passes.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"pyarrow\.")
            available = partitioner.num_partitions
            if cfg.partitioner == PartitionerName.natural:
                _check_natural_count(available, num_partitions, cfg)
            return [
                np.asarray(
                    partitioner.load_partition(pid).with_format("arrow")[_ROW].to_numpy(),
                    dtype=np.int64,
                )
                for pid in range(num_partitions)
            ]
    except ValueError as err:
        if isinstance(err, DataError):
            raise
        raise DataError(_partitioner_failure(cfg, num_partitions, n, err)) from err


def train_val_split(
    n: int, val_fraction: float, seed: int, partition_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a client's train and validation examples.

    ``floor(val_fraction * n)`` examples go to validation, but never all of them: a
    client keeps at least one training example, so tiny partitions get an empty
    validation split rather than no training data.

    Returns
    -------
    (train_positions, val_positions) : (np.ndarray, np.ndarray)
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"dataset.val_fraction must lie in [0, 1), found {val_fraction}")
    n_val = min(int(np.floor(val_fraction * n)), max(n - 1, 0))
    perm = stream_generator(seed, _VAL_STREAM, int(partition_id)).permutation(n)
    return perm[n_val:], perm[:n_val]


def _build_partitioner(cfg: DatasetConfig, num_partitions: int, n: int, seed: int) -> Partitioner:
    name = cfg.partitioner
    if name == PartitionerName.iid:
        return IidPartitioner(num_partitions=num_partitions)
    if name == PartitionerName.dirichlet:
        if not cfg.dirichlet_alpha > 0:
            raise DataError(f"dataset.dirichlet_alpha must be > 0, found {cfg.dirichlet_alpha}")
        # The partitioner resamples up to 10 times and then gives up; when even an
        # equal split cannot give every client min_partition_size rows, say so now.
        if num_partitions * cfg.min_partition_size > n:
            raise DataError(
                f"{num_partitions} partitions x dataset.min_partition_size="
                f"{cfg.min_partition_size} exceeds the {n} examples in the training pool; "
                f"lower {_NUM_PARTITIONS_FIELD} or dataset.min_partition_size"
            )
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=_LABEL,
            alpha=float(cfg.dirichlet_alpha),
            min_partition_size=int(cfg.min_partition_size),
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if name == PartitionerName.shard:
        shards = int(cfg.shards_per_partition)
        if shards < 1:
            raise DataError(f"dataset.shards_per_partition must be >= 1, found {shards}")
        if num_partitions * shards > n:
            raise DataError(
                f"{num_partitions} partitions x dataset.shards_per_partition={shards} "
                f"shards exceed the {n} examples in the training pool (shards would be "
                f"empty); lower {_NUM_PARTITIONS_FIELD} or dataset.shards_per_partition"
            )
        return ShardPartitioner(
            num_partitions=num_partitions,
            partition_by=_LABEL,
            num_shards_per_partition=shards,
            shuffle=True,
            seed=seed,
        )
    if name == PartitionerName.natural:
        return NaturalIdPartitioner(partition_by=_NATURAL_ID)
    raise DataError(f"unknown dataset.partitioner {name!r}")


def _natural_ids_for(natural_ids: np.ndarray | None, cfg: DatasetConfig) -> np.ndarray:
    if not cfg.natural_id_key:
        raise DataError(
            "dataset.partitioner=natural needs dataset.natural_id_key, the column that "
            "identifies each example's owner (e.g. writer_id for FEMNIST)"
        )
    if natural_ids is None:
        raise DataError(
            f"dataset.partitioner=natural but the data has no {cfg.natural_id_key!r} column "
            "(dataset.natural_id_key); choose another partitioner or add the id column"
        )
    return natural_ids


def _check_natural_count(available: int, num_partitions: int, cfg: DatasetConfig) -> None:
    if num_partitions > available:
        raise DataError(
            f"{_NUM_PARTITIONS_FIELD} is {num_partitions} but the training pool has only "
            f"{available} distinct {cfg.natural_id_key!r} values (dataset.natural_id_key); "
            f"lower it to at most {available}"
        )
    if num_partitions < available:
        logger.info(
            "natural partitioning: using %d of %d %r ids (the first in sorted order)",
            num_partitions,
            available,
            cfg.natural_id_key,
        )


def _partitioner_failure(cfg: DatasetConfig, num_partitions: int, n: int, err: Exception) -> str:
    if cfg.partitioner == PartitionerName.dirichlet:
        return (
            f"the Dirichlet partitioner could not give each of {num_partitions} partitions "
            f"at least dataset.min_partition_size={cfg.min_partition_size} of the {n} "
            f"examples with dataset.dirichlet_alpha={cfg.dirichlet_alpha} ({err}); raise "
            f"dataset.dirichlet_alpha, lower dataset.min_partition_size or lower "
            f"{_NUM_PARTITIONS_FIELD}"
        )
    return (
        f"dataset.partitioner={cfg.partitioner.value} failed for {num_partitions} "
        f"partitions of {n} examples ({err}); lower {_NUM_PARTITIONS_FIELD}"
    )

"""Checks of a site's data before anything trains.

A bad data file used to surface only as every client's refusal in round 1, after
Ray had started, and the run still ended "completed" with a random-init model. The
two functions here read the files the way the ClientApp will and fail early instead:

* :func:`check_local_data`: simulation, before Ray starts; every file the config
  names (``dataset.local_path``, a directory of site files, ``dataset.site_files``).
* :func:`check_site_data`: one SuperNode's own data (its ``--node-config``), for the
  SuperNode start-up check and ``fl-app site check``.

Both go through :func:`fl_app.data.load_client_data`, so they check exactly what a
client would load: readable file, shapes, finite values, labels in range, features
inside ``dataset.input_range`` after ``dataset.pixel_scale``, a non-empty training
split. Problems raise :class:`DataError` with the per-file message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fl_app.config.schema import DatasetConfig, DatasetKind
from fl_app.data import local_files
from fl_app.data.errors import DataError
from fl_app.data.loader import load_client_data
from fl_app.data.partition import (
    NODE_NUM_PARTITIONS_KEY,
    NODE_PARTITION_ID_KEY,
    check_partition_args,
)

__all__ = ["NODE_DATA_FORMAT_KEY", "SiteData", "check_local_data", "check_site_data"]

NodeConfig = Mapping[str, bool | int | float | str]

# Node-config key recording the format of the site's file (``fl-app deploy node-config``).
NODE_DATA_FORMAT_KEY = "data-format"


@dataclass(frozen=True)
class SiteData:
    """What one site's check found (sizes only: nothing about the records themselves).

    Attributes
    ----------
    site : str
        The file (or, for built-in data, the partition) that was checked.
    train : int
        Examples the client would train on.
    val : int
        Examples in its local validation split.
    """

    site: str
    train: int
    val: int

    def line(self) -> str:
        """One human line, e.g. for ``fl-app site check``."""
        return f"{self.site}: ok ({self.train} training, {self.val} validation examples)"


def check_site_data(node_config: NodeConfig, cfg: DatasetConfig, seed: int = 0) -> SiteData:
    """Check one SuperNode's data as its ClientApp would load it, before any round.

    For the SuperNode start-up check and ``fl-app site check --node-config ...``.

    Parameters
    ----------
    node_config : mapping
        The SuperNode's ``--node-config``: ``"data-path"`` (and ``"data-format"``) for
        a site's own file; ``"partition-id"``/``"num-partitions"`` for a simulated
        partition of a built-in dataset.
    cfg : DatasetConfig
        The experiment's dataset section. A SuperNode starts before any experiment
        is submitted, so its start-up check passes the shipped defaults instead
        (:func:`fl_app.deploy.site_check.site_dataset_defaults`; this package composes no
        Hydra config).
    seed : int
        Seed of the train/validation split (sizes do not depend on it).

    Returns
    -------
    SiteData
        The file and its split sizes.

    Raises
    ------
    DataError
        A missing or unreadable file, a ``"data-format"`` that contradicts the
        experiment's ``dataset.local_format``, bad shapes, non-finite values, labels
        out of range, mis-scaled features, or partition keys out of range.
    """
    node_format = node_config.get(NODE_DATA_FORMAT_KEY)
    if node_format not in (None, "") and str(node_format) != cfg.local_format.value:
        raise DataError(
            f'node-config "{NODE_DATA_FORMAT_KEY}={node_format}" but the experiment reads '
            f"dataset.local_format={cfg.local_format.value}; convert the site's file or "
            "agree on the format with the coordinator"
        )
    try:
        pid = int(node_config.get(NODE_PARTITION_ID_KEY, 0))
        nparts = int(node_config.get(NODE_NUM_PARTITIONS_KEY, 1))
    except (TypeError, ValueError):
        raise DataError(
            f'node-config "{NODE_PARTITION_ID_KEY}" / "{NODE_NUM_PARTITIONS_KEY}" must be '
            f"integers, found {dict(node_config)!r}"
        ) from None
    check_partition_args(pid, nparts)
    if cfg.kind is DatasetKind.hub:
        # The hub dataset loads (from the network or cache) on the first round; only
        # the node's own settings can be checked here.
        return SiteData(site=f"{cfg.hub_path} partition {pid} of {nparts}", train=0, val=0)
    data = load_client_data(cfg, pid, nparts, seed, dict(node_config))
    if cfg.kind is DatasetKind.local:
        site = str(local_files.resolve_local_path(cfg, node_config, pid)[0])
    else:
        site = f"{cfg.kind.value} partition {pid} of {nparts}"
    return SiteData(site=site, train=len(data.train), val=len(data.val))


def check_local_data(cfg: DatasetConfig, seed: int) -> list[SiteData]:
    """Read every local file a simulation will use, before Ray starts.

    Each simulated client is checked with the node config the simulation engine gives
    it (``"partition-id"``, ``"num-partitions"``), so a per-site file is checked as
    that site's whole data and a shared file as the partitions cut from it.

    Parameters
    ----------
    cfg : DatasetConfig
        The run's dataset section (validated).
    seed : int
        The run's seed (partitioning of a shared file depends on it).

    Returns
    -------
    list of SiteData
        One entry per simulated client; empty for datasets other than ``kind=local``
        (digits are checked when the config is validated, hub data needs the network).

    Raises
    ------
    DataError
        Listing every site file that failed, each with its own message, or the number
        of site files when it differs from ``dataset.num_partitions``.
    """
    if cfg.kind is not DatasetKind.local:
        return []
    n = int(cfg.num_partitions)
    per_site = local_files.site_paths(cfg)
    if per_site is not None and len(per_site) != n:
        where = "dataset.site_files" if cfg.site_files else f"dataset.local_path={cfg.local_path!r}"
        raise DataError(
            f"{where} names {len(per_site)} site file(s), one simulated client each, but "
            f"dataset.num_partitions={n}; set dataset.num_partitions={len(per_site)}"
        )
    found: list[SiteData] = []
    failures: list[str] = []
    for k in range(n):
        node = {NODE_PARTITION_ID_KEY: k, NODE_NUM_PARTITIONS_KEY: n}
        try:
            found.append(check_site_data(node, cfg, seed))
        except DataError as err:
            failures.append(f"client {k}: {err}")
            if per_site is None:
                break  # one shared file: every client would report the same problem
    if failures:
        total = f"{len(failures)} of {n} site files" if per_site is not None else "the data file"
        raise DataError(
            f"local data check failed before round 1 ({total}):\n  " + "\n  ".join(failures)
        )
    return found

"""Data for the federation: the server's test set and every client's partition.

* :func:`load_server_test_set`: held-out split for centralised evaluation (None when
  the server holds no data, ``dataset.kind=local``).
* :func:`load_client_data`: one client's partition, split into train / validation.
* :func:`partition_sizes`: sizes of all partitions (tests, benchmarks).
* :func:`check_data_shape`: does data fit ``dataset.input_shape`` / ``num_classes``?
* :func:`check_site_data`: one SuperNode's data, checked at start-up (``fl-app site
  check``); :func:`check_local_data`: every local file of a simulation, before Ray.

Sources: scikit-learn digits (offline default), Hugging Face hub datasets, and
per-institution ``.npz`` / ``.csv`` files. Partitioning uses ``flwr-datasets``
partitioners and is deterministic given the seed, so clients that partition
independently agree. Problems raise :class:`DataError` naming the field to fix.
"""

from fl_app.data.arrays import ArrayDataset, ClientData, check_data_shape
from fl_app.data.errors import DataError
from fl_app.data.loader import load_client_data, load_server_test_set, partition_sizes
from fl_app.data.sites import SiteData, check_local_data, check_site_data

__all__ = [
    "ArrayDataset",
    "ClientData",
    "DataError",
    "SiteData",
    "check_data_shape",
    "check_local_data",
    "check_site_data",
    "load_client_data",
    "load_server_test_set",
    "partition_sizes",
]

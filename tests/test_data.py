"""Tests of fl_app.data: sources, splits, partitioners, local files, errors.

No test touches the network: the hub path is exercised by substituting the single
network function (``sources.fetch_hub_dataset``) with an in-memory DatasetDict.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from PIL import Image

from fl_app.config.schema import DatasetConfig, DatasetKind, LocalFormat, PartitionerName
from fl_app.data import (
    ArrayDataset,
    ClientData,
    DataError,
    check_data_shape,
    load_client_data,
    load_server_test_set,
    partition_sizes,
    sources,
)
from fl_app.data.loader import clear_caches

SEED = 42


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_caches()
    yield
    clear_caches()


def digits_cfg(**overrides: Any) -> DatasetConfig:
    return dataclasses.replace(DatasetConfig(), **overrides)


def row_hashes(data: ArrayDataset) -> list[str]:
    return [
        hashlib.sha1(x.tobytes() + int(y).to_bytes(8, "little")).hexdigest()
        for x, y in zip(data.x, data.y, strict=True)
    ]


def all_partitions(cfg: DatasetConfig, seed: int = SEED) -> list[ClientData]:
    return [load_client_data(cfg, i, cfg.num_partitions, seed) for i in range(cfg.num_partitions)]


def joined(part: ClientData) -> ArrayDataset:
    return ArrayDataset(
        x=np.concatenate([part.train.x, part.val.x]), y=np.concatenate([part.train.y, part.val.y])
    )


def max_label_share(part: ClientData, num_classes: int = 10) -> float:
    counts = np.bincount(joined(part).y, minlength=num_classes)
    return counts.max() / counts.sum()


# ---- digits: shapes, split, determinism ---------------------------------------------


def test_digits_shapes_dtypes_and_scaling():
    cfg = digits_cfg()
    test = load_server_test_set(cfg, SEED)
    client = load_client_data(cfg, 0, cfg.num_partitions, SEED)
    assert test is not None
    for data in (test, client.train, client.val):
        assert data.x.dtype == np.float32 and data.y.dtype == np.int64
        assert data.x.shape[1:] == (1, 8, 8) and data.x.shape[0] == len(data) == data.y.shape[0]
        assert data.x.min() >= 0.0 and data.x.max() <= 1.0
        check_data_shape(data, cfg)
    # Raw digits intensities are integers 0..16, so x * 16 must be integral again.
    np.testing.assert_array_equal(test.x * 16, np.round(test.x * 16))
    assert test.x.max() == 1.0
    assert len(test) == round(0.2 * 1797)
    # Stratified: every class is in the test set with roughly its overall share.
    assert np.bincount(test.y, minlength=10).min() >= 30
    # val is val_fraction (floored) of the partition.
    n = len(client.train) + len(client.val)
    assert len(client.val) == int(0.1 * n)


def test_test_split_disjoint_from_partitions_and_union_is_full_data():
    from sklearn.datasets import load_digits

    cfg = digits_cfg(num_partitions=7)
    bunch = load_digits()
    full = ArrayDataset(
        x=(bunch.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32),
        y=bunch.target.astype(np.int64),
    )
    test = load_server_test_set(cfg, SEED)
    assert test is not None
    test_hashes = Counter(row_hashes(test))
    part_hashes: Counter[str] = Counter()
    for part in all_partitions(cfg):
        part_hashes.update(row_hashes(joined(part)))
    assert not set(test_hashes) & set(part_hashes)
    assert test_hashes + part_hashes == Counter(row_hashes(full))
    assert sum(partition_sizes(cfg, SEED)) == len(full) - len(test)


@pytest.mark.parametrize(
    "partitioner", [PartitionerName.iid, PartitionerName.dirichlet, PartitionerName.shard]
)
def test_partitions_deterministic_given_seed(partitioner):
    cfg = digits_cfg(partitioner=partitioner, num_partitions=5)
    first = all_partitions(cfg)
    clear_caches()  # a fresh process partitions from scratch
    second = all_partitions(cfg)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.train.x, b.train.x)
        np.testing.assert_array_equal(a.train.y, b.train.y)
        np.testing.assert_array_equal(a.val.y, b.val.y)
    other = all_partitions(cfg, seed=SEED + 1)
    assert any(
        row_hashes(a.train) != row_hashes(b.train) for a, b in zip(first, other, strict=True)
    )


def test_test_split_depends_on_seed_only():
    cfg = digits_cfg()
    a, b = load_server_test_set(cfg, 1), load_server_test_set(cfg, 1)
    c = load_server_test_set(cfg, 2)
    assert a is not None and b is not None and c is not None
    assert row_hashes(a) == row_hashes(b)
    assert set(row_hashes(a)) != set(row_hashes(c))


def test_zero_test_fraction_gives_no_server_set():
    cfg = digits_cfg(test_fraction=0.0)
    assert load_server_test_set(cfg, SEED) is None
    assert sum(partition_sizes(cfg, SEED)) == 1797


# ---- partitioners ---------------------------------------------------------------------


def test_iid_sizes_balanced():
    sizes = partition_sizes(digits_cfg(num_partitions=13), SEED)
    assert len(sizes) == 13 and max(sizes) - min(sizes) <= 1


def test_dirichlet_skews_labels_and_respects_min_size():
    iid = digits_cfg(num_partitions=10)
    skewed = digits_cfg(
        num_partitions=10,
        partitioner=PartitionerName.dirichlet,
        dirichlet_alpha=0.3,
        min_partition_size=20,
    )
    iid_share = np.mean([max_label_share(p) for p in all_partitions(iid)])
    skew_share = np.mean([max_label_share(p) for p in all_partitions(skewed)])
    assert skew_share > iid_share + 0.15
    sizes = partition_sizes(skewed, SEED)
    assert min(sizes) >= 20
    # Dirichlet assigns every pool row exactly once.
    assert sum(sizes) == sum(partition_sizes(iid, SEED))


def test_dirichlet_impossible_min_size_raises_quickly():
    cfg = digits_cfg(num_partitions=1000, partitioner=PartitionerName.dirichlet)
    with pytest.raises(DataError, match=r"dataset\.min_partition_size") as err:
        partition_sizes(cfg, SEED)
    assert "dataset.num_partitions" in str(err.value)
    # Feasible on average but not under alpha=0.05 label skew: the partitioner's
    # ten resampling attempts fail, and that surfaces as a DataError, not a hang.
    cfg = digits_cfg(
        num_partitions=100,
        partitioner=PartitionerName.dirichlet,
        dirichlet_alpha=0.05,
        min_partition_size=10,
    )
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"dataset\.dirichlet_alpha") as err:
        load_client_data(cfg, 0, 100, SEED)
    assert "dataset.min_partition_size" in str(err.value)
    assert time.perf_counter() - start < 5


def test_shard_partitioner_gives_few_labels():
    cfg = digits_cfg(num_partitions=10, partitioner=PartitionerName.shard, shards_per_partition=2)
    labels_per_client = [np.unique(joined(p).y).size for p in all_partitions(cfg)]
    # Two shards each; a shard may straddle a class boundary, hence up to 4.
    assert max(labels_per_client) <= 4
    assert np.mean(labels_per_client) <= 3
    with pytest.raises(DataError, match=r"dataset\.shards_per_partition"):
        partition_sizes(digits_cfg(num_partitions=1000, partitioner=PartitionerName.shard), SEED)


def test_partition_id_and_count_validated():
    cfg = digits_cfg()
    with pytest.raises(DataError, match="partition-id"):
        load_client_data(cfg, 10, 10, SEED)
    with pytest.raises(DataError, match="partition-id"):
        load_client_data(cfg, -1, 10, SEED)
    with pytest.raises(DataError, match=r"dataset\.num_partitions"):
        load_client_data(cfg, 0, 0, SEED)
    with pytest.raises(DataError, match=r"dataset\.num_partitions"):
        load_client_data(cfg, 0, 5000, SEED)


def test_natural_partitioner_on_digits_needs_id_column():
    with pytest.raises(DataError, match=r"dataset\.natural_id_key"):
        load_client_data(digits_cfg(partitioner=PartitionerName.natural), 0, 10, SEED)
    cfg = digits_cfg(partitioner=PartitionerName.natural, natural_id_key="writer")
    with pytest.raises(DataError, match="no 'writer' column"):
        load_client_data(cfg, 0, 10, SEED)


def test_thousand_partitions():
    cfg = digits_cfg(num_partitions=1000, val_fraction=0.0)
    parts = all_partitions(cfg)
    assert sum(len(p.train) for p in parts) == 1797 - round(0.2 * 1797)
    assert all(len(p.train) >= 1 and len(p.val) == 0 for p in parts)


# ---- hub (offline, substituted loader) ------------------------------------------------


def _grey_images(rng: np.random.Generator, n: int, size: int) -> tuple[list, np.ndarray]:
    pixels = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    return [Image.fromarray(p, mode="L") for p in pixels], pixels


def _fake_hub(monkeypatch: pytest.MonkeyPatch, loaded: datasets.DatasetDict) -> list[str]:
    calls: list[str] = []

    def fetch(hub_path: str) -> datasets.DatasetDict:
        calls.append(hub_path)
        return loaded

    monkeypatch.setattr(sources, "fetch_hub_dataset", fetch)
    return calls


def test_hub_with_test_split(monkeypatch):
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(10)})
    train_imgs, train_px = _grey_images(rng, 120, 12)
    test_imgs, test_px = _grey_images(rng, 30, 12)
    train_y, test_y = np.arange(120) % 10, np.arange(30) % 10
    loaded = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(
            {"image": train_imgs, "label": train_y.tolist()}, features=features
        ),
        test=datasets.Dataset.from_dict(
            {"image": test_imgs, "label": test_y.tolist()}, features=features
        ),
    )
    calls = _fake_hub(monkeypatch, loaded)
    cfg = DatasetConfig(
        kind=DatasetKind.hub,
        hub_path="fake/mnist",
        input_shape=[1, 12, 12],
        num_partitions=4,
        pixel_scale=255.0,
    )
    test = load_server_test_set(cfg, SEED)
    assert test is not None and calls == ["fake/mnist"]
    # The published test split is used whole, in order, scaled by 1/255.
    np.testing.assert_allclose(test.x[:, 0], test_px / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(test.y, test_y)
    parts = all_partitions(cfg)
    assert sum(len(joined(p)) for p in parts) == 120
    assert partition_sizes(cfg, SEED) == [30, 30, 30, 30]
    # Every partition row is a real train row: its pixels match its label's source.
    lookup = {px.tobytes(): int(y) for px, y in zip(train_px, train_y, strict=True)}
    for part in parts:
        data = joined(part)
        assert data.x.dtype == np.float32 and data.x.shape[1:] == (1, 12, 12)
        raw = np.round(data.x[:, 0] * 255).astype(np.uint8)
        assert [lookup[r.tobytes()] for r in raw] == data.y.tolist()


def test_hub_rgb_images_are_chw(monkeypatch):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(20, 4, 5, 3), dtype=np.uint8)  # H=4, W=5
    images = [Image.fromarray(p, mode="RGB") for p in pixels]
    _fake_hub(
        monkeypatch,
        datasets.DatasetDict(
            train=datasets.Dataset.from_dict(
                {"img": images, "label": [i % 2 for i in range(20)]},
                features=datasets.Features(
                    {"img": datasets.Image(), "label": datasets.ClassLabel(2)}
                ),
            )
        ),
    )
    cfg = DatasetConfig(
        kind=DatasetKind.hub,
        hub_path="fake/cifar",
        image_key="img",
        input_shape=[3, 4, 5],
        num_classes=2,
        num_partitions=2,
        test_fraction=0.5,
        pixel_scale=255.0,
    )
    test = load_server_test_set(cfg, SEED)
    assert test is not None and test.x.shape == (10, 3, 4, 5)
    by_bytes = {np.moveaxis(p, -1, 0).tobytes() for p in pixels}
    assert all(np.round(x * 255).astype(np.uint8).tobytes() in by_bytes for x in test.x)
    with pytest.raises(DataError, match=r"dataset\.input_shape"):
        load_server_test_set(dataclasses.replace(cfg, input_shape=[3, 8, 8]), SEED)


def test_hub_without_test_split_natural_partitioning(monkeypatch):
    rng = np.random.default_rng(2)
    images, _ = _grey_images(rng, 200, 6)
    writers = [f"w{i % 8}" for i in range(200)]
    characters = [(i * 7) % 5 for i in range(200)]
    _fake_hub(
        monkeypatch,
        datasets.DatasetDict(
            train=datasets.Dataset.from_dict(
                {"image": images, "character": characters, "writer_id": writers}
            )
        ),
    )
    cfg = DatasetConfig(
        kind=DatasetKind.hub,
        hub_path="fake/femnist",
        label_key="character",
        input_shape=[1, 6, 6],
        num_classes=5,
        num_partitions=8,
        partitioner=PartitionerName.natural,
        natural_id_key="writer_id",
        test_fraction=0.1,
        pixel_scale=255.0,
    )
    test = load_server_test_set(cfg, SEED)
    assert test is not None and len(test) == 20  # carved from train, stratified
    sizes = partition_sizes(cfg, SEED)
    assert len(sizes) == 8 and sum(sizes) == 180
    with pytest.raises(DataError, match="only 8 distinct 'writer_id'"):
        load_client_data(cfg, 0, 9, SEED)
    # Fewer partitions than writers: each client is still one whole writer.
    assert len(joined(load_client_data(cfg, 0, 3, SEED))) == sizes[0]


def test_hub_bad_columns_and_missing_path(monkeypatch):
    images, _ = _grey_images(np.random.default_rng(3), 4, 8)
    _fake_hub(
        monkeypatch,
        datasets.DatasetDict(
            train=datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3]})
        ),
    )
    cfg = DatasetConfig(kind=DatasetKind.hub, hub_path="fake/x", pixel_scale=255.0)
    with pytest.raises(DataError, match=r"dataset\.image_key"):
        load_server_test_set(dataclasses.replace(cfg, image_key="img"), SEED)
    with pytest.raises(DataError, match=r"dataset\.hub_path"):
        load_server_test_set(dataclasses.replace(cfg, hub_path=None), SEED)


# ---- local files ----------------------------------------------------------------------


def _local_arrays(n: int = 50, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 17, size=(n, 1, 8, 8)).astype(np.float64), rng.integers(0, 10, n)


def local_cfg(path: Path | None = None, **overrides: Any) -> DatasetConfig:
    base = DatasetConfig(
        kind=DatasetKind.local,
        local_path=None if path is None else str(path),
        num_partitions=3,
        test_fraction=0.0,
        pixel_scale=16.0,
    )
    return dataclasses.replace(base, **overrides)


@pytest.mark.parametrize("flat", [False, True])
def test_local_npz_round_trip_from_node_config(tmp_path, flat):
    x, y = _local_arrays()
    path = tmp_path / "site.npz"
    np.savez(path, x=x.reshape(len(x), -1) if flat else x, y=y)
    cfg = local_cfg()
    client = load_client_data(cfg, 0, 1, SEED, node_config={"data-path": str(path)})
    data = joined(client)
    assert len(data) == 50 and len(client.val) == 5  # whole file, not partitioned
    expected = {
        hashlib.sha1((xi / 16).astype(np.float32).tobytes()).hexdigest(): int(yi)
        for xi, yi in zip(x, y, strict=True)
    }
    got = {
        hashlib.sha1(xi.tobytes()).hexdigest(): int(yi)
        for xi, yi in zip(data.x, data.y, strict=True)
    }
    assert got == expected
    assert load_server_test_set(cfg, SEED) is None


def test_local_csv_round_trip(tmp_path):
    x, y = _local_arrays(n=30)
    path = tmp_path / "site.csv"
    header = ["label", *[f"px{i}" for i in range(64)]]
    lines = [",".join(header)]
    lines += [
        ",".join([str(int(yi)), *(str(int(v)) for v in xi.ravel())])
        for xi, yi in zip(x, y, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    cfg = local_cfg(path, local_format=LocalFormat.csv, val_fraction=0.0)
    data = load_client_data(cfg, 0, 1, SEED).train
    assert len(data) == 30 and data.x.shape[1:] == (1, 8, 8)
    order = np.argsort([hashlib.sha1(v.tobytes()).hexdigest() for v in data.x])
    ref = (x / 16).astype(np.float32)
    ref_order = np.argsort([hashlib.sha1(v.tobytes()).hexdigest() for v in ref])
    np.testing.assert_array_equal(data.x[order], ref[ref_order])
    np.testing.assert_array_equal(data.y[order], y[ref_order])


def test_local_shared_file_partitioned_only_in_simulation(tmp_path):
    x, y = _local_arrays(n=60)
    path = tmp_path / "shared.npz"
    np.savez(path, x=x, y=y)
    cfg = local_cfg(path, val_fraction=0.0)
    sim = {"partition-id": 1, "num-partitions": 3}
    assert len(load_client_data(cfg, 1, 3, SEED, node_config=sim).train) == 20
    assert partition_sizes(cfg, SEED) == [20, 20, 20]
    # No simulation keys: the configured file is the site's whole data.
    assert len(load_client_data(cfg, 1, 3, SEED).train) == 60
    # data-path wins and is never partitioned, even with the simulation keys present.
    own = tmp_path / "own.npz"
    np.savez(own, x=x[:7], y=y[:7])
    assert (
        len(load_client_data(cfg, 1, 3, SEED, node_config={**sim, "data-path": str(own)}).train)
        == 7
    )


def test_local_natural_ids_from_npz(tmp_path):
    x, y = _local_arrays(n=40)
    hospital = np.array([f"h{i % 4}" for i in range(40)])
    path = tmp_path / "pooled.npz"
    np.savez(path, x=x, y=y, hospital=hospital)
    cfg = local_cfg(
        path, partitioner=PartitionerName.natural, natural_id_key="hospital", val_fraction=0.0
    )
    sim = {"partition-id": 0, "num-partitions": 4}
    for pid in range(4):
        got = row_hashes(load_client_data(cfg, pid, 4, SEED, node_config=sim).train)
        mask = hospital == f"h{pid}"
        want = row_hashes(
            ArrayDataset(x=(x[mask] / 16).astype(np.float32), y=y[mask].astype(np.int64))
        )
        assert sorted(got) == sorted(want)


def test_local_missing_path_names_both_sources():
    with pytest.raises(DataError) as err:
        load_client_data(local_cfg(), 0, 1, SEED, node_config={})
    assert "data-path" in str(err.value) and "dataset.local_path" in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        load_client_data(local_cfg(), 0, 1, SEED, node_config={"data-path": "/nonexistent/x.npz"})


def test_local_file_errors_name_file_and_problem(tmp_path):
    x, y = _local_arrays(n=10)
    cases: dict[str, tuple[dict[str, np.ndarray], str]] = {
        "shape.npz": ({"x": x.reshape(10, 1, 4, 16), "y": y}, r"dataset\.input_shape"),
        "labels.npz": ({"x": x, "y": y + 10}, r"dataset\.num_classes"),
        "negative.npz": ({"x": x, "y": y - 20}, r"dataset\.num_classes"),
        "nolabels.npz": ({"x": x}, r"'y'"),
        "count.npz": ({"x": x, "y": y[:5]}, "one per example"),
        "nan.npz": ({"x": np.full_like(x, np.nan), "y": y}, "NaN"),
    }
    for name, (arrays, pattern) in cases.items():
        path = tmp_path / name
        np.savez(path, **arrays)
        with pytest.raises(DataError, match=pattern) as err:
            load_client_data(local_cfg(path), 0, 1, SEED)
        assert name in str(err.value)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(DataError, match=r"corrupt\.npz"):
        load_client_data(local_cfg(corrupt), 0, 1, SEED)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"hello, not numpy")
    with pytest.raises(DataError, match=r"garbage\.npz' is not an \.npz \(zip\) archive"):
        load_client_data(local_cfg(garbage), 0, 1, SEED)
    single = tmp_path / "single.npz"
    with single.open("wb") as handle:
        np.save(handle, x)
    with pytest.raises(DataError, match=r"single\.npz' is a single \.npy array"):
        load_client_data(local_cfg(single), 0, 1, SEED)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([object()] * 10, dtype=object), y=y)
    with pytest.raises(DataError, match=r"pickled\.npz"):
        load_client_data(local_cfg(pickled), 0, 1, SEED)


def test_local_csv_errors(tmp_path):
    no_label = tmp_path / "nolabel.csv"
    no_label.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"dataset\.label_key") as err:
        load_client_data(local_cfg(no_label, local_format=LocalFormat.csv), 0, 1, SEED)
    assert "nolabel.csv" in str(err.value)
    text = tmp_path / "text.csv"
    text.write_text("label," + ",".join(f"p{i}" for i in range(64)) + "\n1," + ",".join(["x"] * 64))
    with pytest.raises(DataError, match="non-numeric"):
        load_client_data(local_cfg(text, local_format=LocalFormat.csv), 0, 1, SEED)
    half = tmp_path / "half.csv"
    half.write_text("label,p0\n1.5,3\n")
    with pytest.raises(DataError, match="integer class ids"):
        load_client_data(
            local_cfg(half, local_format=LocalFormat.csv, input_shape=[1, 1, 1]), 0, 1, SEED
        )


# ---- containers -----------------------------------------------------------------------


def test_check_data_shape_errors():
    cfg = DatasetConfig()
    good = ArrayDataset(x=np.zeros((3, 1, 8, 8), np.float32), y=np.array([0, 5, 9]))
    check_data_shape(good, cfg)
    with pytest.raises(DataError, match=r"dataset\.input_shape"):
        check_data_shape(ArrayDataset(x=np.zeros((3, 3, 8, 8), np.float32), y=good.y), cfg)
    with pytest.raises(DataError, match=r"dataset\.num_classes"):
        check_data_shape(ArrayDataset(x=good.x, y=np.array([0, 5, 10])), cfg)
    with pytest.raises(DataError, match=r"dataset\.num_classes"):
        check_data_shape(ArrayDataset(x=good.x, y=np.array([0, -1, 1])), cfg)
    check_data_shape(
        ArrayDataset(x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64)), cfg
    )


def test_array_dataset_validates_dtypes():
    with pytest.raises(DataError, match="float32"):
        ArrayDataset(x=np.zeros((2, 1, 8, 8)), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="int64"):
        ArrayDataset(x=np.zeros((2, 1, 8, 8), np.float32), y=np.zeros(2, np.int32))
    with pytest.raises(DataError, match="2 images but 3 labels"):
        ArrayDataset(x=np.zeros((2, 1, 8, 8), np.float32), y=np.zeros(3, np.int64))


def test_digits_input_shape_mismatch_is_reported():
    with pytest.raises(DataError, match=r"dataset\.input_shape"):
        load_server_test_set(digits_cfg(input_shape=[1, 28, 28]), SEED)


# ---- input range, per-site files, checks before round 1 ------------------------------


def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data.reshape(-1, 1, 8, 8), bunch.target


def test_local_yaml_refuses_raw_digits_and_names_the_scale(tmp_path):
    """configs/dataset/local.yaml (pixel_scale 1) once trained raw 0..16 digits to 0.08
    accuracy without a word; the file is now refused with the scale that fits."""
    from fl_app.config.compose import compose_config

    x, y = _digits_raw()
    path = tmp_path / "raw.npz"
    np.savez(path, x=x[:200], y=y[:200])
    shipped = compose_config("config", ["dataset=local", "server_eval=false"]).dataset
    assert shipped.pixel_scale == 1.0 and list(shipped.input_range) == [0.0, 1.0]
    cfg = dataclasses.replace(shipped, local_path=str(path))
    with pytest.raises(DataError) as err:
        load_client_data(cfg, 0, 1, SEED)
    message = str(err.value)
    assert "raw.npz" in message and "dataset.pixel_scale=16" in message
    assert "above dataset.input_range" in message
    # The boundary is inclusive: 16 / 16 = 1.0 is in range.
    data = joined(load_client_data(dataclasses.replace(cfg, pixel_scale=16.0), 0, 1, SEED))
    assert len(data) == 200 and float(data.x.max()) == 1.0 and float(data.x.min()) == 0.0


def test_input_range_hints_8bit_and_negative_values(tmp_path):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 10, 20)
    bytes_ = tmp_path / "bytes.npz"
    np.savez(bytes_, x=np.full((20, 1, 8, 8), 200.0), y=y)
    with pytest.raises(DataError, match=r"dataset\.pixel_scale=255"):
        load_client_data(local_cfg(bytes_), 0, 1, SEED)
    signed = tmp_path / "signed.npz"
    np.savez(signed, x=np.full((20, 1, 8, 8), -0.5), y=y)
    with pytest.raises(DataError, match=r"below dataset\.input_range") as err:
        load_client_data(local_cfg(signed, pixel_scale=1.0), 0, 1, SEED)
    assert "-0.5" not in str(err.value)  # the data's own extremes never leave the site
    # A widened range accepts standardised features.
    ok = load_client_data(local_cfg(signed, pixel_scale=1.0, input_range=[-1.0, 1.0]), 0, 1, SEED)
    assert float(joined(ok).x.min()) == -0.5


def _site_files(tmp_path: Path, sizes: tuple[int, ...] = (30, 40, 50)) -> list[Path]:
    x, y = _digits_raw()
    paths, start = [], 0
    for k, n in enumerate(sizes):
        path = tmp_path / f"site-{k}.npz"
        np.savez(path, x=x[start : start + n], y=y[start : start + n])
        paths.append(path)
        start += n
    return paths


@pytest.mark.parametrize("form", ["list", "directory"])
def test_per_site_files_one_client_each_read_whole(tmp_path, form):
    paths = _site_files(tmp_path)
    x, y = _digits_raw()
    if form == "list":
        cfg = local_cfg(None, site_files=[str(p) for p in paths], val_fraction=0.0)
    else:
        cfg = local_cfg(tmp_path, val_fraction=0.0)  # local_path names the folder
    assert partition_sizes(cfg, SEED) == [30, 40, 50]
    starts = [0, 30, 70]
    for k, n in enumerate((30, 40, 50)):
        node = {"partition-id": k, "num-partitions": 3}
        got = load_client_data(cfg, k, 3, SEED, node_config=node).train
        expected = ArrayDataset(
            x=(x[starts[k] : starts[k] + n] / 16).astype(np.float32),
            y=y[starts[k] : starts[k] + n].astype(np.int64),
        )
        assert sorted(row_hashes(got)) == sorted(row_hashes(expected))


def test_check_local_data_lists_every_bad_site_file(tmp_path):
    from fl_app.data import check_local_data

    paths = _site_files(tmp_path, sizes=(30, 30, 30, 30, 30))
    x, y = _digits_raw()
    np.savez(paths[1], x=x[:30], y=y[:30] + 10)  # labels out of range
    paths[3].write_bytes(b"not a zip")
    paths[4].unlink()
    cfg = local_cfg(None, site_files=[str(p) for p in paths], num_partitions=5)
    with pytest.raises(DataError) as err:
        check_local_data(cfg, SEED)
    lines = str(err.value).splitlines()
    assert "before round 1 (3 of 5 site files)" in lines[0]
    assert lines[1].startswith("  client 1:") and "site-1.npz" in lines[1]
    assert "dataset.num_classes" in lines[1]
    assert lines[2].startswith("  client 3:") and "is not an .npz (zip) archive" in lines[2]
    assert lines[3].startswith("  client 4:") and "does not exist" in lines[3]
    good = check_local_data(
        local_cfg(
            None,
            site_files=[str(p) for p in paths[:1]] + [str(paths[2])],
            num_partitions=2,
            val_fraction=0.0,
        ),
        SEED,
    )
    assert [(s.site, s.train) for s in good] == [(str(paths[0]), 30), (str(paths[2]), 30)]
    # A directory with a different number of files than clients is refused up front.
    with pytest.raises(DataError, match=r"set dataset\.num_partitions=4"):
        check_local_data(local_cfg(tmp_path), SEED)


def test_check_local_data_shared_file_and_other_kinds(tmp_path):
    from fl_app.data import check_local_data

    bad = tmp_path / "bad.csv"
    bad.write_text("label,p0\n1,2,3\n")
    with pytest.raises(DataError, match=r"\(the data file\):\n  client 0: .*bad\.csv' line 2"):
        check_local_data(local_cfg(bad, local_format=LocalFormat.csv, input_shape=[1, 1, 1]), SEED)
    assert check_local_data(digits_cfg(), SEED) == []


def test_check_site_data_for_a_supernode(tmp_path):
    from fl_app.data import check_site_data

    path = _site_files(tmp_path, sizes=(40,))[0]
    cfg = local_cfg(None, pixel_scale=16.0, val_fraction=0.25)
    site = check_site_data({"data-path": str(path)}, cfg)
    assert (site.site, site.train, site.val) == (str(path), 30, 10)
    assert site.line().endswith("ok (30 training, 10 validation examples)")
    with pytest.raises(DataError, match=r'"data-format=csv".*dataset\.local_format=npz'):
        check_site_data({"data-path": str(path), "data-format": "csv"}, cfg)
    with pytest.raises(DataError, match="does not exist"):
        check_site_data({"data-path": str(tmp_path / "gone.npz")}, cfg)
    # Without the experiment's config the shipped dataset=local defaults apply
    # (fl_app.deploy.site_check composes them), whose pixel_scale of 1 refuses raw 0..16 digits.
    from fl_app.data import SiteData
    from fl_app.deploy.site_check import site_dataset_defaults

    def check(node: dict[str, object]) -> SiteData:
        return check_site_data(node, site_dataset_defaults(node))

    with pytest.raises(DataError, match=r"dataset\.pixel_scale=16"):
        check({"data-path": str(path), "data-format": "npz"})
    with pytest.raises(DataError, match=r'"data-format" is \'xml\'; use one of'):
        check({"data-path": str(path), "data-format": "xml"})
    # A node without a file serves a partition of the default (built-in) dataset.
    digits = check({"partition-id": 2, "num-partitions": 3})
    assert digits.site == "digits partition 2 of 3" and digits.train > 0
    with pytest.raises(DataError, match="partition-id"):
        check({"partition-id": 3, "num-partitions": 3})


def test_simulation_rehearses_a_consortium_one_client_per_site_file(tmp_path, monkeypatch):
    """In-process simulation with dataset.site_files: client k loads exactly site k's file."""
    import fl_app.data as data_pkg
    from fl_app.config.compose import compose_config
    from fl_app.runtime.simulation import run_simulation_experiment

    paths = _site_files(tmp_path, sizes=(60, 80, 100))
    seen: dict[int, int] = {}
    real = data_pkg.load_client_data

    def recording(cfg, partition_id, num_partitions, seed, node_config=None):
        part = real(cfg, partition_id, num_partitions, seed, node_config)
        seen[int(partition_id)] = len(part.train) + len(part.val)
        return part

    monkeypatch.setattr(data_pkg, "load_client_data", recording)
    cfg = compose_config(
        "config",
        [
            "dataset=local",
            "server_eval=false",
            "runtime=inprocess",
            "num_rounds=1",
            "dataset.pixel_scale=16",
            f"dataset.site_files=[{','.join(str(p) for p in paths)}]",
        ],
    )
    summary = run_simulation_experiment(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["clients"] == 3
    assert seen == {0: 60, 1: 80, 2: 100}


def test_simulate_with_a_bad_local_file_fails_before_round_1(tmp_path, capsys):
    """``fl-app simulate`` (its main, in this process: the check ends it before Hydra
    or Ray start) exits 2 naming the file, and leaves no run directory."""
    from fl_app.cli import main

    bad = tmp_path / "site.npz"
    bad.write_bytes(b"not a zip")
    run_dir = tmp_path / "run"
    args = [
        "simulate",
        "dataset=local",
        f"dataset.local_path={bad}",
        "server_eval=false",
        "runtime=inprocess",
        f"hydra.run.dir={run_dir}",
    ]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "local data check failed before round 1" in err
    assert "site.npz' is not an .npz (zip) archive" in err
    assert not run_dir.exists()  # checked before Hydra makes the run directory


@pytest.mark.parametrize(
    ("name", "write", "pattern"),
    [
        (
            "shape.npz",
            lambda p: np.savez(p, x=np.zeros((5, 1, 4, 4)), y=np.zeros(5, int)),
            "input_shape",
        ),
        (
            "nan.npz",
            lambda p: np.savez(p, x=np.full((5, 1, 8, 8), np.nan), y=np.zeros(5, int)),
            "NaN",
        ),
        (
            "labels.npz",
            lambda p: np.savez(p, x=np.zeros((5, 1, 8, 8)), y=np.full(5, 10)),
            "num_classes",
        ),
        ("notzip.npz", lambda p: p.write_bytes(b"plain text"), r"not an \.npz \(zip\)"),
        ("missing.npz", lambda p: None, "does not exist"),
        (
            "scale.npz",
            lambda p: np.savez(p, x=np.full((5, 1, 8, 8), 200.0), y=np.zeros(5, int)),
            "pixel_scale=255",
        ),
    ],
)
def test_every_kind_of_bad_site_file_fails_the_pre_round_check(tmp_path, name, write, pattern):
    """Each malformed file (the kinds that once ran to a "completed" random model) fails
    check_local_data, which simulation runs before round 1, naming the file."""
    from fl_app.data import check_local_data

    good = _site_files(tmp_path, sizes=(30,))[0]
    bad = tmp_path / name
    write(bad)
    cfg = local_cfg(None, site_files=[str(good), str(bad)], num_partitions=2, pixel_scale=16.0)
    with pytest.raises(DataError, match=pattern) as err:
        check_local_data(cfg, SEED)
    message = str(err.value)
    assert "(1 of 2 site files)" in message and f"client 1: data file '{bad}" in message


def test_bad_csv_site_file_fails_the_pre_round_check(tmp_path):
    from fl_app.data import check_local_data

    good, bad = tmp_path / "a.csv", tmp_path / "b.csv"
    good.write_text("label,p0\n1,0.5\n2,0.25\n")
    bad.write_text("label,p0\n1,0.5,7\n")
    cfg = local_cfg(
        None,
        site_files=[str(good), str(bad)],
        num_partitions=2,
        input_shape=[1, 1, 1],
        local_format=LocalFormat.csv,
        pixel_scale=1.0,
        val_fraction=0.0,
    )
    with pytest.raises(DataError, match=r"client 1: data file '.*b\.csv' line 2 has 3 fields"):
        check_local_data(cfg, SEED)

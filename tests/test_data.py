"""Datasets that need no files (digits, synthetic): the loading contract and the splits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.config import Norm, ThreatModel
from bench.data.base import Dataset, DatasetSpec, Split, get_dataset, indices_hash
from bench.errors import BenchError
from bench.registry import DATASETS

FILELESS = ["digits", "synthetic"]
SIZES = {"digits": {"train": 1347, "test": 450}, "synthetic": {"train": 256, "test": 64}}


@pytest.fixture(autouse=True)
def _no_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BENCH_DATA", raising=False)


def test_fileless_datasets_are_registered() -> None:
    assert set(FILELESS) <= set(DATASETS.names())


@pytest.mark.parametrize("name", FILELESS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_load_contract(name: str, split: str) -> None:
    ds = get_dataset(name)
    assert isinstance(ds, Dataset)
    data = ds.load(split)
    spec = ds.spec
    assert isinstance(data, Split)
    assert data.dataset == name and data.name == split
    assert len(data) == SIZES[name][split]
    assert data.images.dtype == torch.float32
    assert tuple(data.images.shape) == (len(data), *spec.shape())
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    assert float(data.images.max()) > float(data.images.min())  # not a constant image set
    assert data.labels.dtype == torch.int64
    assert data.labels.shape == (len(data),)
    assert int(data.labels.min()) >= 0 and int(data.labels.max()) < spec.num_classes
    assert set(data.labels.tolist()) == set(range(spec.num_classes))  # every class present
    assert torch.equal(data.indices, torch.arange(len(data)))


@pytest.mark.parametrize("name", FILELESS)
def test_load_is_deterministic(name: str) -> None:
    a, b = get_dataset(name).load("test"), get_dataset(name).load("test")
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    assert a.meta == b.meta


@pytest.mark.parametrize("name", FILELESS)
def test_train_and_test_differ(name: str) -> None:
    ds = get_dataset(name)
    train, test = ds.load("train"), ds.load("test")
    flat_train = {tuple(row) for row in train.images.flatten(1).tolist()}
    assert not any(tuple(row) in flat_train for row in test.images.flatten(1).tolist())


def test_digits_split_is_a_stratified_partition() -> None:
    ds = get_dataset("digits")
    train, test = ds.load("train"), ds.load("test")
    assert len(train) == 1347 and len(test) == 450
    train_pos, test_pos = train.meta["source_positions"], test.meta["source_positions"]
    assert len(set(train_pos)) == 1347 and len(set(test_pos)) == 450
    assert set(train_pos).isdisjoint(test_pos)
    assert set(train_pos) | set(test_pos) == set(range(1797))
    assert train_pos == sorted(train_pos) and test_pos == sorted(test_pos)
    # stratified: each class's share of the test split matches the full data within one example
    for c in range(10):
        n_test = int((test.labels == c).sum())
        n_all = n_test + int((train.labels == c).sum())
        assert abs(n_test - 0.25 * n_all) <= 1, (c, n_test, n_all)


def test_digits_images_match_scikit_learn() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    test = get_dataset("digits").load("test")
    pos = test.meta["source_positions"]
    expected = torch.from_numpy(raw.images[pos]).float().div(16).unsqueeze(1)
    assert torch.allclose(test.images, expected)
    assert test.labels.tolist() == raw.target[pos].tolist()


@pytest.mark.parametrize("name", FILELESS)
def test_image_size_override_resizes(name: str) -> None:
    ds = get_dataset(name)
    data = ds.load("test", image_size=16)
    assert tuple(data.images.shape) == (SIZES[name]["test"], *ds.spec.shape(16)) == (SIZES[name]["test"], 1, 16, 16)
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    native = ds.load("test")
    assert torch.equal(data.labels, native.labels)
    # a resized image still looks like its source: downsampling back lands close to it
    back = torch.nn.functional.avg_pool2d(data.images, 2)
    assert float((back - native.images).abs().mean()) < 0.1


@pytest.mark.parametrize("name", FILELESS)
@pytest.mark.parametrize("split", ["val", "validation", "TRAIN", ""])
def test_unknown_split_raises(name: str, split: str) -> None:
    with pytest.raises(BenchError, match="split"):
        get_dataset(name).load(split)


@pytest.mark.parametrize("name", FILELESS)
def test_spec_fields(name: str) -> None:
    spec = DATASETS.get(name).spec
    assert isinstance(spec, DatasetSpec)
    assert spec.name == name
    assert spec.task == "multiclass"
    assert spec.input_shape == (1, 8, 8) and spec.image_size == 8 and spec.channels == 1
    assert spec.shape() == (1, 8, 8) and spec.shape(32) == (1, 32, 32)
    assert spec.threat_models == (ThreatModel(Norm.LINF, 0.1), ThreatModel(Norm.L2, 0.5))
    assert spec.radii == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert spec.splits == ("train", "test")
    assert len(spec.mean) == len(spec.std) == 1
    d = spec.to_dict()
    assert d["threat_models"] == [{"norm": "Linf", "eps": 0.1}, {"norm": "L2", "eps": 0.5}]
    assert d["classes"] == list(spec.classes)


def test_digits_spec_classes_and_normalization_stats() -> None:
    spec = DATASETS.get("digits").spec
    assert spec.classes == tuple(str(i) for i in range(10)) and spec.num_classes == 10
    train = get_dataset("digits").load("train")
    # the in-model normalization uses the training split's statistics
    assert float(train.images.mean()) == pytest.approx(spec.mean[0], abs=1e-3)
    assert float(train.images.std()) == pytest.approx(spec.std[0], abs=1e-3)


def test_synthetic_spec_has_four_classes() -> None:
    assert DATASETS.get("synthetic").spec.num_classes == 4


def test_split_subset_keeps_positions() -> None:
    data = get_dataset("synthetic").load("test")
    positions = torch.tensor([5, 1, 60])
    sub = data.subset(positions)
    assert len(sub) == 3
    assert torch.equal(sub.indices, positions)
    assert torch.equal(sub.images, data.images[positions])
    assert torch.equal(sub.labels, data.labels[positions])
    assert torch.equal(sub.subset(torch.tensor([2])).indices, torch.tensor([60]))


def test_split_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        Split("x", "test", torch.zeros(3, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        Split("x", "test", torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.long))


def test_indices_hash_identifies_the_subset() -> None:
    assert indices_hash([1, 2, 3]) == indices_hash(torch.tensor([1, 2, 3]))
    assert indices_hash([1, 2, 3]) != indices_hash([3, 2, 1])
    assert len(indices_hash([0])) == 64


# -- the range check of Dataset.load ---------------------------------------------------------
def fake_dataset(images: torch.Tensor) -> Dataset:
    class Fake(Dataset):
        spec = DatasetSpec(name="fake", task="multiclass", classes=("a", "b"), input_shape=(1, 8, 8), image_size=8,
                           mean=(0.5,), std=(0.25,), threat_models=(ThreatModel(Norm.LINF, 0.1),), radii=(0.0,))

        def _load(self, split, root, image_size, **kwargs):
            return Split("fake", split, images, torch.zeros(len(images), dtype=torch.long))

    return Fake()


@pytest.mark.parametrize("value", [1.5, -0.1])
def test_load_rejects_pixels_outside_unit_range(value: float) -> None:
    images = torch.rand(3, 1, 8, 8)
    images[1, 0, 2, 2] = value
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fake_dataset(images).load("test")


def test_load_rejects_nan_pixels() -> None:
    images = torch.rand(3, 1, 8, 8)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        fake_dataset(images).load("test")

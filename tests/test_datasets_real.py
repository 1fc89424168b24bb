"""The file-based dataset loaders on real public data (../shared/data, see its SOURCES.md),
arranged with symlinks into the official layouts: HAM10000 + ISIC 2018 test, NIH ChestX-ray14
(binary and multilabel, with and without the official split lists), CIFAR-10 image folders and
MedMNIST PneumoniaMNIST; the decode cache; and an end-to-end run on HAM10000 and ChestX-ray14.

Expected numbers are computed independently from the metadata files (csv module), not from
bench's own code."""

from __future__ import annotations

import csv
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    pytest.skip(f"real data not available at {DATA}", allow_module_level=True)

from bench.data.base import get_dataset  # noqa: E402
from bench.errors import BenchError  # noqa: E402
from bench.paths import bench_home  # noqa: E402

HAM_META = DATA / "SivaAdithya+Machine-Learning" / "HAM10000_metadata.csv"
HAM_IMAGES = DATA / "congtran19+XLA" / "images_resized"
ISIC_GT = DATA / "yash2mehta+CDS_Streamlit" / "ISIC2018_Task3_Test_GroundTruth.csv"
NIH_CSV = DATA / "qqto2008+capstone" / "Data_Entry_2017_first40000rows.csv"
NIH_IMAGES = DATA / "dinbe0527+kcr2019d1" / "NIH1000"
CIFAR_TEST = DATA / "YoongiKim+CIFAR-10-images" / "test"
PNEUMONIA_FULL = DATA / "varun19424+pneumonia_mnist" / "pneumoniamnist.npz"
PNEUMONIA_BALANCED = DATA / "aksufatih+snn-medmnist" / "pneumoniamnist.npz"

HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HAM_SPLITS = ("train", "val", "test")
FIRST_ISIC_TEST = 34524  # ISIC_0034524 .. ISIC_0036064 are the ISIC 2018 Task 3 test images
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NIH_SPLITS = ("train", "val", "test")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"real data files missing: {', '.join(missing)}")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(target)


def pixels_u8(t: torch.Tensor) -> torch.Tensor:
    return (t * 255).round().to(torch.uint8)


# ==================================================================================================
# HAM10000 and the ISIC 2018 test set
# ==================================================================================================
def isic_number(path_or_id: str | Path) -> int:
    return int(Path(path_or_id).stem.split("_")[1])


def arrange_ham(root: Path, only: set[str] | None = None) -> Path:
    """The official layout: metadata CSV, HAM10000_images_part_1/, ISIC 2018 test GT and images
    (with ``only``: just those images)."""
    link(HAM_META, root / "HAM10000_metadata.csv")
    link(ISIC_GT, root / "ISIC2018_Task3_Test_GroundTruth.csv")
    (root / "HAM10000_images_part_1").mkdir(parents=True)
    (root / "ISIC2018_Task3_Test_Images").mkdir()
    for f in sorted(HAM_IMAGES.glob("ISIC_*.jpg")):
        if only is not None and f.stem not in only:
            continue
        folder = "HAM10000_images_part_1" if isic_number(f) < FIRST_ISIC_TEST else "ISIC2018_Task3_Test_Images"
        (root / folder / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def ham_meta() -> dict[str, dict[str, str]]:
    need(HAM_META)
    return {r["image_id"]: r for r in read_rows(HAM_META)}


@pytest.fixture(scope="module")
def ham_present() -> set[str]:
    need(HAM_IMAGES)
    return {f.stem for f in HAM_IMAGES.glob("ISIC_*.jpg") if isic_number(f) < FIRST_ISIC_TEST}


@pytest.fixture(scope="module")
def ham_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(HAM_META, HAM_IMAGES, ISIC_GT)
    return arrange_ham(tmp_path_factory.mktemp("ham10000"))


def cache_entries(prefix: str) -> set[Path]:
    folder = bench_home() / "data-cache"
    return set(folder.glob(f"{prefix}-*.pt")) if folder.is_dir() else set()


@pytest.fixture(scope="module")
def ham_data(ham_root: Path) -> dict:
    """Every split, loaded once (the first load decodes; timed to compare with a cached load)."""
    ds = get_dataset("ham10000")
    before = cache_entries("ham10000-train-64")
    started = time.perf_counter()
    train = ds.load("train", ham_root)
    cold = time.perf_counter() - started
    out = {"train": train, "cold_seconds": cold, "cache_before": before,
           "cache_after": cache_entries("ham10000-train-64")}
    for split in ("val", "test", "isic2018-test"):
        out[split] = ds.load(split, ham_root)
    return out


def test_ham_split_sizes_and_missing_files(ham_data, ham_present) -> None:
    assert len(ham_present) == 5984
    sizes = {s: len(ham_data[s]) for s in HAM_SPLITS}
    assert sum(sizes.values()) == 5984, sizes
    assert sum(ham_data[s].meta["missing_files"] for s in HAM_SPLITS) == 10015 - 5984 == 4031
    assert sum(ham_data[s].meta["expected_files"] for s in HAM_SPLITS) == 10015
    # 70/15/15 of the metadata rows (grouped by lesion, so only roughly)
    expected = {s: ham_data[s].meta["expected_files"] for s in HAM_SPLITS}
    for split, fraction in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        assert abs(expected[split] / 10015 - fraction) < 0.01, expected
    ids = [i for s in HAM_SPLITS for i in ham_data[s].meta["image_ids"]]
    assert len(ids) == len(set(ids)) and set(ids) == ham_present


def test_ham_split_is_stratified_by_dx(ham_meta) -> None:
    """On all 10,015 metadata rows, each diagnosis is split about 70/15/15."""
    import pandas as pd

    from bench.data.ham10000 import split_assignment

    table = pd.read_csv(HAM_META).sort_values("image_id", kind="stable").reset_index(drop=True)
    assignment = split_assignment(table)
    for dx in HAM_CLASSES:
        rows = assignment[(table["dx"] == dx).to_numpy()]
        for split, fraction in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
            assert abs(float(np.mean(rows == split)) - fraction) < 0.01, (dx, split)
    by_lesion = pd.Series(assignment).groupby(table["lesion_id"]).nunique()
    assert int(by_lesion.max()) == 1


def test_ham_no_lesion_in_two_splits(ham_data, ham_meta) -> None:
    lesions = {s: {ham_meta[i]["lesion_id"] for i in ham_data[s].meta["image_ids"]} for s in HAM_SPLITS}
    assert lesions["train"].isdisjoint(lesions["val"])
    assert lesions["train"].isdisjoint(lesions["test"])
    assert lesions["val"].isdisjoint(lesions["test"])


def test_ham_class_counts_match_the_metadata(ham_data, ham_meta, ham_present) -> None:
    total = Counter()
    for split in HAM_SPLITS:
        data = ham_data[split]
        ids = data.meta["image_ids"]
        assert set(ids) <= ham_present
        expected = Counter(HAM_CLASSES.index(ham_meta[i]["dx"]) for i in ids)
        assert Counter(data.labels.tolist()) == expected
        assert data.labels.tolist() == [HAM_CLASSES.index(ham_meta[i]["dx"]) for i in ids]
        assert data.indices.tolist() == [isic_number(i) for i in ids]
        total += expected
    # SOURCES.md: nv 4323, bkl 583, mel 491, bcc 264, akiec 183, vasc 80, df 60 among the 5,984 files
    assert {HAM_CLASSES[k]: n for k, n in total.items()} == {"nv": 4323, "bkl": 583, "mel": 491, "bcc": 264,
                                                             "akiec": 183, "vasc": 80, "df": 60}
    assert set(ham_data["train"].labels.tolist()) == set(range(7))  # every class in train
    for split in ("val", "test"):
        assert set(ham_data[split].labels.tolist()) == set(range(7)), split


def test_ham_images(ham_data, ham_root) -> None:
    for split in (*HAM_SPLITS, "isic2018-test"):
        images = ham_data[split].images
        assert images.dtype == torch.float32 and tuple(images.shape) == (len(ham_data[split]), 3, 64, 64)
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    val = ham_data["val"]
    for k in (0, len(val) // 2, len(val) - 1):
        path = ham_root / "HAM10000_images_part_1" / f"{val.meta['image_ids'][k]}.jpg"
        with Image.open(path) as img:
            assert img.size == (128, 128)
            expected = np.asarray(img.convert("RGB").resize((64, 64), Image.BILINEAR)).transpose(2, 0, 1)
        assert torch.equal(pixels_u8(val.images[k]), torch.from_numpy(expected.copy()))


def test_ham_normalization_stats_fit_the_train_split(ham_data) -> None:
    """The spec's per-channel mean/std (in-model normalisation) describe these images."""
    spec = get_dataset("ham10000").spec
    images = ham_data["train"].images
    assert images.mean(dim=(0, 2, 3)).tolist() == pytest.approx(spec.mean, abs=0.03)
    assert images.std(dim=(0, 2, 3)).tolist() == pytest.approx(spec.std, abs=0.03)


def test_isic2018_test_set(ham_data) -> None:
    data = ham_data["isic2018-test"]
    assert len(data) == 1512 and data.meta["missing_files"] == 0 and data.meta["expected_files"] == 1512
    counts = {HAM_CLASSES[k]: n for k, n in Counter(data.labels.tolist()).items()}
    assert counts == {"nv": 909, "bkl": 217, "mel": 171, "bcc": 93, "df": 44, "akiec": 43, "vasc": 35}
    gt = {r["image"]: r for r in read_rows(ISIC_GT)}
    for image_id, label in zip(data.meta["image_ids"], data.labels.tolist()):
        assert float(gt[image_id][HAM_CLASSES[label].upper()]) == 1.0
    assert min(isic_number(i) for i in data.meta["image_ids"]) == FIRST_ISIC_TEST
    lesion_ids = {i for s in HAM_SPLITS for i in ham_data[s].meta["image_ids"]}
    assert lesion_ids.isdisjoint(data.meta["image_ids"])


def test_ham_decode_cache(ham_data, ham_root, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.data.images as images_module

    assert not ham_data["cache_before"], "the first load must have decoded"
    (entry,) = ham_data["cache_after"]
    assert entry.parent == Path(os.environ["BENCH_HOME"]) / "data-cache" and entry.stat().st_size > 0

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached split was decoded again")

    monkeypatch.setattr(images_module, "decode_images", no_decoding)
    started = time.perf_counter()
    again = get_dataset("ham10000").load("train", ham_root)
    warm = time.perf_counter() - started
    first = ham_data["train"]
    assert torch.equal(again.images, first.images)
    assert torch.equal(again.labels, first.labels) and torch.equal(again.indices, first.indices)
    assert again.meta == first.meta
    assert warm < 0.5 * ham_data["cold_seconds"], (warm, ham_data["cold_seconds"])
    assert cache_entries("ham10000-train-64") == ham_data["cache_after"]


def test_ham_cache_key_follows_the_files(ham_data, tmp_path: Path) -> None:
    """A copy of the layout without one val image (the copy holds only the val images, which is
    all the val split reads): a new cache entry, one image fewer, one more missing file, and the
    other images unchanged."""
    val = ham_data["val"]
    victim = val.meta["image_ids"][len(val) // 3]
    root = arrange_ham(tmp_path / "ham-copy", only=set(val.meta["image_ids"]) - {victim})
    before = cache_entries("ham10000-val-64")
    smaller = get_dataset("ham10000").load("val", root)
    assert len(cache_entries("ham10000-val-64") - before) == 1
    assert len(smaller) == len(val) - 1
    assert smaller.meta["missing_files"] == val.meta["missing_files"] + 1
    keep = torch.tensor([i != victim for i in val.meta["image_ids"]])
    assert smaller.meta["image_ids"] == [i for i in val.meta["image_ids"] if i != victim]
    assert torch.equal(smaller.images, val.images[keep]) and torch.equal(smaller.labels, val.labels[keep])


# ==================================================================================================
# NIH ChestX-ray14
# ==================================================================================================
@pytest.fixture(scope="module")
def nih_meta() -> dict[str, dict[str, str]]:
    need(NIH_CSV)
    return {r["Image Index"]: r for r in read_rows(NIH_CSV)}


@pytest.fixture(scope="module")
def nih_files() -> dict[str, Path]:
    need(NIH_IMAGES)
    return {f.name: f for f in NIH_IMAGES.glob("*/*/*.png")}


def arrange_nih(root: Path, files: dict[str, Path]) -> Path:
    link(NIH_CSV, root / "Data_Entry_2017.csv")
    for name, f in files.items():
        link(f, root / "images" / name)
    return root


def copy_nih(root: Path, original: Path) -> Path:
    """Another root sharing the original's files (its images/ is a symlink to the original's)."""
    link(NIH_CSV, root / "Data_Entry_2017.csv")
    (root / "images").symlink_to(original / "images", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def nih_root(tmp_path_factory: pytest.TempPathFactory, nih_files) -> Path:
    need(NIH_CSV)
    return arrange_nih(tmp_path_factory.mktemp("nih"), nih_files)


@pytest.fixture(scope="module")
def nih_data(nih_root: Path) -> dict[str, dict]:
    return {name: {s: get_dataset(name).load(s, nih_root) for s in NIH_SPLITS}
            for name in ("nih-chestxray", "nih-chestxray14")}


@pytest.mark.parametrize("name", ["nih-chestxray", "nih-chestxray14"])
def test_nih_splits(nih_data, nih_files, nih_meta, name: str) -> None:
    assert len(nih_files) == 1000 and len(nih_meta) == 40000
    data = nih_data[name]
    names = [n for s in NIH_SPLITS for n in data[s].meta["image_names"]]
    assert len(names) == len(set(names)) == 1000 and set(names) == set(nih_files)
    assert sum(len(data[s]) for s in NIH_SPLITS) == 1000
    assert sum(data[s].meta["missing_files"] for s in NIH_SPLITS) == 39000
    assert sum(data[s].meta["expected_files"] for s in NIH_SPLITS) == 40000
    patients = {s: {nih_meta[n]["Patient ID"] for n in data[s].meta["image_names"]} for s in NIH_SPLITS}
    assert patients["train"].isdisjoint(patients["val"])
    assert patients["train"].isdisjoint(patients["test"])
    assert patients["val"].isdisjoint(patients["test"])
    for s in NIH_SPLITS:
        d = data[s]
        assert d.images.dtype == torch.float32 and tuple(d.images.shape) == (len(d), 1, 64, 64)
        assert float(d.images.min()) >= 0.0 and float(d.images.max()) <= 1.0
        assert d.meta["official_split"] is False
        findings = [nih_meta[n]["Finding Labels"].split("|") for n in d.meta["image_names"]]
        if name == "nih-chestxray":
            assert d.labels.shape == (len(d),)
            assert d.labels.tolist() == [0 if f == ["No Finding"] else 1 for f in findings]
        else:
            assert d.labels.shape == (len(d), 14)
            assert d.labels.tolist() == [[int(x in f) for x in NIH_FINDINGS] for f in findings]


def test_nih_binary_and_multilabel_agree(nih_data) -> None:
    for s in NIH_SPLITS:
        binary, multi = nih_data["nih-chestxray"][s], nih_data["nih-chestxray14"][s]
        assert binary.meta["image_names"] == multi.meta["image_names"]
        assert torch.equal(binary.images, multi.images)
        assert torch.equal(binary.labels, multi.labels.any(dim=1).long())
    # SOURCES.md: 0_normal is "No Finding" for 499 of its 500 files; 1_abnormal always has a finding
    labels = {n: int(lab) for s in NIH_SPLITS
              for n, lab in zip(nih_data["nih-chestxray"][s].meta["image_names"], nih_data["nih-chestxray"][s].labels)}
    normal = [labels[f.name] for f in NIH_IMAGES.glob("*/0_normal/*.png")]
    abnormal = [labels[f.name] for f in NIH_IMAGES.glob("*/1_abnormal/*.png")]
    assert (len(normal), sum(normal)) == (500, 1)
    assert (len(abnormal), sum(abnormal)) == (500, 500)


def test_nih_normalization_stats_fit_the_images(nih_data) -> None:
    spec = get_dataset("nih-chestxray").spec
    images = nih_data["nih-chestxray"]["train"].images
    assert float(images.mean()) == pytest.approx(spec.mean[0], abs=0.05)
    assert float(images.std()) == pytest.approx(spec.std[0], abs=0.05)


def test_nih_images_are_the_files(nih_data, nih_root) -> None:
    d = nih_data["nih-chestxray"]["val"]
    for k in (0, len(d) - 1):
        with Image.open(nih_root / "images" / d.meta["image_names"][k]) as img:
            assert img.size == (64, 64)
            expected = np.asarray(img.convert("L"))
        assert torch.equal(pixels_u8(d.images[k, 0]), torch.from_numpy(expected.copy()))


def test_nih_official_lists(tmp_path: Path, nih_root: Path, nih_files, nih_meta) -> None:
    root = copy_nih(tmp_path / "nih-lists", nih_root)
    train_val = [n for n, r in nih_meta.items() if int(r["Patient ID"]) <= 200]
    test = [n for n, r in nih_meta.items() if int(r["Patient ID"]) > 200]
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    ds = get_dataset("nih-chestxray14")
    data = {s: ds.load(s, root) for s in NIH_SPLITS}
    assert all(d.meta["official_split"] for d in data.values())
    listed_present = set(test) & set(nih_files)
    assert 0 < len(listed_present) < 1000
    assert sorted(data["test"].meta["image_names"]) == sorted(listed_present)
    assert data["test"].meta["missing_files"] == len(test) - len(listed_present)
    train_patients = {nih_meta[n]["Patient ID"] for n in data["train"].meta["image_names"]}
    val_patients = {nih_meta[n]["Patient ID"] for n in data["val"].meta["image_names"]}
    assert train_patients and val_patients and train_patients.isdisjoint(val_patients)
    assert all(int(p) <= 200 for p in train_patients | val_patients)
    train_val_names = data["train"].meta["image_names"] + data["val"].meta["image_names"]
    assert sorted(train_val_names) == sorted(set(train_val) & set(nih_files))
    assert len(data["train"]) + len(data["val"]) + len(data["test"]) == 1000
    # about 10 % of train_val goes to val (by patient, so roughly)
    assert 0.03 < len(data["val"]) / len(train_val_names) < 0.2
    for d in data.values():
        findings = [nih_meta[n]["Finding Labels"].split("|") for n in d.meta["image_names"]]
        assert d.labels.tolist() == [[int(x in f) for x in NIH_FINDINGS] for f in findings]


# ==================================================================================================
# CIFAR-10 image folders
# ==================================================================================================
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(CIFAR_TEST)
    root = tmp_path_factory.mktemp("cifar10")
    (root / "test").symlink_to(CIFAR_TEST, target_is_directory=True)
    return root


def test_cifar10_test_folders(cifar_root: Path) -> None:
    ds = get_dataset("cifar10")
    d = ds.load("test", cifar_root)
    assert d.meta["layout"] == "image-folders"
    assert len(d) == 10000 and tuple(d.images.shape) == (10000, 3, 32, 32)
    assert d.images.dtype == torch.float32 and float(d.images.min()) >= 0 and float(d.images.max()) <= 1
    assert Counter(d.labels.tolist()) == {k: 1000 for k in range(10)}
    parents = [Path(f).parent.name for f in d.meta["files"]]
    assert d.labels.tolist() == [CIFAR10_CLASSES.index(p) for p in parents]
    assert ds.spec.classes == CIFAR10_CLASSES
    for k in (0, 4321, 9999):
        with Image.open(cifar_root / d.meta["files"][k]) as img:
            expected = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
        assert torch.equal(pixels_u8(d.images[k]), torch.from_numpy(expected.copy()))
    with pytest.raises(BenchError, match="cifar"):
        ds.load("train", cifar_root)  # only test/ is arranged


# ==================================================================================================
# MedMNIST
# ==================================================================================================
@pytest.mark.parametrize("path, sizes, counts", [
    (PNEUMONIA_FULL, {"train": 3882, "val": 524, "test": 624},
     {"train": (388, 3494), "val": (135, 389), "test": (234, 390)}),
    (PNEUMONIA_BALANCED, {"train": 2428, "val": 270, "test": 468},
     {"train": (1214, 1214), "val": (135, 135), "test": (234, 234)}),
], ids=["full", "balanced"])
def test_pneumoniamnist(path: Path, sizes: dict[str, int], counts: dict[str, tuple[int, int]]) -> None:
    need(path)
    ds = get_dataset("medmnist")
    spec = ds.resolve_spec(path)
    assert spec.name == "medmnist-pneumoniamnist"
    assert spec.task == "binary" and spec.classes == ("normal", "pneumonia")
    assert spec.input_shape == (1, 28, 28) and spec.image_size == 28
    raw = np.load(path)
    for split, n in sizes.items():
        d = ds.load(split, path)
        assert len(d) == n and tuple(d.images.shape) == (n, 1, 28, 28)
        assert tuple(Counter(d.labels.tolist())[k] for k in (0, 1)) == counts[split]
        assert torch.equal(pixels_u8(d.images[:, 0]), torch.from_numpy(raw[f"{split}_images"]))


def test_medmnist_directory(tmp_path: Path) -> None:
    need(PNEUMONIA_FULL, PNEUMONIA_BALANCED)
    ds = get_dataset("medmnist")
    one = tmp_path / "one"
    link(PNEUMONIA_BALANCED, one / "pneumoniamnist.npz")
    assert ds.resolve_spec(one).task == "binary"
    assert len(ds.load("val", one)) == 270
    two = tmp_path / "two"
    link(PNEUMONIA_FULL, two / "pneumoniamnist.npz")
    link(PNEUMONIA_BALANCED, two / "pneumoniamnist_balanced.npz")
    with pytest.raises(BenchError, match="exactly one"):
        ds.resolve_spec(two)
    with pytest.raises(BenchError, match="exactly one"):
        ds.load("test", two)


# ==================================================================================================
# End to end: train 1 epoch, evaluate 64 examples with 3-step PGD, summarise
# ==================================================================================================
@pytest.fixture
def one_torch_thread():
    """Train and attack on one intra-op thread: on a small machine shared with other work, torch's
    spinning OpenMP threads can make a training step 10-20x slower; one thread keeps the
    end-to-end tests a few seconds long whatever else runs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def run_end_to_end(dataset: str, data_dir: Path, tmp_path: Path, **overrides) -> dict:
    from bench.config import RunConfig
    from bench.harness.runner import execute
    from bench.results.queries import run_summary
    from bench.results.store import Store

    options = {"epochs": 1, **overrides}
    config = RunConfig(defense="standard", dataset=dataset, data_dir=str(data_dir), n_examples=64, steps=3,
                       device="cpu", **options)
    store = Store(f"sqlite:///{tmp_path / 'e2e.db'}")
    try:
        summary = run_summary(store, execute(config, store))
    finally:
        store.close()
    assert summary["complete"] and summary["status"] == "finished", summary.get("error")
    assert summary["n_examples"] == 64 and summary["dataset"] == dataset and summary["split"] == "test"
    assert summary["imbalanced"] is True
    assert summary["attacks"] and all(a["name"] == "pgd" for a in summary["attacks"])
    assert 0.0 <= summary["robust_accuracy"] <= summary["clean_accuracy"] <= 1.0
    return summary


def test_end_to_end_ham10000(ham_root: Path, tmp_path: Path, one_torch_thread) -> None:
    summary = run_end_to_end("ham10000", ham_root, tmp_path)
    assert summary["task"] == "multiclass"
    assert summary["model"]["source"] == "trained" and summary["model"]["train_summary"]["epochs"] == 1
    assert summary["clean_accuracy"] is not None and summary["balanced_accuracy"] is not None
    recall = summary["per_class_recall"]
    assert recall and set(recall) <= set(HAM_CLASSES) and "nv" in recall
    assert all(0.0 <= v <= 1.0 for v in recall.values())
    for attack in summary["attacks"]:
        assert attack["balanced_accuracy"] is not None
        assert set(attack["per_class_recall"]) == set(recall)


def check_multilabel_summary(summary: dict) -> None:
    assert summary["task"] == "multilabel"
    for where in (summary, *summary["attacks"]):
        assert "per_label_accuracy" in where and "auroc" in where
        assert set(where["per_label_accuracy"]) == set(NIH_FINDINGS)
        assert set(where["auroc"]) == {"macro", "per_label"} and set(where["auroc"]["per_label"]) == set(NIH_FINDINGS)


def test_end_to_end_nih_chestxray14(nih_root: Path, tmp_path: Path, one_torch_thread) -> None:
    check_multilabel_summary(run_end_to_end("nih-chestxray14", nih_root, tmp_path))


def test_end_to_end_nih_chestxray14_from_checkpoint(nih_root: Path, tmp_path: Path, one_torch_thread) -> None:
    """The multilabel evaluation path without training (which is broken, see above): a small CNN
    that predicts "no finding" for every label, attacked with 3-step PGD on 64 test images."""
    from bench.registry import DEFENSES
    from bench.training.checkpoints import save_checkpoint

    spec = get_dataset("nih-chestxray14").spec
    torch.manual_seed(0)
    model = DEFENSES.get("standard")().build(spec, 64, arch="cnn-small")
    with torch.no_grad():
        model.net.classifier[-1].weight.mul_(0.01)
        model.net.classifier[-1].bias.fill_(-2.0)
    path = tmp_path / "nih14.pt"
    save_checkpoint(path, model.state_dict(), {})
    summary = run_end_to_end("nih-chestxray14", nih_root, tmp_path, epochs=None, checkpoint=str(path),
                             hparams=(("arch", "cnn-small"),))
    check_multilabel_summary(summary)
    assert summary["model"]["source"] == "file"
    # all-negative predictions are right exactly on the "No Finding" images
    test = get_dataset("nih-chestxray14").load("test", nih_root)
    assert summary["clean_accuracy"] > 0.2
    assert 0.2 < float((test.labels.sum(1) == 0).float().mean()) < 0.8

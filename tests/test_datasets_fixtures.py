"""The file-based dataset loaders on tiny generated datasets in the official layouts (no real data
needed): HAM10000 (+ ISIC 2018 test), NIH ChestX-ray14 (binary and multilabel), CIFAR image
folders, ImageNet val folders and MedMNIST .npz; their one-line errors; the grouped split; the
decode cache; and the CLI's handling of missing data."""

from __future__ import annotations

import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from datafixtures import (
    CIFAR10_CLASSES,
    HAM_CLASSES,
    NIH_FINDINGS,
    make_cifar_folders,
    make_ham,
    make_imagenet,
    make_isic_test,
    make_medmnist,
    make_nih,
    wnid,
    write_csv,
    write_image,
)
from PIL import Image
from typer.testing import CliRunner

from bench.data.base import get_dataset
from bench.data.images import ImageList, cache_path, decode_image, decode_images, load_cached
from bench.data.splits import grouped_stratified_split
from bench.errors import BenchError, DatasetNotFoundError


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Each test decodes into its own cache: generated files of equal names and sizes in another
    test must never be served from a shared decode cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("BENCH_HOME", str(home))
    monkeypatch.delenv("BENCH_DATA", raising=False)
    return home


def user_error(excinfo: pytest.ExceptionInfo[BenchError], *fragments: str) -> str:
    """The error is one line and names every fragment."""
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def counts(labels: torch.Tensor) -> Counter:
    return Counter(labels.tolist())


# ==================================================================================================
# HAM10000
# ==================================================================================================
HAM_SPLITS = ("train", "val", "test")


@pytest.fixture
def ham(tmp_path: Path):
    return make_ham(tmp_path / "ham")


def load_ham(root: Path, split: str, image_size: int | None = None):
    return get_dataset("ham10000").load(split, root, image_size)


def test_ham_spec() -> None:
    spec = get_dataset("ham10000").spec
    assert spec.classes == HAM_CLASSES
    assert spec.task == "multiclass" and spec.imbalanced
    assert spec.splits == ("train", "val", "test", "isic2018-test")
    assert spec.shape() == (3, 64, 64)


def test_ham_splits_partition_present_images_by_lesion(ham) -> None:
    data = {s: load_ham(ham.root, s) for s in HAM_SPLITS}
    ids = {s: d.meta["image_ids"] for s, d in data.items()}
    # every present image in exactly one split; absent ones reported, not loaded
    all_ids = [i for s in HAM_SPLITS for i in ids[s]]
    assert sorted(all_ids) == sorted(ham.present)
    assert sum(len(d) for d in data.values()) == len(ham.present) == 38
    assert sum(d.meta["missing_files"] for d in data.values()) == len(ham.absent) == 2
    assert sum(d.meta["expected_files"] for d in data.values()) == len(ham.rows) == 40
    for d in data.values():
        assert d.meta["expected_files"] == len(d) + d.meta["missing_files"]
    # lesion-grouped: no lesion in two splits (the 2-image lesions included)
    lesion_split: dict[str, str] = {}
    for s in HAM_SPLITS:
        for i in ids[s]:
            assert lesion_split.setdefault(ham.lesion[i], s) == s, ham.lesion[i]
    # labels are the dx of the image in bench's class order; indices are the ISIC numbers
    for s, d in data.items():
        assert d.labels.tolist() == [HAM_CLASSES.index(ham.dx[i]) for i in ids[s]]
        assert d.indices.tolist() == [int(i.split("_")[1]) for i in ids[s]]
        assert ids[s] == sorted(ids[s])
        assert d.images.dtype == torch.float32 and tuple(d.images.shape) == (len(d), 3, 64, 64)
        assert 0.0 <= float(d.images.min()) and float(d.images.max()) <= 1.0
    assert set(data["train"].labels.tolist()) == set(range(7))  # every class in train


def test_ham_images_are_the_resized_files(ham) -> None:
    d = load_ham(ham.root, "val", image_size=16)
    assert tuple(d.images.shape) == (len(d), 3, 16, 16)
    for k, image_id in enumerate(d.meta["image_ids"]):
        path = next(ham.root.glob(f"HAM10000_images_part_*/{image_id}.jpg"))
        with Image.open(path) as img:
            expected = np.asarray(img.convert("RGB").resize((16, 16), Image.BILINEAR)).transpose(2, 0, 1)
        assert torch.equal((d.images[k] * 255).round().to(torch.uint8), torch.from_numpy(expected.copy()))


def test_ham_split_is_deterministic_and_independent_of_present_files(ham) -> None:
    first = {s: load_ham(ham.root, s).meta["image_ids"] for s in HAM_SPLITS}
    assert first == {s: load_ham(ham.root, s).meta["image_ids"] for s in HAM_SPLITS}
    # delete two more files: every other image keeps its split
    gone = sorted(ham.present)[:2]
    for image_id in gone:
        next(ham.root.glob(f"HAM10000_images_part_*/{image_id}.jpg")).unlink()
    after = {s: load_ham(ham.root, s) for s in HAM_SPLITS}
    for s in HAM_SPLITS:
        assert after[s].meta["image_ids"] == [i for i in first[s] if i not in gone]
    assert sum(d.meta["missing_files"] for d in after.values()) == 4


def test_ham_images_directly_under_root(tmp_path: Path) -> None:
    rec = make_ham(tmp_path / "flat", image_dirs=(".",))
    total = sum(len(load_ham(rec.root, s)) for s in HAM_SPLITS)
    assert total == len(rec.present)


def test_ham_isic2018_test(tmp_path: Path) -> None:
    ham = make_ham(tmp_path / "ham")
    isic = make_isic_test(tmp_path / "ham")
    d = load_ham(ham.root, "isic2018-test")
    assert len(d) == len(isic.labels) == 11 and d.meta["missing_files"] == 0
    assert d.meta["image_ids"] == sorted(isic.labels)
    assert d.labels.tolist() == [HAM_CLASSES.index(isic.labels[i]) for i in d.meta["image_ids"]]
    assert counts(d.labels) == {HAM_CLASSES.index("nv"): 3, HAM_CLASSES.index("mel"): 2,
                                HAM_CLASSES.index("bkl"): 2, HAM_CLASSES.index("bcc"): 1,
                                HAM_CLASSES.index("akiec"): 1, HAM_CLASSES.index("df"): 1,
                                HAM_CLASSES.index("vasc"): 1}
    assert tuple(d.images.shape) == (11, 3, 64, 64)
    # the test images never leak into the lesion splits
    train_ids = {i for s in HAM_SPLITS for i in load_ham(ham.root, s).meta["image_ids"]}
    assert train_ids.isdisjoint(isic.labels)


def test_ham_isic2018_test_one_missing_image(tmp_path: Path) -> None:
    isic = make_isic_test(tmp_path / "ham")
    victim = sorted(isic.labels)[4]
    (tmp_path / "ham" / "ISIC2018_Task3_Test_Images" / f"{victim}.jpg").unlink()
    d = load_ham(tmp_path / "ham", "isic2018-test")  # needs no HAM10000 metadata
    assert len(d) == 10 and d.meta["missing_files"] == 1 and victim not in d.meta["image_ids"]


# -- HAM10000: bad input -------------------------------------------------------------------------
def test_ham_root_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as exc:
        load_ham(tmp_path / "nope", "train")
    user_error(exc, "HAM10000_metadata.csv", "ISIC", "does not exist")


def test_ham_no_root_given() -> None:
    with pytest.raises(BenchError) as exc:
        get_dataset("ham10000").load("train")
    user_error(exc, "HAM10000_metadata.csv", "ISIC", "--data-dir")


def test_ham_csv_missing(tmp_path: Path) -> None:
    root = tmp_path / "ham"
    write_image(root / "HAM10000_images_part_1" / "ISIC_0024306.jpg")
    with pytest.raises(BenchError) as exc:
        load_ham(root, "train")
    user_error(exc, "HAM10000_metadata.csv", "ISIC")


def test_ham_csv_wrong_columns(tmp_path: Path) -> None:
    root = tmp_path / "ham"
    write_csv(root / "HAM10000_metadata.csv", ["lesion", "image", "diagnosis"], [["L1", "ISIC_0024306", "nv"]])
    with pytest.raises(BenchError) as exc:
        load_ham(root, "train")
    user_error(exc, "HAM10000_metadata.csv", "lesion_id", "image_id", "dx", "ISIC")


def test_ham_unknown_dx(ham) -> None:
    text = (ham.root / "HAM10000_metadata.csv").read_text()
    (ham.root / "HAM10000_metadata.csv").write_text(text.replace(",vasc,", ",angioma,", 1))
    with pytest.raises(BenchError) as exc:
        load_ham(ham.root, "train")
    user_error(exc, "angioma", "HAM10000_metadata.csv", "ISIC")


def test_ham_blank_and_unknown_dx(ham) -> None:
    lines = (ham.root / "HAM10000_metadata.csv").read_text().splitlines()
    for row, dx in ((1, ""), (2, "angioma")):  # column 2 is dx
        cells = lines[row].split(",")
        cells[2] = dx
        lines[row] = ",".join(cells)
    (ham.root / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchError) as exc:
        load_ham(ham.root, "train")
    user_error(exc, "angioma", "ISIC")


def test_ham_no_images_found(tmp_path: Path) -> None:
    rec = make_ham(tmp_path / "ham")
    for folder in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        shutil.rmtree(rec.root / folder)
    with pytest.raises(DatasetNotFoundError) as exc:
        load_ham(rec.root, "train")
    user_error(exc, "HAM10000_images_part_1", "ISIC_*.jpg", "ISIC")


def test_ham_isic_test_csv_missing(ham) -> None:
    with pytest.raises(DatasetNotFoundError) as exc:
        load_ham(ham.root, "isic2018-test")
    user_error(exc, "ISIC2018_Task3_Test_GroundTruth.csv", "ISIC")


def test_ham_isic_test_csv_two_diagnoses(tmp_path: Path) -> None:
    make_isic_test(tmp_path / "ham")
    csv = tmp_path / "ham" / "ISIC2018_Task3_Test_GroundTruth.csv"
    lines = csv.read_text().splitlines()
    lines[1] = lines[1].split(",")[0] + ",1.0,1.0,0.0,0.0,0.0,0.0,0.0"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchError) as exc:
        load_ham(tmp_path / "ham", "isic2018-test")
    user_error(exc, "exactly one diagnosis", "ISIC2018_Task3_Test_GroundTruth.csv")


def test_ham_corrupt_image_names_the_file(ham) -> None:
    victim = sorted(ham.present)[5]
    path = next(ham.root.glob(f"HAM10000_images_part_*/{victim}.jpg"))
    path.write_bytes(b"this is not a JPEG at all" * 3)
    errors = []
    for s in HAM_SPLITS:
        try:
            load_ham(ham.root, s)
        except BenchError as exc:
            errors.append(str(exc))
    assert len(errors) == 1, errors  # only the split holding the file fails
    assert str(path) in errors[0] and "\n" not in errors[0]


def test_ham_truncated_image_is_a_user_error(ham) -> None:
    victim = sorted(ham.present)[0]
    path = next(ham.root.glob(f"HAM10000_images_part_*/{victim}.jpg"))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(BenchError) as exc:
        for s in HAM_SPLITS:
            load_ham(ham.root, s)
    user_error(exc, victim)


@pytest.mark.parametrize("size", [0, -1, -64])
def test_ham_bad_image_size(ham, size: int) -> None:
    with pytest.raises(BenchError) as exc:
        load_ham(ham.root, "train", image_size=size)
    user_error(exc, str(size))


def test_ham_unknown_split(ham) -> None:
    with pytest.raises(BenchError) as exc:
        load_ham(ham.root, "validation")
    user_error(exc, "validation", "isic2018-test")


# ==================================================================================================
# NIH ChestX-ray14
# ==================================================================================================
NIH_SPLITS = ("train", "val", "test")


@pytest.fixture
def nih(tmp_path: Path):
    return make_nih(tmp_path / "nih")


def load_nih(name: str, root: Path, split: str, image_size: int | None = None):
    return get_dataset(name).load(split, root, image_size)


def test_nih_specs() -> None:
    binary, multi = get_dataset("nih-chestxray").spec, get_dataset("nih-chestxray14").spec
    assert binary.task == "binary" and binary.classes == ("no_finding", "finding")
    assert multi.task == "multilabel" and multi.classes == NIH_FINDINGS
    assert binary.shape() == multi.shape() == (1, 64, 64)


@pytest.mark.parametrize("image_dir", ["images_001/images", "images", "."])
def test_nih_splits_patient_disjoint_with_labels(tmp_path: Path, image_dir: str) -> None:
    rec = make_nih(tmp_path / "nih", image_dir=image_dir)
    seen: dict[str, str] = {}
    for name in ("nih-chestxray", "nih-chestxray14"):
        data = {s: load_nih(name, rec.root, s) for s in NIH_SPLITS}
        names = [n for d in data.values() for n in d.meta["image_names"]]
        assert sorted(names) == sorted(rec.present)
        assert sum(d.meta["missing_files"] for d in data.values()) == len(rec.absent) == 3
        patient_split: dict[str, str] = {}
        for s, d in data.items():
            assert tuple(d.images.shape) == (len(d), 1, 64, 64) and d.images.dtype == torch.float32
            assert not d.meta["official_split"]
            findings = [rec.findings[n] for n in d.meta["image_names"]]
            if name == "nih-chestxray":
                assert d.labels.shape == (len(d),)
                assert d.labels.tolist() == [0 if f == ["No Finding"] else 1 for f in findings]
            else:
                assert d.labels.shape == (len(d), 14) and d.labels.dtype == torch.int64
                expected = [[int(x in f) for x in NIH_FINDINGS] for f in findings]
                assert d.labels.tolist() == expected
            for n in d.meta["image_names"]:
                assert patient_split.setdefault(rec.patient[n], s) == s
                # both tasks split the same way
                assert seen.setdefault(n, s) == s
    assert len(seen) == len(rec.present)


def test_nih_multilabel_covers_every_finding(nih) -> None:
    labels = torch.cat([load_nih("nih-chestxray14", nih.root, s).labels for s in NIH_SPLITS])
    assert (labels.sum(0) > 0).all()  # each of the 14 findings occurs
    assert int(labels.sum(1).max()) == 3  # "Mass|Nodule|Pneumonia"
    assert int((labels.sum(1) == 0).sum()) > 0  # No Finding rows


def test_nih_images_are_grey_resized_files(nih) -> None:
    d = load_nih("nih-chestxray", nih.root, "train", image_size=8)
    assert tuple(d.images.shape) == (len(d), 1, 8, 8)
    for k, name in enumerate(d.meta["image_names"][:5]):
        with Image.open(nih.root / "images_001" / "images" / name) as img:
            expected = np.asarray(img.convert("L").resize((8, 8), Image.BILINEAR))
        assert torch.equal((d.images[k, 0] * 255).round().to(torch.uint8), torch.from_numpy(expected.copy()))


def test_nih_v2020_csv_name(tmp_path: Path) -> None:
    rec = make_nih(tmp_path / "nih", csv_name="Data_Entry_2017_v2020.csv")
    assert sum(len(load_nih("nih-chestxray", rec.root, s)) for s in NIH_SPLITS) == len(rec.present)


def write_lists(root: Path, train_val: list[str], test: list[str]) -> None:
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")


def test_nih_official_lists(nih) -> None:
    names = [r["Image Index"] for r in nih.rows]
    test_names = [n for n in names if int(nih.patient[n]) > 14]
    write_lists(nih.root, [n for n in names if int(nih.patient[n]) <= 14], test_names)
    data = {s: load_nih("nih-chestxray14", nih.root, s) for s in NIH_SPLITS}
    assert all(d.meta["official_split"] for d in data.values())
    assert sorted(data["test"].meta["image_names"]) == sorted(set(test_names) & nih.present)
    assert data["test"].meta["missing_files"] == len(set(test_names) - nih.present) == 3
    train_patients = {nih.patient[n] for n in data["train"].meta["image_names"]}
    val_patients = {nih.patient[n] for n in data["val"].meta["image_names"]}
    assert train_patients and val_patients and train_patients.isdisjoint(val_patients)
    assert (train_patients | val_patients) == {str(p) for p in range(1, 15)}
    assert len(data["train"]) + len(data["val"]) == 14 * 3


def test_nih_official_split_flag_needs_both_lists(nih) -> None:
    (nih.root / "test_list.txt").write_text(nih.rows[0]["Image Index"] + "\n")
    d = load_nih("nih-chestxray", nih.root, "train")
    random_split = make_nih(nih.root.parent / "plain")
    assert d.meta["image_names"] == load_nih("nih-chestxray", random_split.root, "train").meta["image_names"]
    assert d.meta["official_split"] is False


def test_nih_train_val_list_without_csv_images(nih) -> None:
    names = [r["Image Index"] for r in nih.rows]
    write_lists(nih.root, ["99999999_000.png"], names)
    d = load_nih("nih-chestxray", nih.root, "test")
    assert sorted(d.meta["image_names"]) == sorted(nih.present)


# -- NIH: bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nih-chestxray", "nih-chestxray14"])
def test_nih_root_missing(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetNotFoundError) as exc:
        load_nih(name, tmp_path / "nope", "test")
    user_error(exc, "Data_Entry_2017.csv", "NIH")


def test_nih_csv_missing(tmp_path: Path) -> None:
    write_image(tmp_path / "nih" / "images" / "00000001_000.png", mode="L")
    with pytest.raises(DatasetNotFoundError) as exc:
        load_nih("nih-chestxray", tmp_path / "nih", "test")
    user_error(exc, "Data_Entry_2017.csv", "NIH")


def test_nih_csv_wrong_columns(tmp_path: Path) -> None:
    write_csv(tmp_path / "nih" / "Data_Entry_2017.csv", ["Image Index", "Labels", "Patient"],
              [["00000001_000.png", "No Finding", 1]])
    with pytest.raises(BenchError) as exc:
        load_nih("nih-chestxray", tmp_path / "nih", "test")
    user_error(exc, "Finding Labels", "Patient ID", "Data_Entry_2017.csv", "NIH")


def test_nih_unknown_finding(nih) -> None:
    csv = nih.root / "Data_Entry_2017.csv"
    csv.write_text(csv.read_text().replace("Hernia", "Hernia|Fracture", 1))
    with pytest.raises(BenchError) as exc:
        load_nih("nih-chestxray14", nih.root, "test")
    user_error(exc, "Fracture", "NIH")


def test_nih_no_images(tmp_path: Path) -> None:
    rec = make_nih(tmp_path / "nih")
    shutil.rmtree(rec.root / "images_001")
    with pytest.raises(DatasetNotFoundError) as exc:
        load_nih("nih-chestxray", rec.root, "train")
    user_error(exc, "images_*/images/*.png", "NIH")


def test_nih_corrupt_png(nih) -> None:
    bad = nih.root / "images_001" / "images" / sorted(nih.present)[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 4)
    messages = []
    for s in NIH_SPLITS:
        try:
            load_nih("nih-chestxray", nih.root, s)
        except BenchError as exc:
            messages.append(str(exc))
    assert len(messages) == 1 and str(bad) in messages[0] and "\n" not in messages[0]


@pytest.mark.parametrize("size", [0, -2])
def test_nih_bad_image_size(nih, size: int) -> None:
    with pytest.raises(BenchError):
        load_nih("nih-chestxray14", nih.root, "test", image_size=size)


# ==================================================================================================
# CIFAR-10 image folders
# ==================================================================================================
def test_cifar10_image_folders(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    expected = make_cifar_folders(root, "test", classes=("truck", "airplane", "cat", "frog"), per_class=3)
    make_cifar_folders(root, "train", classes=("dog",), per_class=2, suffix=".jpg")
    ds = get_dataset("cifar10")
    d = ds.load("test", root)
    assert d.meta["layout"] == "image-folders"
    assert tuple(d.images.shape) == (12, 3, 32, 32)
    assert d.labels.tolist() == [expected[f] for f in d.meta["files"]]
    assert counts(d.labels) == {0: 3, 3: 3, 6: 3, 9: 3}  # airplane, cat, frog, truck in the official order
    for k, rel in enumerate(d.meta["files"]):
        with Image.open(root / rel) as img:
            pixels = torch.from_numpy(np.asarray(img.convert("RGB")).transpose(2, 0, 1).copy())
        assert torch.equal((d.images[k] * 255).round().to(torch.uint8), pixels)
    train = ds.load("train", root)
    assert train.labels.tolist() == [CIFAR10_CLASSES.index("dog")] * 2
    assert tuple(ds.load("test", root, image_size=16).images.shape) == (12, 3, 16, 16)


def test_cifar10_root_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as exc:
        get_dataset("cifar10").load("test", tmp_path / "nope")
    user_error(exc, "cifar-10-batches-py", "cifar")


def test_cifar10_split_folder_missing(tmp_path: Path) -> None:
    make_cifar_folders(tmp_path / "cifar", "train")
    with pytest.raises(DatasetNotFoundError) as exc:
        get_dataset("cifar10").load("test", tmp_path / "cifar")
    user_error(exc, "test/", "cifar")


def test_cifar10_unknown_class_folder(tmp_path: Path) -> None:
    make_cifar_folders(tmp_path / "cifar", "test")
    write_image(tmp_path / "cifar" / "test" / "aeroplane" / "0000.png", size=(32, 32))
    with pytest.raises(BenchError) as exc:
        get_dataset("cifar10").load("test", tmp_path / "cifar")
    user_error(exc, "aeroplane", "cifar")


def test_cifar10_empty_split(tmp_path: Path) -> None:
    for c in ("cat", "dog"):
        (tmp_path / "cifar" / "test" / c).mkdir(parents=True)
    (tmp_path / "cifar" / "test" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(BenchError) as exc:
        get_dataset("cifar10").load("test", tmp_path / "cifar")
    user_error(exc, "empty", "cifar")


def test_cifar10_corrupt_image(tmp_path: Path) -> None:
    make_cifar_folders(tmp_path / "cifar", "test")
    bad = tmp_path / "cifar" / "test" / "cat" / "0001.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(BenchError) as exc:
        get_dataset("cifar10").load("test", tmp_path / "cifar")
    user_error(exc, str(bad))


@pytest.mark.parametrize("size", [0, -5])
def test_cifar10_bad_image_size(tmp_path: Path, size: int) -> None:
    make_cifar_folders(tmp_path / "cifar", "test")
    with pytest.raises(BenchError):
        get_dataset("cifar10").load("test", tmp_path / "cifar", image_size=size)


# ==================================================================================================
# ImageNet val folders
# ==================================================================================================
@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """One val tree with the 1000 wnid folders for the whole module (directories are slow to
    create and delete on some disks). Tests that need a variant change it and restore it."""
    root = tmp_path_factory.mktemp("imagenet")
    expected = make_imagenet(root)
    # folder 7: a 300x200 image with a red frame 50 px wide left and right, green inside
    arr = np.zeros((200, 300, 3), dtype=np.uint8)
    arr[:, :, 1] = 200
    arr[:, :50] = (255, 0, 0)
    arr[:, 250:] = (255, 0, 0)
    Image.fromarray(arr).save(root / "val" / wnid(7) / "framed.png")
    expected[f"val/{wnid(7)}/framed.png"] = 7
    return root, expected


@pytest.fixture
def imagenet(imagenet_tree):
    root, expected = imagenet_tree
    before = sorted(p.relative_to(root) for p in (root / "val").rglob("*"))
    yield root, expected
    assert sorted(p.relative_to(root) for p in (root / "val").rglob("*")) == before, "test left the tree changed"


@contextmanager
def moved_away(paths: list[Path], holding: Path):
    """Move ``paths`` into ``holding`` for the duration, then put them back."""
    holding.mkdir(parents=True, exist_ok=True)
    moved = []
    try:
        for k, p in enumerate(paths):
            target = holding / f"{k}-{p.name}"
            p.rename(target)
            moved.append((target, p))
        yield
    finally:
        for target, p in moved:
            target.rename(p)


def test_imagenet_center_crop_shapes_and_labels(imagenet) -> None:
    root, expected = imagenet
    ds = get_dataset("imagenet")
    spec = ds.resolve_spec(root)
    assert spec.classes == tuple(wnid(k) for k in range(1000))
    val = ds.load("val", root)
    assert tuple(val.images.shape) == (5, 3, 224, 224)
    assert val.labels.tolist() == [expected[f] for f in val.meta["files"]] == [3, 7, 500, 500, 999]
    test = ds.load("test", root)  # the labelled val set is the test set
    assert torch.equal(test.images, val.images) and torch.equal(test.labels, val.labels)
    small = ds.load("val", root, image_size=32)
    assert tuple(small.images.shape) == (5, 3, 32, 32)
    assert torch.equal(small.labels, val.labels)


def test_imagenet_center_crop_drops_the_border(imagenet) -> None:
    """Resize-256 + center-crop-224 of the 300x200 framed image keeps x in [62.5, 237.5], so no
    red survives, while a plain resize keeps the frame."""
    root, _ = imagenet
    d = get_dataset("imagenet").load("val", root)
    k = d.meta["files"].index(f"val/{wnid(7)}/framed.png")
    assert float(d.images[k, 0].max()) < 0.05  # no red left
    assert float(d.images[k, 1].min()) > 0.7
    plain = decode_image(root / "val" / wnid(7) / "framed.png", 224, 3, "resize")
    assert plain[0].max() == 255  # a plain resize would keep the red border
    small = get_dataset("imagenet").load("val", root, image_size=32)
    assert float(small.images[k, 0].max()) < 0.05


def test_imagenet_999_folders(imagenet, tmp_path: Path) -> None:
    root, _ = imagenet
    ds = get_dataset("imagenet")
    with moved_away([root / "val" / wnid(123)], tmp_path / "away"):
        assert ds.resolve_spec(root).classes == ds.spec.classes  # not the wnids: the set is incomplete
        with pytest.raises(BenchError) as exc:
            ds.load("val", root)
    user_error(exc, "1000", "999", "image-net")


def test_imagenet_no_images(imagenet, tmp_path: Path) -> None:
    root, expected = imagenet
    with moved_away([root / rel for rel in expected], tmp_path / "away"):
        with pytest.raises(BenchError) as exc:
            get_dataset("imagenet").load("val", root)
    user_error(exc, "empty", "imagenet")


def test_imagenet_no_images_names_the_source(imagenet, tmp_path: Path) -> None:
    root, expected = imagenet
    with moved_away([root / rel for rel in expected], tmp_path / "away"):
        with pytest.raises(BenchError) as exc:
            get_dataset("imagenet").load("val", root)
    user_error(exc, "image-net", "JPEG")


def test_imagenet_root_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as exc:
        get_dataset("imagenet").load("val", tmp_path / "nope")
    user_error(exc, "val/<wnid>", "image-net")


def test_imagenet_val_folder_missing(tmp_path: Path) -> None:
    make_imagenet(tmp_path / "imagenet", n_folders=3, filled={}, folder="train")
    with pytest.raises(DatasetNotFoundError) as exc:
        get_dataset("imagenet").load("val", tmp_path / "imagenet")
    user_error(exc, "val/", "image-net")


def test_imagenet_corrupt_image(imagenet) -> None:
    root, expected = imagenet
    bad = root / sorted(expected)[0]
    original = bad.read_bytes()
    bad.write_bytes(b"\xff\xd8\xff garbage")
    try:
        with pytest.raises(BenchError) as exc:
            get_dataset("imagenet").load("val", root)
    finally:
        bad.write_bytes(original)
    user_error(exc, str(bad))


@pytest.mark.parametrize("size", [0, -224])
def test_imagenet_bad_image_size(imagenet, size: int) -> None:
    with pytest.raises(BenchError):
        get_dataset("imagenet").load("val", imagenet[0], image_size=size)


# ==================================================================================================
# MedMNIST
# ==================================================================================================
def test_medmnist_binary_known_flag(tmp_path: Path) -> None:
    path = tmp_path / "pneumoniamnist.npz"
    arrays = make_medmnist(path, "binary")
    ds = get_dataset("medmnist")
    spec = ds.resolve_spec(path)
    assert spec.name == "medmnist-pneumoniamnist"
    assert spec.task == "binary" and spec.classes == ("normal", "pneumonia")
    assert spec.input_shape == (1, 28, 28) and spec.image_size == 28
    assert spec.mean[0] == pytest.approx(arrays["train_images"].mean() / 255, abs=1e-4)
    for split, n in (("train", 12), ("val", 4), ("test", 6)):
        d = ds.load(split, path)
        assert d.dataset == "medmnist-pneumoniamnist" and tuple(d.images.shape) == (n, 1, 28, 28)
        assert torch.equal(d.images, torch.from_numpy(arrays[f"{split}_images"]).float().div(255).unsqueeze(1))
        assert d.labels.tolist() == arrays[f"{split}_labels"].reshape(-1).tolist()
    assert tuple(ds.load("test", path, image_size=14).images.shape) == (6, 1, 14, 14)


def test_medmnist_multilabel(tmp_path: Path) -> None:
    path = tmp_path / "chestlike.npz"
    arrays = make_medmnist(path, "multilabel")
    spec = get_dataset("medmnist").resolve_spec(path)
    assert spec.task == "multilabel" and spec.classes == tuple(f"class{i}" for i in range(5))
    d = get_dataset("medmnist").load("val", path)
    assert d.labels.shape == (4, 5) and d.labels.dtype == torch.int64
    assert d.labels.tolist() == arrays["val_labels"].tolist()


def test_medmnist_multiclass_colour(tmp_path: Path) -> None:
    path = tmp_path / "bloodlike.npz"
    arrays = make_medmnist(path, "multiclass", colour=True)
    spec = get_dataset("medmnist").resolve_spec(path)
    assert spec.task == "multiclass" and spec.classes == ("class0", "class1", "class2")
    assert spec.input_shape == (3, 28, 28) and len(spec.mean) == len(spec.std) == 3
    d = get_dataset("medmnist").load("train", path)
    assert tuple(d.images.shape) == (12, 3, 28, 28)
    expected = torch.from_numpy(arrays["train_images"]).permute(0, 3, 1, 2).float().div(255)
    assert torch.equal(d.images, expected)
    assert set(d.labels.tolist()) == {0, 1, 2}


def test_medmnist_directory_with_one_or_two_files(tmp_path: Path) -> None:
    folder = tmp_path / "med"
    make_medmnist(folder / "pneumoniamnist.npz")
    ds = get_dataset("medmnist")
    assert ds.resolve_spec(folder).task == "binary"
    assert len(ds.load("test", folder)) == 6
    make_medmnist(folder / "other.npz", "multiclass")
    with pytest.raises(BenchError) as exc:
        ds.load("test", folder)
    user_error(exc, "exactly one .npz", "found 2", "medmnist")


def test_medmnist_bad_files(tmp_path: Path) -> None:
    ds = get_dataset("medmnist")
    with pytest.raises(DatasetNotFoundError) as exc:
        ds.load("test", tmp_path / "nope.npz")
    user_error(exc, "npz", "medmnist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError):
        ds.load("test", tmp_path / "empty")
    partial = tmp_path / "partial.npz"
    np.savez(partial, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(BenchError) as exc:
        ds.load("train", partial)
    user_error(exc, "val_images", "test_labels")
    floats = tmp_path / "floats.npz"
    arrays = make_medmnist(tmp_path / "tmp.npz")
    np.savez(floats, **{k: (v.astype(np.float32) if k.endswith("images") else v) for k, v in arrays.items()})
    with pytest.raises(BenchError) as exc:
        ds.load("train", floats)
    user_error(exc, "uint8")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(BenchError):
        ds.load("train", garbage)


def test_medmnist_empty_split(tmp_path: Path) -> None:
    path = tmp_path / "pneumoniamnist.npz"
    make_medmnist(path, sizes={"train": 4, "val": 0, "test": 2})
    with pytest.raises(BenchError) as exc:
        get_dataset("medmnist").load("val", path)
    user_error(exc, "empty")
    with pytest.raises(BenchError):
        get_dataset("medmnist").load("val", path, image_size=14)


@pytest.mark.parametrize("size", [0, -28])
def test_medmnist_bad_image_size(tmp_path: Path, size: int) -> None:
    path = tmp_path / "pneumoniamnist.npz"
    make_medmnist(path)
    with pytest.raises(BenchError):
        get_dataset("medmnist").load("test", path, image_size=size)


# ==================================================================================================
# grouped_stratified_split
# ==================================================================================================
FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def synthetic_groups(n_groups: int = 1500, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    groups, strata = [], []
    for g in range(n_groups):
        stratum = ("a", "a", "a", "b", "b", "c")[rng.integers(6)]
        for _ in range(int(rng.integers(1, 4))):
            groups.append(f"g{g}")
            strata.append(stratum)
    return groups, strata


def test_split_groups_never_cross_and_fractions_hold() -> None:
    groups, strata = synthetic_groups()
    out = grouped_stratified_split(groups, strata, FRACTIONS, seed=0)
    assert len(out) == len(groups) and set(out) == set(FRACTIONS)
    split_of: dict[str, str] = {}
    for g, s in zip(groups, out):
        assert split_of.setdefault(g, s) == s
    for stratum in ("a", "b", "c"):
        members = [s for s, st in zip(out, strata) if st == stratum]
        for name, fraction in FRACTIONS.items():
            share = members.count(name) / len(members)
            assert abs(share - fraction) < 0.02, (stratum, name, share)


def test_split_mixed_groups_follow_their_majority_stratum() -> None:
    groups = ["x", "x", "x", "y", "y", "z"]
    strata = ["p", "q", "p", "q", "q", "p"]
    out = grouped_stratified_split(groups, strata, {"train": 0.5, "test": 0.5}, seed=3)
    assert out[0] == out[1] == out[2] and out[3] == out[4]


def test_split_is_deterministic_per_seed() -> None:
    groups, strata = synthetic_groups(400)
    a = grouped_stratified_split(groups, strata, FRACTIONS, seed=0)
    b = grouped_stratified_split(groups, strata, FRACTIONS, seed=0)
    c = grouped_stratified_split(groups, strata, FRACTIONS, seed=1)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    # also independent of the order the items are given in
    order = np.random.default_rng(5).permutation(len(groups))
    d = grouped_stratified_split([groups[i] for i in order], [strata[i] for i in order], FRACTIONS, seed=0)
    assert [d[list(order).index(i)] for i in range(0, len(groups), 37)] == [a[i] for i in range(0, len(groups), 37)]


def test_split_of_nothing_is_empty() -> None:
    assert grouped_stratified_split([], [], FRACTIONS, seed=0).tolist() == []


# ==================================================================================================
# The decode cache
# ==================================================================================================
def test_load_cached_round_trip(_own_cache: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 3, 7, 7), dtype=np.uint8)
    calls = []

    def build() -> np.ndarray:
        calls.append(1)
        return arr.copy()

    first = load_cached("unit-test-entry", build)
    second = load_cached("unit-test-entry", build)
    assert calls == [1]  # built once, then read
    assert cache_path("unit-test-entry") == _own_cache / "data-cache" / "unit-test-entry.pt"
    assert cache_path("unit-test-entry").is_file()
    assert first.dtype == second.dtype == torch.uint8
    assert torch.equal(first, torch.from_numpy(arr)) and torch.equal(second, torch.from_numpy(arr))
    assert not list((_own_cache / "data-cache").glob("*.tmp"))


def test_load_cached_rebuilds_an_unreadable_entry() -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(1, 2, 3, 4)
    cache_path("broken").write_bytes(b"truncated garbage")
    assert torch.equal(load_cached("broken", lambda: arr), torch.from_numpy(arr))
    assert torch.equal(load_cached("broken", lambda: 1 / 0), torch.from_numpy(arr))


@pytest.fixture
def listing(tmp_path: Path) -> tuple[Path, list[Path], np.ndarray]:
    root = tmp_path / "imgs"
    files = [write_image(root / "a" / f"{i}.png", size=(11, 13), seed=i) for i in range(4)]
    files.append(write_image(root / "b" / "x.jpg", size=(20, 9), seed=9))
    return root, files, np.array([0, 1, 1, 2, 0])


def test_image_list_is_bit_exact_and_cached(listing, _own_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, files, labels = listing
    lst = ImageList("toy", "test", files, labels, channels=3, root=root)
    first = lst.images(12)
    assert first.dtype == torch.uint8 and tuple(first.shape) == (5, 3, 12, 12)
    assert torch.equal(first, torch.from_numpy(decode_images(files, 12, 3)))
    key = lst.cache_key(12)
    assert (_own_cache / "data-cache" / f"toy-test-12-{key}.pt").is_file()

    import bench.data.images as images_module

    monkeypatch.setattr(images_module, "decode_images", lambda *a, **k: pytest.fail("decoded again"))
    again = ImageList("toy", "test", list(files), labels.copy(), channels=3, root=root).images(12)
    assert torch.equal(again, first)


def test_image_list_key_tracks_files_and_labels(listing) -> None:
    root, files, labels = listing

    def key(fs, ls, **kw):
        return ImageList("toy", "test", fs, np.asarray(ls), channels=3, root=root, **kw).cache_key(12)

    base = key(files, labels)
    assert key(list(files), labels.copy()) == base  # same list: same key
    assert key(files[:-1], labels[:-1]) != base  # a file removed
    extra = write_image(root / "a" / "9.png", size=(11, 13), seed=99)
    assert key([*files, extra], [*labels, 1]) != base  # a file added
    changed = labels.copy()
    changed[2] = 0
    assert key(files, changed) != base  # a label changed
    assert key(files, labels, transform="center-crop") != base
    assert ImageList("toy", "test", files, labels, channels=1, root=root).cache_key(12) != base
    assert key(files, labels) != ImageList("toy", "test", files, labels, channels=3, root=root).cache_key(16)
    # the same name in another folder is another file
    moved = root / "c" / files[0].name
    moved.parent.mkdir()
    shutil.copy(files[0], moved)
    assert key([moved, *files[1:]], labels) != base
    # a file rewritten with other bytes (of another size)
    write_image(files[1], size=(30, 30), seed=123)
    assert key(files, labels) != base


def test_image_list_rejects_mismatched_lengths(listing) -> None:
    root, files, labels = listing
    with pytest.raises(ValueError):
        ImageList("toy", "test", files, labels[:-1], channels=3, root=root)


def test_ham_cache_reused_and_invalidated(ham, _own_cache: Path) -> None:
    first = load_ham(ham.root, "train")
    entries = sorted((_own_cache / "data-cache").glob("ham10000-train-64-*.pt"))
    assert len(entries) == 1
    second = load_ham(ham.root, "train")
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert sorted((_own_cache / "data-cache").glob("ham10000-train-64-*.pt")) == entries
    victim = first.meta["image_ids"][0]
    next(ham.root.glob(f"HAM10000_images_part_*/{victim}.jpg")).unlink()
    third = load_ham(ham.root, "train")
    assert len(third) == len(first) - 1 and third.meta["missing_files"] == first.meta["missing_files"] + 1
    assert torch.equal(third.images, first.images[1:])
    assert len(list((_own_cache / "data-cache").glob("ham10000-train-64-*.pt"))) == 2


# ==================================================================================================
# CLI
# ==================================================================================================
cli = CliRunner()

from helpers import assert_cli_user_error  # noqa: E402


def test_cli_missing_data_dir(tmp_path: Path) -> None:
    from bench.cli import app

    result = cli.invoke(app, ["run", "--defense", "standard", "--dataset", "ham10000",
                              "--data-dir", str(tmp_path / "missing")])
    assert_cli_user_error(result, "ISIC", "HAM10000_metadata.csv")


def test_cli_unknown_split(tmp_path: Path) -> None:
    from bench.cli import app

    rec = make_ham(tmp_path / "ham")
    result = cli.invoke(app, ["run", "--defense", "standard", "--dataset", "ham10000",
                              "--data-dir", str(rec.root), "--split", "nope"])
    assert_cli_user_error(result, "nope", "isic2018-test")

"""Builders of tiny fake datasets in the official on-disk layouts (HAM10000, ISIC 2018 test,
NIH ChestX-ray14, CIFAR image folders, ImageNet val folders, MedMNIST .npz), written with PIL
and numpy. Not a conftest: import what you need with ``from datafixtures import ...``.

Every builder returns a small record of what it wrote, so tests can compute the expected
result independently of bench's loaders.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_image(path: Path, size: tuple[int, int] = (12, 10), mode: str = "RGB", seed: int = 0) -> Path:
    """A small random image (PIL size = (width, height)); the format follows the suffix."""
    rng = np.random.default_rng(seed)
    w, h = size
    shape = (h, w) if mode == "L" else (h, w, 3)
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# -- HAM10000 ------------------------------------------------------------------------------------
@dataclass
class HamRecord:
    root: Path
    rows: list[dict[str, str]]  # lesion_id, image_id, dx (every metadata row)
    present: set[str]  # image ids that have a file
    absent: set[str]  # image ids listed in the CSV without a file

    @property
    def dx(self) -> dict[str, str]:
        return {r["image_id"]: r["dx"] for r in self.rows}

    @property
    def lesion(self) -> dict[str, str]:
        return {r["image_id"]: r["lesion_id"] for r in self.rows}


# (dx, images per lesion) for each lesion: 34 lesions, 40 images; several lesions have 2 images
HAM_LESIONS: tuple[tuple[str, int], ...] = (
    *(("nv", 1),) * 8, *(("nv", 2),) * 3,
    *(("mel", 1),) * 4, *(("mel", 2),) * 2,
    *(("bkl", 1),) * 4, ("bkl", 2),
    *(("bcc", 1),) * 3, *(("akiec", 1),) * 3, *(("df", 1),) * 3, *(("vasc", 1),) * 3,
)


def make_ham(root: Path, absent: int = 2, image_dirs: tuple[str, ...] = ("HAM10000_images_part_1",
                                                                         "HAM10000_images_part_2"),
             size: tuple[int, int] = (15, 12)) -> HamRecord:
    """HAM10000_metadata.csv with 40 rows (34 lesions) and the images as JPEGs, spread over
    ``image_dirs``; the files of ``absent`` single-image nv lesions are not written."""
    rows: list[dict[str, str]] = []
    number = 24306
    for k, (dx, n) in enumerate(HAM_LESIONS):
        for _ in range(n):
            rows.append({"lesion_id": f"HAM_{k:07d}", "image_id": f"ISIC_{number:07d}", "dx": dx})
            number += 7
    # shuffle the CSV rows (the official file is not sorted by image id)
    order = np.random.default_rng(1).permutation(len(rows))
    rows = [rows[i] for i in order]
    lesion_size = {r["lesion_id"]: sum(x["lesion_id"] == r["lesion_id"] for x in rows) for r in rows}
    singles = sorted(r["image_id"] for r in rows if r["dx"] == "nv" and lesion_size[r["lesion_id"]] == 1)
    missing = set(singles[:absent])
    write_csv(root / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"],
              [[r["lesion_id"], r["image_id"], r["dx"], "histo", 50.0, "male", "back"] for r in rows])
    present = set()
    for j, r in enumerate(sorted(rows, key=lambda r: r["image_id"])):
        if r["image_id"] in missing:
            continue
        folder = image_dirs[j % len(image_dirs)]
        write_image(root / folder / f"{r['image_id']}.jpg", size=size, seed=j)
        present.add(r["image_id"])
    return HamRecord(root, rows, present, missing)


@dataclass
class IsicRecord:
    root: Path
    labels: dict[str, str]  # image id -> dx (lower case, bench's class names)


ISIC_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


def make_isic_test(root: Path, per_class: dict[str, int] | None = None,
                   folder: str = "ISIC2018_Task3_Test_Images") -> IsicRecord:
    """ISIC2018_Task3_Test_GroundTruth.csv (one-hot floats, official column order) and images."""
    per_class = per_class or {"NV": 3, "MEL": 2, "BKL": 2, "BCC": 1, "AKIEC": 1, "DF": 1, "VASC": 1}
    labels: dict[str, str] = {}
    out_rows = []
    number = 34524
    for col, n in per_class.items():
        for _ in range(n):
            image = f"ISIC_{number:07d}"
            number += 3
            labels[image] = col.lower()
            out_rows.append([image, *("1.0" if c == col else "0.0" for c in ISIC_COLUMNS)])
    write_csv(root / "ISIC2018_Task3_Test_GroundTruth.csv", ["image", *ISIC_COLUMNS], out_rows)
    for j, image in enumerate(sorted(labels)):
        write_image(root / folder / f"{image}.jpg", size=(9, 9), seed=100 + j)
    return IsicRecord(root, labels)


# -- NIH ChestX-ray14 ------------------------------------------------------------------------------
@dataclass
class NihRecord:
    root: Path
    rows: list[dict[str, str]]  # Image Index, Finding Labels, Patient ID
    present: set[str]  # image names with a file
    absent: set[str] = field(default_factory=set)

    @property
    def findings(self) -> dict[str, list[str]]:
        return {r["Image Index"]: r["Finding Labels"].split("|") for r in self.rows}

    @property
    def patient(self) -> dict[str, str]:
        return {r["Image Index"]: r["Patient ID"] for r in self.rows}


NIH_LABEL_CYCLE = ("No Finding", "Effusion", "No Finding", "Atelectasis|Effusion", "Cardiomegaly",
                   "No Finding", "Mass|Nodule|Pneumonia", "Infiltration", "No Finding", "Hernia",
                   "Pleural_Thickening|Fibrosis", "Edema|Consolidation", "Pneumothorax", "Emphysema")


def make_nih(root: Path, patients: int = 20, per_patient: int = 3, absent: int = 3,
             image_dir: str = "images_001/images", csv_name: str = "Data_Entry_2017.csv") -> NihRecord:
    """A Data_Entry CSV (official header) for ``patients * per_patient`` images, grey PNGs in
    ``image_dir``; the last ``absent`` images listed have no file."""
    rows = []
    k = 0
    for p in range(1, patients + 1):
        for f in range(per_patient):
            rows.append({"Image Index": f"{p:08d}_{f:03d}.png",
                         "Finding Labels": NIH_LABEL_CYCLE[k % len(NIH_LABEL_CYCLE)], "Patient ID": str(p)})
            k += 1
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
    write_csv(root / csv_name, header,
              [[r["Image Index"], r["Finding Labels"], 0, r["Patient ID"], 40, "M", "PA", 2500, 2048, 0.14, 0.14]
               for r in reversed(rows)])
    names = [r["Image Index"] for r in rows]
    missing = set(names[-absent:]) if absent else set()
    for j, name in enumerate(names):
        if name not in missing:
            write_image(root / image_dir / name, size=(10, 10), mode="L" if j % 2 else "RGB", seed=200 + j)
    return NihRecord(root, rows, set(names) - missing, missing)


# -- CIFAR image folders ---------------------------------------------------------------------------
def make_cifar_folders(root: Path, split: str = "test", classes: tuple[str, ...] = ("truck", "airplane", "cat"),
                       per_class: int = 2, suffix: str = ".png") -> dict[str, int]:
    """root/<split>/<class>/NNNN.png (32x32 RGB); returns relative path -> official label."""
    out = {}
    for c in classes:
        for i in range(per_class):
            rel = f"{split}/{c}/{i:04d}{suffix}"
            write_image(root / rel, size=(32, 32), seed=300 + 10 * CIFAR10_CLASSES.index(c) + i)
            out[rel] = CIFAR10_CLASSES.index(c)
    return out


# -- ImageNet val folders --------------------------------------------------------------------------
def wnid(k: int) -> str:
    return f"n{k:08d}"


def make_imagenet(root: Path, n_folders: int = 1000, filled: dict[int, list[tuple[int, int]]] | None = None,
                  folder: str = "val") -> dict[str, int]:
    """root/val/n00000000 .. with ``n_folders`` wnid folders; ``filled`` maps folder number to the
    sizes (w, h) of the JPEGs written there. Returns relative path -> label (folder number)."""
    filled = {3: [(40, 30)], 500: [(30, 50), (64, 64)], 999: [(20, 20)]} if filled is None else filled
    base = root / folder
    for k in range(n_folders):
        (base / wnid(k)).mkdir(parents=True, exist_ok=True)
    out = {}
    for k, sizes in filled.items():
        for i, size in enumerate(sizes):
            rel = f"{folder}/{wnid(k)}/ILSVRC2012_val_{k:05d}{i:03d}.JPEG"
            write_image(root / rel, size=size, seed=400 + k + i)
            out[rel] = k
    return out


# -- MedMNIST --------------------------------------------------------------------------------------
SPLIT_SIZES = {"train": 12, "val": 4, "test": 6}


def make_medmnist(path: Path, kind: str = "binary", colour: bool = False, side: int = 28,
                  sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """An npz in MedMNIST's format: {split}_images uint8 (N,H,W) or (N,H,W,3), {split}_labels uint8
    (N,1) for binary/multiclass (3 classes) or (N,5) multi-hot for multilabel."""
    rng = np.random.default_rng(seed)
    sizes = sizes or SPLIT_SIZES
    arrays: dict[str, np.ndarray] = {}
    for split, n in sizes.items():
        shape = (n, side, side, 3) if colour else (n, side, side)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if kind == "multilabel":
            labels = rng.integers(0, 2, size=(n, 5)).astype(np.uint8)
        else:
            k = 2 if kind == "binary" else 3
            labels = (np.arange(n) % k).astype(np.uint8)[:, None]
        arrays[f"{split}_labels"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays

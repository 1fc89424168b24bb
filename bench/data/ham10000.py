"""``ham10000``: the HAM10000 dermoscopy release (Tschandl et al., 2018), 7 diagnoses.

Layout (the official release, as on the ISIC archive and Kaggle)::

    root/HAM10000_metadata.csv           lesion_id,image_id,dx,dx_type,age,sex,localization
    root/HAM10000_images_part_1/ISIC_*.jpg
    root/HAM10000_images_part_2/ISIC_*.jpg   (or the images directly under root)
    root/ISIC2018_Task3_Test_GroundTruth.csv  (optional: the official ISIC 2018 test set)
    root/ISIC2018_Task3_Test_Images/ISIC_*.jpg

Splits ``train``/``val``/``test`` (70/15/15 %) are drawn from the metadata, grouped by
``lesion_id`` (no lesion in two splits) and stratified by ``dx``, with a fixed seed; they are
computed on all 10,015 metadata rows, so they do not depend on which files are present. Images
whose file is missing are counted, reported and skipped. ``isic2018-test`` is the official
external test set when its ground truth and images are present.

``--download`` cannot fetch the files (Harvard Dataverse, doi:10.7910/DVN/DBW86T, asks users to
accept its terms of use first): with missing files it fails at once, naming the source and layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.config import Norm, ThreatModel
from bench.data.base import Dataset, DatasetSpec, Split
from bench.data.tables import find_files, read_csv
from bench.registry import register_dataset

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
METADATA = "HAM10000_metadata.csv"
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images", ".")
TEST_CSV = "ISIC2018_Task3_Test_GroundTruth.csv"
TEST_DIRS = ("ISIC2018_Task3_Test_Images", "ISIC2018_Task3_Test_Input", ".")
FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
SPLIT_SEED = 0
OBTAIN = ("obtain the official release from Harvard Dataverse (https://doi.org/10.7910/DVN/DBW86T, after accepting "
          "its terms of use), the ISIC archive (https://challenge.isic-archive.com/data/#2018) or Kaggle "
          "(kmader/skin-cancer-mnist-ham10000)")
LAYOUT = (f"{METADATA}, HAM10000_images_part_1/ISIC_*.jpg and HAM10000_images_part_2/ISIC_*.jpg (the two image "
          f"archives unpacked; or the images directly under root); for --split isic2018-test also {TEST_CSV} and "
          f"{TEST_DIRS[0]}/ISIC_*.jpg")


@register_dataset("ham10000")
class HAM10000(Dataset):
    """HAM10000 dermoscopy images, 7 classes; lesion-grouped splits."""

    downloadable = False  # no stable direct URL: Dataverse asks to accept terms of use first
    no_download = "the official files sit behind Harvard Dataverse's terms-of-use page"
    layout = LAYOUT

    spec = DatasetSpec(
        name="ham10000",
        task="multiclass",
        classes=CLASSES,
        input_shape=(3, 450, 600),
        image_size=64,
        # per-channel mean/std of HAM10000 dermoscopy images (computed on the lesion-grouped train split)
        mean=(0.7635, 0.5461, 0.5705),
        std=(0.1409, 0.1523, 0.1692),
        threat_models=(ThreatModel(Norm.LINF, 2 / 255), ThreatModel(Norm.LINF, 4 / 255), ThreatModel(Norm.L2, 0.5)),
        radii=(0.0, 0.25, 0.5, 0.75, 1.0),
        splits=("train", "val", "test", "isic2018-test"),
        description="10,015 dermoscopy images (7 diagnoses), lesion-grouped 70/15/15 split; ISIC 2018 test set",
        citation="Tschandl, Rosendahl & Kittler, The HAM10000 dataset, Scientific Data 5, 2018",
        obtain=OBTAIN,
        imbalanced=True,
    )

    def _load(self, split: str, root: Path | None, image_size: int, *, download: bool = False,
              progress: Any = None) -> Split:
        from bench.data.images import ImageList

        root = self.require_root(root, f"{METADATA} and HAM10000_images_part_1/, HAM10000_images_part_2/")
        if split == "isic2018-test":
            ids, labels = self._isic_test(root)
            groups = ids  # the ISIC 2018 test list has no lesion ids
            dirs: tuple[str, ...] = TEST_DIRS
        else:
            table = read_csv(root / METADATA, ("lesion_id", "image_id", "dx"), self)
            table = table.sort_values("image_id", kind="stable").reset_index(drop=True)
            table["dx"] = table["dx"].fillna("(blank)").astype(str)
            unknown = sorted(set(table["dx"]) - set(CLASSES))
            if unknown:
                raise self.invalid(root / METADATA, f"unknown dx label(s) {', '.join(map(str, unknown))}; expected "
                                   f"{', '.join(CLASSES)}")
            assignment = split_assignment(table)
            chosen = np.flatnonzero(assignment == split)
            ids = table["image_id"].to_numpy()[chosen]
            groups = table["lesion_id"].astype(str).to_numpy()[chosen]
            labels = np.array([CLASSES.index(d) for d in table["dx"].to_numpy()[chosen]], dtype=np.int64)
            dirs = IMAGE_DIRS
        files = find_files(root, dirs, "ISIC_*.jpg")
        present = np.array([i in files for i in ids], dtype=bool)
        if not present.any():
            raise self.missing(root, f"none of the {len(ids)} {split} images ({', '.join(d for d in dirs if d != '.')}/"
                                     "ISIC_*.jpg)")
        positions = np.flatnonzero(present)
        listing = ImageList("ham10000", split, [files[i] for i in ids[positions]], labels[positions], channels=3,
                            root=root)
        images = listing.images(image_size, progress)
        import torch

        return Split("ham10000", split, images, torch.from_numpy(labels[positions]),
                     indices=torch.from_numpy(isic_numbers(ids[positions])),
                     meta={"missing_files": int((~present).sum()), "expected_files": int(len(ids)),
                           "image_ids": ids[positions].tolist(), "groups": groups[positions].tolist()})

    def _isic_test(self, root: Path) -> tuple[np.ndarray, np.ndarray]:
        columns = ("image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
        if not (root / TEST_CSV).exists():
            raise self.missing(root, f"{TEST_CSV} (the official ISIC 2018 Task 3 test ground truth)")
        table = read_csv(root / TEST_CSV, columns, self).sort_values("image", kind="stable")
        onehot = table[[c for c in columns[1:]]].to_numpy(dtype=float)
        if not np.all(onehot.sum(axis=1) == 1):
            raise self.invalid(root / TEST_CSV, "every row must have exactly one diagnosis set to 1")
        labels = np.array([CLASSES.index(columns[1 + k].lower()) for k in onehot.argmax(axis=1)], dtype=np.int64)
        return table["image"].to_numpy(), labels


def split_assignment(table: Any) -> np.ndarray:
    """The lesion-grouped, dx-stratified split of every metadata row (sorted by image_id)."""
    from bench.data.splits import grouped_stratified_split

    return grouped_stratified_split(table["lesion_id"].to_numpy(), table["dx"].to_numpy(), FRACTIONS, SPLIT_SEED)


def isic_numbers(ids: np.ndarray) -> np.ndarray:
    """Stable example indices: the number in the ISIC id (ISIC_0027419 -> 27419)."""
    return np.array([int(str(i).split("_")[-1]) for i in ids], dtype=np.int64)

"""NIH ChestX-ray14 (Wang et al., CVPR 2017): ``nih-chestxray`` (binary) and ``nih-chestxray14`` (multilabel).

Layout (the NIH Clinical Center release, also on Kaggle)::

    root/Data_Entry_2017.csv (or Data_Entry_2017_v2020.csv)
    root/images_001/images/*.png ... root/images_012/images/*.png   (or root/images/*.png, or root/*.png)
    root/train_val_list.txt, root/test_list.txt                      (optional: the official split)

With the official lists, ``test`` is ``test_list.txt`` and ``train``/``val`` split
``train_val_list.txt`` 90/10 grouped by patient; without them, train/val/test (70/10/20) are
drawn grouped by ``Patient ID`` and stratified by "any finding". Either way no patient appears
in two splits. Images are kept grayscale (1 channel). Missing image files are counted and skipped.

``nih-chestxray`` labels an image 0 ("No Finding") or 1 (any of the 14 findings);
``nih-chestxray14`` gives the 14-dimensional multi-hot finding vector.

``--download`` cannot fetch the files (the NIH release is a Box folder, without stable direct
links): with missing files it fails at once, naming the source and layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np

from bench.config import Norm, ThreatModel
from bench.data.base import Dataset, DatasetSpec, Split
from bench.data.tables import find_files, read_csv
from bench.registry import register_dataset

FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
            "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NO_FINDING = "No Finding"
CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
IMAGE_DIRS = ("images*/images", "images*", ".")
FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
VAL_FRACTION_OF_TRAIN_VAL = 0.1
SPLIT_SEED = 0
OBTAIN = ("obtain ChestX-ray14 from the NIH Clinical Center (https://nihcc.app.box.com/v/ChestXray-NIHCC) "
          "or Kaggle (nih-chest-xrays/data)")
LAYOUT = (f"{CSV_NAMES[0]} (or {CSV_NAMES[1]}) and the PNG images as images_001/images/*.png ... "
          "images_012/images/*.png (or images/*.png, or *.png); optional: train_val_list.txt and test_list.txt "
          "(the official split)")

_COMMON: dict[str, Any] = dict(  # the DatasetSpec fields both NIH tasks share
    input_shape=(1, 1024, 1024),
    image_size=64,
    # grey-level mean/std of ChestX-ray14 PNGs
    mean=(0.4980,),
    std=(0.2470,),
    threat_models=(ThreatModel(Norm.LINF, 2 / 255), ThreatModel(Norm.LINF, 4 / 255), ThreatModel(Norm.L2, 0.5)),
    radii=(0.0, 0.25, 0.5, 0.75, 1.0),
    splits=("train", "val", "test"),
    citation="Wang et al., ChestX-ray8, CVPR 2017",
    obtain=OBTAIN,
    imbalanced=True,
)


class _NIH(Dataset):
    multilabel = False
    downloadable = False  # the NIH release is a Box share: no stable direct URLs
    no_download = "the NIH release is a Box folder without stable direct links"
    layout = LAYOUT

    def _load(self, split: str, root: Path | None, image_size: int, *, download: bool = False,
              progress: Any = None) -> Split:
        import torch

        from bench.data.images import ImageList

        root = self.require_root(root, f"{CSV_NAMES[0]} and images_*/images/*.png")
        csv = next((root / n for n in CSV_NAMES if (root / n).is_file()), root / CSV_NAMES[0])
        table = read_csv(csv, COLUMNS, self).sort_values("Image Index", kind="stable").reset_index(drop=True)
        findings = [str(s).split("|") for s in table["Finding Labels"]]
        unknown = sorted({f for fs in findings for f in fs} - set(FINDINGS) - {NO_FINDING})
        if unknown:
            raise self.invalid(csv, f"unknown finding label(s) {', '.join(unknown)}; expected {NO_FINDING} or "
                               f"{', '.join(FINDINGS)}")
        multihot = np.array([[f in fs for f in FINDINGS] for fs in findings], dtype=np.int64)
        assignment = self._assignment(root, table, multihot)
        chosen = np.flatnonzero(assignment == split)
        names = table["Image Index"].to_numpy()[chosen]
        # any(axis=1) of the 2-D multihot array is a 1-D array (numpy's stubs also allow a scalar)
        labels = (multihot[chosen] if self.multilabel
                  else cast(np.ndarray, multihot[chosen].any(axis=1).astype(np.int64)))
        files = find_files(root, IMAGE_DIRS, "*.png")
        present = np.array([n.rsplit(".", 1)[0] in files for n in names], dtype=bool)
        if not present.any():
            raise self.missing(root, f"none of the {len(names)} {split} images (images_*/images/*.png)")
        keep = np.flatnonzero(present)
        listing = ImageList(self.spec.name, split, [files[n.rsplit(".", 1)[0]] for n in names[keep]], labels[keep],
                            channels=1, root=root)
        images = listing.images(image_size, progress)
        return Split(self.spec.name, split, images, torch.from_numpy(labels[keep]),
                     indices=torch.from_numpy(chosen[keep].astype(np.int64)),
                     meta={"missing_files": int((~present).sum()), "expected_files": int(len(names)),
                           "image_names": names[keep].tolist(),
                           "groups": table["Patient ID"].astype(str).to_numpy()[chosen][keep].tolist(),
                           "official_split": _has_official_lists(root)})

    def _assignment(self, root: Path, table: Any, multihot: np.ndarray) -> np.ndarray:
        """Split name per metadata row; patient-disjoint in both branches."""
        from bench.data.splits import grouped_stratified_split

        patients = table["Patient ID"].to_numpy()
        any_finding = multihot.any(axis=1).astype(int)
        train_list, test_list = root / "train_val_list.txt", root / "test_list.txt"
        if not _has_official_lists(root):
            return grouped_stratified_split(patients, any_finding, FRACTIONS, SPLIT_SEED)
        test_names = set(test_list.read_text().split())
        train_names = set(train_list.read_text().split())
        names = table["Image Index"].to_numpy()
        in_test = np.array([n in test_names for n in names])
        in_train = np.array([n in train_names for n in names])
        out = np.full(len(names), "unlisted", dtype=object)
        out[in_test] = "test"
        tv = np.flatnonzero(in_train & ~in_test)
        sub = grouped_stratified_split(patients[tv], any_finding[tv],
                                       {"train": 1 - VAL_FRACTION_OF_TRAIN_VAL, "val": VAL_FRACTION_OF_TRAIN_VAL},
                                       SPLIT_SEED)
        out[tv] = sub
        return out


def _has_official_lists(root: Path) -> bool:
    return (root / "train_val_list.txt").is_file() and (root / "test_list.txt").is_file()


@register_dataset("nih-chestxray")
class NIHChestXray(_NIH):
    """ChestX-ray14 as a binary task: No Finding vs any finding; patient-disjoint splits."""

    spec = DatasetSpec(name="nih-chestxray", task="binary", classes=("no_finding", "finding"),
                       description="112,120 chest X-rays: No Finding vs any of 14 findings", **_COMMON)


@register_dataset("nih-chestxray14")
class NIHChestXray14(_NIH):
    """ChestX-ray14 as a 14-label multilabel task; patient-disjoint splits."""

    multilabel = True
    spec = DatasetSpec(name="nih-chestxray14", task="multilabel", classes=FINDINGS,
                       description="112,120 chest X-rays, 14 finding labels (multilabel)", **_COMMON)

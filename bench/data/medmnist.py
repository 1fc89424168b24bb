"""``medmnist``: any MedMNIST v2 ``.npz`` file (Yang et al., Scientific Data 2023).

``--data-dir`` is the ``.npz`` file itself, or a folder holding exactly one. The file holds
``train_images``, ``train_labels``, ``val_*`` and ``test_*``; images are (N, H, W) grey or
(N, H, W, 3) colour uint8. The task is inferred from the labels: shape (N, 1) with two values
is ``binary``, with more ``multiclass``; shape (N, L) with L > 1 is ``multilabel`` (ChestMNIST).
Class names come from the MedMNIST documentation for the known files (the file name gives the
flag, e.g. ``pneumoniamnist.npz``), else ``class0``, ``class1``, ...

Runs are stored under the dataset name ``medmnist-<file stem>`` (e.g. ``medmnist-pneumoniamnist``),
so different MedMNIST datasets never share a leaderboard. Two different files with the same
stem do share the name; their runs still differ in data root and example-index hash.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.config import Norm, ThreatModel
from bench.data.base import Dataset, DatasetSpec, Split
from bench.errors import BenchError
from bench.registry import register_dataset

KNOWN_CLASSES: dict[str, tuple[str, ...]] = {
    "pneumoniamnist": ("normal", "pneumonia"),
    "breastmnist": ("malignant", "normal_benign"),
    "dermamnist": ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"),
    "bloodmnist": ("basophil", "eosinophil", "erythroblast", "immature_granulocytes", "lymphocyte", "monocyte",
                   "neutrophil", "platelet"),
    "chestmnist": ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                   "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"),
}
OBTAIN = "obtain MedMNIST .npz files from https://medmnist.com (zenodo) or `pip install medmnist`"
KEYS = tuple(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))


@register_dataset("medmnist")
class MedMNIST(Dataset):
    """Any MedMNIST .npz (task inferred from the labels)."""

    spec = DatasetSpec(
        name="medmnist", task="multiclass", classes=("class0", "class1"), input_shape=(1, 28, 28), image_size=28,
        mean=(0.5,), std=(0.25,),
        threat_models=(ThreatModel(Norm.LINF, 2 / 255), ThreatModel(Norm.LINF, 8 / 255), ThreatModel(Norm.L2, 0.5)),
        radii=(0.0, 0.25, 0.5, 0.75, 1.0), splits=("train", "val", "test"),
        description="any MedMNIST v2 .npz (pass the file with --data-dir)",
        citation="Yang et al., MedMNIST v2, Scientific Data 2023", obtain=OBTAIN, imbalanced=True,
    )

    def _file(self, root: Path | None) -> Path:
        root = self.require_root(root, "a MedMNIST .npz file (e.g. pneumoniamnist.npz)")
        if root.is_file():
            return root
        files = sorted(root.glob("*.npz"))
        if len(files) != 1:
            raise self.missing(root, "exactly one .npz file" + (f" (found {len(files)})" if files else ""))
        return files[0]

    def _read(self, path: Path) -> Any:
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise self.invalid(path, f"not a readable .npz ({str(exc).splitlines()[0][:200]})") from None
        absent = [k for k in KEYS if k not in data.files]
        if absent:
            raise self.invalid(path, f"missing array(s) {', '.join(absent)}")
        return data

    def resolve_spec(self, root: str | os.PathLike[str] | None = None) -> DatasetSpec:
        """The spec read from the file (task, classes, mean/std of its training images); computed
        once per file version, since ``load`` needs it again."""
        if root is None:
            return self.spec
        path = self._file(Path(root))
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        cache = self.__dict__.setdefault("_specs", {})
        if key not in cache:
            cache[key] = self._spec_from(path)
        return cache[key]

    def _spec_from(self, path: Path) -> DatasetSpec:
        data = self._read(path)
        labels = np.concatenate([data[f"{s}_labels"] for s in ("train", "val", "test")])
        train = data["train_images"]
        if labels.ndim == 1:
            labels = labels[:, None]
        if labels.ndim != 2 or train.ndim not in (3, 4):
            raise self.invalid(path, f"unexpected shapes: labels {labels.shape}, images {train.shape}")
        flag = path.stem.lower()
        if labels.shape[1] > 1:
            task, n = "multilabel", labels.shape[1]
        else:
            n = int(labels.max()) + 1
            task = "binary" if n == 2 else "multiclass"
        classes = KNOWN_CLASSES.get(flag) if KNOWN_CLASSES.get(flag) and len(KNOWN_CLASSES[flag]) == n else None
        channels = 3 if train.ndim == 4 else 1
        pixels = train.astype(np.float32) / 255.0
        axes = (0, 1, 2) if channels == 3 else None
        mean = tuple(float(v) for v in np.atleast_1d(pixels.mean(axis=axes)))
        std = tuple(max(float(v), 1e-3) for v in np.atleast_1d(pixels.std(axis=axes)))
        return replace(self.spec, name=f"medmnist-{flag}", task=task,
                       classes=classes or tuple(f"class{i}" for i in range(n)),
                       input_shape=(channels, train.shape[1], train.shape[2]), image_size=int(train.shape[1]),
                       mean=mean, std=std, description=f"MedMNIST {flag} ({task}, {n} classes) from {path.name}")

    def _load(self, split: str, root: Path | None, image_size: int, *, download: bool = False,
              progress: Any = None) -> Split:
        import torch

        path = self._file(root)
        spec = self.resolve_spec(path)
        data = self._read(path)
        images = np.asarray(data[f"{split}_images"])
        labels = np.asarray(data[f"{split}_labels"])
        if images.dtype != np.uint8:
            raise self.invalid(path, f"{split}_images must be uint8, got {images.dtype}")
        x = torch.from_numpy(images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2).copy())
        if spec.task == "multilabel":
            y = torch.from_numpy(labels.astype(np.int64))
        else:
            y = torch.from_numpy(labels.reshape(-1).astype(np.int64))
        if len(x) != len(y):
            raise BenchError(f"dataset '{spec.name}': {split}_images and {split}_labels differ in length")
        return Split(spec.name, split, x.contiguous(), y, meta={"file": str(path)})

"""``imagenet``: ImageNet-1k (ILSVRC 2012), evaluated on a fixed seeded subset of ``val``.

Layout: ``root/{train,val}/<wnid>/*.JPEG`` with the validation images sorted into their 1,000
class folders (as torchvision's ImageFolder expects). Class index = position of the wnid in
sorted order, the standard ILSVRC label order. Evaluation transform: resize the shorter side to
256 and take the central 224 x 224 crop (scaled proportionally for other ``image_size``).
By default ``bench run`` evaluates a seeded subset of 5,000 validation images (its index hash
is recorded with the run); ``-n`` changes the size.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from bench.config import Norm, ThreatModel
from bench.data.base import Dataset, DatasetSpec, Split
from bench.registry import register_dataset

N_CLASSES = 1000
WNID = re.compile(r"^n\d{8}$")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
OBTAIN = "obtain ILSVRC 2012 from https://image-net.org (sort val images into class folders)"


@register_dataset("imagenet")
class ImageNet(Dataset):
    """ImageNet-1k; val in wnid class folders; seeded 5,000-image evaluation subset."""

    downloadable = False
    no_download = "ImageNet's license requires registering at image-net.org"

    spec = DatasetSpec(
        name="imagenet", task="multiclass", classes=tuple(f"class{i}" for i in range(N_CLASSES)),
        input_shape=(3, 224, 224), image_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        threat_models=(ThreatModel(Norm.LINF, 4 / 255), ThreatModel(Norm.L2, 0.5)),
        radii=(0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0),
        splits=("train", "val", "test"),
        description="ImageNet-1k; evaluation on a seeded 5,000-image subset of val",
        citation="Russakovsky et al., ImageNet Large Scale Visual Recognition Challenge, IJCV 2015",
        obtain=OBTAIN, eval_subset=5000,
    )

    def resolve_spec(self, root: str | os.PathLike[str] | None = None) -> DatasetSpec:
        """With a root present, class names are the wnids found there."""
        from dataclasses import replace

        if root is not None and (Path(root) / "val").is_dir():
            wnids = self._wnids(Path(root) / "val")
            if len(wnids) == N_CLASSES:
                return replace(self.spec, classes=tuple(wnids))
        return self.spec

    def _wnids(self, base: Path) -> list[str]:
        return sorted(p.name for p in base.iterdir() if p.is_dir() and WNID.match(p.name))

    def _load(self, split: str, root: Path | None, image_size: int, *, download: bool = False,
              progress: Any = None) -> Split:
        import torch

        from bench.data.images import ImageList

        root = self.require_root(root, "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
        folder = "val" if split in ("val", "test") else "train"  # the labelled val set is the test set
        base = root / folder
        if not base.is_dir():
            raise self.missing(root, f"{folder}/<wnid>/*.JPEG")
        wnids = self._wnids(base)
        if len(wnids) != N_CLASSES:
            raise self.invalid(base, f"expected {N_CLASSES} wnid class folders (n01440764 ... n15075141), found "
                               f"{len(wnids)}; put the validation images into their class folders")
        files, labels = [], []
        for k, wnid in enumerate(wnids):
            paths = sorted(p for p in (base / wnid).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files += paths
            labels += [k] * len(paths)
        if not files:
            raise self.invalid(base, f"split '{split}' is empty: no <wnid>/*.JPEG images")
        listing = ImageList("imagenet", folder, files, np.array(labels, dtype=np.int64), channels=3,
                            transform="center-crop", root=root)
        images = listing.images(image_size, progress)
        return Split("imagenet", split, images, torch.tensor(labels, dtype=torch.int64),
                     meta={"files": [str(f.relative_to(root)) for f in files]})

"""``cifar10`` and ``cifar100`` (Krizhevsky, 2009).

Accepted layouts under root:

* the official python pickles: ``root/cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``)
  or ``root/cifar-100-python/`` (``train``, ``test``), or root pointing at that folder itself;
  read with torchvision, which checks the files' MD5 sums. ``--download`` fetches them there
  (only when asked, for users with internet);
* an image-folder layout ``root/{train,test}/<class name>/*.png|jpg``, class folders named as
  the official classes (mapped to the official label order by name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.config import Norm, ThreatModel
from bench.data.base import Dataset, DatasetSpec, Split
from bench.errors import BenchError
from bench.registry import register_dataset

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
)
OBTAIN = "obtain it from https://www.cs.toronto.edu/~kriz/cifar.html or pass --download (needs internet)"
_THREATS = (ThreatModel(Norm.LINF, 8 / 255), ThreatModel(Norm.LINF, 16 / 255), ThreatModel(Norm.L2, 0.5))
_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class _Cifar(Dataset):
    folder: str = ""
    torchvision_class: str = ""

    def _load(self, split: str, root: Path | None, image_size: int, *, download: bool = False,
              progress: Any = None) -> Split:
        if root is None and not download:
            self.require_root(root, f"{self.folder}/ or train/ and test/ class folders")
        root = root or Path.cwd() / "data" / self.spec.name
        pickles = root if (root / self.folder).is_dir() else root.parent if root.name == self.folder else None
        if pickles is not None or download:
            return self._from_pickles(split, pickles or root, download)
        if (root / split).is_dir():
            return self._from_folders(split, root, image_size, progress)
        self.require_root(root, f"{self.folder}/ or {split}/<class>/*.png")
        raise self.missing(root, f"{self.folder}/ (official python pickles) or {split}/<class>/ image folders")

    def _from_pickles(self, split: str, parent: Path, download: bool) -> Split:
        import torch
        import torchvision

        cls = getattr(torchvision.datasets, self.torchvision_class)
        try:
            ds = cls(root=str(parent), train=(split == "train"), download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted."
            raise self.missing(parent, f"a valid {self.folder}/ ({exc})") from None
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        return Split(self.spec.name, split, images, labels, meta={"layout": "pickles"})

    def _from_folders(self, split: str, root: Path, image_size: int, progress: Any) -> Split:
        import torch

        from bench.data.images import ImageList

        classes = self.spec.classes
        base = root / split
        folders = sorted(p.name for p in base.iterdir() if p.is_dir())
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise self.invalid(base, f"unknown class folder(s) {', '.join(unknown[:5])}; expected the official "
                               f"class names ({', '.join(classes[:4])}, ...)")
        files, labels = [], []
        for name in folders:
            paths = sorted(p for p in (base / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files += paths
            labels += [classes.index(name)] * len(paths)
        if not files:
            raise BenchError(f"dataset '{self.spec.name}': split '{split}' is empty under {base}; {self.spec.obtain}")
        listing = ImageList(self.spec.name, split, files, np.array(labels, dtype=np.int64), channels=3, root=root)
        images = listing.images(image_size, progress)
        return Split(self.spec.name, split, images, torch.tensor(labels, dtype=torch.int64),
                     meta={"layout": "image-folders", "files": [str(f.relative_to(root)) for f in files]})


def _spec(name: str, classes: tuple[str, ...], mean: tuple[float, ...], std: tuple[float, ...]) -> DatasetSpec:
    return DatasetSpec(name=name, task="multiclass", classes=classes, input_shape=(3, 32, 32), image_size=32,
                       mean=mean, std=std, threat_models=_THREATS, radii=_RADII,
                       description=f"60,000 32x32 images, {len(classes)} classes",
                       citation="Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009",
                       obtain=OBTAIN)


@register_dataset("cifar10")
class Cifar10(_Cifar):
    """CIFAR-10: 60,000 32x32 colour images in 10 classes."""

    folder = "cifar-10-batches-py"
    torchvision_class = "CIFAR10"
    spec = _spec("cifar10", CIFAR10_CLASSES, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))


@register_dataset("cifar100")
class Cifar100(_Cifar):
    """CIFAR-100: 60,000 32x32 colour images in 100 fine classes."""

    folder = "cifar-100-python"
    torchvision_class = "CIFAR100"
    spec = _spec("cifar100", CIFAR100_CLASSES, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))

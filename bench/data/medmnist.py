"""``medmnist``: any MedMNIST v2 ``.npz`` file (Yang et al., Scientific Data 2023).

``--data-dir`` is the ``.npz`` file itself, or a folder holding exactly one. The file holds
``train_images``, ``train_labels``, ``val_*`` and ``test_*``; images are (N, H, W) grey or
(N, H, W, 3) colour uint8. The task is inferred from the labels: shape (N, 1) with two values
is ``binary``, with more ``multiclass``; shape (N, L) with L > 1 is ``multilabel`` (ChestMNIST).
Class names come from the MedMNIST documentation for the known files (the file name gives the
flag, e.g. ``pneumoniamnist.npz``), else ``class0``, ``class1``, ...

``--download`` fetches a 2D MedMNIST file from Zenodo when ``--data-dir`` names it
(``DIR/<flag>.npz``, or ``<flag>_64.npz``, ``_128``, ``_224``), checking its MD5; the URL and MD5
come from the ``medmnist`` package when it is installed, else from the table below.

Runs are stored under the dataset name ``medmnist-<file stem>`` (e.g. ``medmnist-pneumoniamnist``),
so different MedMNIST datasets never share a leaderboard. Two different files with the same
stem do share the name; their runs still differ in data root and example-index hash.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.config import Norm, ThreatModel
from bench.data.base import Dataset, DatasetSpec, Split
from bench.errors import BenchError, DatasetNotFoundError
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
OBTAIN = ("pass --download with --data-dir DIR/<flag>.npz (e.g. pneumoniamnist.npz) to fetch the file from Zenodo, "
          "or get it from https://medmnist.com")
KEYS = tuple(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))

# Where --download fetches a 2D MedMNIST file, and its MD5, when the `medmnist` package is not
# installed (when it is, its INFO table is used instead). Source: the medmnist 3.0.2 package
# (PyPI), medmnist/info.py: every 2D file is "https://zenodo.org/records/10519652/files/
# <flag><size>.npz?download=1" (Zenodo record 10519652, MedMNIST+), size "" (28 px), "_64",
# "_128" or "_224"; the MD5 sums are that file's, in the order of SIZES.
ZENODO_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"
SIZES = ("", "_64", "_128", "_224")
ZENODO_MD5: dict[str, tuple[str, str, str, str]] = {
    "pathmnist": ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
                  "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec"),
    "chestmnist": ("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
                   "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa"),
    "dermamnist": ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
                   "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"),
    "octmnist": ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
                 "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3"),
    "pneumoniamnist": ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
                       "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1"),
    "retinamnist": ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
                    "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348"),
    "breastmnist": ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
                    "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b"),
    "bloodmnist": ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
                   "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601"),
    "tissuemnist": ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
                    "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c"),
    "organamnist": ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
                    "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170"),
    "organcmnist": ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
                    "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1"),
    "organsmnist": ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
                    "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1"),
}
FILE_NAME = re.compile(r"^(?P<flag>[a-z]+mnist)(?P<size>_64|_128|_224)?$")


@register_dataset("medmnist")
class MedMNIST(Dataset):
    """Any MedMNIST .npz (task inferred from the labels)."""

    downloadable = True
    layout = "one MedMNIST .npz file (--data-dir is the file, or a folder holding exactly one)"

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

    def download(self, root: Path | None, progress: Any = None) -> None:
        """Fetch the 2D MedMNIST file ``root`` names (``DIR/<flag>[_64|_128|_224].npz``) from Zenodo,
        MD5-checked, unless a file is already there; nothing is fetched for an existing file or a
        folder holding one."""
        from bench.data import download as fetching

        target = self._download_target(root)
        if target is not None:
            url, md5 = zenodo_source(target)
            fetching.fetch(url, target, md5, progress=progress)

    def _download_target(self, root: Path | None) -> Path | None:
        """The file to fetch, or None when ``root`` already holds the data."""
        if root is not None and (root.is_file() or (root.is_dir() and any(root.glob("*.npz")))):
            return None
        if root is not None and root.suffix.lower() == ".npz":
            return root
        where = f"{root}/<flag>.npz" if root is not None else "DIR/<flag>.npz"
        raise DatasetNotFoundError(f"dataset 'medmnist': --download needs the file to fetch: pass --data-dir {where} "
                                   f"with <flag> one of {', '.join(ZENODO_MD5)} (add _64, _128 or _224 for larger "
                                   "images)")

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


def zenodo_source(path: Path) -> tuple[str, str | None]:
    """The download URL and MD5 of the MedMNIST file named like ``path`` (``<flag>[_64|_128|_224].npz``):
    from the ``medmnist`` package's INFO when it is installed, else from ZENODO_MD5."""
    match = FILE_NAME.match(path.stem.lower())
    flag, size = (match["flag"], match["size"] or "") if match else ("", "")
    try:
        from medmnist import INFO  # optional: the authors' table, which follows new releases
    except ImportError:
        INFO = {}
    info = INFO.get(flag, {}) if isinstance(INFO, dict) else {}
    if info.get(f"url{size}"):
        return str(info[f"url{size}"]), info.get(f"MD5{size}")
    if flag not in ZENODO_MD5:
        raise DatasetNotFoundError(f"dataset 'medmnist': cannot download '{path.name}': not a 2D MedMNIST file name; "
                                   f"name it <flag>.npz with <flag> one of {', '.join(ZENODO_MD5)} (add _64, _128 or "
                                   "_224 for larger images)")
    return ZENODO_URL.format(file=f"{flag}{size}.npz"), ZENODO_MD5[flag][SIZES.index(size)]

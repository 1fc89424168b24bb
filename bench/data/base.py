"""The dataset contract.

A dataset is a registry entry (``@register_dataset("name")``) subclassing :class:`Dataset`.
Its class attribute ``spec`` (a :class:`DatasetSpec`) is plain data and cheap to read; its
``load(split, root, image_size)`` returns a :class:`Split` of float images in [0, 1], shape
(N, C, H, W), and integer labels. torch is imported only inside ``load``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from bench.config import ThreatModel
from bench.data.download import NETWORK_ERRORS, DownloadError, describe
from bench.errors import BenchError, DatasetNotFoundError

if TYPE_CHECKING:
    import torch

__all__ = ["Dataset", "DatasetSpec", "Split", "get_dataset", "indices_hash"]

TASKS = ("multiclass", "binary", "multilabel")


@dataclass(frozen=True)
class DatasetSpec:
    """What the harness needs to know about a dataset without loading it."""

    name: str
    task: str
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]  # native (C, H, W)
    image_size: int  # default side length the images are resized to
    mean: tuple[float, ...]
    std: tuple[float, ...]
    threat_models: tuple[ThreatModel, ...]
    radii: tuple[float, ...]
    splits: tuple[str, ...] = ("train", "test")
    description: str = ""
    citation: str = ""
    obtain: str = ""  # where the official files are published (shown when they are missing)
    imbalanced: bool = False  # show balanced accuracy beside accuracy
    eval_subset: int | None = None  # default number of evaluated examples (seeded subset), None = all

    def __post_init__(self) -> None:
        assert self.task in TASKS, self.task
        channels = self.input_shape[0]
        assert len(self.mean) == channels and len(self.std) == channels, "mean/std must have one value per channel"
        assert all(s > 0 for s in self.std)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    def shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        size = image_size or self.image_size
        return (self.channels, size, size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "classes": list(self.classes),
            "input_shape": list(self.input_shape),
            "image_size": self.image_size,
            "threat_models": [t.to_dict() for t in self.threat_models],
            "radii": list(self.radii),
            "splits": list(self.splits),
            "imbalanced": self.imbalanced,
            "eval_subset": self.eval_subset,
        }


@dataclass
class Split:
    """One split of a dataset, in memory: images in [0,1] (N,C,H,W) and labels (N,)."""

    dataset: str
    name: str
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor | None = None  # positions in the full split, when this is a subset
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError("images and labels differ in length")
        if self.indices is None:
            import torch

            self.indices = torch.arange(len(self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: torch.Tensor) -> Split:
        """The examples at ``positions``; per-example lists in ``meta`` are subset alongside."""
        assert self.indices is not None
        chosen = positions.tolist()
        meta = {k: [v[i] for i in chosen] if isinstance(v, list) and len(v) == len(self) else v
                for k, v in self.meta.items()}
        return Split(self.dataset, self.name, self.images[positions], self.labels[positions],
                     self.indices[positions], meta)


def indices_hash(indices: Any) -> str:
    """sha256 of the example indices (as int64 little-endian); identifies an evaluation subset."""
    import numpy as np

    arr = np.asarray(indices, dtype="<i8")
    return hashlib.sha256(arr.tobytes()).hexdigest()


class Dataset:
    """Base class of dataset registry entries. Subclasses set ``spec`` and implement ``_load``."""

    name: ClassVar[str] = ""
    spec: ClassVar[DatasetSpec]
    reads_files: ClassVar[bool] = True  # False for datasets that ignore --data-dir (bundled or generated)
    #: What ``load(download=True)`` does. True: :meth:`download` fetches the missing files before
    #: anything reads them. False: the files cannot be downloaded; when they are missing, the error
    #: says so at once (no network access), with ``no_download`` (why) and ``layout``. None (not
    #: declared): ``download`` is only passed on to ``_load`` (CIFAR fetches there via torchvision).
    downloadable: ClassVar[bool | None] = None
    no_download: ClassVar[str] = "bench knows no public download for it"
    layout: ClassVar[str] = ""  # the expected files under root, one line, for messages

    def default_root(self) -> Path | None:
        """``$BENCH_DATA/<name>`` when BENCH_DATA is set."""
        base = os.environ.get("BENCH_DATA")
        return Path(base) / self.spec.name if base else None

    def resolve_spec(self, root: str | os.PathLike[str] | None = None) -> DatasetSpec:
        """The spec for the files at ``root``; fixed for most datasets (MedMNIST reads its file)."""
        return self.spec

    def load(self, split: str, root: str | os.PathLike[str] | None = None, image_size: int | None = None, *,
             download: bool = False, progress: Any = None) -> Split:
        """Load ``split`` as float images in [0, 1], resized to ``image_size`` (default: the spec's).

        ``download`` lets datasets that support it fetch their files (only when the user asks); on
        the others it fails at once with a one-line error when files are missing (see ``downloadable``).
        """
        resolved_root = Path(root).expanduser() if root is not None else self.default_root()
        if not (download and self.reads_files):
            return self._load_split(split, resolved_root, image_size, download=download, progress=progress)
        self.fetch_missing(resolved_root, progress)
        try:
            return self._load_split(split, resolved_root, image_size, download=True, progress=progress)
        except DatasetNotFoundError as exc:
            if self.downloadable is False:
                raise self.cannot_download(resolved_root, exc) from None
            raise
        except NETWORK_ERRORS as exc:  # from a loader that fetches by itself (torchvision for CIFAR)
            raise self._network_failed(resolved_root, exc) from None

    def _network_failed(self, root: Path | None, exc: BaseException) -> DownloadError:
        spec = self.spec
        where = f"under {root}" if root is not None else "in the folder given to --data-dir"
        return DownloadError(f"dataset '{spec.name}': cannot download its files: {describe(exc)}; place them {where} "
                             "instead" + (f"; {spec.obtain}" if spec.obtain else ""))

    def _load_split(self, split: str, resolved_root: Path | None, image_size: int | None, *, download: bool,
                    progress: Any) -> Split:
        """``load`` without the download handling: read, convert to float, resize, check."""
        spec = self.resolve_spec(resolved_root)
        if split not in spec.splits:
            raise BenchError(f"dataset '{spec.name}' has no split '{split}'; splits: {', '.join(spec.splits)}")
        if image_size is not None and image_size < 1:
            raise BenchError(f"invalid image size {image_size}: must be a positive number of pixels")
        size = image_size or spec.image_size
        data = self._load(split, resolved_root, size, download=download, progress=progress)
        from_uint8 = data.images.dtype == _uint8()
        if from_uint8:  # uint8 / 255 lies in [0, 1] by construction: no range check needed
            data = Split(data.dataset, data.name, data.images.float().div_(255.0), data.labels, data.indices, data.meta)
        if tuple(data.images.shape[1:]) != spec.shape(size):
            data = Split(data.dataset, data.name, _resize(data.images, size), data.labels, data.indices, data.meta)
        if len(data) == 0:
            raise BenchError(f"dataset '{spec.name}': split '{split}' is empty under {resolved_root}"
                             + (f"; {spec.obtain}" if spec.obtain else ""))
        if not from_uint8:
            _check_range(data)
        return data

    def _load(self, split: str, root: Path | None, image_size: int, *, download: bool = False,
              progress: Any = None) -> Split:
        raise NotImplementedError

    def fetch_missing(self, root: Path | None, progress: Any = None) -> None:
        """What ``--download`` does before anything reads ``root``: :meth:`download` for datasets
        that fetch their files themselves (``downloadable`` True); nothing for the others. Call it
        before :meth:`resolve_spec` where that reads the files (MedMNIST)."""
        if self.downloadable and self.reads_files:
            self.download(root, progress)

    def download(self, root: Path | None, progress: Any = None) -> None:
        """Fetch the files missing under ``root`` (called by ``load(download=True)`` when
        ``downloadable`` is True, before anything reads ``root``). Guarantee: returns only when the
        files the loader reads are there (already, or fetched whole); otherwise raises a one-line
        :class:`~bench.errors.BenchError`. The default fetches nothing."""

    def cannot_download(self, root: Path | None, missing: DatasetNotFoundError) -> DatasetNotFoundError:
        """The one-line error for ``--download`` on a dataset whose files are missing and cannot be fetched."""
        spec = self.spec
        head = f"dataset '{spec.name}': --download cannot fetch it ({self.no_download})"
        if not self.layout:
            return DatasetNotFoundError(f"{head}; " + str(missing).removeprefix(f"dataset '{spec.name}': "))
        where = root if root is not None else f"--data-dir or $BENCH_DATA/{spec.name}"
        return DatasetNotFoundError(f"{head}; " + (f"{spec.obtain}; " if spec.obtain else "")
                                    + f"then place under {where}: {self.layout}")

    def require_root(self, root: Path | None, expected: str) -> Path:
        """``root`` if it exists, else a one-line error naming the expected files and their source."""
        spec = self.spec
        where = f"--data-dir or $BENCH_DATA/{spec.name}"
        if root is None:
            raise DatasetNotFoundError(f"dataset '{spec.name}' needs its files: pass {where} pointing at {expected}"
                                       + (f"; {spec.obtain}" if spec.obtain else ""))
        if not root.exists():
            raise DatasetNotFoundError(f"dataset '{spec.name}': {root} does not exist; expected {expected}"
                                       + (f"; {spec.obtain}" if spec.obtain else ""))
        return root

    def invalid(self, path: Path, problem: str) -> BenchError:
        spec = self.spec
        return BenchError(f"dataset '{spec.name}': {path}: {problem}" + (f"; {spec.obtain}" if spec.obtain else ""))

    def missing(self, root: Path, what: str) -> DatasetNotFoundError:
        spec = self.spec
        return DatasetNotFoundError(f"dataset '{spec.name}': {what} not found under {root}"
                                    + (f"; {spec.obtain}" if spec.obtain else ""))


def _uint8() -> Any:
    import torch

    return torch.uint8


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    import torch.nn.functional as F

    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)


def _check_range(data: Split) -> None:
    images = data.images
    if not images.is_floating_point():
        raise ValueError(f"{data.dataset}/{data.name}: images must be float, got {images.dtype}")
    if bool(images.isnan().any()):
        raise ValueError(f"{data.dataset}/{data.name}: images contain NaN")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"{data.dataset}/{data.name}: pixel values must lie in [0, 1], got [{lo}, {hi}]")


def get_dataset(name: str) -> Dataset:
    """Instantiate the dataset registered as ``name``."""
    from bench.registry import DATASETS

    return DATASETS.get(name)()

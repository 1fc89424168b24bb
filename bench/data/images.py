"""Decoding image files, and the decode cache.

Real datasets are folders of JPEG/PNG files. The first load decodes and resizes every image
once and stores the result as one uint8 tensor file under ``$BENCH_HOME/data-cache``, keyed by
(dataset, split, image size, transform, and a hash of the file list, each file's size and
modification time, and the labels); later loads memory-map that file. Adding, removing,
rewriting or relabelling a file changes the key. (A file replaced by one of identical name, size
and modification time would not be noticed; delete the cache folder after such surgery.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.config import stable_hash
from bench.errors import BenchError
from bench.paths import atomic_write, cache_subdir

__all__ = ["ImageList", "decode_image", "decode_images", "load_cached"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def decode_image(path: str | os.PathLike[str], image_size: int, channels: int, transform: str = "resize") -> np.ndarray:
    """Decode one image to uint8 (C, S, S).

    ``transform``: ``resize`` (straight to S x S, bilinear with antialiasing) or ``center-crop``
    (shorter side to S * 256/224, then the central S x S crop: the ImageNet evaluation transform).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if transform == "center-crop":
                short = round(image_size * 256 / 224)
                w, h = img.size
                scale = short / min(w, h)
                size = (max(short, round(w * scale)), max(short, round(h * scale)))
                img = img.resize(size, Image.Resampling.BILINEAR)
                w, h = img.size
                left, top = (w - image_size) // 2, (h - image_size) // 2
                img = img.crop((left, top, left + image_size, top + image_size))
            elif img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise BenchError(f"cannot decode image {path}: {exc}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_images(paths: Sequence[str | os.PathLike[str]], image_size: int, channels: int, transform: str = "resize",
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Decode many images in parallel threads (PIL releases the GIL while decoding)."""
    out = np.empty((len(paths), channels, image_size, image_size), dtype=np.uint8)
    workers = max(1, min(8, os.cpu_count() or 1))

    def work(i: int) -> int:
        out[i] = decode_image(paths[i], image_size, channels, transform)
        return i

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(work, range(len(paths))):
            if progress is not None:
                progress(1)
    return out


class ImageList:
    """An ordered list of image files with integer (or multi-hot) labels, decodable through the cache."""

    def __init__(self, dataset: str, split: str, files: Sequence[str | os.PathLike[str]], labels: np.ndarray,
                 channels: int, transform: str = "resize", root: Path | None = None) -> None:
        if len(files) != len(labels):
            raise ValueError("files and labels differ in length")
        self.dataset, self.split = dataset, split
        self.files, self.labels = [os.fspath(f) for f in files], np.asarray(labels)
        self.channels, self.transform, self.root = channels, transform, root

    def cache_key(self, image_size: int) -> str:
        prefix = str(self.root) + os.sep if self.root is not None else None
        names = [s[len(prefix):] if prefix and s.startswith(prefix) else os.path.basename(s) for s in self.files]
        stats = [os.stat(f) for f in self.files]
        sizes = [(st.st_size, st.st_mtime_ns) for st in stats]
        return stable_hash({"dataset": self.dataset, "split": self.split, "image_size": image_size,
                            "channels": self.channels, "transform": self.transform, "files": names, "sizes": sizes,
                            "labels": self.labels.tolist(), "format": 1}, 24)

    def images(self, image_size: int, progress: Any = None) -> Any:
        """uint8 tensor (N, C, S, S), decoded once and then read from the cache."""
        key = self.cache_key(image_size)
        return load_cached(f"{self.dataset}-{self.split}-{image_size}-{key}",
                           lambda: self._decode(image_size, progress))

    def _decode(self, image_size: int, progress: Any) -> np.ndarray:
        if progress is None:
            return decode_images(self.files, image_size, self.channels, self.transform)
        with progress.task(f"decoding {self.dataset}/{self.split} ({len(self.files)} images, once)",
                           total=len(self.files)) as task:
            return decode_images(self.files, image_size, self.channels, self.transform, task.advance)


def cache_path(name: str) -> Path:
    return cache_subdir("data-cache") / f"{name}.pt"


def load_cached(name: str, build: Callable[[], np.ndarray]) -> Any:
    """Return the uint8 tensor cached as ``name``, building and storing it atomically if absent."""
    import torch

    path = cache_path(name)
    if path.exists():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(obj, dict) and obj.get("name") == name and isinstance(obj.get("images"), torch.Tensor):
                return obj["images"]
        except (RuntimeError, OSError, EOFError, ValueError):
            pass  # unreadable cache entry: rebuild it below
    images = torch.from_numpy(build())
    atomic_write(path, lambda tmp: torch.save({"name": name, "images": images}, tmp))
    return images

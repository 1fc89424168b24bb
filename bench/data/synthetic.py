"""``synthetic``: a tiny generated dataset for tests (no files, instant, deterministic).

Four classes, 1x8x8 images. Each class has a fixed random prototype; an image is its class
prototype plus Gaussian noise, clipped to [0, 1]. Train 256 images, test 64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.config import Norm, ThreatModel
from bench.data.base import Dataset, DatasetSpec, Split
from bench.registry import register_dataset

N_CLASSES = 4
SIZES = {"train": 256, "test": 64}


@register_dataset("synthetic")
class Synthetic(Dataset):
    """Tiny generated dataset for tests."""

    reads_files = False

    spec = DatasetSpec(
        name="synthetic",
        task="multiclass",
        classes=tuple(f"class{i}" for i in range(N_CLASSES)),
        input_shape=(1, 8, 8),
        image_size=8,
        mean=(0.5,),
        std=(0.25,),
        threat_models=(ThreatModel(Norm.LINF, 0.1), ThreatModel(Norm.L2, 0.5)),
        radii=(0.0, 0.25, 0.5, 0.75, 1.0),
        description="4 classes of noisy random 8x8 prototypes; 256 train / 64 test",
    )

    def _load(self, split: str, root: Path | None, image_size: int, *, download: bool = False,
              progress: Any = None) -> Split:
        import torch

        g = torch.Generator().manual_seed(1234)
        prototypes = torch.rand(N_CLASSES, 1, 8, 8, generator=g).mul(0.6).add(0.2)
        g.manual_seed(1 if split == "train" else 2)
        n = SIZES[split]
        labels = torch.arange(n) % N_CLASSES
        noise = torch.randn(n, 1, 8, 8, generator=g) * 0.15
        images = (prototypes[labels] + noise).clamp(0, 1)
        return Split("synthetic", split, images, labels.long())

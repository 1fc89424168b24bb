"""``digits``: scikit-learn's bundled 8x8 handwritten digits (the embedded default dataset).

1,797 real 8x8 grey-level images of the digits 0-9 (UCI optical recognition of handwritten
digits, test set), shipped inside scikit-learn, so it works offline. Pixel values 0..16 are
scaled to [0, 1]. The train/test split is stratified by class and fixed by seed 0:
1,347 training and 450 test images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.config import Norm, ThreatModel
from bench.data.base import Dataset, DatasetSpec, Split
from bench.registry import register_dataset

SPLIT_SEED = 0
TEST_FRACTION = 0.25


@register_dataset("digits")
class Digits(Dataset):
    """scikit-learn's 8x8 handwritten digits (embedded default)."""

    reads_files = False

    spec = DatasetSpec(
        name="digits",
        task="multiclass",
        classes=tuple(str(i) for i in range(10)),
        input_shape=(1, 8, 8),
        image_size=8,
        # mean/std of the training split (seed-0 stratified split), used for in-model normalization
        mean=(0.3052,),
        std=(0.3760,),
        threat_models=(ThreatModel(Norm.LINF, 0.1), ThreatModel(Norm.L2, 0.5)),
        radii=(0.0, 0.25, 0.5, 0.75, 1.0),
        description="1,797 8x8 handwritten digits bundled with scikit-learn; 1,347 train / 450 test",
        citation="Alpaydin & Kaynak, UCI Optical Recognition of Handwritten Digits, 1998",
    )

    def _load(self, split: str, root: Path | None, image_size: int, *, download: bool = False,
              progress: Any = None) -> Split:
        import numpy as np
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        raw = load_digits()
        images = raw.images.astype(np.float32) / 16.0
        positions = np.arange(len(images))
        train_pos, test_pos = train_test_split(
            positions, test_size=TEST_FRACTION, stratify=raw.target, random_state=SPLIT_SEED
        )
        chosen = np.sort(train_pos if split == "train" else test_pos)
        x = torch.from_numpy(images[chosen]).unsqueeze(1).contiguous()
        y = torch.from_numpy(raw.target[chosen].astype(np.int64))
        return Split("digits", split, x, y, meta={"source_positions": chosen.tolist()})

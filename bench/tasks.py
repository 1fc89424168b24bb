"""What "prediction", "correct" and "loss" mean for each task.

* ``multiclass`` and ``binary``: logits (N, C); prediction = argmax; loss = cross-entropy.
* ``multilabel``: logits (N, L), one per label; prediction = logit > 0 per label; an example is
  correct when every label is; loss = binary cross-entropy summed over labels (what attacks
  maximise and training minimises).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

TASKS = ("multiclass", "binary", "multilabel")


def predict(logits: torch.Tensor, task: str) -> torch.Tensor:
    return (logits > 0).long() if task == "multilabel" else logits.argmax(dim=1)


def correct(pred: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Per-example correctness (all labels for multilabel)."""
    return (pred == y).all(dim=1) if task == "multilabel" else pred == y


def loss(logits: torch.Tensor, y: torch.Tensor, task: str, reduction: str = "mean",
         weight: torch.Tensor | None = None) -> torch.Tensor:
    """Task loss; ``weight`` is a per-class weight (single-label) or per-label positive weight
    (multilabel), as made by :func:`balancing_weights`."""
    if task == "multilabel":
        per_example = F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none",
                                                         pos_weight=weight).sum(dim=1)
        reduce: dict[str, Callable[[], torch.Tensor]] = {"mean": per_example.mean, "sum": per_example.sum,
                                                         "none": lambda: per_example}
        return reduce[reduction]()
    return F.cross_entropy(logits, y, reduction=reduction, weight=weight)


def balancing_weights(labels: torch.Tensor, task: str, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights (mean 1 over present classes), or negatives/positives per label."""
    if task == "multilabel":
        positives = labels.float().sum(dim=0)
        return ((len(labels) - positives) / positives.clamp_min(1.0)).clamp(max=100.0)
    counts = torch.bincount(labels, minlength=num_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp_min(1.0)), torch.zeros_like(counts))
    return weights

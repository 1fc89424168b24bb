"""Small shared builders for the unit tests (tiny models, hand-made data). Not a conftest: import
what you need with ``from helpers import ...``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bench.data.base import DatasetSpec, Split
from bench.defenses.base import Defense
from bench.models.defended import DefendedModel

SYNTHETIC_MEAN = (0.5,)
SYNTHETIC_STD = (0.25,)
SYNTHETIC_SHAPE = (1, 8, 8)
SYNTHETIC_CLASSES = 4


def linear_model(seed: int = 0) -> DefendedModel:
    """A DefendedModel around Flatten + Linear, sized for the synthetic dataset (1x8x8, 4 classes)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, SYNTHETIC_CLASSES))
    return DefendedModel(net, SYNTHETIC_MEAN, SYNTHETIC_STD, SYNTHETIC_SHAPE, SYNTHETIC_CLASSES)


def train_full_batch(model: nn.Module, split: Split, steps: int = 100, lr: float = 0.05) -> nn.Module:
    """Full-batch Adam on ``split``; leaves the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(split.images), split.labels).backward()
        opt.step()
    return model.eval()


class NearestPrototype(nn.Module):
    """A parameter-free classifier: logits are minus the L2 distance to fixed prototypes (buffers)."""

    def __init__(self, prototypes: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("prototypes", prototypes.flatten(1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(x.flatten(1), self.prototypes)


def prototype_model(split: Split) -> DefendedModel:
    """A parameter-free DefendedModel: class means of ``split`` as prototypes (in pixel space,
    so the normalization is the identity)."""
    protos = torch.stack([split.images[split.labels == c].mean(0) for c in range(SYNTHETIC_CLASSES)])
    return DefendedModel(NearestPrototype(protos), (0.0,), (1.0,), SYNTHETIC_SHAPE, SYNTHETIC_CLASSES)


class ModeRecorder(nn.Module):
    """Identity layer that records ``self.training`` on every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return x


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def assert_cli_user_error(result: Any, *fragments: str) -> str:
    """A CLI user error: exit status 2, one line on stderr starting "error: ", no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in err, err
    return err


def built_as(model_type: type[DefendedModel], defense: Defense, spec: DatasetSpec, image_size: int,
             **hparams: Any) -> Any:
    """The model :meth:`Defense.build` makes for ``defense``, rebuilt as ``model_type`` around the same
    network (for test-only defenses that change what the model does around its network)."""
    net = Defense.build(defense, spec, image_size, **hparams).net
    return model_type(net, spec.mean, spec.std, spec.shape(image_size), spec.num_classes, spec.task)

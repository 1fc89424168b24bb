"""The Lipschitz audit away from the data: false bounds whose violation no example is near are caught."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from bench.certifiers.audit import audit_model, lipschitz_check
from bench.certifiers.lipschitz_audit import BoxEstimate, lipschitz_box_search, lipschitz_lower_bound

TOL = 1e-5  # float32 rounding allowance when comparing with a true constant
D = 64  # 1 x 8 x 8 images, digits-sized


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one intra-op thread (see conftest.one_thread)."""


def _rows(k: int, seed: int = 0) -> torch.Tensor:
    """k orthonormal rows in R^D, the first one (1, ..., 1) / sqrt(D)."""
    m = torch.randn(D, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    m[:, 0] = 1.0
    q, r = torch.linalg.qr(m)
    return (q * torch.sign(torch.diagonal(r)))[:, :k].T.float()


class Ramp(nn.Module):
    """``f(x) = W x + 4.12 relu(<u, x> - t) e_1``, declared 1-Lipschitz; the true constant is 5.12.

    W has orthonormal rows (spectral norm 1) and u is its first row, the mean direction
    (1, ..., 1) / sqrt(D). Below the threshold (pixel mean < ``level``) the Jacobian is W; above it,
    W with its first row scaled by 5.12, whose spectral norm is 5.12. Continuous and piecewise
    linear, so 5.12 is the global constant, reached only where the pixel mean exceeds ``level``.
    """

    lipschitz_bound = 1.0
    lipschitz_guarantee = "false on purpose (test)"

    def __init__(self, level: float, classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("weight", _rows(classes))
        self.threshold = level * math.sqrt(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        z = h @ self.weight.T
        bump = 4.12 * torch.relu(h @ self.weight[0] - self.threshold)
        return torch.cat([z[:, :1] + bump[:, None], z[:, 1:]], dim=1)


def _dark_images(n: int = 32) -> torch.Tensor:
    """Pixels uniform in [0, 0.5]: pixel means ~0.25 +- 0.02, far below the ramps' levels."""
    return 0.5 * torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_a_false_bound_violated_only_away_from_the_data_is_caught():
    model, x = Ramp(level=0.4), _dark_images()
    assert float(x.flatten(1).mean(1).max()) < 0.4  # no example is in the steep region
    near = lipschitz_lower_bound(model, x)
    assert near.value <= 1.0 * (1 + TOL)  # the near-data search alone finds no evidence
    old = lipschitz_check(model, x, list(range(len(x))), box_points=0)  # the audit as it was
    assert old is not None and not old.triggered
    box = lipschitz_box_search(model, (1, 8, 8))
    assert isinstance(box, BoxEstimate) and box.value == max(box.jacobian, box.pairs, box.far)
    assert 5.0 < box.value <= 5.12 * (1 + TOL)  # random points of the box lie in the steep region
    check = lipschitz_check(model, x, list(range(len(x))))
    assert check is not None and check.triggered and check.detail.startswith("unsound:")
    assert "random point of the box" in check.detail and "declared L = 1" in check.detail
    (via_audit,) = audit_model(model, x, None, None)
    assert via_audit.name == "lipschitz_audit" and via_audit.triggered


def test_far_pairs_catch_a_steep_region_that_random_points_miss():
    model = Ramp(level=0.8)  # the steep region: pixel mean > 0.8, 8 standard deviations above a uniform point's
    box = lipschitz_box_search(model, (1, 8, 8))
    assert box.jacobian <= 1.0 * (1 + TOL) and box.pairs <= 1.0 * (1 + TOL)
    # the pair (all black, all white) alone reaches 1 + 4.12 * 0.2 = 1.824; ascent on the pairs goes further
    start = lipschitz_box_search(model, (1, 8, 8), points=1, power_iters=0, pair_steps=0)
    assert start.far == pytest.approx(1.824, rel=1e-5)
    assert start.far < box.far <= 5.12 * (1 + TOL)  # measured 2.94


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def test_a_true_bound_is_never_exceeded():
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten()]
    for k in range(3):  # orthogonal layers and ReLUs: 1-Lipschitz
        layer = nn.Linear(D, D)
        with torch.no_grad():
            layer.weight.copy_(_orthogonal(D, seed=10 + k))
        layers += [layer, nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    box = lipschitz_box_search(model, (1, 8, 8), points=16, power_iters=10, pair_steps=20)
    assert 0.5 < box.value <= 1.0 * (1 + TOL)
    assert max(box.jacobian, box.pairs, box.far) <= 1.0 * (1 + TOL)
    ramp = lipschitz_box_search(Ramp(level=0.4), (1, 8, 8), points=16, power_iters=10, pair_steps=20)
    assert ramp.value <= 5.12 * (1 + TOL)


def test_budget_counts_reproducibility_and_modes():
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 4), nn.Dropout(0.5)).train()
    first = lipschitz_box_search(model, (1, 8, 8), points=3, power_iters=2, pair_steps=4, seed=7)
    assert first.evaluations == 3 * (2 + 1) + 6 * 3 * (4 + 1)
    assert lipschitz_box_search(model, (1, 8, 8), points=3, power_iters=2, pair_steps=4, seed=7) == first
    assert model.training and model[2].training  # modes restored
    assert lipschitz_box_search(model, (1, 8, 8), points=0) == BoxEstimate(0.0, 0.0, 0.0, 0.0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        lipschitz_box_search(model, (1, 8, 8), points=-1)


class RandomRotation(nn.Module):
    """A fresh random rotation of the input before a head of spectral norm 2, unless frozen."""

    randomized = True

    def __init__(self) -> None:
        super().__init__()
        self.frozen: torch.Tensor | None = None
        self.draws = 0
        head = torch.zeros(3, D)
        head[0, 0], head[1, 1], head[2, 2] = 2.0, 1.0, 0.5
        self.register_buffer("head", head)

    def rotation(self) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen
        self.draws += 1
        return _orthogonal(D, seed=1000 + self.draws)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.rotation().T @ self.head.T


class FreezableRotation(RandomRotation):
    @contextmanager
    def freeze_randomness(self):
        self.draws += 1
        self.frozen = _orthogonal(D, seed=1000 + self.draws)
        try:
            yield
        finally:
            self.frozen = None


def test_randomized_models_are_searched_within_one_draw():
    box = lipschitz_box_search(FreezableRotation(), (1, 8, 8), points=8, power_iters=10, pair_steps=10)
    assert 1.9 < box.value <= 2.0 * (1 + TOL)
    with pytest.raises(ValueError, match="freeze_randomness"):
        lipschitz_box_search(RandomRotation(), (1, 8, 8), points=2)

"""The Lipschitz audit finds achieved ratios: close to the true constant, never above it."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

from bench.certifiers.lipschitz_audit import LipschitzEstimate, lipschitz_lower_bound

TOL = 1e-5  # float32 rounding allowance when comparing with a true constant


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one intra-op thread (see conftest.one_thread)."""


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def _linear(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def _spectral(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.detach().double(), 2))


def _images(n: int, shape=(1, 4, 4), seed: int = 0) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def _with_singular_values(s: list[float], rows: int, cols: int, seed: int) -> torch.Tensor:
    u, v = _orthogonal(rows, seed), _orthogonal(cols, seed + 1)
    return u[:, : len(s)] @ torch.diag(torch.tensor(s)) @ v[: len(s)]


def test_linear_layer_with_known_spectral_norm():
    weight = _with_singular_values([3.0, 2.0, 1.5, 1.0, 0.5, 0.1], 10, 16, seed=1)
    model = nn.Sequential(nn.Flatten(), _linear(weight))
    true = _spectral(model[1].weight)
    assert abs(true - 3.0) < 1e-5
    est = lipschitz_lower_bound(model, _images(8))
    assert isinstance(est, LipschitzEstimate)
    assert abs(est.value - 3.0) <= 0.02 * 3.0
    assert est.value <= 3.0 * (1 + TOL) and est.value <= true * (1 + TOL)
    assert est.pairs <= true * (1 + TOL) and est.jacobian <= true * (1 + TOL)
    assert est.pairs > 2.9  # the pair search, started along the top direction, also gets there
    assert est.value == max(est.jacobian, est.pairs) and est.where in range(8)


def test_pair_ascent_alone_approaches_the_constant_and_stays_below_it():
    weight = _with_singular_values([3.0, 2.0, 1.5, 1.0, 0.5, 0.1], 10, 16, seed=1)
    model = nn.Sequential(nn.Flatten(), _linear(weight))
    est = lipschitz_lower_bound(model, _images(8), power_iters=0)
    assert est.jacobian == 0.0
    assert 2.7 < est.pairs <= 3.0 * (1 + TOL)


def test_one_lipschitz_model_is_never_overestimated():
    model = nn.Sequential(nn.Flatten(), _linear(_orthogonal(16, seed=3)))
    for seed in range(3):
        est = lipschitz_lower_bound(model, _images(8, seed=seed), seed=seed)
        assert 0.95 <= est.value <= 1 + TOL
        assert est.pairs <= 1 + TOL


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def test_relu_mlp_between_local_jacobian_norms_and_product_of_layer_norms():
    model = _mlp()
    x = _images(6, shape=(3, 4, 4))
    est = lipschitz_lower_bound(model, x)
    exact = []
    for xi in x:  # the exact local spectral norms at the data points, from full Jacobians
        jac = torch.autograd.functional.jacobian(model, xi[None]).reshape(5, -1)
        exact.append(_spectral(jac))
    assert est.jacobian >= max(exact) * (1 - 1e-3)  # power iteration converged at the data points
    assert est.jacobian <= max(exact) * (1 + TOL)  # and reports an achieved ||J v||, no more
    assert est.value >= est.jacobian and est.value >= est.pairs
    upper = 1.0
    for layer in model:
        if isinstance(layer, nn.Linear):
            upper *= _spectral(layer.weight)
    assert est.value <= upper


def test_planted_false_declaration_is_caught():
    class Planted(nn.Module):
        lipschitz_bound = 1.0  # declared, but false: the second layer multiplies by 5

        def __init__(self):
            super().__init__()
            self.first = _linear(_orthogonal(16, seed=5))
            self.second = _linear(5.0 * _orthogonal(16, seed=6)[:10])

        def forward(self, x):
            return self.second(self.first(x.flatten(1)))

    model = Planted()
    est = lipschitz_lower_bound(model, _images(4))
    assert est.value > 1.5 * model.lipschitz_bound  # clearly above the declaration
    assert est.value == pytest.approx(5.0, rel=1e-3)


class RandomRotation(nn.Module):
    """A fresh random orthogonal rotation of the flattened input at every forward pass, unless frozen."""

    randomized = True

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.frozen: torch.Tensor | None = None
        self.draws = 0

    def draw(self) -> torch.Tensor:
        self.draws += 1
        return _orthogonal(self.dim, seed=1000 + self.draws)

    def forward(self, x):
        q = self.frozen if self.frozen is not None else self.draw()
        return x.flatten(1) @ q.T


class RotatedLinear(nn.Module):
    randomized = True

    def __init__(self, norm: float = 2.0):
        super().__init__()
        self.rotation = RandomRotation(16)
        self.head = _linear(_with_singular_values([norm, 1.0, 0.5], 6, 16, seed=7))

    def forward(self, x):
        return self.head(self.rotation(x))


class FreezableRotatedLinear(RotatedLinear):
    entered = 0

    @contextmanager
    def freeze_randomness(self):
        self.entered += 1
        self.rotation.frozen = self.rotation.draw()
        try:
            yield
        finally:
            self.rotation.frozen = None


def test_randomized_model_uses_one_frozen_draw_per_ratio():
    model = FreezableRotatedLinear()
    assert model.rotation(torch.ones(1, 16)).ne(model.rotation(torch.ones(1, 16))).any()  # really random
    est = lipschitz_lower_bound(model, _images(4), power_iters=10, pair_steps=10, randomized=True)
    assert model.entered >= 10  # one context per power iteration, one per pair step, ...
    assert 1.9 <= est.value <= 2.0 * (1 + TOL)
    assert est.pairs <= 2.0 * (1 + TOL)


def test_randomized_model_without_freeze_randomness_is_refused():
    model = RotatedLinear()
    with pytest.raises(ValueError, match="freeze_randomness"):
        lipschitz_lower_bound(model, _images(2), randomized=True)
    with pytest.raises(ValueError, match="freeze_randomness"):  # the model's own declaration counts
        lipschitz_lower_bound(model, _images(2))


def test_freeze_randomness_that_does_not_fix_the_draw_is_refused():
    class Leaky(RotatedLinear):
        @contextmanager
        def freeze_randomness(self):
            yield  # every forward pass still draws afresh

    with pytest.raises(ValueError, match="does not fix one draw"):
        lipschitz_lower_bound(Leaky(), _images(2), randomized=True)


class PerExampleNoise(nn.Module):
    """Independent input noise per example; frozen draws are keyed by batch shape.

    A ratio mixing two draws would be ~||W (a - b + n1 - n2)|| / ||a - b||, far above ||W||
    for noise much larger than the pair separation.
    """

    randomized = True

    def __init__(self):
        super().__init__()
        self.head = _linear(_with_singular_values([2.0, 1.0], 4, 16, seed=9))
        self.frozen: dict[tuple[int, ...], torch.Tensor] | None = None

    def forward(self, x):
        if self.frozen is None:
            noise = 0.3 * torch.randn_like(x)
        else:
            noise = self.frozen.setdefault(tuple(x.shape), 0.3 * torch.randn(x.shape))
        return self.head((x + noise).flatten(1))

    @contextmanager
    def freeze_randomness(self):
        self.frozen = {}
        try:
            yield
        finally:
            self.frozen = None


def test_per_example_noise_is_not_mixed_across_draws():
    est = lipschitz_lower_bound(PerExampleNoise(), _images(4), power_iters=5, pair_steps=10, randomized=True)
    assert 1.9 <= est.value <= 2.0 * (1 + TOL)
    assert est.pairs <= 2.0 * (1 + TOL)


def test_reproducible_with_the_same_seed():
    model = _mlp(seed=1)
    x = _images(4, shape=(3, 4, 4))
    first = lipschitz_lower_bound(model, x, power_iters=5, pair_steps=10, seed=4)
    second = lipschitz_lower_bound(model, x, power_iters=5, pair_steps=10, seed=4)
    assert first == second
    with torch.no_grad():  # the caller's no_grad does not switch the searches off
        assert lipschitz_lower_bound(model, x, power_iters=5, pair_steps=10, seed=4) == first


def test_where_points_at_the_steepest_example_and_evaluations_are_counted():
    class Hinge(nn.Module):  # slope 3 where the pixel mean exceeds 0.5, flat elsewhere
        def forward(self, x):
            return 3.0 * torch.relu(x.flatten(1).mean(1, keepdim=True) - 0.5) * 4.0

    x = torch.full((3, 1, 4, 4), 0.2)
    x[1] = 0.8
    est = lipschitz_lower_bound(Hinge(), x, power_iters=4, pair_steps=0)
    assert est.where == 1
    assert est.value == pytest.approx(3.0, rel=1e-5) and est.value <= 3.0 * (1 + TOL)
    assert est.evaluations == 3 * (4 + 1)
    est = lipschitz_lower_bound(Hinge(), x, power_iters=2, pair_steps=3)
    assert est.evaluations == 3 * (2 + 1) + 3 * 2 * (3 + 1)


def test_flat_model_reports_nothing_and_modes_are_restored():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Dropout(0.5))
    with torch.no_grad():
        model[1].weight.zero_()
    model.train()
    model[2].eval()  # mixed modes come back as they were
    est = lipschitz_lower_bound(model, _images(2), power_iters=3, pair_steps=3)
    assert est.value == 0.0 and est.where is None
    assert model.training and model[1].training and not model[2].training

"""The Lipschitz certificate under float rounding: never above the exact radius of the exact model.

The model of the main test has an exactly tight declared bound, so the exact certified radius is
the exact distance to the decision boundary, and any float error that enlarges the computed margin
would show up as a radius above it. Exact values come from :class:`fractions.Fraction` arithmetic on
the float32 inputs and weights the model actually used.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from fractions import Fraction

import pytest
import torch
from torch import nn

from bench.certifiers.lipschitz import (
    ROUNDING,
    Lipschitz,
    certified_radius,
    float32_arithmetic,
    rounding_allowance,
)

POINTS = 10_000
HALF = (0.25, 0.375, 0.75)  # (2, 3, 6) / 8: norm 7/8 exactly; 0.375 x and 0.75 x round in float32
L_EXACT = Fraction(7, 8)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one intra-op thread (see conftest.one_thread)."""


class TwoHalves(nn.Module):
    """z_0 = w . x[:3], z_1 = w . x[3:] with w = (2, 3, 6) / 8, in float32.

    The rows of W are orthogonal with norm 7/8, so ||W||_2 = 7/8 = L exactly, and the margin map
    z_0 - z_1 = (w, -w) . x has Lipschitz constant ||(w, -w)|| = sqrt(2) * 7/8 = sqrt(2) L: the
    declared bound is exactly tight, and the exact certified radius |m| / (sqrt(2) L) is the exact
    L2 distance from x to the decision boundary {m = 0}.
    """

    lipschitz_bound = float(L_EXACT)
    lipschitz_guarantee = "orthogonal rows of norm 7/8 (test)"

    def __init__(self) -> None:
        super().__init__()
        weight = torch.zeros(2, 6)
        weight[0, :3] = torch.tensor(HALF)
        weight[1, 3:] = torch.tensor(HALF)
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


def _exact_margin(row: list[float]) -> Fraction:
    w = [Fraction(v) for v in HALF]
    xs = [Fraction(v) for v in row]
    return sum(a * b for a, b in zip(w, xs[:3])) - sum(a * b for a, b in zip(w, xs[3:]))


def _within_exact_radius(radius: float, margin: Fraction) -> bool:
    """radius <= |margin| / (sqrt(2) L), decided exactly (squares of nonnegative numbers)."""
    r = Fraction(radius)
    return r >= 0 and 2 * r * r * L_EXACT * L_EXACT <= margin * margin


def test_radii_never_exceed_the_exact_radius_when_the_bound_is_tight():
    model = TwoHalves()
    x = torch.rand(POINTS, 6, generator=torch.Generator().manual_seed(0))
    certs = Lipschitz().certify(model, x)
    logits = model(x)
    margins = [_exact_margin(row) for row in x.tolist()]
    certified = [i for i, c in enumerate(certs) if not c.abstained]
    assert len(certified) > 0.99 * POINTS  # abstains only within the allowance of a tie (measured: none)
    for i in certified:
        exact_winner = 0 if margins[i] > 0 else 1
        assert certs[i].prediction == exact_winner, i
        assert _within_exact_radius(certs[i].radius, margins[i]), i

    # The formula without the allowance, computed as before (float64 margin of the float32 logits):
    # it exceeds the exact radius at 4,999 of the 10,000 points (measured, by up to 1.5e-7), so the
    # allowance is needed.
    old = (logits[:, 0].double() - logits[:, 1].double()).abs() / (math.sqrt(2.0) * float(L_EXACT))
    too_large = sum(not _within_exact_radius(float(old[i]), margins[i]) for i in range(POINTS))
    assert too_large > 0

    # The allowance is small: the radii lose 5.5e-6 of their sum (measured; 2 rho / margin on average).
    old_sum = sum(float(old[i]) for i in certified)
    new_sum = sum(certs[i].radius for i in certified)
    assert 0 < (old_sum - new_sum) / old_sum < 1e-5


def test_certified_radius_rounds_down():
    gen = torch.Generator().manual_seed(1)
    margins = torch.exp(torch.empty(2000, dtype=torch.float64).uniform_(-20, 5, generator=gen)).tolist()
    bounds = torch.exp(torch.empty(2000, dtype=torch.float64).uniform_(-5, 5, generator=gen)).tolist()
    plain_too_large = 0
    for m, lip in zip(margins, bounds):
        # r <= m / (sqrt(2) L)  <=>  2 r^2 L^2 <= m^2, exactly
        r = Fraction(certified_radius(m, lip))
        assert 2 * r * r * Fraction(lip) ** 2 <= Fraction(m) ** 2
        plain = Fraction(m / (math.sqrt(2.0) * lip))
        plain_too_large += 2 * plain * plain * Fraction(lip) ** 2 > Fraction(m) ** 2
    assert plain_too_large > 0  # the plain float64 quotient does exceed it (measured: 323 of 2,000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_allowance_scales_with_the_logits_dtype_and_magnitude(dtype):
    logits = torch.tensor([[0.5, -3.0, 1.0], [0.0, 0.0, 0.0]], dtype=dtype)
    rho = rounding_allowance(logits)
    eps = torch.finfo(dtype).eps
    assert rho.dtype == torch.float64
    assert float(rho[0]) == pytest.approx((ROUNDING * eps + 2 * 2.0 ** -52) * 3.0, rel=1e-15)
    assert float(rho[1]) == 0.0


class Constant(nn.Module):
    lipschitz_bound = 1.0
    lipschitz_guarantee = "constant (test)"

    def __init__(self, row: list[float]) -> None:
        super().__init__()
        self.row = torch.tensor(row)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.row.expand(len(x), -1)


@pytest.mark.parametrize("row", [[float("nan"), 0.0], [float("inf"), 0.0], [1.0, 1.0],
                                 [1.0, 1.0 - ROUNDING * 2.0 ** -23]])  # margin 8 eps < 2 rho = 16 eps
def test_non_finite_logits_ties_and_margins_within_the_allowance_abstain(row):
    (cert,) = Lipschitz().certify(Constant(row), torch.zeros(1, 2))
    assert cert.abstained and cert.radius == 0.0


def test_a_margin_above_the_allowance_is_certified():
    (cert,) = Lipschitz().certify(Constant([1.0, 0.0]), torch.zeros(1, 2))
    rho = (ROUNDING * 2.0 ** -23 + 2 * 2.0 ** -52) * 1.0
    assert cert.prediction == 0 and cert.bound == pytest.approx(1.0 - 2 * rho, rel=1e-15)
    assert 0 < cert.radius < (1.0 - 2 * rho) / math.sqrt(2.0)


class ConstantDraws(Constant):
    """Declared randomized, but every draw returns the same logits: the interval is the statistical
    width plus the rounding allowance."""

    randomized = True

    @contextmanager
    def freeze_randomness(self):
        yield


def test_randomized_intervals_include_the_rounding_allowance():
    row = [3.0, 2.5, -1.0]
    certifier = Lipschitz(n=50, clip=4.0, bound="hoeffding")
    certifier.prepare(ConstantDraws(row))
    lower, upper, n = certifier._confidence_box(ConstantDraws(row), torch.zeros(2, 1))
    from bench.certifiers.stats import hoeffding_radius

    statistical = hoeffding_radius(50, 8.0, 0.001 / 6)
    rho = float(rounding_allowance(torch.tensor([row]))[0])
    half = (upper - lower) / 2
    assert n == 50 and bool((half >= statistical + rho).all())
    assert bool((half <= statistical + rho + 1e-12).all())  # and only a float64 slack beyond it
    centre = (upper + lower) / 2
    assert torch.allclose(centre, torch.tensor([row], dtype=torch.float64).expand(2, -1), rtol=0, atol=1e-12)


def test_float32_arithmetic_switches_tf32_off_and_restores_it():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
        with float32_arithmetic():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

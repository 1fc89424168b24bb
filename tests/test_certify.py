"""Certifiers: Cohen et al.'s CERTIFY/PREDICT and the Lipschitz margin certificate, on tiny
models whose behaviour is known in closed form."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from scipy.stats import norm
from torch import nn

from bench.certifiers.lipschitz import Lipschitz, rounding_allowance
from bench.certifiers.smoothing import Smoothing, certify_counts, predict, sample_counts, sequential_looks
from bench.certifiers.stats import clopper_pearson_lower
from bench.errors import BenchError
from bench.models.defended import DefendedModel
from bench.registry import CERTIFIERS


class HalfPlane(nn.Module):
    """Class 1 iff the first pixel exceeds 0.5: under N(0, s^2) noise p_A is Phi(|x0 - 0.5| / s)."""

    num_classes = 2

    def forward(self, x):
        v = x.flatten(1)[:, :1] - 0.5
        return torch.cat([-v, v], dim=1) * 100


class Coin(nn.Module):
    """Ignores its input: a uniformly random class (a constant-random classifier)."""

    num_classes = 4
    randomized = True
    randomness_per_example = True

    def forward(self, x):
        return torch.randn(len(x), 4)


def _orthogonal_model(seed=0, scale=1.0, declared=1.0):
    torch.manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    linear = nn.Linear(16, 16, bias=False)
    linear.weight.data = q * scale
    net = nn.Sequential(nn.Flatten(), linear)
    model = DefendedModel(net, (0.0,), (1.0,), (1, 4, 4), 16)
    model.lipschitz_bound = declared
    model.lipschitz_guarantee = "orthogonal weight (test)"
    return model.eval()


def test_sample_counts_match_the_noise_distribution():
    x = torch.full((3, 1, 2, 2), 0.5)
    x[0, 0, 0, 0], x[1, 0, 0, 0], x[2, 0, 0, 0] = 0.6, 0.3, 0.9
    torch.manual_seed(0)
    counts = sample_counts(HalfPlane(), x, 20_000, sigma=0.25, batch=3001)  # batches straddle examples
    assert counts.shape == (3, 2) and (counts.sum(1) == 20_000).all()
    expected = [norm.cdf(0.1 / 0.25), norm.cdf(-0.2 / 0.25), norm.cdf(0.4 / 0.25)]
    for row, p in zip(counts, expected):
        assert abs(float(row[1]) / 20_000 - p) < 0.015


def test_certify_radius_matches_cohen_and_is_monotone_in_p_a():
    x = torch.full((4, 1, 2, 2), 0.5)
    for i, v in enumerate((0.55, 0.65, 0.8, 0.95)):
        x[i, 0, 0, 0] = v
    torch.manual_seed(1)
    certs = Smoothing(sigma=0.25, n=20_000, n0=50).certify(HalfPlane(), x)
    radii = [c.radius for c in certs]
    assert all(c.prediction == 1 for c in certs)
    assert radii == sorted(radii) and radii[0] > 0
    for c in certs:  # radius = sigma * Phi^-1(p_lower) with p_lower the Clopper-Pearson bound on n_A
        assert c.radius == pytest.approx(0.25 * norm.ppf(c.bound))
        assert c.bound < c.count_a / 20_000 and c.samples == 20_050
    # the true radius of this classifier is |x0 - 0.5|; the certificate must not exceed it
    for c, v in zip(certs, (0.55, 0.65, 0.8, 0.95)):
        assert c.radius <= abs(v - 0.5) + 1e-9


def test_certify_counts_abstains_at_or_below_one_half():
    selection = torch.tensor([[10, 0], [0, 10]])
    estimation = torch.tensor([[500, 500], [0, 1000]])
    (c1, r1, n1, _), (c2, r2, n2, b2) = certify_counts(selection, estimation, 0.001, 0.5)
    assert c1 is None and r1 == 0.0 and n1 == 500
    assert c2 == 1 and n2 == 1000 and r2 == pytest.approx(0.5 * norm.ppf(0.001 ** (1 / 1000)))


def test_a_constant_random_classifier_is_never_certified():
    torch.manual_seed(2)
    x = torch.rand(6, 1, 2, 2)
    certs = Smoothing(sigma=0.5, n=2000).certify(Coin(), x)
    assert all(c.abstained and c.radius == 0.0 for c in certs)
    assert predict(Coin(), x, sigma=0.5, n=400) == [None] * 6


def test_predict_returns_the_clear_winner():
    x = torch.full((2, 1, 2, 2), 0.5)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.95, 0.05
    torch.manual_seed(3)
    assert predict(HalfPlane(), x, sigma=0.25, n=1000) == [1, 0]


def test_shared_randomness_models_get_one_sample_per_example_per_pass():
    class SharedDraw(nn.Module):
        """One random class per forward pass, shared by the whole batch."""

        num_classes = 3
        randomized = True
        passes = 0

        def forward(self, x):
            self.passes += 1
            out = torch.zeros(len(x), 3)
            out[:, int(torch.randint(3, ()))] = 1
            return out

    model = SharedDraw()
    torch.manual_seed(4)
    counts = sample_counts(model, torch.rand(5, 1, 2, 2), 300, sigma=0.1)
    assert model.passes == 300  # not 1: batching copies would make all 300 samples one draw
    assert (counts.sum(1) == 300).all() and (counts > 50).all()


def test_sequential_certification_uses_fewer_samples_and_the_same_grid_level():
    x = torch.full((3, 1, 2, 2), 0.5)
    x[0, 0, 0, 0], x[1, 0, 0, 0], x[2, 0, 0, 0] = 0.95, 0.75, 0.5
    grid = [0.0, 0.1, 0.2]
    torch.manual_seed(5)
    fixed = Smoothing(sigma=0.25, n=50_000).certify(HalfPlane(), x)
    seq = Smoothing(sigma=0.25, n=50_000, sequential=True, radii=grid).certify(HalfPlane(), x)
    assert [c.prediction for c in seq[:2]] == [1, 1] and seq[2].abstained
    for f, s in zip(fixed, seq):
        assert s.samples <= f.samples
        assert sum(s.radius >= r for r in grid) == sum(f.radius >= r for r in grid)
    assert seq[0].samples < 10_000  # p_A ~ 0.96: the top grid radius is decided early


def test_sequential_certification_stops_when_the_next_level_is_out_of_reach():
    # p_A = Phi(1.9) ~ 0.971: radius 0.1 needs Phi(0.4) ~ 0.66 (reached), 0.5 needs Phi(2) ~ 0.977: the
    # upper confidence bound stays above 0.977 for long, but at that rate the bound at n could not
    # reach it either (futility), so sampling stops long before n, at the level fixed n certifies
    x = torch.full((1, 1, 2, 2), 0.5)
    x[0, 0, 0, 0] = 0.5 + 1.9 * 0.25
    grid = [0.0, 0.1, 0.5]
    torch.manual_seed(6)
    fixed = Smoothing(sigma=0.25, n=50_000).certify(HalfPlane(), x)[0]
    seq = Smoothing(sigma=0.25, n=50_000, sequential=True, radii=grid).certify(HalfPlane(), x)[0]
    assert sum(seq.radius >= r for r in grid) == sum(fixed.radius >= r for r in grid) == 2
    assert seq.samples < 15_000, seq.samples  # measured 8,225; 31,100 when only the upper bound stopped it


def test_sequential_certificates_stop_at_the_looks_with_their_bound():
    x = torch.full((4, 1, 2, 2), 0.5)
    x[:, 0, 0, 0] = torch.tensor([0.95, 0.8, 0.6, 0.52])
    grid, n = [0.0, 0.1, 0.2, 0.4], 30_000
    certifier = Smoothing(sigma=0.25, n=n, sequential=True, radii=grid)
    described = certifier.prepare(HalfPlane())
    looks = sequential_looks(n)
    assert described["sequential_bound"] == f"clopper-pearson at {len(looks)} looks"  # resumes refuse other bounds
    assert "sequential_bound" not in Smoothing(sigma=0.25).prepare(HalfPlane())
    torch.manual_seed(8)
    for cert in certifier.certify(HalfPlane(), x):
        used = cert.samples - 100
        assert used in looks  # every stop is at a look fixed in advance
        # the reported bound is the largest of the looks' bounds at alpha / L: at least the last one's
        assert cert.bound >= clopper_pearson_lower(cert.count_a, used, 0.001 / len(looks))
        if not cert.abstained:
            assert cert.radius == pytest.approx(0.25 * norm.ppf(cert.bound))


def test_lipschitz_certificate_of_a_deterministic_model():
    model = _orthogonal_model(declared=1.0)
    x = torch.rand(5, 1, 4, 4)
    certs = Lipschitz().certify(model, x)
    logits = model(x).detach()
    for c, row, rho in zip(certs, logits, rounding_allowance(logits)):
        top2 = torch.topk(row, 2).values
        assert c.prediction == int(row.argmax())
        # the float-rounding allowance (2 rho, ~4e-6 here) comes off the margin: see bench.certifiers.lipschitz
        margin = float(top2[0] - top2[1])
        assert c.radius == pytest.approx((margin - 2 * float(rho)) / math.sqrt(2), rel=1e-12)
        assert c.radius < margin / math.sqrt(2)
    # sound: no perturbation inside the radius changes the prediction (checked along the worst direction)
    for i, c in enumerate(certs):
        row = logits[i].detach()
        a, b = torch.topk(row, 2).indices.tolist()
        direction = (model.net[1].weight[b] - model.net[1].weight[a]).detach().view(1, 1, 4, 4)
        x_adv = x[i:i + 1] + 0.999 * c.radius * direction / direction.norm()
        assert int(model(x_adv).argmax()) == a


def test_lipschitz_refuses_models_without_a_guaranteed_bound():
    model = _orthogonal_model()
    model.lipschitz_bound = None
    with pytest.raises(BenchError, match="declares no guaranteed Lipschitz bound"):
        Lipschitz().prepare(model)
    model.lipschitz_bound, model.lipschitz_guarantee = 1.0, None
    with pytest.raises(BenchError, match="not how it is guaranteed"):
        Lipschitz().prepare(model)


class RandomSign(DefendedModel):
    """Orthogonal map followed by a random permutation-free sign noise on the logits' offset:
    logits(x; w) = Qx + 0.1 w, w ~ N(0, I); 1-Lipschitz for every draw."""

    randomized = True
    lipschitz_bound = 1.0
    lipschitz_guarantee = "orthogonal layer plus input-independent noise (test)"

    def forward(self, x):
        out = super().forward(x)
        return out + 0.1 * torch.randn_like(out)

    @contextmanager
    def freeze_randomness(self):
        yield


def test_lipschitz_certificate_of_a_randomized_model_is_below_the_mean_margin():
    base = _orthogonal_model()
    model = RandomSign(base.net, (0.0,), (1.0,), (1, 4, 4), 16).eval()
    x = torch.rand(4, 1, 4, 4)
    torch.manual_seed(6)
    certs = Lipschitz(n=4000, clip=2.0, bound="hoeffding").certify(model, x)
    exact = base(x).detach()
    for c, row in zip(certs, exact):
        top2 = torch.topk(row, 2).values
        exact_radius = float(top2[0] - top2[1]) / math.sqrt(2)
        assert c.samples == 4000
        if c.prediction is not None:
            assert c.prediction == int(row.argmax()) and c.radius < exact_radius
    bern = Lipschitz(n=4000, clip=2.0, bound="bernstein").certify(model, x)
    # low-variance draws: the empirical Bernstein bound certifies larger radii than Hoeffding
    assert sum(c.radius for c in bern) > sum(c.radius for c in certs)


@pytest.mark.parametrize("params, fragment", [
    ({"n0": 0}, "n0"), ({"n": 0}, "n must"), ({"alpha": 1.0}, "alpha"), ({"alpha": 0}, "alpha"),
    ({"sigma": 0}, "sigma"), ({"sigma": -1}, "sigma"), ({"radii": [-0.1]}, "radii"), ({"bogus": 1}, "unknown"),
])
def test_smoothing_rejects_bad_parameters(params, fragment):
    with pytest.raises(BenchError, match=fragment):
        Smoothing(**params)


def test_smoothing_needs_a_sigma():
    model = _orthogonal_model()
    with pytest.raises(BenchError, match="declares no sigma"):
        Smoothing().prepare(model)
    model.sigma = 0.25
    assert Smoothing().prepare(model)["sigma"] == 0.25


def test_registry_lists_both_certifiers():
    assert {"smoothing", "lipschitz"} <= set(CERTIFIERS.names())


def test_multilabel_models_are_refused():
    model = _orthogonal_model()
    model.task = "multilabel"
    model.sigma = 0.25
    for certifier in (Smoothing(), Lipschitz()):
        with pytest.raises(BenchError, match="multilabel"):
            certifier.prepare(model)

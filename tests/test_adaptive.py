"""Adaptive attacks on planted defenses: EOT beats plain PGD on a model with input noise, BPDA
breaks a model that quantizes its input (where plain PGD stalls on zero gradients)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

from bench.attacks.wrappers import ExpectationModel
from bench.config import Norm, ThreatModel
from bench.errors import BenchError
from bench.harness.checks import check_zero_gradients
from bench.models.defended import DefendedModel
from bench.registry import ATTACKS

LINF = ThreatModel(Norm.LINF, 0.15)


@pytest.fixture(scope="module")
def base_net(data):
    train, _ = data
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    model = DefendedModel(net, (0.5,), (0.25,), (1, 8, 8), 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(train.images), train.labels).backward()
        opt.step()
    return model.eval()


class Quantized(DefendedModel):
    """Rounds its input to 4 grey levels: the gradient through the rounding is zero."""

    def forward(self, x):
        return super().forward(self.quant(x))

    def bpda_surrogates(self):
        return {"quant": nn.Identity()}


class Quantizer(nn.Module):
    def forward(self, x):
        return torch.round(x * 3) / 3


class NoisyLogits(DefendedModel):
    """Adds large random noise to its input at every forward (a randomized defense)."""

    randomized = True

    def forward(self, x):
        return super().forward(x + 0.6 * torch.randn_like(x))

    @contextmanager
    def freeze_randomness(self):
        yield


def _wrap(cls, base):
    model = cls(base.net, (0.5,), (0.25,), (1, 8, 8), 4).eval()
    if cls is Quantized:
        model.quant = Quantizer()
    return model


def accuracy(model, x, y, draws=1):
    with torch.no_grad():
        return float(sum((model(x).argmax(1) == y).float().mean() for _ in range(draws)) / draws)


def test_bpda_breaks_input_quantization_where_pgd_stalls(base_net, data):
    _, test = data
    model = _wrap(Quantized, base_net)
    x, y = test.images, test.labels
    assert check_zero_gradients(model, x, y).triggered  # the gradient-masking check fires
    clean = accuracy(model, x, y)
    pgd = ATTACKS.get("pgd")(steps=20)(model, x, y, LINF)
    bpda = ATTACKS.get("bpda")(attack="pgd", params={"steps": 20})(model, x, y, LINF)
    pgd_acc, bpda_acc = 1 - float(pgd.success.float().mean()), 1 - float(bpda.success.float().mean())
    assert clean > 0.7
    assert bpda_acc < pgd_acc - 0.2, (clean, pgd_acc, bpda_acc)
    assert isinstance(model.quant, Quantizer)  # the surrogate is removed after the attack
    assert float((bpda.x_adv - x).abs().max()) <= LINF.eps + 1e-6


def test_eot_beats_single_draw_pgd_on_a_noisy_model(base_net, data):
    _, test = data
    model = _wrap(NoisyLogits, base_net)
    x, y = test.images, test.labels
    torch.manual_seed(1)
    plain = ATTACKS.get("pgd")(steps=10)(model, x, y, LINF).x_adv
    eot = ATTACKS.get("eot")(attack="pgd", params={"steps": 10}, draws=16)(model, x, y, LINF).x_adv
    torch.manual_seed(2)  # score both with the same fresh draws, many of them
    plain_acc = accuracy(model, plain, y, draws=50)
    torch.manual_seed(2)
    eot_acc = accuracy(model, eot, y, draws=50)
    # measured gap about 0.06 (stable to +-0.005 over attack seeds); plain PGD follows one noisy draw
    assert eot_acc < plain_acc - 0.03, (plain_acc, eot_acc)
    assert float((eot - x).abs().max()) <= LINF.eps + 1e-6


def test_expectation_model_batches_draws_and_averages_probabilities(base_net):
    model = _wrap(NoisyLogits, base_net)
    x = torch.rand(5, 1, 8, 8)
    for chunk in (None, 3):
        out = ExpectationModel(model, draws=7, chunk=chunk)(x)
        assert out.shape == (5, 4)
        assert torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)  # log of a probability vector


def test_wrappers_compose_and_validate():
    eot_bpda = ATTACKS.get("eot")(attack="bpda", params={"attack": "pgd", "params": {"steps": 2}}, draws=2)
    assert eot_bpda.inner.inner.params["steps"] == 2
    with pytest.raises(BenchError):
        ATTACKS.get("eot")(draws=0)
    with pytest.raises(BenchError):
        ATTACKS.get("eot")(attack="nope")
    with pytest.raises(BenchError):
        ATTACKS.get("bpda")(params={"stpes": 3})


class SharedDraw(DefendedModel):
    """One random input shift per forward pass, shared by the whole batch (like DCS's mask);
    records the batch size of every pass."""

    randomized = True
    randomness_per_example = False

    def forward(self, x):
        self.batches.append(len(x))
        return super().forward(x + 0.3 * torch.randn(()))

    @contextmanager
    def freeze_randomness(self):
        yield


def test_eot_gives_shared_draw_models_one_draw_per_pass_and_deterministic_ones_one_draw(base_net):
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6) % 4
    shared = _wrap(SharedDraw, base_net)
    shared.batches = []
    ATTACKS.get("eot")(attack="pgd", params={"steps": 2}, draws=5)(shared, x, y, LINF)
    # K copies of the batch in one pass would share one shift: every pass must hold the batch once
    assert shared.batches and set(shared.batches) == {6}
    assert len(shared.batches) >= 5 * 2  # K = 5 separate draws per gradient step

    plain = _wrap(DefendedModel, base_net)
    torch.manual_seed(0)  # the same random start for both
    counted = ATTACKS.get("eot")(attack="pgd", params={"steps": 3}, draws=20)(plain, x, y, LINF)
    torch.manual_seed(0)
    single = ATTACKS.get("pgd")(steps=3)(plain, x, y, LINF)
    assert counted.forward_passes == single.forward_passes  # K = 1 for a deterministic model
    assert torch.equal(counted.x_adv, single.x_adv)

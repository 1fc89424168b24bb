"""R draws per example (bench.harness.draws): independent across examples and draws, and DCS's exact
enumeration of its masks.

The variance test of issue 18: the clean single-draw figure (mean over n examples of
correct_draws / R) has, when every example's R draws are independent Bernoulli(p_i) and the
examples independent, the binomial standard deviation sqrt(sum_i p_i (1 - p_i) / R) / n over
scoring seeds. A model that shares one draw across the batch, scored the old way (the whole batch
R times), correlates the examples and spreads the figure several times wider.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from bench.attacks.base import PassCounter
from bench.capabilities import capability, shares_randomness
from bench.data.base import get_dataset
from bench.errors import BenchError
from bench.harness.draws import draw_logits, enumerated_logits
from bench.models.dcs import MAX_ENUMERATED_DRAWS, DCSModel, MaskedConv2d
from bench.registry import DEFENSES

R = 10


SIGNS = torch.tensor([1.0, -1.0])


class SharedCoin(nn.Module):
    """One uniform u per forward pass, shared by the batch; input i holds p_i, and class 0 wins
    iff u < p_i (logits (p_i - u, u - p_i)), so example i (label 0) is correct with probability
    p_i in every draw."""

    randomized = True
    randomness_per_example = False

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (x - torch.rand(())) * SIGNS


class PerExampleCoin(SharedCoin):
    """The same, with an independent u for every example of a batch."""

    randomness_per_example = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (x - torch.rand(x.shape[0], 1)) * SIGNS


def single_draw_figure(logits: torch.Tensor, y: torch.Tensor) -> float:
    """mean_i correct_draws_i / R from logits (R, n, C)."""
    return float((logits.argmax(-1) == y).float().mean())


def spread(figures: list[float]) -> float:
    return float(torch.tensor(figures, dtype=torch.float64).std())


def binomial_sd(p: torch.Tensor, draws: int) -> float:
    p = p.double()
    return float((p * (1 - p)).sum().div(draws).sqrt()) / len(p)


def old_way(model: nn.Module, x: torch.Tensor, draws: int) -> torch.Tensor:
    """The scoring before issue 18: the whole batch ``draws`` times."""
    with torch.no_grad():
        return torch.stack([model(x) for _ in range(draws)])


# -- the synthetic model with one draw per pass ---------------------------------------------------
def test_per_example_draws_have_the_binomial_spread_and_the_old_batched_draws_do_not(one_thread) -> None:
    n, seeds = 100, 200
    p = torch.linspace(0.2, 0.95, n)
    x, y = p[:, None], torch.zeros(n, dtype=torch.long)
    model = SharedCoin()
    new, old = [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        new.append(single_draw_figure(draw_logits(model, x, R), y))
        torch.manual_seed(seed)
        old.append(single_draw_figure(old_way(model, x, R), y))
    expected = binomial_sd(p, R)
    assert 1 / 1.5 < spread(new) / expected < 1.5, (spread(new), expected)
    assert spread(old) / expected > 3, (spread(old), expected)  # shared draws: several times wider
    # both are unbiased for the mean of p: only the spread differs
    assert abs(sum(new) / seeds - float(p.mean())) < 4 * expected / math.sqrt(seeds)


def test_layout_and_pass_count_follow_the_declared_randomness() -> None:
    x = torch.rand(7, 1)
    shared, per_example = SharedCoin(), PerExampleCoin()
    assert shares_randomness(shared) and not shares_randomness(per_example)
    for model in (shared, per_example):
        logits = draw_logits(model, x, 3)
        assert logits.shape == (3, 7, 2) and not logits.requires_grad
    assert (shared.calls, per_example.calls) == (21, 3)
    # every (draw, example) of the shared model comes from its own pass: all 21 draws of u differ
    u = x[None, :, 0] - draw_logits(shared, x, 3)[..., 0]
    assert len(set(u.flatten().tolist())) == 21
    deterministic = nn.Linear(1, 2)
    assert torch.equal(draw_logits(deterministic, x, 2)[1], deterministic(x).detach())
    with pytest.raises(BenchError, match="draws"):
        draw_logits(shared, x, 0)


def test_enumeration_needs_a_declared_draw_space_with_the_declared_size() -> None:
    with pytest.raises(BenchError, match="draw_space"):
        enumerated_logits(SharedCoin(), torch.rand(2, 1))

    class Coins(SharedCoin):
        draw_space = 3

        def enumerate_draws(self):
            yield from range(2)  # one short of the declaration

    with pytest.raises(BenchError, match="gave 2 draws"):
        enumerated_logits(Coins(), torch.rand(2, 1))


# -- DCS on digits ----------------------------------------------------------------------------------
def digits_dcs() -> DCSModel:
    """An untrained digits DCS net (built through the registry) whose BatchNorm statistics are
    calibrated on training images (no gradient step), so that its predictions depend on the mask;
    with the initial statistics every mask gives the same class."""
    spec = get_dataset("digits").spec
    defense = DEFENSES.get("dcs")()
    torch.manual_seed(0)
    model = defense.build(spec, spec.image_size, **defense.resolve_hparams({}, spec.image_size, "cpu"))
    assert isinstance(model, DCSModel)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average
    images = get_dataset("digits").load("train").images[:1024]
    model.train()
    with torch.no_grad():
        for batch in images.split(128):
            model(batch)
    return model.eval()


@pytest.fixture(scope="module")
def dcs_digits():
    """The model, 50 test images, their logits under each of the 300 masks, and as labels the
    class each image gets from most masks (an untrained net's accuracy on the true labels is
    chance; what matters here is that correctness depends on the mask: 0 < p_i < 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = digits_dcs()
    x = get_dataset("digits").load("test").images[:50]
    logits = enumerated_logits(model, x)
    torch.set_num_threads(threads)
    return model, x, logits.argmax(-1).mode(dim=0).values, logits


def test_draw_space_of_the_digits_net_is_one_5x5_conv_with_2_taps(dcs_digits) -> None:
    model = dcs_digits[0]
    (conv,) = model.masked_convs()
    assert (conv.size, conv.taps) == (5, 2)
    assert capability(model, "draw_space") == math.comb(25, 2) == 300
    assert capability(PassCounter(model), "draw_space") == 300


def test_draw_space_is_the_product_over_masked_convs_up_to_the_cap() -> None:
    def model(convs: int) -> DCSModel:
        net = nn.Sequential(*(MaskedConv2d(1, 1, kernel_size=5, taps=2) for _ in range(convs)), nn.Flatten())
        return DCSModel(net, (0.0,), (1.0,), (1, 1, 1), 1)

    assert capability(model(2), "draw_space") == 300 * 300 <= MAX_ENUMERATED_DRAWS
    too_many = model(3)
    assert capability(too_many, "draw_space") is None  # 27 million mask combinations
    with pytest.raises(BenchError, match="limited to 100,000"):
        next(iter(too_many.enumerate_draws()))
    assert all(not m.frozen for m in too_many.masked_convs())  # refused before fixing anything


def test_enumeration_fixes_each_of_the_300_masks_once(dcs_digits, one_thread) -> None:
    model, x, _, logits = dcs_digits
    (conv,) = model.masked_convs()
    seen = []
    for (positions,) in model.enumerate_draws():
        assert conv.frozen and torch.equal(torch.nonzero(conv.mask.flatten()).flatten(), torch.tensor(positions))
        seen.append(positions)
    assert len(set(seen)) == len(seen) == 300 and set(seen) == set(itertools.combinations(range(25), 2))
    assert logits.shape == (300, 50, 10)
    assert len({tuple(row.flatten().tolist()) for row in logits}) == 300  # 300 different networks
    with torch.no_grad(), model.freeze_randomness():  # a sampled mask's logits are its enumerated row
        for _ in range(3):
            (mask,) = model.resample_masks()
            row = seen.index(tuple(torch.nonzero(mask.flatten()).flatten().tolist()))
            assert torch.allclose(model(x), logits[row], atol=1e-5)


def test_enumeration_restores_the_masks_and_draws_no_random_numbers(dcs_digits, one_thread) -> None:
    model, x = dcs_digits[0], dcs_digits[1][:4]
    (conv,) = model.masked_convs()
    with model.freeze_randomness():
        frozen_mask = conv.mask.clone()
        rng = torch.get_rng_state()
        enumerated_logits(model, x)
        assert torch.equal(torch.get_rng_state(), rng)
        assert conv.frozen and torch.equal(conv.mask, frozen_mask)
        with torch.no_grad():
            assert torch.equal(model(x), model(x))
        draws = model.enumerate_draws()  # closed early
        next(draws), next(draws)
        draws.close()
        assert conv.frozen and torch.equal(conv.mask, frozen_mask)
        with pytest.raises(RuntimeError, match="inside"):  # the caller fails while a mask is fixed
            for _ in model.enumerate_draws():
                raise RuntimeError("inside")
        assert conv.frozen and torch.equal(conv.mask, frozen_mask)
    assert not conv.frozen
    used = []
    hook = conv.register_forward_hook(lambda m, i, o: used.append(tuple(m.positions())))
    with torch.no_grad():
        for _ in range(6):
            model(x)
    hook.remove()
    assert len(set(used)) > 1  # free draws again after the enumeration


DCS_R, DCS_SEEDS = 5, 32  # 50 examples: 8,000 forward passes of batch 1 in all


@pytest.fixture(scope="module")
def dcs_sampled(dcs_digits):
    """p_i by enumeration; per-example scoring (draw_logits) of the 50 examples and the old way
    (the whole batch R times) under 32 seeds, R = 5: correctness (seeds, R, n) each; and the
    single-draw figure of each of the 300 masks. Fewer draws than the protocol's 10 keep it
    quick; the formulas hold for any R."""
    model, x, y, logits = dcs_digits
    p = (logits.argmax(-1) == y).float().mean(0)
    assert int(((p > 0) & (p < 1)).sum()) >= 40, "correctness hardly depends on the mask"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    correct, batched = [], []
    for seed in range(DCS_SEEDS):
        torch.manual_seed(seed)
        correct.append((draw_logits(model, x, DCS_R).argmax(-1) == y).float())
        torch.manual_seed(seed)
        batched.append((old_way(model, x, DCS_R).argmax(-1) == y).float())
    torch.set_num_threads(threads)
    return p, torch.stack(correct), torch.stack(batched), (logits.argmax(-1) == y).float().mean(1)


def test_dcs_per_example_draws_have_the_binomial_spread_and_batched_draws_the_spread_of_one_mask(
        dcs_sampled) -> None:
    p, correct, batched, per_mask = dcs_sampled
    expected = binomial_sd(p, DCS_R)
    measured = spread(correct.mean(dim=(1, 2)).tolist())
    assert 1 / 1.5 < measured / expected < 1.5, (measured, expected)
    # the old way: the figure is the mean over R masks of the per-mask figure (exact, by enumeration)
    one_mask = float(per_mask.double().var(unbiased=False).div(DCS_R).sqrt())
    old = spread(batched.mean(dim=(1, 2)).tolist())
    assert 1 / 1.5 < old / one_mask < 1.5, (old, one_mask)
    assert old / expected > 2, (old, expected)  # one mask per batch correlates the examples


def test_the_enumerated_mean_is_the_limit_of_sampling(dcs_sampled) -> None:
    p, correct = dcs_sampled[:2]
    draws = correct.shape[0] * correct.shape[1]  # 160 independent draws per example
    sampled = correct.mean(dim=(0, 1))
    overall_se = float((p * (1 - p)).sum().div(draws).sqrt()) / len(p)
    assert abs(float(sampled.mean() - p.mean())) < 4 * overall_se
    assert torch.allclose(sampled, p, atol=0.2)  # per example: 160 draws, standard error <= 0.04

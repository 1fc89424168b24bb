"""The smoothing sampler's fast path: in-place noise with each row's example added by segment,
and a deterministic model compiled with torch.compile, checked against the eager model."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from bench.certifiers.smoothing import Smoothing, sample_counts
from bench.errors import BenchError
from bench.models import compiled
from bench.models.compiled import CompileCache, agree, check_policy, wants_compile


class MeanLevel(nn.Module):
    """Class = round(4 * mean pixel): with sigma = 0 every sample of an example votes one class."""

    num_classes = 5

    def forward(self, x):
        level = (x.flatten(1).mean(1) * 4).round().clamp(0, 4).long()
        return nn.functional.one_hot(level, 5).float() * 10


class SmallNet(nn.Module):
    num_classes = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))

    def forward(self, x):
        return self.net(x)


def test_every_sample_row_gets_its_own_example():
    # sigma 0 isolates the layout: rows are example-major, batches of 7 straddle examples
    x = torch.stack([torch.full((1, 2, 2), v) for v in (0.0, 0.25, 0.5, 0.75, 1.0, 0.5)])
    counts = sample_counts(MeanLevel(), x, 11, sigma=0.0, batch=7, compile=False)
    assert counts.tolist() == [[11 if c == k else 0 for c in range(5)] for k in (0, 1, 2, 3, 4, 2)]


def test_policy_values():
    assert check_policy("auto", "x") == "auto" and check_policy("TRUE", "x") is True
    assert check_policy(False, "x") is False and check_policy(0, "x") is False  # JSON's 0/1 are false/true
    for bad in ("maybe", 2, None):
        with pytest.raises(BenchError, match="compile must be auto, true or false"):
            check_policy(bad, "smoothing")
    with pytest.raises(BenchError, match="compile must be"):
        Smoothing(sigma=0.25, compile="sometimes").validate()


def test_only_large_cpu_calls_of_deterministic_models_compile_by_default():
    cpu = torch.device("cpu")
    model = SmallNet()
    assert not wants_compile(model, cpu, compiled.COMPILE_MIN_SAMPLES - 1, "auto")
    assert wants_compile(model, cpu, compiled.COMPILE_MIN_SAMPLES, "auto")
    assert not wants_compile(model, cpu, 10 ** 9, False)
    assert wants_compile(model, cpu, 1, True)
    model.randomized = True  # its randomness must stay the eager model's: never compiled
    assert not wants_compile(model, cpu, 10 ** 9, True)


def test_agree_tolerates_float_ties_but_not_a_changed_decision():
    want = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0 + 1e-7, 0.0]])
    assert agree(want + 1e-6, want)
    flipped = want.clone()
    flipped[1] = torch.tensor([1.0 + 1e-7, 1.0, 0.0])  # a float tie may break the other way
    assert agree(flipped, want)
    wrong = want.clone()
    wrong[0] = torch.tensor([1.0, 2.0, 0.0])
    assert not agree(wrong, want)
    assert not agree(want * float("nan"), want)
    assert not agree(want[:1], want)


def _counts(model, compile_policy):
    torch.manual_seed(7)
    x = torch.rand(3, 1, 4, 4)
    return sample_counts(model, x, 1001, sigma=0.3, batch=256, compile=compile_policy)  # 3003 rows: a padded last pass


def test_a_failing_compile_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nlong trace")

    monkeypatch.setattr(torch, "compile", broken)
    model = SmallNet().eval()
    with caplog.at_level(logging.WARNING, logger="bench.models.compiled"):
        counts = _counts(model, True)
    assert "torch.compile failed (RuntimeError: no C++ compiler found)" in caplog.text
    assert torch.equal(counts, _counts(model, False))


def test_a_compiled_model_that_disagrees_is_not_used(monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: (lambda x: -model(x)))
    model = SmallNet().eval()
    with caplog.at_level(logging.WARNING, logger="bench.models.compiled"):
        counts = _counts(model, True)
    assert "disagreed with the eager model" in caplog.text
    cache = CompileCache()
    assert cache.forward_for(model, torch.rand(256, 1, 4, 4)) is None
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: pytest.fail("compiled twice"))
    assert cache.forward_for(model, torch.rand(256, 1, 4, 4)) is None  # remembered: not compiled again
    assert torch.equal(counts, _counts(model, False))


def test_the_compiled_sampler_counts_like_the_eager_one(caplog):
    model = SmallNet().eval()
    with caplog.at_level(logging.INFO, logger="bench.models.compiled"):
        fast = _counts(model, True)
    if "torch.compile failed" in caplog.text:  # e.g. no C++ compiler on this machine
        pytest.skip(caplog.text.strip().splitlines()[-1])
    assert "compiled the model for sampling" in caplog.text
    assert fast.sum(1).tolist() == [1001] * 3  # the padded rows of the last pass are not counted
    # the same noise from the same seed; float reassociation may flip at most a near-tie vote
    assert int((fast - _counts(model, False)).abs().sum()) <= 2

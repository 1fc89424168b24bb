"""The packed sampler: fixed-width passes, refill as rounds end, per-example noise streams."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import norm
from torch import nn

from bench.certifiers.sampler import PackedSampler, example_seed
from bench.certifiers.smoothing import (
    SHARED_WINDOW,
    STREAM_WINDOW,
    WINDOW,
    Smoothing,
    certify_window,
    sample_counts,
)


class HalfPlane(nn.Module):
    """Class 1 where the first pixel exceeds 0.5: P[class 1] = Phi((x0 - 0.5) / sigma)."""

    num_classes = 2

    def forward(self, x):
        first = x.flatten(1)[:, 0]
        return torch.stack([0.5 - first, first - 0.5], dim=1)


class Recorder(nn.Module):
    """A deterministic model that records the width of every pass and each row's first pixel."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.widths: list[int] = []

    def forward(self, x):
        self.widths.append(len(x))
        return HalfPlane()(x)


class SharedDraw(nn.Module):
    """One random class per pass, shared by the batch (like DCS's masks)."""

    num_classes = 3
    randomized = True

    def __init__(self):
        super().__init__()
        self.widths: list[int] = []

    def forward(self, x):
        self.widths.append(len(x))
        out = torch.zeros(len(x), 3)
        out[:, int(torch.randint(3, ()))] = 1
        return out


def _examples(values):
    x = torch.full((len(values), 1, 2, 2), 0.5)
    x[:, 0, 0, 0] = torch.tensor(values)
    return x


def _rounds(model, x, plan, width, seeds):
    """Run ``plan[i]`` (the round sizes of example i) and return each example's votes per round."""
    got: dict[int, list[list[int]]] = {i: [] for i in range(len(x))}

    def after(i, votes):
        got[i].append(votes.tolist())
        return plan[i][len(got[i])] if len(got[i]) < len(plan[i]) else 0

    sampler = PackedSampler(model, x, 0.25, width=width, seeds=seeds, compile=False)
    stats = sampler.run(lambda i: plan[i][0], after)
    return got, stats


def test_votes_of_a_deterministic_model_do_not_depend_on_the_packing():
    x = _examples([0.45, 0.5, 0.55, 0.6, 0.4])
    plan = [[100, 700], [33], [250, 250, 999], [1], [512, 3]]
    seeds = [example_seed(11, j) for j in range(len(x))]
    packed, _ = _rounds(HalfPlane(), x, plan, 64, seeds)
    wide, _ = _rounds(HalfPlane(), x, plan, 4096, seeds)
    for j in range(len(x)):  # each example alone, its rounds through passes of 7 rows
        alone, _ = _rounds(HalfPlane(), x[j:j + 1], [plan[j]], 7, seeds[j:j + 1])
        assert packed[j] == wide[j] == alone[0]
        assert [sum(r) for r in packed[j]] == plan[j]  # every round got exactly the samples it asked for


def test_passes_stay_full_while_rounds_remain_and_refill_from_the_queue():
    model = Recorder()
    x = _examples([0.5] * 20)
    # 20 examples: rounds of 300 then 50; the queue refills the rows of finished examples
    got, stats = _rounds(model, x, [[300, 50]] * 20, 256, [example_seed(3, j) for j in range(20)])
    assert stats.counted == 20 * 350 and all(sum(map(sum, g)) == 350 for g in got.values())
    # every pass is full until the queue is empty; then the last rounds of 50 can start only when
    # the rounds of 300 before them end: only the last two passes are thin
    assert len(model.widths) == stats.passes == -(-20 * 350 // 256)
    assert all(w == 256 for w in model.widths[:-2]) and stats.fill > 0.95


def test_a_shared_randomness_model_gets_one_row_per_example_per_pass():
    model = SharedDraw()
    x = torch.rand(40, 1, 2, 2)
    torch.manual_seed(4)
    votes = sample_counts(model, x, 30, sigma=0.1, batch=16)
    assert (votes.sum(1) == 30).all()
    # 40 examples x 30 samples, one row each per pass: 16 examples in flight while the queue lasts
    assert model.widths == [16] * 60 + [8] * 30
    # one draw per pass is shared by the pass's rows, so its examples vote alike in that pass, but
    # every example sees 30 different passes: its votes spread over the three classes
    assert (votes > 0).sum(1).float().mean() > 2.5


def test_sampled_votes_follow_the_noise_distribution_per_example():
    x = _examples([0.6, 0.3, 0.9])
    torch.manual_seed(0)
    counts = sample_counts(HalfPlane(), x, 20_000, sigma=0.25, batch=700)
    for row, v in zip(counts, (0.6, 0.3, 0.9)):
        assert abs(float(row[1]) / 20_000 - norm.cdf((v - 0.5) / 0.25)) < 0.015


def test_streams_of_different_examples_are_different():
    x = _examples([0.5, 0.5])
    got, _ = _rounds(HalfPlane(), x, [[2000], [2000]], 512, [example_seed(5, 0), example_seed(5, 1)])
    assert got[0] != got[1]  # the same input, independent noise: (almost surely) different votes
    assert len({example_seed(0, j) for j in range(10_000)}) == 10_000


def test_a_seeded_caller_gets_the_same_certificates_and_rounds_are_per_example():
    x = _examples([0.95, 0.75, 0.5, 0.62])
    grid = [0.0, 0.1, 0.2]

    def certify(window):
        torch.manual_seed(9)
        return Smoothing(sigma=0.25, n=20_000, sequential=True, radii=grid, batch=window).certify(HalfPlane(), x)

    narrow, wide = certify(128), certify(8192)
    assert [(c.prediction, c.radius, c.samples, c.count_a) for c in narrow] == \
        [(c.prediction, c.radius, c.samples, c.count_a) for c in wide]
    assert narrow[0].samples < narrow[2].samples  # a clear example stops long before a borderline one


def test_the_certification_window_follows_the_model_randomness():
    class PerExample(HalfPlane):
        randomized = True
        randomness_per_example = True

    assert certify_window(HalfPlane()) == STREAM_WINDOW
    assert certify_window(PerExample()) == WINDOW
    assert certify_window(SharedDraw()) == SHARED_WINDOW
    described = Smoothing(sigma=0.25).prepare(SharedDraw())
    assert described["window"] == SHARED_WINDOW and described["streamed"] is False
    assert Smoothing(sigma=0.25).prepare(HalfPlane())["streamed"] is True


def test_keyed_certificates_do_not_depend_on_the_other_examples_of_the_call():
    x = _examples([0.95, 0.75, 0.5, 0.62, 0.58])
    keys = [40, 41, 42, 43, 44]

    def certify(chosen):
        torch.manual_seed(13)
        certifier = Smoothing(sigma=0.25, n=5000, sequential=True, radii=[0.0, 0.1, 0.2])
        out = dict(certifier.certify_each(HalfPlane(), x[chosen], keys=[keys[i] for i in chosen]))
        return {keys[chosen[j]]: (c.prediction, c.radius, c.samples, c.count_a) for j, c in out.items()}

    everything = certify([0, 1, 2, 3, 4])
    assert certify([1, 3]) == {k: everything[k] for k in (41, 43)}  # as a resumed window would be


def test_wrong_seed_count_is_refused():
    with pytest.raises(ValueError, match="2 seeds for 3 examples"):
        PackedSampler(HalfPlane(), torch.rand(3, 1, 2, 2), 0.25, seeds=[1, 2])

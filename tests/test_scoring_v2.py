"""Scoring version 2 (issue 18): the protocols that score randomized models have a version 2 with
independent draws per example and attacks on every example not wrong on every draw; version 1
stays available (and keeps its run keys) for the runs stored under it; ``--exact-draws`` scores
with every draw of a declared draw space."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.config import RunConfig
from bench.data.base import Split, get_dataset
from bench.errors import BenchError
from bench.harness.protocol import resolve_protocol
from bench.harness.stages import Evaluator, scoring_for
from bench.progress import Progress
from bench.results.store import Store

CLASSES = 4


class SharedCoin(nn.Module):
    """A randomized classifier that draws ONE uniform u per forward pass for the whole batch:
    example i (its probability p_i in pixel 0, its label in pixel 1) is classified correctly iff
    u < p_i. Its single-draw accuracy on example i is exactly p_i."""

    randomized = True
    randomness_per_example = False
    num_classes = CLASSES
    task = "multiclass"

    def __init__(self, draw_space: int | None = None) -> None:
        super().__init__()
        self.draw_space = draw_space
        self.fixed: float | None = None

    def enumerate_draws(self):
        """Draws u = (k + 0.5) / D for k < D: equally likely, and P(u < p) -> p as D grows."""
        assert self.draw_space is not None
        try:
            for k in range(self.draw_space):
                self.fixed = (k + 0.5) / self.draw_space
                yield
        finally:
            self.fixed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, label = x[:, 0, 0, 0], (x[:, 0, 0, 1] * CLASSES).round().long()
        u = self.fixed if self.fixed is not None else float(torch.rand(()))
        target = torch.where(torch.as_tensor(u) < p, label, (label + 1) % CLASSES)
        return nn.functional.one_hot(target, CLASSES).float() * 5.0


def _split(p: torch.Tensor, labels: torch.Tensor) -> Split:
    images = torch.zeros(len(p), 1, 2, 2)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = p, labels.float() / CLASSES
    return Split("toy", "test", images, labels)


def _evaluator(db_url: str, model: nn.Module, data: Split, version: int, draws: int = 10,
               exact: bool = False) -> tuple[Evaluator, Store]:
    store = Store(db_url)
    run_id = store.create_run(f"v{version}-{exact}", defense="toy", dataset="toy", protocol="toy",
                              protocol_version=version, config={}, seed=0, n_examples=len(data))
    scoring = scoring_for(model, draws, version=version, exact=exact)
    return Evaluator(store, run_id, model, data, torch.device("cpu"), 8, 0, scoring, Progress()), store


def test_randomized_protocols_default_to_scoring_2_and_keep_version_1():
    spec = get_dataset("digits").spec
    for name in ("quick", "adaptive", "single-draw", "transfer-draw", "certify"):
        latest = resolve_protocol(RunConfig("dcs", "digits", protocol=name), spec, randomized=True,
                                  certificates=("lipschitz",))
        old = resolve_protocol(RunConfig("dcs", "digits", protocol=f"{name}@1"), spec, randomized=True,
                               certificates=("lipschitz",))
        assert (latest.version, latest.scoring, old.version, old.scoring) == (2, 2, 1, 1), name
        assert "scoring" not in old.to_dict() and latest.to_dict()["scoring"] == 2  # v1 run keys unchanged
    rand = resolve_protocol(RunConfig("dcs", "digits", protocol="linf-0.1-rand"), spec, randomized=True)
    assert rand.key == "linf-0.1-rand@2" and rand.scoring == 2
    assert resolve_protocol(RunConfig("dcs", "digits", protocol="linf-0.1-rand@1"), spec).scoring == 1
    exact = resolve_protocol(RunConfig("dcs", "digits", exact_draws=True), spec, randomized=True)
    assert exact.exact and exact.to_dict()["exact_draws"] is True


def test_scoring_2_draws_independently_per_example(db_url, one_thread):
    """With one draw shared by the batch, scoring 1 gives every example of a batch the same R
    draws: examples with the same p have identical draw counts. Scoring 2 does not."""
    torch.manual_seed(0)
    n = 64
    p, labels = torch.full((n,), 0.5), torch.arange(n) % CLASSES
    data = _split(p, labels)
    counts = {}
    for version in (1, 2):
        evaluator, store = _evaluator(db_url, SharedCoin(), data, version)
        evaluator.clean()
        rows = store.results([e.id for e in store.evaluations(evaluator.run_id)])
        counts[version] = [r.correct_draws for r in sorted(rows, key=lambda r: r.example_index)]
    batches_v1 = [set(counts[1][i:i + 8]) for i in range(0, n, 8)]
    assert all(len(b) == 1 for b in batches_v1)  # shared draws: one count per batch of 8
    assert len(set(counts[2][:8])) > 1 and len(set(counts[2])) >= 4  # independent: counts spread
    mean = sum(counts[2]) / (10 * n)
    assert abs(mean - 0.5) < 4 * (0.25 / (10 * n)) ** 0.5


def test_scoring_2_attacks_every_example_not_wrong_on_every_draw(db_url, one_thread):
    """Scoring 1 attacks only the worst-of-R-correct examples (which depends on R); scoring 2
    attacks every example with at least one correct draw."""
    torch.manual_seed(1)
    p = torch.tensor([0.0, 0.3, 0.6, 1.0] * 4)
    data = _split(p, torch.arange(16) % CLASSES)
    for version in (1, 2):
        evaluator, store = _evaluator(db_url, SharedCoin(), data, version)
        alive = evaluator.clean()
        clean = {r.example_index: r for e in store.evaluations(evaluator.run_id)
                 for r in store.results([e.id])}
        if version == 1:
            assert alive == {i for i, r in clean.items() if r.correct_draws == 10}
        else:
            assert alive == {i for i, r in clean.items() if r.correct_draws > 0}
            assert {i for i in range(16) if p[i] == 1.0} <= alive and not alive & {0, 4, 8, 12}
            assert len(alive) > len({i for i, r in clean.items() if r.correct_draws == 10})


def test_exact_draws_score_every_draw_of_the_declared_space(db_url, one_thread):
    p = torch.tensor([0.1, 0.25, 0.5, 0.9])
    data = _split(p, torch.arange(4))
    evaluator, store = _evaluator(db_url, SharedCoin(draw_space=20), data, 2, exact=True)
    assert evaluator.scoring.exact and evaluator.draws == 20
    evaluator.clean()
    rows = sorted(store.results([e.id for e in store.evaluations(evaluator.run_id)]), key=lambda r: r.example_index)
    assert [r.correct_draws for r in rows] == [2, 5, 10, 18]  # exactly #{k : (k + 0.5) / 20 < p}
    assert all(r.draws == 20 for r in rows)


def test_exact_draws_need_a_declared_draw_space():
    with pytest.raises(BenchError, match="declares no enumerable draw space"):
        scoring_for(SharedCoin(), 10, exact=True)
    deterministic = nn.Linear(2, 2)
    assert scoring_for(deterministic, 10, exact=True).draws == 1  # nothing to enumerate: one pass


def test_cli_refuses_exact_draws_without_a_draw_space_and_stores_nothing(tmp_path):
    from typer.testing import CliRunner

    from bench.cli import app
    from helpers import assert_cli_user_error

    db = tmp_path / "r.db"
    result = CliRunner().invoke(app, ["run", "--defense", "hycas", "--dataset", "digits", "--exact-draws", "-n", "8",
                                      "--db", f"sqlite:///{db}"])
    assert_cli_user_error(result, "--exact-draws", "declares no enumerable draw space")
    assert not db.exists()

"""Randomized models are scored with R fresh draws: worst-of-R, mean and majority-vote accuracy."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from bench.config import RunConfig
from bench.defenses.base import Defense, DefenseInfo, Recipe
from bench.harness.runner import execute
from bench.models.defended import DefendedModel
from bench.registry import DEFENSES
from bench.results.queries import run_summary
from bench.results.store import Store
from helpers import built_as


class NoisyModel(DefendedModel):
    """Adds fresh Gaussian input noise at every forward pass, eval mode included."""

    randomized = True
    sigma = 0.2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + self.sigma * torch.randn_like(x))

    @contextmanager
    def freeze_randomness(self):
        state = torch.random.get_rng_state()
        try:
            yield
        finally:
            torch.random.set_rng_state(state)


_RECIPE = Recipe(epochs=8, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="none")


class Noisy(Defense):
    """Test-only randomized defense: Gaussian noise on the input of a small CNN."""

    info = DefenseInfo(paper="(test)", year=None, kind="randomized", randomized=True)
    recipes = {"paper": _RECIPE, "cpu": _RECIPE}

    def build(self, spec, image_size, **hparams):
        return built_as(NoisyModel, self, spec, image_size, **hparams)


if "test-noisy" not in DEFENSES:
    DEFENSES.register("test-noisy", Noisy)


def test_randomized_model_is_scored_with_r_draws(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    config = RunConfig(defense="test-noisy", dataset="synthetic", eps=(0.1,), steps=3, n_examples=32)
    summary = run_summary(store, execute(config, store))
    assert summary["clean_accuracy"] > 0.5  # the model learned the task despite the noise
    checks = {c["name"]: c for c in summary["checks"]}
    assert checks["randomized"]["triggered"] is False, checks["randomized"]  # declared and detected
    assert summary["clean_draws"]["draws"] == 10
    (attack,) = summary["attacks"]
    assert attack["draws"] == 10
    assert attack["worst_of_r"] == attack["accuracy"]
    assert attack["worst_of_r"] <= attack["mean"] <= 1
    assert attack["worst_of_r"] <= attack["majority"] <= 1
    clean = summary["clean_draws"]
    assert clean["worst_of_r"] == summary["clean_accuracy"] <= clean["mean"]
    # with sigma=0.2 input noise some draws disagree: worst-of-R is strictly below the mean
    assert clean["worst_of_r"] < clean["mean"]


def test_undeclared_randomness_is_flagged(tmp_path, monkeypatch):
    monkeypatch.setattr(NoisyModel, "randomized", False)
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    config = RunConfig(defense="test-noisy", dataset="synthetic", protocol="clean", n_examples=16)
    summary = run_summary(store, execute(config, store))
    check = next(c for c in summary["checks"] if c["name"] == "randomized")
    assert check["triggered"] and "does not declare randomized=True" in check["detail"]
    assert summary["clean_draws"]["draws"] == 1


def test_randomized_defenses_default_to_the_adaptive_protocol():
    from bench.harness.runner import resolve

    adaptive = resolve(RunConfig(defense="test-noisy", dataset="synthetic")).protocol
    assert adaptive.key == "adaptive@2" and adaptive.draws == 10 and adaptive.scoring == 2
    names = [a.attack for a in adaptive.attacks]
    assert names[:3] == ["eot", "autoattack", "square"]
    assert dict(adaptive.attacks[1].params)["version"] == "rand"
    assert resolve(RunConfig(defense="standard", dataset="synthetic")).protocol.key == "autoattack@1"
    chosen = resolve(RunConfig(defense="test-noisy", dataset="synthetic", protocol="pgd")).protocol
    assert chosen.key == "pgd@1"  # an explicit protocol is respected


class FreezableNoisy(NoisyModel):
    """Within freeze_randomness, every forward uses the same noise tensor (one frozen draw)."""

    entered = 0

    def forward(self, x):
        noise = self._frozen if getattr(self, "_frozen", None) is not None and self._frozen.shape == x.shape \
            else self.sigma * torch.randn_like(x)
        return DefendedModel.forward(self, x + noise)

    @contextmanager
    def freeze_randomness(self):
        type(self).entered += 1
        self._frozen = None
        generator = torch.Generator().manual_seed(type(self).entered)

        def draw(shape):
            return self.sigma * torch.randn(shape, generator=generator)

        original = self.forward

        def frozen_forward(x):
            if getattr(self, "_frozen", None) is None or self._frozen.shape != x.shape:
                self._frozen = draw(x.shape)
            return original(x)

        self.forward = frozen_forward
        try:
            yield
        finally:
            del self.forward
            self._frozen = None


def test_transfer_draw_protocol_attacks_a_frozen_draw_and_scores_one_fresh_draw(tmp_path, monkeypatch):
    monkeypatch.setattr(Noisy, "build", lambda self, spec, size, **hp: built_as(FreezableNoisy, self, spec, size, **hp))
    FreezableNoisy.entered = 0
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    summary = run_summary(store, execute(RunConfig(defense="test-noisy", dataset="synthetic",
                                                   protocol="transfer-draw", n_examples=16), store))
    assert summary["protocol"] == "transfer-draw@2"
    assert FreezableNoisy.entered > 0  # the attack ran inside freeze_randomness
    assert all(a["draws"] == 1 for a in summary["attacks"] if a["accuracy"])  # scored with one new draw
    assert summary["clean_draws"]["draws"] == 1
    single = resolve_protocol_key("single-draw")
    assert single == ("single-draw@2", 1, False)


def resolve_protocol_key(name):
    from bench.harness.runner import resolve

    p = resolve(RunConfig(defense="test-noisy", dataset="synthetic", protocol=name)).protocol
    return p.key, p.draws, p.frozen


def test_threat_named_protocols():
    from bench.harness.runner import resolve

    aa = resolve(RunConfig(defense="standard", dataset="digits", protocol="linf-8/255@1")).protocol
    assert aa.key == "linf-8/255@1" and [(a.attack, a.threat.norm.value, a.threat.eps) for a in aa.attacks] == \
        [("autoattack", "Linf", 8 / 255)]
    rand = resolve(RunConfig(defense="test-noisy", dataset="digits", protocol="l2-0.5-rand")).protocol
    assert rand.key == "l2-0.5-rand@2" and [a.attack for a in rand.attacks] == ["eot", "autoattack", "square"]
    assert {a.threat.label for a in rand.attacks} == {"L2 0.5"}


def test_randomized_defense_under_non_adaptive_protocol_is_marked(tmp_path):
    from typer.testing import CliRunner

    from bench.cli import app
    from bench.results.leaderboard import DEFENSE, build_board

    db = f"sqlite:///{tmp_path / 'r.db'}"
    result = CliRunner().invoke(app, ["run", "--defense", "test-noisy", "--dataset", "synthetic", "--protocol", "pgd",
                                      "-n", "16", "--db", db, "--json"])
    assert result.exit_code == 0, result.stderr
    assert "not adaptive" in result.stderr
    board = build_board(Store(db), "synthetic")
    assert board.rows[0][DEFENSE] == "test-noisy †" and "non-adaptive" in board.note


def test_draws_option_sets_r_and_is_validated(tmp_path):
    from typer.testing import CliRunner

    from bench.cli import app

    db = f"sqlite:///{tmp_path / 'r.db'}"
    cli = CliRunner()
    out = cli.invoke(app, ["run", "--defense", "test-noisy", "--dataset", "synthetic", "--eps", "0.1", "--steps", "2",
                           "--draws", "3", "-n", "8", "--db", db, "--json"])
    assert out.exit_code == 0, out.stderr
    import json

    summary = json.loads(out.stdout)
    assert summary["clean_draws"]["draws"] == 3 and summary["attacks"][0]["draws"] in (1, 3)
    for args, fragment in ((["--draws", "0"], "--draws"),
                           (["--protocol", "pgd", "--draws", "3"], "cannot be combined")):
        bad = cli.invoke(app, ["run", "--defense", "test-noisy", "--dataset", "synthetic", *args, "--db", db])
        assert bad.exit_code == 2 and fragment in bad.stderr, bad.stderr


def test_quick_protocol_is_adaptive_cpu_sized_and_certifies_with_the_defense_s_certificates():
    from bench.harness.protocol import is_adaptive
    from bench.harness.runner import resolve

    hycas = resolve(RunConfig(defense="hycas", dataset="digits")).protocol  # the seed defenses' default
    assert hycas.key == "quick@2" and is_adaptive("quick") and hycas.draws == 10 and hycas.n_examples == 200
    assert [(a.attack, a.threat.label) for a in hycas.attacks] == [
        ("eot", "Linf 0.1"), ("square", "Linf 0.1"), ("eot", "L2 0.5"), ("square", "L2 0.5")]
    assert dict(hycas.attacks[0].params)["draws"] == 10 and dict(hycas.attacks[1].params)["n_queries"] == 1000
    assert [(c.certifier, c.kwargs) for c in hycas.certifiers] == [("smoothing", {"n": 2000}),
                                                                   ("lipschitz", {"n": 500})]
    # a baseline under quick: the same attacks, no certificate (and no error)
    plain = resolve(RunConfig(defense="standard", dataset="digits", protocol="quick")).protocol
    assert plain.attacks == hycas.attacks and plain.certifiers == ()
    assert resolve(RunConfig(defense="hycas", dataset="digits", n_examples=50)).protocol.n_examples == 50
    # certify@1 keeps Cohen's sizes
    full = resolve(RunConfig(defense="hycas", dataset="digits", protocol="certify")).protocol
    assert [(c.certifier, c.kwargs) for c in full.certifiers] == [("smoothing", {}), ("lipschitz", {})]

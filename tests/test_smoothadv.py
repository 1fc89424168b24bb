"""SmoothAdv-PGD (Salman et al., 2019) and the evaluation of smoothed classifiers with PREDICT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bench.attacks.smoothadv import SoftSmoothed
from bench.config import Norm, RunConfig, ThreatModel
from bench.data.base import get_dataset
from bench.errors import BenchError
from bench.models.defended import DefendedModel
from bench.registry import ATTACKS

pytestmark = pytest.mark.usefixtures("one_thread")

L2 = ThreatModel(Norm.L2, 0.5)
LINF = ThreatModel(Norm.LINF, 0.1)


class Recording(DefendedModel):
    """A fixed linear classifier on 8x8 images that records every input batch it is given."""

    sigma = 0.25

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), (0.5,), (0.25,), (1, 8, 8), 4)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return super().forward(x)


def _noise_per_step(model: Recording, x_steps: list[torch.Tensor], m: int, n: int) -> list[torch.Tensor]:
    """The noise of each forward pass: input minus the attacked point it was added to."""
    return [(inp.view(m, n, 1, 8, 8) - point.unsqueeze(0)) for inp, point in zip(model.inputs, x_steps)]


@pytest.mark.parametrize("resample", [False, True])
def test_the_m_draws_are_fixed_within_an_attack_unless_resampled(monkeypatch, resample: bool) -> None:
    import bench.attacks.pgd as pgd

    model, m, n = Recording(), 6, 3
    x, y = torch.rand(n, 1, 8, 8), torch.tensor([0, 1, 2])
    points: list[torch.Tensor] = []
    original = SoftSmoothed.forward

    def spy(self, x_adv):
        points.append(x_adv.detach().clone())
        return original(self, x_adv)

    monkeypatch.setattr(SoftSmoothed, "forward", spy)
    result = ATTACKS.get("smoothadv")(m=m, steps=4, resample=resample)(model, x, y, L2)
    attack_passes = [inp for inp in model.inputs if len(inp) == m * n]
    assert len(attack_passes) == 4 and len(points) == 4
    model.inputs = attack_passes
    noises = _noise_per_step(model, points, m, n)
    same = [torch.allclose(noises[0], e, atol=1e-6) for e in noises[1:]]
    assert all(same) if not resample else not any(same)
    assert abs(float(noises[0].std()) - 0.25) < 0.05  # sigma from the model, in pixel units
    assert pgd is not None and result.forward_passes >= 4 * m  # m noisy copies per step


@pytest.mark.parametrize("threat", [L2, LINF])
def test_stays_within_eps_and_the_image_box_and_raises_the_soft_loss(threat: ThreatModel) -> None:
    model = Recording()
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 4
    torch.manual_seed(1)
    adv = ATTACKS.get("smoothadv")(m=16, steps=10)(model, x, y, threat).x_adv
    delta = (adv - x).flatten(1)
    size = delta.norm(dim=1) if threat.norm is Norm.L2 else delta.abs().amax(dim=1)
    assert float(size.max()) <= threat.eps + 1e-5 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    noise = 0.25 * torch.randn(64, *x.shape)  # a fresh, larger estimate of log G
    soft = SoftSmoothed(model, 0.25, 64, noise)
    with torch.no_grad():
        before = nn.functional.nll_loss(soft(x), y)
        after = nn.functional.nll_loss(soft(adv), y)
    assert float(after) > float(before) + 0.1, (float(before), float(after))


def test_no_random_start_and_official_step_size(monkeypatch) -> None:
    import bench.attacks.smoothadv as module

    seen = {}

    def fake(model, x, y, threat, alpha, steps, random_start, loss_fn, random_direction_on_zero):
        seen.update(alpha=alpha, steps=steps, random_start=random_start, zero=random_direction_on_zero)
        return x

    monkeypatch.setattr(module, "pgd_loss_ascent", fake)
    ATTACKS.get("smoothadv")(steps=8)(Recording(), torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), L2)
    assert seen == {"alpha": pytest.approx(2 * 0.5 / 8), "steps": 8, "random_start": False, "zero": True}


def test_zero_gradient_l2_steps_take_a_random_direction() -> None:
    from bench.attacks.pgd import pgd_loss_ascent

    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    nn.init.zeros_(flat[1].weight)  # the loss does not depend on x: zero gradient everywhere
    x, y = torch.full((2, 1, 8, 8), 0.5), torch.tensor([0, 1])
    moved = pgd_loss_ascent(flat, x, y, L2, 0.1, 1, False, nn.functional.cross_entropy, random_direction_on_zero=True)
    still = pgd_loss_ascent(flat, x, y, L2, 0.1, 1, False, nn.functional.cross_entropy)
    assert torch.allclose((moved - x).flatten(1).norm(dim=1), torch.full((2,), 0.1), atol=1e-5)
    assert torch.equal(still, x)


def test_eps_is_in_pixel_units_and_the_1_256_convention_needs_a_fraction() -> None:
    from bench.config import parse_eps

    x, y = torch.rand(1, 1, 8, 8), torch.tensor([0])
    with pytest.raises(BenchError, match="64/256"):
        ATTACKS.get("smoothadv")(steps=1)(Recording(), x, y, ThreatModel(Norm.L2, 64.0))
    assert parse_eps("64/256") == pytest.approx(0.25)
    ATTACKS.get("smoothadv")(steps=1, m=2)(Recording(), x, y, ThreatModel(Norm.L2, parse_eps("64/256")))


def test_parameters_are_validated_and_sigma_is_required() -> None:
    for bad in ({"m": 0}, {"steps": 0}, {"step_size": -1}, {"sigma": 0}):
        with pytest.raises(BenchError):
            ATTACKS.get("smoothadv")(**bad)
    plain = DefendedModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), (0.5,), (0.25,), (1, 8, 8), 4)
    with pytest.raises(BenchError, match="sigma"):
        ATTACKS.get("smoothadv")(steps=1)(plain, torch.rand(1, 1, 8, 8), torch.tensor([0]), L2)
    ATTACKS.get("smoothadv")(steps=1, m=2, sigma=0.5)(plain, torch.rand(1, 1, 8, 8), torch.tensor([0]), L2)


# -- runs of a smoothed classifier -------------------------------------------------------------
def test_rs_under_quick_is_attacked_with_smoothadv_and_scored_with_predict(tmp_path: Path, monkeypatch) -> None:
    from bench.harness.runner import execute, resolve
    from bench.harness.stages import PREDICT_N
    from bench.results.queries import run_summary
    from bench.results.store import Store

    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))
    config = RunConfig(defense="rs", dataset="synthetic", epochs=2, n_examples=12, hparams=(("sigma", 0.25),))
    resolved = resolve(config)
    assert resolved.protocol.key == "quick@2"
    assert [(a.attack, dict(a.params)) for a in resolved.protocol.attacks] == \
        [("smoothadv", {"m": 32, "steps": 20}) for _ in get_dataset("synthetic").spec.threat_models]
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    run_id = execute(config, store)
    clean = store.evaluations(run_id)[0]
    rows = store.results([clean.id])
    assert all(r.draws == 1 for r in rows)  # one PREDICT decision per example, not R draws
    assert all((r.prediction == r.label) == r.correct for r in rows)
    assert all(r.prediction == -1 or 0 <= r.prediction < 4 for r in rows)  # -1: abstained (wrong)
    assert clean.forward_passes >= PREDICT_N * len(rows)
    summary = run_summary(store, run_id)
    l2 = [a for a in summary["attacks"] if (a["norm"], a["eps"]) == ("L2", 0.5)]
    certified = {c["radius"]: c["accuracy"] for c in summary["certified"] if c["certifier"] == "smoothing"}
    assert l2 and certified and certified[0.5] <= l2[-1]["accuracy"] + 1e-9  # certified <= empirical

    # a baseline under the same protocol shares the leaderboard, with its own (empty) certified columns
    from bench.results.leaderboard import DEFENSE, build_board, render_markdown

    execute(RunConfig(defense="standard", dataset="synthetic", epochs=1, n_examples=12, protocol="quick"), store)
    board = build_board(store, "synthetic")
    assert board.protocol == "quick@2" and {r[DEFENSE] for r in board.rows} == {"rs", "standard"}
    titles = [c.title for c in board.columns]
    assert "smoothing r=0.5" in titles and "smoothadv L2 0.5" in titles and "eot L2 0.5" in titles
    by_defense = {r[DEFENSE]: r for r in board.rows}
    key = next(c.key for c in board.columns if c.title == "smoothing r=0.5")
    assert by_defense["standard"].get(key) is None and by_defense["rs"][key] == pytest.approx(certified[0.5])
    assert "| standard |" in render_markdown(board)


# -- SmoothAdv training ------------------------------------------------------------------------
def test_training_inputs_are_the_attacked_image_plus_the_attack_s_own_draws(monkeypatch) -> None:
    import bench.attacks.smoothadv as attacks
    from bench.defenses.smoothadv import SmoothAdvTraining

    seen = {}
    original = attacks.smoothadv_pgd

    def spy(model, x, y, threat, sigma, m, steps, noise, step_size=None):
        seen.update(noise=noise.clone(), eps=threat.eps, norm=threat.norm, m=m, steps=steps)
        seen["x_adv"] = original(model, x, y, threat, sigma, m, steps, noise, step_size)
        return seen["x_adv"]

    monkeypatch.setattr(attacks, "smoothadv_pgd", spy)
    model, x, y = Recording(), torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    perturb = SmoothAdvTraining(sigma=0.25, eps=0.5, steps=3, m=4, warmup=10)
    perturb.set_epoch(1)
    inputs, labels = perturb(model, x, y)
    assert seen["eps"] == pytest.approx(0.5 * 2 / 10) and seen["norm"] is Norm.L2  # warm-up, epoch 2 of 10
    assert (seen["m"], seen["steps"]) == (4, 3)
    assert inputs.shape == (20, 1, 8, 8) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [0] * 4
    expected = (seen["x_adv"].unsqueeze(0) + seen["noise"]).transpose(0, 1).reshape(20, 1, 8, 8)
    assert torch.allclose(inputs, expected)  # the same draws the attack held fixed
    assert float((seen["x_adv"] - x).flatten(1).norm(dim=1).max()) <= 0.1 + 1e-5
    single = SmoothAdvTraining(sigma=0.25, eps=0.5, steps=1, m=4, warmup=0, multi_noise=False)
    one, same = single(model, x, y)
    assert one.shape == x.shape and torch.equal(same, y) and single.current_eps() == 0.5


def test_warmup_schedule_is_linear_then_flat() -> None:
    from bench.defenses.smoothadv import SmoothAdvTraining

    perturb = SmoothAdvTraining(sigma=0.25, eps=1.0, steps=1, m=1, warmup=4)
    values = []
    for epoch in range(6):
        perturb.set_epoch(epoch)
        values.append(perturb.current_eps())
    assert values == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_smoothadv_hparams_resolve_by_recipe_and_validate() -> None:
    from bench.registry import DEFENSES

    defense = DEFENSES.get("smoothadv")()
    assert defense.info.smoothed and defense.info.certificates == ("smoothing",)
    assert defense.info.default_protocol == "quick"
    paper = defense.resolve_hparams({}, 32, "paper")
    cpu = defense.resolve_hparams({"eps": "64/256"}, 8, "cpu")
    assert (paper["steps"], paper["m_train"], paper["warmup"], paper["eps"]) == (10, 2, 10, 0.25)
    assert (cpu["steps"], cpu["m_train"], cpu["warmup"], cpu["eps"]) == (2, 2, 4, 0.25)
    for bad in ({"eps": 64}, {"eps": -1}, {"steps": 1.5}, {"m_train": 0}, {"multi_noise": "maybe"}, {"nope": 1}):
        with pytest.raises(BenchError):
            defense.resolve_hparams(bad, 8, "cpu")
    recipe = defense.recipe("paper")
    assert (recipe.epochs, recipe.batch_size, recipe.lr, recipe.milestones, recipe.weight_decay) == \
        (150, 256, 0.1, (50, 100), 1e-4)


def test_a_few_smoothadv_epochs_reduce_the_loss(tmp_path: Path, monkeypatch) -> None:
    from bench.defenses.base import Recipe
    from bench.registry import DEFENSES

    defense = DEFENSES.get("smoothadv")()
    spec, train = get_dataset("synthetic").spec, get_dataset("synthetic").load("train")
    hparams = defense.resolve_hparams({"steps": 2, "warmup": 2, "sigma": 0.12, "eps": 0.1}, spec.image_size, "cpu")
    torch.manual_seed(0)
    model = defense.build(spec, spec.image_size, **hparams)
    assert model.smoothed_evaluation and model.sigma == 0.12 and model.smoothadv["eps"] == 0.1
    recipe = Recipe(epochs=6, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0.0, schedule="none")
    summary = defense.fit(model, train, recipe, spec=spec, device=torch.device("cpu"), seed=0)
    losses = [h["loss"] for h in summary.history]
    assert summary.steps == 6 * 4 and losses[-1] < 0.8 * losses[0], losses

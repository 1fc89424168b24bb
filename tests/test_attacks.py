"""The attack contract (bench.attacks.base) and PGD, on tiny models trained on the synthetic data."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.attacks.base import Attack, AttackInfo, AttackResult, PassCounter, check_inputs, project
from bench.config import Norm, ThreatModel
from bench.data.base import Split
from bench.errors import BenchError
from bench.models.defended import DefendedModel
from bench.registry import ATTACKS
from helpers import ModeRecorder, accuracy, linear_model, prototype_model, train_full_batch

THREATS = {"Linf": ThreatModel(Norm.LINF, 0.1), "L2": ThreatModel(Norm.L2, 0.5)}
LARGE = {"Linf": ThreatModel(Norm.LINF, 0.3), "L2": ThreatModel(Norm.L2, 2.0)}
STEPS = 10


@pytest.fixture(autouse=True)
def _home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def trained(data: tuple[Split, Split]) -> DefendedModel:
    train, _ = data
    return train_full_batch(linear_model(0), train)


@pytest.fixture(scope="module")
def param_free(data: tuple[Split, Split]) -> DefendedModel:
    return prototype_model(data[0]).eval()


@pytest.fixture(params=["trained", "param_free"])
def model(request: pytest.FixtureRequest) -> DefendedModel:
    return request.getfixturevalue(request.param)


def pgd(**params: object) -> Attack:
    return ATTACKS.get("pgd")(**{"steps": STEPS, **params})


def linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().amax(1)


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


NORM_FN = {Norm.LINF: linf, Norm.L2: l2}


# -- fixtures are meaningful -----------------------------------------------------------------
def test_tiny_models_are_accurate(trained: DefendedModel, param_free: DefendedModel, data) -> None:
    _, test = data
    assert accuracy(trained, test.images, test.labels) >= 0.9
    assert accuracy(param_free, test.images, test.labels) >= 0.9
    assert not list(param_free.parameters())


# -- PGD -------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_result_inside_threat_ball_and_box(model: DefendedModel, data, norm: str) -> None:
    _, test = data
    threat = THREATS[norm]
    x, y = test.images, test.labels
    x_before = x.clone()
    result = pgd()(model, x, y, threat)
    assert isinstance(result, AttackResult)
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == x.dtype
    assert not result.x_adv.requires_grad
    assert torch.equal(x, x_before), "the attack must not modify its input in place"
    assert float(NORM_FN[threat.norm](result.x_adv, x).max()) <= threat.eps + 1e-6
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    # predictions and success are the model's verdict on the returned x_adv
    with torch.no_grad():
        assert torch.equal(result.predictions, model(result.x_adv).argmax(1))
    assert torch.equal(result.success, result.predictions != y)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_accuracy_not_above_clean(model: DefendedModel, data, norm: str) -> None:
    _, test = data
    clean = accuracy(model, test.images, test.labels)
    result = pgd()(model, test.images, test.labels, THREATS[norm])
    adv = float((result.predictions == test.labels).float().mean())
    assert adv <= clean


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_large_eps_lowers_accuracy(model: DefendedModel, data, norm: str) -> None:
    _, test = data
    clean = accuracy(model, test.images, test.labels)
    result = pgd()(model, test.images, test.labels, LARGE[norm])
    adv = float((result.predictions == test.labels).float().mean())
    assert adv < clean
    assert adv <= 0.5 * clean, (adv, clean)
    assert int(result.success.sum()) >= len(test) // 2


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_eps_zero_is_the_clean_pass(model: DefendedModel, data, norm: str) -> None:
    _, test = data
    x, y = test.images, test.labels
    result = pgd()(model, x, y, ThreatModel(norm, 0.0))
    assert torch.equal(result.x_adv, x)
    with torch.no_grad():
        assert torch.equal(result.predictions, model(x).argmax(1))
    assert result.backward_passes == 0
    assert result.forward_passes == len(x)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_counts_passes(trained: DefendedModel, data, norm: str) -> None:
    _, test = data
    n = len(test)
    result = pgd(steps=5)(trained, test.images, test.labels, THREATS[norm])
    # PassCounter counts per-example passes: each PGD step is one forward and one backward
    # pass over the batch, plus at least the final re-evaluation of x_adv
    assert result.backward_passes >= 5 * n
    assert result.forward_passes >= result.backward_passes + n
    assert result.backward_passes <= 5 * n * 2  # one restart: no more than about steps * n


def test_pgd_restarts_cost_more_and_only_add_successes(trained: DefendedModel, data) -> None:
    _, test = data
    threat = THREATS["L2"]  # most examples survive one restart at this budget
    torch.manual_seed(7)
    one = pgd(steps=3, restarts=1)(trained, test.images, test.labels, threat)
    assert not bool(one.success.all())
    torch.manual_seed(7)  # same first restart
    three = pgd(steps=3, restarts=3)(trained, test.images, test.labels, threat)
    assert three.backward_passes > one.backward_passes
    assert bool((three.success | ~one.success).all()), "an example broken by restart 1 must stay broken"


def test_pgd_seeded_runs_are_identical(trained: DefendedModel, data) -> None:
    _, test = data
    torch.manual_seed(123)
    a = pgd()(trained, test.images, test.labels, THREATS["Linf"])
    torch.manual_seed(123)
    b = pgd()(trained, test.images, test.labels, THREATS["Linf"])
    assert torch.equal(a.x_adv, b.x_adv)


def test_pgd_leaves_parameters_unchanged(trained: DefendedModel, data) -> None:
    _, test = data
    model = copy.deepcopy(trained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pgd()(model, test.images, test.labels, THREATS["Linf"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("mode", [True, False], ids=["train", "eval"])
def test_model_mode_restored(trained: DefendedModel, data, mode: bool) -> None:
    _, test = data
    model = copy.deepcopy(trained)
    model.train(mode)
    pgd(steps=2)(model, test.images[:8], test.labels[:8], THREATS["Linf"])
    assert model.training is mode
    assert all(m.training is mode for m in model.modules())


def recording_model(trained: DefendedModel) -> tuple[DefendedModel, ModeRecorder]:
    recorder = ModeRecorder()
    net = nn.Sequential(*trained.net, recorder)
    model = DefendedModel(net, (0.5,), (0.25,), (1, 8, 8), 4)
    model.load_state_dict(trained.state_dict())
    return model, recorder


def test_attack_base_class_runs_in_eval_mode(trained: DefendedModel, data) -> None:
    """A gradient-free attack: every forward pass the base class makes is in eval mode."""
    _, test = data
    model, recorder = recording_model(trained)

    class Noise(Attack):
        def run(self, model, x, y, threat):
            with torch.no_grad():
                model(x)
            return x + 0.05 * torch.randn_like(x)

    model.train()
    Noise()(model, test.images[:8], test.labels[:8], THREATS["Linf"])
    assert recorder.modes and not any(recorder.modes), recorder.modes
    assert model.training


def test_pgd_runs_every_forward_pass_in_eval_mode(trained: DefendedModel, data) -> None:
    _, test = data
    model, recorder = recording_model(trained)
    model.train()
    pgd(steps=2)(model, test.images[:8], test.labels[:8], THREATS["Linf"])
    assert recorder.modes
    assert not any(recorder.modes), recorder.modes


def test_pgd_leaves_batchnorm_statistics_unchanged(data) -> None:
    _, test = data
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 64, 4))
    model = DefendedModel(net, (0.5,), (0.25,), (1, 8, 8), 4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pgd(steps=2)(model, test.images[:16], test.labels[:16], THREATS["Linf"])
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []


# -- input checks ----------------------------------------------------------------------------
def bad_inputs() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    return [
        ("above one", x + 1.0, y),
        ("below zero", x - 1.0, y),
        ("3-D images", x[:, 0], y),
        ("integer images", (x * 255).to(torch.uint8), y),
        ("float labels", x, y.float()),
        ("2-D labels", x, y.view(2, 2)),
        ("length mismatch", x, y[:3]),
    ]


@pytest.mark.parametrize(("case", "x", "y"), bad_inputs(), ids=[c for c, _, _ in bad_inputs()])
def test_bad_inputs_raise_value_error(trained: DefendedModel, case: str, x: torch.Tensor, y: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        check_inputs(x, y)
    with pytest.raises(ValueError):
        pgd()(trained, x, y, THREATS["Linf"])


def test_nan_images_rejected() -> None:
    x = torch.rand(2, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        check_inputs(x, torch.tensor([0, 1]))


def test_int32_labels_accepted(trained: DefendedModel, data) -> None:
    _, test = data
    result = pgd(steps=1)(trained, test.images[:4], test.labels[:4].int(), THREATS["Linf"])
    assert result.x_adv.shape == (4, 1, 8, 8)


def test_empty_batch(trained: DefendedModel) -> None:
    result = pgd()(trained, torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), THREATS["L2"])
    assert result.x_adv.shape == (0, 1, 8, 8)
    assert result.predictions.shape == (0,)
    assert result.backward_passes == 0


@pytest.mark.parametrize("params", [{"stpes": 5}, {"eps": 0.1}, {"steps": 0}, {"restarts": 0},
                                    {"step_size": -0.1}, {"step_size": 0}])
def test_bad_attack_parameters_raise(params: dict) -> None:
    with pytest.raises(BenchError):
        ATTACKS.get("pgd")(**params)


def test_unknown_parameter_message_lists_known() -> None:
    with pytest.raises(BenchError, match="steps") as info:
        ATTACKS.get("pgd")(stpes=5)
    assert "stpes" in str(info.value)


def test_pgd_default_step_size_follows_madry_rule() -> None:
    attack = ATTACKS.get("pgd")(steps=10)
    assert attack.step_size(0.1) == pytest.approx(2.5 * 0.1 / 10)
    assert ATTACKS.get("pgd")(step_size=0.01).step_size(0.1) == 0.01


def test_unsupported_norm_raises(trained: DefendedModel, data) -> None:
    _, test = data

    class LinfOnly(Attack):
        info = AttackInfo(norms=(Norm.LINF,))

        def run(self, model, x, y, threat):
            return x

    with pytest.raises(BenchError, match="L2"):
        LinfOnly()(trained, test.images[:4], test.labels[:4], THREATS["L2"])


# -- projection ------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("scale", [0.01, 0.3, 5.0])
def test_project_properties(norm: str, scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    threat = THREATS[norm]
    x = torch.rand(16, 3, 4, 4, generator=g)
    x_adv = x + scale * torch.randn(16, 3, 4, 4, generator=g)
    p = project(x, x_adv, threat)
    assert p.shape == x.shape
    assert float(NORM_FN[threat.norm](p, x).max()) <= threat.eps + 1e-6
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    assert torch.allclose(project(x, p, threat), p, atol=1e-6)  # idempotent


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_project_keeps_points_already_inside(norm: str) -> None:
    g = torch.Generator().manual_seed(1)
    threat = THREATS[norm]
    x = torch.rand(8, 1, 8, 8, generator=g) * 0.5 + 0.25
    delta = torch.rand(8, 1, 8, 8, generator=g) - 0.5
    delta = delta / NORM_FN[threat.norm](delta, torch.zeros_like(delta)).view(-1, 1, 1, 1) * threat.eps * 0.5
    inside = x + delta
    assert torch.allclose(project(x, inside, threat), inside, atol=1e-6)


def test_project_linf_is_coordinatewise_clip() -> None:
    x = torch.tensor([[[[0.5, 0.95, 0.02]]]])
    x_adv = torch.tensor([[[[0.9, 1.5, -0.5]]]])
    p = project(x, x_adv, ThreatModel(Norm.LINF, 0.1))
    assert torch.allclose(p, torch.tensor([[[[0.6, 1.0, 0.0]]]]))


def test_project_l2_scales_onto_the_sphere() -> None:
    x = torch.full((1, 1, 2, 2), 0.5)
    x_adv = x + torch.tensor([0.3, 0.4, 0.0, 0.0]).view(1, 1, 2, 2)  # ||delta|| = 0.5
    p = project(x, x_adv, ThreatModel(Norm.L2, 0.25))
    assert torch.allclose(p - x, torch.tensor([0.15, 0.2, 0.0, 0.0]).view(1, 1, 2, 2), atol=1e-6)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_project_replaces_nan_by_no_perturbation(norm: str) -> None:
    x = torch.rand(2, 1, 4, 4)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0] = float("nan")
    p = project(x, x_adv, THREATS[norm])
    assert torch.isfinite(p).all()
    assert torch.allclose(p, x)


# -- the base class never trusts run() -------------------------------------------------------
class Garbage(Attack):
    """Returns candidates far outside the threat ball, the box, and even non-finite values."""

    def run(self, model, x, y, threat):
        out = x + 100.0 * torch.randn_like(x)
        out[0] = float("nan")
        out[1] = float("inf")
        out[2] = -float("inf")
        return out


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_garbage_attack_output_is_projected(trained: DefendedModel, data, norm: str) -> None:
    _, test = data
    threat = THREATS[norm]
    x, y = test.images[:16], test.labels[:16]
    result = Garbage()(trained, x, y, threat)
    assert torch.isfinite(result.x_adv).all()
    assert float(NORM_FN[threat.norm](result.x_adv, x).max()) <= threat.eps + 1e-6
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    with torch.no_grad():
        assert torch.equal(result.predictions, trained(result.x_adv).argmax(1))
    assert torch.equal(result.success, result.predictions != y)


# -- PassCounter -----------------------------------------------------------------------------
def test_pass_counter_counts_examples() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    counter = PassCounter(model)
    x = torch.rand(5, 4, requires_grad=True)
    out = counter(x)
    assert counter.forward_passes == 5 and counter.backward_passes == 0
    out.sum().backward()
    assert counter.backward_passes == 5
    with torch.no_grad():
        counter(x[:3])
    assert counter.forward_passes == 8 and counter.backward_passes == 5
    torch.autograd.grad(counter(x).sum(), x)
    assert counter.forward_passes == 13 and counter.backward_passes == 10

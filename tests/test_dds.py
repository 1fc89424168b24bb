"""The ``dds`` and ``dds-rcs`` defenses: diffusion denoised smoothing (Carlini et al. 2023) and its
covariate-shift-robust classifier training (Hedayatnia et al. 2025), and the smoothing certifier on
models that add their own noise."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.data.base import get_dataset
from bench.defenses.base import Recipe
from bench.errors import BenchError, CheckpointError
from bench.registry import DEFENSES

pytest.importorskip("diffusers")

from bench.defenses import dds as dds_module  # noqa: E402
from bench.models import ddpm  # noqa: E402
from bench.models.dds import DDSModel  # noqa: E402

CPU = torch.device("cpu")
# a few DDPM steps and one classifier epoch: the pipeline runs, nothing is learned
TINY = Recipe(epochs=1, batch_size=64, optimizer="adam", lr=1e-3, momentum=0.0, weight_decay=0.0, schedule="none",
              extra=(("ddpm_batch_size", 32), ("ddpm_lr", 1e-3), ("ddpm_steps", 3)))


@pytest.fixture(autouse=True)
def _home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, one_thread) -> None:
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))


def spec():
    return get_dataset("synthetic").spec


def build(name: str = "dds", seed: int = 0, **hparams):
    defense = DEFENSES.get(name)()
    resolved = defense.resolve_hparams({"denoiser_width": 8, **hparams}, 8, "cpu")
    torch.manual_seed(seed)
    return defense, defense.build(spec(), 8, **resolved)


def hand_alphas_cumprod() -> list[float]:
    """DDPM's linear schedule by hand: beta_t = 1e-4 + (0.02 - 1e-4) t / 999, abar_t = prod (1 - beta_s)."""
    out, prod = [], 1.0
    for t in range(1000):
        prod *= 1.0 - (1e-4 + (0.02 - 1e-4) * t / 999)
        out.append(prod)
    return out


class Out(SimpleNamespace):
    sample: torch.Tensor


class OracleDenoiser(nn.Module):
    """Knows the clean image: returns the exact noise of x_t (a perfect epsilon-prediction UNet)."""

    def __init__(self, clean: torch.Tensor, abar: float) -> None:
        super().__init__()
        self.clean, self.abar = clean, abar
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> Out:
        return Out(sample=(x_t - math.sqrt(self.abar) * (2 * self.clean - 1)) / math.sqrt(1 - self.abar))


class ZeroDenoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> Out:
        return Out(sample=torch.zeros_like(x_t) + 0 * self.weight)


def toy_model(denoiser: nn.Module, sigma: float = 0.25, classes: int = 3):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, classes))
    return DDSModel(net, denoiser, ddpm.linear_alphas_cumprod(), (0.5,), (0.25,), (1, 8, 8),
                                        classes, sigma=sigma)


# -- the sigma -> t rule -----------------------------------------------------------------------------
@pytest.mark.parametrize(("sigma", "expected"), [(0.12, 70), (0.25, 145), (0.5, 259), (1.0, 396)])
def test_t_star_is_the_first_step_whose_noise_reaches_two_sigma(sigma: float, expected: int) -> None:
    abar = hand_alphas_cumprod()
    ratio = [math.sqrt(1 - a) / math.sqrt(a) for a in abar]
    by_hand = next(t for t, r in enumerate(ratio) if r >= 2 * sigma)
    assert by_hand == expected
    assert ratio[by_hand - 1] < 2 * sigma <= ratio[by_hand]
    assert ddpm.timestep_for_sigma(ddpm.linear_alphas_cumprod(), sigma) == expected
    # the schedule the model reads (diffusers' DDPMScheduler, float32) gives the same step
    schedule = ddpm.alphas_cumprod_of(ddpm.linear_schedule_config())
    assert ddpm.timestep_for_sigma(schedule, sigma) == expected
    effective = ddpm.effective_sigma(ddpm.linear_alphas_cumprod(), expected)
    assert effective == pytest.approx(ratio[expected] / 2, rel=1e-9) and effective >= sigma


def test_model_records_t_star_and_effective_sigma() -> None:
    _, model = build(sigma=0.5)
    assert model.t_star == 259 and model.sigma == 0.5
    assert 0.5 <= model.effective_sigma < 0.51
    assert model.abar_t == pytest.approx(hand_alphas_cumprod()[259], rel=1e-6)


def test_sigma_beyond_the_schedule_is_a_one_line_error() -> None:
    with pytest.raises(BenchError, match="beyond the diffusion schedule"):
        ddpm.timestep_for_sigma(ddpm.linear_alphas_cumprod(), 100.0)


# -- the base classifier ------------------------------------------------------------------------------
def test_x0_formula_recovers_the_image_with_a_perfect_denoiser() -> None:
    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8)
    model = toy_model(nn.Identity(), sigma=0.5)
    model.denoiser = OracleDenoiser(x, model.abar_t)
    eps = torch.randn_like(x)
    assert torch.allclose(model.denoise(x, eps), x, atol=1e-5)
    with torch.no_grad():  # the whole base classifier is then the classifier on the clean image
        assert torch.allclose(model(x), model.classify(x), atol=1e-4)


def test_denoise_step_is_near_identity_as_sigma_goes_to_zero() -> None:
    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8).mul(0.8).add(0.1)
    model = toy_model(ZeroDenoiser(), sigma=1e-4)  # predicts eps = 0: x0 = x_t / sqrt(abar)
    assert model.t_star == 0 and model.effective_sigma < 0.006
    eps = torch.randn_like(x)
    assert (model.denoise(x, eps) - x).abs().max() < 0.03
    assert torch.allclose(model.denoise(x, torch.zeros_like(x)), x, atol=1e-6)


def test_noise_is_fresh_per_forward_and_per_example_and_frozen_inside_the_context() -> None:
    torch.manual_seed(0)
    model = toy_model(ZeroDenoiser()).eval()
    x = torch.rand(1, 1, 8, 8).repeat(4, 1, 1, 1)  # four copies of one image
    with torch.no_grad():
        a, b = model(x), model(x)
        assert not torch.allclose(a, b)
        assert not torch.allclose(a[0], a[1])  # independent draws per example
        with model.freeze_randomness():
            c, d = model(x), model(x)
        assert torch.equal(c, d)
        assert not torch.allclose(model(x), c)
    assert model.randomized and model.randomness_per_example and model.adds_smoothing_noise
    assert model.smoothed_evaluation


def test_pending_noise_is_used_once_and_checked() -> None:
    model = toy_model(ZeroDenoiser())
    x = torch.rand(2, 1, 8, 8)
    eps = torch.randn_like(x)
    model.use_noise_once(eps)
    with torch.no_grad():
        assert torch.allclose(model(x), model.classify(model.denoise(x, eps)))
        assert model._pending_noise is None
        model.use_noise_once(eps[:1])
        with pytest.raises(RuntimeError, match="pending noise"):
            model(x)


def test_denoiser_stays_frozen_and_in_eval_mode() -> None:
    _, model = build()
    model.train()
    assert model.net.training and not model.denoiser.training
    assert not any(p.requires_grad for p in model.denoiser.parameters())


# -- covariate-shift-robust noise (Hedayatnia et al.) --------------------------------------------------
def _toy_batch():
    torch.manual_seed(0)
    model = toy_model(ddpm.tiny_unet(1, 8, width=8)).eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    return model, x, y


def _loss(model, x, y, eps) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model.classify(model.denoise(x, eps)), y, reduction="sum"))


def test_robust_noise_increases_the_classifier_loss_over_eps0() -> None:
    model, x, y = _toy_batch()
    perturb = dds_module.robust_noise_perturb(2, 0.1, None)
    torch.manual_seed(1)
    assert perturb(model, x, y) is x  # the images are unchanged: the noise goes to the next forward
    adversarial = model._pending_noise
    torch.manual_seed(1)
    eps0 = torch.randn_like(x)
    assert _loss(model, x, y, adversarial) > _loss(model, x, y, eps0)
    moved = (adversarial - eps0).abs()
    assert moved.max() <= 0.2 + 1e-6 and moved.mean() > 0.1  # K = 2 sign steps of 0.1, no projection
    assert all(p.grad is None for p in model.parameters())  # the gradient is taken w.r.t. eps only


def test_robust_noise_projection_to_eps_max() -> None:
    model, x, y = _toy_batch()
    torch.manual_seed(1)
    dds_module.robust_noise_perturb(3, 0.1, 0.05)(model, x, y)
    torch.manual_seed(1)
    eps0 = torch.randn_like(x)
    assert (model._pending_noise - eps0).abs().max() <= 0.05 + 1e-6


# -- hyperparameters, metadata, registry ---------------------------------------------------------------
def test_registry_and_info() -> None:
    assert {"dds", "dds-rcs"} <= set(DEFENSES.names())
    for name in ("dds", "dds-rcs"):
        cls = DEFENSES.get(name)
        info = cls.info
        assert cls.name == name and info.kind == "certified" and info.randomized
        assert info.certificates == ("smoothing",) and info.default_protocol == "quick" and info.smoothed
        assert {"paper", "cpu"} <= set(cls.recipes)
    assert "Carlini" in DEFENSES.get("dds").info.paper and DEFENSES.get("dds").info.year == 2023
    assert "Hedayatnia" in DEFENSES.get("dds-rcs").info.paper


def test_default_hparams() -> None:
    assert DEFENSES.get("dds")().resolve_hparams({}, 8, "cpu") == {
        "arch": "cnn-tiny", "sigma": 0.25, "denoiser": "train", "denoiser_width": 8, "train_on": "denoised",
        "robust_noise": False, "robust_steps": 2, "robust_step_size": 0.1, "robust_eps_max": None}
    assert DEFENSES.get("dds")().resolve_hparams({}, 32, "paper")["denoiser_width"] == 32
    rcs = DEFENSES.get("dds-rcs")().resolve_hparams({}, 8, "cpu")
    assert rcs["robust_noise"] is True and (rcs["robust_steps"], rcs["robust_step_size"]) == (2, 0.1)


@pytest.mark.parametrize(("given", "message"), [
    ({"sigma": -1}, "sigma"), ({"sigma": "x"}, "sigma"), ({"train_on": "noisy"}, "train_on"),
    ({"robust_noise": "maybe"}, "robust_noise"), ({"robust_steps": 0}, "robust_steps"),
    ({"denoiser_width": 0}, "denoiser_width"), ({"denoiser_width": "wide"}, "denoiser_width"),
    ({"robust_noise": True, "train_on": "clean"}, "train_on=denoised"),
    ({"denoiser": "./no/such/dir"}, "not a directory"), ({"denoiser": ""}, "denoiser"), ({"noise": 1}, "unknown"),
])
def test_invalid_hparams_are_one_line_bench_errors(given: dict, message: str) -> None:
    with pytest.raises(BenchError, match=message) as err:
        DEFENSES.get("dds")().resolve_hparams(given, 8, "cpu")
    assert "\n" not in str(err.value)


def test_module_imports_without_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; import bench.defenses.dds as d; d.DDS().resolve_hparams({}, 8, 'cpu'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    from bench.models.dds import DDSModel

    assert DDSModel.__name__ == "DDSModel"


# -- pretrained denoisers (diffusers save_pretrained layouts) ------------------------------------------
@pytest.mark.parametrize("layout", ["pipeline", "flat"])
def test_local_pretrained_denoiser_is_loaded_with_its_schedule(tmp_path: Path, layout: str) -> None:
    from diffusers import DDPMScheduler

    torch.manual_seed(3)
    unet = ddpm.tiny_unet(1, 8, width=8)
    scheduler = DDPMScheduler(num_train_timesteps=500, beta_schedule="linear", beta_start=1e-4, beta_end=0.04)
    root = tmp_path / "ddpm"
    unet.save_pretrained(root / "unet" if layout == "pipeline" else root)
    scheduler.save_pretrained(root / "scheduler" if layout == "pipeline" else root)
    defense, model = build(denoiser=str(root))
    assert model.denoiser_source == str(root.resolve())
    for key, value in unet.state_dict().items():
        assert torch.equal(model.denoiser.state_dict()[key], value)
    assert model.t_star == ddpm.timestep_for_sigma(scheduler.alphas_cumprod, 0.25) != 145
    # a classifier-only checkpoint fits a model whose denoiser is pretrained
    classifier = {k: v for k, v in model.state_dict().items() if not k.startswith("denoiser.")}
    defense.load_state_dict(model, classifier)


def test_pretrained_denoiser_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BenchError, match="no UNet"):
        build(denoiser=str(empty))
    ddpm.tiny_unet(1, 8, width=8).save_pretrained(tmp_path / "unet_only")
    with pytest.raises(BenchError, match="no noise schedule"):
        build(denoiser=str(tmp_path / "unet_only"))
    rgb = tmp_path / "rgb"
    ddpm.tiny_unet(3, 8, width=8).save_pretrained(rgb)
    ddpm.require_diffusers().DDPMScheduler().save_pretrained(rgb)
    with pytest.raises(BenchError, match="3-channel"):
        build(denoiser=str(rgb))


def test_checkpoint_without_denoiser_needs_a_pretrained_denoiser() -> None:
    defense, model = build()
    classifier = {k: v for k, v in model.state_dict().items() if not k.startswith("denoiser.")}
    with pytest.raises(CheckpointError, match="no denoiser weights"):
        defense.load_state_dict(model, classifier)
    defense.load_state_dict(model, model.state_dict())


# -- training ---------------------------------------------------------------------------------------------
def _unet_calls(model) -> list[int]:
    calls = [0]
    model.denoiser.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("train_on", ["denoised", "clean"])
def test_fit_trains_and_caches_the_ddpm_then_the_classifier_with_the_denoiser_frozen(train_on: str) -> None:
    from bench.training.checkpoints import checkpoint_dir

    train = get_dataset("synthetic").load("train")
    defense, model = build(train_on=train_on)
    dds_module.fit_denoiser(model, train, TINY, spec=spec(), device=CPU, seed=0, progress=_progress())
    (cached,) = checkpoint_dir().glob("ddpm-synthetic-*.pt")
    trained_unet = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    # a fresh model loads the cached denoiser instead of training it again
    _, fresh = build(train_on=train_on, seed=1)
    calls = _unet_calls(fresh)
    classifier_before = {k: v.clone() for k, v in fresh.net.state_dict().items()}
    defense.fit(fresh, train, TINY, spec=spec(), device=CPU)
    assert list(checkpoint_dir().glob("ddpm-synthetic-*.pt")) == [cached]
    for key, value in fresh.denoiser.state_dict().items():
        assert torch.equal(value, trained_unet[key])  # loaded, and frozen during classifier training
    assert any(not torch.equal(v, classifier_before[k]) for k, v in fresh.net.state_dict().items())
    steps = -(-len(train) // TINY.batch_size)
    assert calls[0] == (steps if train_on == "denoised" else 0)


def test_robust_training_feeds_every_training_step_its_adversarial_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    train = get_dataset("synthetic").load("train")
    defense, model = build("dds-rcs")
    used: list[bool] = []
    original = model.draw_noise

    def spy(x):
        used.append(model._pending_noise is not None)
        return original(x)

    monkeypatch.setattr(model, "draw_noise", spy)
    calls = _unet_calls(model)
    dds_module.fit_denoiser(model, train, TINY, spec=spec(), device=CPU, seed=0, progress=_progress())
    calls[0] = 0
    defense.fit(model, train, TINY, spec=spec(), device=CPU)
    steps = -(-len(train) // TINY.batch_size)
    assert used == [True] * steps and model._pending_noise is None
    assert calls[0] == steps * 3  # K = 2 adversarial passes + the training pass


def _progress():
    from bench.progress import Progress

    return Progress()


# -- the smoothing certifier on models that add their own noise -------------------------------------------
class Recorder(nn.Module):
    """Records its inputs; votes class 0."""

    randomized = True
    randomness_per_example = True
    num_classes = 3
    sigma = 0.25

    def __init__(self, adds_noise: bool) -> None:
        super().__init__()
        self.adds_smoothing_noise = adds_noise
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return torch.tensor([1.0, 0.0, 0.0]).expand(len(x), 3)


@pytest.mark.parametrize("per_example", [True, False])
def test_sample_counts_adds_no_noise_to_a_model_that_adds_its_own(per_example: bool) -> None:
    from bench.certifiers.smoothing import input_noise_sigma, sample_counts

    x = torch.rand(3, 1, 8, 8)
    own = Recorder(adds_noise=True)
    own.randomness_per_example = per_example
    counts = sample_counts(own, x, 7, sigma=0.25, batch=8)
    assert counts.tolist() == [[7, 0, 0]] * 3
    seen = torch.cat(own.seen)
    assert len(seen) == 21 and all(any(torch.equal(row, xi) for xi in x) for row in seen)
    plain = Recorder(adds_noise=False)
    sample_counts(plain, x, 7, sigma=0.25, batch=8)
    assert not any(torch.equal(row, xi) for row in torch.cat(plain.seen) for xi in x)
    assert input_noise_sigma(own, 0.25) == 0.0 and input_noise_sigma(plain, 0.25) == 0.25


def test_smoothing_certifier_uses_the_nominal_sigma_and_refuses_another() -> None:
    from bench.certifiers.smoothing import Smoothing

    model = toy_model(ZeroDenoiser(), sigma=0.25)
    assert Smoothing(n0=10, n=20).prepare(model)["sigma"] == 0.25
    assert Smoothing(n0=10, n=20, sigma=0.25).prepare(model)["sigma"] == 0.25
    with pytest.raises(BenchError, match="adds its own smoothing noise at sigma 0.25") as err:
        Smoothing(n0=10, n=20, sigma=0.5).prepare(model)
    assert "\n" not in str(err.value)


def test_certifier_feeds_a_dds_model_the_clean_image_and_counts_its_own_draws() -> None:
    from bench.certifiers.smoothing import Smoothing

    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8)
    model = toy_model(ZeroDenoiser(), sigma=0.5).eval()
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    certs = Smoothing(n0=20, n=30, alpha=0.01, batch=16).certify(model, x)
    rows = torch.cat(seen)
    assert len(rows) == 2 * (20 + 30)
    assert all(torch.equal(row, x[0]) or torch.equal(row, x[1]) for row in rows)  # no certifier noise
    assert all(c.samples == 50 and c.count_a <= 30 for c in certs)


# -- end to end ---------------------------------------------------------------------------------------------
def test_run_certifies_with_the_model_sigma_and_refuses_cli_sigma(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bench.cli import app
    from bench.config import RunConfig
    from bench.harness.runner import execute
    from bench.results.queries import run_summary
    from bench.results.store import Store
    from helpers import assert_cli_user_error

    monkeypatch.setitem(DEFENSES.get("dds").recipes, "cpu", TINY)
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    config = RunConfig(defense="dds", dataset="synthetic", certify=("smoothing",), n_examples=4,
                       certify_params=(("n", 40), ("n0", 10)), hparams=(("denoiser_width", 8),))
    summary = run_summary(store, execute(config, store))
    assert summary["certificate"][0]["sigma"] == 0.25
    result = CliRunner().invoke(app, ["run", "--defense", "dds", "--dataset", "synthetic", "--certify", "smoothing",
                                      "--sigma", "0.5", "--hparam", "denoiser_width=8", "--db",
                                      f"sqlite:///{tmp_path / 'cli.db'}"])
    assert_cli_user_error(result, "adds its own smoothing noise")

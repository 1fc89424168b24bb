"""Every registered attack adapter (bench.attacks.library, bench.attacks.autoattack and pgd) against
the attack contract, on tiny models trained on the synthetic data with small budgets."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bench.attacks.base import Attack
from bench.config import Norm, ThreatModel
from bench.data.base import Split
from bench.errors import BenchError
from bench.models.defended import DefendedModel
from bench.registry import ATTACKS
from helpers import SYNTHETIC_MEAN, SYNTHETIC_SHAPE, SYNTHETIC_STD, accuracy, linear_model, train_full_batch

# small budgets, so the whole file stays fast on a CPU
SMALL: dict[str, dict[str, Any]] = {
    "pgd": {"steps": 10},
    "fgsm": {},
    "mifgsm": {"steps": 5},
    "cw-l2": {"steps": 20, "c": 10.0, "lr": 0.1},
    "deepfool": {"steps": 10},
    "apgd-ce": {"n_iter": 10},
    "apgd-dlr": {"n_iter": 10},
    "apgd-t": {"n_iter": 10},
    "fab-t": {"n_iter": 10},
    "square": {"n_queries": 100},
    "autoattack": {"n_iter": 5, "n_queries": 100},
}
NAMES = [n for n in ATTACKS.names() if n in SMALL]  # plugins and attacks tested elsewhere are skipped
NEW = [n for n in NAMES if n != "pgd"]  # the adapters of library.py and autoattack.py
CASES = [(n, norm) for n in NAMES for norm in ATTACKS.get(n).info.norms]
CASE_IDS = [f"{n}-{norm.value}" for n, norm in CASES]
SEEDED = [n for n in NAMES if "seed" in ATTACKS.get(n).defaults]

THREATS = {Norm.LINF: ThreatModel(Norm.LINF, 0.1), Norm.L2: ThreatModel(Norm.L2, 0.5)}
LARGE = {Norm.LINF: ThreatModel(Norm.LINF, 0.3), Norm.L2: ThreatModel(Norm.L2, 2.0)}
N_EXAMPLES = 32


def make(name: str, **params: Any) -> Attack:
    return ATTACKS.get(name)(**{**SMALL[name], **params})


def perturbation(x: torch.Tensor, x_adv: torch.Tensor, norm: Norm) -> torch.Tensor:
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm is Norm.LINF else delta.norm(dim=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster than several, and steadier on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def xy(data: tuple[Split, Split]) -> tuple[torch.Tensor, torch.Tensor]:
    test = data[1]
    return test.images[:N_EXAMPLES], test.labels[:N_EXAMPLES]


@pytest.fixture(scope="module")
def trained(data: tuple[Split, Split]) -> DefendedModel:
    return train_full_batch(linear_model(0), data[0])


def _subset_model(data: tuple[Split, Split], n_classes: int,
                  task: str) -> tuple[DefendedModel, torch.Tensor, torch.Tensor]:
    """A linear model trained on the first ``n_classes`` classes, with test examples of those."""
    train, test = data
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, n_classes))
    model = DefendedModel(net, SYNTHETIC_MEAN, SYNTHETIC_STD, SYNTHETIC_SHAPE, n_classes, task=task)
    keep = train.labels < n_classes
    train_full_batch(model, Split("synthetic", "train", train.images[keep], train.labels[keep]))
    keep = test.labels < n_classes
    return model, test.images[keep][:N_EXAMPLES], test.labels[keep][:N_EXAMPLES]


@pytest.fixture(scope="module")
def binary(data: tuple[Split, Split]) -> tuple[DefendedModel, torch.Tensor, torch.Tensor]:
    return _subset_model(data, 2, "binary")


@pytest.fixture(scope="module")
def three_class(data: tuple[Split, Split]) -> tuple[DefendedModel, torch.Tensor, torch.Tensor]:
    return _subset_model(data, 3, "multiclass")


@pytest.fixture(scope="module")
def batchnorm_model(data: tuple[Split, Split]) -> DefendedModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 64, 4))
    model = DefendedModel(net, SYNTHETIC_MEAN, SYNTHETIC_STD, SYNTHETIC_SHAPE, 4)
    return train_full_batch(model, data[0], steps=30)


# -- fixtures are meaningful -----------------------------------------------------------------
def test_adapters_are_registered_and_models_are_accurate(trained, binary, three_class, batchnorm_model, xy) -> None:
    assert {"fgsm", "mifgsm", "cw-l2", "deepfool", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square",
            "autoattack"} <= set(NEW)
    x, y = xy
    assert accuracy(trained, x, y) >= 0.9
    assert accuracy(batchnorm_model, x, y) >= 0.9
    for model, xs, ys in (binary, three_class):
        assert accuracy(model, xs, ys) >= 0.9


@pytest.mark.parametrize("name", NEW)
def test_docstring_names_source_and_parameters(name: str) -> None:
    cls = ATTACKS.get(name)
    doc = cls.__doc__ or ""
    assert cls.info.source and cls.info.source in doc
    for param in cls.defaults:
        assert f"``{param}``" in doc, (name, param)


# -- the contract, for every attack and norm -------------------------------------------------
@pytest.mark.parametrize(("name", "norm"), CASES, ids=CASE_IDS)
def test_result_inside_ball_and_box_and_not_better_than_clean(trained, xy, name: str, norm: Norm) -> None:
    x, y = xy
    threat = THREATS[norm]
    result = make(name)(trained, x, y, threat)
    assert result.x_adv.shape == x.shape
    assert float(perturbation(x, result.x_adv, norm).max()) <= threat.eps + 1e-6
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    with torch.no_grad():
        predictions = trained(result.x_adv).argmax(1)
    assert torch.equal(result.predictions, predictions)
    assert torch.equal(result.success, predictions != y)
    robust = float((~result.success).float().mean())
    assert robust <= accuracy(trained, x, y)
    assert result.forward_passes > 0
    if ATTACKS.get(name).info.needs_grad:
        assert result.backward_passes > 0
    else:
        assert result.backward_passes == 0


@pytest.mark.parametrize(("name", "norm"), CASES, ids=CASE_IDS)
def test_large_eps_lowers_accuracy(trained, xy, name: str, norm: Norm) -> None:
    x, y = xy
    result = make(name)(trained, x, y, LARGE[norm])
    assert float((~result.success).float().mean()) < accuracy(trained, x, y)


@pytest.mark.parametrize(("name", "norm"), CASES, ids=CASE_IDS)
def test_zero_eps_returns_clean_predictions(trained, xy, name: str, norm: Norm) -> None:
    x, y = xy
    result = make(name)(trained, x, y, ThreatModel(norm, 0.0))
    assert torch.equal(result.x_adv, x)
    with torch.no_grad():
        assert torch.equal(result.predictions, trained(x).argmax(1))


@pytest.mark.parametrize("name", NAMES)
def test_model_mode_and_batchnorm_statistics_are_restored(batchnorm_model, xy, name: str) -> None:
    x, y = xy
    norm = ATTACKS.get(name).info.norms[0]
    bn = batchnorm_model.net[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    batchnorm_model.train()
    try:
        make(name)(batchnorm_model, x, y, THREATS[norm])
        assert batchnorm_model.training
        assert all(m.training for m in batchnorm_model.modules())
    finally:
        batchnorm_model.eval()
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_is_kept(trained, xy, name: str) -> None:
    x, y = xy
    trained.eval()
    make(name)(trained, x, y, THREATS[ATTACKS.get(name).info.norms[0]])
    assert not any(m.training for m in trained.modules())


# -- seeds and side effects ------------------------------------------------------------------
@pytest.mark.parametrize("name", SEEDED)
def test_same_seed_same_result_and_global_rng_untouched(trained, xy, name: str) -> None:
    x, y = xy
    norm = ATTACKS.get(name).info.norms[0]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = make(name, seed=3)(trained, x, y, THREATS[norm])
    if name != "pgd":  # pyautoattack reseeds the global generator; the adapters must not leak that
        assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # the seed parameter, not the caller's state, decides the result
    second = make(name, seed=3)(trained, x, y, THREATS[norm])
    assert torch.equal(first.x_adv, second.x_adv)


@pytest.mark.parametrize("name", [n for n in NEW if ATTACKS.get(n).info.stochastic is False])
def test_deterministic_attacks_repeat_exactly(trained, xy, name: str) -> None:
    x, y = xy
    norm = ATTACKS.get(name).info.norms[0]
    assert torch.equal(make(name)(trained, x, y, THREATS[norm]).x_adv, make(name)(trained, x, y, THREATS[norm]).x_adv)


def test_autoattack_restores_the_trace_function_and_is_quiet(trained, xy, capsys: pytest.CaptureFixture) -> None:
    x, y = xy

    def tracer(frame: Any, event: str, arg: Any) -> None:  # global events only: cheap
        return None

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        make("autoattack")(trained, x[:8], y[:8], THREATS[Norm.LINF])
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(old)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# -- class counts ----------------------------------------------------------------------------
def test_target_count_rule() -> None:
    from bench.attacks.autoattack import max_targets

    assert [max_targets(c) for c in (2, 3, 4, 10, 11, 100)] == [1, 2, 3, 9, 9, 9]


@pytest.mark.parametrize(("name", "needed"), [("apgd-dlr", 3), ("apgd-t", 4)])
def test_dlr_attacks_refuse_a_binary_model(binary, name: str, needed: int) -> None:
    model, x, y = binary
    for eps in (0.1, 0.0):  # the answer does not depend on eps (no eps == 0 short cut)
        with pytest.raises(BenchError, match=f"needs at least {needed} classes .*DLR loss"):
            make(name)(model, x, y, ThreatModel(Norm.LINF, eps))


def test_targeted_dlr_refuses_three_classes_and_dlr_runs(three_class) -> None:
    model, x, y = three_class
    with pytest.raises(BenchError, match="needs at least 4 classes"):
        make("apgd-t")(model, x, y, THREATS[Norm.LINF])
    result = make("apgd-dlr")(model, x, y, LARGE[Norm.LINF])
    assert float((~result.success).float().mean()) < accuracy(model, x, y)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("apgd-dlr", "apgd-t")])
def test_other_attacks_run_on_a_binary_model(binary, name: str) -> None:
    model, x, y = binary
    norm = ATTACKS.get(name).info.norms[0]
    result = make(name)(model, x, y, LARGE[norm])
    assert float(perturbation(x, result.x_adv, norm).max()) <= LARGE[norm].eps + 1e-6
    assert float((~result.success).float().mean()) < accuracy(model, x, y)


def test_autoattack_plans_only_the_components_that_can_run() -> None:
    suite = ATTACKS.get("autoattack")
    assert suite().attacks_run(10) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert suite().attacks_run(3) == ["apgd-ce", "fab-t", "square"]
    assert suite().attacks_run(2) == ["apgd-ce", "fab-t", "square"]
    assert suite(version="plus").attacks_run(2) == ["apgd-ce", "fab", "square", "fab-t"]
    assert suite(version="rand").attacks_run(2) == ["apgd-ce"]
    assert suite(version="rand").attacks_run(4) == ["apgd-ce", "apgd-dlr"]


@pytest.mark.parametrize("version", ["plus", "rand"])
def test_autoattack_versions_run(trained, xy, version: str) -> None:
    x, y = xy
    threat = LARGE[Norm.L2]
    result = make("autoattack", version=version)(trained, x[:8], y[:8], threat)
    assert float(perturbation(x[:8], result.x_adv, Norm.L2).max()) <= threat.eps + 1e-6
    assert float((~result.success).float().mean()) < accuracy(trained, x[:8], y[:8])


def test_class_count_from_logits_when_undeclared(trained, three_class) -> None:
    """A model without ``num_classes``: the width of its logits decides."""
    model, x, y = three_class
    bare = nn.Sequential(model.normalize, model.net).eval()
    with pytest.raises(BenchError, match="needs at least 4 classes"):
        make("apgd-t")(bare, x, y, THREATS[Norm.LINF])
    bare4 = nn.Sequential(trained.normalize, trained.net).eval()
    result = make("apgd-t")(bare4, x, y, LARGE[Norm.LINF])
    assert bool(result.success.any())


# -- user errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_multilabel_model_is_refused(name: str) -> None:
    torch.manual_seed(0)
    model = DefendedModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), SYNTHETIC_MEAN, SYNTHETIC_STD,
                          SYNTHETIC_SHAPE, 3, task="multilabel").eval()
    x = torch.rand(4, *SYNTHETIC_SHAPE)
    y = torch.randint(0, 2, (4, 3))
    norm = ATTACKS.get(name).info.norms[0]
    for eps in (0.1, 0.0):
        with pytest.raises(BenchError, match="multilabel"):
            make(name)(model, x, y, ThreatModel(norm, eps))


@pytest.mark.parametrize("name", NAMES)
def test_unknown_parameter_is_refused(name: str) -> None:
    with pytest.raises(BenchError, match="unknown parameter"):
        ATTACKS.get(name)(no_such_param=1)


@pytest.mark.parametrize(("name", "params"), [
    ("mifgsm", {"steps": 0}), ("mifgsm", {"step_size": -0.1}), ("cw-l2", {"c": 0}), ("cw-l2", {"steps": 1.5}),
    ("deepfool", {"overshoot": -1}), ("apgd-ce", {"n_iter": 0}), ("apgd-dlr", {"seed": -1}),
    ("apgd-t", {"n_target_classes": 0}), ("fab-t", {"eta": 0}), ("square", {"n_queries": "many"}),
    ("square", {"rescale_schedule": "maybe"}), ("autoattack", {"version": "custom"}), ("autoattack", {"n_iter": 0}),
])
def test_bad_parameter_values_are_refused(name: str, params: dict[str, Any]) -> None:
    if name not in NAMES:
        pytest.skip(f"{name} is not registered")
    with pytest.raises(BenchError, match=name):
        ATTACKS.get(name)(**params)


def test_integral_floats_are_accepted_as_integers() -> None:
    attack = ATTACKS.get("apgd-ce")(n_iter=10.0)
    assert attack.params["n_iter"] == 10 and isinstance(attack.params["n_iter"], int)


UNSUPPORTED = [(n, norm) for n in NAMES for norm in (Norm.LINF, Norm.L2) if norm not in ATTACKS.get(n).info.norms]


@pytest.mark.parametrize(("name", "norm"), UNSUPPORTED, ids=[f"{n}-{m.value}" for n, m in UNSUPPORTED])
def test_unsupported_norm_is_refused(trained, xy, name: str, norm: Norm) -> None:
    x, y = xy
    with pytest.raises(BenchError, match="does not support"):
        make(name)(trained, x, y, THREATS[norm])

"""Model capabilities: declared once (bench.capabilities.Capabilities, inherited by DefendedModel),
read by one reader that sees through wrappers, and agreeing with every registered defense's info."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.attacks.base import PassCounter
from bench.attacks.wrappers import ExpectationModel
from bench.capabilities import CAPABILITIES, Capabilities, capability, shares_randomness, wrapped
from bench.data.base import get_dataset
from bench.models.defended import DefendedModel
from bench.registry import DEFENSES

# a value different from the default for every capability
DECLARED = {"randomized": True, "randomness_per_example": True, "smoothed_evaluation": True, "sigma": 0.5,
            "adds_smoothing_noise": True, "lipschitz_bound": 2.0, "lipschitz_guarantee": "by construction (test)",
            "logit_clip": 1.0, "task": "multilabel", "num_classes": 3, "draw_space": 4}


class _Everything(DefendedModel):
    """Declares every capability with a non-default value."""

    randomized = True
    randomness_per_example = True
    smoothed_evaluation = True
    adds_smoothing_noise = True
    lipschitz_bound = 2.0
    lipschitz_guarantee = "by construction (test)"
    logit_clip = 1.0
    draw_space = 4

    def __init__(self) -> None:
        super().__init__(nn.Flatten(), (0.0,), (1.0,), (1, 2, 2), 3, "multilabel")
        self.sigma = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3]


def test_the_declarations_are_the_documented_capabilities_with_their_defaults() -> None:
    assert set(DECLARED) == set(CAPABILITIES)
    assert issubclass(DefendedModel, Capabilities)
    plain = DefendedModel(nn.Flatten(), (0.0,), (1.0,), (1, 2, 2), 4)
    for name in CAPABILITIES:
        assert f"``{name}``" in (Capabilities.__doc__ or ""), f"{name} is not documented"
        if name not in ("task", "num_classes"):  # set by DefendedModel.__init__
            assert capability(plain, name) == getattr(Capabilities, name), name
    assert (capability(plain, "task"), capability(plain, "num_classes")) == ("multiclass", 4)


def test_a_misspelt_capability_name_raises_instead_of_reading_a_default() -> None:
    with pytest.raises(KeyError, match="randomised"):
        capability(_Everything(), "randomised")
    with pytest.raises(KeyError, match="num_class"):
        capability(nn.Linear(2, 2), "num_class")


def test_a_module_that_declares_nothing_reads_the_defaults() -> None:
    linear = nn.Linear(4, 2)
    assert {name: capability(linear, name) for name in CAPABILITIES} == \
        {name: getattr(Capabilities, name) for name in CAPABILITIES}


WRAPPERS = {
    "pass counter": PassCounter,
    "expectation": lambda model: ExpectationModel(model, draws=2),
    "counter around expectation": lambda model: PassCounter(ExpectationModel(PassCounter(model), draws=2)),
    "torch.compile": torch.compile,  # compiled lazily: building the wrapper is cheap
    "DataParallel": nn.DataParallel,
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_the_reader_sees_through_every_wrapper(wrapper: str) -> None:
    model = _Everything()
    outer = WRAPPERS[wrapper](model)
    assert model in list(wrapped(outer))
    assert {name: capability(outer, name) for name in CAPABILITIES} == DECLARED
    assert not shares_randomness(outer)


def test_a_plain_module_declares_what_it_has_and_a_wrapper_declaration_overrides_the_wrapped_model() -> None:
    class Shared(nn.Module):
        randomized = True  # randomness_per_example undeclared: one draw per pass

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class OneDraw(nn.Module):
        randomized = False  # one frozen draw of the wrapped model is deterministic

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

    assert shares_randomness(Shared()) and shares_randomness(PassCounter(Shared()))
    frozen = OneDraw(_Everything())
    assert capability(frozen, "randomized") is False
    assert capability(frozen, "task") == "multilabel" and capability(frozen, "lipschitz_bound") == 2.0


def test_wrappers_hold_no_copies_of_the_declarations() -> None:
    counter = PassCounter(ExpectationModel(_Everything(), draws=2))
    for module in list(wrapped(counter))[:-1]:
        assert not any(name in vars(module) for name in CAPABILITIES), type(module).__name__


def test_the_expectation_of_a_multilabel_model_averages_probabilities_per_label() -> None:
    expected = ExpectationModel(PassCounter(_Everything()), draws=3)
    x = torch.tensor([[[[0.0, 2.0], [-1.0, 5.0]]]])
    assert torch.allclose(expected(x), x.flatten(1)[:, :3], atol=1e-5)  # logit of the mean sigmoid


# -- every registered defense: its info agrees with the model it builds ----------------------------------
def _build(name: str) -> tuple[object, DefendedModel]:
    if name.startswith("dds"):
        pytest.importorskip("diffusers", reason="the dds defenses build a diffusers UNet")
    spec = get_dataset("synthetic").spec
    defense = DEFENSES.get(name)()
    given = {"denoiser_width": 8} if name.startswith("dds") else {}
    given = {"model": "torch.nn:Flatten"} if name == "model" else given  # any factory: only declarations are read
    hparams = defense.resolve_hparams(given, spec.image_size, "cpu")
    torch.manual_seed(0)
    return defense.info, defense.build(spec, spec.image_size, **hparams)


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_info_agrees_with_the_model_it_builds(name: str, one_thread) -> None:
    info, model = _build(name)
    spec = get_dataset("synthetic").spec
    assert isinstance(model, DefendedModel)
    assert info.randomized == capability(model, "randomized")
    assert info.smoothed == capability(model, "smoothed_evaluation")
    if "lipschitz" in info.certificates:
        assert capability(model, "lipschitz_bound") is not None and capability(model, "lipschitz_guarantee")
    if info.smoothed or "smoothing" in info.certificates or capability(model, "adds_smoothing_noise"):
        assert capability(model, "sigma") is not None
    if info.randomized:  # a randomized model must be able to fix one draw
        assert type(model).freeze_randomness is not DefendedModel.freeze_randomness
    if capability(model, "draw_space") is not None:  # an enumerable draw space comes with its enumerator
        assert info.randomized and callable(getattr(model, "enumerate_draws", None))
    assert (capability(model, "task"), capability(model, "num_classes")) == (spec.task, spec.num_classes)

"""The EOT saturation check (bench/harness/saturation.py): it triggers on a randomized model whose
per-draw gradients are so noisy that EOT with few draws and steps fails where doubling them
succeeds, stays quiet where the attack saturates, is stored once per threat model after the
attacks of a randomized run (never for a deterministic one, never twice on resume), and its
remedy is EOT with 4x K and 4x steps."""

from __future__ import annotations

import pytest
import torch

from bench.config import AttackSpec, Norm, RunConfig, ThreatModel
from bench.defenses.base import Defense, DefenseInfo, Recipe
from bench.harness import runner, saturation as sat
from bench.harness.escalate import remedies_for
from bench.harness.runner import execute
from bench.models.defended import DefendedModel
from bench.registry import DEFENSES
from bench.results.schema import RunStatus
from bench.results.store import Store
from helpers import built_as, linear_model, train_full_batch


class NoisyGradientModel(DefendedModel):
    """Adds ``amplitude / freq * sin(freq * <w_c, x>)`` to each logit c, with fresh Gaussian w per
    example, class and pass: the value moves by at most amplitude / freq (0.02), but each draw's
    input gradient carries a random term of size ~amplitude * |w| that averages out only over
    many draws, so EOT needs many draws (and steps) to follow the true gradient."""

    randomized = True
    randomness_per_example = True
    amplitude, freq = 20.0, 1000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        w = torch.randn(x.shape[0], logits.shape[1], x[0].numel(), device=x.device)
        phase = torch.einsum("bcd,bd->bc", w, x.flatten(1)) * self.freq
        return logits + self.amplitude / self.freq * torch.sin(phase)


def noisy(base: DefendedModel, amplitude: float) -> NoisyGradientModel:
    model = NoisyGradientModel(base.net, (0.5,), (0.25,), (1, 8, 8), 4)
    model.amplitude = amplitude
    return model.eval()


def eot(eps: float, draws: int, steps: int) -> AttackSpec:
    return AttackSpec("eot", ThreatModel(Norm.LINF, eps), (("attack", "pgd"), ("draws", draws),
                                                           ("params", {"restarts": 1, "steps": steps})))


@pytest.fixture(scope="module")
def trained(data):
    train, test = data
    torch.manual_seed(0)
    return train_full_batch(linear_model(0), train), test


def test_noisy_gradients_trigger_the_check(trained, one_thread):
    base, test = trained
    result = sat.eot_saturation(noisy(base, 20.0), test.images, test.labels, eot(0.2, 4, 10), draws=10, seed=0)
    assert result.name == "eot_saturation"
    assert result.triggered, result.detail
    assert "Linf 0.2" in result.detail and "K=4, 10 steps" in result.detail and "K=8, 20 steps" in result.detail


def test_a_saturated_attack_does_not_trigger(trained, one_thread):
    """Almost no gradient noise: EOT-PGD on the (nearly linear) model finds the same optimum at
    both budgets, so the two figures agree."""
    base, test = trained
    model = noisy(base, 0.05)
    result = sat.eot_saturation(model, test.images, test.labels, eot(0.1, 4, 10), draws=10, seed=0)
    assert not result.triggered, result.detail
    assert "saturated within the interval" in result.detail


def test_deterministic_for_a_fixed_seed_and_leaves_the_random_state(trained, one_thread):
    base, test = trained
    model, spec = noisy(base, 20.0), eot(0.2, 2, 5)
    state = torch.random.get_rng_state()
    first = sat.eot_saturation(model, test.images[:24], test.labels[:24], spec, draws=4, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = sat.eot_saturation(model, test.images[:24], test.labels[:24], spec, draws=4, seed=3)
    assert first == again


def test_judge_uses_the_paired_t_half_width():
    spec = eot(0.1, 10, 20)
    stronger = sat.scaled_eot(spec, 2)
    before = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    # differences 0.1, 0.1, 0.1, 0.5: mean 0.2, s 0.2, t_{0.975,3} = 3.182 -> half-width 0.318 > 0.2
    assert not sat.judge(spec, stronger, before, before - torch.tensor([0.1, 0.1, 0.1, 0.5]), 10).triggered
    # a constant lowering has a zero-width interval: triggered
    assert sat.judge(spec, stronger, before, before - 0.1, 10).triggered
    assert not sat.judge(spec, stronger, before, before, 10).triggered  # no difference
    assert abs(sat.paired_half_width(torch.tensor([0.1, 0.1, 0.1, 0.5], dtype=torch.float64)) - 0.31825) < 1e-4


def test_scaled_budgets():
    doubled = sat.scaled_eot(eot(0.1, 10, 20), 2)
    assert doubled.kwargs["draws"] == 20 and doubled.kwargs["params"] == {"restarts": 1, "steps": 40}
    default = sat.scaled_eot(AttackSpec("eot", ThreatModel(Norm.L2, 0.5)), 4)  # K=20, PGD-20 by default
    assert default.kwargs["draws"] == 80 and default.kwargs["params"]["steps"] == 80
    nested = AttackSpec("eot", ThreatModel(Norm.L2, 0.5), (("attack", "bpda"), ("draws", 5),
                                                           ("params", {"attack": "pgd", "params": {"steps": 7}})))
    assert sat.scaled_eot(nested, 2).kwargs["params"]["params"]["steps"] == 14
    assert sat.eot_budget(eot(0.1, 10, 20)) == "K=10, 20 steps"


def test_the_remedy_is_four_times_k_and_steps_at_the_flagged_threat_only():
    linf, l2 = ThreatModel(Norm.LINF, 0.1), ThreatModel(Norm.L2, 0.5)
    attacks = (eot(0.1, 10, 20), AttackSpec("square", linf, (("n_queries", 1000),)),
               AttackSpec("eot", l2, (("attack", "pgd"), ("draws", 10), ("params", {"steps": 20}))))
    ((check, spec),) = remedies_for([sat.check_name(linf)], [linf, l2], True, attacks)
    assert check == "eot_saturation Linf 0.1" and spec.threat == linf
    assert spec.kwargs["draws"] == 40 and spec.kwargs["params"] == {"restarts": 1, "steps": 80}
    assert [s.threat for _, s in remedies_for([sat.check_name(linf), sat.check_name(l2)], [linf, l2], True,
                                              attacks)] == [linf, l2]


# -- the hook in bench run ---------------------------------------------------------------------------
_RECIPE = Recipe(epochs=6, batch_size=32, optimizer="adam", lr=1e-2, weight_decay=0.0, schedule="none")


class NoisyGradient(Defense):
    """Test-only randomized defense: the noisy-gradient model around a small network."""

    info = DefenseInfo(paper="(test)", year=None, kind="randomized", randomized=True)
    recipes = {"paper": _RECIPE, "cpu": _RECIPE}

    def build(self, spec, image_size, **hparams):
        return built_as(NoisyGradientModel, self, spec, image_size, **hparams)


if "test-noisy-gradient" not in DEFENSES:
    DEFENSES.register("test-noisy-gradient", NoisyGradient)


def _config(defense: str, attacks: tuple[str, ...] = ("eot",)) -> RunConfig:
    return RunConfig(defense=defense, dataset="synthetic", attacks=attacks, norm="Linf", eps=(0.1, 0.2), steps=4,
                     draws=4, n_examples=24)


def _saturation_checks(store: Store, run_id: int) -> list[str]:
    return sorted(c.name for c in store.checks(run_id) if c.name.startswith(sat.CHECK))


@pytest.fixture
def calls(monkeypatch):
    """Counts the saturation checks computed."""
    seen: list[str] = []
    real = sat.eot_saturation

    def counting(model, x, y, spec, draws, seed, **kwargs):
        seen.append(spec.threat.label)
        return real(model, x, y, spec, draws, seed, **kwargs)

    monkeypatch.setattr(sat, "eot_saturation", counting)
    return seen


def test_a_randomized_run_stores_one_check_per_threat_model_once(tmp_path, calls, monkeypatch, one_thread):
    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    config = _config("test-noisy-gradient", ("eot", "square"))
    boom = KeyboardInterrupt("killed after the attacks")

    def interrupted(*args, **kwargs):
        raise boom

    monkeypatch.setattr(runner, "record_result_checks", interrupted)  # killed after the saturation checks
    with pytest.raises(KeyboardInterrupt):
        execute(config, store)
    assert calls == ["Linf 0.1", "Linf 0.2"]
    monkeypatch.undo()
    monkeypatch.setattr(sat, "eot_saturation", lambda *a, **k: pytest.fail("the stored check ran again"))
    run_id = execute(config, store)  # resumes: every stage and both checks are stored
    assert store.get_run(run_id).status is RunStatus.FINISHED
    assert _saturation_checks(store, run_id) == ["eot_saturation Linf 0.1", "eot_saturation Linf 0.2"]
    details = {c.name: c.detail for c in store.checks(run_id)}
    assert "K=20, 4 steps" in details["eot_saturation Linf 0.1"]
    assert "K=40, 8 steps" in details["eot_saturation Linf 0.1"]


def test_no_check_for_a_deterministic_model_or_without_eot(tmp_path, calls, one_thread):
    store = Store(f"sqlite:///{tmp_path / 'd.db'}")
    run_id = execute(_config("standard"), store)  # EOT of a deterministic model: no check
    assert _saturation_checks(store, run_id) == []
    run_id = execute(_config("test-noisy-gradient", ("pgd",)), store)  # randomized, no EOT stage
    assert _saturation_checks(store, run_id) == []
    assert calls == []

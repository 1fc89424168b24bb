"""``--escalate``: triggered checks get their standard remedy as extra stages; both results are
kept. A planted defense that rounds its input masks gradients (zero_gradient and large_eps fire),
PGD stalls, and the BPDA remedy breaks it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.config import AttackSpec, Norm, RunConfig, ThreatModel
from bench.defenses.base import Defense, DefenseInfo
from bench.defenses.baselines import Standard
from bench.harness.escalate import escalate, remedies_for
from bench.harness.runner import execute
from bench.models.defended import DefendedModel
from bench.registry import DEFENSES
from bench.results.queries import run_summary
from bench.results.store import Store
from helpers import built_as


class Rounding(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 2) / 2


class RoundingModel(DefendedModel):
    """Rounds its input to 3 grey levels before the network: zero input gradients everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.quant(x))

    def bpda_surrogates(self) -> dict[str, nn.Module]:
        return {"quant": nn.Identity()}


class RoundingDefense(Defense):
    """Test-only gradient-masking defense (input rounding)."""

    info = DefenseInfo(paper="(test)", year=None, kind="preprocessing")
    recipes = Standard.recipes

    def build(self, spec, image_size, **hparams):
        model = built_as(RoundingModel, self, spec, image_size, **hparams)
        model.quant = Rounding()
        return model


if "test-rounding" not in DEFENSES:
    DEFENSES.register("test-rounding", RoundingDefense)


@pytest.fixture(scope="module")
def escalated(tmp_path_factory):
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('esc') / 'e.db'}")
    run_id = execute(RunConfig(defense="test-rounding", dataset="digits", norm="Linf", eps=(0.3,),
                                     steps=10, n_examples=64), store)
    before = run_summary(store, run_id)
    ran = escalate(store, run_id)
    return store, run_id, before, ran, run_summary(store, run_id)


def test_masking_checks_fire_and_escalation_breaks_the_planted_defense(escalated):
    store, run_id, before, ran, after = escalated
    checks = {c["name"]: c for c in before["checks"]}
    assert checks["zero_gradient"]["triggered"] and checks["large_eps"]["triggered"], checks
    assert [r["attack"] for r in ran] == ["bpda", "square"]  # one threat model; deduplicated across the checks
    esc = after["escalation"]
    assert esc["robust_accuracy_before"] == pytest.approx(before["robust_accuracy"])  # the protocol's result kept
    assert esc["robust_accuracy_after"] == after["robust_accuracy"]
    assert after["robust_accuracy"] < before["robust_accuracy"] - 0.2, (before["robust_accuracy"], esc)
    bpda = next(a for a in after["attacks"] if a["name"] == "bpda")
    pgd = next(a for a in after["attacks"] if a["name"] == "pgd")
    assert bpda["accuracy"] < pgd["accuracy"]  # the remedy stage did the work, not Square alone
    assert {s["check"] for s in esc["stages"]} <= {"zero_gradient", "large_eps"}


def test_escalation_is_idempotent(escalated):
    store, run_id, _, _, after = escalated
    n_stages = len(store.evaluations(run_id))
    escalate(store, run_id)
    assert len(store.evaluations(run_id)) == n_stages
    assert run_summary(store, run_id)["robust_accuracy"] == after["robust_accuracy"]


def test_a_clean_run_has_nothing_to_escalate(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    run_id = execute(RunConfig(defense="standard", dataset="synthetic", eps=(0.1,), steps=3, n_examples=16), store)
    assert escalate(store, run_id) == []
    assert run_summary(store, run_id)["escalation"] is None


def test_remedies_per_check():
    threat = ThreatModel(Norm.LINF, 0.1)
    assert remedies_for(["train_mode", "softmax_output"], [threat], False) == []
    (check, spec), = remedies_for(["randomized"], [threat], False)
    assert (check, spec.attack, dict(spec.params)["draws"]) == ("randomized", "eot", 20)
    stages = remedies_for(["square_beats_whitebox", "zero_gradient"], [threat], True)
    assert [s.attack for _, s in stages] == ["eot", "square", "square"]
    assert [dict(s.params).get("n_queries") for _, s in stages] == [None, 5000, 10000]
    assert isinstance(stages[0][1], AttackSpec) and dict(stages[0][1].params)["attack"] == "bpda"

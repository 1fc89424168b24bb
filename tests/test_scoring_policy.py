"""One scoring policy for ``bench run``, ``bench attack`` and ``--escalate`` (issue 13, item 1), and
the typed way back from a stored run.

For every built-in defense (a one-epoch digits model saved as a checkpoint), an eps = 0 attack
added to a finished run with ``bench attack`` must give, example by example, exactly the rows of
the same stage run inside ``bench run`` (both are seeded by stage position and batch, and score
through :func:`bench.harness.stages.scoring_for`), and the clean pass's correctness up to the
classifier's documented randomness: exactly for deterministic models, and for randomized ones
with the same scoring (R draws, or one PREDICT decision for smoothed classifiers).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.capabilities import capability
from bench.config import AttackSpec, Norm, RunConfig, ThreatModel, stable_hash
from bench.data.base import get_dataset
from bench.harness.extend import add_attack
from bench.harness.resolve import ResolvedRun
from bench.harness.runner import execute
from bench.harness.stages import PREDICT_N, Scoring, scoring_for
from bench.models.defended import DefendedModel
from bench.registry import DEFENSES
from bench.results.schema import EvalKind
from bench.results.store import Store
from bench.training.checkpoints import save_checkpoint

BUILT_IN = ("dcs", "dds", "dds-rcs", "hycas", "pgd-at", "rs", "smoothadv", "standard")
ZERO = ThreatModel(Norm.L2, 0.0)
PGD = (("restarts", 1), ("steps", 2))


@pytest.fixture(scope="module")
def digits():
    dataset = get_dataset("digits")
    return dataset.spec, dataset.load("train", None, 8)


def _tiny_checkpoint(name: str, digits, directory: Path) -> tuple[Path, dict]:
    """A one-epoch model of defense ``name`` on digits (DDPM steps cut to 20), saved as a file."""
    spec, train = digits
    defense = DEFENSES.get(name)()
    hparams = defense.resolve_hparams({}, 8, "cpu")
    recipe = defense.recipe("cpu")
    extra = tuple((k, 20 if k == "ddpm_steps" else v) for k, v in recipe.extra)
    recipe = replace(recipe, epochs=1, max_examples=None, extra=extra)
    torch.manual_seed(0)
    model = defense.build(spec, 8, **hparams)
    defense.fit(model, train, recipe, spec=spec, device=torch.device("cpu"), seed=0)
    path = directory / f"{name}.pt"
    save_checkpoint(path, {k: v.detach().cpu() for k, v in model.state_dict().items()}, {"defense": name})
    return path, hparams


def _rows(store: Store, run_id: int, kind: EvalKind) -> dict[int, tuple]:
    stage = next(e for e in store.evaluations(run_id) if e.kind is kind)
    return {r.example_index: (r.correct, r.draws, r.correct_draws, r.prediction) for r in store.results([stage.id])}


@pytest.mark.parametrize("name", BUILT_IN)
def test_eps0_attack_via_bench_attack_equals_the_in_run_stage_and_the_clean_pass(name, digits, tmp_path, db_url):
    path, hparams = _tiny_checkpoint(name, digits, tmp_path)
    common = dict(defense=name, dataset="digits", checkpoint=str(path), n_examples=16, batch_size=8,
                  hparams=tuple(sorted(hparams.items())))
    store = Store(db_url)
    in_run = execute(RunConfig(**common, attacks=("pgd",), norm="L2", eps=(0.0,), steps=2, restarts=1), store)
    extended = execute(RunConfig(**common, protocol="clean"), store)
    add_attack(store, extended, AttackSpec("pgd", ZERO, PGD))

    clean, attacked = _rows(store, extended, EvalKind.CLEAN), _rows(store, extended, EvalKind.ATTACK)
    assert clean == _rows(store, in_run, EvalKind.CLEAN)
    assert attacked == _rows(store, in_run, EvalKind.ATTACK)  # same stage, same scoring, same seeds
    alive = {i for i, row in clean.items() if row[2] > 0}  # scoring 2: at least one correct draw
    assert set(attacked) == alive and alive, "the attack runs on the examples not wrong on every draw"
    assert {row[1] for row in attacked.values()} == {row[1] for row in clean.values()}  # same R
    for correct, draws, correct_draws, _ in attacked.values():
        assert correct == (correct_draws == draws)
    model = DEFENSES.get(name)().build(digits[0], 8, **hparams)
    if not capability(model, "randomized"):
        assert all(row[0] for row in attacked.values()), "eps = 0 cannot break a deterministic model"
    else:  # the classifier's randomness: re-scored examples may fail, but not all by construction
        assert any(row[0] for row in attacked.values())


class _Flags(DefendedModel):
    pass


def _model(**flags) -> DefendedModel:
    model = _Flags(torch.nn.Flatten(), (0.0,), (1.0,), (1, 2, 2), 4)
    for key, value in flags.items():
        setattr(model, key, value)
    return model


def test_scoring_policy_table():
    assert scoring_for(_model(), 10) == Scoring(1)
    assert scoring_for(_model(randomized=True), 10) == Scoring(10)
    assert scoring_for(_model(randomized=True), 4, min_draws=10) == Scoring(10)
    assert scoring_for(_model(), 4, randomized=True, min_draws=10) == Scoring(10)  # undeclared but varying
    smoothed = Scoring(1, smoothed=True)
    assert smoothed.passes == PREDICT_N
    # a smoothed classifier is scored with PREDICT whatever else it declares or the caller asks
    assert scoring_for(_model(smoothed_evaluation=True, randomized=True), 10, min_draws=10) == smoothed
    assert scoring_for(_model(smoothed_evaluation=True), 10, randomized=True) == smoothed


def test_a_stored_run_resolves_back_to_the_same_configuration_and_key(db_url):
    store = Store(db_url)
    run_id = execute(RunConfig(defense="standard", dataset="digits", protocol="clean", n_examples=16, epochs=1), store)
    run = store.get_run(run_id)
    back = ResolvedRun.from_stored(run)
    assert back.stored is not None
    assert json.loads(json.dumps(back.to_dict())) == run.config  # every stored setting comes back
    assert stable_hash(back.to_dict(), 32) == run.key  # and hashes to the stored run key
    assert back.protocol.key == "clean@2" and back.defense.name == "standard" and back.radii

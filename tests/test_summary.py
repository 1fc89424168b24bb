"""Pure aggregation (bench.results.summary) on hand-built stages and outcomes."""

from __future__ import annotations

import random

import pytest

from bench.results.schema import EvalKind
from bench.results.summary import Outcome, Stage, attack_table, certified_table

CLEAN, ATTACK, CERTIFY = EvalKind.CLEAN, EvalKind.ATTACK, EvalKind.CERTIFY


def clean_stage() -> Stage:
    return Stage(1, 0, CLEAN, "clean", None, None)


def outcomes_for(correct: dict[int, bool]) -> list[Outcome]:
    return [Outcome(i, ok) for i, ok in correct.items()]


@pytest.fixture
def cascade() -> tuple[list[Stage], dict[int, list[Outcome]], int]:
    """n=5. Clean: 0-3 correct, 4 wrong.
    Linf 0.1: pgd breaks 3 (rows for 0-3); apgd runs on 0-2 and breaks 2.
    L2 0.5:   pgd (rows for 0-3) breaks 0.
    """
    stages = [
        clean_stage(),
        Stage(2, 1, ATTACK, "pgd", "Linf", 0.1),
        Stage(3, 2, ATTACK, "apgd", "Linf", 0.1),
        Stage(4, 3, ATTACK, "pgd", "L2", 0.5),
    ]
    outcomes = {
        1: outcomes_for({0: True, 1: True, 2: True, 3: True, 4: False}),
        2: outcomes_for({0: True, 1: True, 2: True, 3: False}),
        3: outcomes_for({0: True, 1: True, 2: False}),
        4: outcomes_for({0: False, 1: True, 2: True, 3: True}),
    }
    return stages, outcomes, 5


def test_clean_accuracy(cascade) -> None:
    stages, outcomes, n = cascade
    assert attack_table(stages, outcomes, n)["clean_accuracy"] == pytest.approx(4 / 5)


def test_cumulative_cascade_within_threat_model(cascade) -> None:
    stages, outcomes, n = cascade
    table = attack_table(stages, outcomes, n)
    assert [(a["name"], a["norm"], a["eps"]) for a in table["attacks"]] == [
        ("pgd", "Linf", 0.1), ("apgd", "Linf", 0.1), ("pgd", "L2", 0.5)]
    accs = [a["accuracy"] for a in table["attacks"]]
    assert accs == pytest.approx([3 / 5, 2 / 5, 3 / 5])
    threats = {(t["norm"], t["eps"]): t["robust_accuracy"] for t in table["threat_models"]}
    assert threats == pytest.approx({("Linf", 0.1): 2 / 5, ("L2", 0.5): 3 / 5})


def test_worst_case_across_threat_models(cascade) -> None:
    stages, outcomes, n = cascade
    # robust under Linf: {0, 1}; under L2: {1, 2, 3}; under both: {1}
    assert attack_table(stages, outcomes, n)["robust_accuracy"] == pytest.approx(1 / 5)


def test_attack_rows_in_position_order_regardless_of_input_order(cascade) -> None:
    stages, outcomes, n = cascade
    forward = attack_table(stages, outcomes, n)
    backward = attack_table(list(reversed(stages)), outcomes, n)
    assert forward == backward


def test_later_attack_cannot_revive_broken_example() -> None:
    stages = [clean_stage(), Stage(2, 1, ATTACK, "a", "Linf", 0.1), Stage(3, 2, ATTACK, "b", "Linf", 0.1)]
    outcomes = {
        1: outcomes_for({0: True, 1: True}),
        2: outcomes_for({0: False, 1: True}),
        3: outcomes_for({0: True, 1: True}),  # a stray "correct" row for an example already broken
    }
    table = attack_table(stages, outcomes, 2)
    assert [a["accuracy"] for a in table["attacks"]] == [0.5, 0.5]
    assert table["robust_accuracy"] == 0.5


def test_attack_cannot_make_a_clean_error_robust() -> None:
    stages = [clean_stage(), Stage(2, 1, ATTACK, "pgd", "Linf", 0.1)]
    outcomes = {1: outcomes_for({0: False, 1: True}), 2: outcomes_for({0: True, 1: True})}
    table = attack_table(stages, outcomes, 2)
    assert table["attacks"][0]["accuracy"] == 0.5
    assert table["robust_accuracy"] == 0.5


def test_missing_attack_rows_count_as_not_robust() -> None:
    stages = [clean_stage(), Stage(2, 1, ATTACK, "pgd", "L2", 0.5)]
    outcomes = {1: outcomes_for({0: True, 1: True, 2: True, 3: True}),
                2: outcomes_for({0: True, 2: True})}  # no rows for 1 and 3
    table = attack_table(stages, outcomes, 4)
    assert table["attacks"][0]["accuracy"] == 0.5
    assert table["robust_accuracy"] == 0.5
    # an attack stage with no rows at all: nothing is robust
    empty = attack_table(stages, {1: outcomes[1]}, 4)
    assert empty["attacks"][0]["accuracy"] == 0.0
    assert empty["robust_accuracy"] == 0.0


def test_missing_clean_rows_count_as_wrong() -> None:
    table = attack_table([clean_stage()], {1: outcomes_for({0: True, 1: True})}, 4)
    assert table["clean_accuracy"] == 0.5


def test_no_attacks_gives_none() -> None:
    table = attack_table([clean_stage()], {1: outcomes_for({0: True, 1: False})}, 2)
    assert table["clean_accuracy"] == 0.5
    assert table["attacks"] == []
    assert table["threat_models"] == []
    assert table["robust_accuracy"] is None


def test_no_clean_stage_and_empty_n() -> None:
    assert attack_table([], {}, 3)["clean_accuracy"] is None
    table = attack_table([clean_stage(), Stage(2, 1, ATTACK, "pgd", "Linf", 0.1)], {}, 0)
    assert table["clean_accuracy"] is None  # 0/0 is undefined, not 0
    assert table["attacks"][0]["accuracy"] is None


def test_certify_stages_do_not_affect_attack_table(cascade) -> None:
    stages, outcomes, n = cascade
    with_cert = [*stages, Stage(9, 9, CERTIFY, "smoothing", "L2", None, sigma=0.25)]
    assert attack_table(with_cert, {**outcomes, 9: outcomes_for({4: True})}, n) == attack_table(stages, outcomes, n)


@pytest.mark.parametrize("seed", range(20))
def test_invariants_on_random_cascades(seed: int) -> None:
    """robust <= every attack's accuracy <= clean, and accuracies only fall along a cascade."""
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    stages = [clean_stage()]
    outcomes = {1: [Outcome(i, rng.random() < 0.8) for i in range(n)]}
    threats = [("Linf", 0.1), ("Linf", 0.3), ("L2", 0.5)][: rng.randint(1, 3)]
    position = 1
    for norm, eps in threats:
        for name in ["pgd", "apgd", "square"][: rng.randint(1, 3)]:
            position += 1
            stages.append(Stage(position, position, ATTACK, name, norm, eps))
            # rows for a random subset (attacks run only on some examples), random verdicts
            outcomes[position] = [Outcome(i, rng.random() < 0.7) for i in range(n) if rng.random() < 0.9]
    table = attack_table(stages, outcomes, n)
    clean, robust = table["clean_accuracy"], table["robust_accuracy"]
    assert robust is not None
    for attack in table["attacks"]:
        assert robust <= attack["accuracy"] <= clean
    for threat in table["threat_models"]:
        assert robust <= threat["robust_accuracy"] <= clean
        accs = [a["accuracy"] for a in table["attacks"] if (a["norm"], a["eps"]) == (threat["norm"], threat["eps"])]
        assert accs == sorted(accs, reverse=True)  # cumulative: non-increasing
        assert accs[-1] == threat["robust_accuracy"]
    assert robust <= min(t["robust_accuracy"] for t in table["threat_models"])
    if len(threats) == 1:
        assert robust == table["threat_models"][0]["robust_accuracy"]


# -- certified accuracy ----------------------------------------------------------------------
def test_certified_accuracy_at_radius() -> None:
    stage = Stage(5, 2, CERTIFY, "smoothing", "L2", None, sigma=0.25)
    outcomes = {5: [
        Outcome(0, True, 0.6),
        Outcome(1, True, None, abstained=True),
        Outcome(2, False, 0.9),  # certified, but the certified class is wrong
        Outcome(3, True, 0.2),
        Outcome(4, True, 1.0, abstained=True),  # abstention counts as wrong whatever its radius
        # example 5: no row -> wrong
    ]}
    table = certified_table([clean_stage(), stage], outcomes, 6, [0.0, 0.25, 0.5, 0.75])
    assert [(c["certifier"], c["radius"]) for c in table] == [("smoothing", r) for r in (0.0, 0.25, 0.5, 0.75)]
    assert [c["accuracy"] for c in table] == pytest.approx([2 / 6, 1 / 6, 1 / 6, 0.0])


def test_certified_radius_boundary_is_inclusive() -> None:
    stage = Stage(5, 2, CERTIFY, "lipschitz", "L2", None)
    table = certified_table([stage], {5: [Outcome(0, True, 0.5)]}, 1, [0.5])
    assert table[0]["accuracy"] == 1.0


def test_certified_table_per_stage_and_empty() -> None:
    a = Stage(5, 2, CERTIFY, "smoothing", "L2", None)
    b = Stage(6, 3, CERTIFY, "lipschitz", "L2", None)
    outcomes = {5: [Outcome(0, True, 0.3)], 6: [Outcome(0, True, 0.1)]}
    table = certified_table([b, a], outcomes, 1, [0.0, 0.25])
    assert [(c["certifier"], c["radius"], c["accuracy"]) for c in table] == [
        ("smoothing", 0.0, 1.0), ("smoothing", 0.25, 1.0), ("lipschitz", 0.0, 1.0), ("lipschitz", 0.25, 0.0)]
    assert certified_table([clean_stage()], {}, 1, [0.0]) == []
    assert certified_table([a], outcomes, 1, []) == []


@pytest.mark.parametrize("seed", range(10))
def test_certified_accuracy_non_increasing_in_radius(seed: int) -> None:
    rng = random.Random(seed)
    n = 25
    rows = [Outcome(i, rng.random() < 0.8, rng.choice([None, rng.random()]), rng.random() < 0.2) for i in range(n)]
    radii = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
    table = certified_table([Stage(5, 1, CERTIFY, "smoothing", "L2", None)], {5: rows}, n, radii)
    accs = [c["accuracy"] for c in table]
    assert accs == sorted(accs, reverse=True)
    assert accs[0] <= sum(o.correct and not o.abstained for o in rows) / n


# -- the run summary against its declared type (bench.results.types) ------------------------------
SUMMARY_KEYS = ["run_id", "defense", "dataset", "protocol", "n_examples", "clean_accuracy", "attacks",
                "robust_accuracy", "certified", "certificate", "checks", "wall_time_s", "clean_draws",
                "pending_attacks", "skipped_attacks", "task", "imbalanced", "balanced_accuracy", "per_class_recall",
                "robust_balanced_accuracy", "split", "status", "complete", "threat_models", "model", "forward_passes",
                "backward_passes", "seed", "indices_hash", "config", "provenance", "created_at", "finished_at", "error",
                "escalation", "clean_single_draw", "robust_single_draw", "robust_majority"]  # the --json order


def _conforms(record: dict, typed: type) -> None:
    """``record`` has every required key of the TypedDict ``typed`` and no key it does not declare."""
    keys = set(record)
    assert typed.__required_keys__ <= keys, (typed.__name__, sorted(typed.__required_keys__ - keys))
    declared = typed.__required_keys__ | typed.__optional_keys__
    assert keys <= declared, (typed.__name__, sorted(keys - declared))


def _result(i: int, correct: bool, radius: float | None = None) -> dict:
    return {"example_index": i, "label": i % 2, "prediction": i % 2 if correct else 1 - i % 2, "correct": correct,
            "radius": radius, "abstained": False, "samples_used": 110 if radius is not None else None, "draws": 1}


def test_run_summary_matches_its_type_and_reads_the_stored_config(tmp_path) -> None:
    from bench.results import types
    from bench.results.queries import example_outcomes, run_summary
    from bench.results.store import Store

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    model_id = store.upsert_model("m", defense="standard", dataset="synthetic", source="trained",
                                  hparams={"arch": "cnn"}, train_summary={"epochs": 1, "steps": 4, "other": 0})
    config = {"radii": [0.0, 0.5], "split": "val",
              "dataset_spec": {"task": "multiclass", "classes": ["a", "b"], "imbalanced": True},
              "extra_attacks": [{"attack": "square", "norm": "Linf", "eps": 0.1, "params": {}, "position": 3,
                                 "escalated_for": "zero_gradient"}]}
    run_id = store.create_run("r", model_id=model_id, defense="standard", dataset="synthetic", protocol="custom",
                              protocol_version=1, seed=0, n_examples=2, indices=[0, 1], config=config)
    described = {"certifier": "smoothing", "sigma": 0.25, "n0": 10, "n": 100, "alpha": 0.001}
    stages = [(EvalKind.CLEAN, "clean", {}, [_result(0, True), _result(1, True)]),
              (EvalKind.ATTACK, "pgd", {"norm": "Linf", "eps": 0.1}, [_result(0, True), _result(1, False)]),
              (EvalKind.CERTIFY, "smoothing", {"sigma": 0.25, "params": {"certificate": described}},
               [_result(0, True, 0.7), _result(1, False, 0.2)]),
              (EvalKind.ATTACK, "square", {"norm": "Linf", "eps": 0.1}, [_result(0, False)])]  # the escalated stage
    for position, (kind, method, kw, rows) in enumerate(stages):
        ev = store.evaluation(run_id, position, kind, method, **kw)
        store.add_results(ev, rows)
        store.finish_evaluation(ev)
    store.set_check(run_id, "zero_gradient", True, "masked")
    store.finish_run(run_id)

    summary = run_summary(store, run_id)
    assert list(summary) == SUMMARY_KEYS
    _conforms(summary, types.RunSummary)
    _conforms(summary["clean_draws"], types.CleanDraws)
    for key, typed in (("attacks", types.AttackRow), ("threat_models", types.ThreatRow),
                       ("certified", types.CertifiedRow), ("certificate", types.CertificateRow),
                       ("checks", types.CheckRecord)):
        assert summary[key], key
        for record in summary[key]:
            _conforms(record, typed)
    assert summary["model"] is not None and summary["escalation"] is not None
    _conforms(summary["model"], types.ModelInfo)
    assert summary["model"]["train_summary"] == {"epochs": 1, "steps": 4}  # the short summary's keys only
    _conforms(summary["escalation"], types.Escalation)
    for record in example_outcomes(store, run_id):
        _conforms(record, types.ExampleOutcome)

    # runs.config is read through StoredConfig, and included verbatim
    assert summary["config"] == config
    assert (summary["split"], summary["task"], summary["imbalanced"]) == ("val", "multiclass", True)
    assert [(c["radius"], c["accuracy"]) for c in summary["certified"]] == [(0.0, 0.5), (0.5, 0.5)]
    assert summary["per_class_recall"] == {"a": 1.0, "b": 1.0}
    assert summary["escalation"]["stages"] == [{"position": 3, "check": "zero_gradient", "name": "square"}]
    assert (summary["escalation"]["robust_accuracy_before"], summary["robust_accuracy"]) == (0.5, 0.0)

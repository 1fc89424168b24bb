"""Regression tests for review findings: each pins a behaviour that was once wrong."""

from __future__ import annotations

import json
import sqlite3
from importlib.metadata import EntryPoint

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import bench.registry
from bench.cli import app
from bench.config import RunConfig
from bench.errors import StoreError
from bench.harness.checks import check_train_mode
from bench.harness.runner import execute, resolve
from bench.models.defended import DefendedModel
from bench.registry import Registry
from bench.results.leaderboard import DEFENSE, ColumnKey, N, build_board
from bench.results.store import Store

runner = CliRunner()
FAST = dict(defense="standard", dataset="synthetic", eps=(0.1,), norm="Linf", steps=3, epochs=2)


def test_explicit_epochs_are_not_capped_by_the_examples_budget():
    recipe = resolve(RunConfig(defense="standard", dataset="digits", epochs=50)).recipe
    assert recipe.epochs_for(1347) == 50
    default = resolve(RunConfig(defense="standard", dataset="digits")).recipe
    assert default.max_examples is not None  # the cpu preset's budget still applies without --epochs


def test_run_key_ignores_name_case_and_unused_data_dir(tmp_path):
    base = resolve(RunConfig(defense="standard", dataset="digits")).key
    assert resolve(RunConfig(defense="STANDARD", dataset="Digits")).key == base
    assert resolve(RunConfig(defense="standard", dataset="digits", data_dir=str(tmp_path))).key == base


def test_store_made_by_another_version_is_a_clear_error(tmp_path):
    path = tmp_path / "old.db"
    Store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE example_results DROP COLUMN multilabel")
    with pytest.raises(StoreError, match="another bench version.*multilabel"):
        Store(f"sqlite:///{path}")


def test_leaderboard_ranks_only_runs_on_the_same_examples(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    for defense in ("standard", "pgd-at"):
        execute(RunConfig(**{**FAST, "defense": defense, "n_examples": 32}), store)
    execute(RunConfig(**{**FAST, "n_examples": 16}), store)  # a smaller subset must not replace a row
    board = build_board(store, "synthetic")
    assert sorted(r[DEFENSE] for r in board.rows) == ["pgd-at", "standard"]
    assert all(r[N] == 32 for r in board.rows)
    assert "1 run(s) on other example subsets left out" in board.note


def test_plugin_imported_before_the_first_lookup_is_not_a_clash(monkeypatch):
    class Base:
        pass

    reg = Registry("thing", base=Base, entry_point_group="bench.things")

    @reg.register("early")
    class Early(Base):
        pass

    ep = EntryPoint(name="early", value=f"{Early.__module__}:{Early.__qualname__}", group="bench.things")
    monkeypatch.setattr(bench.registry, "entry_points", lambda *, group: [ep])
    assert reg.get("early") is Early


def test_failed_sessions_still_count_their_passes(tmp_path, monkeypatch):
    from bench.attacks.pgd import PGD

    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    calls = {"n": 0}
    original = PGD.run

    def crash_second(self, *args):
        if args[-1].eps == 0.5:  # the large_eps sanity check's PGD does not count
            return original(self, *args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return original(self, *args)

    monkeypatch.setattr(PGD, "run", crash_second)
    with pytest.raises(RuntimeError):
        execute(RunConfig(**{**FAST, "batch_size": 8, "n_examples": 32}), store)
    (run,) = store.list_runs()
    assert run.forward_passes > 0 and run.backward_passes > 0


def test_train_mode_check_catches_a_forward_that_switches_modes():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            self.bn.train()  # a defense that forces batch statistics
            return self.bn(x.flatten(1)[:, :4])

    model = DefendedModel(Sneaky(), (0.5,), (0.25,), (1, 8, 8), 4)
    result = check_train_mode(model, torch.rand(8, 1, 8, 8))
    assert result.triggered and "net.bn" in result.detail
    plain = DefendedModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), (0.5,), (0.25,), (1, 8, 8), 4)
    assert not check_train_mode(plain, torch.rand(8, 1, 8, 8)).triggered


def test_attack_command_uses_only_norms_the_attack_supports(tmp_path):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    out = runner.invoke(app, ["run", "--defense", "standard", "--dataset", "synthetic", "--epochs", "2",
                              "-n", "16", "--db", db, "--json"])  # protocol pgd@1: Linf and L2
    assert out.exit_code == 0, out.stderr
    assert {a["norm"] for a in json.loads(out.stdout)["attacks"]} == {"Linf", "L2"}
    result = runner.invoke(app, ["attack", "1", "--attack", "fgsm", "--db", db, "--json"])
    assert result.exit_code == 0, result.stderr
    added = json.loads(result.stdout)["attacks"][2:]
    assert [(a["name"], a["norm"]) for a in added] == [("fgsm", "Linf")]


def test_wrapped_attack_norm_is_checked_before_training():
    from bench.config import AttackSpec, ThreatModel
    from bench.errors import BenchError
    from bench.harness.protocol import Protocol
    from bench.harness.resolve import check_attacks

    spec = AttackSpec("eot", ThreatModel("L2", 0.5), (("attack", "fgsm"),))
    with pytest.raises(BenchError, match="'fgsm' does not support the L2 norm"):
        check_attacks(Protocol("x", 1, (spec,)).attacks)


def test_same_attack_twice_keeps_two_leaderboard_columns():
    from bench.results.leaderboard import board_from_summaries

    attack = {"name": "pgd", "norm": "Linf", "eps": 0.1}
    summary = {"defense": "d", "run_id": 1, "clean_accuracy": 0.9, "robust_accuracy": 0.4, "n_examples": 10,
               "attacks": [{**attack, "accuracy": 0.5}, {**attack, "accuracy": 0.4}]}
    board = board_from_summaries("digits", "custom@1", [summary])
    titles = [c.title for c in board.columns]
    assert "pgd Linf 0.1" in titles and "pgd Linf 0.1 #2" in titles
    first, second = ColumnKey("attack", "pgd", "Linf", 0.1), ColumnKey("attack", "pgd", "Linf", 0.1, repeat=2)
    assert board.rows[0][first] == 0.5 and board.rows[0][second] == 0.4
    assert (first.id, second.id) == ("attack:pgd Linf 0.1", "attack:pgd Linf 0.1#2")  # the CSV/JSON keys


def test_result_checks_flag_square_beating_whitebox_and_non_monotone_eps():
    from bench.results.checks import check_eps_monotone, check_square_beats_whitebox

    threat = {"norm": "Linf", "eps": 0.1, "robust_accuracy": 0.3}
    summary = {"threat_models": [threat], "attacks": [
        {"name": "apgd-ce", "norm": "Linf", "eps": 0.1, "accuracy": 0.5},
        {"name": "square", "norm": "Linf", "eps": 0.1, "accuracy": 0.3}]}
    assert check_square_beats_whitebox(summary).triggered
    summary["attacks"][1]["accuracy"] = 0.499
    assert not check_square_beats_whitebox(summary).triggered  # within 0.2 points
    monotone = {"threat_models": [{"norm": "Linf", "eps": 0.1, "robust_accuracy": 0.5},
                                  {"norm": "Linf", "eps": 0.2, "robust_accuracy": 0.6},
                                  {"norm": "L2", "eps": 0.5, "robust_accuracy": 0.9}]}
    result = check_eps_monotone(monotone)
    assert result.triggered and "eps 0.2" in result.detail
    monotone["threat_models"][1]["robust_accuracy"] = 0.4
    assert not check_eps_monotone(monotone).triggered


def test_result_checks_are_stored_with_the_run(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    run_id = execute(RunConfig(**{**FAST, "n_examples": 16}), store)
    names = {c.name for c in store.checks(run_id)}
    assert {"square_beats_whitebox", "eps_monotone", "zero_gradient"} <= names


def test_per_example_broken_by_agrees_with_the_summary(tmp_path):
    from bench.results.queries import example_outcomes, run_summary

    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    run_id = execute(RunConfig(defense="standard", dataset="synthetic", epochs=2, n_examples=32,
                               protocol="pgd"), store)
    summary = run_summary(store, run_id)
    records = example_outcomes(store, run_id)
    n = summary["n_examples"]
    assert len(records) == n
    assert sum(r["robust"] for r in records) == round(summary["robust_accuracy"] * n)
    assert sum(r["clean_correct"] for r in records) == round(summary["clean_accuracy"] * n)
    for threat in summary["threat_models"]:
        key = f"{threat['norm']} {threat['eps']:g}"
        survivors = sum(1 for r in records if r["broken_by"][key] is None)
        assert survivors == round(threat["robust_accuracy"] * n)
        assert {r["broken_by"][key] for r in records} <= {None, "clean", "pgd"}
    csv_out = runner.invoke(app, ["show", str(run_id), "--examples", "--db", store.url])
    assert csv_out.exit_code == 0 and csv_out.stdout.splitlines()[0].startswith("index,label,clean_correct,robust")
    assert len(csv_out.stdout.splitlines()) == n + 1


def test_attack_that_cannot_run_on_the_model_is_skipped_with_a_reason(tmp_path):
    from datafixtures import make_medmnist

    from bench.results.queries import run_summary

    npz = tmp_path / "binarymnist.npz"
    make_medmnist(npz, kind="binary")
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    config = RunConfig(defense="standard", dataset="medmnist", data_dir=str(npz), epochs=1,
                       attacks=("apgd-dlr", "pgd"), eps=(0.05,), norm="Linf", n_examples=32)
    summary = run_summary(store, execute(config, store))
    assert summary["status"] == "finished"
    (skipped,) = summary["skipped_attacks"]
    assert skipped["name"] == "apgd-dlr" and "needs at least 3 classes" in skipped["reason"]
    assert [a["name"] for a in summary["attacks"]] == ["pgd"]  # the skipped stage counts as nothing
    assert summary["robust_accuracy"] == summary["attacks"][0]["accuracy"]
    assert execute(config, store) == summary["run_id"]  # finished: returned as stored


def test_cascade_equals_the_per_example_minimum_of_separate_runs(tmp_path, monkeypatch):
    """With deterministic attacks, attacking only the survivors of A with B gives exactly the
    per-example worst case of running A and B separately on everything."""
    from bench.config import AttackSpec, ThreatModel
    from bench.harness import protocol as protocols
    from bench.results.queries import example_outcomes

    threat = ThreatModel("Linf", 0.08)
    fgsm = AttackSpec("fgsm", threat)
    pgd = AttackSpec("pgd", threat, (("random_start", False), ("steps", 5)))
    for name, attacks in (("t-a", (fgsm,)), ("t-b", (pgd,)), ("t-ab", (fgsm, pgd))):
        monkeypatch.setitem(protocols.PROTOCOLS, name,
                            {1: lambda spec, n=name, a=attacks: protocols.Protocol(n, 1, a)})
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    robust = {}
    for name in ("t-a", "t-b", "t-ab"):
        run_id = execute(RunConfig(defense="standard", dataset="synthetic", epochs=3, protocol=name,
                                   batch_size=16), store)
        robust[name] = {r["index"] for r in example_outcomes(store, run_id) if r["robust"]}
    assert robust["t-ab"] == robust["t-a"] & robust["t-b"]
    assert robust["t-a"] != robust["t-b"]  # the two attacks break different examples: the check has teeth


def test_input_range_check_is_recorded(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    run_id = execute(RunConfig(**{**FAST, "n_examples": 8}), store)
    check = next(c for c in store.checks(run_id) if c.name == "input_range")
    assert not check.triggered and "inputs span [" in check.detail

"""Attack parameters from the command line: routed to the attack that takes them, through
wrappers (``eot``, ``bpda``) into the wrapped attack; a parameter no attack takes is an error."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.config import RunConfig
from bench.data.base import get_dataset
from bench.errors import BenchError
from bench.harness.protocol import resolve_protocol, route_params
from helpers import assert_cli_user_error

runner = CliRunner()
SPEC = get_dataset("synthetic").spec


def test_route_params_nests_into_wrapped_attacks():
    assert route_params("pgd", {"steps": 5}) == ({"steps": 5}, {"steps"})
    assert route_params("eot", {"draws": 8, "steps": 5}) == ({"draws": 8, "params": {"steps": 5}}, {"draws", "steps"})
    params, used = route_params("eot", {"attack": "bpda", "steps": 3, "restarts": 2})
    assert params == {"attack": "bpda", "params": {"params": {"steps": 3, "restarts": 2}}}
    assert used == {"attack", "steps", "restarts"}
    # an explicit inner mapping is kept and completed
    params, _ = route_params("eot", {"params": {"restarts": 2}, "steps": 4})
    assert params == {"params": {"restarts": 2, "steps": 4}}
    assert route_params("square", {"steps": 5}) == ({}, set())  # square has no steps


def test_custom_protocol_gives_each_attack_only_what_it_takes():
    config = RunConfig(defense="standard", dataset="synthetic", attacks=("square", "pgd"), eps=(0.1,),
                       steps=3, attack_params=(("n_queries", 50),))
    protocol = resolve_protocol(config, SPEC)
    params = {a.attack: dict(a.params) for a in protocol.attacks}
    assert params == {"square": {"n_queries": 50}, "pgd": {"steps": 3}}


def test_a_parameter_no_attack_takes_is_an_error():
    config = RunConfig(defense="standard", dataset="synthetic", attacks=("pgd",), eps=(0.1,),
                       attack_params=(("n_queries", 50),))
    with pytest.raises(BenchError, match="n_queries"):
        resolve_protocol(config, SPEC)


def test_attack_param_conflicts_with_a_named_protocol():
    with pytest.raises(BenchError, match="--protocol cannot be combined"):
        RunConfig(defense="standard", dataset="synthetic", protocol="pgd", attack_params=(("steps", 2),)).validate()


def test_cli_runs_eot_with_nested_parameters(tmp_path):
    db = f"sqlite:///{tmp_path / 'p.db'}"
    result = runner.invoke(app, ["run", "--defense", "standard", "--dataset", "synthetic", "--attack", "eot",
                                 "--eps", "0.1", "--attack-param", "draws=2", "--attack-param", "steps=2",
                                 "-n", "8", "--db", db, "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    (spec,) = summary["config"]["protocol"]["attacks"]
    assert spec["params"] == {"draws": 2, "params": {"steps": 2}}
    bad = runner.invoke(app, ["attack", str(summary["run_id"]), "--attack", "pgd", "--attack-param", "draws=3",
                              "--db", db])
    assert_cli_user_error(bad, "draws")
    bad = runner.invoke(app, ["run", "--defense", "standard", "--dataset", "synthetic", "--attack-param", "oops",
                              "--db", db])
    assert_cli_user_error(bad, "--attack-param")

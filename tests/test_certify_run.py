"""Certification inside runs: stored rows, resumption, the JSON blocks and bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bench.certifiers.smoothing import Smoothing
from bench.cli import app
from bench.config import RunConfig
from bench.harness.runner import execute
from bench.results.queries import run_summary
from bench.results.schema import EvalKind, RunStatus
from bench.results.store import Store
from helpers import assert_cli_user_error

runner = CliRunner()
CONFIG = RunConfig(defense="standard", dataset="synthetic", certify=("smoothing",),
                   certify_params=(("n", 300), ("n0", 20), ("sigma", 0.25)), n_examples=40, batch_size=8)


class Crash(RuntimeError):
    pass


def _cert_rows(store: Store, run_id: int) -> list[tuple]:
    evs = [e for e in store.evaluations(run_id) if e.kind is EvalKind.CERTIFY]
    return sorted((r.example_index, r.prediction, r.abstained, round(r.radius, 9), r.samples_used, r.count_a)
                  for r in store.results([e.id for e in evs]))


def test_certification_resumes_to_identical_rows(tmp_path, monkeypatch):
    reference = Store(f"sqlite:///{tmp_path / 'ref.db'}")
    ref_id = execute(CONFIG, reference)
    summary = run_summary(reference, ref_id)
    assert summary["certificate"][0]["sigma"] == 0.25 and summary["certificate"][0]["n"] == 300
    assert [c["radius"] for c in summary["certified"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    accs = [c["accuracy"] for c in summary["certified"]]
    assert accs == sorted(accs, reverse=True) and accs[0] > 0.5  # non-increasing in the radius

    store = Store(f"sqlite:///{tmp_path / 'crash.db'}")
    original = Smoothing.certify_each

    def crashing(self, model, x, y=None, **kwargs):
        for count, decided in enumerate(original(self, model, x, y, **kwargs)):
            if count == 20:  # a deterministic model's certificates are stored 16 at a time as decided
                raise Crash("simulated crash")
            yield decided

    monkeypatch.setattr(Smoothing, "certify_each", crashing)
    with pytest.raises(Crash):
        execute(CONFIG, store)
    (failed,) = store.list_runs()
    assert failed.status is RunStatus.FAILED and len(_cert_rows(store, failed.id)) == 16
    partial = run_summary(store, failed.id)
    assert {c["certified_examples"] for c in partial["certified"]} == {16}  # marked partial, not final
    from rich.console import Console

    from bench.cli.output import summary_table

    console = Console(width=300, record=True)
    console.print(summary_table(partial))
    assert f"(partial: 16 of {partial['n_examples']} certified)" in console.export_text()
    monkeypatch.setattr(Smoothing, "certify_each", original)
    assert execute(CONFIG, store) == failed.id
    assert _cert_rows(store, failed.id) == _cert_rows(reference, ref_id)


def test_cli_certify_json_and_checks(tmp_path):
    db = f"sqlite:///{tmp_path / 'c.db'}"
    result = runner.invoke(app, ["run", "-d", "standard", "--dataset", "synthetic", "--certify", "smoothing",
                                 "--sigma", "0.25", "--n-samples", "200", "--n0", "20", "--radii", "0,0.1",
                                 "-n", "16", "--db", db, "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [c["radius"] for c in summary["certified"]] == [0.0, 0.1]
    block = summary["certificate"][0]
    assert (block["certifier"], block["n0"], block["n"], block["alpha"]) == ("smoothing", 20, 200, 0.001)
    assert 0 <= block["abstention_rate"] <= 1 and block["mean_samples"] == 220
    checks = {c["name"] for c in summary["checks"]}
    assert {"certificate_attack", "certified_vs_empirical"} <= checks  # the audit is part of certifying runs


@pytest.mark.parametrize("args, fragment", [
    (["--certify", "smoothing", "--sigma", "0.25", "--n0", "0"], "n0"),
    (["--certify", "smoothing", "--sigma", "0.25", "--n-samples", "0"], "n must"),
    (["--certify", "smoothing", "--sigma", "0.25", "--alpha", "1.5"], "alpha"),
    (["--certify", "smoothing", "--sigma", "-1"], "sigma"),
    (["--certify", "smoothing", "--sigma", "0.25", "--radii=-0.5,1"], "radii"),
    (["--certify", "smoothing", "--radii", "a,b"], "--radii"),
    (["--certify", "nope"], "unknown certifier"),
    (["--certify", "smoothing", "--sigma", "0.2", "--protocol", "pgd"], "--protocol cannot be combined"),
    (["--certify", "smoothing", "--certify-param", "clip=3", "--sigma", "0.2"], "clip"),
    (["--certify", "smoothing"], "declares no sigma"),
    (["--certify", "lipschitz"], "declares no guaranteed Lipschitz bound"),
    (["--protocol", "certify"], "declares no certificate"),
])
def test_bad_certification_input_is_one_line_exit_2(tmp_path, args, fragment):
    result = runner.invoke(app, ["run", "-d", "standard", "--dataset", "synthetic", "-n", "8",
                                 "--db", f"sqlite:///{tmp_path / 'b.db'}", *args])
    assert_cli_user_error(result, fragment)

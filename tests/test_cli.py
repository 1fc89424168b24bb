"""The command line: the run/show/list/leaderboard round trip, the JSON object, and bad input
(one line on stderr, exit status 2, no traceback, nothing half-written marked finished)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bench.cli import app
from bench.results.schema import RunStatus
from bench.results.store import Store
from helpers import assert_cli_user_error

runner = CliRunner()

JSON_KEYS = {"run_id", "defense", "dataset", "protocol", "n_examples", "clean_accuracy", "attacks",
             "robust_accuracy", "certified", "checks", "wall_time_s"}

# a fast run: synthetic data, 2 training epochs, PGD with few steps on a 32-example subset
EVAL = ["--dataset", "synthetic", "--eps", "0.1", "--steps", "5", "-n", "32"]
FAST = [*EVAL, "--epochs", "2"]


def invoke(*args: str):
    return runner.invoke(app, list(args))


def run_json(*args: str) -> dict:
    result = invoke("run", *args, "--json")
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


assert_user_error = assert_cli_user_error


def test_help_and_list():
    assert invoke("--help").exit_code == 0
    result = invoke("list")
    assert result.exit_code == 0
    for name in ("pgd-at", "standard", "pgd", "digits", "synthetic"):
        assert name in result.stdout
    listed = json.loads(invoke("list", "defenses", "--json").stdout)
    assert {d["name"] for d in listed["defenses"]} >= {"standard", "pgd-at"}
    protocols = json.loads(invoke("list", "protocols", "--json").stdout)
    assert {"pgd@1", "clean@1"} <= {p["key"] for p in protocols}
    assert all(p["description"] for p in protocols)


def test_run_json_object_and_stored_rerun(db_url):
    first = run_json("--defense", "standard", *FAST, "--db", db_url)
    assert JSON_KEYS <= set(first)
    assert first["defense"] == "standard" and first["dataset"] == "synthetic"
    assert first["n_examples"] == 32
    assert first["protocol"].startswith("custom-") and first["protocol"].endswith("@1")
    assert first["status"] == "finished"
    clean, robust = first["clean_accuracy"], first["robust_accuracy"]
    assert 0 <= robust <= clean <= 1
    assert [(a["name"], a["norm"], a["eps"]) for a in first["attacks"]] == [("pgd", "Linf", 0.1)]
    assert robust <= first["attacks"][0]["accuracy"] <= clean
    assert {c["name"] for c in first["checks"]} >= {"train_mode", "randomized", "softmax_output", "zero_gradient"}
    prov = first["provenance"]
    assert prov["seed"] == 0 and prov["packages"]["torch"] == torch.__version__.split("+")[0]
    assert len(first["model"]["checkpoint_sha256"]) == 64 and len(first["indices_hash"]) == 64

    again = invoke("run", "--defense", "standard", *FAST, "--db", db_url, "--json")
    assert again.exit_code == 0
    second = json.loads(again.stdout)
    assert second["run_id"] == first["run_id"]
    assert second["clean_accuracy"] == clean and second["robust_accuracy"] == robust
    assert "training" not in again.stderr  # returned from the store, nothing retrained or re-attacked

    shown = json.loads(invoke("show", str(first["run_id"]), "--db", db_url, "--json").stdout)
    assert shown["robust_accuracy"] == robust
    assert invoke("show", str(first["run_id"]), "--db", db_url).exit_code == 0
    runs = invoke("list", "runs", "--db", db_url)
    assert runs.exit_code == 0 and "standard" in runs.stdout


def test_leaderboard_formats(db_url, tmp_path):
    for defense in ("standard", "pgd-at"):
        run_json("--defense", defense, *FAST, "--db", db_url)
    md = invoke("leaderboard", "--dataset", "synthetic", "--format", "md", "--db", db_url)
    assert md.exit_code == 0, md.stderr
    rows = [line for line in md.stdout.splitlines()
            if line.startswith("| ") and ("standard" in line or "pgd-at" in line)]
    assert len(rows) == 2
    out = tmp_path / "board.tex"
    tex = invoke("leaderboard", "--dataset", "synthetic", "--format", "latex", "-o", str(out), "--db", db_url)
    assert tex.exit_code == 0 and r"\toprule" in out.read_text()
    tex = invoke("leaderboard", "--dataset", "synthetic", "-f", "latex", "--latex-layout", "transposed",
                 "--caption", "A 50% board", "--label", "tab:x", "--db", db_url)
    assert tex.exit_code == 0 and r"\caption{A 50\% board}" in tex.stdout and r"\label{tab:x}" in tex.stdout
    page = tmp_path / "board.html"
    html = invoke("leaderboard", "--dataset", "synthetic", "--format", "html", "-o", str(page), "--db", db_url)
    assert html.exit_code == 0 and page.read_text().count('data-kind="measured"') == 2
    assert invoke("leaderboard", "--dataset", "synthetic", "-f", "latex", "--latex-layout", "tiny",
                  "--db", db_url).exit_code == 2
    board = json.loads(invoke("leaderboard", "--dataset", "synthetic", "--format", "json", "--db", db_url).stdout)
    robust = [row["robust"] for row in board["rows"]]
    assert robust == sorted(robust, reverse=True)
    assert invoke("leaderboard", "--dataset", "synthetic", "--db", db_url).exit_code == 0


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--defense", "pgd-att"], ["unknown defense 'pgd-att'", "did you mean 'pgd-at'"]),
        (["--defense", "standard", "--dataset", "digitz"], ["unknown dataset 'digitz'", "'digits'"]),
        (["--defense", "standard", "--attack", "pgdd"], ["unknown attack 'pgdd'", "'pgd'"]),
        (["--defense", "standard", "--eps", "-0.1"], ["invalid eps", ">= 0"]),
        (["--defense", "standard", "--eps", "abc"], ["invalid eps 'abc'"]),
        (["--defense", "standard", "--eps", "nan"], ["invalid eps"]),
        (["--defense", "standard", "--norm", "Linf", "--eps", "3"], ["above 1"]),
        (["--defense", "standard", "--norm", "L7"], ["unknown norm"]),
        (["--defense", "standard", "--protocol", "pgd", "--eps", "0.1"], ["--protocol cannot be combined"]),
        (["--defense", "standard", "--protocol", "nope"], ["unknown protocol 'nope'"]),
        (["--defense", "standard", "--checkpoint", "does-not-exist.pt"], ["not found"]),
        (["--defense", "standard", "--hparam", "width=3"], ["unknown hyperparameter"]),
        (["--defense", "standard", "--steps", "0"], ["--steps"]),
        (["--defense", "standard", "--db", "sqlite:////no/such/dir/x.db"], ["cannot open result store"]),
        (["--defense", "standard", "--db", "notadb://x"], ["cannot open result store"]),
    ],
)
def test_bad_input_exits_2(args, fragments, tmp_path):
    assert_user_error(invoke("run", *args), *fragments)
    assert not (tmp_path / "bench.db").exists()  # bad input creates no result store


def _write_checkpoints(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.txt"
    text.write_text("this is not a checkpoint\n")

    class Payload:  # a pickled object that weights_only=True must refuse to construct
        def __reduce__(self):
            return (print, ("code ran during unpickling",))

    malicious = tmp_path / "malicious.pt"
    with open(malicious, "wb") as fh:
        pickle.dump({"state_dict": Payload()}, fh)
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(3, 3)}}, wrong)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, empty)
    truncated = tmp_path / "truncated.pt"
    torch.save({"state_dict": {"w": torch.zeros(100)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:50])
    return {"text": text, "malicious": malicious, "wrong": wrong, "empty": empty, "truncated": truncated}


@pytest.mark.parametrize(("kind", "fragment"), [("text", "not a"), ("malicious", "refusing to load"),
                                                ("wrong", "does not fit"), ("empty", "no state dict"),
                                                ("truncated", "not a")])
def test_bad_checkpoints_exit_2_and_store_nothing_finished(tmp_path, db_url, kind, fragment, capfd):
    path = _write_checkpoints(tmp_path)[kind]
    result = invoke("run", "--defense", "standard", *EVAL, "--checkpoint", str(path), "--db", db_url)
    assert_user_error(result, fragment)
    assert "code ran during unpickling" not in capfd.readouterr().out
    assert Store(db_url).list_runs(status=RunStatus.FINISHED) == []


def test_checkpoint_round_trip(db_url, tmp_path):
    trained = run_json("--defense", "standard", *FAST, "--db", db_url)
    path = Path(trained["model"]["checkpoint_path"])
    loaded = run_json("--defense", "standard", *EVAL, "--checkpoint", str(path), "--db", db_url)
    assert loaded["model"]["source"] == "file"
    assert loaded["model"]["checkpoint_sha256"] == trained["model"]["checkpoint_sha256"]
    assert loaded["clean_accuracy"] == trained["clean_accuracy"]
    assert loaded["run_id"] != trained["run_id"]


def test_show_and_leaderboard_errors(db_url, tmp_path):
    assert_user_error(invoke("show", "1", "--db", db_url), "no result store at")  # read-only: nothing created
    assert_user_error(invoke("leaderboard", "--db", db_url), "no result store at")
    assert not (tmp_path / "results.db").exists()
    Store(db_url).close()
    assert_user_error(invoke("show", "999", "--db", db_url), "no run with id 999")
    assert_user_error(invoke("leaderboard", "--dataset", "synthetic", "--db", db_url), "no finished runs")
    assert invoke("leaderboard", "--format", "yaml", "--db", db_url).exit_code == 2  # rejected by the parser


def test_attack_command_extends_a_stored_run_and_only_lowers_robustness(db_url):
    first = run_json("--defense", "standard", *FAST, "--db", db_url)
    run_id = str(first["run_id"])
    args = ("attack", run_id, "--attack", "pgd", "--steps", "10", "--restarts", "2", "--db", db_url, "--json")
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    extended = json.loads(result.stdout)
    assert extended["run_id"] == first["run_id"]
    assert len(extended["attacks"]) == 2
    assert extended["attacks"][1]["accuracy"] <= extended["attacks"][0]["accuracy"]  # cascade: cumulative
    assert extended["robust_accuracy"] <= first["robust_accuracy"]
    assert extended["config"]["extra_attacks"][0]["params"] == {"restarts": 2, "steps": 10}
    again = json.loads(invoke(*args).stdout)  # the same attack again is returned as stored
    assert len(again["attacks"]) == 2 and again["robust_accuracy"] == extended["robust_accuracy"]
    other = invoke("attack", run_id, "--attack", "fgsm", "--eps", "0.05", "--norm", "Linf", "--db", db_url, "--json")
    assert other.exit_code == 0, other.stderr
    assert [a["eps"] for a in json.loads(other.stdout)["attacks"]] == [0.1, 0.1, 0.05]


@pytest.mark.parametrize(("args", "fragment"), [
    (["999", "--attack", "pgd"], "no run with id 999"),
    (["1", "--attack", "pgdd"], "unknown attack 'pgdd'"),
    (["1", "--attack", "pgd", "--eps", "-1"], "invalid eps"),
    (["1", "--attack", "pgd", "--steps", "0"], "--steps"),
    (["1", "--attack", "cw-l2", "--norm", "Linf", "--eps", "0.1"], "does not support the Linf norm"),
])
def test_attack_command_bad_input(db_url, args, fragment):
    before = run_json("--defense", "standard", *FAST, "--db", db_url)
    assert_user_error(invoke("attack", *args, "--db", db_url), fragment)
    after = json.loads(invoke("show", "1", "--db", db_url, "--json").stdout)
    assert after["attacks"] == before["attacks"] and after["pending_attacks"] == []


def test_plain_progress_lines_are_not_repeated_at_the_end() -> None:
    import io

    from rich.console import Console

    from bench.progress import RichProgress

    out = io.StringIO()
    progress = RichProgress(Console(file=out, force_terminal=False, width=200), interval=0.0)
    with progress.task("stage", total=3) as task:
        task.advance(3)  # a periodic line (interval 0) already shows 3/3
    progress.interval = 1e9
    with progress.task("other", total=2) as task:
        task.advance(1)  # no periodic line: finish prints the final state once
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["stage: 3/3", "other: 1/2"], lines

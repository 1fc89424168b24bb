"""Published references: the packaged file, user files, the store table, the board's published rows
and `bench references`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.errors import BenchError
from bench.results.leaderboard import CLEAN, DEFENSE, MODEL, ColumnKey, board_from_summaries, render_markdown
from bench.results.references import (
    DIFFERENCE,
    PUBLISHED,
    add_published,
    from_rows,
    load_references,
    packaged,
    sync_references,
)
from bench.results.store import Store
from helpers import assert_cli_user_error

runner = CliRunner()


def record(**fields: Any) -> dict[str, Any]:
    base = {"id": "mine-1", "defense": "rs", "paper": "Me et al.", "dataset": "cifar10", "metric": "clean_accuracy",
            "value": 80.5, "unit": "percent", "source": "my paper, Table 1"}
    return {k: v for k, v in {**base, **fields}.items() if v is not ...}


def write(tmp_path: Path, records: list[dict[str, Any]], **top: Any) -> Path:
    path = tmp_path / "refs.json"
    path.write_text(json.dumps({"version": 1, "references": records, **top}))
    return path


# -- the packaged file ---------------------------------------------------------------------------
def test_packaged_references_cover_the_seed_defenses_each_with_a_source() -> None:
    refs = packaged().records
    assert len({r.id for r in refs}) == len(refs)
    assert all(r.source and r.paper and r.version == "references.json v1" for r in refs)
    assert {"rs", "smoothadv", "dds", "dcs", "hycas"} <= {r.defense for r in refs}
    assert {"conv", "dcn"} <= {r.defense for r in refs}  # the baselines DCS compares against


def test_cohen_cifar10_curve_is_listed_as_recomputed_from_the_authors_logs() -> None:
    curve = {(r.setting, r.radius): r.value for r in packaged().for_dataset("cifar10")
             if r.id.startswith("cohen2019-cifar10-")}
    assert len(curve) == 28  # 4 noise levels x 7 radii
    sigma25 = [curve[("ResNet-110, sigma=0.25", r)] for r in (0, 0.25, 0.5, 0.75, 1.0)]
    assert sigma25 == [0.748, 0.600, 0.428, 0.266, 0]
    assert curve[("ResNet-110, sigma=1", 2.0)] == 0.100
    one = next(r for r in packaged().records if r.id == "cohen2019-cifar10-sigma0.50-r0.5")
    assert one.source.startswith("locuslab/smoothing data/certify/cifar10/resnet110/noise_0.50/test/sigma_0.50")


def test_values_are_kept_as_printed_and_read_as_fractions() -> None:
    dcs = next(r for r in packaged().records if r.id == "ma2025-cifar10-wrn-34-dcs-autoattack")
    assert (dcs.value, dcs.unit, dcs.eps, dcs.norm, dcs.attack) == (75.46, "percent", 8 / 255, "Linf", "autoattack")
    assert dcs.fraction == pytest.approx(0.7546)
    assert dcs.threat == "Linf 8/255"


# -- user files ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("records", "top", "fragment"),
    [
        ([record(typo=1)], {}, "unknown key(s) typo"),
        ([record(value=float("nan"))], {}, "non-finite number NaN"),
        ([record(value=float("inf"))], {}, "non-finite number Infinity"),
        ([record(source=...)], {}, "missing source (every published number needs its source)"),
        ([record(source="")], {}, "missing source"),
        ([record(metric="accuracy")], {}, "unknown metric 'accuracy'"),
        ([record(eps="8/x", norm="Linf")], {}, "invalid eps '8/x'"),
        ([record(), record()], {}, "id 'mine-1' appears more than once"),
        ([record()], {"extra": 1}, "unknown top-level key(s) extra"),
        ([record(value="80")], {}, "'value' must be a number"),
    ],
)
def test_user_file_errors_are_one_line(tmp_path: Path, records: list[dict[str, Any]], top: dict[str, Any],
                                       fragment: str) -> None:
    with pytest.raises(BenchError) as info:
        load_references([write(tmp_path, records, **top)])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_user_file_adds_and_replaces_by_id(tmp_path: Path) -> None:
    mine = record(eps="8/255", norm="Linf", metric="robust_accuracy", attack="PGD")
    refs = load_references([write(tmp_path, [mine, record(id="cohen2019-cifar10-sigma0.25-r0", value=1.0)])])
    ours = {r.id: r for r in refs.records}
    assert ours["mine-1"].attack == "pgd" and ours["mine-1"].eps == 8 / 255
    assert ours["cohen2019-cifar10-sigma0.25-r0"].value == 1.0
    assert len(refs.records) == len(packaged().records) + 1


# -- the store -------------------------------------------------------------------------------------
def test_sync_is_idempotent_and_updates_in_place(db_url: str, tmp_path: Path) -> None:
    store = Store(db_url, create=True)
    refs = packaged().records
    assert sync_references(store, refs) == len(refs)
    assert sync_references(store, refs) == 0
    assert len(store.references("cifar10")) == len(packaged().for_dataset("cifar10"))
    changed = load_references([write(tmp_path, [record(id="cohen2019-cifar10-sigma0.25-r0", value=50.0)])])
    assert sync_references(store, changed.records) == 1
    rows = [r for r in store.references("cifar10") if (r.note or "").startswith("cohen2019-cifar10-sigma0.25-r0 (")]
    assert len(rows) == 1 and rows[0].value == 0.5 and rows[0].metric == "clean_accuracy"  # the user's record
    assert rows[0].source == "Me et al.; my paper, Table 1"
    assert len(store.references("cifar10")) == len(packaged().for_dataset("cifar10"))  # replaced, not added


# -- the board -------------------------------------------------------------------------------------
def rs_summary() -> dict[str, Any]:
    return {"run_id": 7, "defense": "rs", "dataset": "cifar10", "n_examples": 100, "model": None,
            "clean_accuracy": 0.7, "attacks": [], "robust_accuracy": None,
            "certified": [{"certifier": "smoothing", "radius": 0.25, "accuracy": 0.55},
                          {"certifier": "smoothing", "radius": 0.3, "accuracy": 0.5}]}


def published_board(db_url: str) -> Any:
    store = Store(db_url, create=True)
    refs = packaged()
    sync_references(store, refs.records)
    board = board_from_summaries("cifar10", "certify@1", [rs_summary()])
    return add_published(board, from_rows(store.references("cifar10"), refs))


def test_published_rows_follow_the_measured_row_with_differences(db_url: str) -> None:
    board = published_board(db_url)
    labels = [(row[DEFENSE], row[MODEL]) for row in board.rows]
    assert labels[0] == ("rs", "model")
    assert ("rs" + PUBLISHED, "ResNet-110, sigma=0.25") in labels
    assert ("rs" + PUBLISHED, "Cohen et al. (envelope in the SmoothAdv paper)") in labels
    at = labels.index(("rs" + PUBLISHED, "ResNet-110, sigma=0.25"))
    published, delta = board.rows[at], board.rows[at + 1]
    r25 = ColumnKey.certified("smoothing", 0.25)
    assert published[r25] == 0.600 and CLEAN not in published  # no published clean number for this setting
    assert ColumnKey.certified("smoothing", 0.3) not in published  # no published number at r=0.3
    assert delta[DEFENSE] == "rs" + DIFFERENCE and delta[r25] == pytest.approx(0.55 - 0.600)
    assert "the authors' numbers under their own protocol" in board.note
    assert all(row[DEFENSE].startswith("rs") for row in board.rows)  # no row for defenses not on the board
    text = render_markdown(board)
    assert "| rs (published, authors' protocol) | ResNet-110, sigma=0.25 |" in text and "-5.00" in text


def test_board_without_published_numbers_is_unchanged(db_url: str) -> None:
    store = Store(db_url, create=True)
    sync_references(store, packaged().records)
    board = board_from_summaries("digits", "pgd@1", [{**rs_summary(), "dataset": "digits"}])
    assert add_published(board, from_rows(store.references("digits"), packaged())) == board


# -- the CLI ---------------------------------------------------------------------------------------
def test_cli_lists_cohen_cifar10_curve_with_its_source() -> None:
    result = runner.invoke(app, ["references", "--dataset", "cifar10", "--format", "csv"])
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("cohen2019-cifar10-")]
    assert len(lines) == 28 and all("locuslab/smoothing data/certify/cifar10/resnet110" in line for line in lines)
    assert "imagenet" not in result.stdout
    listed = json.loads(runner.invoke(app, ["references", "--format", "json"]).stdout)
    assert len(listed) == len(packaged().records) and listed[0]["source"]


def test_cli_user_file_errors_and_store_loading(tmp_path: Path, db_url: str) -> None:
    bad = write(tmp_path, [record(value=float("nan"))])
    assert_cli_user_error(runner.invoke(app, ["references", "--references", str(bad)]), "non-finite number NaN")
    mine = write(tmp_path, [record(dataset="synthetic")])
    out = runner.invoke(app, ["references", "--dataset", "synthetic", "--references", str(mine), "-f", "md"])
    assert out.exit_code == 0 and "| mine-1 | rs | synthetic |" in out.stdout and "80.5%" in out.stdout
    Store(db_url, create=True)
    for _ in range(2):
        assert runner.invoke(app, ["references", "--references", str(mine), "--db", db_url]).exit_code == 0
    assert len(Store(db_url, create=False).references("synthetic")) == 1


def test_leaderboard_shows_a_user_published_row_beside_the_measured_one(tmp_path: Path, db_url: str) -> None:
    fast = ["--dataset", "synthetic", "--eps", "0.1", "--steps", "5", "-n", "32", "--epochs", "2"]
    run = runner.invoke(app, ["run", "--defense", "standard", *fast, "--db", db_url, "--json"])
    assert run.exit_code == 0, run.stderr
    measured = json.loads(run.stdout)
    mine = write(tmp_path, [record(defense="standard", dataset="synthetic", setting="their CNN", value=50),
                            record(id="mine-2", defense="standard", dataset="synthetic", setting="their CNN",
                                   metric="robust_accuracy", norm="Linf", eps=0.1, attack="pgd", value=0.25,
                                   unit="fraction")])
    board = json.loads(runner.invoke(app, ["leaderboard", "--dataset", "synthetic", "-f", "json", "--references",
                                           str(mine), "--db", db_url]).stdout)
    defenses = [row["defense"] for row in board["rows"]]
    assert defenses == ["standard", "standard" + PUBLISHED, "standard" + DIFFERENCE]
    published, delta = board["rows"][1], board["rows"][2]
    assert published["clean"] == 0.5 and published["attack:pgd Linf 0.1"] == 0.25 and published["robust"] is None
    assert delta["clean"] == pytest.approx(measured["clean_accuracy"] - 0.5)
    assert published["model"] == "their CNN" and published["run_id"] is None
    md = runner.invoke(app, ["leaderboard", "--dataset", "synthetic", "-f", "md", "--db", db_url])
    assert "(published, authors' protocol)" in md.stdout  # the user's references stay in the store




def test_a_store_that_refuses_the_write_still_shows_published_rows(db_url: str, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from sqlalchemy.exc import OperationalError

    from bench.cli.commands import _with_published

    class ReadOnly:
        def __enter__(self) -> Any:
            raise OperationalError("INSERT", {}, Exception("attempt to write a readonly database"))

        def __exit__(self, *exc: Any) -> None:
            return None

    store = Store(db_url, create=True)
    monkeypatch.setattr(store, "session", ReadOnly)
    with pytest.raises(BenchError) as info:
        sync_references(store, packaged().records)
    assert str(info.value).endswith("attempt to write a readonly database") and "\n" not in str(info.value)
    board = _with_published(store, board_from_summaries("cifar10", "certify@1", [rs_summary()]), [])
    assert ("rs" + PUBLISHED, "ResNet-110, sigma=0.25") in [(row[DEFENSE], row[MODEL]) for row in board.rows]
    assert "published numbers not loaded into the store" in capsys.readouterr().err

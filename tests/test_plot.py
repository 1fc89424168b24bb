"""`bench plot`: certified accuracy against L2 radius from stored runs (hand-built in the store,
nothing trained), the pure curve builder, and the user errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.errors import BenchError
from bench.results.plot import Curve, curves
from bench.results.queries import run_summary
from bench.results.schema import EvalKind
from bench.results.store import Store
from helpers import assert_cli_user_error

runner = CliRunner()

RADII = [0.0, 0.25, 0.5]
N = 4


def _row(i: int, correct: bool, radius: float | None = None, abstained: bool = False) -> dict[str, Any]:
    return {"example_index": i, "label": i % 2, "prediction": i % 2 if correct else 1 - i % 2, "correct": correct,
            "radius": radius, "abstained": abstained, "samples_used": 100 if radius is not None else None,
            "draws": 1, "correct_draws": None, "perturbation_norm": None}


def _stage(store: Store, run_id: int, position: int, kind: EvalKind, method: str, rows: list[dict[str, Any]],
           **kw: Any) -> None:
    ev = store.evaluation(run_id, position, kind, method, **kw)
    store.add_results(ev, rows)
    store.finish_evaluation(ev)


def _run(store: Store, key: str, defense: str, stages: list[tuple[EvalKind, str, list[dict], dict]]) -> int:
    """A finished run on 4 examples: a clean stage (0, 1, 2 correct; 3 wrong), then ``stages``."""
    model_id = store.upsert_model(f"model-{key}", defense=defense, dataset="synthetic", source="trained")
    run_id = store.create_run(key, model_id=model_id, defense=defense, dataset="synthetic", protocol="custom",
                              protocol_version=1, seed=0, n_examples=N, indices=list(range(N)),
                              config={"radii": RADII, "dataset_spec": {"task": "multiclass",
                                                                      "classes": ["a", "b"]}})
    _stage(store, run_id, 0, EvalKind.CLEAN, "clean", [_row(0, True), _row(1, True), _row(2, True), _row(3, False)])
    for position, (kind, method, rows, kw) in enumerate(stages, start=1):
        _stage(store, run_id, position, kind, method, rows, **kw)
    store.finish_run(run_id)
    return run_id


# certified radii 0.3, 0.6, 0.1; example 3 abstains: accuracy 3/4 at r=0, 2/4 at r=0.25, 1/4 at r=0.5
SMOOTH = [_row(0, True, 0.3), _row(1, True, 0.6), _row(2, True, 0.1), _row(3, True, None, abstained=True)]
# a wrong certified prediction never counts: 1/4 at r=0 and r=0.25, 0 at r=0.5
SMOOTH_WIDE = [_row(0, True, 0.4), _row(1, False, 0.9), _row(2, False, 0.2), _row(3, False, 0.0)]
# attack rows exist only for the clean-correct examples 0-2; L2 breaks 1 -> 2/4, Linf breaks 0 and 2 -> 1/4
L2_ROWS = [_row(0, True), _row(1, False), _row(2, True)]
LINF_ROWS = [_row(0, False), _row(1, True), _row(2, False)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, int]]]:
    """One store for the module (read-only to the tests)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('plot')}/p.db"
    store = Store(url)
    ids = {
        "certified": _run(store, "r-cert", "smoothing", [
            (EvalKind.CERTIFY, "smoothing", SMOOTH, {"sigma": 0.25}),
            (EvalKind.ATTACK, "pgd", L2_ROWS, {"norm": "L2", "eps": 0.5}),
            (EvalKind.ATTACK, "pgd", LINF_ROWS, {"norm": "Linf", "eps": 0.1}),
        ]),
        "two_stages": _run(store, "r-two", "smoothing", [
            (EvalKind.CERTIFY, "smoothing", SMOOTH, {"sigma": 0.25}),
            (EvalKind.CERTIFY, "smoothing", SMOOTH_WIDE, {"sigma": 0.5}),
        ]),
        "l2_only": _run(store, "r-l2", "pgd-at", [(EvalKind.ATTACK, "pgd", L2_ROWS, {"norm": "L2", "eps": 0.25})]),
        "linf_only": _run(store, "r-linf", "pgd-at", [(EvalKind.ATTACK, "pgd", LINF_ROWS,
                                                        {"norm": "Linf", "eps": 0.1})]),
    }
    store.close()
    yield url, ids


def _summaries(url: str, *run_ids: int) -> list[dict[str, Any]]:
    store = Store(url)
    try:
        return [run_summary(store, i) for i in run_ids]
    finally:
        store.close()


def test_certified_curve_and_l2_points(runs) -> None:
    url, ids = runs
    [curve] = curves(_summaries(url, ids["certified"]))
    assert isinstance(curve, Curve)
    assert curve.run_id == ids["certified"]
    assert curve.label == f"run {ids['certified']}: smoothing (smoothing)"
    assert curve.radii == tuple(RADII)
    assert curve.accuracies == pytest.approx((3 / 4, 2 / 4, 1 / 4))
    assert curve.empirical == ((0.5, 2 / 4),)  # the L2 attack only, not the Linf one
    assert curve.dataset == "synthetic"


def test_two_stages_of_one_certifier_are_two_curves(runs) -> None:
    url, ids = runs
    first, second = curves(_summaries(url, ids["two_stages"]))
    assert first.label != second.label and "smoothing" in first.label and "smoothing" in second.label
    assert first.radii == second.radii == tuple(RADII)
    assert first.accuracies == pytest.approx((3 / 4, 2 / 4, 1 / 4))
    assert second.accuracies == pytest.approx((1 / 4, 1 / 4, 0.0))
    assert first.empirical == second.empirical == ()


def test_stage_key_groups_when_present() -> None:
    certified = [{"certifier": "ibp", "radius": r, "accuracy": a, "stage": s}
                 for s, acc in ((3, (0.9, 0.5)), (5, (0.8, 0.1))) for r, a in zip((0.5, 0.0), acc)]
    summary = {"run_id": 7, "defense": "crown", "dataset": "d", "certified": certified, "threat_models": []}
    got = curves([summary])
    assert [c.radii for c in got] == [(0.0, 0.5), (0.0, 0.5)]  # sorted by radius
    assert [c.accuracies for c in got] == [(0.5, 0.9), (0.1, 0.8)]
    assert [c.label for c in got] == ["run 7: crown (ibp, stage 3)", "run 7: crown (ibp, stage 5)"]


def test_runs_in_order_and_empirical_only_run(runs) -> None:
    url, ids = runs
    got = curves(_summaries(url, ids["l2_only"], ids["certified"]))
    assert [c.run_id for c in got] == [ids["l2_only"], ids["certified"]]
    l2 = got[0]
    assert l2.radii == l2.accuracies == ()
    assert l2.empirical == ((0.25, 2 / 4),)


def test_run_without_certified_or_l2_is_an_error(runs) -> None:
    url, ids = runs
    with pytest.raises(BenchError, match=f"run {ids['linf_only']} has no certified results and no L2 attacks"):
        curves(_summaries(url, ids["certified"], ids["linf_only"]))


def test_cli_writes_png_and_svg(runs, tmp_path: Path) -> None:
    url, ids = runs
    a, b, c = ids["certified"], ids["two_stages"], ids["l2_only"]
    result = runner.invoke(app, ["plot", str(a), str(b), str(c), "--db", url])
    assert result.exit_code == 0, result.stderr + result.stdout
    stem = f"bench-plot-{a}-{b}-{c}"
    assert result.stdout.split() == [f"{stem}.png", f"{stem}.svg"]
    png, svg = tmp_path / f"{stem}.png", tmp_path / f"{stem}.svg"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    text = svg.read_text()
    assert "<svg" in text
    assert "L2 radius" in text  # axis label, as text in the SVG


def test_cli_one_format_and_out_path(runs, tmp_path: Path) -> None:
    url, ids = runs
    out = tmp_path / "figs" / "cert.svg"
    out.parent.mkdir()
    result = runner.invoke(app, ["plot", str(ids["certified"]), "--db", url, "--format", "svg", "--out", str(out)])
    assert result.exit_code == 0, result.stderr + result.stdout
    assert result.stdout.split() == [str(out)]
    assert "<svg" in out.read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["cert.svg"]


def test_cli_no_plottable_data(runs) -> None:
    url, ids = runs
    result = runner.invoke(app, ["plot", str(ids["certified"]), str(ids["linf_only"]), "--db", url])
    assert_cli_user_error(result, f"run {ids['linf_only']}", "no certified results")
    assert not list(Path.cwd().glob("bench-plot-*"))


def test_cli_unknown_run(runs) -> None:
    url, _ = runs
    result = runner.invoke(app, ["plot", "999", "--db", url])
    assert_cli_user_error(result, "no run with id 999")


def test_cli_unwritable_output(runs, tmp_path: Path) -> None:
    url, ids = runs
    result = runner.invoke(app, ["plot", str(ids["certified"]), "--db", url,
                                 "--out", str(tmp_path / "missing" / "x")])
    assert_cli_user_error(result, "cannot write")


# -- the exact curve from the per-example radii --------------------------------------------------
def test_exact_points_are_the_step_function_of_the_radii() -> None:
    from bench.results.plot import exact_points

    # radii 0.3, 0.6, 0.1 of 4 examples: acc(r) = #{radius >= r} / 4, then 0 past the largest
    assert exact_points([0.3, 0.6, 0.1], 4) == ((0.0, 0.1, 0.3, 0.6, 0.63), (0.75, 0.75, 0.5, 0.25, 0.0))
    assert exact_points([], 4) == ((0.0,), (0.0,))
    assert exact_points([0.0, 0.0], 2) == ((0.0, 0.05), (1.0, 0.0))


def test_exact_curves_from_stored_radii_agree_with_the_grid_and_carry_a_band(runs) -> None:
    from bench.results.intervals import clopper_pearson
    from bench.results.perexample import certified_radii

    url, ids = runs
    store = Store(url)
    try:
        radii = {ids["two_stages"]: certified_radii(store, ids["two_stages"])}
    finally:
        store.close()
    assert sorted(radii[ids["two_stages"]][1]) == [0.1, 0.3, 0.6] and radii[ids["two_stages"]][2] == [0.4]
    first, second = curves(_summaries(url, ids["two_stages"]), radii)
    grid = curves(_summaries(url, ids["two_stages"]))
    for exact, coarse in ((first, grid[0]), (second, grid[1])):
        assert exact.exact and not coarse.exact and exact.label == coarse.label
        for r, acc in zip(coarse.radii, coarse.accuracies):  # the exact curve passes through the grid values
            # drawn with where="pre", the value at r is the one of the first point at or after r
            at = next((a for x, a in zip(exact.radii, exact.accuracies) if x >= r), 0.0)
            assert at == pytest.approx(acc)
        assert len(exact.lower) == len(exact.upper) == len(exact.radii)
        assert all(lo <= a <= hi for lo, a, hi in zip(exact.lower, exact.accuracies, exact.upper))
    assert first.radii == (0.0, 0.1, 0.3, 0.6, 0.63)
    assert (first.lower[2], first.upper[2]) == clopper_pearson(2, N)


def test_plot_says_when_runs_use_different_example_sets(runs, tmp_path: Path) -> None:
    from bench.results.plot import mixed_examples

    url, ids = runs
    same = curves(_summaries(url, ids["certified"], ids["two_stages"]))
    assert mixed_examples(same) == ""  # the same indices, the same hash
    other = [Curve(1, "a", (0.0,), (1.0,), examples="aaa"), Curve(2, "b", (0.0,), (1.0,), examples="bbb")]
    assert mixed_examples(other).startswith("runs on 2 different example sets")
    store = Store(url)
    try:
        store.update_run(ids["l2_only"], indices_hash="other-set")
    finally:
        store.close()
    try:
        result = runner.invoke(app, ["plot", str(ids["certified"]), str(ids["l2_only"]), "--db", url,
                                     "-o", str(tmp_path / "p"), "-f", "svg"])
        assert result.exit_code == 0, result.stderr
        assert "different example sets" in result.stderr and (tmp_path / "p.svg").exists()
    finally:
        store = Store(url)
        store.update_run(ids["l2_only"], indices_hash=None)
        store.close()

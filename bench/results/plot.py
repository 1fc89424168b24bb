"""Certified accuracy against L2 radius, one curve per run and certification stage, with the
run's empirical L2 robust accuracy as points at x = eps (``bench plot``).

:func:`curves` turns run summaries (:func:`bench.results.queries.run_summary`) into plain
:class:`Curve` values and needs no matplotlib. Given the stored per-example certified radii
(:func:`bench.results.perexample.certified_radii`), a curve is the exact step function of the
certified accuracy (a step at every certified radius, not only at the grid radii) with its
pointwise 95% Clopper-Pearson band; :func:`draw` renders them with the headless Agg
backend, which it selects itself, so importing this module never touches matplotlib.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench.errors import BenchError
from bench.results.types import RunSummary, ThreatRow

__all__ = ["FORMATS", "STEP_WHERE", "Curve", "curves", "draw"]

FORMATS = ("png", "svg")

# How the certified curve joins its points. Certified accuracy at r counts radii >= r:
# non-increasing and left-continuous, so on (r_i, r_{i+1}] it equals acc(r_{i+1}): "pre".
# With the per-example radii the points are every certified radius and the curve is exact;
# from the grid alone only acc(r_{i+1}) <= acc(r) <= acc(r_i) is known and "pre" draws the lower one.
STEP_WHERE: Literal["pre", "post", "mid"] = "pre"

_LINESTYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Curve:
    """One certified-accuracy curve of one run, or only the run's empirical points.

    ``radii``/``accuracies`` are sorted by radius (empty when the run has no certified results);
    ``empirical`` holds (eps, robust accuracy) of the run's L2 threat models, sorted by eps, and
    is attached to the run's first curve only.
    """

    run_id: int
    label: str  # legend text, "run N: defense (certifier)"
    radii: tuple[float, ...]
    accuracies: tuple[float, ...]
    empirical: tuple[tuple[float, float], ...] = ()
    empirical_label: str = ""
    dataset: str = ""
    exact: bool = False  # radii are every certified radius (from the per-example rows), not the grid
    lower: tuple[float, ...] = ()  # the pointwise 95% Clopper-Pearson band at each radius (exact curves)
    upper: tuple[float, ...] = ()
    examples: str = ""  # the run's example set: "<indices hash>" (or "n=<N>" when the hash is unknown)


def exact_points(radii: Sequence[float], n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The exact certified-accuracy step function of ``n`` examples whose certified radii (of the
    correctly certified ones) are ``radii``: its points ``(r, acc(r))`` at 0 and at every distinct
    radius, ``acc(r) = #{radius >= r} / n``, followed by one point at 0 just past the largest radius
    (drawn with ``where="pre"`` the line is the function itself)."""
    xs = sorted({0.0, *radii})
    ordered = sorted(radii)
    ys = [(len(ordered) - bisect_left(ordered, x)) / n for x in xs]
    if ys[-1] > 0:
        xs.append(xs[-1] * 1.05 if xs[-1] > 0 else 0.05)
        ys.append(0.0)
    return tuple(xs), tuple(ys)


def _stage_of(entry: Mapping[str, Any]) -> Any:
    """What tells two stages of the same certifier apart, when the entry says it: a ``stage`` key
    (entries from other producers), else the summary's ``position``."""
    for key in ("stage", "position"):
        if entry.get(key) is not None:
            return entry[key]
    return None


def _certified_groups(entries: Iterable[Mapping[str, Any]]) -> dict[tuple[str, Any], list[tuple[float, float]]]:
    """(certifier, stage) -> [(radius, accuracy)], in the summary's order.

    Without a stage key, two stages of one certifier are told apart by the summary's layout
    (each stage lists the whole radius grid in turn): a radius the certifier's current group
    already has starts its next group, numbered 1, 2, ...
    """
    groups: dict[tuple[str, Any], list[tuple[float, float]]] = {}
    seen: dict[str, tuple[int, set[float | None]]] = {}  # certifier -> (current group number, its radii)
    for entry in entries:
        certifier, stage = str(entry["certifier"]), _stage_of(entry)
        radius = entry.get("radius")
        if stage is None:
            number, radii = seen.get(certifier, (1, set()))
            if radius in radii:
                number, radii = number + 1, set()
            radii.add(radius)
            seen[certifier] = (number, radii)
            stage = ("#", number)
        points = groups.setdefault((certifier, stage), [])
        if entry.get("accuracy") is not None and radius is not None:
            points.append((float(radius), float(entry["accuracy"])))
    return {k: v for k, v in groups.items() if v}


def _l2_points(threats: Iterable[ThreatRow]) -> tuple[tuple[float, float], ...]:
    """(eps, robust accuracy) of the L2 threat models that have both, sorted by eps."""
    points = []
    for t in threats:
        accuracy = t.get("robust_accuracy")
        if str(t.get("norm", "")).upper() == "L2" and t.get("eps") is not None and accuracy is not None:
            points.append((float(t["eps"]), float(accuracy)))
    return tuple(sorted(points))


def _exact(curve: Curve, radii: Sequence[float], n: int) -> Curve:
    """``curve`` replaced by the exact step function of its stage, with its Clopper-Pearson band."""
    from dataclasses import replace

    from bench.results.intervals import clopper_pearson

    xs, ys = exact_points(radii, n)
    band = [clopper_pearson(round(y * n), n) for y in ys]
    return replace(curve, radii=xs, accuracies=ys, exact=True, lower=tuple(lo for lo, _ in band),
                   upper=tuple(hi for _, hi in band))


def _run_curves(summary: RunSummary, per_example: Mapping[int, Sequence[float]] | None = None) -> list[Curve]:
    run_id = summary["run_id"]
    name = f"run {run_id}: {summary.get('defense', '?')}"
    dataset = str(summary.get("dataset") or "")
    groups = _certified_groups(summary.get("certified") or [])
    certifier_count: dict[str, int] = {}
    for certifier, _ in groups:
        certifier_count[certifier] = certifier_count.get(certifier, 0) + 1
    empirical = _l2_points(summary.get("threat_models") or [])
    n = int(summary.get("n_examples") or 0)
    examples = str(summary.get("indices_hash") or f"n={n}")
    empirical_label = f"{name} (L2 attacks)" if empirical else ""
    out: list[Curve] = []
    for (certifier, stage), points in groups.items():
        points.sort()
        if certifier_count[certifier] == 1:
            what = certifier
        else:
            what = f"{certifier}, stage {stage[1] if isinstance(stage, tuple) else stage}"
        curve = Curve(run_id, f"{name} ({what})", tuple(r for r, _ in points), tuple(a for _, a in points),
                      empirical if not out else (), empirical_label if not out else "", dataset, examples=examples)
        position = stage if isinstance(stage, int) else None
        if per_example is not None and position is not None and position in per_example and n:
            curve = _exact(curve, per_example[position], n)
        out.append(curve)
    if not out and empirical:
        out.append(Curve(run_id, empirical_label, (), (), empirical, empirical_label, dataset, examples=examples))
    if not out:
        raise BenchError(f"run {run_id} has no certified results and no L2 attacks to plot")
    return out


def curves(summaries: Sequence[RunSummary],
           per_example: Mapping[int, Mapping[int, Sequence[float]]] | None = None) -> list[Curve]:
    """The curves of the given run summaries, in order: per run, one per (certifier, stage).

    ``per_example`` (run id -> stage position -> certified radii, as
    :func:`bench.results.perexample.certified_radii` returns them) makes a stage's curve exact, with
    its band; without it a curve joins the grid radii. Raises :class:`BenchError` for a run with
    neither certified results nor L2 robust accuracy.
    """
    return [curve for summary in summaries
            for curve in _run_curves(summary, (per_example or {}).get(summary["run_id"]) if per_example else None)]


def mixed_examples(plotted: Sequence[Curve]) -> str:
    """A warning when ``plotted`` combines runs on different example sets ("" when it does not):
    their curves are then not measured on the same examples."""
    sets = dict.fromkeys(c.examples for c in plotted if c.examples)
    if len(sets) < 2:
        return ""
    return f"runs on {len(sets)} different example sets: their curves are not measured on the same examples"


def _output_path(stem: Path, fmt: str) -> Path:
    return stem.with_name(f"{stem.name}.{fmt}")


def draw(plotted: Sequence[Curve], path_stem: Path, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Render ``plotted`` into ``path_stem`` + ``.png`` / ``.svg`` (one file per format); return the paths."""
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise BenchError(f"unknown plot format(s) {', '.join(unknown) or '(none)'}; use {' or '.join(FORMATS)}")
    if not plotted:
        raise BenchError("nothing to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    palette = plt.rcParams["axes.prop_cycle"].by_key().get("color") or ["C0"]
    run_order = list(dict.fromkeys(c.run_id for c in plotted))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        def color(curve: Curve) -> str:
            return palette[run_order.index(curve.run_id) % len(palette)]

        nth_in_run: dict[int, int] = {}
        x_max = 0.0
        for curve in (c for c in plotted if c.radii):  # the lines first, the points on top
            k = nth_in_run.get(curve.run_id, 0)
            nth_in_run[curve.run_id] = k + 1
            ax.step(curve.radii, curve.accuracies, where=STEP_WHERE, color=color(curve),
                    linestyle=_LINESTYLES[k % len(_LINESTYLES)], marker=None if curve.exact else "o", markersize=3,
                    label=curve.label)
            if curve.lower:
                ax.fill_between(curve.radii, curve.lower, curve.upper, step=STEP_WHERE, color=color(curve),
                                alpha=0.15, linewidth=0)
            x_max = max(x_max, *curve.radii)
        for curve in (c for c in plotted if c.empirical):
            eps, acc = zip(*curve.empirical)
            ax.scatter(eps, acc, color=color(curve), marker="X", s=60, edgecolors="black", linewidths=0.5,
                       zorder=3, label=curve.empirical_label or curve.label)
            x_max = max(x_max, *eps)
        span = x_max if x_max > 0 else 1.0
        ax.set_xlim(-0.02 * span, 1.05 * span)  # a little room so points at 0 are not cut in half
        ax.set_ylim(-0.02, 1.02)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax.set_xlabel("L2 radius")
        ax.set_ylabel("accuracy")
        datasets = ", ".join(dict.fromkeys(c.dataset for c in plotted if c.dataset))
        ax.set_title(f"Certified accuracy vs L2 radius{f' on {datasets}' if datasets else ''}")
        notes = [("bands: pointwise 95% Clopper-Pearson" if any(c.lower for c in plotted) else ""),
                 mixed_examples(plotted)]
        if any(notes):
            ax.text(0.0, -0.16, "\n".join(filter(None, notes)), transform=ax.transAxes, fontsize="x-small",
                    va="top")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        written = []
        for fmt in formats:
            path = _output_path(path_stem, fmt)
            try:
                fig.savefig(path, format=fmt)
            except OSError as exc:
                raise BenchError(f"cannot write {path}: {exc.strerror or exc}") from None
            written.append(path)
        return written
    finally:
        plt.close(fig)

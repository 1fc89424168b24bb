"""Leaderboards: one row per (defense, model) for a dataset and protocol, and pure renderers.

On datasets flagged ``imbalanced`` (HAM10000, NIH, MedMNIST) every accuracy column is followed
by its balanced-accuracy twin "(BA)": the mean per-class recall, which a model that always
predicts the majority class cannot inflate.

:func:`build_board` queries the store; :func:`board_from_summaries` is the pure part that
turns run summaries into a :class:`Board`. The renderers (Markdown, LaTeX, CSV, JSON) are pure
functions of a board and render the same rows; accuracies are shown in percent with two
decimals in Markdown/LaTeX/terminal, and as full-precision fractions in CSV/JSON.

A randomized run (scored with R > 1 draws per example) shows its single-draw accuracies in the
Clean, attack and Robust columns (the probability that one forward pass is correct, with a
Student-t interval over examples and draws), so rows rank by that headline; the stricter
worst-of-R robust accuracy is beside it in the column "Robust (all R draws)", present only when
a row is randomized (docs/evaluation.md#2-scoring-randomized-defenses). Deterministic boards are
unchanged.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from bench.config import format_eps, is_adaptive
from bench.errors import BenchError
from bench.results.schema import RunStatus
from bench.results.store import Store
from bench.results.stored import StoredConfig
from bench.results.summary import scoring_draws, scoring_exact
from bench.results.types import AttackRow, RunSummary, SingleDraw

__all__ = ["CLEAN", "DEFENSE", "FORMATS", "MODEL", "N", "ROBUST", "RUN_ID", "Board", "Column", "ColumnKey", "Row",
           "board_from_summaries", "build_board"]

FORMATS = ("table", "md", "latex", "csv", "json", "html")

ColumnKind = Literal["defense", "model", "run_id", "clean", "attack", "robust", "worst_of_r", "certified", "acr", "n",
                     "checks", "details", "intervals", "draws"]
_FIXED_TITLES = {"defense": "Defense", "model": "Model", "run_id": "Run", "clean": "Clean",
                 "robust": "Robust (worst case)", "worst_of_r": "Robust (all R draws)", "n": "N"}


@dataclass(frozen=True, eq=False)
class ColumnKey:
    """What a leaderboard column (and a row's value under it) holds, typed.

    :attr:`id` is the key's one string form, the column key of the CSV and JSON renderings
    (``"attack:pgd Linf 0.1"``, ``"certified:smoothing@0.25"``, ``"acr:smoothing"``, ``"clean_ba"``,
    ...), and :attr:`title` its column title; both are derived here and nowhere else. Two keys
    with the same ``id`` are the same column (an eps or radius that formats the same shares it).
    """

    kind: ColumnKind
    method: str = ""  # the attack (attack) or the certifier (certified, acr)
    norm: str | None = None
    eps: float | None = None
    repeat: int = 1  # the n-th stage with the same attack, norm and eps in one run
    radius: float | None = None
    balanced: bool = False  # the balanced-accuracy twin of an accuracy column

    @classmethod
    def attack(cls, attack: AttackRow, repeat: int = 1) -> ColumnKey:
        return cls("attack", attack["name"], attack["norm"], attack["eps"], repeat=repeat)

    @classmethod
    def certified(cls, certifier: str, radius: float) -> ColumnKey:
        return cls("certified", certifier, radius=radius)

    @classmethod
    def acr(cls, certifier: str) -> ColumnKey:
        return cls("acr", certifier)

    def twin(self) -> ColumnKey:
        """The balanced-accuracy "(BA)" column of this accuracy column."""
        return replace(self, balanced=True)

    @property
    def id(self) -> str:
        if self.kind == "attack":
            return f"attack:{self._attack_label('#')}" + (":ba" if self.balanced else "")
        if self.kind == "certified":
            return f"certified:{self.method}@{self.radius:g}"
        if self.kind == "acr":
            return f"acr:{self.method}"
        return self.kind + ("_ba" if self.balanced else "")

    @property
    def title(self) -> str:
        if self.kind == "attack":
            title = self._attack_label(" #")
        elif self.kind == "certified":
            title = f"{self.method} r={self.radius:g}"
        elif self.kind == "acr":
            title = f"{self.method} ACR"
        else:
            title = _FIXED_TITLES[self.kind]
        return title + (" (BA)" if self.balanced else "")

    def _attack_label(self, repeat_mark: str) -> str:
        assert self.eps is not None  # attack columns always have an eps
        label = f"{self.method} {self.norm} {format_eps(self.eps)}"
        return label + (f"{repeat_mark}{self.repeat}" if self.repeat > 1 else "")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ColumnKey) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


DEFENSE, MODEL, RUN_ID = ColumnKey("defense"), ColumnKey("model"), ColumnKey("run_id")
CLEAN, ROBUST, N = ColumnKey("clean"), ColumnKey("robust"), ColumnKey("n")
WORST_OF_R = ColumnKey("worst_of_r")  # a randomized row's robust accuracy, every one of R draws correct
# row keys that are no column: the names of the row's triggered checks, and its details (protocol,
# examples, provenance summary) for the renderers that show them (html); a randomized row's R and
# the intervals of its single-draw cells (column key -> (lo, hi))
CHECKS, DETAILS = ColumnKey("checks"), ColumnKey("details")
DRAWS, INTERVALS = ColumnKey("draws"), ColumnKey("intervals")

Row = dict[ColumnKey, Any]  # a board row: column key -> value (plus RUN_ID, CHECKS, DETAILS: no columns)


@dataclass(frozen=True)
class Column:
    """A board column; its title and kind (text | accuracy | int | radius) follow from its key."""

    key: ColumnKey

    @property
    def title(self) -> str:
        return self.key.title

    @property
    def kind(self) -> str:
        if self.key.kind in ("defense", "model"):
            return "text"
        if self.key.kind in ("n", "run_id"):
            return "int"
        return "radius" if self.key.kind == "acr" else "accuracy"


@dataclass(frozen=True)
class Board:
    dataset: str
    protocol: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    note: str = ""  # e.g. which evaluation subset was chosen and what was left out


def _model_label(summary: RunSummary) -> str:
    model = summary.get("model")
    arch = ((model.get("hparams") if model else None) or {}).get("arch") or "model"
    sha = (model.get("checkpoint_sha256") if model else None) or ""
    return f"{arch} {sha[:8]}".strip()


def board_from_summaries(dataset: str, protocol: str, summaries: Iterable[RunSummary]) -> Board:
    """Build a board from run summaries (one per model; the caller picks which run).

    Rows are ranked by robust accuracy (None last), then clean accuracy, defense and run id.
    Columns appear in the order the summaries first show them; on an imbalanced dataset every
    accuracy column except the certified ones has its "(BA)" twin."""
    rows: list[Row] = []  # in the order of the summaries until sorted below
    imbalanced = False
    non_adaptive = unsound = 0
    flagged: list[str] = []  # "defense: check, check" of the rows marked §
    for summary in summaries:
        imbalanced |= bool(summary.get("imbalanced"))
        mark = ""
        if _randomized_non_adaptive(summary):
            mark, non_adaptive = " †", non_adaptive + 1
        if _unsound_certificate(summary):
            mark, unsound = mark + " ‡", unsound + 1
        other = _other_triggered_checks(summary)
        if other:
            mark += " §"
            flagged.append(f"{summary['defense']} (run {summary['run_id']}: {', '.join(other)})")
        rows.append(_row(summary, mark))
    columns = _columns(rows, imbalanced)
    rows.sort(key=lambda r: (r.get(ROBUST) is None, -(r.get(ROBUST) or 0.0), -(r.get(CLEAN) or 0.0),
                             r[DEFENSE], r[RUN_ID]))
    notes = [single_draw_note(rows),
             ("† randomized defense evaluated with a non-adaptive protocol: its robust accuracy is likely "
              "overestimated") if non_adaptive else "",
             "‡ certificate audit failed (bench audit): its certified accuracy is not trustworthy" if unsound else "",
             ("§ a check triggered, the number may be wrong (see docs/checks.md and bench show RUN): "
              + ", ".join(flagged)) if flagged else ""]
    return Board(dataset, protocol, columns, tuple(rows), "; ".join(filter(None, notes)))


def _row(summary: RunSummary, mark: str) -> Row:
    """One summary's row; the "(BA)" values only when its dataset is imbalanced. A randomized
    run's accuracy cells are its single-draw values (:func:`_single_draw_cells`)."""
    balanced = bool(summary.get("imbalanced"))
    row: Row = {DEFENSE: summary["defense"] + mark, MODEL: _model_label(summary), RUN_ID: summary["run_id"],
                CLEAN: summary["clean_accuracy"], WORST_OF_R: summary["robust_accuracy"]}
    if balanced:
        row[CLEAN.twin()] = summary.get("balanced_accuracy")
    for key, attack in _attack_columns(summary):
        row[key] = attack["accuracy"]
        if balanced:
            row[key.twin()] = attack.get("balanced_accuracy")
    row[ROBUST] = summary["robust_accuracy"]
    if balanced:
        row[ROBUST.twin()] = summary.get("robust_balanced_accuracy")
    for cert in summary.get("certified", []):
        row[ColumnKey.certified(cert["certifier"], cert["radius"])] = cert["accuracy"]
    for block in summary.get("certificate", []):
        row[ColumnKey.acr(block["certifier"])] = block.get("average_radius")
    row[N] = summary["n_examples"]
    row[CHECKS] = tuple(c["name"] for c in summary.get("checks", []) if c["triggered"])
    row[DETAILS] = _details(summary)
    if scoring_draws(summary) > 1:
        _single_draw_cells(row, summary)
    return row


def _attack_columns(summary: RunSummary) -> list[tuple[ColumnKey, AttackRow]]:
    """Each attack of ``summary`` with its column key (the same attack twice in one cascade gets a
    second column: ``repeat`` 2, ...)."""
    seen: dict[ColumnKey, int] = {}
    out = []
    for attack in summary["attacks"]:
        key = ColumnKey.attack(attack)
        seen[key] = seen.get(key, 0) + 1
        out.append((ColumnKey.attack(attack, repeat=seen[key]) if seen[key] > 1 else key, attack))
    return out


def _randomized(rows: Iterable[Row]) -> bool:
    """Whether any of ``rows`` is a randomized run's (its cells are single-draw accuracies)."""
    return any(row.get(DRAWS) for row in rows)


def _single_draw_cells(row: Row, summary: RunSummary) -> None:
    """Replace the clean, attack and robust cells of a randomized run's ``row`` (built from the
    worst-of-R ``accuracy`` keys) with its single-draw values, keeping their intervals under
    INTERVALS and R under DRAWS; WORST_OF_R keeps the worst-of-R robust accuracy."""
    blocks: dict[ColumnKey, SingleDraw | None] = {CLEAN: summary.get("clean_single_draw"),
                                                  ROBUST: summary.get("robust_single_draw")}
    blocks.update((key, attack.get("single_draw")) for key, attack in _attack_columns(summary))
    intervals: dict[ColumnKey, tuple[float, float] | None] = {}
    for key, block in blocks.items():
        row[key] = block["accuracy"] if block else None
        ci = block["interval"] if block else None
        intervals[key] = (ci[0], ci[1]) if ci is not None else None
    row[INTERVALS] = intervals
    row[DRAWS] = scoring_draws(summary)
    if scoring_exact(summary):  # every draw of the space: "all R draws" is not a worst-of-R figure
        row[WORST_OF_R] = None


def single_draw_note(rows: Iterable[Row]) -> str:
    """The board's note on its randomized rows ("" when it has none)."""
    draws = sorted({r[DRAWS] for r in rows if r.get(DRAWS)})
    if not draws:
        return ""
    r_text = "R = " + "/".join(str(d) for d in draws)
    return (f"randomized rows ({r_text} draws per example): Clean, attack and Robust are single-draw accuracies "
            "(the probability that one forward pass is correct, with a 95% Student-t interval over examples "
            f"and draws); {WORST_OF_R.title} counts an example only when every draw is correct (worst of R), "
            "and so do their (BA) columns")


def _details(summary: RunSummary) -> dict[str, Any]:
    """A row's details for the renderers that show them: protocol, examples and a provenance summary."""
    provenance = summary.get("provenance") or {}
    model: dict[str, Any] = dict(summary.get("model") or {})
    git = provenance.get("git") or {}
    return {key: value for key, value in {
        "run": summary["run_id"], "protocol": summary.get("protocol"), "examples": summary["n_examples"],
        "indices": str(provenance.get("indices_hash") or "")[:12] or None, "seed": provenance.get("seed"),
        "bench": provenance.get("bench_version"), "commit": str(git.get("commit") or "")[:12] or None,
        "device": provenance.get("gpu") or provenance.get("device"),
        "checkpoint": str(model.get("checkpoint_sha256") or "")[:16] or None,
        "started": provenance.get("started_at")}.items() if value not in (None, "")}


def _columns(rows: Iterable[Row], imbalanced: bool) -> tuple[Column, ...]:
    """The board's columns; ``rows`` in the order of their summaries (first appearance wins)."""
    attacks = dict.fromkeys(k for row in rows for k in row if k.kind == "attack" and not k.balanced)
    radii = dict.fromkeys(k for row in rows for k in row if k.kind in ("certified", "acr"))

    def with_ba(key: ColumnKey) -> list[Column]:
        """The accuracy column, followed by its balanced-accuracy twin on imbalanced datasets."""
        return [Column(key), Column(key.twin())] if imbalanced else [Column(key)]

    worst = [Column(WORST_OF_R)] if _randomized(rows) else []
    return (Column(DEFENSE), Column(MODEL), *with_ba(CLEAN), *(c for k in attacks for c in with_ba(k)),
            *with_ba(ROBUST), *worst, *(Column(k) for k in radii), Column(N))


UNSOUND_CHECKS = ("lipschitz_audit", "certificate_attack", "certified_vs_empirical")


def _unsound_certificate(summary: RunSummary) -> bool:
    return any(c["triggered"] for c in summary.get("checks", []) if c["name"] in UNSOUND_CHECKS)


def _other_triggered_checks(summary: RunSummary) -> list[str]:
    """The names of the triggered checks that the ‡ mark does not already cover."""
    return [c["name"] for c in summary.get("checks", []) if c["triggered"] and c["name"] not in UNSOUND_CHECKS]


def _randomized_non_adaptive(summary: RunSummary) -> bool:
    """A defense that declared itself randomized, evaluated under a protocol that is not adaptive."""
    randomized = StoredConfig.from_json(summary.get("config")).randomized
    return randomized and not is_adaptive(str(summary.get("protocol", "")).split("@")[0])


def build_board(store: Store, dataset: str, protocol: str | None = None) -> Board:
    """The leaderboard of ``dataset`` under ``protocol`` (default: the protocol with the most
    finished runs there, ties favouring ``pgd@1``). The board's note says which protocol was taken
    and why, and how many runs it left out for each reason (other protocols, other example
    subsets, older runs of the same defense and model); nothing is left out silently."""
    from bench.results.queries import run_summary

    runs = store.list_runs(dataset=dataset, status=RunStatus.FINISHED)
    if not runs:
        raise BenchError(f"no finished runs for dataset '{dataset}' in {store.url}")
    keys = [f"{r.protocol}@{r.protocol_version}" for r in runs]
    defaulted = protocol is None
    if protocol is None:
        protocol = max(sorted(set(keys)), key=lambda k: (keys.count(k), k == "pgd@1"))
    elif "@" not in protocol:
        versions = sorted((k for k in set(keys) if k.split("@")[0] == protocol), key=lambda k: int(k.split("@")[1]))
        protocol = versions[-1] if versions else protocol
    chosen = [r for r, k in zip(runs, keys) if k == protocol]
    if not chosen:
        raise BenchError(f"no finished runs for dataset '{dataset}' under protocol '{protocol}'; "
                         f"protocols present: {', '.join(sorted(set(keys)))}")
    # rows are comparable only on the same examples: keep the evaluation set with the most
    # (defense, model) entries, the larger one on ties
    by_subset: dict[Any, list[Any]] = {}
    for run in chosen:
        by_subset.setdefault((run.indices_hash, run.n_examples), []).append(run)
    (subset_hash, n), members = max(by_subset.items(),
                                    key=lambda kv: (len({(r.defense, r.model_id) for r in kv[1]}), kv[0][1] or 0))
    left_out = len(chosen) - len(members)
    note = (f"{left_out} run(s) on other example subsets left out, ranked on {n} examples "
            f"(indices {str(subset_hash)[:12]})" if left_out else "")
    latest: dict[Any, Any] = {}
    for run in members:  # ordered by id: the latest run of each (defense, model) wins
        latest[(run.defense, run.model_id)] = run
    older = len(members) - len(latest)
    notes = [protocol_note(protocol, keys, defaulted), note,
             f"{older} older run(s) of the same defense and model left out (the latest counts)" if older else ""]
    board = board_from_summaries(dataset, protocol, (run_summary(store, r.id) for r in latest.values()))
    return Board(board.dataset, board.protocol, board.columns, board.rows,
                 "; ".join(filter(None, [*notes, board.note])))


def protocol_note(protocol: str, keys: list[str], defaulted: bool) -> str:
    """Which protocol a board shows and why, and the runs of other protocols it leaves out
    (``keys``: the ``name@version`` of every finished run of the dataset); "" when there are none
    and the protocol was asked for."""
    others = {k: keys.count(k) for k in sorted(set(keys)) if k != protocol}
    why = f"protocol {protocol}: the one with the most finished runs ({keys.count(protocol)})" if defaulted else ""
    left = (f"{sum(others.values())} run(s) of other protocols left out ("
            + ", ".join(f"{k}: {n}" for k, n in others.items()) + "), choose one with --protocol") if others else ""
    return ", ".join(filter(None, [why, left])) if others else ""


# -- renderers (pure) --------------------------------------------------------------------
def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _cell(column: Column, value: Any) -> str:
    if column.kind == "accuracy":
        return _percent(value)
    if column.kind == "radius":
        return "-" if value is None else f"{value:.3f}"
    return "-" if value is None else str(value)


def cell_text(column: Column, value: Any) -> str:
    """A value as the text formats show it (percent with two decimals, radius with three, "-")."""
    return _cell(column, value)


INTERVAL_NOTE = "±: 95% Clopper-Pearson interval (its larger side)"


def interval_note(board: Board) -> str:
    """:data:`INTERVAL_NOTE`, naming the Student-t intervals too when a row is randomized."""
    if _randomized(board.rows):
        return "±: 95% interval, its larger side (Clopper-Pearson; Student-t for single-draw cells)"
    return INTERVAL_NOTE


def has_interval(column: Column) -> bool:
    """Whether ``column`` holds accuracies with a confidence interval: every accuracy column but
    the balanced-accuracy twins (a mean of per-class recalls is no binomial proportion)."""
    return column.kind == "accuracy" and not column.key.balanced


def interval(column: Column, row: Row) -> tuple[float, float] | None:
    """The 95% interval of ``row``'s accuracy under ``column``: a randomized row's single-draw cell
    has the one its summary computed (Student-t over examples and draws); any other accuracy the
    Clopper-Pearson interval over the row's N examples. None where there is no count behind the
    value (no N, as on published rows; a balanced accuracy)."""
    from bench.results.intervals import accuracy_interval

    if not has_interval(column):
        return None
    single = row.get(INTERVALS) or {}
    if column.key in single:
        return cast("tuple[float, float] | None", single[column.key])
    return accuracy_interval(row.get(column.key), row.get(N))


def cell_with_interval(column: Column, row: Row) -> str:
    """:func:`cell_text` followed, where there is an interval, by `` ±h``: ``h`` the interval's
    larger side in percentage points (one decimal), so ``value ± h`` contains the exact interval."""
    value = row.get(column.key)
    text, ci = _cell(column, value), interval(column, row)
    if ci is None or value is None:
        return text
    return f"{text} ±{100 * max(value - ci[0], ci[1] - value):.1f}"


ROW_MARKS = ("†", "‡", "§")  # after the defense name: see board_from_summaries


def strip_marks(defense: str) -> str:
    """A row's defense label without its marks."""
    return " ".join(part for part in defense.split(" ") if part not in ROW_MARKS)


def row_kind(row: Row) -> str:
    """``measured`` (a stored run's row), ``published`` (the authors' numbers) or ``difference``
    (measured - published), by how :mod:`bench.results.references` labels its rows."""
    if row.get(RUN_ID) is not None:
        return "measured"
    return "difference" if "Δ" in str(row.get(DEFENSE, "")) else "published"


def render_markdown(board: Board) -> str:
    header = [c.title for c in board.columns]
    align = ["---" if c.kind == "text" else "---:" for c in board.columns]
    lines = [f"Leaderboard: {board.dataset}, protocol {board.protocol} (accuracy in %; {interval_note(board)})", "",
             *([f"Note: {board.note}", ""] if board.note else []),
             "| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for row in board.rows:
        cells = [cell_with_interval(c, row).replace("|", "\\|") for c in board.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "†": r"\textdagger{}", "‡": r"\textdaggerdbl{}", "·": r"\textperiodcentered{}", "§": r"\S{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


LATEX_LAYOUTS = ("auto", "wide", "narrow", "transposed")
_NARROW_MAX_COLUMNS = 6  # a one-column `table` of a two-column paper holds about this many
_WIDE_MAX_COLUMNS = 13  # a `table*` across both columns holds about this many
_TRANSPOSED_MAX_ROWS = 8  # transposed, each row becomes a column: only for a few rows
_NORM_MATH = {"Linf": r"\ell_\infty", "L2": r"\ell_2", "L1": r"\ell_1", "L0": r"\ell_0"}


@dataclass(frozen=True)
class LatexOptions:
    """How :func:`render_latex` lays a board out: ``layout`` is one of :data:`LATEX_LAYOUTS`;
    ``caption`` and ``label`` default to the board's description and ``tab:leaderboard-DATASET``."""

    layout: str = "auto"
    caption: str | None = None
    label: str | None = None


def latex_layout(board: Board) -> str:
    """The layout ``auto`` chooses, by column count: ``narrow`` (a one-column ``table``) up to
    6 columns, ``wide`` (a ``table*`` across both columns) up to 13, beyond that ``transposed``
    (defenses as columns) when the board has at most 8 rows, else ``wide``. Every layout is
    shrunk to the line width when it would not fit (never enlarged), so none overflows."""
    if len(board.columns) <= _NARROW_MAX_COLUMNS:
        return "narrow"
    if len(board.columns) <= _WIDE_MAX_COLUMNS or len(board.rows) > _TRANSPOSED_MAX_ROWS:
        return "wide"
    return "transposed"


def latex_title_lines(key: ColumnKey) -> list[str]:
    """A column's LaTeX header, one entry per stacked line, with math-mode norms, eps and radii."""
    if key.kind == "attack":
        assert key.eps is not None
        norm = f"${_NORM_MATH[key.norm]}$" if key.norm in _NORM_MATH else latex_escape(str(key.norm))
        lines = [latex_escape(key.method) + (rf" \#{key.repeat}" if key.repeat > 1 else ""), norm,
                 f"$\\epsilon = {format_eps(key.eps)}$"]
    elif key.kind == "certified":
        lines = [latex_escape(key.method), f"certified at $r = {key.radius:g}$"]
    elif key.kind == "acr":
        lines = [latex_escape(key.method), "ACR"]
    elif key.kind == "robust":
        lines = ["Robust", "(worst case)"]
    elif key.kind == "worst_of_r":
        lines = ["Robust", "(all $R$ draws)"]
    else:
        lines = [latex_escape(_FIXED_TITLES[key.kind])]
    return lines + (["(BA)"] if key.balanced else [])


def _stacked(lines: list[str], align: str) -> str:
    """Lines stacked in one cell (a nested tabular: needs no package beyond booktabs)."""
    if len(lines) == 1:
        return lines[0]
    return rf"\begin{{tabular}}[b]{{@{{}}{align}@{{}}}}" + r" \\ ".join(lines) + r"\end{tabular}"


def _latex_best(board: Board) -> dict[ColumnKey, Any]:
    """The best (largest) value of each accuracy column that has at least two values to compare."""
    best = {}
    for c in board.columns:
        values = [r[c.key] for r in board.rows if r.get(c.key) is not None]
        if c.kind == "accuracy" and len(values) > 1:
            best[c.key] = max(values)
    return best


def _latex_value(board_best: dict[ColumnKey, Any], column: Column, row: Row) -> str:
    """The cell, bold when best, followed by its interval's half-width (`` ±h`` of :func:`cell_with_interval`)."""
    text = latex_escape(_cell(column, row.get(column.key)))
    value = row.get(column.key)
    if value is not None and value == board_best.get(column.key):
        text = rf"\textbf{{{text}}}"
    ci = interval(column, row)
    if ci is None or value is None:
        return text
    return rf"{text}\,{{\scriptsize$\pm${100 * max(value - ci[0], ci[1] - value):.1f}}}"


def board_caption(board: Board) -> str:
    """The board's one-paragraph description (protocol, what was left out, marks), plain text."""
    head = f"{board.dataset}: accuracy (%) under protocol {board.protocol}."
    return " ".join(filter(None, [head, board.note + ("." if board.note and not board.note.endswith(".") else "")]))


def _latex_label(board: Board) -> str:
    return "tab:leaderboard-" + "".join(ch if ch.isalnum() or ch in "-:" else "-" for ch in board.dataset)


def render_latex(board: Board, options: LatexOptions | None = None) -> str:
    """A ``table`` (or ``table*``) float with booktabs rules, math-mode headers, caption and label.

    Needs ``\\usepackage{booktabs,graphicx}``. The best value of an accuracy column is bold only
    where the column has at least two values. See :func:`latex_layout` for the layouts."""
    options = options or LatexOptions()
    if options.layout not in LATEX_LAYOUTS:
        raise BenchError(f"unknown LaTeX layout '{options.layout}'; use one of: {', '.join(LATEX_LAYOUTS)}")
    layout = latex_layout(board) if options.layout == "auto" else options.layout
    head, body = (_latex_transposed if layout == "transposed" else _latex_table)(board)
    spanning = layout == "wide" or (layout == "transposed" and len(board.rows) + 1 > _NARROW_MAX_COLUMNS)
    env = "table*" if spanning else "table"
    caption = latex_escape(options.caption if options.caption is not None else board_caption(board))
    lines = [r"% requires \usepackage{booktabs,graphicx}",
             f"% {latex_escape(board.dataset)}, protocol {latex_escape(board.protocol)}; accuracy in \\%",
             *([f"% {latex_escape(board.note)}"] if board.note else []),
             rf"\begin{{{env}}}[t]", r"\centering", r"\small",
             rf"\caption{{{caption}}}", rf"\label{{{options.label or _latex_label(board)}}}",
             r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
             *head, *body, r"\bottomrule", r"\end{tabular}}", rf"\end{{{env}}}"]
    return "\n".join(lines) + "\n"


def _latex_table(board: Board) -> tuple[list[str], list[str]]:
    """One row per board row: the header lines (up to the midrule) and the body lines."""
    spec = "".join("l" if c.kind == "text" else "r" for c in board.columns)
    header = " & ".join(_stacked(latex_title_lines(c.key), "l" if c.kind == "text" else "r") for c in board.columns)
    best = _latex_best(board)
    body = [" & ".join(_latex_value(best, c, row) for c in board.columns) + r" \\" for row in board.rows]
    return [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", header + r" \\", r"\midrule"], body


def _latex_transposed(board: Board) -> tuple[list[str], list[str]]:
    """Defenses as columns (headed by defense and model), one row per numeric board column."""
    values = [c for c in board.columns if c.key not in (DEFENSE, MODEL)]
    header = " & ".join(["", *(_stacked([latex_escape(str(r.get(DEFENSE, ""))), latex_escape(str(r.get(MODEL, "")))],
                                        "r") for r in board.rows)])
    best = _latex_best(board)
    body = [" & ".join([" ".join(latex_title_lines(c.key)), *(_latex_value(best, c, r) for r in board.rows)]) + r" \\"
            for c in values]
    spec = "l" + "r" * len(board.rows)
    return [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", header + r" \\", r"\midrule"], body


def render_csv(board: Board) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([title for c in board.columns
                     for title in ([c.title, f"{c.title}_lo", f"{c.title}_hi"] if has_interval(c) else [c.title])])
    for row in board.rows:
        cells: list[Any] = []
        for c in board.columns:
            cells.append("" if row.get(c.key) is None else repr(row[c.key]) if isinstance(row.get(c.key), float)
                         else row[c.key])
            if has_interval(c):
                ci = interval(c, row)
                cells += ["", ""] if ci is None else [repr(ci[0]), repr(ci[1])]
        writer.writerow(cells)
    return out.getvalue()


_JSON_INTERVAL = "95% Clopper-Pearson: KEY_lo and KEY_hi beside each accuracy with a count behind it"
_JSON_INTERVAL_RANDOMIZED = (_JSON_INTERVAL + "; Student-t over examples and draws beside each single-draw accuracy "
                             "of a randomized row")


def render_json(board: Board) -> str:
    payload = {
        "dataset": board.dataset,
        "protocol": board.protocol,
        **({"note": board.note} if board.note else {}),
        "columns": [{"key": c.key.id, "title": c.title, "kind": c.kind} for c in board.columns],
        "interval": _JSON_INTERVAL_RANDOMIZED if _randomized(board.rows) else _JSON_INTERVAL,
        "rows": [{c.key.id: row.get(c.key) for c in board.columns} | {RUN_ID.id: row.get(RUN_ID)}
                 | _json_intervals(board, row) for row in board.rows],
    }
    return json.dumps(payload, indent=2) + "\n"


def _json_intervals(board: Board, row: Row) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for c in board.columns:
        if has_interval(c):
            ci = interval(c, row)
            out[f"{c.key.id}_lo"], out[f"{c.key.id}_hi"] = ci if ci is not None else (None, None)
    return out


def _longest_word(text: str) -> int:
    return max((len(word) for word in text.split()), default=0)


def render_rich(board: Board, width: int | None = None) -> Any:
    """The terminal table. No header word is cut: a column is at least as wide as the longest word
    of its title (rich wraps titles at spaces); when those widths do not fit ``width`` (the
    console's), the table is transposed (defenses as columns, one line per column of the board)."""
    from rich.table import Table

    mins = [max(_longest_word(c.title), *(len(cell_with_interval(c, r)) for r in board.rows)) if c.kind != "text"
            else max(_longest_word(c.title), *(_longest_word(str(r.get(c.key, ""))) for r in board.rows))
            for c in board.columns]
    title = f"{board.dataset} · protocol {board.protocol} · accuracy % · {interval_note(board)}"
    if width is not None and sum(mins) + 3 * len(mins) + 1 > width:
        return _rich_transposed(board, title)
    table = Table(title=title, caption=board.note or None)
    for c, least in zip(board.columns, mins):
        table.add_column(c.title, justify="left" if c.kind == "text" else "right", min_width=least)
    for row in board.rows:
        table.add_row(*[cell_with_interval(c, row) for c in board.columns])
    return table


def _rich_transposed(board: Board, title: str) -> Any:
    """The terminal table with defenses as columns (headed by defense and model)."""
    from rich.table import Table

    table = Table(title=title + " · transposed", caption=board.note or None)
    table.add_column("", justify="left", no_wrap=True)
    for row in board.rows:
        head = f"{row.get(DEFENSE, '')}\n{row.get(MODEL, '')}"
        table.add_column(head, justify="right", min_width=_longest_word(head))
    for c in board.columns:
        if c.key not in (DEFENSE, MODEL):
            table.add_row(c.title, *[cell_with_interval(c, row) for row in board.rows])
    return table

"""Leaderboards: one row per (defense, model) for a dataset and protocol, and pure renderers.

On datasets flagged ``imbalanced`` (HAM10000, NIH, MedMNIST) every accuracy column is followed
by its balanced-accuracy twin "(BA)": the mean per-class recall, which a model that always
predicts the majority class cannot inflate.

:func:`build_board` queries the store; :func:`board_from_summaries` is the pure part that
turns run summaries into a :class:`Board`. The renderers (Markdown, LaTeX, CSV, JSON) are pure
functions of a board and render the same rows; accuracies are shown in percent with two
decimals in Markdown/LaTeX/terminal, and as full-precision fractions in CSV/JSON.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

from bench.config import format_eps, is_adaptive
from bench.errors import BenchError
from bench.results.schema import RunStatus
from bench.results.store import Store
from bench.results.stored import StoredConfig
from bench.results.types import AttackRow, RunSummary

__all__ = ["CLEAN", "DEFENSE", "FORMATS", "MODEL", "N", "ROBUST", "RUN_ID", "Board", "Column", "ColumnKey", "Row",
           "board_from_summaries", "build_board", "render"]

FORMATS = ("table", "md", "latex", "csv", "json")

ColumnKind = Literal["defense", "model", "run_id", "clean", "attack", "robust", "certified", "acr", "n"]
_FIXED_TITLES = {"defense": "Defense", "model": "Model", "run_id": "Run", "clean": "Clean",
                 "robust": "Robust (worst case)", "n": "N"}


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

Row = dict[ColumnKey, Any]  # a board row: column key -> value (plus RUN_ID, which is not a column)


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
    rows: list[Row] = []
    imbalanced = False
    non_adaptive = unsound = 0
    for summary in summaries:
        imbalanced |= bool(summary.get("imbalanced"))
        mark = ""
        if _randomized_non_adaptive(summary):
            mark, non_adaptive = " †", non_adaptive + 1
        if _unsound_certificate(summary):
            mark, unsound = mark + " ‡", unsound + 1
        rows.append(_row(summary, mark))
    columns = _columns(rows, imbalanced)
    rows.sort(key=lambda r: (r.get(ROBUST) is None, -(r.get(ROBUST) or 0.0), -(r.get(CLEAN) or 0.0),
                             r[DEFENSE], r[RUN_ID]))
    notes = [("† randomized defense evaluated with a non-adaptive protocol: its robust accuracy is likely "
              "overestimated") if non_adaptive else "",
             "‡ certificate audit failed (bench audit): its certified accuracy is not trustworthy" if unsound else ""]
    return Board(dataset, protocol, columns, tuple(rows), "; ".join(filter(None, notes)))


def _row(summary: RunSummary, mark: str) -> Row:
    """One summary's row; the "(BA)" values only when its dataset is imbalanced."""
    balanced = bool(summary.get("imbalanced"))
    row: Row = {DEFENSE: summary["defense"] + mark, MODEL: _model_label(summary), RUN_ID: summary["run_id"],
                CLEAN: summary["clean_accuracy"]}
    if balanced:
        row[CLEAN.twin()] = summary.get("balanced_accuracy")
    seen: dict[ColumnKey, int] = {}
    for attack in summary["attacks"]:
        key = ColumnKey.attack(attack)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:  # the same attack twice in one cascade: keep both columns
            key = ColumnKey.attack(attack, repeat=seen[key])
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
    return row


def _columns(rows: Iterable[Row], imbalanced: bool) -> tuple[Column, ...]:
    """The board's columns; ``rows`` in the order of their summaries (first appearance wins)."""
    attacks = dict.fromkeys(k for row in rows for k in row if k.kind == "attack" and not k.balanced)
    radii = dict.fromkeys(k for row in rows for k in row if k.kind in ("certified", "acr"))

    def with_ba(key: ColumnKey) -> list[Column]:
        """The accuracy column, followed by its balanced-accuracy twin on imbalanced datasets."""
        return [Column(key), Column(key.twin())] if imbalanced else [Column(key)]

    return (Column(DEFENSE), Column(MODEL), *with_ba(CLEAN), *(c for k in attacks for c in with_ba(k)),
            *with_ba(ROBUST), *(Column(k) for k in radii), Column(N))


UNSOUND_CHECKS = ("lipschitz_audit", "certificate_attack", "certified_vs_empirical")


def _unsound_certificate(summary: RunSummary) -> bool:
    return any(c["triggered"] for c in summary.get("checks", []) if c["name"] in UNSOUND_CHECKS)


def _randomized_non_adaptive(summary: RunSummary) -> bool:
    """A defense that declared itself randomized, evaluated under a protocol that is not adaptive."""
    randomized = StoredConfig.from_json(summary.get("config")).randomized
    return randomized and not is_adaptive(str(summary.get("protocol", "")).split("@")[0])


def build_board(store: Store, dataset: str, protocol: str | None = None) -> Board:
    """The leaderboard of ``dataset`` under ``protocol`` (default: the most used protocol there)."""
    from bench.results.queries import run_summary

    runs = store.list_runs(dataset=dataset, status=RunStatus.FINISHED)
    if not runs:
        raise BenchError(f"no finished runs for dataset '{dataset}' in {store.url}")
    keys = [f"{r.protocol}@{r.protocol_version}" for r in runs]
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
    note = (f"{left_out} run(s) on other example subsets left out; ranked on {n} examples "
            f"(indices {str(subset_hash)[:12]})" if left_out else "")
    latest: dict[Any, Any] = {}
    for run in members:  # ordered by id: the latest run of each (defense, model) wins
        latest[(run.defense, run.model_id)] = run
    board = board_from_summaries(dataset, protocol, (run_summary(store, r.id) for r in latest.values()))
    return Board(board.dataset, board.protocol, board.columns, board.rows, "; ".join(filter(None, [note, board.note])))


# -- renderers (pure) --------------------------------------------------------------------
def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _cell(column: Column, value: Any) -> str:
    if column.kind == "accuracy":
        return _percent(value)
    if column.kind == "radius":
        return "-" if value is None else f"{value:.3f}"
    return "-" if value is None else str(value)


def render_markdown(board: Board) -> str:
    header = [c.title for c in board.columns]
    align = ["---" if c.kind == "text" else "---:" for c in board.columns]
    lines = [f"Leaderboard: {board.dataset}, protocol {board.protocol} (accuracy in %)", "",
             *([f"Note: {board.note}", ""] if board.note else []),
             "| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for row in board.rows:
        cells = [_cell(c, row.get(c.key)).replace("|", "\\|") for c in board.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def render_latex(board: Board) -> str:
    best = {c.key: max((r[c.key] for r in board.rows if r.get(c.key) is not None), default=None)
            for c in board.columns if c.kind == "accuracy"}
    spec = "".join("l" if c.kind == "text" else "r" for c in board.columns)
    lines = [r"% requires \usepackage{booktabs}",
             f"% {latex_escape(board.dataset)}, protocol {latex_escape(board.protocol)}; accuracy in \\%",
             *([f"% {latex_escape(board.note)}"] if board.note else []),
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(c.title) for c in board.columns) + r" \\", r"\midrule"]
    for row in board.rows:
        cells = []
        for c in board.columns:
            text = latex_escape(_cell(c, row.get(c.key)))
            if c.kind == "accuracy" and row.get(c.key) is not None and row.get(c.key) == best.get(c.key):
                text = rf"\textbf{{{text}}}"
            cells.append(text)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def render_csv(board: Board) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([c.title for c in board.columns])
    for row in board.rows:
        writer.writerow(["" if row.get(c.key) is None else repr(row[c.key]) if isinstance(row.get(c.key), float)
                         else row[c.key] for c in board.columns])
    return out.getvalue()


def render_json(board: Board) -> str:
    payload = {
        "dataset": board.dataset,
        "protocol": board.protocol,
        **({"note": board.note} if board.note else {}),
        "columns": [{"key": c.key.id, "title": c.title, "kind": c.kind} for c in board.columns],
        "rows": [{c.key.id: row.get(c.key) for c in board.columns} | {RUN_ID.id: row.get(RUN_ID)}
                 for row in board.rows],
    }
    return json.dumps(payload, indent=2) + "\n"


def render_rich(board: Board) -> Any:
    from rich.table import Table

    table = Table(title=f"{board.dataset} · protocol {board.protocol} · accuracy %",
                  caption=board.note or None)
    for c in board.columns:
        table.add_column(c.title, justify="left" if c.kind == "text" else "right")
    for row in board.rows:
        table.add_row(*[_cell(c, row.get(c.key)) for c in board.columns])
    return table


RENDERERS = {"md": render_markdown, "latex": render_latex, "csv": render_csv, "json": render_json}


def render(board: Board, fmt: str) -> str:
    if fmt not in RENDERERS:
        raise BenchError(f"unknown format '{fmt}'; use one of: {', '.join(FORMATS)}")
    return RENDERERS[fmt](board)

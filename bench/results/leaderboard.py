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
from dataclasses import dataclass
from typing import Any

from bench.config import format_eps
from bench.errors import BenchError
from bench.results.schema import RunStatus
from bench.results.store import Store

__all__ = ["Board", "Column", "board_from_summaries", "build_board", "render", "FORMATS"]

FORMATS = ("table", "md", "latex", "csv", "json")


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    kind: str  # text | accuracy | int | radius


@dataclass(frozen=True)
class Board:
    dataset: str
    protocol: str
    columns: tuple[Column, ...]
    rows: tuple[dict[str, Any], ...]
    note: str = ""  # e.g. which evaluation subset was chosen and what was left out


def _attack_key(attack: dict[str, Any]) -> tuple[str, str]:
    label = f"{attack['name']} {attack['norm']} {format_eps(attack['eps'])}"
    return f"attack:{label}", label


def _model_label(summary: dict[str, Any]) -> str:
    model = summary.get("model") or {}
    arch = (model.get("hparams") or {}).get("arch") or "model"
    sha = model.get("checkpoint_sha256") or ""
    return f"{arch} {sha[:8]}".strip()


def board_from_summaries(dataset: str, protocol: str, summaries: Iterable[dict[str, Any]]) -> Board:
    """Build a board from run summaries (one per model; the caller picks which run)."""
    rows: list[dict[str, Any]] = []
    attack_cols: dict[str, str] = {}
    radius_cols: dict[str, str] = {}
    imbalanced = False
    non_adaptive = unsound = 0
    for summary in summaries:
        balanced = bool(summary.get("imbalanced"))
        imbalanced |= balanced
        mark = ""
        if _randomized_non_adaptive(summary):
            mark, non_adaptive = " †", non_adaptive + 1
        if _unsound_certificate(summary):
            mark, unsound = mark + " ‡", unsound + 1
        row: dict[str, Any] = {
            "defense": summary["defense"] + mark,
            "model": _model_label(summary),
            "run_id": summary["run_id"],
            "clean": summary["clean_accuracy"],
        }
        if balanced:
            row["clean_ba"] = summary.get("balanced_accuracy")
        seen: dict[str, int] = {}
        for attack in summary["attacks"]:
            key, label = _attack_key(attack)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 1:  # the same attack twice in one cascade: keep both columns
                key, label = f"{key}#{seen[key]}", f"{label} #{seen[key]}"
            attack_cols.setdefault(key, label)
            row[key] = attack["accuracy"]
            if balanced:
                row[key + ":ba"] = attack.get("balanced_accuracy")
        row["robust"] = summary["robust_accuracy"]
        if balanced:
            row["robust_ba"] = summary.get("robust_balanced_accuracy")
        for cert in summary.get("certified", []):
            key = f"certified:{cert['certifier']}@{cert['radius']:g}"
            radius_cols.setdefault(key, f"{cert['certifier']} r={cert['radius']:g}")
            row[key] = cert["accuracy"]
        for block in summary.get("certificate", []):
            key = f"acr:{block['certifier']}"
            radius_cols.setdefault(key, f"{block['certifier']} ACR")
            row[key] = block.get("average_radius")
        row["n"] = summary["n_examples"]
        rows.append(row)
    rows.sort(key=lambda r: (r.get("robust") is None, -(r.get("robust") or 0.0), -(r.get("clean") or 0.0),
                             r["defense"], r["run_id"]))
    def with_ba(key: str, title: str) -> list[Column]:
        """The accuracy column, followed by its balanced-accuracy twin on imbalanced datasets."""
        cols = [Column(key, title, "accuracy")]
        if imbalanced:
            ba_key = {"clean": "clean_ba", "robust": "robust_ba"}.get(key, key + ":ba")
            cols.append(Column(ba_key, f"{title} (BA)", "accuracy"))
        return cols

    columns = (Column("defense", "Defense", "text"), Column("model", "Model", "text"),
               *with_ba("clean", "Clean"),
               *(c for k, t in attack_cols.items() for c in with_ba(k, t)),
               *with_ba("robust", "Robust (worst case)"),
               *(Column(k, t, "radius" if k.startswith("acr:") else "accuracy") for k, t in radius_cols.items()),
               Column("n", "N", "int"))
    notes = [("† randomized defense evaluated with a non-adaptive protocol: its robust accuracy is likely "
              "overestimated") if non_adaptive else "",
             "‡ certificate audit failed (bench audit): its certified accuracy is not trustworthy" if unsound else ""]
    return Board(dataset, protocol, columns, tuple(rows), "; ".join(filter(None, notes)))


UNSOUND_CHECKS = ("lipschitz_audit", "certificate_attack", "certified_vs_empirical")


def _unsound_certificate(summary: dict[str, Any]) -> bool:
    return any(c["triggered"] for c in summary.get("checks", []) if c["name"] in UNSOUND_CHECKS)


def _randomized_non_adaptive(summary: dict[str, Any]) -> bool:
    from bench.config import is_adaptive

    info = (summary.get("config") or {}).get("defense_info") or {}
    return bool(info.get("randomized")) and not is_adaptive(str(summary.get("protocol", "")).split("@")[0])


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
        "columns": [{"key": c.key, "title": c.title, "kind": c.kind} for c in board.columns],
        "rows": [{c.key: row.get(c.key) for c in board.columns} | {"run_id": row.get("run_id")} for row in board.rows],
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

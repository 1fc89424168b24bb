"""Everything the CLI prints: one place for Rich rendering and JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.config import format_eps
from bench.results.summary import scoring_draws, scoring_exact
from bench.results.types import Auroc, RunSummary, SingleDraw

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    """One line on stderr (no markup interpretation of user text)."""
    print(f"error: {message}", file=sys.stderr)


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/yellow] {message}", markup=True, highlight=False)


def print_json(obj: Any) -> None:
    """Print ``obj`` as valid JSON: a non-finite number (only a store written before bench refused
    them can hold one) prints as null, other non-JSON values as their ``str``."""
    from bench.results.jsonvalues import null_non_finite

    sys.stdout.write(json.dumps(null_non_finite(obj)[0], indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _single(block: SingleDraw | None) -> str:
    """A single-draw accuracy with its 95% interval, e.g. ``87.3% [82.1, 91.9]``."""
    if not block or block["accuracy"] is None:
        return "-"
    ci = block["interval"]
    text = f"{100 * block['accuracy']:.1f}%"
    return text if ci is None else f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def summary_table(summary: RunSummary) -> Table:
    """The run table. A deterministic run shows accuracy; a randomized run (R > 1 draws) shows the
    single-draw accuracy with its 95% interval, then the worst-of-R ("all R draws") and
    majority-of-R columns, except for a run scored with every draw of the model's draw space
    (``--exact-draws``), whose single-draw figure the header says is exact."""
    title = (f"run {summary['run_id']} · {summary['defense']} on {summary['dataset']} · protocol "
             f"{summary['protocol']} · n={summary['n_examples']}")
    balanced = bool(summary.get("imbalanced")) and summary.get("task") != "multilabel"
    multilabel = summary.get("task") == "multilabel"
    r = scoring_draws(summary)
    exact = scoring_exact(summary)
    randomized, beside = r > 1, r > 1 and not exact
    table = Table(title=title, caption=_scoring_caption(r, exact) if randomized else None)
    table.add_column("Evaluation")
    table.add_column("Threat model")
    if not randomized:
        table.add_column("Accuracy", justify="right")
    else:
        table.add_column("Accuracy (single draw, 95% CI)" if beside else f"single-draw (exact over {r} draws)",
                         justify="right")
    if beside:
        table.add_column(f"all {r} draws", justify="right")
        table.add_column(f"majority of {r}", justify="right")
    if balanced:
        table.add_column("Balanced acc.", justify="right")
    if multilabel:
        table.add_column("Macro AUROC", justify="right")

    def headline(accuracy: float | None, single: SingleDraw | None, majority: float | None) -> list[str]:
        if not randomized:
            return [_pct(accuracy)]
        return [_single(single), _pct(accuracy), _pct(majority)] if beside else [_single(single)]

    def extra(balanced_accuracy: float | None, auroc: Auroc | None) -> list[str]:
        cells = [_pct(balanced_accuracy)] if balanced else []
        if multilabel:
            cells.append(_pct(auroc.get("macro") if auroc else None))
        return cells

    clean_draws = summary.get("clean_draws")
    table.add_row("clean", "-", *headline(summary["clean_accuracy"], summary.get("clean_single_draw"),
                                          clean_draws["majority"] if clean_draws else None),
                  *extra(summary.get("balanced_accuracy"), summary.get("auroc")))
    for attack in summary["attacks"]:
        table.add_row(attack["name"], f"{attack['norm']} eps={format_eps(attack['eps'])}",
                      *headline(attack["accuracy"], attack.get("single_draw"), attack.get("cumulative_majority")),
                      *extra(attack.get("balanced_accuracy"), attack.get("auroc")))
    if summary["robust_accuracy"] is not None:
        cells = [_pct(summary.get("robust_balanced_accuracy"))] if balanced else []
        cells += ["-"] if multilabel else []
        robust = headline(summary["robust_accuracy"], summary.get("robust_single_draw"), summary.get("robust_majority"))
        table.add_row("[bold]robust (worst case)[/bold]", "all of the above",
                      f"[bold]{robust[0]}[/bold]", *robust[1:], *cells)
    for cert in summary.get("certified", []):
        done = cert.get("certified_examples")
        partial = f" (partial: {done} of {summary['n_examples']} certified)" \
            if done is not None and summary.get("n_examples") and done < summary["n_examples"] else ""
        table.add_row(f"certified ({cert['certifier']})", f"radius {cert['radius']:g}{partial}", _pct(cert["accuracy"]),
                      *(["-"] * (2 * int(beside) + int(balanced) + int(multilabel))))
    return table


def _scoring_caption(r: int, exact: bool) -> str:
    """What the columns of a randomized run's table mean."""
    single = ("single draw: the probability that one forward pass is correct (mean over examples of the "
              "fraction of correct draws; cumulative over each cascade), 95% interval over examples and draws")
    if exact:
        return single + f"; exact over the {r} draws of the model's randomness (no draw noise)"
    return (single + f"; all {r} draws: correct on every draw (worst of R); majority of {r}: the majority vote "
            "is correct")


LOG_WIDTH = 120  # columns of the run table when stdout is not a terminal (a log file): wide enough not to wrap


def print_summary(summary: RunSummary, *, stored: bool = False) -> None:
    if not stdout.is_terminal:  # Rich assumes 80 columns for a file or a pipe
        stdout.width = max(stdout.width, LOG_WIDTH)
    stdout.print(summary_table(summary))
    triggered = [c for c in summary["checks"] if c["triggered"]]
    for check in triggered:
        stdout.print(f"[yellow]check {check['name']}:[/yellow] {check['detail']}", markup=True)
    for block in summary.get("certificate", []):
        used = ", ".join(f"{k}={block[k]:g}" if isinstance(block[k], float) else f"{k}={block[k]}"
                         for k in ("sigma", "L", "n0", "n", "alpha", "sequential") if block.get(k) is not None)
        acr = block.get("average_radius")
        abstain = block.get("abstention_rate")
        stdout.print(f"certificate {block['certifier']} ({used}): average certified radius "
                     f"{'-' if acr is None else f'{acr:.3f}'}, abstained {_pct(abstain)}, "
                     f"{block.get('mean_samples') or 0:,.0f} samples per example")
    escalation = summary.get("escalation")
    if escalation:
        checks = ", ".join(dict.fromkeys(s["check"] for s in escalation["stages"]))
        stdout.print(f"escalation ({checks}): robust accuracy {_pct(escalation['robust_accuracy_before'])} with the "
                     f"protocol's attacks, {_pct(escalation['robust_accuracy_after'])} with the remedies")
    status = summary.get("status")
    note = "stored result, returned without recomputing" if stored else f"status {status}"
    if status != "finished":
        note = f"status {status}" + (f" ({summary['error']})" if summary.get("error") else "") + \
            "; re-run its command to resume"
    stdout.print(f"run {summary['run_id']}: {note}; wall time {summary['wall_time_s']:.1f} s. "
                 f"`bench show {summary['run_id']}` for details.")

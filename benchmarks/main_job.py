#!/usr/bin/env python3
"""Time the README's main job, and its re-run, in one run on this machine.

    python benchmarks/main_job.py            # measure, print a report, update docs/performance.md
    python benchmarks/main_job.py --no-write # measure and print only

The main job is ``bench run --defense pgd-at --dataset digits``, run as a subprocess in a fresh
temporary directory with a fresh, empty ``BENCH_HOME`` (so the model is trained from scratch)
and the default SQLite store ``sqlite:///bench.db`` inside that directory. The identical
command is then run again: it must return the stored result.

Targets: main job < 120 s; re-run < 5 % of the main job. Exit status 1 if a target fails (or a
command fails), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

MAIN_JOB = ["run", "--defense", "pgd-at", "--dataset", "digits"]
MAIN_JOB_TEXT = "bench " + " ".join(MAIN_JOB)
TARGET_MAIN_S = 120.0
TARGET_RATIO = 0.05
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOC, stage_seconds, write_section  # noqa: E402

SECTION = "## Main job"


def bench_command() -> list[str]:
    """The ``bench`` console script next to this interpreter, else the CLI through this interpreter.

    (``python -m bench.cli`` does not work: ``bench.cli`` has no ``__main__`` module.)
    """
    folder = Path(sys.executable).parent
    for name in ("bench", "bench.exe"):
        exe = folder / name
        if exe.is_file() and os.access(exe, os.X_OK):
            return [str(exe)]
    return [sys.executable, "-c", "from bench.cli import main; main()"]


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Wall time, CPU time (user + sys) and result of running ``cmd``."""
    cpu0, start = children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, children_cpu_s() - cpu0, proc


def fail(message: str, proc: subprocess.CompletedProcess[str] | None = None) -> None:
    print(f"main_job: {message}", file=sys.stderr)
    if proc is not None:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
    sys.exit(1)


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def measure() -> dict[str, object]:
    bench = bench_command()
    with tempfile.TemporaryDirectory(prefix="bench-main-job-") as tmp:
        work = Path(tmp)
        home = work / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("BENCH_DB", "BENCH_DATA")}
        env["BENCH_HOME"] = str(home)  # empty: the model is trained from scratch
        load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

        main_s, main_cpu_s, proc = timed(bench + MAIN_JOB, work, env)
        if proc.returncode != 0:
            fail(f"`{MAIN_JOB_TEXT}` exited with status {proc.returncode}", proc)
        if "training" not in proc.stderr:
            fail("the main job did not train a model (is BENCH_HOME really empty?)", proc)

        rerun_s, _, again = timed(bench + MAIN_JOB, work, env)
        if again.returncode != 0:
            fail(f"the re-run of `{MAIN_JOB_TEXT}` exited with status {again.returncode}", again)
        if "stored result" not in again.stdout:
            fail("the re-run did not return the stored result", again)
        load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

        show = subprocess.run(bench + ["show", "1", "--json"], cwd=work, env=env, capture_output=True, text=True)
        summary = json.loads(show.stdout) if show.returncode == 0 else {}

    table = "\n".join(line for line in proc.stdout.splitlines() if line.strip())
    model = summary.get("model") or {}
    prov = summary.get("provenance") or {}
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "bench": package_version("bench"),
        "device": prov.get("device"),
        "torch_threads": prov.get("torch_threads"),
        "load_before": load_before,
        "load_after": load_after,
        "main_s": main_s,
        "main_cpu_s": main_cpu_s,
        "rerun_s": rerun_s,
        "ratio": rerun_s / main_s,
        "train_s": (model.get("train_summary") or {}).get("seconds"),
        "run_wall_s": summary.get("wall_time_s"),
        "clean": summary.get("clean_accuracy"),
        "robust": summary.get("robust_accuracy"),
        "table": re.sub(r"\s+$", "", table, flags=re.M),
        "stages": stage_seconds(proc.stderr),
    }


def verdicts(m: dict[str, object]) -> list[tuple[str, str, bool]]:
    main_s, ratio = float(m["main_s"]), float(m["ratio"])  # type: ignore[arg-type]
    return [
        (f"main job < {TARGET_MAIN_S:.0f} s", f"{main_s:.1f} s", main_s < TARGET_MAIN_S),
        (f"re-run < {100 * TARGET_RATIO:.0f} % of main job", f"{100 * ratio:.2f} %", ratio < TARGET_RATIO),
    ]


def fmt_load(load: object) -> str:
    return "n/a" if not load else ", ".join(f"{x:.2f}" for x in load)  # type: ignore[union-attr]


def section(m: dict[str, object]) -> str:
    pct = lambda v: "n/a" if v is None else f"{100 * float(v):.2f} %"  # noqa: E731
    train = "n/a" if m["train_s"] is None else f"{float(m['train_s']):.1f} s"  # type: ignore[arg-type]
    lines = [
        SECTION,
        "",
        f"Measured by `python benchmarks/main_job.py` on {m['date']}:",
        "",
        f"1. `{MAIN_JOB_TEXT}` in a fresh temporary directory, with an empty `BENCH_HOME`",
        "   (the model is trained from scratch) and a fresh `sqlite:///bench.db`;",
        "2. the identical command again, which returns the stored result.",
        "",
        "| | |",
        "| --- | --- |",
        f"| machine | {m['cpu_count']} CPUs (`os.cpu_count()`), {m['platform']} ({m['machine']}) |",
        f"| python / torch / bench | {m['python']} / {m['torch']} / {m['bench']} |",
        f"| device used by the run | {m['device']} ({m['torch_threads']} torch threads) |",
        f"| load average (1, 5, 15 min) | before: {fmt_load(m['load_before'])}; after: {fmt_load(m['load_after'])} |",
        f"| main job (wall time of the command) | {float(m['main_s']):.1f} s |",  # type: ignore[arg-type]
        f"| CPU time of the main job (user + sys, all threads) | {float(m['main_cpu_s']):.1f} s |",  # type: ignore[arg-type]
        f"| of which training (stored train summary) | {train} |",
        f"| re-run (stored result) | {float(m['rerun_s']):.2f} s |",  # type: ignore[arg-type]
        f"| ratio re-run / main job | {float(m['ratio']):.4f} ({100 * float(m['ratio']):.2f} %) |",  # type: ignore[arg-type]
        f"| clean / robust (worst case) accuracy | {pct(m['clean'])} / {pct(m['robust'])} |",
        "",
        "| Target | Measured | Result |",
        "| --- | ---: | --- |",
        *(f"| {name} | {value} | {'PASS' if ok else 'FAIL'} |" for name, value, ok in verdicts(m)),
        "",
        "Seconds per stage (progress lines): "
        + ("; ".join(f"{k} {v} s" for k, v in dict(m.get("stages") or {}).items()) or "n/a") + ".",
        "",
        *(why_slow() if float(m["main_s"]) >= TARGET_MAIN_S else []),  # type: ignore[arg-type]
        "Output of the main job:",
        "",
        "```",
        str(m["table"]),
        "```",
        "",
        "A load average above the CPU count means other processes shared the machine during the",
        "measurement; the main job's wall time then overstates what it takes on an idle machine, and its",
        "CPU time can grow as well.",
        "",
    ]
    return "\n".join(lines)


def why_slow() -> list[str]:
    """The reason the main job misses its target since its default protocol is AutoAttack."""
    return [
        "Why the main job misses its target: its default protocol is now AutoAttack standard (issue 16),",
        "and AutoAttack's cost is per example still robust: APGD-T and FAB-T (9 target classes x 100",
        "iterations each) and Square (5,000 queries) add up to about 10^4 forward-pass equivalents per",
        "robust example and threat model; `pgd-at` keeps about 80 % of the 450 digits examples robust.",
        "Digits now gets `cnn-tiny` (width 16, channels-last: 0.4 M multiply-adds per image instead of",
        "1.5 M), which took the job from 599 s to 324-376 s (CPU time 1161 s to 695 s). What remains is",
        "mostly AutoAttack's own per-iteration work, not the model: profiled on 128 examples at L2, Square",
        "spends about half its 28.6 s outside the model (5,000 sequential iterations of sampling and",
        "bookkeeping), FAB-T a fifth of its 14.6 s in its projection. Even with every attack on all 450",
        "examples in one batch, that floor is about 50 s per threat model, so 120 s is out of reach with",
        "AutoAttack standard at both default threat models; `--protocol pgd` (PGD-20 alone, the previous",
        "default) ran the same job in 28.3 s (this file's entry of 2026-11-21). Options: accept the slower",
        "main job (chosen: the honest default), or a main job that runs `--protocol pgd`.",
        "",
    ]


def write_doc(m: dict[str, object], path: Path = DOC) -> None:
    title = SECTION.removeprefix("## ")
    write_section(title, section(m).split("\n", 1)[1], path)  # section() starts with its own heading


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()

    m = measure()
    print(f"main job: {MAIN_JOB_TEXT}")
    print(f"machine:  {m['cpu_count']} CPUs, {m['platform']}; torch {m['torch']}; device {m['device']}")
    print(f"load avg: before {fmt_load(m['load_before'])}, after {fmt_load(m['load_after'])}")
    print(f"main job: {float(m['main_s']):8.2f} s (CPU time {float(m['main_cpu_s']):.1f} s)")  # type: ignore[arg-type]
    print(f"re-run:   {float(m['rerun_s']):8.2f} s")  # type: ignore[arg-type]
    print(f"ratio:    {float(m['ratio']):8.4f}")  # type: ignore[arg-type]
    results = verdicts(m)
    for name, value, ok in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value}")
    if not args.no_write:
        write_doc(m)
        print(f"wrote {DOC}")
    return 0 if all(ok for _, _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())

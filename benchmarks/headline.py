#!/usr/bin/env python3
"""The headline run, profiled stage by stage and timed against the code before the speed-up.

``bench run --defense hycas --dataset ham10000 --data-dir <subset>`` (default protocol, ``-n N``
seeded test images, ``--threads 2``) is run by today's code and by the baseline (``--baseline``,
default the commit before issue 17's evaluation work, unpacked with ``git archive``), each into a
fresh store, alternately for ``--rounds`` rounds, on the same cached model (trained once by the
first run if the model cache has none; not timed). Timed: the evaluation stages (checks, clean,
attacks, certificates, saturation checks, audit), from the moment the model is loaded to the end
of the run. Each stage's seconds come from the progress lines. The two versions' per-example rows
of every stage are compared: the speed-ups change no number, so they must be identical; except the
smoothing certificate's, whose noise the packed sampler (issue 17, item 2) draws from a stream per
example (the same distribution, other draws), so it is left out against a baseline before it.

Target: the evaluation stages at least 4x faster (median of the per-round ratios). Writes the
section "Headline run (HyCAS on HAM10000)" of docs/performance.md; exit status 1 if the target is
missed or the rows differ, 0 when the HAM10000 subset is absent (nothing to measure).

    python benchmarks/headline.py [--no-write] [-n 16] [--rounds 2] [--baseline REV] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _report import finish, stage_seconds, unpack, use_tree, write_section  # noqa: E402
from distributed import rows  # noqa: E402

TARGET = 4.0
BASELINE = "018fc2f"  # main before issue 17's evaluation work (AOL cache, MaxMin, allocator)
SECTION = "Headline run (HyCAS on HAM10000)"
SKIP = ("smoothing",)  # stages whose draws changed on purpose since the baseline (the module docstring)
ARGS = ["run", "--defense", "hycas", "--dataset", "ham10000", "--threads", "2"]


def worker(src: str, out: str, argv: list[str]) -> None:
    """``bench run`` from the source tree ``src``, timing from the loaded model to the end."""
    use_tree(src)
    from bench.cli import app
    from bench.harness import runner

    obtain, start = runner.obtain_model, [float("nan")]

    def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
        model = obtain(*args, **kwargs)
        start[0] = time.perf_counter()
        return model

    runner.obtain_model = timed
    try:
        app(argv, standalone_mode=False)
    finally:
        Path(out).write_text(json.dumps({"seconds": time.perf_counter() - start[0]}))


def ham_subset(given: str | None, work: Path) -> Path | None:
    """``--data-dir``, else the HAM10000 files of ../shared/data arranged in the official layout
    (as the real-data tests do); ``None`` when they are absent."""
    if given:
        return Path(given)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_datasets_real import HAM_IMAGES, HAM_META, ISIC_GT, arrange_ham

    if not (HAM_IMAGES.is_dir() and HAM_META.is_file() and ISIC_GT.is_file()):
        return None
    return arrange_ham(work / "ham")


def launch(src: Path, args: list[str], work: Path, tag: str) -> tuple[float, dict[str, int], str]:
    """One run of the code in ``src`` into a fresh store: (seconds, stage seconds, store URL)."""
    out, url = work / f"{tag}.json", f"sqlite:///{work / tag}.db"
    done = subprocess.run([sys.executable, __file__, "--worker", str(src), str(out), "--", *args, "--db", url],
                          capture_output=True, text=True, cwd=work, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if done.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{done.stderr[-3000:]}")
    if "training" in done.stderr and tag != "warm-up":
        raise SystemExit(f"{tag} trained a model: the timed runs must share the cached one")
    return float(json.loads(out.read_text())["seconds"]), stage_seconds(done.stderr), url


def measure(n: int, rounds: int, baseline: str, data_dir: str | None) -> dict[str, object] | None:
    with tempfile.TemporaryDirectory(prefix="bench-headline-") as tmp:
        work = Path(tmp)
        data = ham_subset(data_dir, work)
        if data is None:
            return None
        old = unpack(baseline, work / "baseline")
        args = [*ARGS, "--data-dir", str(data), "-n", str(n)]
        launch(ROOT, [*args[:-2], "-n", "1", "--protocol", "clean"], work, "warm-up")  # trains once if needed
        seconds: dict[str, list[float]] = {"new": [], "old": []}
        stages: dict[str, dict[str, int]] = {}
        identical = True
        for number in range(rounds):
            urls = {}
            for version in (("old", "new") if number % 2 == 0 else ("new", "old")):
                spent, stages[version], urls[version] = launch(ROOT if version == "new" else old, args, work,
                                                               f"round{number}-{version}")
                seconds[version].append(spent)
            identical = identical and rows(urls["old"], SKIP) == rows(urls["new"], SKIP)
    ratios = [o / m for o, m in zip(seconds["old"], seconds["new"])]
    return {"n": n, "rounds": rounds, "baseline": baseline, "old": statistics.median(seconds["old"]),
            "new": statistics.median(seconds["new"]), "ratio": statistics.median(ratios), "low": min(ratios),
            "high": max(ratios), "identical": identical, "stages": stages, "seconds": seconds}


def stage_table(stages: dict[str, dict[str, int]]) -> str:
    names = list(dict.fromkeys([*stages["old"], *stages["new"]]))
    lines = ["| stage (last round) | baseline s | today s | ratio |", "| --- | ---: | ---: | ---: |"]
    for name in names:
        old, new = stages["old"].get(name), stages["new"].get(name)
        ratio = f"{old / new:.1f}x" if old and new else "-"
        lines.append(f"| {name} | {old if old is not None else '-'} | {new if new is not None else '-'} | {ratio} |")
    return "\n".join(lines)


def write_report(result: dict, ok: bool) -> None:
    import torch

    verdict = "PASS" if ok else "FAIL"
    section = (
        f"Measured by `benchmarks/headline.py` on {datetime.now(timezone.utc):%Y-%m-%d}, {platform.platform()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, `--threads 2`.\n\n"
        f"`bench run --defense hycas --dataset ham10000 --data-dir <the subset of ../shared/data> -n {result['n']}` "
        f"(default protocol), today's code against `{result['baseline']}` (before this work), each into a fresh "
        f"store, in {result['rounds']} alternating rounds, on the same cached model. Timed: the evaluation stages, "
        "from the loaded model to the end of the run.\n\n"
        "| measurement | baseline | today | ratio | target | result |\n| --- | ---: | ---: | ---: | --- | --- |\n"
        f"| evaluation stages, median seconds | {result['old']:.1f} | {result['new']:.1f} | {result['ratio']:.2f}x "
        f"({result['low']:.2f}-{result['high']:.2f}) | >= {TARGET:g}x | **{verdict}** |\n"
        "| per-example rows of every stage identical (smoothing certificates left out: other draws) | | | "
        f"{'yes' if result['identical'] else 'NO'} | identical | "
        f"**{'PASS' if result['identical'] else 'FAIL'}** |\n\n" + stage_table(result["stages"]) + "\n\n"
        "Seconds per round, baseline: " + ", ".join(f"{v:.1f}" for v in result["seconds"]["old"])
        + "; today: " + ", ".join(f"{v:.1f}" for v in result["seconds"]["new"]) + ".\n")
    write_section(SECTION, section)


def main() -> int:
    if "--worker" in sys.argv:  # python headline.py --worker SRC OUT -- run ...
        at = sys.argv.index("--worker")
        worker(sys.argv[at + 1], sys.argv[at + 2], sys.argv[sys.argv.index("--") + 1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/performance.md")
    parser.add_argument("-n", type=int, default=16, help="HAM10000 test images evaluated")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of baseline and today")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the baseline code")
    parser.add_argument("--data-dir", help="HAM10000 root (default: arranged from ../shared/data)")
    options = parser.parse_args()
    result = measure(options.n, options.rounds, options.baseline, options.data_dir)
    if result is None:
        print("headline: the HAM10000 files of ../shared/data are absent; nothing to measure")
        return 0
    return finish(result, result["ratio"] >= TARGET and bool(result["identical"]), write_report, options.no_write)


if __name__ == "__main__":
    sys.exit(main())

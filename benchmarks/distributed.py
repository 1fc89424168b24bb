"""Evaluation under torchrun: 1 process against 2 processes of one thread each, in one run.

The same cached checkpoint (``standard`` on digits, trained once before the timing) is evaluated
under the ``quick`` protocol with ``--batch-size 16`` (many batches to share out) into a fresh
store, by ``torchrun --nproc-per-node 1`` and ``--nproc-per-node 2``, in interleaved rounds. What
is timed is the evaluation stages alone (from a barrier before the first stage to the end of the
last, on rank 0, rank 0's final bookkeeping pass included): process start-up, imports, data
loading and the model checks are not. The two worlds' per-example rows are compared (they must be
identical). Target: 2 processes at least 1.7x faster than 1 (the median of the per-round ratios).

Writes the section "Distributed evaluation" of docs/performance.md; exit status 1 if the
target is missed.

    python benchmarks/distributed.py [--no-write] [--rounds 3] [-n 200]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import finish, write_section  # noqa: E402

TARGET = 1.7
ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--defense", "standard", "--dataset", "digits", "--protocol", "quick", "--batch-size", "16",
        "--device", "cpu"]


def worker(out: str, argv: list[str]) -> None:
    """Under torchrun: ``bench run`` with the evaluation stages timed on rank 0 (written to ``out``)."""
    import torch

    torch.set_num_threads(1)
    from bench.cli import app
    from bench.harness import runner
    from bench.training import distributed

    stages, spent = runner._run_stages, [0.0]

    def timed(resolved, evaluator):  # type: ignore[no-untyped-def]
        if evaluator.shard[1] > 1:  # the sharded pass (not rank 0's final one, which it runs alone)
            distributed.barrier()
        start = time.perf_counter()
        stages(resolved, evaluator)
        spent[0] += time.perf_counter() - start

    runner._run_stages = timed
    try:
        app(argv, standalone_mode=False)
    finally:
        if distributed.is_main():
            Path(out).write_text(json.dumps({"seconds": spent[0]}))


def launch(nproc: int, args: list[str], work: Path, tag: str) -> tuple[float, str]:
    """One torchrun of ``nproc`` processes into a fresh store: (seconds of the stages, store URL)."""
    out, url = work / f"{tag}.json", f"sqlite:///{work / tag}.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--worker", str(out), "--", "run", *args, "--db", url]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
    if done.returncode != 0:
        raise SystemExit(f"torchrun --nproc-per-node {nproc} failed:\n{done.stderr[-3000:]}")
    return float(json.loads(out.read_text())["seconds"]), url


def rows(url: str, skip: tuple[str, ...] = ()) -> list[tuple]:
    """The per-example rows of the store's one run (evaluations whose method is in ``skip`` left out)."""
    from bench.results.store import Store

    store = Store(url)
    (run,) = store.list_runs()
    evaluations = [e for e in store.evaluations(run.id) if e.method not in skip]
    position = {e.id: e.position for e in evaluations}
    return sorted((position[r.evaluation_id], r.example_index, r.prediction, r.correct, r.correct_draws,
                   r.perturbation_norm) for r in store.results([e.id for e in evaluations]))


def measure(rounds: int, n: int) -> dict[str, object]:
    args = [*ARGS, "-n", str(n)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["BENCH_HOME"] = str(work / "home")  # a private model cache, trained once below
        launch(1, args, work, "warm-up")  # trains and caches the checkpoint (not timed)
        seconds: dict[int, list[float]] = {1: [], 2: []}
        identical = True
        for number in range(rounds):
            order = (1, 2) if number % 2 == 0 else (2, 1)  # interleaved: drift hits both
            urls = {}
            for nproc in order:
                spent, urls[nproc] = launch(nproc, args, work, f"round{number}-w{nproc}")
                seconds[nproc].append(spent)
            identical = identical and rows(urls[1]) == rows(urls[2])
    ratios = [one / two for one, two in zip(seconds[1], seconds[2])]
    return {"n": n, "rounds": rounds, "one": statistics.median(seconds[1]), "two": statistics.median(seconds[2]),
            "ratio": statistics.median(ratios), "low": min(ratios), "high": max(ratios), "identical": identical,
            "seconds_one": seconds[1], "seconds_two": seconds[2]}


def write_report(result: dict, ok: bool) -> None:
    import torch

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    reason = "" if ok else (
        "\n\nWhy it FAILs: the two processes share this machine's 2 cores with everything else running on it "
        f"(load average after the measurement: {load}); the 1-process run already has a core to itself, the "
        "2-process one needs both idle. The stages also end at a barrier each: the ranks claim batches as "
        "they go, so they finish a stage at most one batch apart, but that last batch is waited for.")
    verdict = "PASS" if ok else "FAIL"
    section = (
        f"Measured by `benchmarks/distributed.py` on {datetime.now(timezone.utc):%Y-%m-%d}, {platform.platform()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, one torch thread per process.\n\n"
        f"`torchrun --nproc-per-node 1` and `--nproc-per-node 2` evaluate the same cached checkpoint (`standard` on "
        f"digits) under `quick@1` with `-n {result['n']} --batch-size 16`, each into a fresh store, in "
        f"{result['rounds']} interleaved rounds. The ranks share each stage's batches by claiming the next "
        "unclaimed one from torchrun's rendezvous store. Timed: the evaluation stages on rank 0 (start-up, "
        "imports, data loading and the model checks are not).\n\n"
        "| measurement | 1 process | 2 processes | ratio | target | result |\n"
        "| --- | ---: | ---: | ---: | --- | --- |\n"
        f"| evaluation stages, median seconds | {result['one']:.2f} | {result['two']:.2f} | {result['ratio']:.2f}x "
        f"({result['low']:.2f}-{result['high']:.2f}) | >= {TARGET}x | **{verdict}** |\n"
        f"| per-example rows of every stage identical | | | {'yes' if result['identical'] else 'NO'} | identical | "
        f"**{'PASS' if result['identical'] else 'FAIL'}** |\n\n"
        "The ratio is the median of the per-round ratios (lowest and highest in parentheses). Seconds per round, "
        f"1 process: {', '.join(f'{v:.1f}' for v in result['seconds_one'])}; 2 processes: "
        f"{', '.join(f'{v:.1f}' for v in result['seconds_two'])}." + reason + "\n")
    write_section("Distributed evaluation", section)


def main() -> int:
    if "--worker" in sys.argv:  # launched by torchrun: python distributed.py --worker OUT -- run ...
        at = sys.argv.index("--worker")
        worker(sys.argv[at + 1], sys.argv[sys.argv.index("--") + 1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/performance.md")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of 1 and 2 processes")
    parser.add_argument("-n", type=int, default=200, help="digits test examples evaluated")
    options = parser.parse_args()
    result = measure(options.rounds, options.n)
    return finish(result, result["ratio"] >= TARGET and bool(result["identical"]), write_report, options.no_write)


if __name__ == "__main__":
    sys.exit(main())

"""Certification throughput and sequential certification, measured in one run on this machine.

1. Sampling throughput: ``bench``'s smoothing sampler (noise for several examples per forward
   pass, batch sized from the input, a deterministic model compiled with ``torch.compile`` for
   large calls on a CPU, ``torch.inference_mode``, vote counting on the device)
   against a straightforward reference implementation of Cohen et al.'s CERTIFY sampling (one
   example at a time, batches of 400 noisy copies, float32, ``torch.no_grad``, counts with
   numpy), on the same model and inputs. Target: at least 2x the samples per second.
2. HyCAS (a randomized base classifier, hycas-small at HAM10000's 3x64x64): ``Smoothing.certify``
   of today's code against the code when issue 17 was filed (``--baseline``, unpacked with
   ``git archive``), each in its own process, alternately. Target: at least 2x faster.
3. Sequential certification: ``--sequential`` (rounds ending at looks fixed in advance, a
   Clopper-Pearson bound at alpha / L at each look; stops once the radius grid level is decided)
   against fixed n = 100,000 on the same examples of a small model trained with Gaussian noise on
   digits, ``--repeats`` independent sequential runs. Targets: at least 10x fewer samples on
   average (the mean over the runs), and certified accuracy at every grid radius (the mean over
   the runs) within 1 point of the fixed-n result; each run's figures are reported too. Also
   reported: two oracles (the samples a level-alpha Clopper-Pearson bound, and one held to the
   certifier's looks, need to reach each example's fixed-n grid level when p_A is known in
   advance), and how full the forward passes of the first sequential run are with the packed
   sampler (rounds of a window's examples refilled as they end) and with round-synchronous
   sampling (each round of the window's active examples a call of its own, as before issue 17),
   replayed on the same per-example decisions at a CPU's width (512) and a GPU's (10,000).

Writes the sections "Certification" (1, 2) and "Sequential certification" (3) of
docs/performance.md, keeping their hand-written notes; exit status 1 if a target is missed.

    python benchmarks/certify.py [--no-write] [--examples 100] [--repeats 5] [--baseline REV]
                                 [--throughput-only | --sequential-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _report import unpack, use_tree, write_section  # noqa: E402

SPEED_TARGET = 2.0
HYCAS_TARGET = 2.0
SAMPLES_TARGET = 10.0
ACCURACY_TOLERANCE = 0.01
SIGMA = 0.25
BASELINE = "018fc2f"  # main when issue 17 was filed (before its evaluation and sampling work)
HYCAS_EXAMPLES, HYCAS_N0, HYCAS_N = 8, 100, 2000  # the headline run certifies HAM10000 at n = 2,000


def reference_counts(model: nn.Module, x: torch.Tensor, num: int, sigma: float, num_classes: int,
                     batch: int = 400) -> np.ndarray:
    """Cohen et al.'s sampling loop: one example, ``batch`` noisy copies per forward pass."""
    counts = np.zeros(num_classes, dtype=int)
    with torch.no_grad():
        remaining = num
        while remaining > 0:
            this = min(batch, remaining)
            remaining -= this
            copies = x.repeat((this, 1, 1, 1))
            noise = torch.randn_like(copies) * sigma
            predictions = model(copies + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
    return counts


def small_model(channels: int, size: int, classes: int = 10) -> nn.Module:
    from bench.models.backbones import SmallCNN
    from bench.models.defended import DefendedModel

    torch.manual_seed(0)
    net = SmallCNN(channels, classes, image_size=size)
    return DefendedModel(net, (0.5,) * channels, (0.25,) * channels, (channels, size, size), classes).eval()


def bench_throughput(model: nn.Module, x: torch.Tensor, num: int, rounds: int = 5) -> dict[str, float]:
    """Samples per second of bench's sampler (its defaults, and eager) and of the reference.

    This machine is shared and its speed drifts by tens of percent within a minute, so the three
    samplers are timed in ``rounds`` interleaved rounds; the ratio is the median of the per-round
    ratios and the rates are medians. The one-time compilation is timed apart, in a warm-up call.
    """
    from bench.certifiers.smoothing import sample_counts
    from bench.models.compiled import COMPILE_MIN_SAMPLES, CompileCache

    examples, (channels, size) = len(x), x.shape[1:3]
    total = examples * num
    assert total >= COMPILE_MIN_SAMPLES, "the timed calls must be large enough for compile=auto"
    cache = CompileCache()  # as a Smoothing certifier keeps its compiled model across calls
    start = time.perf_counter()
    sample_counts(model, x[:1], 500, SIGMA, compile=True, cache=cache)  # compiles, for this input shape and batch
    compile_s = time.perf_counter() - start
    sample_counts(model, x[:1], 500, SIGMA, compile=False)  # eager warm-up
    seconds: dict[str, list[float]] = {"ours": [], "eager": [], "ref": []}
    for _ in range(rounds):
        start = time.perf_counter()
        ours = sample_counts(model, x, num, SIGMA, cache=cache)  # compile=auto compiles calls this large on a CPU
        seconds["ours"].append(time.perf_counter() - start)
        start = time.perf_counter()
        sample_counts(model, x, num, SIGMA, compile=False)
        seconds["eager"].append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = [reference_counts(model, x[i:i + 1], num, SIGMA, 10) for i in range(examples)]
        seconds["ref"].append(time.perf_counter() - start)
    # same model, same distribution: the vote shares must agree (a check that both count the same thing)
    share_gap = float(np.abs(ours.numpy() / num - np.stack(theirs) / num).max())
    ratios = [r / o for r, o in zip(seconds["ref"], seconds["ours"])]
    trained = "digits CNN (noise-trained)" if channels == 1 else "CNN (random weights)"
    rate = {k: total / float(np.median(v)) for k, v in seconds.items()}
    return {"shape": f"{channels}x{size}x{size}", "model": trained, "examples": examples, "num": num,
            "ours_rate": rate["ours"], "eager_rate": rate["eager"], "ref_rate": rate["ref"],
            "speedup": float(np.median(ratios)), "low": min(ratios), "high": max(ratios), "rounds": rounds,
            "share_gap": share_gap, "compile_s": compile_s}


def hycas_worker(src: str, out: str) -> None:
    """``Smoothing.certify`` of a hycas-small model (seeded weights) on HAM10000-shaped images
    (3x64x64, 7 classes) with the code in ``src``: the seconds and the certificates, as JSON."""
    use_tree(src)
    from bench import device

    torch.set_num_threads(2)
    if hasattr(device, "configure_allocator"):
        device.configure_allocator()  # as ``bench run`` does today
    from bench.certifiers.smoothing import Smoothing
    from bench.data.base import get_dataset
    from bench.registry import DEFENSES

    spec = get_dataset("ham10000").spec
    torch.manual_seed(0)
    model = DEFENSES.get("hycas")().build(spec, 64, arch="hycas-small").eval()  # the CPU recipe's network
    x = torch.rand((HYCAS_EXAMPLES, *spec.shape(64)), generator=torch.Generator().manual_seed(1))
    Smoothing(n=200, n0=10).certify(model, x[:1])  # warm-up
    certifier = Smoothing(n=HYCAS_N, n0=HYCAS_N0)
    torch.manual_seed(2)
    start = time.perf_counter()
    certificates = certifier.certify(model, x)
    seconds = time.perf_counter() - start
    Path(out).write_text(json.dumps({"seconds": seconds, "samples": sum(c.samples for c in certificates),
                                     "predictions": [c.prediction for c in certificates]}))


def bench_hycas(baseline: str, rounds: int) -> dict[str, object]:
    """Today's ``Smoothing.certify`` on HyCAS against ``baseline``'s, alternately in fresh processes."""
    seconds: dict[str, list[float]] = {"new": [], "old": []}
    samples = {}
    with tempfile.TemporaryDirectory(prefix="bench-certify-") as tmp:
        trees = {"new": ROOT, "old": unpack(baseline, Path(tmp) / "baseline")}
        for number in range(rounds):
            for version in (("old", "new") if number % 2 == 0 else ("new", "old")):
                out = Path(tmp) / f"{version}{number}.json"
                done = subprocess.run([sys.executable, __file__, "--hycas-worker", str(trees[version]), str(out)],
                                      capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
                if done.returncode != 0:
                    raise SystemExit(f"hycas {version} failed:\n{done.stderr[-3000:]}")
                result = json.loads(out.read_text())
                seconds[version].append(result["seconds"])
                samples[version] = result["samples"]
    assert samples["old"] == samples["new"], samples  # the same work: n0 + n samples per example
    ratios = [o / m for o, m in zip(seconds["old"], seconds["new"])]
    return {"baseline": baseline, "examples": HYCAS_EXAMPLES, "n": HYCAS_N, "rounds": rounds,
            "samples": samples["new"], "old": statistics.median(seconds["old"]),
            "new": statistics.median(seconds["new"]), "speedup": statistics.median(ratios),
            "low": min(ratios), "high": max(ratios)}


def noise_trained_digits_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor, tuple[float, ...]]:
    """A small CNN trained on digits with Gaussian noise at SIGMA (the setting smoothing certifies)."""
    from bench.data.base import get_dataset
    from bench.models.backbones import SmallCNN
    from bench.models.defended import DefendedModel

    dataset = get_dataset("digits")
    spec = dataset.spec
    train, test = dataset.load("train", None, spec.image_size), dataset.load("test", None, spec.image_size)
    torch.manual_seed(0)
    net = SmallCNN(spec.input_shape[0], spec.num_classes, image_size=spec.image_size)
    model = DefendedModel(net, spec.mean, spec.std, spec.shape(spec.image_size), spec.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(30):
        order = torch.randperm(len(train))
        for begin in range(0, len(train), 64):
            idx = order[begin:begin + 64]
            x = train.images[idx]
            loss = nn.functional.cross_entropy(model(x + SIGMA * torch.randn_like(x)), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), test.images, test.labels, spec.radii


def bench_sequential(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, radii: tuple[float, ...],
                     examples: int, repeats: int) -> dict[str, object]:
    """Fixed n = 100,000 once, and ``repeats`` independent sequential runs, on the same examples.
    One run's mean varies by about 10 % (a few examples near a grid threshold draw tens of
    thousands of samples or not), so the saving is the ratio of the means pooled over the
    repeats, the accuracy the mean over the repeats; each run's figures are reported too."""
    from bench.certifiers.smoothing import WINDOW, Smoothing, certify_window

    generator = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(images), generator=generator)[:examples].sort().values
    x, y = images[pick], labels[pick]
    window = certify_window(model)

    def one(certifier: Smoothing, seed: int) -> dict[str, object]:
        torch.manual_seed(seed)
        start = time.perf_counter()  # in windows of examples, as a run certifies them
        certs = [c for begin in range(0, len(x), window) for c in certifier.certify(model, x[begin:begin + window])]
        accuracy = [sum(1 for c, label in zip(certs, y) if c.prediction == int(label) and c.radius >= r) / len(x)
                    for r in radii]
        return {"certs": certs, "samples": sum(c.samples for c in certs) / len(x), "accuracy": accuracy,
                "seconds": time.perf_counter() - start}

    fixed = one(Smoothing(sigma=SIGMA, n=100_000), 1)
    runs = [one(Smoothing(sigma=SIGMA, n=100_000, sequential=True, radii=list(radii)), 1 + r) for r in range(repeats)]
    samples = sum(r["samples"] for r in runs) / repeats
    accuracy = [sum(r["accuracy"][j] for r in runs) / repeats for j in range(len(radii))]
    oracles = {name: [oracle_samples(c.count_a, 100_000, c.bound, radii, looks=looks) for c in fixed["certs"]]
               for name, looks in (("fixed", False), ("looks", True))}
    used = [c.samples - 100 for c in runs[0]["certs"]]
    return {"examples": examples, "radii": radii, "repeats": repeats, "fixed": fixed, "runs": runs,
            "samples": samples, "accuracy": accuracy, "reduction": fixed["samples"] / samples,
            "run_reductions": [fixed["samples"] / r["samples"] for r in runs],
            "run_gaps": [max(abs(a - b) for a, b in zip(fixed["accuracy"], r["accuracy"])) for r in runs],
            "max_gap": max(abs(a - b) for a, b in zip(fixed["accuracy"], accuracy)),
            "oracle": {name: sum(v) / len(v) for name, v in oracles.items()},
            "at_n": sum(1 for r in runs for c in r["certs"] if c.samples >= 100_100),
            "fill": {width: pass_fill(used, width, window, WINDOW) for width in (512, 10_000)}}


def oracle_samples(count_a: int, n: int, bound: float, radii: tuple[float, ...], n0: int = 100,
                   alpha: float = 0.001, looks: bool = False) -> int:
    """The samples (with the ``n0`` of the selection) a Clopper-Pearson bound at level ``alpha``
    needs to certify the grid level that fixed ``n`` certified, if p_A were known to be the fixed
    run's estimate ``count_a / n`` and each sample count hit its expectation: an oracle that knows
    when to stop. An abstention costs it the selection alone. ``looks``: the same oracle held to
    the sequential certifier's looks and their level alpha / L (the first look that suffices)."""
    from bench.certifiers.smoothing import _grid_level, grid_thresholds, sequential_looks
    from bench.certifiers.stats import clopper_pearson_lower

    thresholds = grid_thresholds(radii, SIGMA)
    level = _grid_level(bound, thresholds)
    if level == 0:
        return n0
    p, goal = count_a / n, thresholds[:level]
    times = sequential_looks(n) if looks else range(1, n + 1)
    at = alpha / len(times) if looks else alpha

    def enough(m: int) -> bool:
        return _grid_level(clopper_pearson_lower(math.floor(p * m), m, at), goal) >= level

    low, high = 0, len(times) - 1
    while low < high:  # the first time that reaches the level (the bound grows with m at a fixed p)
        middle = (low + high) // 2
        low, high = (low, middle) if enough(times[middle]) else (middle + 1, high)
    return n0 + times[low]


def pass_fill(used: list[int], width: int, window: int, before: int, n0: int = 100) -> dict[str, float]:
    """Forward passes of ``width`` rows for the sequential run's examples (``used``: samples each
    drew after its ``n0``), with the same per-example rounds:

    * ``packed``: bench's sampler (:class:`~bench.certifiers.sampler.PackedSampler`), ``window``
      examples at a time (a run's window for the model), replayed through a stand-in model (the
      schedule depends only on the round sizes);
    * ``rounds``: round-synchronous sampling, ``before`` examples at a time (the selection a call,
      then each round of the active examples a call of its own, every call's last pass partly
      empty), as before issue 17.
    """
    from bench.certifiers.sampler import PackedSampler

    class Stand(nn.Module):
        num_classes = 2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(x), 2)

    passes = {"packed": 0, "rounds": 0}
    for begin in range(0, len(used), window):
        plans = [rounds_of(u) for u in used[begin:begin + window]]
        taken = [0] * len(plans)

        def after(example: int, votes: torch.Tensor, plans: list[list[int]] = plans, taken: list[int] = taken) -> int:
            taken[example] += 1
            return plans[example][taken[example] - 1] if taken[example] <= len(plans[example]) else 0

        sampler = PackedSampler(Stand(), torch.zeros(len(plans), 1, 1, 1), 0.0, width=width, compile=False)
        passes["packed"] += sampler.run(lambda _: n0, after).passes
    for begin in range(0, len(used), before):
        plans = [rounds_of(u) for u in used[begin:begin + before]]
        passes["rounds"] += math.ceil(len(plans) * n0 / width)
        for r in range(max(len(p) for p in plans)):
            rows = sum(p[r] for p in plans if len(p) > r)
            passes["rounds"] += math.ceil(rows / width)
    rows = sum(used) + n0 * len(used)
    return {name: rows / (count * width) for name, count in passes.items()}


def rounds_of(used: int, n_max: int = 100_000) -> list[int]:
    """The sequential certifier's round sizes for an example that drew ``used`` samples after its
    selection (the steps between its looks)."""
    from bench.certifiers.smoothing import sequential_looks

    looks = [0] + [t for t in sequential_looks(n_max) if t <= used]
    assert looks[-1] == used, (used, looks)
    return [b - a for a, b in zip(looks, looks[1:])]


def verdict(flag: bool) -> str:
    return f"**{'PASS' if flag else 'FAIL'}**"


def machine() -> str:
    return (f"Measured by `benchmarks/certify.py` on {datetime.now(timezone.utc):%Y-%m-%d}, {platform.platform()}, "
            f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads.\n\n")


def write_certification(speeds: list[dict[str, float]], hycas: dict) -> None:
    """The section "Certification": sampling throughput and HyCAS."""
    rows = "".join(
        f"| smoothing samples/s, {s['shape']} {s['model']}, {s['examples']} examples x {s['num']} samples | "
        f"{s['ours_rate']:,.0f} (eager {s['eager_rate']:,.0f}) | {s['ref_rate']:,.0f} | {s['speedup']:.2f}x "
        f"({s['low']:.2f}-{s['high']:.2f}) | "
        f">= {SPEED_TARGET}x | {verdict(s['speedup'] >= SPEED_TARGET)} |\n" for s in speeds)
    section = (
        machine()
        + "| measurement | bench | reference | ratio | target | result |\n| --- | ---: | ---: | ---: | --- | --- |\n"
        + rows
        + f"| HyCAS (hycas-small, 3x64x64) `Smoothing.certify`, {hycas['examples']} examples x (100 + "
        f"{hycas['n']:,}) samples: seconds, today vs {hycas['baseline']} | {hycas['new']:.1f} s | "
        f"{hycas['old']:.1f} s | "
        f"{hycas['speedup']:.2f}x ({hycas['low']:.2f}-{hycas['high']:.2f}) | >= {HYCAS_TARGET}x | "
        f"{verdict(hycas['speedup'] >= HYCAS_TARGET)} |\n\n"
        "The reference is the sampling loop of Cohen et al.'s `certify` (per example, 400 noisy copies per\n"
        "forward pass, float32); both samplers draw from the same distribution (the largest difference in\n"
        f"vote shares between them was {max(s['share_gap'] for s in speeds):.3f}). The three samplers were timed\n"
        f"in {speeds[0]['rounds']} interleaved rounds (this machine's speed drifts within a minute): rates are\n"
        "medians, the ratio is the median of the per-round ratios, with the lowest and highest in\n"
        "parentheses. bench runs with its defaults (`compile=auto`: the model compiled by `torch.compile`,\n"
        "float32; noise drawn in place); its eager rate (`compile=false`) is in parentheses.\n"
        "The one-time compilation, timed apart, took "
        + ", ".join(f"{s['compile_s']:.1f} s ({s['shape']})" for s in speeds) + ".\n")
    write_section("Certification", section)


def write_sequential(seq: dict, ok: dict[str, bool]) -> None:
    """The section "Sequential certification": samples and accuracy against fixed n, the oracles,
    the pass fill."""
    fixed = seq["fixed"]
    grid = ", ".join(f"{r:g}" for r in seq["radii"])
    acc_f = " / ".join(f"{100 * a:.1f}" for a in fixed["accuracy"])
    acc_s = " / ".join(f"{100 * a:.1f}" for a in seq["accuracy"])
    runs = ", ".join(f"{r:.1f}x" for r in seq["run_reductions"])
    gaps = ", ".join(f"{100 * g:.0f}" for g in seq["run_gaps"])
    oracle = seq["oracle"]
    table = "".join(f"| {width:,} | {100 * f['packed']:.1f} % | {100 * f['rounds']:.1f} % |\n"
                    for width, f in seq["fill"].items())
    seconds = [r["seconds"] for r in seq["runs"]]
    section = (
        machine()
        + "| measurement | sequential | fixed n = 100,000 | ratio | target | result |\n"
        "| --- | ---: | ---: | ---: | --- | --- |\n"
        f"| mean samples per example ({seq['examples']} digits test images, sigma {SIGMA}; sequential: mean of "
        f"{seq['repeats']} runs) | {seq['samples']:,.0f} | {fixed['samples']:,.0f} | {seq['reduction']:.1f}x fewer | "
        f">= {SAMPLES_TARGET}x | {verdict(ok['samples'])} |\n"
        f"| certified accuracy at radius {grid} (sequential: mean of the runs), largest gap | "
        f"{acc_s} % | {acc_f} % | {100 * seq['max_gap']:.1f} points | <= {100 * ACCURACY_TOLERANCE:.0f} point | "
        f"{verdict(ok['accuracy'])} |\n\n"
        f"Each sequential run (its own seed): {runs} fewer samples; largest certified-accuracy gap to the fixed\n"
        f"run over the grid: {gaps} points. {seq['at_n']} of the {seq['repeats'] * seq['examples']} sequential\n"
        f"certificates drew the full 100,000. Wall time: {statistics.median(seconds):.1f} s a sequential run\n"
        f"(median), {fixed['seconds']:.1f} s the fixed run.\n\n"
        "**Oracles** (each example's p_A known to be the fixed run's estimate, every count at its\n"
        "expectation, stopping at the first sample count that certifies the grid level fixed n certified):\n"
        f"a Clopper-Pearson bound at the full alpha needs {oracle['fixed']:,.0f} samples per example\n"
        f"({fixed['samples'] / oracle['fixed']:.1f}x fewer than fixed n), roughly the most any valid procedure\n"
        "could save; held to the sequential certifier's looks and their level alpha / L, "
        f"{oracle['looks']:,.0f}\n({fixed['samples'] / oracle['looks']:.1f}x): the ceiling of this certifier, "
        "which also has to find out when to stop.\n\n"
        "**Pass fill of the first sequential run** (counted rows over the rows of the forward passes, the\n"
        "same per-example rounds; packed: the run's window of 256 examples for this deterministic model,\n"
        "refilled as examples are decided; before: 16 examples at a time, each round a call):\n\n"
        "| width (rows per pass) | packed sampler (refill) | round-synchronous (before) |\n| ---: | ---: | ---: |\n"
        + table)
    write_section("Sequential certification", section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/performance.md")
    parser.add_argument("--examples", type=int, default=100, help="digits test images for the sequential runs")
    parser.add_argument("--repeats", type=int, default=5, help="independent sequential runs on those images")
    parser.add_argument("--baseline", default=BASELINE, help="the revision HyCAS certification is timed against")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the HyCAS comparison")
    parser.add_argument("--hycas-worker", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--throughput-only", action="store_true", help="measure sampling throughput only (no write)")
    part.add_argument("--sequential-only", action="store_true",
                      help="the sequential comparison only (writes its section alone)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.hycas_worker:
        hycas_worker(*args.hycas_worker)
        return 0
    model, images, labels, radii = noise_trained_digits_model()
    ok: dict[str, bool] = {}
    if not args.sequential_only:
        speeds = [bench_throughput(model, images[:8], 25_000),  # trained: votes spread over classes
                  bench_throughput(small_model(3, 32), torch.rand(4, 3, 32, 32), 50_000)]
        for s in speeds:
            print(f"throughput {s['shape']}: bench {s['ours_rate']:,.0f}/s (eager {s['eager_rate']:,.0f}/s), "
                  f"reference {s['ref_rate']:,.0f}/s, {s['speedup']:.2f}x ({s['low']:.2f}-{s['high']:.2f}; "
                  f"vote-share gap {s['share_gap']:.3f}; compile {s['compile_s']:.1f} s)", flush=True)
        ok["speed"] = all(s["speedup"] >= SPEED_TARGET for s in speeds)
        if args.throughput_only:
            return 0 if ok["speed"] else 1
        hycas = bench_hycas(args.baseline, args.rounds)
        print(f"hycas: {hycas['new']:.1f} s vs {hycas['old']:.1f} s ({hycas['speedup']:.2f}x)", flush=True)
        ok["hycas"] = hycas["speedup"] >= HYCAS_TARGET
        if not args.no_write:
            write_certification(speeds, hycas)
    seq = bench_sequential(model, images, labels, radii, args.examples, args.repeats)
    print(f"sequential: {seq['samples']:,.0f} vs {seq['fixed']['samples']:,.0f} samples per example "
          f"({seq['reduction']:.1f}x; runs {[round(r, 2) for r in seq['run_reductions']]}), accuracy fixed "
          f"{seq['fixed']['accuracy']} sequential {seq['accuracy']} (run gaps {seq['run_gaps']}); oracles "
          f"{seq['oracle']}, fill {seq['fill']}")
    ok["samples"] = seq["reduction"] >= SAMPLES_TARGET
    ok["accuracy"] = seq["max_gap"] <= ACCURACY_TOLERANCE + 1e-12
    if not args.no_write:
        write_sequential(seq, ok)
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Certification throughput on a CUDA device, measured in one run: bench's smoothing sampler on a CIFAR
ResNet-110 (3x32x32) and an ImageNet ResNet-50 (3x224x224), as samples per second and as a fraction of the
FLOP-bound rate, with Cohen et al.'s sampling loop on the same device, inputs and batch for the ratio.

* FLOP-bound rate: device peak FLOP/s / model FLOPs per sample. Model FLOPs = 2 x the multiply-adds of the
  Conv2d and Linear layers, counted by forward hooks on one CPU forward pass (normalization, batch norm,
  ReLU, pooling and additions are not counted). The peak is the dense datasheet figure for the
  precision the convolutions run in (``tf32`` for float32 on Ampere and later while cuDNN allows TF32,
  PyTorch's default; ``fp32`` before; ``bf16`` under autocast), looked up by device name in
  :data:`PEAKS`, or given with ``--peak-tflops``. Unknown device, no ``--peak-tflops``: samples/s only.
* bench's sampler (``bench.certifiers.smoothing.sample_counts``): float32 eager at the measured batch
  and at bench's own default batch, bfloat16 autocast (``amp=True``), and ``compile=True``
  (``torch.compile``; bench's ``auto`` compiles only on a CPU). bench lays out its noise buffer
  channels-last on CUDA in every configuration (it has no switch for it); ``amp`` and ``compile`` do not
  combine in bench (autocast samples eagerly).
* Cohen's loop: ``reference_counts`` of benchmarks/certify.py (one example at a time, float32,
  ``torch.no_grad``, numpy counts), here at the same batch as bench.
* Batch: ``--batch``, or the largest that fits: from ``--max-batch`` (capped at examples x samples),
  halved while bench's sampler or Cohen's loop runs out of device memory (a configuration that still
  runs out, e.g. while compiling, halves its own batch). Cohen's loop passes at most one example's
  samples at a time.
* Models have random weights (``torchvision.models.resnet50(weights=None)``, bench's ``resnet110()``):
  throughput does not depend on the weights. Configurations are timed in interleaved rounds; rates
  are medians, ratios the median of the per-round ratios.

Writes the section "GPU certification" of docs/performance.md. Without CUDA it prints one line and
exits 0 without measuring or writing; ``--dry-run`` runs every step on the CPU with tiny sizes (one
torch thread, no ``torch.compile``: compiling ResNet-110 takes about a minute on a CPU) and writes
nothing. Exit status 1 if bench's float32 votes and Cohen's loop disagree beyond sampling noise.

    python benchmarks/gpu.py [--no-write] [--model resnet110 --model resnet50] [--batch B]
                             [--peak-tflops X | --peak-tflops bf16=X ...] [--dry-run]
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402
from certify import reference_counts  # noqa: E402

NO_CUDA = "no CUDA device: nothing measured (run on a GPU machine)"
SIGMA = 0.25
REFERENCE = "Cohen et al.'s loop"

# Dense (no structured sparsity) peak TFLOP/s by device-name pattern (first match wins; matched against
# torch.cuda.get_device_name), per precision the convolutions run in. Datasheets quote tensor-core figures
# "with sparsity" (footnote *); the dense figure is half of that. Devices or precisions not listed are unknown.
PEAKS: tuple[tuple[str, str, dict[str, float]], ...] = (
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: FP32 67; TF32 Tensor Core 989* and
    # BF16 Tensor Core 1,979* (with sparsity).
    (r"\bH200\b(?!.*\bNVL\b)", "H200 SXM", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5}),
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: FP32 67; TF32 989*; BF16 1,979*.
    (r"\bH100\b(?!.*\b(PCIe|NVL)\b)", "H100 SXM", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5}),
    # same datasheet, H100 PCIe column: FP32 51; TF32 756*; BF16 1,513*.
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5}),
    # NVIDIA A100 Tensor Core GPU datasheet (40/80 GB, SXM and PCIe): FP32 19.5; TF32 156 (312*); BF16 312 (624*).
    (r"\bA100\b", "A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    # NVIDIA A10 datasheet: FP32 31.2; TF32 62.5 (125*); BF16 125 (250*). Not the A10G (other clocks).
    (r"\bA10\b", "A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0}),
    # NVIDIA L4 datasheet: FP32 30.3; TF32 120*; BF16 242*.
    (r"\bL4\b", "L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0}),
    # NVIDIA Ada Lovelace GPU architecture whitepaper, appendix table, GeForce RTX 4090: FP32 82.6; TF32 Tensor
    # 82.6 (165.2*); BF16 Tensor with FP32 accumulate (as autocast does) 165.2 (330.4*).
    (r"\bGeForce RTX 4090$", "GeForce RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2}),
    # NVIDIA Tesla V100 datasheet: FP32 15.7 (SXM2), 14 (PCIe). Volta has no TF32 or BF16 tensor cores.
    (r"\bV100-SXM2\b", "V100 SXM2", {"fp32": 15.7}),
    (r"\bV100-PCIE\b", "V100 PCIe", {"fp32": 14.0}),
    # NVIDIA T4 datasheet: FP32 8.1. Turing has no TF32 or BF16 tensor cores.
    (r"\bT4\b", "T4", {"fp32": 8.1}),
)


def lookup_peak(device_name: str, precision: str) -> tuple[str, float] | None:
    """(table label, dense peak TFLOP/s) of the first :data:`PEAKS` entry whose pattern matches
    ``device_name`` (case-insensitive), for ``precision``; None when the device or precision is not listed."""
    for pattern, label, peaks in PEAKS:
        if re.search(pattern, device_name.strip(), re.I):
            return (label, peaks[precision]) if precision in peaks else None
    return None


def parse_peaks(values: Sequence[str]) -> dict[str, float]:
    """``--peak-tflops`` values: ``X`` (every precision, key ``*``) or ``PRECISION=X`` (fp32, tf32, bf16)."""
    peaks: dict[str, float] = {}
    for value in values:
        precision, _, number = value.rpartition("=")
        precision = precision.strip().lower() or "*"
        if precision not in ("*", "fp32", "tf32", "bf16"):
            raise argparse.ArgumentTypeError(f"--peak-tflops {value!r}: the precision must be fp32, tf32 or bf16")
        try:
            peaks[precision] = float(number)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--peak-tflops {value!r}: not a number of TFLOP/s") from None
        if not peaks[precision] > 0:
            raise argparse.ArgumentTypeError(f"--peak-tflops {value!r}: must be positive")
    return peaks


def count_macs(model: nn.Module, shape: Sequence[int]) -> int:
    """Multiply-adds per sample of ``model``'s Conv2d and Linear layers, counted with forward hooks on one
    forward pass of a batch of one (on the CPU, in float32). Conv2d: output elements x in_channels / groups
    x kernel height x kernel width; Linear: output elements x in_features. Other layers count 0.

    Cross-check against the known figures, ResNet-50 at 224 px about 4.1 G and CIFAR ResNet-110 about 0.25 G:
    this counter gives 4,089,184,256 (torchvision's resnet50) and 252,887,680 (bench's resnet110).
    """
    total = 0

    def hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    finally:
        for handle in handles:
            handle.remove()
    return total


def cifar_resnet110(size: int = 32) -> nn.Module:
    """bench's CIFAR ResNet-110 (random weights) behind CIFAR-10 normalization, 10 classes."""
    from bench.models.cifar_resnet import resnet110
    from bench.models.defended import DefendedModel
    from bench.models.names import NORMALIZE_PRESETS

    mean, std = NORMALIZE_PRESETS["cifar10"]
    return DefendedModel(resnet110(), mean, std, (3, size, size), 10).eval()


def imagenet_resnet50(size: int = 224) -> nn.Module:
    """torchvision's ResNet-50 (``weights=None``: random weights) behind ImageNet normalization, 1000 classes."""
    from torchvision.models import resnet50

    from bench.models.defended import DefendedModel
    from bench.models.names import NORMALIZE_PRESETS

    mean, std = NORMALIZE_PRESETS["imagenet"]
    return DefendedModel(resnet50(weights=None), mean, std, (3, size, size), 1000).eval()


# name: (builder, image size, image size in --dry-run, default samples per example, title). The default samples
# per example are powers of two, so that with the default 4 examples every power-of-two batch up to the total
# divides it: bench's compiled model always runs full batches (the last pass is padded), and padding would
# charge torch.compile for samples that are not counted.
MODELS: dict[str, tuple[Callable[[int], nn.Module], int, int, int, str]] = {
    "resnet110": (cifar_resnet110, 32, 32, 32_768, "CIFAR ResNet-110"),
    "resnet50": (imagenet_resnet50, 224, 32, 4_096, "ImageNet ResNet-50"),
}


@dataclass(frozen=True)
class Config:
    """One way of calling bench's sampler: ``amp`` (bf16 autocast), ``compile`` (True/False),
    ``own_batch`` (the measured batch; False: bench's default, ``batch=None``)."""

    name: str
    amp: bool = False
    compile: bool = False
    own_batch: bool = True


CONFIGS = (Config("fp32 eager"), Config("fp32 eager, bench's default batch", own_batch=False),
           Config("bf16 autocast", amp=True), Config("fp32 torch.compile", compile=True))


@dataclass
class Row:
    """One configuration's measurement: samples/s (median over rounds) and its speed relative to Cohen's loop."""

    name: str
    precision: str
    batch: int
    rate: float = 0.0
    ratio: float = 1.0
    low: float = 1.0
    high: float = 1.0
    note: str = ""


@dataclass
class ModelResult:
    """Everything measured for one model."""

    key: str
    title: str
    shape: tuple[int, ...]
    macs: int
    examples: int
    num: int
    batch: int
    rounds: int
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    compile_s: float | None = None
    share_gap: float = 0.0

    @property
    def flops(self) -> int:
        """FLOPs per sample: 2 x multiply-adds."""
        return 2 * self.macs


def fp32_precision(device: torch.device) -> str:
    """The precision float32 convolutions run in on ``device``: ``tf32`` on Ampere and later while
    ``torch.backends.cudnn.allow_tf32`` (PyTorch's default), else ``fp32``."""
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32 and torch.cuda.get_device_capability(device)[0] >= 8:
        return "tf32"
    return "fp32"


def is_oom(exc: BaseException) -> bool:
    """A CUDA allocation failure (PyTorch's OutOfMemoryError, or cuDNN failing to allocate its workspace)."""
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


def fit_batch(model: nn.Module, x: torch.Tensor, start: int, classes: int) -> int:
    """The largest batch, halving from ``start``, at which one pass of bench's sampler (float32 eager)
    and of Cohen's loop runs on ``x``'s CUDA device without running out of memory; ``start`` on a CPU."""
    from bench.certifiers.smoothing import sample_counts

    batch = start
    while x.device.type == "cuda":
        try:
            sample_counts(model, x[:1], batch, SIGMA, batch=batch, compile=False)
            reference_counts(model, x[:1], batch, SIGMA, classes, batch=batch)
            break
        except RuntimeError as exc:
            if batch == 1 or not is_oom(exc):
                raise
            torch.cuda.empty_cache()
            batch //= 2
    return batch


def timed(run: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Wall seconds of ``run()`` with the device synchronized before and after, and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


class _Warnings(logging.Handler):
    """Collects the warnings bench's compile step logs (why it fell back to eager sampling)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _warm_up(run: Callable[[torch.Tensor, int], object], x: torch.Tensor, width: int) -> tuple[float | None, str]:
    """Seconds of one pass at ``width`` on ``x[:1]`` (None: out of device memory, also inside the compile
    step) and the first warning bench's compile step logged ("" if none)."""
    compile_log = logging.getLogger("bench.models.compiled")
    caught = _Warnings()
    compile_log.addHandler(caught)
    try:
        seconds, _ = timed(lambda: run(x[:1], width), x.device)
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
        return None, ""
    finally:
        compile_log.removeHandler(caught)
    warning = caught.messages[0] if caught.messages else ""
    return (None if "OutOfMemoryError" in warning or "out of memory" in warning else seconds), warning


def _prepare(model: nn.Module, x: torch.Tensor, num: int, batch: int, config: Config, result: ModelResult
             ) -> tuple[Row, Callable[[], object]] | None:
    """One configuration, warmed up (one pass at its batch; the compilation, for ``compile``, timed apart):
    its row and the call to time. Out of device memory, a configuration at the measured batch retries at
    half the batch (its row shows the batch it ran at); at batch 1, or at bench's default batch, it is
    recorded in ``result.skipped`` and None returned."""
    from bench.certifiers.smoothing import auto_batch, sample_counts
    from bench.models.compiled import CompileCache

    width = batch if config.own_batch else auto_batch(x)
    while True:
        cache = CompileCache() if config.compile else None

        def run(examples: torch.Tensor, samples: int, cache: CompileCache | None = cache, width: int = width
                ) -> torch.Tensor:
            return sample_counts(model, examples, samples, SIGMA, batch=width if config.own_batch else None,
                                 amp=config.amp, compile=config.compile, cache=cache)

        seconds, warning = _warm_up(run, x, width)
        if seconds is not None:
            break
        torch.cuda.empty_cache()
        if width == 1 or not config.own_batch:
            result.skipped[config.name] = f"out of memory at batch {width}"
            return None
        width //= 2
    precision = "bf16" if config.amp and x.device.type == "cuda" else fp32_precision(x.device)
    row = Row(config.name, precision, width, note="" if precision == "bf16" or not config.amp else "no-op on CPU")
    if cache is not None:
        result.compile_s = seconds
        if cache.forward_for(model, x) is None:  # the cached outcome: compilation failed or disagreed
            row.note = warning or "torch.compile failed or disagreed; sampling runs eagerly"
    return row, lambda: run(x, num)


def measure_model(model: nn.Module, x: torch.Tensor, num: int, batch: int, rounds: int, configs: Sequence[Config],
                  classes: int, result: ModelResult) -> ModelResult:
    """Samples/s of each configuration of bench's sampler and of Cohen's loop (at ``batch``) on ``x``, in
    ``rounds`` interleaved rounds after a warm-up; fills ``result.rows`` (the reference row last) and
    ``result.share_gap`` (largest vote-share difference between bench's first configuration and Cohen's loop)."""
    prepared = [p for p in (_prepare(model, x, num, batch, c, result) for c in configs) if p is not None]
    reference = Row(REFERENCE, fp32_precision(x.device), min(batch, num))  # one example at a time

    def cohen() -> np.ndarray:
        return np.stack([reference_counts(model, x[i:i + 1], num, SIGMA, classes, batch=batch) for i in range(len(x))])

    timed(lambda: reference_counts(model, x[:1], batch, SIGMA, classes, batch=batch), x.device)  # warm-up
    calls = [*prepared, (reference, cohen)]
    seconds: list[list[float]] = [[] for _ in calls]
    last: list[object] = [None] * len(calls)
    for _ in range(rounds):
        for i, (_row, run) in enumerate(calls):
            spent, last[i] = timed(run, x.device)
            seconds[i].append(spent)
    total = len(x) * num
    for (row, _run), times in zip(calls, seconds):
        ratios = [r / s for r, s in zip(seconds[-1], times)]
        row.rate = total / float(np.median(times))
        row.ratio, row.low, row.high = float(np.median(ratios)), min(ratios), max(ratios)
        result.rows.append(row)
    if prepared:
        ours, theirs = np.asarray(last[0], dtype=float), np.asarray(last[-1], dtype=float)
        result.share_gap = float(np.abs(ours / num - theirs / num).max())
    return result


def share_tolerance(num: int) -> float:
    """Largest vote-share gap between two independent samplers of the same distribution that is
    still sampling noise: 6 standard deviations of a difference of two shares at p = 1/2."""
    return 6 * math.sqrt(0.5 / num)


def peak_for(device_name: str, precision: str, given: dict[str, float]) -> tuple[str, float] | None:
    """The peak for ``precision``: ``--peak-tflops`` first (its precision, then ``*``), then :data:`PEAKS`."""
    if precision in given or "*" in given:
        return "--peak-tflops", given.get(precision, given.get("*", 0.0))
    return lookup_peak(device_name, precision)


def describe(result: ModelResult, row: Row, device_name: str, given: dict[str, float]) -> str:
    """One printed line for ``row``."""
    achieved = row.rate * result.flops / 1e12
    peak = peak_for(device_name, row.precision, given)
    bound = (f"{achieved / peak[1]:.1%} of the {row.precision} peak ({peak[1]:g} TFLOP/s, {peak[0]})" if peak
             else f"fraction of peak unknown ({row.precision} peak of {device_name!r} not in the table; "
                  "give --peak-tflops)")
    extra = f"; {row.note}" if row.note else ""
    ratio = "the reference" if row.name == REFERENCE else f"{row.ratio:.2f}x {REFERENCE} ({row.low:.2f}-{row.high:.2f})"
    return (f"{result.title} {row.name} (batch {row.batch}): {row.rate:,.0f} samples/s, {achieved:.2f} TFLOP/s, "
            f"{bound}, {ratio}{extra}")


def device_description(device: torch.device) -> str:
    """The device's name, memory and software stack, for the report."""
    if device.type != "cuda":
        return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"
    props = torch.cuda.get_device_properties(device)
    tf32 = "allowed" if torch.backends.cudnn.allow_tf32 else "off"
    tuning = "on" if torch.backends.cudnn.benchmark else "off"
    return (f"{props.name} (compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB), "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
            f"TF32 in cuDNN convolutions {tf32}, cudnn.benchmark {tuning}")


def report_section(results: list[ModelResult], device_name: str, description: str, given: dict[str, float]) -> str:
    """The body of the section "GPU certification": one table row per configuration and model, then notes."""
    lines = []
    for r in results:
        for row in r.rows:
            peak = peak_for(device_name, row.precision, given)
            achieved = row.rate * r.flops / 1e12
            fraction = f"{achieved / peak[1]:.1%}" if peak else "unknown"
            peak_text = f"{peak[1]:g} ({row.precision}, {peak[0]})" if peak else f"unknown ({row.precision})"
            note = f" ({row.note})" if row.note else ""
            ratio = "reference" if row.name == REFERENCE else f"{row.ratio:.2f}x ({row.low:.2f}-{row.high:.2f})"
            lines.append(f"| {r.title} | {row.name}{note} | {row.batch:,} | {row.rate:,.0f} | {achieved:.2f} | "
                         f"{peak_text} | {fraction} | {ratio} |\n")
        lines.extend(f"| {r.title} | {config} | | {why} | | | | |\n" for config, why in r.skipped.items())
    models = "; ".join(f"{r.title} {'x'.join(map(str, r.shape))}: {r.flops / 1e9:.3f} GFLOPs per sample, "
                       f"{r.examples} examples x {r.num:,} samples, {r.rounds} rounds" for r in results)
    compiles = ", ".join(f"{r.compile_s:.0f} s ({r.title})" for r in results if r.compile_s is not None)
    return (
        f"Measured by `benchmarks/gpu.py` on {datetime.now(timezone.utc):%Y-%m-%d}, {description}.\n\n"
        "| model | configuration | batch | samples/s | TFLOP/s | peak TFLOP/s (precision, source) | fraction of peak "
        "| vs Cohen's loop |\n| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |\n" + "".join(lines) + "\n"
        f"{models}. The models have random weights (throughput does not depend on them). FLOPs are 2 x the\n"
        "multiply-adds of the convolution and linear layers (forward hooks, one pass); the FLOP-bound rate is\n"
        "peak / FLOPs per sample, with the dense datasheet peak for the precision the convolutions ran in\n"
        "(`PEAKS` in benchmarks/gpu.py cites each figure) or `--peak-tflops`; \"unknown\": the device is not in\n"
        "the table. Configurations ran in interleaved rounds: rates are medians, the ratio to Cohen's loop (one\n"
        "example at a time, float32, at most one example's samples per pass) is the median of the per-round\n"
        "ratios, lowest and highest in parentheses. bench's noise buffer is channels-last on CUDA in every\n"
        "configuration; autocast and compile do not combine in bench.\n"
        f"Largest vote-share gap between bench (float32) and Cohen's loop: {max(r.share_gap for r in results):.3f}."
        + (f" One-time compilation: {compiles}.\n" if compiles else "\n"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; do not update docs/performance.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every step on the CPU with tiny sizes (no torch.compile); writes nothing")
    parser.add_argument("--model", action="append", choices=sorted(MODELS), help="models to measure (default: both)")
    parser.add_argument("--examples", type=int, default=4, help="examples certified per call")
    parser.add_argument("--num", type=int, help="samples per example (default: 32,768 ResNet-110, 4,096 ResNet-50)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--batch", type=int, help="samples per forward pass (default: the largest that fits)")
    parser.add_argument("--max-batch", type=int, default=8192, help="where the search for the largest batch starts")
    parser.add_argument("--peak-tflops", action="append", default=[], metavar="[PRECISION=]X",
                        help="device peak in TFLOP/s, for every precision or for fp32, tf32 or bf16 (repeatable)")
    args = parser.parse_args(argv)
    try:
        args.peaks = parse_peaks(args.peak_tflops)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    for name in ("examples", "num", "rounds", "batch", "max_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def run_model(key: str, args: argparse.Namespace, device: torch.device) -> ModelResult:
    """Build, count and measure one model on ``device`` (sizes per ``args``, tiny under ``--dry-run``)."""
    from bench.capabilities import capability

    build, size, dry_size, default_num, title = MODELS[key]
    size = dry_size if args.dry_run else size
    examples, num = (2, 64) if args.dry_run else (args.examples, args.num or default_num)
    model = build(size)
    macs = count_macs(model, (3, size, size))
    model = model.to(device)
    x = torch.rand(examples, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    classes = int(capability(model, "num_classes"))
    batch = args.batch or (32 if args.dry_run else fit_batch(model, x, min(args.max_batch, examples * num), classes))
    configs = [c for c in CONFIGS if not (args.dry_run and c.compile)]
    result = ModelResult(key, title, (3, size, size), macs, examples, num, batch, 1 if args.dry_run else args.rounds)
    if args.dry_run:
        result.skipped["fp32 torch.compile"] = "skipped in --dry-run"
    return measure_model(model, x, num, batch, result.rounds, configs, classes, result)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    device = torch.device("cpu") if args.dry_run else torch.device("cuda")
    if args.dry_run:
        torch.set_num_threads(1)
    device_name = "cpu" if args.dry_run else torch.cuda.get_device_name(device)
    print(f"device: {device_description(device)}", flush=True)
    results = []
    for key in args.model or list(MODELS):
        result = run_model(key, args, device)
        print(f"{result.title}: {result.flops / 1e9:.3f} GFLOPs per sample (2 x {result.macs:,} multiply-adds), "
              f"{result.examples} examples x {result.num:,} samples, batch {result.batch}", flush=True)
        for row in result.rows:
            print(describe(result, row, device_name, args.peaks), flush=True)
        for config, why in result.skipped.items():
            print(f"{result.title} {config}: {why}", flush=True)
        if result.compile_s is not None:
            print(f"{result.title}: one-time torch.compile {result.compile_s:.1f} s", flush=True)
        print(f"{result.title}: largest vote-share gap bench vs {REFERENCE} {result.share_gap:.3f} "
              f"(sampling noise up to {share_tolerance(result.num):.3f})", flush=True)
        results.append(result)
    if args.dry_run or args.no_write:
        print("docs/performance.md not written" + (" (--dry-run)" if args.dry_run else " (--no-write)"))
    else:
        write_section("GPU certification", report_section(results, device_name, device_description(device),
                                                          args.peaks))
    return 0 if all(r.share_gap <= share_tolerance(r.num) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

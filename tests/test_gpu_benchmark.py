"""benchmarks/gpu.py: the FLOP counter, the peak table, the CPU paths (no CUDA, --dry-run) and, on a GPU,
a small real run."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    """benchmarks/gpu.py as a module (it puts benchmarks/ on sys.path to import _report and certify)."""
    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    yield module
    sys.modules.pop(spec.name, None)


def tiny_model(classes: int = 3) -> nn.Module:
    from bench.models.defended import DefendedModel

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, classes))
    return DefendedModel(net, (0.5,) * 3, (0.25,) * 3, (3, 4, 4), classes).eval()


def test_the_flop_counter_counts_convolutions_and_linear_layers_by_hand(gpu):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, stride=2, padding=1, groups=2), nn.Flatten(), nn.Linear(36, 7)).eval()
    # 8x5x5 outputs x 3 x 3x3 + 4x3x3 outputs x (8 / 2 groups) x 3x3 + 7 outputs x 36 inputs
    assert gpu.count_macs(model, (3, 5, 5)) == 200 * 27 + 36 * 36 + 7 * 36
    assert not any(m._forward_hooks for m in model.modules())  # the hooks are removed


def test_the_flop_counter_matches_the_known_resnet_figures(gpu, one_thread):
    # known figures: ResNet-50 at 224 px about 4.1 G multiply-adds, CIFAR ResNet-110 about 0.25 G
    resnet50 = gpu.count_macs(gpu.imagenet_resnet50(), (3, 224, 224))
    resnet110 = gpu.count_macs(gpu.cifar_resnet110(), (3, 32, 32))
    assert abs(resnet50 / 4.1e9 - 1) < 0.10
    assert abs(resnet110 / 0.25e9 - 1) < 0.10


@pytest.mark.parametrize("name, precision, want", [
    ("NVIDIA H200", "bf16", ("H200 SXM", 989.5)),
    ("NVIDIA H100 80GB HBM3", "tf32", ("H100 SXM", 494.5)),
    ("NVIDIA H100 PCIe", "bf16", ("H100 PCIe", 756.5)),
    ("NVIDIA A100-SXM4-80GB", "fp32", ("A100", 19.5)),
    ("NVIDIA A10", "bf16", ("A10", 125.0)),
    ("NVIDIA GeForce RTX 4090", "bf16", ("GeForce RTX 4090", 165.2)),
    ("Tesla V100-SXM2-16GB", "fp32", ("V100 SXM2", 15.7)),
    ("Tesla T4", "fp32", ("T4", 8.1)),
    ("NVIDIA L4", "tf32", ("L4", 60.0)),
])
def test_known_devices_get_their_datasheet_peak(gpu, name, precision, want):
    assert gpu.lookup_peak(name, precision) == want


@pytest.mark.parametrize("name, precision", [
    ("NVIDIA H100 NVL", "bf16"), ("NVIDIA H200 NVL", "bf16"), ("NVIDIA A10G", "fp32"), ("NVIDIA L40S", "fp32"),
    ("NVIDIA GeForce RTX 4090 D", "fp32"), ("Tesla T4", "bf16"), ("Tesla V100S-PCIE-32GB", "fp32"), ("cpu", "fp32"),
])
def test_unlisted_devices_and_precisions_are_unknown(gpu, name, precision):
    assert gpu.lookup_peak(name, precision) is None


def test_a_given_peak_overrides_the_table(gpu):
    peaks = gpu.parse_peaks(["bf16=100", "7.5"])
    assert peaks == {"bf16": 100.0, "*": 7.5}
    assert gpu.peak_for("NVIDIA H200", "bf16", peaks) == ("--peak-tflops", 100.0)
    assert gpu.peak_for("NVIDIA H200", "tf32", peaks) == ("--peak-tflops", 7.5)
    assert gpu.peak_for("NVIDIA H200", "tf32", {}) == ("H200 SXM", 494.5)
    for bad in ("fp8=3", "bf16=fast", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            gpu.parse_peaks([bad])


def test_without_cuda_it_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "no CUDA device: nothing measured (run on a GPU machine)\n"


def test_without_cuda_nothing_is_measured_or_written(gpu, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "write_section", lambda *a, **k: pytest.fail("docs/performance.md written"))
    monkeypatch.setattr(gpu, "run_model", lambda *a, **k: pytest.fail("measured without CUDA"))
    assert gpu.main(["--model", "resnet110"]) == 0
    assert capsys.readouterr().out == gpu.NO_CUDA + "\n"


def _measure(gpu, configs):
    model, x = tiny_model(), torch.rand(2, 3, 4, 4)
    result = gpu.ModelResult("tiny", "tiny", (3, 4, 4), gpu.count_macs(model, (3, 4, 4)), 2, 300, 128, 2)
    return gpu.measure_model(model, x, 300, 128, 2, configs, 3, result)


def test_measure_times_every_configuration_and_the_reference_last(gpu, one_thread):
    result = _measure(gpu, [gpu.Config("fp32 eager"), gpu.Config("default batch", own_batch=False)])
    assert [r.name for r in result.rows] == ["fp32 eager", "default batch", gpu.REFERENCE]
    assert [r.batch for r in result.rows] == [128, 512, 128]  # bench's CPU default batch is 512
    assert all(r.rate > 0 and r.low <= r.ratio <= r.high for r in result.rows)
    assert result.rows[-1].ratio == 1.0
    assert result.share_gap <= gpu.share_tolerance(300)
    assert result.compile_s is None and not result.skipped


def test_the_compiled_configuration_is_timed_apart_and_reports_a_fallback(gpu, one_thread, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # compiles instantly
    ok = _measure(gpu, [gpu.Config("compiled", compile=True)])
    assert ok.compile_s is not None and ok.rows[0].note == ""

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    failed = _measure(gpu, [gpu.Config("compiled", compile=True)])
    assert failed.rows[0].note == "torch.compile failed (RuntimeError: no C++ compiler); sampling runs eagerly"


def test_out_of_memory_halves_the_batch_then_skips_and_other_errors_propagate(gpu, one_thread, monkeypatch):
    import bench.certifiers.smoothing as smoothing

    real = smoothing.sample_counts

    def small_batches_only(model, x, num, sigma, batch=None, **kwargs):
        if (batch or 512) > 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, x, num, sigma, batch, **kwargs)

    monkeypatch.setattr(smoothing, "sample_counts", small_batches_only)
    result = _measure(gpu, [gpu.Config("fp32 eager"), gpu.Config("default", own_batch=False)])
    assert [(r.name, r.batch) for r in result.rows] == [("fp32 eager", 32), (gpu.REFERENCE, 128)]
    assert result.skipped == {"default": "out of memory at batch 512"}  # bench's own batch is not changed
    monkeypatch.setattr(smoothing, "sample_counts", lambda *a, **k: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("CUDA out of memory")))
    assert _measure(gpu, [gpu.Config("fp32 eager")]).skipped == {"fp32 eager": "out of memory at batch 1"}
    monkeypatch.setattr(smoothing, "sample_counts", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        _measure(gpu, [gpu.Config("fp32 eager")])


def test_a_compile_that_runs_out_of_memory_retries_at_half_the_batch(gpu, one_thread, monkeypatch):
    def compile_within_64(model, **kwargs):
        def forward(x):
            if len(x) > 64:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
            return model(x)
        return forward

    monkeypatch.setattr(torch, "compile", compile_within_64)
    result = _measure(gpu, [gpu.Config("compiled", compile=True)])
    assert (result.rows[0].batch, result.rows[0].note) == (64, "")
    assert result.compile_s is not None


def test_dry_run_measures_everything_on_the_cpu_and_writes_nothing():
    # write_section replaced by a refusal before the script imports it: a write ends the run with status 3
    code = ("import runpy, sys; sys.path.insert(0, 'benchmarks'); import _report\n"
            "def refuse(*args, **kwargs): raise SystemExit(3)\n"
            "_report.write_section = refuse\n"
            "sys.argv = ['benchmarks/gpu.py', '--dry-run', '--peak-tflops', '1']\n"
            "runpy.run_path('benchmarks/gpu.py', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for title in ("CIFAR ResNet-110", "ImageNet ResNet-50"):
        for config in ("fp32 eager (batch 32)", "fp32 eager, bench's default batch (batch 512)",
                       "bf16 autocast (batch 32)", "Cohen et al.'s loop (batch 32)"):
            assert f"{title} {config}: " in out and "of the fp32 peak (1 TFLOP/s, --peak-tflops)" in out
        assert f"{title} fp32 torch.compile: skipped in --dry-run" in out
    assert "0.506 GFLOPs per sample" in out  # ResNet-110 at 32 px
    assert out.rstrip().endswith("docs/performance.md not written (--dry-run)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_small_real_run_on_cuda():
    done = subprocess.run([sys.executable, str(SCRIPT), "--no-write", "--model", "resnet110", "--examples", "2",
                           "--num", "2048", "--rounds", "1", "--max-batch", "2048"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"device: {torch.cuda.get_device_name()}" in out
    for config in ("fp32 eager (batch 2048)", "bf16 autocast (batch 2048)", "fp32 torch.compile (batch 2048)",
                   "Cohen et al.'s loop (batch 2048)"):
        assert f"CIFAR ResNet-110 {config}: " in out
    if torch.cuda.is_bf16_supported():
        assert "of the bf16 peak" in out or "bf16 peak of" in out
    assert "docs/performance.md not written (--no-write)" in out


def test_the_report_gives_each_configuration_its_fraction_of_the_peak(gpu):
    result = gpu.ModelResult("resnet110", "CIFAR ResNet-110", (3, 32, 32), 500_000_000, 4, 1024, 256, 3)
    result.rows = [gpu.Row("fp32 eager", "tf32", 256, rate=2000.0, ratio=2.5, low=2.0, high=3.0),
                   gpu.Row("bf16 autocast", "bf16", 256, rate=4000.0, ratio=5.0, low=4.0, high=6.0),
                   gpu.Row(gpu.REFERENCE, "tf32", 256, rate=800.0)]
    result.skipped = {"fp32 torch.compile": "out of memory at batch 1"}
    text = gpu.report_section([result], "NVIDIA A100-SXM4-40GB", "A100, torch x", {})
    # 2,000 samples/s x 1 GFLOP = 2 TFLOP/s of A100's dense TF32 156; 4 TFLOP/s of its BF16 312
    assert "| CIFAR ResNet-110 | fp32 eager | 256 | 2,000 | 2.00 | 156 (tf32, A100) | 1.3% | 2.50x (2.00-3.00) |" \
        in text
    assert "| CIFAR ResNet-110 | bf16 autocast | 256 | 4,000 | 4.00 | 312 (bf16, A100) | 1.3% | 5.00x" in text
    assert f"| CIFAR ResNet-110 | {gpu.REFERENCE} | 256 | 800 | 0.80 | 156 (tf32, A100) | 0.5% | reference |" in text
    assert "| CIFAR ResNet-110 | fp32 torch.compile | | out of memory at batch 1 |" in text
    unknown = gpu.report_section([result], "NVIDIA B300", "?", {})
    assert "| unknown (tf32) | unknown |" in unknown and "%" not in unknown.split("\n\n")[1]

"""The plan of a run, progress with stage numbers and an ETA from measured throughput (terminal and
log lines), ``--threads`` / ``$BENCH_THREADS`` with the oversubscription warning, and ``--dry-run``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from bench import progress as progress_module
from bench.cli import app
from bench.config import RunConfig
from bench.device import configure_allocator, configure_threads, oversubscribed
from bench.errors import BenchError
from bench.harness.plan import AUTOATTACK, build_plan, estimate
from bench.harness.resolve import resolve
from bench.progress import Progress, eta_text
from helpers import assert_cli_user_error

runner = CliRunner()
FAST = ["--dataset", "synthetic", "--eps", "0.1", "--steps", "3", "-n", "16", "--epochs", "1"]


def test_eta_comes_from_the_mean_throughput():
    assert eta_text(0, 100, 5.0) == ""  # nothing done yet: no rate to extrapolate
    assert eta_text(10, 100, 5.0) == "2/s, ETA 0:00:45"
    assert eta_text(1, 1000, 60.0) == "1/min, ETA 16:39:00"
    assert eta_text(3, None, 1.0) == "3/s"


class _Console:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: str, **_: object) -> None:
        self.lines.append(text)


def test_log_lines_show_an_eta_within_the_first_seconds(monkeypatch):
    clock = iter([0.0, 1.0, 6.0, 20.0, 40.0, 41.0])
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    console = _Console()
    line = progress_module._LineTask(console, "[2/3] clean", 100, interval=30.0, first=5.0)  # started at 0
    line.advance(10)  # t=1: too early for a first line
    line.advance(20)  # t=6: the first line, 5 s after the start, with rate and ETA
    line.advance(10)  # t=20: within the 30 s interval: nothing
    line.advance(10)  # t=40: 34 s after the first line
    assert console.lines == ["[2/3] clean: 30/100 (6 s, 5/s, ETA 0:00:14)",
                             "[2/3] clean: 50/100 (40 s, 1.25/s, ETA 0:00:40)"]


def test_stages_are_numbered_in_plan_order():
    progress = Progress()
    progress.begin_plan(["training", "clean", "pgd Linf 0.1", "pgd L2 0.5"])
    assert progress.numbered("training (64 images, 2 epochs)") == "[1/4] training (64 images, 2 epochs)"
    assert progress.numbered("decoding cifar10/test") == "decoding cifar10/test"  # not a stage
    assert progress.numbered("pgd Linf 0.1") == "[3/4] pgd Linf 0.1"
    assert progress.numbered("clean") == "clean"  # an earlier stage does not come again


def test_the_plan_lists_training_clean_attacks_and_certificates():
    resolved = resolve(RunConfig(defense="pgd-at", dataset="digits"))
    stages = build_plan(resolved, 450)
    assert [s.key for s in stages] == ["training", "clean", "autoattack Linf 0.1", "autoattack L2 0.5"]
    assert stages[2].passes_per_example == AUTOATTACK["standard"] + 1
    seconds = estimate(stages, 1e-4)
    assert seconds[0] is None and seconds[1] == pytest.approx(450 * 1e-4)
    certified = build_plan(resolve(RunConfig(defense="rs", dataset="digits", protocol="certify")), 100)
    assert certified[-1].key == "certify smoothing" and certified[-1].passes_per_example == 100_100


def test_a_randomized_run_plans_its_eot_saturation_checks():
    """DCS under quick@2: each threat model's EOT stage (K=10, PGD-20: 10 x 20 x 3 passes + R=10)
    again and with K and steps doubled (20 x 40 x 3 + 10), on at most 100 examples; a
    smoothed classifier (rs) and a deterministic model plan none."""
    stages = build_plan(resolve(RunConfig(defense="dcs", dataset="digits")), 200)
    checks = [s for s in stages if s.key == "eot_saturation"]
    assert [s.label for s in checks] == ["eot_saturation Linf 0.1", "eot_saturation L2 0.5"]
    assert checks[0].examples == 100 and checks[0].passes_per_example == (600 + 10) + (2400 + 10)
    for defense in ("rs", "standard"):
        assert not any(s.key == "eot_saturation" for s in build_plan(resolve(RunConfig(defense, "digits")), 200))


def test_threads_and_the_oversubscription_warning(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("BENCH_THREADS", "2")
        assert configure_threads(None) == 2
        monkeypatch.setenv("BENCH_THREADS", "many")
        with pytest.raises(BenchError, match=r"invalid \$BENCH_THREADS 'many'"):
            configure_threads(None)
        with pytest.raises(BenchError, match="invalid --threads 0"):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 1.0, 1.0))
    assert "oversubscribed (load average 64.0" in (oversubscribed() or "")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert oversubscribed() is None


def test_allocator_setting_applies_on_glibc_unless_turned_off(monkeypatch):
    import platform
    import sys

    monkeypatch.setenv("BENCH_MALLOC", "default")
    assert configure_allocator() is False  # turned off: nothing is changed
    monkeypatch.delenv("BENCH_MALLOC")
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert configure_allocator() is glibc  # mallopt accepted every setting (C ints in range)


def test_cli_threads_refused_in_one_line(db_url):
    assert_cli_user_error(runner.invoke(app, ["run", "-d", "standard", *FAST, "--threads", "0", "--db", db_url]),
                          "--threads")


def test_run_prints_its_plan_and_numbered_stages(db_url, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))  # an empty cache: the training stage runs
    result = runner.invoke(app, ["run", "-d", "standard", *FAST, "--db", db_url])
    assert result.exit_code == 0, result.stderr
    err = result.stderr
    assert "plan (3 stages):" in err and "1/3 train standard (cpu recipe)" in err
    assert "[2/3] clean: 16/16" in err and "[3/3] pgd Linf 0.1:" in err
    assert err.index("plan (3 stages)") < err.index("[1/3] training")


def test_dry_run_prints_the_plan_and_stores_nothing(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))  # an empty cache: a training would write here
    db = tmp_path / "never.db"
    result = runner.invoke(app, ["run", "-d", "standard", *FAST, "--dry-run", "--db", f"sqlite:///{db}"])
    assert result.exit_code == 0, result.stderr
    assert "configuration (run key" in result.stdout and '"defense": "standard"' in result.stdout
    assert "2/3 clean: 16 examples" in result.stdout and "Nothing was trained or stored" in result.stdout
    assert not db.exists() and not list((tmp_path / "home").rglob("*.pt"))
    as_json = runner.invoke(app, ["run", "-d", "standard", *FAST, "--dry-run", "--json", "--db", f"sqlite:///{db}"])
    shown = json.loads(as_json.stdout)
    assert [stage["stage"] for stage in shown["plan"]][1:] == ["clean", "pgd Linf 0.1"]
    assert shown["seconds_upper_bound"] > 0 and not db.exists()

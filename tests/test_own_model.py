"""Evaluating a user's own model: ``bench.evaluate`` (Python) and ``bench run --model SPEC`` (CLI),
the honest default protocol, checkpoint layouts through the CLI, and every refusal as one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import bench
from bench.cli import app
from bench.config import RunConfig
from bench.data.base import get_dataset
from bench.errors import BenchError
from bench.harness.resolve import resolve
from bench.training.checkpoints import save_checkpoint
from helpers import accuracy, assert_cli_user_error, train_full_batch

runner = CliRunner()


def tiny_net(hidden: int = 16, num_classes: int = 4) -> nn.Module:
    """A factory for ``--model test_own_model:tiny_net`` (synthetic images: 1x8x8, 4 classes)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def failing_net() -> nn.Module:
    raise ValueError("no weights for you")


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.manual_seed(0)
    train = get_dataset("synthetic").load("train", None, 8)
    return train_full_batch(tiny_net(), train, steps=80).eval()


def _test_split():
    return get_dataset("synthetic").load("test", None, 8)


def test_evaluate_runs_the_harness_on_any_module_and_stores_it(trained, db_url, one_thread):
    summary = bench.evaluate(trained, dataset="synthetic", protocol="pgd", db=db_url, name="my-net")
    test = _test_split()
    assert summary["defense"] == "my-net" and summary["protocol"] == "pgd@1"
    assert summary["n_examples"] == len(test)
    assert summary["clean_accuracy"] == pytest.approx(accuracy(trained, test.images, test.labels))
    assert summary["robust_accuracy"] <= summary["clean_accuracy"]
    again = bench.evaluate(trained, dataset="synthetic", protocol="pgd", db=db_url, name="my-net")
    assert again["run_id"] == summary["run_id"]  # the same weights: the stored run, nothing recomputed
    other = tiny_net()
    other_summary = bench.evaluate(other, dataset="synthetic", protocol="clean", db=db_url)
    assert other_summary["run_id"] != summary["run_id"]
    assert other_summary["defense"].startswith("Sequential-")  # named by its weights' hash


def test_the_docs_example_runs(tmp_path, monkeypatch, one_thread):
    """The example of docs/own-model.md as written (a linear model on digits), on 20 examples under
    pgd to keep the suite fast (the full default AutoAttack run is measured by the README's check)."""
    code = (Path(__file__).resolve().parents[1] / "docs" / "own-model.md").read_text()
    block = code.split("```python\n", 1)[1].split("```", 1)[0]
    assert "bench.evaluate(" in block
    monkeypatch.setenv("BENCH_DB", f"sqlite:///{tmp_path / 'docs.db'}")
    namespace: dict = {}
    exec(compile(block.replace('dataset="digits"', 'dataset="digits", n_examples=20, protocol="pgd"'), "doc", "exec"),
         namespace)
    assert 0.0 <= namespace["summary"]["clean_accuracy"] <= 1.0


@pytest.mark.parametrize(("bad", "message"), [
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.Softmax(dim=1)), "returns probabilities"),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), "to shape (4, 10)"),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.Threshold(1e9, float("nan"))), "non-finite logits"),
    (nn.Sequential(nn.Linear(3, 4)), "fails on a batch of shape"),
])
def test_a_model_that_does_not_fit_is_refused_before_anything_is_stored(bad, message, tmp_path):
    url = f"sqlite:///{tmp_path / 'never.db'}"
    with pytest.raises(BenchError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        bench.evaluate(bad, dataset="synthetic", protocol="clean", db=url)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "never.db").exists()
    with pytest.raises(BenchError, match="needs a torch.nn.Module"):
        bench.evaluate("resnet18", dataset="synthetic")  # type: ignore[arg-type]


@pytest.mark.parametrize(("hparams", "protocol", "certifiers"), [
    ({}, "autoattack", ()),
    ({"randomized": True}, "adaptive", ()),
    ({"sigma": 0.25}, "quick", ("smoothing",)),
    ({"lipschitz_bound": 1.0}, "quick", ("lipschitz",)),
])
def test_the_default_protocol_follows_what_the_model_declares(hparams, protocol, certifiers):
    config = RunConfig(defense="model", dataset="synthetic", hparams=tuple(sorted({"name": "m", **hparams}.items())))
    resolved = resolve(config, model_hash="0" * 64)
    assert resolved.protocol.name == protocol
    assert tuple(c.certifier for c in resolved.protocol.certifiers) == certifiers
    assert resolved.label == "m" and not resolved.trains


@pytest.mark.parametrize("defense", ["standard", "pgd-at"])
def test_deterministic_baselines_default_to_autoattack_and_keep_pgd_by_name(defense):
    resolved = resolve(RunConfig(defense=defense, dataset="synthetic"))
    assert resolved.protocol.key == "autoattack@1"
    assert {a.attack for a in resolved.protocol.attacks} == {"autoattack"}
    assert dict(resolved.protocol.attacks[0].params)["version"] == "standard"
    assert resolve(RunConfig(defense=defense, dataset="synthetic", protocol="pgd@1")).protocol.key == "pgd@1"


def _cli(*args: str, db: str):
    return runner.invoke(app, ["run", *args, "--dataset", "synthetic", "--db", db])


def test_cli_model_spec_with_a_dataparallel_checkpoint(trained, tmp_path, db_url, one_thread):
    path = tmp_path / "net.pt"
    torch.save({"net": {f"module.{k}": v for k, v in trained.state_dict().items()}, "epoch": 3}, path)
    result = _cli("--model", "test_own_model:tiny_net", "--model-arg", "hidden=16", "--checkpoint", str(path),
                  "--protocol", "clean", "--name", "dp-net", "--json", db=db_url)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    test = _test_split()
    assert summary["defense"] == "dp-net"
    assert summary["clean_accuracy"] == pytest.approx(accuracy(trained, test.images, test.labels))
    board = runner.invoke(app, ["leaderboard", "--db", db_url, "--dataset", "synthetic", "--format", "md"])
    assert board.exit_code == 0 and "dp-net" in board.stdout, board.stderr


def test_cli_refusals_are_one_line(trained, tmp_path, db_url):
    good = tmp_path / "good.pt"
    torch.save(trained.state_dict(), good)
    wrong = tmp_path / "wrong.pt"
    torch.save(tiny_net(hidden=8).state_dict() | {"extra.weight": torch.zeros(1)}, wrong)
    cases = [
        (["--model", "test_own_model:tiny_net", "--checkpoint", str(wrong)], ["shape mismatch", "unexpected 1 key"]),
        (["--model", "torchvision:resnet19", "--checkpoint", str(good)], ["did you mean", "resnet18"]),
        (["--model", "test_own_model:failing_net", "--checkpoint", str(good)],
         ["the factory raised ValueError: no weights for you"]),
        (["--model", "no_such_module_xyz:net", "--checkpoint", str(good)], ["cannot import module"]),
        (["--model", "test_own_model:tiny_nett", "--checkpoint", str(good)], ["did you mean tiny_net"]),
        (["--model", "test_own_model:tiny_net"], ["not trained by bench", "--checkpoint"]),
        (["--model", "test_own_model:tiny_net", "--defense", "standard", "--checkpoint", str(good)], ["not both"]),
        (["--model", "test_own_model:tiny_net", "--checkpoint", str(good), "--normalize", "0.5/0"], ["--normalize"]),
        (["--defense", "standard", "--name", "x"], ["--model runs only"]),
    ]
    for args, fragments in cases:
        assert_cli_user_error(_cli(*args, "--protocol", "clean", db=db_url), *fragments)
    assert not Path(db_url.removeprefix("sqlite:///")).exists()  # nothing stored by any of them


def test_a_bench_checkpoint_of_another_defense_is_refused(tmp_path, db_url):
    spec = get_dataset("synthetic").spec
    from bench.registry import DEFENSES

    defense = DEFENSES.get("standard")()
    model = defense.build(spec, spec.image_size, **defense.resolve_hparams({}, spec.image_size, "cpu"))
    path = tmp_path / "pgd-at.pt"
    save_checkpoint(path, model.state_dict(), {"defense": "pgd-at", "dataset": "synthetic"})
    result = _cli("--defense", "standard", "--checkpoint", str(path), "--protocol", "clean", db=db_url)
    assert_cli_user_error(result, "trained by bench for defense 'pgd-at', not 'standard'")


SHARED = Path(os.environ.get("BENCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CIFAR_IMAGES = SHARED / "YoongiKim+CIFAR-10-images"


@pytest.mark.skipif(not (CIFAR_IMAGES / "test").is_dir(), reason="../shared/data CIFAR-10 images absent")
def test_torchvision_resnet18_on_cifar10_class_folders(tmp_path, db_url, one_thread):
    """The issue's CLI example: ``--model torchvision:resnet18`` with a checkpoint, on the JPEG
    class-folder test images; the CLI and ``bench.evaluate`` agree on the same weights."""
    from torchvision.models import resnet18

    torch.manual_seed(1)
    net = resnet18(num_classes=10).eval()
    path = tmp_path / "resnet18.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    args = ["run", "--model", "torchvision:resnet18", "--checkpoint", str(path), "--normalize", "cifar10",
            "--dataset", "cifar10", "--data-dir", str(CIFAR_IMAGES), "--protocol", "clean", "-n", "20",
            "--db", db_url, "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["defense"] == "torchvision:resnet18" and summary["n_examples"] == 20
    same = bench.evaluate(net, dataset="cifar10", data_dir=str(CIFAR_IMAGES), protocol="clean", n_examples=20,
                          normalize="cifar10", db=db_url)
    assert same["clean_accuracy"] == summary["clean_accuracy"]

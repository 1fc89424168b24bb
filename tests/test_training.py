"""The shared training loop (bench.training.loop) and checkpoint files (bench.training.checkpoints)."""

from __future__ import annotations

import collections
import hashlib
import math
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bench.data.base import Split, get_dataset
from bench.defenses.base import Recipe
from bench.errors import CheckpointError
from bench.registry import DEFENSES
from bench.training.checkpoints import load_into, read_checkpoint, save_checkpoint, sha256_file
from bench.training.loop import TrainSummary, fit, make_optimizer, make_scheduler
from helpers import ModeRecorder, accuracy, linear_model

CPU = torch.device("cpu")
TINY = Recipe(epochs=3, batch_size=32, optimizer="adam", lr=1e-2, weight_decay=0, schedule="none")


@pytest.fixture(autouse=True)
def _home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def train() -> Split:
    return get_dataset("synthetic").load("train")


def mean_loss(model: nn.Module, data: Split) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(data.images), data.labels))


# -- fit -------------------------------------------------------------------------------------
def test_fit_lowers_loss_and_learns(train: Split) -> None:
    model = linear_model(0)
    before = mean_loss(model, train)
    summary = fit(model, train, TINY, device=CPU, seed=0)
    assert isinstance(summary, TrainSummary)
    after = mean_loss(model, train)
    assert after < 0.5 * before
    losses = [h["loss"] for h in summary.history]
    assert losses[-1] < losses[0]
    assert summary.final_train_accuracy >= 0.75  # chance is 0.25 (4 classes)
    assert accuracy(model, train.images, train.labels) >= 0.75
    assert summary.epochs == 3 and len(summary.history) == 3
    assert summary.steps == 3 * math.ceil(256 / 32)
    assert summary.final_loss == losses[-1]
    assert [h["epoch"] for h in summary.history] == [1, 2, 3]
    assert summary.seconds >= 0
    assert set(summary.to_dict()) >= {"epochs", "steps", "seconds", "final_loss", "final_train_accuracy", "history"}


def test_fit_counts_partial_batches(train: Split) -> None:
    summary = fit(linear_model(0), train, Recipe(epochs=2, batch_size=100, optimizer="adam", lr=1e-2,
                                                 schedule="none"), device=CPU)
    assert summary.steps == 2 * 3  # 100 + 100 + 56


def test_fit_same_seed_same_weights(train: Split) -> None:
    a, b = linear_model(0), linear_model(0)
    fit(a, train, TINY, device=CPU, seed=5)
    fit(b, train, TINY, device=CPU, seed=5)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fit_different_seed_different_weights(train: Split) -> None:
    a, b = linear_model(0), linear_model(0)
    fit(a, train, TINY, device=CPU, seed=0)
    fit(b, train, TINY, device=CPU, seed=1)
    assert not torch.equal(a.net[1].weight, b.net[1].weight)


def test_fit_leaves_model_in_eval_mode(train: Split) -> None:
    model = linear_model(0)
    model.train()
    fit(model, train, Recipe(epochs=1, batch_size=128, optimizer="adam", lr=1e-2, schedule="none"), device=CPU)
    assert model.training is False
    assert not any(m.training for m in model.modules())


def test_fit_trains_in_train_mode(train: Split) -> None:
    model = linear_model(0)
    recorder = ModeRecorder()
    model.net.append(recorder)
    model.eval()
    fit(model, train, Recipe(epochs=1, batch_size=128, optimizer="adam", lr=1e-2, schedule="none"), device=CPU)
    assert recorder.modes == [True, True]  # two training batches, both in train mode


def test_fit_uses_the_perturbed_batch(train: Split) -> None:
    calls: list[int] = []

    def blank(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return torch.zeros_like(x)  # no information left: the model cannot beat chance

    model = linear_model(0)
    summary = fit(model, train, TINY, device=CPU, perturb=blank)
    assert len(calls) == summary.steps and sum(calls) == 3 * 256
    assert summary.final_train_accuracy <= 0.4
    assert accuracy(model, train.images, train.labels) <= 0.4


def test_fit_calls_perturb_in_eval_mode(train: Split) -> None:
    modes: list[bool] = []

    def record(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        modes.append(model.training)
        return x

    fit(linear_model(0), train, Recipe(epochs=1, batch_size=64, optimizer="adam", lr=1e-2, schedule="none"),
        device=CPU, perturb=record)
    assert modes == [False] * 4


def test_defense_fit_pgd_at_runs_adversarial_training(train: Split) -> None:
    from bench.data.base import get_dataset

    spec = get_dataset("synthetic").spec
    model = linear_model(0)
    recipe = Recipe(epochs=2, batch_size=64, optimizer="adam", lr=1e-2, schedule="none", adv_steps=2)
    summary = DEFENSES.get("pgd-at")().fit(model, train, recipe, spec=spec, device=CPU, seed=0)
    assert summary.steps == 2 * 4
    assert model.training is False
    assert accuracy(model, train.images, train.labels) >= 0.75


def test_optimizer_and_scheduler_follow_the_recipe() -> None:
    model = linear_model(0)
    sgd = make_optimizer(model, Recipe(epochs=4, batch_size=8, optimizer="sgd", lr=0.1, momentum=0.8,
                                       weight_decay=1e-4))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["weight_decay"] == 1e-4
    adam = make_optimizer(model, TINY)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 1e-2
    assert make_scheduler(adam, TINY) is None

    multistep = Recipe(epochs=4, batch_size=8, lr=0.1, schedule="multistep", milestones=(2,), gamma=0.1)
    opt = make_optimizer(model, multistep)
    sched = make_scheduler(opt, multistep)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01])

    cosine = Recipe(epochs=4, batch_size=8, lr=0.1, schedule="cosine")
    opt = make_optimizer(model, cosine)
    sched = make_scheduler(opt, cosine)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"batch_size": 0}, {"optimizer": "rmsprop"}, {"schedule": "step"}])
def test_recipe_validation(bad: dict) -> None:
    from bench.errors import BenchError

    with pytest.raises(BenchError):
        Recipe(**{"epochs": 1, "batch_size": 8, **bad})


def test_recipe_overrides_ignore_none() -> None:
    assert TINY.with_overrides(epochs=None) is TINY
    assert TINY.with_overrides(epochs=7).epochs == 7
    assert TINY.with_overrides(epochs=7).lr == TINY.lr


# -- checkpoints -----------------------------------------------------------------------------
def state() -> dict[str, torch.Tensor]:
    return {"net.1.weight": torch.arange(12.0).view(3, 4), "net.1.bias": torch.tensor([0.1234567890123, 2.0, 3.0])}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_and_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "model.pt"
    meta = {"defense": "standard", "epochs": 3, "recipe": {"lr": 0.01}}
    save_checkpoint(path, state(), meta)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left behind
    loaded, loaded_meta = read_checkpoint(path)
    assert_same_state(loaded, state())
    assert loaded_meta == meta
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "bench-checkpoint-1"


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, state(), {"v": 1})
    save_checkpoint(path, {"w": torch.ones(2)}, {"v": 2})
    loaded, meta = read_checkpoint(path)
    assert meta == {"v": 2} and list(loaded) == ["w"]


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, state(), {"v": 1})
    # any pickling failure will do (its type varies across Python versions); the file state is what is checked
    with pytest.raises(Exception):  # noqa: B017
        save_checkpoint(path, state(), {"unpicklable": lambda: None})
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    assert read_checkpoint(path)[1] == {"v": 1}


def test_model_round_trip_through_checkpoint(tmp_path: Path) -> None:
    a, b = linear_model(0), linear_model(1)
    x = torch.rand(5, 1, 8, 8)
    assert not torch.equal(a(x), b(x))
    save_checkpoint(tmp_path / "a.pt", a.state_dict(), {})
    loaded, _ = read_checkpoint(tmp_path / "a.pt")
    b.load_state_dict(loaded)
    assert torch.equal(a(x), b(x))


def test_read_strips_data_parallel_prefix(tmp_path: Path) -> None:
    torch.save({f"module.{k}": v for k, v in state().items()}, tmp_path / "dp.pt")
    loaded, meta = read_checkpoint(tmp_path / "dp.pt")
    assert_same_state(loaded, state())
    assert meta == {}


def test_read_keeps_keys_when_only_some_have_the_prefix(tmp_path: Path) -> None:
    mixed = {"module.a": torch.ones(1), "b": torch.zeros(1)}
    torch.save(mixed, tmp_path / "mixed.pt")
    assert list(read_checkpoint(tmp_path / "mixed.pt")[0]) == ["module.a", "b"]


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model", "net"])
def test_read_accepts_common_wrappers(tmp_path: Path, key: str) -> None:
    torch.save({key: state(), "epoch": 10, "optimizer": {"lr": 0.1}}, tmp_path / "w.pt")
    loaded, _ = read_checkpoint(tmp_path / "w.pt")
    assert_same_state(loaded, state())


def test_read_bare_state_dict(tmp_path: Path) -> None:
    torch.save(state(), tmp_path / "bare.pt")
    assert_same_state(read_checkpoint(tmp_path / "bare.pt")[0], state())


class CustomObject:
    def __init__(self) -> None:
        self.weight = torch.ones(2)


class StateDictSubclass(collections.OrderedDict):
    pass


class Payload:
    """Unpickling this creates a marker file: proof that arbitrary code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_not_torch(p: Path) -> None:
    p.write_text("hello, I am not a checkpoint\n")


def write_truncated(p: Path) -> None:
    save_checkpoint(p.with_suffix(".full"), state(), {"x": 1})
    data = p.with_suffix(".full").read_bytes()
    p.write_bytes(data[: len(data) // 2])


def write_empty(p: Path) -> None:
    p.write_bytes(b"")


def write_custom_object(p: Path) -> None:
    torch.save(CustomObject(), p)


def write_dict_subclass(p: Path) -> None:
    torch.save(StateDictSubclass(state()), p)


def write_no_tensors(p: Path) -> None:
    torch.save({"epoch": 3, "lr": 0.1}, p)


def write_empty_dict(p: Path) -> None:
    torch.save({}, p)


def write_tensor(p: Path) -> None:
    torch.save(torch.ones(3), p)


def write_mixed_values(p: Path) -> None:
    torch.save({"w": torch.ones(1), "epoch": 3}, p)


@pytest.mark.parametrize("writer", [write_not_torch, write_truncated, write_empty, write_custom_object,
                                    write_dict_subclass, write_no_tensors, write_empty_dict, write_tensor,
                                    write_mixed_values], ids=lambda f: f.__name__.removeprefix("write_"))
def test_unreadable_or_unsafe_checkpoints_raise(tmp_path: Path, writer) -> None:
    path = tmp_path / "bad.pt"
    writer(path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert "bad.pt" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fmt", ["pickle", "torch"])
def test_malicious_pickle_is_refused_without_running_code(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    if fmt == "pickle":
        path.write_bytes(pickle.dumps({"w": Payload(marker)}))
    else:
        torch.save({"w": Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refusing|not a"):
        read_checkpoint(path)
    assert not marker.exists(), "unpickling ran arbitrary code"


def test_missing_checkpoint_raises(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path)  # a directory
    with pytest.raises(CheckpointError):
        sha256_file(tmp_path / "nope.pt")


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_load_into_reports_mismatch_as_checkpoint_error(tmp_path: Path) -> None:
    defense = DEFENSES.get("standard")()
    model = linear_model(0)
    good = linear_model(1).state_dict()
    load_into(defense, model, good, "good.pt")
    assert torch.equal(model.net[1].weight, good["net.1.weight"])
    with pytest.raises(CheckpointError, match="standard"):
        load_into(defense, model, {"net.1.weight": torch.ones(3, 3)}, "bad.pt")


def test_interrupted_training_resumes_to_identical_weights(tmp_path) -> None:
    from bench.data.base import get_dataset

    train = get_dataset("synthetic").load("train")
    recipe = Recipe(epochs=4, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0,
                    schedule="cosine")

    def noisy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x + 0.05 * torch.randn_like(x)).clamp(0, 1)  # uses the global RNG, which must be restored

    reference = linear_model(0)
    fit(reference, train, recipe, device=CPU, seed=3, perturb=noisy)

    calls = {"n": 0}

    def crash_in_epoch_three(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2 * 8 + 1:  # 8 batches per epoch: the first batch of epoch 3
            raise KeyboardInterrupt
        return noisy(model, x, y)

    state = tmp_path / "train.partial.pt"
    model = linear_model(0)
    with pytest.raises(KeyboardInterrupt):
        fit(model, train, recipe, device=CPU, seed=3, perturb=crash_in_epoch_three, resume=state)
    assert state.exists()
    resumed = linear_model(0)  # a fresh process would rebuild the model from scratch
    summary = fit(resumed, train, recipe, device=CPU, seed=3, perturb=noisy, resume=state)
    assert not state.exists()  # removed once training completes
    assert [h["epoch"] for h in summary.history] == [1, 2, 3, 4]
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# -- model selection -------------------------------------------------------------------------
def test_fit_keeps_the_best_scoring_epoch_and_leaves_training_randomness_alone(train: Split) -> None:
    scores = iter([0.2, 0.9, 0.4])
    snapshots = []

    def select(model: nn.Module) -> float:
        assert not model.training
        torch.rand(100)  # selection may draw randomness: the training stream must not move
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    selected, plain = linear_model(0), linear_model(0)
    summary = fit(selected, train, TINY, device=CPU, seed=3, select=select)
    reference = fit(plain, train, TINY, device=CPU, seed=3)
    assert summary.selected_epoch == 2 and summary.selection_score == 0.9
    assert [h["val_score"] for h in summary.history] == [0.2, 0.9, 0.4]
    assert [h["loss"] for h in summary.history] == [h["loss"] for h in reference.history]  # same training
    kept = selected.state_dict()
    assert all(torch.equal(kept[k], snapshots[1][k]) for k in kept)  # epoch 2's weights, not the last
    assert not all(torch.equal(kept[k], plain.state_dict()[k]) for k in kept)
    assert not selected.training


def test_fit_selection_survives_an_interruption(train: Split, tmp_path: Path) -> None:
    scores = {1: 0.7, 2: 0.1, 3: 0.3}
    state = tmp_path / "resume.pt"

    def scorer(done: int, interrupt_at: int | None = None):
        epoch = {"n": done}

        def select(model: nn.Module) -> float:
            epoch["n"] += 1
            if epoch["n"] == interrupt_at:
                raise KeyboardInterrupt
            return scores[epoch["n"]]

        return select

    with pytest.raises(KeyboardInterrupt):
        fit(linear_model(0), train, TINY, device=CPU, seed=0, resume=state, select=scorer(0, interrupt_at=3))
    assert state.exists()  # epochs 1 and 2 saved (with epoch 1's weights as the best so far)
    resumed = linear_model(0)
    summary = fit(resumed, train, TINY, device=CPU, seed=0, resume=state, select=scorer(2))
    full = linear_model(0)
    reference = fit(full, train, TINY, device=CPU, seed=0, select=scorer(0))
    assert summary.selected_epoch == reference.selected_epoch == 1
    assert all(torch.equal(resumed.state_dict()[k], full.state_dict()[k]) for k in full.state_dict())


def test_holdout_is_grouped_stratified_and_disjoint(train: Split) -> None:
    from bench.data.splits import holdout

    groups = [f"g{i // 2}" for i in range(len(train))]  # pairs of images share a group (a lesion)
    data = Split(train.dataset, "train", train.images, train.labels, meta={"groups": groups})
    fit_part, val = holdout(data, 0.25, seed=0)
    assert len(fit_part) + len(val) == len(data)
    assert set(fit_part.indices.tolist()).isdisjoint(val.indices.tolist())
    assert set(fit_part.meta["groups"]).isdisjoint(val.meta["groups"])
    assert 0.2 < len(val) / len(data) < 0.3
    for c in range(4):  # every class on both sides, in about the same share
        share = float((val.labels == c).sum()) / float((data.labels == c).sum())
        assert 0.1 < share < 0.4, (c, share)
    again, _ = holdout(data, 0.25, seed=0)
    assert torch.equal(again.indices, fit_part.indices)
    with pytest.raises(ValueError):
        holdout(data, 1.5, seed=0)

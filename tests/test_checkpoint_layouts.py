"""Checkpoint layouts people publish, read by bench.training.checkpoints.read_checkpoint, and the
one-line errors for files it must refuse (without ever running code from them)."""

from __future__ import annotations

import pickle
import random
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bench.errors import CheckpointError
from bench.registry import DEFENSES
from bench.training.checkpoints import (
    check_meta_defense,
    load_into,
    read_checkpoint,
    save_checkpoint,
)
from helpers import linear_model

pytestmark = pytest.mark.usefixtures("one_thread")


class Small(nn.Module):
    """Conv + BatchNorm (with its integer counter) + Linear: parameters and buffers of several dtypes."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(8, 3)
        self.bn.running_mean.uniform_()
        self.bn.num_batches_tracked.fill_(seed + 7)


def source_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in Small(1).state_dict().items()}


def prefixed(prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in source_state().items()}


def assert_loads_into_small(state: dict[str, Any]) -> None:
    """``state`` fits a fresh Small strictly and gives it the source's tensors (not its own init)."""
    model = Small(0)
    assert not torch.equal(model.conv.weight, source_state()["conv.weight"])
    model.load_state_dict(state, strict=True)
    for key, value in source_state().items():
        assert torch.equal(model.state_dict()[key], value), key


# -- layouts that load ------------------------------------------------------------------------------------------
def legacy_save(obj: Any, path: Path) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)  # really the legacy format


LAYOUTS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "raw": ("m.pt", lambda p: torch.save(source_state(), p)),
    "bench": ("m.pt", lambda p: save_checkpoint(p, source_state(), {"defense": "standard"})),
    "state_dict": ("m.pt", lambda p: torch.save({"state_dict": source_state(), "epoch": 3}, p)),
    "model_state_dict": ("m.pt", lambda p: torch.save({"model_state_dict": source_state(),
                                                       "optimizer_state_dict": {"state": {}, "lr": 0.1}}, p)),
    "model": ("m.pt", lambda p: torch.save({"model": source_state()}, p)),
    "net": ("m.pt", lambda p: torch.save({"net": source_state(), "acc": 93.1, "epoch": 199}, p)),
    "nested": ("m.pt", lambda p: torch.save({"model": {"state_dict": source_state(), "epoch": 3}, "note": "x"}, p)),
    "nested3": ("m.pt", lambda p: torch.save({"model": {"net": {"state_dict": source_state()}}}, p)),
    "module_prefix": ("m.pt", lambda p: torch.save(prefixed("module."), p)),
    "orig_mod_prefix": ("m.pt", lambda p: torch.save(prefixed("_orig_mod."), p)),
    "compiled_data_parallel": ("m.pt", lambda p: torch.save({"state_dict": prefixed("module._orig_mod.")}, p)),
    "legacy_raw": ("m.pt", lambda p: legacy_save(source_state(), p)),
    "legacy_wrapped": ("m.pth.tar", lambda p: legacy_save({"epoch": 200, "state_dict": prefixed("module."),
                                                           "best_prec1": 91.7}, p)),
    "akamaster": ("resnet20.th", lambda p: torch.save({"epoch": 200, "state_dict": prefixed("module."),
                                                       "best_prec1": 91.7}, p)),
    "safetensors_suffix": ("model.safetensors", lambda p: save_file(source_state(), str(p))),
    "safetensors_content": ("weights", lambda p: save_file(prefixed("module."), str(p))),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_round_trips_into_a_module(tmp_path: Path, layout: str) -> None:
    filename, write = LAYOUTS[layout]
    path = tmp_path / filename
    write(path)
    state, _ = read_checkpoint(path)
    assert sorted(state) == sorted(source_state())
    assert state["bn.num_batches_tracked"].dtype == torch.int64
    assert_loads_into_small(state)


def test_safetensors_by_content_is_not_read_by_torch(tmp_path: Path) -> None:
    path = tmp_path / "weights"
    save_file(source_state(), str(path))
    with pytest.raises(Exception):  # noqa: B017 - any failure: torch cannot read it, so the content decided
        torch.load(path, weights_only=True)
    assert_loads_into_small(read_checkpoint(path)[0])


def test_meta_of_bench_files_and_safetensors_headers(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "own.pt", source_state(), {"defense": "pgd-at", "epochs": 3})
    assert read_checkpoint(tmp_path / "own.pt")[1] == {"defense": "pgd-at", "epochs": 3}
    save_file(source_state(), str(tmp_path / "m.safetensors"),
              metadata={"defense": "pgd-at", "dataset": "cifar10", "hparams": '{"arch": "resnet18"}'})
    assert read_checkpoint(tmp_path / "m.safetensors")[1] == {"defense": "pgd-at", "dataset": "cifar10",
                                                             "hparams": {"arch": "resnet18"}}
    save_file(source_state(), str(tmp_path / "plain.safetensors"))
    assert read_checkpoint(tmp_path / "plain.safetensors")[1] == {}
    torch.save({"state_dict": source_state(), "epoch": 3}, tmp_path / "foreign.pt")
    assert read_checkpoint(tmp_path / "foreign.pt")[1] == {}


@pytest.mark.parametrize("keys", [["model.a", "model.b"], ["module.a", "b"], ["_orig_mod.a", "module.b"]])
def test_other_prefixes_and_partial_prefixes_are_kept(tmp_path: Path, keys: list[str]) -> None:
    torch.save({k: torch.ones(1) for k in keys}, tmp_path / "p.pt")
    assert list(read_checkpoint(tmp_path / "p.pt")[0]) == keys


# -- files that are refused -------------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates the file ``marker``: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def random_bytes(path: Path) -> None:
    data = bytes(random.Random(0).randrange(256) for _ in range(4096))
    assert data[:2] != b"PK" and data[0] != 0x80  # not by chance a zip or pickle header
    path.write_bytes(data)


def truncated_zip(path: Path) -> None:
    torch.save({"state_dict": source_state()}, path)
    path.write_bytes(path.read_bytes()[:300])


def truncated_legacy(path: Path) -> None:
    legacy_save({"state_dict": source_state()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def legacy_cut_in_header(path: Path) -> None:
    legacy_save(source_state(), path)
    path.write_bytes(path.read_bytes()[:10])  # inside the pickled magic number that starts the file


def other_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hi")


def bad_safetensors(path: Path) -> None:
    save_file(source_state(), str(path))
    path.write_bytes(path.read_bytes()[:40])


BAD: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "random_bytes": ("bad.pt", random_bytes, "is not a model checkpoint: neither a PyTorch file (zip or legacy) "
                                             "nor safetensors"),
    "text": ("bad.pt", lambda p: p.write_text("hello, I am not a checkpoint\n"), "neither a PyTorch file"),
    "empty": ("bad.pt", lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "truncated_zip": ("bad.pt", truncated_zip, "zip archive is truncated or corrupt"),
    "truncated_legacy": ("bad.pt", truncated_legacy, "legacy (non-zip) file is truncated or corrupt"),
    "legacy_cut_in_header": ("bad.pt", legacy_cut_in_header, "legacy (non-zip) file is truncated or corrupt"),
    "other_zip": ("bad.pt", other_zip, "a zip archive but not a PyTorch file"),
    "plain_pickle": ("bad.pt", lambda p: p.write_bytes(pickle.dumps({"w": 1.0})), "a plain pickle (pickle.dump)"),
    "bad_safetensors": ("bad.safetensors", bad_safetensors, "not a readable safetensors file"),
    "no_tensors": ("bad.pt", lambda p: torch.save({"epoch": 3, "lr": 0.1}, p),
                   "holds no state dict of tensors: it holds a dict with 2 non-tensor entries: epoch (int), lr"),
    "mixed_values": ("bad.pt", lambda p: torch.save({"w": torch.ones(1), "epoch": 3}, p),
                     "1 non-tensor entry: epoch (int)"),
    "empty_dict": ("bad.pt", lambda p: torch.save({}, p), "holds no state dict of tensors: it holds an empty dict"),
    "tensor": ("bad.pt", lambda p: torch.save(torch.ones(3), p), "a single tensor of shape (3,)"),
    "too_deep": ("bad.pt", lambda p: torch.save({"model": {"model": {"model": {"model": source_state()}}}}, p),
                 "holds no state dict of tensors"),
    "python_object": ("bad.pt", lambda p: torch.save({"state_dict": source_state(), "opt": zipfile.ZipInfo("x")}, p),
                      "holds Python objects (zipfile.ZipInfo) that weights_only=True refuses to execute"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_is_one_line_checkpoint_error(tmp_path: Path, case: str) -> None:
    filename, write, expected = BAD[case]
    path = tmp_path / filename
    write(path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and expected in message, message
    assert "\n" not in message
    if case != "python_object":
        assert "Python objects" not in message  # corrupt or foreign files are not called unsafe


def test_random_bytes_message_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    random_bytes(path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    expected = f"{path} is not a model checkpoint: neither a PyTorch file (zip or legacy) nor safetensors"
    assert str(info.value) == expected


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="^checkpoint file not found: .*nope.pt$"):
        read_checkpoint(tmp_path / "nope.pt")
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file$"):
        read_checkpoint(folder)
    save_file(source_state(), str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file; give the file itself: "
                                              "model.safetensors$"):
        read_checkpoint(folder)


MALICIOUS: dict[str, Callable[[Any, Path], None]] = {
    "pickle_default": lambda obj, p: p.write_bytes(pickle.dumps(obj)),
    "pickle_protocol_2": lambda obj, p: p.write_bytes(pickle.dumps(obj, protocol=2)),
    "torch_zip": lambda obj, p: torch.save(obj, p),
    "torch_legacy": lambda obj, p: torch.save(obj, p, _use_new_zipfile_serialization=False),
}


@pytest.mark.parametrize("fmt", list(MALICIOUS))
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    MALICIOUS[fmt]({"state_dict": source_state(), "optimizer": Payload(marker), "x": Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"refusing to load {path}: it holds Python objects (")
    assert "open" in message and "weights_only=True refuses to execute" in message and "\n" not in message
    assert not marker.exists(), "unpickling ran code from the checkpoint"


# -- loading into a model ---------------------------------------------------------------------------------------
def test_load_into_names_missing_unexpected_and_shapes_in_one_line() -> None:
    defense = DEFENSES.get("standard")()
    model = linear_model(0)
    good = linear_model(1).state_dict()
    load_into(defense, model, dict(good), "good.pt")
    assert torch.equal(model.net[1].weight, good["net.1.weight"])

    bad = {"net.1.weight": torch.ones(3, 3), "fc.a": torch.ones(1), "fc.b": torch.ones(1)}
    with pytest.raises(CheckpointError) as info:
        load_into(defense, model, bad, "bad.pt")
    assert str(info.value) == (
        "checkpoint bad.pt does not fit the model of defense 'standard': "
        "missing 3 keys (net.1.bias, normalize.mean, normalize.std); unexpected 2 keys (fc.a, fc.b); "
        "1 shape mismatch (net.1.weight: checkpoint (3, 3), model (4, 64))")


def test_load_into_lists_the_first_keys_and_hints_at_a_prefix() -> None:
    defense = DEFENSES.get("standard")()
    model = linear_model(0)
    bare = {k.removeprefix("net."): v for k, v in linear_model(1).state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_into(defense, model, bare, "bare.pt")
    message = str(info.value)
    assert "missing 2 keys (net.1.bias, net.1.weight); unexpected 2 keys (1.bias, 1.weight)" in message
    assert message.endswith("the checkpoint's keys lack the model's 'net.' prefix")
    many = {f"extra{i}": torch.ones(1) for i in range(7)} | dict(linear_model(1).state_dict())
    with pytest.raises(CheckpointError, match=r"unexpected 7 keys \(extra0, extra1, extra2 \(\+4 more\)\)$"):
        load_into(defense, model, many, "many.pt")


class RenamingDefense:
    """An adapter that overrides load_state_dict: official ``official.*`` keys go under ``net.``."""

    name = "renaming"

    def load_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:
        if "official.refuse" in state:
            raise CheckpointError("renaming: this official file is of another architecture")
        mapped = {("net." + k.removeprefix("official.") if k.startswith("official.") else k): v
                  for k, v in state.items()}
        model.load_state_dict(mapped, strict=True)


def test_load_into_keeps_working_for_adapters() -> None:
    model, source = linear_model(0), linear_model(1).state_dict()
    official = {("official." + k.removeprefix("net.") if k.startswith("net.") else k): v for k, v in source.items()}
    load_into(RenamingDefense(), model, official, "official.pt")
    assert torch.equal(model.net[1].bias, source["net.1.bias"])

    del official["official.1.bias"]
    with pytest.raises(CheckpointError) as info:
        load_into(RenamingDefense(), model, official, "official.pt")
    message = str(info.value)
    # the adapter's loader saw renamed keys: its report is passed on, not a listing of the file's own names
    assert message.startswith("checkpoint official.pt does not fit the model of defense 'renaming': ")
    assert "net.1.bias" in message and "unexpected" not in message and "\n" not in message
    with pytest.raises(CheckpointError, match="^renaming: this official file is of another architecture$"):
        load_into(RenamingDefense(), model, {"official.refuse": torch.ones(1)}, "official.pt")


# -- bench's own meta -------------------------------------------------------------------------------------------
def test_check_meta_defense(tmp_path: Path) -> None:
    check_meta_defense({}, "standard", "x.pt")  # not bench's: nothing to check
    check_meta_defense({"defense": "standard", "dataset": "cifar10"}, "standard", "x.pt", dataset="cifar10")
    check_meta_defense({"defense": "standard", "dataset": "cifar10"}, "standard", "x.pt")  # dataset not asked

    path = tmp_path / "trained.pt"
    save_checkpoint(path, source_state(), {"defense": "pgd-at", "dataset": "cifar10"})
    _, meta = read_checkpoint(path)
    with pytest.raises(CheckpointError) as info:
        check_meta_defense(meta, "standard", str(path))
    assert str(info.value).startswith(f"checkpoint {path} was trained by bench for defense 'pgd-at', not 'standard': ")
    with pytest.raises(CheckpointError, match="trained by bench on dataset 'cifar10', not 'svhn': "):
        check_meta_defense(meta, "pgd-at", str(path), dataset="svhn")

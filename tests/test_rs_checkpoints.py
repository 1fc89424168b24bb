"""The ``rs`` defense loads the official released checkpoints of Cohen et al. (locuslab/smoothing)
and SmoothAdv (Hadisalman/smoothing-adversarial).

The official files are written here from a reference model re-declared in this file with the
official module layout (``Sequential(input_layer, classifier)``, the bearpaw CIFAR ResNet's
attribute names, the input layers keeping their constants as plain tensors, the ImageNet
ResNet-50 inside DataParallel), independently of :mod:`bench.models.cohen`. Each load must give
bench's model the reference's outputs, so the input layer runs exactly once, with the official
constants.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bench.data.base import get_dataset
from bench.errors import BenchError
from bench.registry import DEFENSES
from bench.training.checkpoints import load_into, read_checkpoint, save_checkpoint
from helpers import assert_cli_user_error

# datasets.py of the official code
CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(autouse=True)
def _threads(one_thread) -> None:
    """One intra-op thread: these are small forward passes on a busy machine."""


# -- the official layout, re-declared ----------------------------------------------------------
class OfficialNormalizeLayer(nn.Module):
    """(x - means) / sds; means and sds are plain attributes, so they are not in the state dict."""

    def __init__(self, means: list[float], sds: list[float]) -> None:
        super().__init__()
        self.means, self.sds = torch.tensor(means), torch.tensor(sds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.means.view(1, -1, 1, 1)) / self.sds.view(1, -1, 1, 1)


class OfficialInputCenterLayer(nn.Module):
    """x - means (SmoothAdv); means is a plain attribute."""

    def __init__(self, means: list[float]) -> None:
        super().__init__()
        self.means = torch.tensor(means)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.means.view(1, -1, 1, 1)


class OfficialBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class OfficialCifarResNet(nn.Module):
    """depth 6n+2; names conv1, bn1, layer1-3 (downsample = Sequential(conv, bn)), avgpool, fc."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, pool: int = 8) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, inplanes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
            blocks = [OfficialBlock(inplanes, planes, stride, down)]
            blocks += [OfficialBlock(planes, planes) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AvgPool2d(pool)  # the official AvgPool2d(8): 32 px inputs
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.avgpool(x).view(x.size(0), -1))


class DataParallelNames(nn.Module):
    """Stands in for torch.nn.DataParallel: the same ``module.`` names, no devices involved."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def official_input_layer(kind: str, mean: list[float], std: list[float]) -> nn.Module:
    return OfficialNormalizeLayer(mean, std) if kind == "normalize" else OfficialInputCenterLayer(mean)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics, so that evaluation depends on every state tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(1234)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def official_cifar(depth: int, kind: str, *, mean=CIFAR10_MEAN, std=CIFAR10_STD, num_classes: int = 10,
                   in_channels: int = 3, pool: int = 8, seed: int = 0) -> nn.Sequential:
    net = OfficialCifarResNet(depth, num_classes, in_channels, pool)
    return randomize(nn.Sequential(official_input_layer(kind, mean, std), net), seed)


def official_file(path: Path, model: nn.Module, arch: str, prefix: str = "") -> Path:
    """The official train.py's checkpoint.pth.tar: epoch, arch, state_dict, optimizer (SGD with momentum)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the momentum buffers (the saved weights are those after the step)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 90, "arch": arch, "state_dict": state, "optimizer": optimizer.state_dict()}, path)
    return path


def rs():
    return DEFENSES.get("rs")()


def build(dataset: str, image_size: int | None = None, **given):
    spec = get_dataset(dataset).spec
    size = image_size or spec.image_size
    defense = rs()
    return defense, defense.build(spec, size, **defense.resolve_hparams(given, size, "paper")).eval()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# -- the official file format through the public reader ----------------------------------------
@pytest.mark.parametrize(("kind", "prefix"), [("normalize", ""), ("center", "module.")])
def test_official_resnet110_file_loads_with_the_reference_outputs(tmp_path: Path, kind: str, prefix: str) -> None:
    reference = official_cifar(110, kind)
    path = official_file(tmp_path / "noise_0.25" / "checkpoint.pth.tar", reference, "cifar_resnet110", prefix)
    assert next(iter(torch.load(path, weights_only=True)["state_dict"])) == prefix + "1.conv1.weight"

    state, _ = read_checkpoint(path)  # weights_only; the optimizer's state and the arch string are fine
    defense, model = build("cifar10", arch="cifar_resnet110", sigma=0.25, input_layer=kind)
    load_into(defense, model, state, str(path))
    assert model.sigma == 0.25 and model.input_layer == kind

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = outputs(reference, x)
    torch.testing.assert_close(outputs(model, x), expected, rtol=1e-5, atol=1e-5)
    # the check can tell: normalizing twice, or with bench's own CIFAR-10 std, gives other logits
    twice = outputs(reference[1], reference[0](reference[0](x)))
    assert not torch.allclose(twice, expected, rtol=1e-3, atol=1e-3)
    other = build("cifar10", arch="cifar_resnet110", input_layer="center" if kind == "normalize" else "normalize")[1]
    other.load_state_dict(model.state_dict() | {"normalize.mean": other.normalize.mean,
                                                "normalize.std": other.normalize.std})
    assert not torch.allclose(outputs(other, x), expected, rtol=1e-3, atol=1e-3)


def test_official_imagenet_resnet50_in_data_parallel_loads() -> None:
    from torchvision.models import resnet50

    reference = randomize(nn.Sequential(OfficialNormalizeLayer(IMAGENET_MEAN, IMAGENET_STD),
                                        DataParallelNames(resnet50(weights=None))), seed=2)
    state = reference.state_dict()
    assert "1.module.layer4.2.conv3.weight" in state and not any(k.startswith("0.") for k in state)
    defense, model = build("imagenet", 64, arch="resnet50")  # input_layer defaults to normalize
    defense.load_state_dict(model, state)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(outputs(model, x), outputs(reference, x), rtol=1e-4, atol=1e-4)


def test_cli_run_loads_an_official_file(tmp_path: Path) -> None:
    """``bench run --defense rs --checkpoint <official file> --hparam arch=...`` end to end on the
    synthetic dataset (1x8x8 images, 4 classes, mean 0.5, std 0.25: its own constants)."""
    from bench.cli import app

    reference = official_cifar(20, "normalize", mean=[0.5], std=[0.25], num_classes=4, in_channels=1, pool=2, seed=5)
    path = official_file(tmp_path / "official" / "checkpoint.pth.tar", reference, "cifar_resnet20", "module.")
    test = get_dataset("synthetic").load("test")
    expected = float((outputs(reference, test.images).argmax(1) == test.labels).float().mean())

    db = f"sqlite:///{tmp_path / 'results.db'}"
    common = ["run", "--defense", "rs", "--dataset", "synthetic", "--protocol", "clean", "--checkpoint", str(path),
              "--hparam", "sigma=0.25", "--db", db]
    result = CliRunner().invoke(app, [*common, "--hparam", "arch=cifar_resnet20", "--json"])
    assert result.exit_code == 0, result.stderr + result.stdout
    out = json.loads(result.stdout)
    assert out["n_examples"] == len(test.labels) and out["model"]["source"] == "file"
    assert out["clean_accuracy"] == pytest.approx(expected, abs=1e-12)

    wrong = CliRunner().invoke(app, [*common, "--hparam", "arch=cifar_resnet110"])
    assert_cli_user_error(wrong, "cifar_resnet20", "arch=cifar_resnet110")
    plain = CliRunner().invoke(app, common)  # bench's own backbone
    assert_cli_user_error(plain, "official", "arch=cifar_resnet20")


# -- refusals ----------------------------------------------------------------------------------
def small_official_state(kind: str = "normalize", **kwargs) -> dict[str, torch.Tensor]:
    return official_cifar(20, kind, **kwargs).state_dict()


def assert_one_line_bench_error(call, *fragments: str) -> str:
    with pytest.raises(BenchError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_wrong_architecture_is_refused() -> None:
    defense, model = build("cifar10", arch="cifar_resnet110")
    assert_one_line_bench_error(lambda: defense.load_state_dict(model, small_official_state()),
                                "cifar_resnet20", "arch=cifar_resnet110", "--hparam arch=cifar_resnet20")


def test_missing_keys_and_wrong_shapes_are_refused() -> None:
    defense, model = build("cifar10", arch="cifar_resnet20")
    state = small_official_state()
    del state["1.fc.bias"]
    assert_one_line_bench_error(lambda: defense.load_state_dict(model, state), "missing", "net.fc.bias")
    thousand = small_official_state(num_classes=1000)  # e.g. SmoothAdv's imagenet32 ResNet-110 head
    assert_one_line_bench_error(lambda: defense.load_state_dict(model, thousand), "shape", "net.fc.weight")
    stray = small_official_state() | {"2.extra": torch.zeros(1)}
    assert_one_line_bench_error(lambda: defense.load_state_dict(model, stray), "naming", "2.extra")


def test_official_file_with_bench_backbone_gets_a_hint() -> None:
    defense, model = build("cifar10", arch="resnet18")
    assert_one_line_bench_error(lambda: defense.load_state_dict(model, small_official_state()),
                                "official", "arch=cifar_resnet20")


def test_malicious_official_looking_file_is_refused(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("code ran during unpickling",))

    path = tmp_path / "checkpoint.pth.tar"
    with open(path, "wb") as fh:
        pickle.dump({"epoch": 90, "arch": "cifar_resnet110", "state_dict": {"1.fc.bias": torch.zeros(10)},
                     "optimizer": Payload()}, fh)
    assert_one_line_bench_error(lambda: read_checkpoint(path), "refusing to load")
    assert "code ran during unpickling" not in capfd.readouterr().out


# -- input layers ------------------------------------------------------------------------------
def test_input_layer_hyperparameter() -> None:
    resolve = rs().resolve_hparams
    assert resolve({"arch": "cifar_resnet110"}, 32) == {"arch": "cifar_resnet110", "sigma": 0.25,
                                                        "input_layer": "normalize"}
    assert resolve({"arch": "resnet50", "input_layer": "InputCenterLayer"}, 224)["input_layer"] == "center"
    assert resolve({}, 32, "paper") == {"arch": "resnet18", "sigma": 0.25}  # unchanged for bench's backbones
    assert_one_line_bench_error(lambda: resolve({"input_layer": "center"}, 32), "input_layer", "official")
    assert_one_line_bench_error(lambda: resolve({"arch": "cifar_resnet110", "input_layer": "std"}, 32),
                                "input_layer", "normalize", "center")
    assert_one_line_bench_error(lambda: resolve({"arch": "resnet110"}, 32), "cifar_resnet110")


def test_official_constants_and_layers() -> None:
    _, model = build("cifar10", arch="cifar_resnet20")
    assert model.normalize.mean.flatten().tolist() == pytest.approx(CIFAR10_MEAN)
    assert model.normalize.std.flatten().tolist() == pytest.approx(CIFAR10_STD)  # not bench's CIFAR-10 std
    _, center = build("cifar10", arch="cifar_resnet20", input_layer="center")
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(center.normalize(x), x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))


@pytest.mark.parametrize("kind", ["normalize", "center"])
def test_input_layer_tensors_in_a_file_are_detected(kind: str) -> None:
    """Forks that made the official constants buffers save 0.means (and 0.sds); they decide."""
    mean, std = [0.3, 0.4, 0.5], [0.1, 0.2, 0.3]
    reference = official_cifar(20, kind, mean=mean, std=std, seed=7)
    state = reference.state_dict() | {"0.means": torch.tensor(mean)}
    if kind == "normalize":
        state["0.sds"] = torch.tensor(std)
    other = "center" if kind == "normalize" else "normalize"
    defense, wrong = build("cifar10", arch="cifar_resnet20", input_layer=other)
    assert_one_line_bench_error(lambda: defense.load_state_dict(wrong, state), f"input_layer={kind}")
    _, model = build("cifar10", arch="cifar_resnet20", input_layer=kind)
    defense.load_state_dict(model, state)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(outputs(model, x), outputs(reference, x), rtol=1e-5, atol=1e-5)


def test_bench_checkpoint_of_an_official_arch_round_trips(tmp_path: Path) -> None:
    defense, trained = build("cifar10", arch="cifar_resnet20", input_layer="center")
    randomize(trained.net, seed=9)
    path = tmp_path / "rs.pt"
    save_checkpoint(path, trained.state_dict(), {"defense": "rs"})
    state, _ = read_checkpoint(path)
    _, fresh = build("cifar10", arch="cifar_resnet20", input_layer="center")
    load_into(defense, fresh, state, str(path))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(outputs(fresh, x), outputs(trained, x))
    _, normalize = build("cifar10", arch="cifar_resnet20")
    assert_one_line_bench_error(lambda: defense.load_state_dict(normalize, state), "input_layer=center")


def test_architecture_is_read_from_the_keys() -> None:
    from torchvision.models import resnet18

    from bench.models.cohen import official_arch, split_official

    _, classifier, stray = split_official({"module." + k: v for k, v in small_official_state().items()})
    assert stray == [] and official_arch(classifier) == "cifar_resnet20"
    assert official_arch(OfficialCifarResNet(110).state_dict()) == "cifar_resnet110"
    assert official_arch(resnet18().state_dict()) == "resnet18"

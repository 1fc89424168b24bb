"""The ``dcs`` defense: masked k x k convolutions with random taps, GSAT training, official checkpoints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bench.data.base import get_dataset
from bench.defenses.base import Recipe
from bench.errors import BenchError, CheckpointError
from bench.models.dcs import DCSModel, MaskedConv2d, SmallDCSNet
from bench.registry import DEFENSES

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _threads(one_thread) -> None:  # tiny models: one intra-op thread
    pass


def dcs():
    return DEFENSES.get("dcs")()


def build(dataset: str = "synthetic", seed: int = 0, recipe: str = "cpu", **hparams) -> DCSModel:
    spec = get_dataset(dataset).spec
    resolved = dcs().resolve_hparams(hparams, spec.image_size, recipe)
    torch.manual_seed(seed)
    return dcs().build(spec, spec.image_size, **resolved)


def build_meta(dataset: str = "cifar10", **hparams) -> DCSModel:
    """Shapes and names only: parameters on the meta device (no memory, no init cost)."""
    spec = get_dataset(dataset).spec
    with torch.device("meta"):
        return dcs().build(spec, spec.image_size, **hparams)


# -- the masked convolution ----------------------------------------------------------------------
@pytest.mark.parametrize(("k", "n"), [(5, 2), (3, 1), (7, 3), (5, 12)])
def test_every_mask_has_exactly_n_ones_inside_k_by_k(k: int, n: int) -> None:
    torch.manual_seed(0)
    conv = MaskedConv2d(3, 4, kernel_size=k, taps=n)
    assert conv.padding == (k // 2, k // 2) and conv.bias is None and conv.weight.shape == (4, 3, k, k)
    seen = torch.zeros(k, k)
    for exclude in [False, True] * 200:
        mask = conv.resample(exclude_previous=exclude)
        assert mask.shape == (k, k)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert int(mask.sum()) == n
        assert len(conv.positions()) == n
        seen += mask
    assert int((seen > 0).sum()) == k * k  # every position gets drawn (>= 24 times on average)


def test_output_is_the_dense_conv_with_the_mask_shared_by_all_channels_and_the_batch() -> None:
    torch.manual_seed(0)
    conv = MaskedConv2d(3, 5, kernel_size=5, taps=2, stride=2).double()
    x = torch.randn(6, 3, 9, 11, dtype=torch.double)
    x[3] = x[0]
    out = conv(x)  # one fresh mask for the whole batch
    reference = F.conv2d(x, conv.weight * conv.mask[None, None], None, conv.stride, conv.padding)
    assert out.shape == reference.shape == (6, 5, 5, 6)
    assert torch.allclose(out, reference, atol=1e-12)
    assert torch.equal(out[0], out[3])  # identical images, identical outputs: one mask per batch
    x.requires_grad_(True)
    conv.frozen = True
    grads = torch.autograd.grad(conv(x).square().sum(), (x, conv.weight))
    ref_grads = torch.autograd.grad(F.conv2d(x, conv.weight * conv.mask, None, conv.stride, conv.padding)
                                    .square().sum(), (x, conv.weight))
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-10)
    assert float(grads[1][:, :, conv.mask == 0].abs().max()) == 0  # only the taps learn


def test_invalid_mask_shapes_are_refused() -> None:
    for k, n in [(4, 2), (5, 0), (5, 13), (3, 5), (0, 1)]:
        with pytest.raises(ValueError):
            MaskedConv2d(2, 2, kernel_size=k, taps=n)


def test_non_repeated_resample_is_disjoint_from_the_previous_mask() -> None:
    torch.manual_seed(1)
    conv = MaskedConv2d(2, 2, kernel_size=5, taps=2)
    for _ in range(100):
        previous = conv.mask.clone()
        new = conv.resample(exclude_previous=True)
        assert float((previous * new).sum()) == 0
        assert int(new.sum()) == 2


def test_masks_come_from_the_global_generator() -> None:
    def draws() -> list[list[tuple[int, int]]]:
        torch.manual_seed(7)
        conv = MaskedConv2d(2, 2)
        out = []
        for _ in range(5):
            conv.resample()
            out.append(conv.positions())
        return out

    assert draws() == draws()


def test_fresh_mask_at_every_forward_pass_and_one_fixed_mask_inside_freeze_randomness() -> None:
    model = build().eval()
    (conv,) = model.masked_convs()
    used: list[torch.Tensor] = []
    conv.register_forward_hook(lambda m, i, o: used.append(m.mask.clone()))
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        free = [model(x) for _ in range(6)]
        assert len({tuple(m.flatten().tolist()) for m in used}) > 1
        assert any(not torch.equal(free[0], o) for o in free[1:])
        used.clear()
        with model.freeze_randomness():
            frozen = [model(x) for _ in range(4)]
            with model.freeze_randomness():  # nested: the outer draw is kept
                frozen.append(model(x))
            frozen.append(model(x))
            assert all(torch.equal(frozen[0], o) for o in frozen[1:])
            assert all(torch.equal(used[0], m) for m in used)
            # the authors' behaviour: an explicit resample changes the mask, which then stays
            new = conv.resample(exclude_previous=True)
            assert float((new * used[0]).sum()) == 0
            after = [model(x) for _ in range(3)]
            assert all(torch.equal(after[0], o) for o in after[1:])
            assert all(torch.equal(new, m) for m in used[-3:])
        assert not conv.frozen
        used.clear()
        [model(x) for _ in range(6)]
        assert len({tuple(m.flatten().tolist()) for m in used}) > 1


def test_resample_sets_the_mask_of_the_next_forward_pass_only() -> None:
    model = build().eval()
    (conv,) = model.masked_convs()
    used: list[torch.Tensor] = []
    conv.register_forward_hook(lambda m, i, o: used.append(m.mask.clone()))
    with torch.no_grad():
        for _ in range(20):
            chosen = model.resample_masks()[0].clone()
            model(torch.rand(2, 1, 8, 8))
            assert torch.equal(used[-1], chosen)


def test_the_harness_randomness_check_sees_a_randomized_model() -> None:
    from bench.harness.checks import check_randomness

    model = build().eval()
    assert model.randomized is True and model.randomness_per_example is False
    x = get_dataset("synthetic").load("test").images[:32]
    assert not check_randomness(model, x, declared=True).triggered
    assert check_randomness(model, x, declared=False).triggered  # it does vary
    with model.freeze_randomness():
        assert not check_randomness(model, x, declared=False).triggered  # one frozen draw is deterministic


def test_state_dict_round_trips_the_current_mask() -> None:
    source = build(seed=0)
    target = build(seed=1)
    (a,), (b,) = source.masked_convs(), target.masked_convs()
    while torch.equal(a.mask, b.mask):
        b.resample()
    state = source.state_dict()
    assert "net.features.3.mask" in state
    dcs().load_state_dict(target, state)
    assert torch.equal(b.mask, a.mask)
    assert b.positions() == a.positions()  # the loaded mask is the one the next frozen pass uses
    b.frozen = True
    x = torch.rand(4, 32, 8, 8)
    assert torch.allclose(b(x), F.conv2d(x, b.weight * b.mask, None, 1, 2), atol=1e-5)


# -- placement -----------------------------------------------------------------------------------
@pytest.mark.parametrize("place", [2, 3])
def test_resnet18_masks_the_second_or_third_conv(place: int) -> None:
    model = build_meta(arch="resnet18", masked_conv=place)
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    masked = [name for name, m in convs if isinstance(m, MaskedConv2d)]
    names = [name for name, _ in convs]
    assert names[:3] == ["net.conv1", "net.layer1.0.conv1", "net.layer1.0.conv2"]
    assert masked == [names[place - 1]]
    conv = dict(convs)[masked[0]]
    assert conv.weight.shape == (64, 64, 5, 5) and conv.stride == (1, 1) and conv.padding == (2, 2)
    other = dict(convs)["net.layer1.0.conv2" if place == 2 else "net.layer1.0.conv1"]
    assert type(other) is nn.Conv2d and other.weight.shape == (64, 64, 3, 3)


@pytest.mark.parametrize(("layout", "blocks", "shape"), [("official", [0], (160, 16, 5, 5)),
                                                         ("four-random", [1, 2, 3, 4], (160, 160, 5, 5))])
def test_wrn_34_10_random_blocks(layout: str, blocks: list[int], shape: tuple[int, ...]) -> None:
    model = build_meta(arch="wrn-34-10", wrn_layout=layout)
    masked = {name: m for name, m in model.named_modules() if isinstance(m, MaskedConv2d)}
    assert sorted(masked) == [f"net.block1.layer.{i}.conv1" for i in blocks]
    assert all(m.weight.shape == shape for m in masked.values())
    assert len(model.net.block1.layer) == len(model.net.block2.layer) == len(model.net.block3.layer) == 5
    assert model.net.fc.weight.shape == (10, 640)
    assert sum(p.numel() for p in model.parameters()) > 46_000_000
    def draw(conv: MaskedConv2d) -> tuple[tuple[int, int], ...]:
        conv.resample()
        return tuple(conv.positions())

    if len(masked) > 1:  # independent masks per block
        for _ in range(20):
            if len({draw(m) for m in masked.values()}) > 1:
                break
        else:
            pytest.fail("the random blocks always drew the same mask")


@pytest.mark.parametrize("place", [2, 3])
def test_small_net_masks_one_conv(place: int) -> None:
    net = SmallDCSNet(3, 7, image_size=64, masked_conv=place)
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert [isinstance(m, MaskedConv2d) for m in convs] == [i == place - 1 for i in range(4)]
    assert len(net.stem) == 6  # 64 -> 32 -> 16 -> 8
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 7)


# -- hyperparameters, metadata, recipes ----------------------------------------------------------
def test_hparams_resolve_and_validate() -> None:
    d = dcs()
    base = {"masked_conv": 2, "kernel_size": 5, "taps": 2, "wrn_layout": "official"}
    assert d.resolve_hparams({}, 8, "cpu") == {"arch": "small", **base}
    assert d.resolve_hparams({}, 32, "paper")["arch"] == "resnet18"
    assert d.resolve_hparams({}, 32, "cpu")["arch"] == "small"
    assert d.resolve_hparams({"arch": "WRN-34-10"}, 32, "paper")["arch"] == "wrn-34-10"
    for bad in [{"arch": "vit"}, {"masked_conv": 4}, {"masked_conv": "2"}, {"kernel_size": 4}, {"taps": 0},
                {"taps": 13}, {"wrn_layout": "x"}, {"points": 2}, {"taps": True}]:
        with pytest.raises(BenchError) as info:
            d.resolve_hparams(bad, 32, "paper")
        assert "\n" not in str(info.value)


def test_info_and_protocols() -> None:
    from bench.config import RunConfig
    from bench.harness.runner import resolve

    info = DEFENSES.get("dcs").info
    assert info.paper.startswith("Adversarial Robustness via Deformable Convolution with Stochasticity")
    assert info.year == 2025 and info.kind == "randomized" and info.randomized is True
    assert info.authors_protocol == "transfer-draw" and info.default_protocol == "quick"
    assert resolve(RunConfig(defense="dcs", dataset="synthetic")).protocol.name == "quick"
    assert "Ma et al." in DEFENSES.summary("dcs")


def test_recipes() -> None:
    paper, cpu = dcs().recipe("paper"), dcs().recipe("cpu")
    assert (paper.epochs, paper.batch_size, paper.optimizer, paper.lr, paper.momentum) == (200, 128, "sgd", 0.1, 0.9)
    assert (paper.weight_decay, paper.schedule, paper.milestones, paper.gamma) == (5e-4, "multistep", (60, 120), 0.1)
    assert (paper.adv_steps, paper.adv_norm, paper.adv_eps) == (7, "Linf", None)
    # the cpu preset is pgd-at's, plus the held-out validation split for model selection
    assert dict(paper.extra) == dict(cpu.extra) == {"validation": 0.1}
    assert replace(cpu, extra=()) == DEFENSES.get("pgd-at")().recipe("cpu")


# -- GSAT ----------------------------------------------------------------------------------------
def test_gsat_attacks_one_frozen_mask_and_trains_on_a_disjoint_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.attacks.pgd

    spec, train = get_dataset("synthetic").spec, get_dataset("synthetic").load("train")
    model = build()
    (conv,) = model.masked_convs()
    log: list[tuple[bool, bool, torch.Tensor]] = []  # (training, frozen, mask) per forward pass
    conv.register_forward_hook(lambda m, i, o: log.append((m.training, m.frozen, m.mask.clone())))
    steps: list[tuple[float, int]] = []
    original = bench.attacks.pgd.PGD.run

    def spy(self, m, x, y, threat):
        steps.append((self.step_size(threat.eps), int(self.params["steps"])))
        return original(self, m, x, y, threat)

    monkeypatch.setattr(bench.attacks.pgd.PGD, "run", spy)
    recipe = Recipe(epochs=1, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="none",
                    adv_steps=3)
    summary = dcs().fit(model, train, recipe, spec=spec, device=CPU, seed=0)
    assert summary.steps == 4
    assert steps == [(pytest.approx(0.1 / 4), 3)] * 4  # synthetic's Linf eps 0.1, step eps / 4
    batches: list[tuple[list[torch.Tensor], torch.Tensor]] = []
    attack: list[torch.Tensor] = []
    for training, frozen, mask in log:
        if training:
            assert not frozen
            batches.append((attack, mask))
            attack = []
        else:
            assert frozen  # every attack pass runs inside freeze_randomness
            attack.append(mask)
    assert len(batches) == 4 and not attack
    for m1s, m2 in batches:
        assert len(m1s) >= 3 + 1  # the PGD steps (plus the attack's own predictions)
        assert all(torch.equal(m1s[0], m) for m in m1s)  # one frozen mask M1 for the whole attack
        assert float((m1s[0] * m2).sum()) == 0 and int(m2.sum()) == 2  # M2 disjoint from M1
    assert len({tuple(m2.flatten().tolist()) for _, m2 in batches}) > 1


def test_a_few_gsat_epochs_reduce_the_loss() -> None:
    spec, train = get_dataset("synthetic").spec, get_dataset("synthetic").load("train")
    model = build()
    recipe = Recipe(epochs=3, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0.0, schedule="none",
                    adv_steps=2)
    summary = dcs().fit(model, train, recipe, spec=spec, device=CPU, seed=0)
    losses = [h["loss"] for h in summary.history]
    assert losses[-1] < losses[0] * 0.8, losses


def test_model_selection_holds_out_a_validation_split_and_keeps_the_best_epoch(monkeypatch) -> None:
    import bench.defenses.dcs as module

    spec, train = get_dataset("synthetic").spec, get_dataset("synthetic").load("train")
    seen: list[int] = []
    original = module.robust_accuracy_on

    def spy(val, recipe, spec, device):
        seen.extend(val.indices.tolist())
        return original(val, recipe, spec, device)

    monkeypatch.setattr(module, "robust_accuracy_on", spy)
    recipe = Recipe(epochs=2, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0.0, schedule="none",
                    adv_steps=1, extra=(("validation", 0.25),))
    summary = dcs().fit(build(), train, recipe, spec=spec, device=CPU, seed=0)
    assert 0.2 * len(train) < len(seen) < 0.3 * len(train)
    assert summary.steps == 2 * -(-(len(train) - len(seen)) // 64)  # trained on the rest only
    scores = [h["val_score"] for h in summary.history]
    assert all(0.0 <= v <= 1.0 for v in scores)
    assert summary.selected_epoch == 1 + scores.index(max(scores))


def test_fit_refuses_a_model_without_masks() -> None:
    spec = get_dataset("synthetic").spec
    plain = DEFENSES.get("standard")().build(spec, 8, arch="cnn-small")
    with pytest.raises(BenchError, match="masked"):
        dcs().fit(plain, get_dataset("synthetic").load("train"), Recipe(epochs=1, batch_size=8, adv_steps=1),
                  spec=spec, device=CPU)


# -- official checkpoints ------------------------------------------------------------------------
def to_official(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """bench's state dict in the official repository's naming: no ``net.`` prefix, no masks
    (plain attributes there), no normalization (done by the data transform when training), and
    for ResNet-18 layer1's second block stored apart as ``layer11.0``."""
    out = {}
    for key, value in state.items():
        if key.startswith("normalize.") or key.endswith(".mask"):
            continue
        key = key[len("net."):]
        if arch == "resnet18" and key.startswith("layer1.1."):
            key = "layer11.0." + key[len("layer1.1."):]
        out[key] = value
    return out


# names and shapes as the official model/randpos_multi_resnet.py (ResNetPartmask5 with
# RandonBasicBlock22) and model/widepos_resnet.py (WideResNet6) define them
OFFICIAL_RESNET = {"conv1.weight": (64, 3, 3, 3), "layer1.0.conv1.weight": (64, 64, 5, 5),
                   "layer1.0.conv2.weight": (64, 64, 3, 3), "layer11.0.conv1.weight": (64, 64, 3, 3),
                   "layer11.0.bn2.num_batches_tracked": (), "layer2.0.shortcut.0.weight": (128, 64, 1, 1),
                   "layer2.0.shortcut.1.running_var": (128,), "layer4.1.conv2.weight": (512, 512, 3, 3),
                   "linear.weight": (10, 512), "linear.bias": (10,)}
OFFICIAL_WRN = {"conv1.weight": (16, 3, 3, 3), "block1.layer.0.bn1.weight": (16,),
                "block1.layer.0.conv1.weight": (160, 16, 5, 5), "block1.layer.0.convShortcut.weight": (160, 16, 1, 1),
                "block1.layer.1.conv1.weight": (160, 160, 3, 3), "block1.layer.4.conv2.weight": (160, 160, 3, 3),
                "block2.layer.0.convShortcut.weight": (320, 160, 1, 1), "block3.layer.4.conv2.weight": (640, 640, 3, 3),
                "bn1.running_mean": (640,), "fc.weight": (10, 640)}


def test_official_resnet18_checkpoint_loads_with_every_key_consumed(tmp_path: Path) -> None:
    from bench.training.checkpoints import load_into, read_checkpoint

    source = build("cifar10", seed=0, recipe="paper", arch="resnet18")
    official = to_official(source.state_dict(), "resnet18")
    for key, shape in OFFICIAL_RESNET.items():
        assert tuple(official[key].shape) == shape, key
    assert len(official) == len(source.state_dict()) - 3  # two normalization buffers and one mask
    with torch.no_grad():  # not the initial weights by chance
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    official = to_official(source.state_dict(), "resnet18")
    path = tmp_path / "model_official.pth"  # train.py's best_state layout, DataParallel names
    torch.save({"state_dict": {"module." + k: v for k, v in official.items()}, "epoch": 7,
                "best_pgd_acc": 0.5}, path)
    state, _ = read_checkpoint(path)
    target = build("cifar10", seed=1, recipe="paper", arch="resnet18")
    load_into(dcs(), target, state, str(path))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        if not name.endswith(".mask"):  # masks are random state the official file does not hold
            assert torch.equal(a, b), name
    source.eval(), target.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), source.freeze_randomness(), target.freeze_randomness():
        for conv_a, conv_b in zip(source.masked_convs(), target.masked_convs()):
            conv_b.resample()
            conv_a.mask = conv_b.mask.clone()
        assert torch.allclose(source(x), target(x), atol=1e-4)
    # the normalization layer's buffers, when the official model was saved with it, are checked
    from bench.defenses.dcs import official_to_bench

    mean, std = torch.tensor(get_dataset("cifar10").spec.mean), torch.tensor(get_dataset("cifar10").spec.std)
    dcs().load_state_dict(target, {**official, "normalize.mean": mean, "normalize.std": std})
    with pytest.raises(RuntimeError, match="normalization"):
        official_to_bench({**official, "normalize.mean": mean + 0.1, "normalize.std": std}, target)


@pytest.mark.parametrize("layout", ["official", "four-random"])
def test_official_wrn_names_map_onto_bench_modules(layout: str) -> None:
    from bench.defenses.dcs import _mismatch_report, official_to_bench

    model = build_meta(arch="wrn-34-10", wrn_layout=layout)
    target = model.state_dict()
    official = to_official(target, "wrn-34-10")
    if layout == "official":
        for key, shape in OFFICIAL_WRN.items():
            assert tuple(official[key].shape) == shape, key
    mapped = official_to_bench({"module." + k: v for k, v in official.items()}, model)
    assert set(mapped) == set(target)
    assert all(mapped[k].shape == target[k].shape for k in target)
    assert len([k for k in target if k.endswith(".mask") or k.startswith("normalize.")]) == \
        len(target) - len(official)  # every official key consumed, the rest are masks/normalization
    assert _mismatch_report(model, mapped) is None


def test_checkpoint_of_the_other_wrn_layout_is_refused_with_a_hint() -> None:
    official = to_official(build_meta(arch="wrn-34-10", wrn_layout="official").state_dict(), "wrn-34-10")
    model = build_meta(arch="wrn-34-10", wrn_layout="four-random")
    with pytest.raises(RuntimeError, match="wrn_layout") as info:
        dcs().load_state_dict(model, official)
    assert "block1.layer.0.conv1.weight" in str(info.value)


def test_resnet_checkpoint_with_the_other_masked_conv_is_a_checkpoint_error() -> None:
    from bench.training.checkpoints import load_into

    official = to_official(build_meta(arch="resnet18", masked_conv=3).state_dict(), "resnet18")
    with pytest.raises(CheckpointError, match="masked_conv"):
        load_into(dcs(), build_meta(arch="resnet18", masked_conv=2), official, "ckpt.pth")


# -- end to end ----------------------------------------------------------------------------------
def test_transfer_draw_run_end_to_end(tmp_path: Path) -> None:
    from bench.config import RunConfig
    from bench.harness.runner import execute
    from bench.results.queries import run_summary
    from bench.results.store import Store

    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    summary = run_summary(store, execute(RunConfig(defense="dcs", dataset="synthetic", epochs=1, n_examples=16,
                                                   protocol="transfer-draw"), store))
    assert summary["protocol"] == "transfer-draw@2" and summary["n_examples"] == 16
    assert [(a["name"], a["norm"]) for a in summary["attacks"]] == [("pgd", "Linf"), ("pgd", "L2")]
    assert all(a["draws"] == 1 for a in summary["attacks"] if a["accuracy"])  # scored with one new draw
    assert summary["clean_draws"]["draws"] == 1
    checks = {c["name"]: c for c in summary["checks"]}
    assert not checks["randomized"]["triggered"]
    assert 0.0 <= summary["clean_accuracy"] <= 1.0

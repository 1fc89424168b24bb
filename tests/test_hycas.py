"""The ``hycas`` defense: every layer's bound is checked against exact singular values, the whole
model's declared bound L = 2 against the empirical audit, for every draw and for arbitrary weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bench.data.base import get_dataset
from bench.defenses.base import Recipe
from bench.errors import BenchError
from bench.models.defended import DefendedModel
from bench.models.lipschitz_layers import (
    AOLConv2d,
    AOLLinear,
    GroupSort,
    NoisyAttentionGate,
    RandomProjectionConv2d,
    conv_gram,
    frozen_randomness,
    lipschitz_product,
    orthonormal_projections,
)
from bench.registry import DEFENSES

CPU = torch.device("cpu")
TOL = 1e-6  # float64 rounding allowance on an operator norm of order 1


@pytest.fixture(autouse=True)
def _home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "home"))


def hycas():
    return DEFENSES.get("hycas")()


def build(dataset: str = "synthetic", seed: int = 0, **hparams) -> DefendedModel:
    spec = get_dataset(dataset).spec
    resolved = hycas().resolve_hparams(hparams, spec.image_size, "cpu")
    torch.manual_seed(seed)
    return hycas().build(spec, spec.image_size, **resolved)


def dense(layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of an affine layer on inputs of ``shape`` (float64): f(e_i) - f(0), column by column."""
    n = math.prod(shape)
    with torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
        zero = torch.zeros(1, *shape, dtype=torch.float64)
        return (layer(basis) - layer(zero)).reshape(n, -1).t()


def spectral_norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.detach(), ord=2))


def jacobian_norm(f, x: torch.Tensor) -> float:
    """Exact spectral norm of the Jacobian of ``f`` at one example ``x`` (1, ...), float64."""
    jac = torch.autograd.functional.jacobian(lambda v: f(v.unsqueeze(0)).squeeze(0), x[0])
    return spectral_norm(jac.reshape(-1, x[0].numel()))


def scramble_(module: nn.Module, scale: float = 3.0, seed: int = 0) -> None:
    """Arbitrary weights: AOL's guarantee must not depend on training or initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# -- AOL layers: exact singular values -------------------------------------------------------------
@pytest.mark.parametrize(("n_in", "n_out"), [(5, 3), (3, 7), (12, 12), (64, 4)])
def test_aol_linear_has_operator_norm_at_most_one(n_in: int, n_out: int) -> None:
    layer = AOLLinear(n_in, n_out).double()
    for seed in range(3):
        scramble_(layer, seed=seed)
        w = layer.rescaled_weight()
        assert spectral_norm(w) <= 1 + TOL
        assert torch.allclose(dense(layer, (n_in,)), w)
        # the AOL scaling by hand: d_i = (sum_j |W^T W|_ij)^(-1/2)
        d = (layer.weight.t() @ layer.weight).abs().sum(1).rsqrt()
        assert torch.allclose(w, layer.weight * d)


def test_conv_gram_is_a_row_of_the_dense_gram_matrix() -> None:
    """conv_gram lists the entries of A^T A for an interior pixel (the infinite-grid Gram)."""
    torch.manual_seed(0)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    size, centre = 9, 4
    a = dense(lambda x: F.conv2d(x, weight, padding=1), (2, size, size))
    gram = (a.t() @ a).view(2, size, size, 2, size, size)
    g = conv_gram(weight)  # (2, 2, 5, 5), offsets -2..2
    for c in range(2):
        row = gram[c, centre, centre]  # (2, 9, 9): entries (c', p') for p = centre
        window = row[:, centre - 2:centre + 3, centre - 2:centre + 3]
        # (A^T A)[(c, p), (c', p')] = G[c, c', p - p']: the window around p is G flipped
        assert torch.allclose(window.flip(-1, -2), g[c], atol=1e-12)
        assert float(row.abs().sum()) == pytest.approx(float(g[c].abs().sum()), rel=1e-12)  # nothing outside


@pytest.mark.parametrize(("c_in", "c_out", "k", "size"), [(2, 3, 3, 4), (3, 2, 5, 5), (1, 4, 3, 6), (4, 4, 1, 3)])
def test_aol_conv_has_operator_norm_at_most_one(c_in: int, c_out: int, k: int, size: int) -> None:
    layer = AOLConv2d(c_in, c_out, k).double()
    for seed in range(3):
        scramble_(layer, seed=seed)
        assert spectral_norm(dense(layer, (c_in, size, size))) <= 1 + TOL


def test_aol_conv_bound_by_power_iteration_on_a_larger_image() -> None:
    """A cross-check (power iteration is a lower estimate, never the guarantee) on 16x16."""
    torch.manual_seed(1)
    layer = AOLConv2d(4, 6, 3, bias=False).double()
    scramble_(layer)
    v = torch.randn(1, 4, 16, 16, dtype=torch.float64)
    for _ in range(200):
        w = F.conv_transpose2d(layer(v), layer.rescaled_weight(), padding=1)
        v = w / w.norm()
    estimate = float(layer(v).detach().norm())
    assert 0.3 < estimate <= 1 + TOL


def test_rescaling_only_the_flattened_kernel_would_not_be_enough() -> None:
    """Why the convolution's Gram kernel is needed: AOL on the flattened (out, in*k*k) matrix
    ignores the overlap of shifted patches and can exceed 1."""
    weight = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    flat = weight.view(1, -1)
    naive = flat * (flat.t() @ flat).abs().sum(1).rsqrt()
    a = dense(lambda x: F.conv2d(x, naive.view(1, 1, 3, 3), padding=1), (1, 8, 8))
    assert spectral_norm(a) > 2.0  # ~3: the naive scaling is unsound
    layer = AOLConv2d(1, 1, 3, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
    assert spectral_norm(dense(layer, (1, 8, 8))) <= 1 + TOL


def test_center_tap_init_is_exactly_orthogonal() -> None:
    layer = AOLConv2d(4, 8, 3).double()
    m = dense(layer, (4, 5, 5))
    s = torch.linalg.svdvals(m)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-10)


# -- GroupSort, downsampling ------------------------------------------------------------------------
def test_groupsort_is_a_one_lipschitz_pairwise_sort() -> None:
    gs = GroupSort()
    x = torch.tensor([[3.0, 1.0, -2.0, 5.0]])
    assert torch.equal(gs(x), torch.tensor([[3.0, 1.0, 5.0, -2.0]]))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 6, 3, 3, generator=g), torch.randn(256, 6, 3, 3, generator=g)
    ratio = (gs(a) - gs(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= 1 + 1e-6
    assert jacobian_norm(gs, a[:1].double()) == pytest.approx(1.0)  # a permutation
    with pytest.raises(ValueError, match="even"):
        gs(torch.zeros(1, 3))


def test_pixel_unshuffle_is_an_isometry() -> None:
    s = torch.linalg.svdvals(dense(nn.PixelUnshuffle(2), (2, 4, 4)))
    assert torch.allclose(s, torch.ones_like(s))


# -- random projection filters --------------------------------------------------------------------
@pytest.mark.parametrize(("rows", "cols"), [(3, 8), (8, 3), (5, 5)])
def test_orthonormal_projections_have_unit_singular_values(rows: int, cols: int) -> None:
    torch.manual_seed(0)
    r = orthonormal_projections(4, rows, cols, dtype=torch.float64)
    assert r.shape == (4, rows, cols)
    s = torch.linalg.svdvals(r)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-12)
    assert not torch.allclose(r[0], r[1])  # independent per example
    half = orthonormal_projections(2, rows, cols, dtype=torch.bfloat16)  # QR runs in float32, then cast
    assert half.dtype == torch.bfloat16 and half.shape == (2, rows, cols)


@pytest.mark.parametrize(("c_in", "c_out", "n_random", "k_random"), [(4, 4, 2, 1), (2, 6, 4, 1), (3, 4, 3, 3)])
def test_random_projection_layer_has_norm_at_most_one_for_every_draw(c_in, c_out, n_random, k_random) -> None:
    torch.manual_seed(0)
    layer = RandomProjectionConv2d(c_in, c_out, n_random, random_kernel=k_random).double()
    scramble_(layer)
    shape = (c_in, 4, 4)
    seen = []
    for _ in range(5):
        with frozen_randomness(layer):
            # the dense map needs one draw for every basis vector: draw for batch size 1, then replicate
            zero = torch.zeros(1, *shape, dtype=torch.float64)
            r = layer.random_filters(zero)
            layer._frozen_draws[((shape[0] * 16, *shape), zero.device, zero.dtype)] = r.expand(shape[0] * 16, -1, -1)
            matrix = dense(layer, shape)
        seen.append(r)
        assert spectral_norm(matrix) <= 1 + TOL
    assert not torch.allclose(seen[0], seen[1])  # a fresh draw per context


def test_random_part_with_1x1_filters_has_norm_exactly_one() -> None:
    torch.manual_seed(0)
    layer = RandomProjectionConv2d(4, 6, 3).double()
    with frozen_randomness(layer):
        x = torch.zeros(1, 4, 3, 3, dtype=torch.float64)
        r = layer.random_filters(x)
        layer._frozen_draws[((36, 4, 3, 3), x.device, x.dtype)] = r.expand(36, -1, -1)
        s = torch.linalg.svdvals(dense(layer.project, (4, 3, 3)))
    assert torch.allclose(s, torch.ones_like(s), atol=1e-10)


def test_random_filters_are_fresh_per_pass_and_per_example_and_frozen_inside_the_context() -> None:
    torch.manual_seed(0)
    layer = RandomProjectionConv2d(4, 4, 2)
    x = torch.randn(3, 4, 5, 5)
    a, b = layer.random_filters(x), layer.random_filters(x)
    assert not torch.allclose(a, b)  # fresh at every pass
    assert not torch.allclose(a[0], a[1])  # independent per example
    same = x[:1].expand(3, -1, -1, -1)
    out = layer(same)
    assert not torch.allclose(out[0], out[1])  # copies of one image see different filters
    with frozen_randomness(layer):
        with frozen_randomness(layer):  # nesting keeps the draw
            first = layer(x)
        assert torch.equal(first, layer(x))
    assert not layer._frozen_draws  # forgotten on exit
    assert not torch.allclose(layer(x), first)


# -- the noisy attention gate ----------------------------------------------------------------------
def test_noisy_gate_is_two_lipschitz_for_every_draw_and_gate_in_unit_interval() -> None:
    torch.manual_seed(0)
    gate = NoisyAttentionGate(4, noise=1.0).double()
    scramble_(gate)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        s = gate.gate(x)
        assert float(s.min()) >= 0 and float(s.max()) <= 1 and not torch.equal(s, gate.gate(x))
    worst = 0.0
    for _ in range(5):
        with frozen_randomness(gate):
            for point in torch.randn(3, 1, 4, 4, 4, dtype=torch.float64):
                worst = max(worst, jacobian_norm(gate, point))
    assert 1.0 <= worst <= 2 + TOL


def test_noisy_gate_bound_two_is_attained() -> None:
    """The bound 2 is tight for this layer: gate fully open, h the identity on sorted pairs."""
    gate = NoisyAttentionGate(2, noise=0.0).double()
    with torch.no_grad():
        gate.logit.fill_(50.0)  # sigmoid = 1
        gate.conv.weight.zero_()
        gate.conv.weight[0, 0, 1, 1] = gate.conv.weight[1, 1, 1, 1] = 1.0
    x = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    x[0, 0] = 2.0  # channel 0 > channel 1 everywhere: GroupSort keeps the order
    assert jacobian_norm(gate, x) == pytest.approx(2.0, rel=1e-9)


def test_chain_rule_product_is_two_and_refuses_unknown_layers() -> None:
    model = build()
    assert model.net.lipschitz == 2.0
    assert lipschitz_product([AOLConv2d(1, 2), GroupSort(), nn.PixelUnshuffle(2)]) == 1.0
    with pytest.raises(TypeError, match="ReLU"):
        lipschitz_product([nn.ReLU()])


# -- the whole model -------------------------------------------------------------------------------
def test_model_declarations() -> None:
    model = build(sigma=0.25)
    assert isinstance(model, DefendedModel)
    assert model.randomized is True and model.randomness_per_example is True
    assert model.lipschitz_bound == 2.0 and "AOL" in model.lipschitz_guarantee
    assert model.sigma == 0.25 and model.margin == 0.0
    assert torch.equal(model.normalize.std, torch.ones_like(model.normalize.std))  # no 1/std factor
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor([0.5]))
    assert DefendedModel.lipschitz_bound is None  # the base class is untouched


def _audit(model: nn.Module, x: torch.Tensor) -> float:
    from bench.certifiers.lipschitz_audit import lipschitz_lower_bound

    return lipschitz_lower_bound(model, x, power_iters=8, pair_steps=12).value


def _briefly_trained(lr: float = 0.5, steps: int = 5) -> DefendedModel:
    """A few large-lr steps on random labels: weights far from initialisation."""
    model = build(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("state", ["fresh", "trained", "scrambled"])
def test_audit_never_exceeds_the_declared_bound(state: str) -> None:
    model = build() if state == "fresh" else _briefly_trained()
    if state == "scrambled":
        scramble_(model.net, scale=5.0)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    value = _audit(model, x)
    assert 0 < value <= model.lipschitz_bound * (1 + 1e-4)


def test_exact_jacobian_norm_is_at_most_two_for_every_draw() -> None:
    """Dense per-example Jacobians (piecewise-linear network: the local linear map) in float64,
    over several draws and points, for a 3-channel 16 px network with two downsampling stages."""
    from bench.models.hycas import build_hycas_net

    torch.manual_seed(0)
    net = build_hycas_net("hycas-small", 3, 5, 16, gate_noise=1.0).double()
    scramble_(net)
    assert net.lipschitz == 2.0
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for _ in range(3):
        with frozen_randomness(net):
            for _ in range(2):
                x = torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64)
                worst = max(worst, jacobian_norm(net, x))
    assert 0 < worst <= 2 + TOL


def test_outputs_vary_between_passes_and_freeze_fixes_them() -> None:
    from bench.harness.checks import check_randomness, check_train_mode

    model = build().eval()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))
        with model.freeze_randomness():
            a = model(x)
            assert torch.equal(a, model(x))
            assert not torch.allclose(model(x[:3]), a[:3])  # another batch shape: its own draw
        assert not torch.allclose(model(x), a)
        copies = model(x[:1].expand(4, -1, -1, -1))
        assert not torch.allclose(copies[0], copies[1])  # independent per example
    assert not check_randomness(model, x, declared=True).triggered
    assert not check_train_mode(model, x).triggered


def test_frozen_draws_work_with_gradients_after_inference_mode() -> None:
    model = build().eval()
    x = torch.rand(2, 1, 8, 8)
    with model.freeze_randomness():
        with torch.inference_mode():
            first = model(x)
        leaf = x.clone().requires_grad_(True)
        out = model(leaf)
        out.sum().backward()
    assert torch.allclose(out.detach(), first) and leaf.grad is not None


# -- certificates --------------------------------------------------------------------------------
class _OneDraw(nn.Module):
    """One frozen draw of a HyCAS model as a deterministic model (for exact per-draw checks)."""

    randomized = False

    def __init__(self, model: DefendedModel) -> None:
        super().__init__()
        self.model = model
        self.lipschitz_bound = model.lipschitz_bound
        self.lipschitz_guarantee = model.lipschitz_guarantee

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _pgd_l2(f, x: torch.Tensor, label: torch.Tensor, eps: torch.Tensor, steps: int = 30) -> torch.Tensor:
    """L2 PGD on the margin (per-example eps), started at x; no clipping to [0, 1] (the certificate
    is about the whole ball)."""
    delta = torch.zeros_like(x, requires_grad=True)
    size = (2.5 * eps / steps).view(-1, 1, 1, 1)
    for _ in range(steps):
        z = f(x + delta)
        true = z.gather(1, label.view(-1, 1)).squeeze(1)
        other = z.masked_fill(F.one_hot(label, z.shape[1]).bool(), -1e9).amax(1)
        (grad,) = torch.autograd.grad((other - true).sum(), delta)
        with torch.no_grad():
            delta += size * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta *= (eps / norm).clamp(max=1.0).view(-1, 1, 1, 1)
    return (x + delta).detach()


@pytest.fixture(scope="module")
def trained_digits() -> DefendedModel:
    ds = get_dataset("digits")
    spec = ds.spec
    resolved = hycas().resolve_hparams({"sigma": 0.25}, spec.image_size, "cpu")
    torch.manual_seed(0)
    model = hycas().build(spec, spec.image_size, **resolved)
    recipe = Recipe(epochs=3, batch_size=64, optimizer="adam", lr=1e-2, weight_decay=0.0, schedule="none")
    hycas().fit(model, ds.load("train"), recipe, spec=spec, device=CPU, seed=0)
    return model.eval()


def test_lipschitz_certifier_certifies_and_its_radii_survive_pgd(trained_digits: DefendedModel) -> None:
    from bench.certifiers.lipschitz import Lipschitz

    model = trained_digits
    test = get_dataset("digits").load("test")
    x = test.images[:64]
    described = Lipschitz().prepare(model)
    assert described["L"] == 2.0 and described["randomized"] is True and "AOL" in described["guarantee"]
    # the randomized certificate (argmax E[clip(logits)]): runs, certifies something with a tight bound
    certs = Lipschitz(n=500, clip=1.0, bound="bernstein").certify(model, x)
    assert len(certs) == 64 and all(c.radius >= 0 for c in certs)
    assert sum(not c.abstained for c in certs) > 0
    # exact per-draw check: one frozen draw is a deterministic 2-Lipschitz model
    torch.manual_seed(5)
    with model.freeze_randomness():
        frozen = _OneDraw(model)
        certs = Lipschitz().certify(frozen, x)
        keep = [i for i, c in enumerate(certs) if not c.abstained and c.radius > 1e-3]
        assert len(keep) >= 16, "too few certified examples to test"
        idx = torch.tensor(keep)
        pred = torch.tensor([certs[i].prediction for i in keep])
        radius = torch.tensor([certs[i].radius for i in keep])
        inside = _pgd_l2(frozen, x[idx], pred, 0.999 * radius)
        assert torch.equal(frozen(inside).argmax(1), pred)  # never flipped inside the certified ball
        outside = _pgd_l2(frozen, x[idx], pred, 4.0 * radius)
        assert bool((frozen(outside).argmax(1) != pred).any())  # the attack itself does work


def test_smoothing_certifier_uses_the_training_sigma(trained_digits: DefendedModel) -> None:
    from bench.certifiers.smoothing import Smoothing

    described = Smoothing(n0=10, n=50).prepare(trained_digits)
    assert described.get("sigma") == 0.25
    test = get_dataset("digits").load("test")
    certs = Smoothing(n0=10, n=50).certify(trained_digits, test.images[:4], test.labels[:4])
    assert len(certs) == 4 and all(c.samples >= 50 for c in certs)


# -- defense metadata, hyperparameters, training --------------------------------------------------
def test_registry_and_info() -> None:
    from bench.defenses.hycas import HyCAS

    assert DEFENSES.get("hycas") is HyCAS and HyCAS.name == "hycas"
    info = HyCAS.info
    assert "HyCAS" in info.paper and "Dhar" in info.paper and info.year == 2026
    assert info.kind == "certified" and info.randomized is True
    assert info.certificates == ("smoothing", "lipschitz") and info.authors_protocol is None
    assert "2605.01519" in info.url
    assert {"paper", "cpu"} <= set(HyCAS.recipes)
    paper = HyCAS.recipes["paper"]
    assert (paper.optimizer, paper.lr, paper.batch_size, paper.epochs) == ("adam", 1e-3, 8, 100)


def test_module_imports_without_torch_and_exposes_the_model_class() -> None:
    import subprocess
    import sys

    code = ("import sys; import bench.defenses.hycas as h; h.HyCAS().resolve_hparams({}, 8, 'cpu'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    from bench.models.hycas import HyCASModel

    assert isinstance(build(), HyCASModel) and HyCASModel.__name__ == "HyCASModel"


def test_default_hparams_and_arch_resolution() -> None:
    assert hycas().resolve_hparams({}, 8, "cpu") == {"arch": "hycas-small", "sigma": 0.5, "margin": 0.0,
                                                     "gate_noise": 0.6, "random_fraction": 0.5}
    assert hycas().resolve_hparams({}, 32, "paper")["arch"] == "hycas-wide"
    assert hycas().resolve_hparams({}, 64, "cpu")["arch"] == "hycas-small"
    assert type(hycas().resolve_hparams({"sigma": 1}, 8, "cpu")["sigma"]) is float


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, float("nan"), float("inf"), "abc", None, True])
def test_invalid_sigma_is_a_one_line_bench_error(bad) -> None:
    spec = get_dataset("synthetic").spec
    for call in (lambda: hycas().resolve_hparams({"sigma": bad}, 8, "cpu"),
                 lambda: hycas().build(spec, 8, sigma=bad)):
        with pytest.raises(BenchError) as info:
            call()
        assert "sigma" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "bad", "message"),
                         [("margin", -1.0, "margin"), ("gate_noise", -0.1, "gate_noise"),
                          ("gate_noise", float("nan"), "gate_noise"), ("random_fraction", 0.0, "random_fraction"),
                          ("random_fraction", 1.0, "random_fraction"), ("random_fraction", 0.01, "random channels"),
                          ("arch", "resnet18", "architecture")])
def test_invalid_hparams_are_bench_errors(name: str, bad, message: str) -> None:
    spec = get_dataset("synthetic").spec
    if name != "random_fraction" or bad != 0.01:  # 0.01 is a valid fraction, too small only for the width
        with pytest.raises(BenchError, match=message):
            hycas().resolve_hparams({name: bad}, 8, "cpu")
    with pytest.raises(BenchError, match=message):
        hycas().build(spec, 8, **{name: bad})


def test_unknown_hparam_and_multilabel_margin_are_refused() -> None:
    with pytest.raises(BenchError, match="unknown hyperparameter"):
        hycas().resolve_hparams({"noise_sd": 0.5}, 8, "cpu")
    from dataclasses import replace

    spec = replace(get_dataset("synthetic").spec, task="multilabel")
    with pytest.raises(BenchError, match="margin"):
        hycas().build(spec, 8, margin=0.5)


def test_fit_trains_with_gaussian_noise_at_sigma(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.training.loop

    seen: dict = {}
    monkeypatch.setattr(bench.training.loop, "fit", lambda model, train, recipe, **kw: seen.update(kw) or "ok")
    spec = get_dataset("synthetic").spec
    model = build(sigma=0.3)
    assert hycas().fit(model, get_dataset("synthetic").load("train"), Recipe(epochs=1, batch_size=8), spec=spec,
                       device=CPU, seed=4) == "ok"
    assert seen["seed"] == 4 and seen["loss_fn"] is None
    torch.manual_seed(0)
    x = torch.rand(256, 1, 8, 8)
    noise = seen["perturb"](model, x, torch.zeros(256, dtype=torch.long)) - x
    assert float(noise.std()) == pytest.approx(0.3, rel=0.03)


def test_margin_hinge(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.training.loop

    seen: dict = {}
    monkeypatch.setattr(bench.training.loop, "fit", lambda model, train, recipe, **kw: seen.update(kw))
    spec = get_dataset("synthetic").spec
    model = build(margin=0.5)
    hycas().fit(model, get_dataset("synthetic").load("train"), Recipe(epochs=1, batch_size=8), spec=spec, device=CPU)
    logits = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0]])
    y = torch.tensor([0, 1])
    target = math.sqrt(2) * 2.0 * 0.5  # the margin that certifies radius 0.5 at L = 2
    hinge = (max(0.0, target - 2.0) + max(0.0, target - 0.5)) / 2
    assert float(seen["loss_fn"](logits, y)) == pytest.approx(float(F.cross_entropy(logits, y)) + hinge, rel=1e-6)


def test_a_few_training_steps_reduce_the_loss_and_keep_the_bound() -> None:
    ds = get_dataset("synthetic")
    model = build(sigma=0.1)
    recipe = Recipe(epochs=4, batch_size=64, optimizer="adam", lr=1e-2, weight_decay=0.0, schedule="none")
    summary = hycas().fit(model, ds.load("train"), recipe, spec=ds.spec, device=CPU, seed=0)
    assert summary.history[-1]["loss"] < summary.history[0]["loss"]
    assert _audit(model, ds.load("test").images[:4]) <= 2.0 * (1 + 1e-4)

"""HyCAS's evaluation fast paths change the cost, never the numbers: the AOL rescaled weight is
reused only while it cannot have changed, and the in-place forward gives bit-identical logits and
consumes the random stream exactly as the differentiable forward does."""

from __future__ import annotations

import pytest
import torch

from bench.models.hycas import HyCASModel, build_hycas_net
from bench.models.inference import frozen_parameters
from bench.models.lipschitz_layers import AOLConv2d, AOLLinear, GroupSort, NoisyAttentionGate

torch.set_num_threads(1)


@pytest.mark.parametrize("layer", [AOLConv2d(4, 6, 3), AOLLinear(5, 3)], ids=["conv", "linear"])
def test_rescaled_weight_is_reused_only_while_unchanged(layer: torch.nn.Module) -> None:
    layer.eval()
    with torch.no_grad():
        first = layer.rescaled_weight()
        assert layer.rescaled_weight() is first  # reused: same weight, same version
        layer.weight.add_(0.1 * torch.randn_like(layer.weight))  # in place, as an optimizer step: version bump
        second = layer.rescaled_weight()
    assert second is not first and not torch.equal(second, first)
    assert torch.equal(second, layer._rescale(layer.weight.detach()))
    layer.load_state_dict({k: v + 0.1 * torch.randn_like(v) for k, v in layer.state_dict().items()})
    with torch.no_grad():
        third = layer.rescaled_weight()
        assert torch.equal(third, layer._rescale(layer.weight.detach())) and not torch.equal(third, second)
        layer.double()  # a dtype move replaces the data
        assert layer.rescaled_weight().dtype == torch.float64


def test_rescaled_weight_is_recomputed_when_training_or_differentiating_the_weight() -> None:
    layer = AOLConv2d(3, 4, 3)
    layer.train()
    with torch.no_grad():
        assert layer.rescaled_weight() is not layer.rescaled_weight()
    layer.eval()
    w = layer.rescaled_weight()  # grad on and weight.requires_grad: the gradient must reach the weight
    assert w.grad_fn is not None
    w.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with frozen_parameters(layer):  # frozen: reused, and usable in a pass that records input gradients
        cached = layer.rescaled_weight()
        x = torch.rand(1, 3, 5, 5, requires_grad=True)
        layer(x).sum().backward()
        assert layer.rescaled_weight() is cached and x.grad is not None
    assert layer.weight.requires_grad  # restored on exit


def test_cache_computed_under_inference_mode_serves_a_differentiable_pass() -> None:
    layer = AOLConv2d(2, 2, 3).eval().requires_grad_(False)
    with torch.inference_mode():
        layer(torch.rand(1, 2, 4, 4))
    x = torch.rand(1, 2, 4, 4, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None


def _logits(model: HyCASModel, x: torch.Tensor, *, grad: bool) -> torch.Tensor:
    torch.manual_seed(5)
    if grad:
        return model(x.clone().requires_grad_(True)).detach()
    with torch.inference_mode():
        return model(x)


def test_in_place_forward_is_bit_identical_to_the_differentiable_forward() -> None:
    torch.manual_seed(0)
    model = HyCASModel(build_hycas_net("hycas-small", 3, 7, 16), [0.5] * 3, (3, 16, 16), 7).eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the identity initialisation, so every layer matters
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(6, 3, 16, 16)
    reference = _logits(model, x, grad=True)  # weights require grad: recomputed, out-of-place
    with frozen_parameters(model):
        fast = _logits(model, x, grad=False)  # cached weights, in-place gate, GroupSort written in place
        again = _logits(model, x, grad=True)  # input gradients only: cached weights, out-of-place
    assert torch.equal(fast, reference) and torch.equal(again, reference)
    torch.manual_seed(5)
    with torch.inference_mode():
        model(x)
        after_fast = torch.rand(3)
    torch.manual_seed(5)
    model(x.clone().requires_grad_(True))
    assert torch.equal(after_fast, torch.rand(3))  # the same number of draws from the global stream


def test_groupsort_and_gate_paths_agree() -> None:
    x = torch.randn(3, 8, 5, 5)
    with torch.no_grad():
        fast = GroupSort()(x)
    slow = GroupSort()(x.clone().requires_grad_(True)).detach()
    assert torch.equal(fast, slow)
    gate = NoisyAttentionGate(8, noise=0.6).eval()
    torch.manual_seed(1)
    with torch.no_grad(), frozen_parameters(gate):
        fast = gate(x)
    torch.manual_seed(1)
    assert torch.equal(fast, gate(x).detach())


def test_frozen_parameters_restores_each_flag() -> None:
    layer = AOLLinear(3, 2)
    layer.bias.requires_grad_(False)
    with frozen_parameters(layer):
        assert not any(p.requires_grad for p in layer.parameters())
    assert layer.weight.requires_grad and not layer.bias.requires_grad


def test_forward_mode_derivatives_are_unchanged_with_frozen_parameters() -> None:
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    model = HyCASModel(build_hycas_net("hycas-small", 1, 4, 8), [0.5], (1, 8, 8), 4).eval()
    x, v = torch.rand(3, 1, 8, 8), torch.randn(3, 1, 8, 8)

    def jvp() -> torch.Tensor:
        with model.freeze_randomness(), torch.no_grad(), fwAD.dual_level():
            return fwAD.unpack_dual(model(fwAD.make_dual(x, v))).tangent.clone()

    torch.manual_seed(3)
    reference = jvp()
    with frozen_parameters(model):  # the audit's setting: no parameter requires grad
        torch.manual_seed(3)
        assert torch.equal(jvp(), reference)


def _autograd_maxmin(x: torch.Tensor) -> torch.Tensor:
    """MaxMin through autograd's own derivatives of maximum and minimum (the reference)."""
    a, b = x.unflatten(1, (x.shape[1] // 2, 2)).unbind(dim=2)
    return torch.stack((torch.maximum(a, b), torch.minimum(a, b)), dim=2).flatten(1, 2)


def _with_ties() -> torch.Tensor:
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    x[:, 1] = x[:, 0]  # every pair of the first channel pair is a tie
    x[0, 3, 0, 0] = x[0, 2, 0, 0]
    return x


def test_groupsort_reverse_mode_matches_autograd_bit_for_bit_ties_included() -> None:
    x, grad = _with_ties(), torch.randn(4, 6, 3, 3, dtype=torch.float64)
    mine = x.clone().requires_grad_(True)
    ref = x.clone().requires_grad_(True)
    out = GroupSort()(mine)
    assert torch.equal(out, _autograd_maxmin(x))
    (g_mine,) = torch.autograd.grad(out, mine, grad)
    (g_ref,) = torch.autograd.grad(_autograd_maxmin(ref), ref, grad)
    assert torch.equal(g_mine, g_ref)
    assert torch.equal(g_mine[:, 0], grad[:, 0] / 2 + grad[:, 1] / 2)  # a tie: half of each


def test_groupsort_double_backward_and_forward_mode_match_autograd() -> None:
    import torch.autograd.forward_ad as fwAD

    x, v = _with_ties(), torch.randn(4, 6, 3, 3, dtype=torch.float64)
    with fwAD.dual_level():
        t_mine = fwAD.unpack_dual(GroupSort()(fwAD.make_dual(x, v))).tangent
        t_ref = fwAD.unpack_dual(_autograd_maxmin(fwAD.make_dual(x, v))).tangent
    assert torch.allclose(t_mine, t_ref, rtol=0, atol=1e-12)  # autograd's formula rounds differently
    results = []
    for f in (GroupSort(), _autograd_maxmin):  # the double-backward Jacobian-vector product of the audit
        leaf = x.clone().requires_grad_(True)
        out = f(leaf)
        dummy = torch.zeros_like(out, requires_grad=True)
        (vjp,) = torch.autograd.grad(out, leaf, grad_outputs=dummy, create_graph=True)
        (jv,) = torch.autograd.grad(vjp, dummy, grad_outputs=v)
        results.append(jv)
    assert torch.allclose(results[0], results[1], rtol=0, atol=1e-12)

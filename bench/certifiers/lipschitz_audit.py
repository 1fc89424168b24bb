"""Empirical lower bound on the L2 Lipschitz constant of a model's logit map, to audit declared bounds.

A model maps images ``x`` in [0, 1] of shape (N, C, H, W) to logits (N, K); view it as
``f: R^(C*H*W) -> R^K``. A *declared* guaranteed bound ``L`` claims ``||f(x) - f(x')||_2 <=
L ||x - x'||_2`` for all x, x'. :func:`lipschitz_lower_bound` searches for evidence against
it: every number it reports is a ratio that was actually achieved, so it is a lower bound on
the true constant, and ``estimate.value > L * (1 + tol)`` (``tol`` covering float rounding,
e.g. 1e-4 in float32) shows the declaration is false. The converse does not hold: a value
below ``L`` proves nothing.

Two searches, both batched over the examples of ``x``:

* **Jacobian power iteration.** Power iteration on ``J(x_i)^T J(x_i)``. Each step is one
  forward pass with forward-mode AD (tangent ``v``, giving ``J v`` next to ``f(x)``) and one
  backward pass of the primal output with ``J v`` as the cotangent, giving ``J^T J v`` --
  no ``create_graph``, no materialised Jacobian. Because the examples of a batch do not
  interact (the model is in eval mode), the Jacobian of the batched map is block-diagonal and
  one batched pass computes every example's ``J_i v_i`` and ``J_i^T J_i v_i`` at once; norms
  are taken per example. The reported value is ``max_k ||J_i v_k||`` over the unit vectors
  ``v_k`` visited (the last one included): each is an achieved ratio ``||J v|| / ||v||`` and,
  where ``f`` is differentiable at ``x_i``, a directional derivative, hence ``<= L``.
  (Automatic differentiation can return values that are no derivative at kinks of
  non-smooth networks; the pair search gives evidence that does not rely on it.)
* **Pair ascent.** Maximise ``||f(a) - f(b)|| / ||a - b||`` over ``a`` and ``b = a + r u /
  ||u||`` with Adam (learning rate ``pair_lr``) on ``a`` and on the direction ``u``, both points
  clamped to [0, 1] (a lower bound over the box is a lower bound over R^d). The pairs start at
  the data points, ``u`` along the top singular direction found by the power iteration, at
  separation ``r = 0.01 sqrt(d)`` (an RMS change of 0.01 per input value): small enough to be
  local, large enough that float rounding of the two forward passes is small against
  ``f(a) - f(b)``. Every ratio recorded was evaluated at the points themselves, with the
  *actual* (post-clamp) distance, from which a rounding allowance of
  ``_ROUNDING * eps * (||f(a)|| + ||f(b)||)`` is subtracted from the numerator; distances below
  ``_MIN_DISTANCE`` are never recorded.

Randomized models (``randomized=True``, or a model declaring ``randomized = True``) draw
fresh randomness at every forward pass; a declared bound must hold for *every* draw, so a
ratio is evidence only if both of its forward passes used the same draw. Such a model must
provide ``freeze_randomness()``, a context manager within which every forward pass uses one
fixed draw (:class:`bench.models.defended.DefendedModel`); without it ``ValueError`` is raised,
and also when two forward passes of the same input inside it disagree. Each pair step runs
``f(a)`` and ``f(b)`` as two separate forward passes of the same batch shape inside one
``freeze_randomness()`` context -- *not* as one concatenated batch, which would be wrong for
models whose draws are independent per example (``randn_like(x)`` noise) or tied to the batch
shape -- and each power iteration (all its steps, so that it iterates one fixed Jacobian) runs
inside one context. Different contexts may give different draws; each ratio is valid for the
draw it was computed with.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from bench.capabilities import capability

__all__ = ["LipschitzEstimate", "lipschitz_lower_bound"]

_ROUNDING = 8.0  # pair-ratio rounding allowance, in units of eps * (||f(a)|| + ||f(b)||)
_MIN_DISTANCE = 1e-6  # pairs closer than this (e.g. after clamping) are never recorded
_PAIR_SCALE = 1e-2  # pair separation: RMS change per input value
_DIRECTION_SCALE = 0.1  # RMS coordinate of the (unnormalised) pair direction Adam updates

_Freeze = Callable[[], "contextlib.AbstractContextManager[object]"]


@dataclass(frozen=True)
class LipschitzEstimate:
    value: float  # best lower bound found: max over methods
    jacobian: float  # max local spectral norm of the Jacobian found by power iteration
    pairs: float  # max ||f(x)-f(x')||_2 / ||x-x'||_2 found by gradient ascent on pairs
    where: int | None  # index (in the given batch) of the data point giving `value`
    evaluations: int  # forward passes used (per example, as the attacks count them)


def lipschitz_lower_bound(model: nn.Module, x: torch.Tensor, *, power_iters: int = 20, pair_steps: int = 50,
                          pair_lr: float = 0.01, seed: int = 0, randomized: bool = False) -> LipschitzEstimate:
    """Lower-bound the L2 Lipschitz constant of ``model`` (images -> logits) around the batch ``x``.

    ``x``: (N, C, H, W) images in [0, 1] on the model's device. ``power_iters`` steps of power
    iteration on ``J^T J`` per example, then ``pair_steps`` steps of pair ascent (0 disables
    either). ``seed`` makes the result reproducible (for a deterministic model, on one device).
    ``where`` is the index of the example whose search gave ``value`` (``None`` when nothing
    positive was found). See the module docstring for the validity argument.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise ValueError("x must be a floating-point tensor of shape (N, ...)")
    if power_iters < 0 or pair_steps < 0:
        raise ValueError("power_iters and pair_steps must be non-negative")
    randomized = bool(randomized or capability(model, "randomized"))
    freeze: _Freeze = contextlib.nullcontext
    if randomized:
        freeze_randomness = getattr(model, "freeze_randomness", None)
        if not callable(freeze_randomness):
            raise ValueError("a randomized model needs freeze_randomness() to fix one draw: a ratio of two "
                             "forward passes is a lower bound only when both use the same draw")
        freeze = freeze_randomness

    x = x.detach()
    n = int(x.shape[0])
    if n == 0:
        return LipschitzEstimate(0.0, 0.0, 0.0, None, 0)
    generator = torch.Generator().manual_seed(int(seed))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    search = _Search(model, freeze, n)
    try:
        with torch.enable_grad():  # the searches differentiate, even when called under no_grad
            if randomized:
                search.check_frozen(x)
            jac, v = search.power_iteration(x, power_iters, generator)
            pairs = search.pair_ascent(x, v, pair_steps, pair_lr)
    finally:
        for module, training in modes:
            module.training = training

    best = torch.maximum(jac, pairs)
    where = int(torch.argmax(best)) if float(best.max()) > 0 else None
    return LipschitzEstimate(value=float(best.max()), jacobian=float(jac.max()), pairs=float(pairs.max()),
                             where=where, evaluations=search.evaluations)


def _norms(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norms, in float64."""
    return torch.linalg.vector_norm(t.detach().reshape(t.shape[0], -1).double(), dim=1)


def _make_dual(primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    # The first dual tensor makes torch load its forward-AD decompositions through the deprecated
    # torch.jit.script; that FutureWarning is torch's own business, not the caller's.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        return fwAD.make_dual(primal, tangent)


def _per_example(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.dtype)


class _Search:
    def __init__(self, model: nn.Module, freeze: _Freeze, n: int) -> None:
        self.model = model
        self.freeze = freeze
        self.n = n
        self.evaluations = 0
        self.forward_mode = True  # forward-mode AD; falls back to the double-backward trick

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.evaluations += self.n
        out = self.model(x)
        if not isinstance(out, torch.Tensor) or out.shape[0] != self.n:
            raise ValueError("the model must return a tensor of logits with one row per example")
        return out

    def check_frozen(self, x: torch.Tensor) -> None:
        with torch.no_grad(), self.freeze():
            first, second = self.forward(x), self.forward(x)
        if not torch.allclose(first, second, rtol=1e-5, atol=1e-6):
            raise ValueError("freeze_randomness() does not fix one draw: two forward passes of the same input "
                             "inside it differ")

    # -- power iteration ---------------------------------------------------------------------

    def jtj(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(J v, J^T J v) per example, from one forward and one backward pass."""
        if self.forward_mode:
            try:
                return self._jtj_forward_mode(x, v)
            except (NotImplementedError, RuntimeError):
                self.forward_mode = False  # an operation without a forward-mode derivative
        leaf = x.clone().requires_grad_(True)
        # Jacobian-vector product by the double-backward trick (reverse mode only); one forward pass.
        out = self.forward(leaf)
        dummy = torch.zeros_like(out, requires_grad=True)
        (vjp_dummy,) = torch.autograd.grad(out, leaf, grad_outputs=dummy, create_graph=True)
        (jv,) = torch.autograd.grad(vjp_dummy, dummy, grad_outputs=v)
        (jtjv,) = torch.autograd.grad(out, leaf, grad_outputs=jv.detach())
        return jv.detach(), jtjv.detach()

    def _jtj_forward_mode(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.clone().requires_grad_(True)
        with fwAD.dual_level():
            out = self.forward(_make_dual(leaf, v))
            primal, tangent = fwAD.unpack_dual(out)
            if tangent is None:  # the output does not depend on the input
                tangent = torch.zeros_like(primal)
            tangent = tangent.detach()
            if not primal.requires_grad:
                return tangent, torch.zeros_like(x)
            (jtjv,) = torch.autograd.grad(primal, leaf, grad_outputs=tangent, allow_unused=True)
        return tangent, torch.zeros_like(x) if jtjv is None else jtjv.detach()

    def power_iteration(self, x: torch.Tensor, iters: int,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Best achieved ||J_i v|| per example (float64) and the final unit directions v."""
        v = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
        v = v / _per_example(_norms(v).clamp_min(1e-30), v).to(x.device)
        best = torch.zeros(self.n, dtype=torch.float64, device=x.device)
        if iters == 0:
            return best, v
        with self.freeze():  # one draw for the whole iteration: iterate one fixed Jacobian
            for step in range(iters + 1):
                # v is a unit vector (up to rounding): record the achieved ratio ||J v|| / ||v||.
                if step == iters:
                    with fwAD.dual_level(), torch.no_grad():
                        jv = self._jv_only(x, v)
                else:
                    jv, w = self.jtj(x, v)
                ratio = _norms(jv) / _norms(v).clamp_min(1e-30)
                best = torch.maximum(best, torch.where(torch.isfinite(ratio), ratio, torch.zeros_like(ratio)))
                if step < iters:
                    norm = _norms(w)
                    keep = norm > 0  # J^T J v = 0: v is in the null space; keep it
                    scaled = w / _per_example(norm.clamp_min(1e-30), w)
                    v = torch.where(_per_example(keep, w).bool(), scaled, v).detach()
        return best, v

    def _jv_only(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.forward_mode:
            out = self.forward(_make_dual(x, v))
            tangent = fwAD.unpack_dual(out).tangent
            return torch.zeros_like(out) if tangent is None else tangent.detach()
        with torch.enable_grad():
            jv, _ = self.jtj(x, v)
        return jv

    # -- pair ascent ---------------------------------------------------------------------------

    def pair_ascent(self, x: torch.Tensor, v: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
        """Best achieved ||f(a) - f(b)|| / ||a - b|| per example (float64, rounding allowance removed)."""
        best = torch.zeros(self.n, dtype=torch.float64, device=x.device)
        if steps == 0:
            return best
        d = x[0].numel()
        radius = _PAIR_SCALE * math.sqrt(d)
        a0 = x.clamp(0, 1)
        # Start along +v or -v, whichever survives clamping to [0, 1] better.
        dist_plus = _norms((a0 + radius * v).clamp(0, 1) - a0)
        dist_minus = _norms((a0 - radius * v).clamp(0, 1) - a0)
        # u's scale sets Adam's relative step on the direction: coordinates ~0.1, so lr 0.01 turns it ~10%.
        u0 = torch.where(_per_example(dist_plus >= dist_minus, v).bool(), v, -v) * (_DIRECTION_SCALE * math.sqrt(d))
        a = a0.clone().requires_grad_(True)
        u = u0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([a, u], lr=lr, maximize=True)
        for step in range(steps + 1):
            final = step == steps
            with torch.set_grad_enabled(not final), self.freeze():  # both points: one draw
                u_norm = torch.linalg.vector_norm(u.reshape(self.n, -1), dim=1).clamp_min(1e-30)
                direction = u / _per_example(u_norm, u)
                b = (a + radius * direction).clamp(0, 1)
                fa, fb = self.forward(a), self.forward(b)
                distance = torch.linalg.vector_norm((a - b).reshape(self.n, -1), dim=1)
                numerator = torch.linalg.vector_norm((fa - fb).reshape(self.n, -1), dim=1)
                ratio = numerator / distance.clamp_min(_MIN_DISTANCE)
                if not final:
                    optimizer.zero_grad(set_to_none=True)
                    ratio.sum().backward()
            # Record from the evaluated points, in float64, with the actual distance.
            dist64 = _norms(a.detach().double() - b.detach().double())
            eps = max(torch.finfo(x.dtype).eps, torch.finfo(fa.dtype).eps)  # the coarser precision
            allowance = _ROUNDING * eps * (_norms(fa) + _norms(fb))
            change = _norms(fa.detach().double() - fb.detach().double())
            achieved = (change - allowance).clamp_min(0) / dist64.clamp_min(_MIN_DISTANCE)
            valid = (dist64 >= _MIN_DISTANCE) & torch.isfinite(achieved)  # no evidence from inf or NaN
            best = torch.maximum(best, torch.where(valid, achieved, torch.zeros_like(achieved)))
            if not final:
                if u.grad is not None:
                    u.grad.nan_to_num_(0.0)
                if a.grad is not None:
                    a.grad.nan_to_num_(0.0)
                optimizer.step()
                with torch.no_grad():
                    a.clamp_(0, 1)
        return best

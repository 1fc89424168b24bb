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

Both searches start at the data, so a bound that is false only far from every example (a steep
region no example is near) passes them. :func:`lipschitz_box_search` runs the same two searches
from uniform random points of the input box [0, 1]^d, and a third on **far-apart pairs** (random
pairs, and opposite corners ``(c, 1 - c)`` starting with all-black / all-white), recorded as given
and then after Adam steps on both ends of each pair (projected onto the box); its budget
``points`` (default :data:`BOX_POINTS` = 32) sets the number of starts of each kind. What no search
here can find: a violation confined to a region that no start lands in and no ascent reaches
(e.g. a tiny steep region: ascent follows gradients, which are zero in flat parts and carry no
information about a region they do not touch), a violation only along directions that power
iteration and pair ascent do not turn to (they converge to a local maximum), and an excess
smaller than the rounding allowances. The audit is evidence against a bound, never a proof of one.

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

__all__ = ["BOX_POINTS", "BoxEstimate", "LipschitzEstimate", "lipschitz_box_search", "lipschitz_lower_bound"]

_ROUNDING = 8.0  # pair-ratio rounding allowance, in units of eps * (||f(a)|| + ||f(b)||)
_MIN_DISTANCE = 1e-6  # pairs closer than this (e.g. after clamping) are never recorded
_PAIR_SCALE = 1e-2  # pair separation: RMS change per input value
_DIRECTION_SCALE = 0.1  # RMS coordinate of the (unnormalised) pair direction Adam updates
BOX_POINTS = 32  # default budget of the search away from the data: random points, and pairs of each kind

_Freeze = Callable[[], "contextlib.AbstractContextManager[object]"]


@dataclass(frozen=True)
class LipschitzEstimate:
    value: float  # best lower bound found: max over methods
    jacobian: float  # max local spectral norm of the Jacobian found by power iteration
    pairs: float  # max ||f(x)-f(x')||_2 / ||x-x'||_2 found by gradient ascent on pairs
    where: int | None  # index (in the given batch) of the data point giving `value`
    evaluations: int  # forward passes used (per example, as the attacks count them)


@dataclass(frozen=True)
class BoxEstimate:
    """What :func:`lipschitz_box_search` found away from the data; every number an achieved ratio."""

    value: float  # best lower bound found: max over the three
    jacobian: float  # power iteration at uniform random points of the box
    pairs: float  # pair ascent (a and the direction) started at those points
    far: float  # far-apart pairs: random pairs and opposite corners, then ascent on both ends
    evaluations: int  # forward passes used (per point, as the attacks count them)


def lipschitz_lower_bound(model: nn.Module, x: torch.Tensor, *, power_iters: int = 20, pair_steps: int = 50,
                          pair_lr: float = 0.01, seed: int = 0, randomized: bool = False) -> LipschitzEstimate:
    """Lower-bound the L2 Lipschitz constant of ``model`` (images -> logits) around the batch ``x``.

    ``x``: (N, C, H, W) images in [0, 1] on the model's device. ``power_iters`` steps of power
    iteration on ``J^T J`` per example, then ``pair_steps`` steps of pair ascent (0 disables
    either). ``seed`` makes the result reproducible (for a deterministic model, on one device).
    ``where`` is the index of the example whose search gave ``value`` (``None`` when nothing
    positive was found). See the module docstring for the validity argument. It searches near the
    data only; :func:`lipschitz_box_search` searches the rest of the input box.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise ValueError("x must be a floating-point tensor of shape (N, ...)")
    if power_iters < 0 or pair_steps < 0:
        raise ValueError("power_iters and pair_steps must be non-negative")
    freeze = _freeze_of(model, randomized)

    x = x.detach()
    n = int(x.shape[0])
    if n == 0:
        return LipschitzEstimate(0.0, 0.0, 0.0, None, 0)
    generator = torch.Generator().manual_seed(int(seed))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    search = _Search(model, freeze or contextlib.nullcontext)
    try:
        with torch.enable_grad():  # the searches differentiate, even when called under no_grad
            if freeze is not None:
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


def lipschitz_box_search(model: nn.Module, shape: tuple[int, ...], *, points: int = BOX_POINTS,
                         power_iters: int = 20, pair_steps: int = 50, pair_lr: float = 0.01, seed: int = 0,
                         randomized: bool = False, device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.float32) -> BoxEstimate:
    """Lower-bound the L2 Lipschitz constant of ``model`` on the whole input box [0, 1]^shape, without data.

    :func:`lipschitz_lower_bound` only looks near the data; a bound that is false far from it (a
    steep region no example is near) passes it. This search starts from points that do not depend
    on the data, ``points`` of each kind (the budget; default :data:`BOX_POINTS` = 32):

    * **random points**: uniform in the box; ``power_iters`` steps of Jacobian power iteration and
      ``pair_steps`` steps of pair ascent at them, exactly as :func:`lipschitz_lower_bound` does at
      data points (pair ascent moves the point and the direction uphill: adversarially chosen
      points, projected onto the box);
    * **far-apart pairs**: ``points`` pairs of independent uniform points and ``points`` pairs of
      opposite corners ``(c, 1 - c)`` (the first ``c`` all zeros, the others uniform over the
      corners), each ratio recorded as given, then ``pair_steps`` Adam steps (``pair_lr``) on both
      ends of every pair, projected onto the box.

    Every number is an achieved ratio with the rounding allowance of the module docstring, so a
    lower bound on the true constant; a value below a declared bound proves nothing. Cost, in
    single-image forward passes: ``points * (power_iters + 1)`` with as many backward passes, plus
    ``points * 6 * (pair_steps + 1)`` (two passes per pair and step, three sets of pairs), with
    backward passes on all but the last step: about 11,000 passes at the defaults (seconds on CPU for
    a digits-sized model). ``shape``: one image's shape (C, H, W); ``device`` and ``dtype`` of the
    points (the model's). Randomized models: as for :func:`lipschitz_lower_bound`.
    """
    if points < 0 or power_iters < 0 or pair_steps < 0:
        raise ValueError("points, power_iters and pair_steps must be non-negative")
    if points == 0:
        return BoxEstimate(0.0, 0.0, 0.0, 0.0, 0)
    freeze = _freeze_of(model, randomized)
    generator = torch.Generator().manual_seed(int(seed))

    def uniform() -> torch.Tensor:
        u = torch.rand((points, *shape), generator=generator, dtype=torch.float64)
        return u.to(device=device, dtype=dtype)

    start, pair_a, pair_b, corner = uniform(), uniform(), uniform(), (uniform() < 0.5).to(dtype)
    corner[0] = 0
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    search = _Search(model, freeze or contextlib.nullcontext)
    try:
        with torch.enable_grad():
            if freeze is not None:
                search.check_frozen(start)
            jac, v = search.power_iteration(start, power_iters, generator)
            pairs = search.pair_ascent(start, v, pair_steps, pair_lr)
            far = search.far_pairs(torch.cat([pair_a, corner]), torch.cat([pair_b, 1 - corner]), pair_steps, pair_lr)
    finally:
        for module, training in modes:
            module.training = training
    values = (float(jac.max()), float(pairs.max()), float(far.max()))
    return BoxEstimate(max(values), *values, evaluations=search.evaluations)


def _freeze_of(model: nn.Module, randomized: bool) -> _Freeze | None:
    """The context fixing one draw; None for a deterministic model (``ValueError`` when a randomized one has none)."""
    if not (randomized or capability(model, "randomized")):
        return None
    freeze_randomness = getattr(model, "freeze_randomness", None)
    if not callable(freeze_randomness):
        raise ValueError("a randomized model needs freeze_randomness() to fix one draw: a ratio of two "
                         "forward passes is a lower bound only when both use the same draw")
    return freeze_randomness


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
    def __init__(self, model: nn.Module, freeze: _Freeze) -> None:
        self.model = model
        self.freeze = freeze
        self.evaluations = 0
        self.forward_mode = True  # forward-mode AD; falls back to the double-backward trick

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.evaluations += len(x)
        out = self.model(x)
        if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != len(x):
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
        best = torch.zeros(len(x), dtype=torch.float64, device=x.device)
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

    def achieved(self, a: torch.Tensor, b: torch.Tensor, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        """The ratio ``||f(a) - f(b)|| / ||a - b||`` per pair, recorded from the evaluated points in
        float64 with the actual distance and the rounding allowance removed; 0 where it is no evidence
        (distance below ``_MIN_DISTANCE``, inf or NaN)."""
        dist64 = _norms(a.detach().double() - b.detach().double())
        eps = max(torch.finfo(a.dtype).eps, torch.finfo(fa.dtype).eps)  # the coarser precision
        allowance = _ROUNDING * eps * (_norms(fa) + _norms(fb))
        change = _norms(fa.detach().double() - fb.detach().double())
        achieved = (change - allowance).clamp_min(0) / dist64.clamp_min(_MIN_DISTANCE)
        valid = (dist64 >= _MIN_DISTANCE) & torch.isfinite(achieved)  # no evidence from inf or NaN
        return torch.where(valid, achieved, torch.zeros_like(achieved))

    def pair_ascent(self, x: torch.Tensor, v: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
        """Best achieved ||f(a) - f(b)|| / ||a - b|| per example (float64, rounding allowance removed)."""
        n = len(x)
        best = torch.zeros(n, dtype=torch.float64, device=x.device)
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
                u_norm = torch.linalg.vector_norm(u.reshape(n, -1), dim=1).clamp_min(1e-30)
                direction = u / _per_example(u_norm, u)
                b = (a + radius * direction).clamp(0, 1)
                fa, fb = self.forward(a), self.forward(b)
                if not final:
                    _ascend(optimizer, _ratio(a, b, fa, fb))
            best = torch.maximum(best, self.achieved(a, b, fa, fb))
            if not final:
                _step(optimizer, a)
        return best

    def far_pairs(self, a0: torch.Tensor, b0: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
        """Best achieved ``||f(a) - f(b)|| / ||a - b||`` per pair, from the pairs ``(a0, b0)`` as given
        and after each of ``steps`` Adam steps on both points (projected onto [0, 1])."""
        best = torch.zeros(len(a0), dtype=torch.float64, device=a0.device)
        a = a0.clamp(0, 1).clone().requires_grad_(True)
        b = b0.clamp(0, 1).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([a, b], lr=lr, maximize=True)
        for step in range(steps + 1):
            final = step == steps
            with torch.set_grad_enabled(not final), self.freeze():  # both points: one draw
                fa, fb = self.forward(a), self.forward(b)
                if not final:
                    _ascend(optimizer, _ratio(a, b, fa, fb))
            best = torch.maximum(best, self.achieved(a, b, fa, fb))
            if not final:
                _step(optimizer, a, b)
        return best


def _ratio(a: torch.Tensor, b: torch.Tensor, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """The differentiable pair ratio the ascent maximises (recorded values come from ``achieved``)."""
    n = len(a)
    distance = torch.linalg.vector_norm((a - b).reshape(n, -1), dim=1)
    numerator = torch.linalg.vector_norm((fa - fb).reshape(n, -1), dim=1)
    return numerator / distance.clamp_min(_MIN_DISTANCE)


def _ascend(optimizer: torch.optim.Optimizer, ratio: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    ratio.sum().backward()


def _step(optimizer: torch.optim.Optimizer, *boxed: torch.Tensor) -> None:
    """One ascent step (NaN gradients zeroed), then the points in ``boxed`` projected onto [0, 1]."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                param.grad.nan_to_num_(0.0)
    optimizer.step()
    with torch.no_grad():
        for point in boxed:
            point.clamp_(0, 1)

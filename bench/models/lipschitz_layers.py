"""Layers whose L2 Lipschitz constant is bounded *by construction*, for every weight and every draw.

Every layer here satisfies ``||f(x) - f(x')||_2 <= L ||x - x'||_2`` for all inputs with the constant
``L`` stated in its docstring, whatever its parameters are (so the bound survives any amount of
training) and, for the stochastic layers, whatever their random draw is. No bound is *estimated*:
power iteration gives a lower estimate of a spectral norm and dividing by it guarantees nothing;
it appears only in the tests, as a check of these proofs.

* :class:`AOLLinear`, :class:`AOLConv2d`: almost-orthogonal Lipschitz (AOL) layers (Prach & Lampert,
  ECCV 2022): the weight is rescaled on the input side by a diagonal matrix computed from the
  absolute values of its Gram matrix; operator norm <= 1.
* :class:`GroupSort`: sorts channel pairs (MaxMin); 1-Lipschitz (it permutes coordinates per pair).
* ``nn.PixelUnshuffle(2)`` (invertible downsampling): a permutation of coordinates, an isometry.
* :class:`RandomProjectionConv2d`: a learned AOL convolution concatenated with orthonormal random
  1x1 (or k x k) projections drawn fresh at every forward pass, the whole scaled by 1/sqrt(2);
  operator norm <= 1 for every draw.
* :class:`NoisyAttentionGate`: ``y = x + s * h(x)`` with ``h`` 1-Lipschitz and a noisy gate ``s`` in
  [0, 1] that does not depend on ``x``; 2-Lipschitz for every draw.

Randomness. :class:`StochasticModule` draws from the global torch RNG, independently per example
(so a batch of copies of one image gives independent samples). Inside :func:`frozen_randomness`
each stochastic layer draws once per input shape and reuses that draw until the context exits, so
two forward passes of same-shaped batches use one fixed draw (per example position).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn import functional as F

__all__ = [
    "AOLConv2d",
    "AOLLinear",
    "GroupSort",
    "NoisyAttentionGate",
    "RandomProjectionConv2d",
    "StochasticModule",
    "aol_scale",
    "conv_gram",
    "frozen_randomness",
    "lipschitz_product",
    "orthonormal_projections",
]

_TINY = 1e-12  # floor of the AOL row sums: a smaller value only shrinks D, which keeps the bound


def _tracked(*tensors: torch.Tensor) -> bool:
    """Whether autodiff may record operations on ``tensors``: reverse mode (grad enabled and one of
    them requires grad) or forward mode (one of them carries a tangent; inference mode drops both).
    The evaluation fast paths below (in-place arithmetic, ``out=``, a reused rescaled weight) run
    only when this is False, so every gradient is exactly what the out-of-place code gives."""
    if torch.is_inference_mode_enabled():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    return any(fwAD.unpack_dual(t).tangent is not None for t in tensors)


def aol_scale(gram: torch.Tensor) -> torch.Tensor:
    """AOL's input-side scaling ``d_i = (sum_j |P_ij|)^(-1/2)`` from a Gram matrix ``P = W^T W``.

    ``gram`` is (n, n) for a matrix, or (n, n, ...) for a convolution (the Gram kernel of
    :func:`conv_gram`, whose trailing axes are the spatial offsets); the sum runs over every axis
    but the first.
    """
    rows = gram.abs().flatten(1).sum(dim=1)
    return rows.clamp_min(_TINY).rsqrt()


def conv_gram(weight: torch.Tensor) -> torch.Tensor:
    """Gram kernel of a stride-1 convolution with kernel ``weight`` (out, in, kh, kw).

    Returns ``G`` of shape (in, in, 2kh-1, 2kw-1) with ``G[c, c', delta] = sum_{o, u} K[o, c, u + delta]
    K[o, c', u]``, the cross-correlation of the kernel with itself summed over output channels.
    On the infinite grid the convolution ``A`` has ``(A^T A)[(c, p), (c', p')] = G[c, c', p - p']``:
    ``A^T A`` is itself a convolution with kernel ``G``, and ``G`` lists every nonzero entry of a
    row of ``A^T A`` exactly once.
    """
    kh, kw = weight.shape[-2:]
    w = weight.transpose(0, 1)  # (in, out, kh, kw): "batch" = input channel, "channels" = output channel
    return F.conv2d(w, w, padding=(kh - 1, kw - 1))


def _orthogonal_(weight: torch.Tensor) -> torch.Tensor:
    """Orthogonal initialisation: a linear weight (out, in) orthogonal; a conv kernel (out, in, k, k)
    zero except an orthogonal (out, in) centre tap. Then the Gram kernel is ``C^T C`` at offset 0
    only, so with ``out >= in`` the AOL scaling is 1 and the layer starts exactly norm-preserving
    (measured on digits: larger logit margins than an orthogonal flattened kernel)."""
    with torch.no_grad():
        centre = torch.empty(weight.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
        nn.init.orthogonal_(centre)
        if weight.ndim == 2:
            weight.copy_(centre)
        else:
            weight.zero_()
            weight[:, :, weight.shape[-2] // 2, weight.shape[-1] // 2] = centre
    return weight


class _AOLLayer(nn.Module):
    """Shared by the AOL layers: the rescaled weight, recomputed only when it can have changed.

    The rescaling is a deterministic function of ``weight``, and its cost does not shrink with the
    batch (the Gram kernel of a 256-channel 3x3 convolution is about a billion multiply-adds, as much
    as a 64 px image's whole forward pass at batch 32). :meth:`rescaled_weight` therefore reuses the
    value it computed last when (1) the layer is in eval mode, (2) no derivative with respect to the
    weight can be asked for (:func:`_tracked`: autograd off or ``weight.requires_grad`` False, and
    no forward-mode tangent on it), and (3) the weight is
    the same storage at the same version: an optimizer step or ``load_state_dict`` (in-place, version
    bump), a device or dtype move, or an assignment of new data all force a recomputation. The
    reused tensor holds exactly the values a recomputation would give, so the proof of the bound is
    untouched; in training mode, or whenever the weight may need a gradient, it is always recomputed.
    """

    weight: nn.Parameter

    def __init__(self) -> None:
        super().__init__()
        self._rescaled: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (source, version, value)

    def _rescale(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rescaled_weight(self) -> torch.Tensor:
        """``weight`` with AOL's input-side scaling (operator norm <= 1)."""
        w = self.weight
        if self.training or _tracked(w):
            return self._rescale(w)
        cached = self._rescaled
        if cached is not None and cached[0].data_ptr() == w.data_ptr() and cached[0].dtype == w.dtype \
                and cached[0].device == w.device and cached[1] == w._version:
            return cached[2]
        # a normal tensor even under inference_mode, so a later pass with autograd on can use it;
        # the source is held (a detached alias sharing the version counter), so its storage cannot be
        # freed and its address reused by other data while the entry stands
        with torch.inference_mode(False), torch.no_grad():
            value = self._rescale(w)
        self._rescaled = (w.detach(), w._version, value)
        return value


class AOLLinear(_AOLLayer):
    """Linear layer ``x -> W D x + b`` with ``||W D||_2 <= 1`` for every ``W`` (AOL).

    ``D = diag(d)``, ``d_i = (sum_j |W^T W|_ij)^(-1/2)``. **Proof.** Let ``M = W^T W`` (symmetric).
    For every ``x``, ``||W D x||^2 = x^T D M D x = sum_ij M_ij d_i x_i d_j x_j
    <= sum_ij |M_ij| (d_i^2 x_i^2 + d_j^2 x_j^2) / 2`` (since ``|ab| <= (a^2 + b^2) / 2``)
    ``= sum_i d_i^2 x_i^2 sum_j |M_ij|`` (by the symmetry of ``|M|``) ``= ||x||^2``.
    With ``d_i`` made smaller (the floor on the row sums) the bound only improves. The bias does
    not change differences. (Prach & Lampert, "Almost-Orthogonal Layers for Efficient
    General-Purpose Lipschitz Networks", ECCV 2022, Theorem 1.)
    """

    lipschitz = 1.0

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(_orthogonal_(torch.empty(self.out_features, self.in_features)))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def _rescale(self, w: torch.Tensor) -> torch.Tensor:
        return w * aol_scale(w.t() @ w).unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.rescaled_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class AOLConv2d(_AOLLayer):
    """Stride-1, zero-padded ("same") convolution whose operator norm is <= 1 for every kernel (AOL).

    The kernel ``K`` (out, in, k, k) is rescaled per *input* channel: ``K'[o, c] = d_c K[o, c]`` with
    ``d_c = (sum_{c', delta} |G[c, c', delta]|)^(-1/2)`` and ``G`` the Gram kernel
    (:func:`conv_gram`), i.e. the exact AOL rescaling of the convolution viewed as a matrix.

    **Proof sketch.** (1) *Infinite grid.* Let ``A`` be the convolution on finitely supported
    signals over Z^2 and ``D`` the per-channel diagonal (it scales channel ``c`` by ``d_c`` at every
    position). ``M = A^T A`` has entries ``M[(c, p), (c', p')] = G[c, c', p - p']``, so the absolute
    row sum of row ``(c, p)`` is ``r_c = sum_{c', delta} |G[c, c', delta]|``, independent of ``p``, and
    ``|M|`` is symmetric. The AOL argument of :class:`AOLLinear` then gives, for every finitely
    supported ``x``, ``||A D x||^2 <= sum_{c, p} d_c^2 x_{c,p}^2 r_c = ||x||^2``. (2) *Finite image
    with zero padding.* The layer is ``R A D E``: ``E`` embeds the H x W image into Z^2 with zeros
    outside (an isometry; it commutes with the per-channel ``D``), and ``R`` keeps the H x W output
    positions (a coordinate restriction, norm <= 1). Hence ``||R A D E|| <= ||A D|| <= 1``. The
    bound holds for any zero padding and any output window, and for odd or even ``k``. The bias
    does not change differences. Circular padding would need the circular Gram and is not used.
    """

    lipschitz = 1.0

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"AOLConv2d: kernel_size must be odd and >= 1, got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = int(in_channels), int(out_channels), int(kernel_size)
        self.padding = kernel_size // 2
        weight = torch.empty(self.out_channels, self.in_channels, kernel_size, kernel_size)
        self.weight = nn.Parameter(_orthogonal_(weight))
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None

    def _rescale(self, w: torch.Tensor) -> torch.Tensor:
        return w * aol_scale(conv_gram(w)).view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.rescaled_weight(), self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"padding={self.padding}, bias={self.bias is not None}")


class GroupSort(nn.Module):
    """GroupSort with groups of 2 (MaxMin) along dim 1: ``(a, b) -> (max(a, b), min(a, b))``.

    1-Lipschitz: on each pair it either keeps or swaps the two coordinates, and
    ``|max(a,b) - max(a',b')|^2 + |min(a,b) - min(a',b')|^2 <= |a - a'|^2 + |b - b'|^2`` (sorting is
    1-Lipschitz in L2); summing over the disjoint pairs gives the bound for the whole tensor.
    It is also gradient-norm preserving (its Jacobian is a permutation wherever it exists).

    Its gradients (:class:`_MaxMin`) are, bit for bit, those autograd gives ``torch.maximum`` and
    ``torch.minimum`` (ties included: each side gets half), at a fraction of their cost.
    """

    lipschitz = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if channels % 2:
            raise ValueError(f"GroupSort needs an even number of channels, got {channels}")
        return _MaxMin.apply(x) if _tracked(x) else _maxmin(x)


def _pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two members (a, b) of each channel pair of ``x`` (views)."""
    a, b = x.unflatten(1, (x.shape[1] // 2, 2)).unbind(dim=2)
    return a, b


def _maxmin(x: torch.Tensor) -> torch.Tensor:
    """MaxMin without autodiff, written in place (no stacked copy)."""
    a, b = _pairs(x)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    top, bottom = _pairs(out)
    torch.maximum(a, b, out=top)
    torch.minimum(a, b, out=bottom)
    return out


class _MaxMin(torch.autograd.Function):
    """MaxMin with autograd's derivatives of ``maximum``/``minimum`` computed directly.

    Reverse mode: a gets the max output's gradient where a > b, the min output's where a < b and
    half of each at a tie (b the other way round); autograd's own backward of the stacked
    ``maximum``/``minimum`` builds the same values, bit for bit, from eight masked passes. Forward
    mode routes the tangents the same way (autograd's formula ``b_t + w (a_t - b_t)`` agrees up to
    rounding). A backward that records a graph (``create_graph``) stays differentiable."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return _maxmin(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _route(x, grad)  # (max, min) gradients back to (a, b)

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _route(x, tangent)  # (a, b) tangents forward to (max, min)


def _route(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """MaxMin's derivative on ``values``, either way: with (p, q) each channel pair of ``values`` and
    (a, b) that of ``x``, the pair (p, q) where a > b, (q, p) where a < b and (p/2 + q/2) twice at a
    tie. Reverse mode reads (p, q) as the (max, min) gradients and gets (a, b)'s; forward mode reads
    them as (a, b)'s tangents and gets (max, min)'s: the map is its own transpose."""
    a, b = _pairs(x)
    p, q = _pairs(values)
    above, tie = a > b, a == b
    first, second = torch.where(above, p, q), torch.where(above, q, p)
    if bool(tie.any()):
        half = p / 2 + q / 2
        first, second = torch.where(tie, half, first), torch.where(tie, half, second)
    return torch.stack((first, second), dim=2).flatten(1, 2)


# -- randomness ----------------------------------------------------------------------------------------
class StochasticModule(nn.Module):
    """A module that draws fresh randomness at every forward pass, freezable by :func:`frozen_randomness`.

    Draws come from the global torch RNG (seeded by the harness). Inside the frozen context, the
    first draw for a given key (the input's shape, device and dtype) is kept and returned again for
    the same key until the context exits.
    """

    def __init__(self) -> None:
        super().__init__()
        self._frozen_depth = 0
        self._frozen_draws: dict[tuple, torch.Tensor] = {}

    @property
    def frozen(self) -> bool:
        return self._frozen_depth > 0

    def draw(self, key: tuple, sample: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self.frozen:
            return sample()
        cached = self._frozen_draws.get(key)
        if cached is None:
            # a normal tensor even under inference_mode, so that a later pass that records gradients
            # inside the same context can use it
            with torch.inference_mode(False):
                cached = sample()
            self._frozen_draws[key] = cached
        return cached


@contextmanager
def frozen_randomness(module: nn.Module) -> Iterator[None]:
    """Within this context every :class:`StochasticModule` inside ``module`` reuses one draw per
    input shape; contexts nest, and the draws are forgotten when the outermost one exits."""
    stochastic = [m for m in module.modules() if isinstance(m, StochasticModule)]
    for m in stochastic:
        m._frozen_depth += 1
    try:
        yield
    finally:
        for m in stochastic:
            m._frozen_depth -= 1
            if m._frozen_depth == 0:
                m._frozen_draws.clear()


def orthonormal_projections(n: int, rows: int, cols: int, *, device: torch.device | None = None,
                            dtype: torch.dtype | None = None) -> torch.Tensor:
    """``n`` independent random (rows, cols) matrices with orthonormal rows (rows <= cols) or
    orthonormal columns (rows > cols), Haar-distributed: QR of Gaussian matrices with the signs of
    R's diagonal moved into Q. Each has spectral norm exactly 1 (all singular values are 1)."""
    tall, short = max(rows, cols), min(rows, cols)
    # QR in float32 at least (no half-precision QR); the result is cast back to ``dtype``
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    gauss = torch.randn(n, tall, short, device=device, dtype=work)
    q, r = torch.linalg.qr(gauss)  # q: (n, tall, short) with orthonormal columns
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    q = q * torch.where(signs == 0, torch.ones_like(signs), signs).unsqueeze(1)
    q = q.transpose(1, 2) if rows <= cols else q
    return q if dtype is None else q.to(dtype)


class RandomProjectionConv2d(StochasticModule):
    """Random projection filters (after RPF, Dong & Xu 2023) with a provable operator norm <= 1.

    Output = ``cat([L(x), P_omega(x)], channels) / sqrt(2)`` where ``L`` is a learned
    :class:`AOLConv2d` with ``out_channels - random_channels`` outputs (norm <= 1) and
    ``P_omega`` a convolution with ``random_channels`` random filters of size ``random_kernel``,
    drawn **fresh at every forward pass and independently per example**:

    * the random filters, flattened to vectors of length ``in_channels * k * k``, are the rows of a
      random matrix ``R`` with orthonormal rows (or columns, if there are more filters than
      dimensions; either way ``||R||_2 = 1``), from a QR factorisation of a Gaussian matrix;
    * the convolution is ``R`` applied to every zero-padded k x k patch (``P_omega x = R U x`` with
      ``U`` the patch extraction). Each input value lies in at most ``k^2`` patches, so
      ``||U x||^2 <= k^2 ||x||^2`` and ``||P_omega|| <= ||R|| * k = k``: the filters are divided by
      ``k``. For the default ``k = 1`` (1x1 random projections) ``U`` is the identity, the bound is
      exact (``||P_omega|| = 1`` when ``R`` has orthonormal columns) and nothing is lost.

    Concatenation: ``||[L x; P x]||^2 = ||L x||^2 + ||P x||^2 <= 2 ||x||^2``, so the 1/sqrt(2)
    scaling gives operator norm <= 1 for every draw (and the bias of ``L`` does not change
    differences). Inside :func:`frozen_randomness` the random filters are fixed.
    """

    lipschitz = 1.0

    def __init__(self, in_channels: int, out_channels: int, random_channels: int, kernel_size: int = 3,
                 random_kernel: int = 1) -> None:
        super().__init__()
        if not 0 < random_channels < out_channels:
            raise ValueError(f"RandomProjectionConv2d: need 0 < random_channels < out_channels, got "
                             f"{random_channels} of {out_channels}")
        if random_kernel < 1 or random_kernel % 2 == 0:
            raise ValueError(f"RandomProjectionConv2d: random_kernel must be odd and >= 1, got {random_kernel}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.random_channels, self.random_kernel = int(random_channels), int(random_kernel)
        self.learned = AOLConv2d(in_channels, out_channels - random_channels, kernel_size)

    def random_filters(self, x: torch.Tensor) -> torch.Tensor:
        """This pass's random filters, (N, random_channels, in_channels * k * k), each of norm <= 1."""
        n, k = x.shape[0], self.random_kernel
        key = (tuple(x.shape), x.device, x.dtype)
        return self.draw(key, lambda: orthonormal_projections(n, self.random_channels, self.in_channels * k * k,
                                                              device=x.device, dtype=x.dtype))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The random part ``P_omega(x)`` (operator norm <= 1)."""
        r = self.random_filters(x)
        k = self.random_kernel
        if k == 1:
            return torch.einsum("nrc,nchw->nrhw", r, x)
        n, _, h, w = x.shape
        patches = F.unfold(x, k, padding=k // 2)  # (N, C*k*k, H*W), channel-major like R's columns
        return (r @ patches).view(n, self.random_channels, h, w) / k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.learned(x), self.project(x)], dim=1).div_(math.sqrt(2.0))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, random_channels={self.random_channels}, "
                f"random_kernel={self.random_kernel}")


class NoisyAttentionGate(StochasticModule):
    """Residual attention with fresh noise: ``y = x + s ⊙ h(x)``, 2-Lipschitz for every draw.

    ``h = GroupSort ∘ AOLConv2d`` (1-Lipschitz). The gate ``s = clamp(sigmoid(a) + noise * eps, 0, 1)``
    has a learned per-channel logit ``a`` and Gaussian ``eps`` drawn fresh at every forward pass,
    independently per example, channel and position. The gate does **not** depend on ``x``.

    **Bound.** For a fixed draw, ``s`` is a fixed vector with entries in [0, 1], so multiplying by
    it is a diagonal map of norm <= 1 and ``||y - y'|| <= ||x - x'|| + ||s ⊙ (h(x) - h(x'))||
    <= ||x - x'|| + ||h(x) - h(x')|| <= 2 ||x - x'||``. (A gate computed from ``x`` would add a
    term ``||h(x)|| * Lip(s)``, unbounded in general; that is why it is input-independent.)
    """

    lipschitz = 2.0

    def __init__(self, channels: int, noise: float = 0.6, kernel_size: int = 3) -> None:
        super().__init__()
        if not (math.isfinite(noise) and noise >= 0):
            raise ValueError(f"NoisyAttentionGate: noise must be a finite number >= 0, got {noise}")
        self.channels, self.noise = int(channels), float(noise)
        self.conv = AOLConv2d(channels, channels, kernel_size)
        self.act = GroupSort()
        self.logit = nn.Parameter(torch.zeros(channels))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """This pass's gate ``s`` in [0, 1], shaped like ``x`` (depends on x's shape only)."""
        mean = torch.sigmoid(self.logit).view(1, -1, 1, 1)
        if self.noise == 0:
            return mean.expand_as(x)
        eps = self.draw((tuple(x.shape), x.device, x.dtype),
                        lambda: torch.randn(x.shape, device=x.device, dtype=x.dtype))
        if self.frozen or _tracked(self.logit):
            return (mean + self.noise * eps).clamp(0.0, 1.0)
        # the same operations in the same order, in place on this pass's own fresh draw
        return eps.mul_(self.noise).add_(mean).clamp_(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        if _tracked(x, h):
            return x + self.gate(x) * h
        return h.mul_(self.gate(x)).add_(x)  # = x + s * h, bit for bit (IEEE + and * commute)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, noise={self.noise}"


_ISOMETRIES = (nn.Identity, nn.Flatten, nn.PixelUnshuffle)  # coordinate permutations / reshapes


def lipschitz_product(layers: Sequence[nn.Module]) -> float:
    """The chain-rule bound ``prod_i Lip(layer_i)`` of a composition, from each layer's declared
    ``lipschitz`` constant (proved in its docstring); reshapes and ``PixelUnshuffle`` (coordinate
    permutations) count 1. Any other layer raises ``TypeError``: nothing is assumed."""
    out = 1.0
    for layer in layers:
        if isinstance(layer, _ISOMETRIES):
            continue
        value = getattr(layer, "lipschitz", None)
        if value is None:
            raise TypeError(f"{type(layer).__name__} declares no proven Lipschitz constant")
        out *= float(value)
    return out

"""A compiled forward pass for sampling loops (randomized-smoothing votes on a CPU).

Certification draws 100,000 noisy copies per example through the same model, so a one-time
``torch.compile`` (TorchInductor: fused kernels, fewer passes over memory) pays for itself after a
few hundred thousand samples. Only deterministic models are compiled: the
randomness of a randomized model (random masks, filters, diffusion noise) must stay exactly the
eager model's, drawn fresh per sample. The compiled model is used only after it agreed with the
eager model on a probe batch; if compilation fails (no C++ compiler, an unsupported operation) or
disagrees, sampling stays eager and a warning says why. See docs/certification.md ("Sampling").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from bench.capabilities import capability
from bench.params import Param

log = logging.getLogger(__name__)

COMPILE_MIN_SAMPLES = 200_000  # "auto": compile for a call that draws at least this many samples

COMPILE = Param("auto", bool, literals=("auto",))  # the ``compile`` parameter of a sampling certifier


def check_policy(value: object, owner: str) -> bool | str:
    """The ``compile`` parameter checked by its spec: ``"auto"``, ``True`` or ``False``; else a
    one-line :class:`BenchError` naming ``owner``."""
    policy: bool | str = COMPILE.check(owner, "compile", value)
    return policy


def compilable(model: nn.Module) -> bool:
    """Deterministic models only: a randomized model keeps its eager randomness."""
    return not bool(capability(model, "randomized")) and hasattr(torch, "compile")


def wants_compile(model: nn.Module, device: torch.device, samples: int, policy: bool | str) -> bool:
    """Whether a sampling call of ``samples`` forward samples should use the compiled model.

    ``auto`` compiles on a CPU for calls of at least :data:`COMPILE_MIN_SAMPLES` samples (the
    decision depends on the call alone, not on what was compiled before, so a resumed run samples
    exactly like an uninterrupted one); ``True`` compiles whenever the model is deterministic (also
    on CUDA); ``False`` never does.
    """
    if policy is False or not compilable(model):
        return False
    return policy is True or (device.type == "cpu" and samples >= COMPILE_MIN_SAMPLES)


def agree(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Compiled and eager logits agree: close in value, and the same argmax wherever the eager
    top-two margin is not itself within the tolerance (a float tie may break either way)."""
    if got.shape != want.shape or not torch.isfinite(got).all():
        return False
    got, want = got.float(), want.float()
    tolerance = 1e-3 * (1.0 + float(want.abs().max()))
    if float((got - want).abs().max()) > tolerance:
        return False
    if want.ndim < 2 or want.shape[1] < 2:
        return True
    top2 = want.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
    return bool((got.argmax(1) == want.argmax(1))[clear].all())


def compile_checked(model: nn.Module, probe: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``model`` compiled for inputs shaped like ``probe`` (a full batch; the batch size is fixed),
    or None where compilation failed or the result disagreed with the eager model on ``probe``.
    The parameters stay inputs of the compiled graph (no freezing), so later training or loading
    is seen by it (measured: freezing and channels-last gained nothing here on top of it)."""
    started = time.perf_counter()
    try:
        candidate = torch.compile(model, dynamic=False)
        if agree(candidate(probe), model(probe)):
            log.info("compiled the model for sampling in %.1f s", time.perf_counter() - started)
            return candidate
        log.warning("the compiled model disagreed with the eager model on a probe batch; sampling runs eagerly")
    except Exception as exc:  # compilation is an optimisation: any failure falls back to eager
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        log.warning("torch.compile failed (%s: %s); sampling runs eagerly", type(exc).__name__, first)
    return None


class CompileCache:
    """The last model compiled by its owner (a certifier, a benchmark), with its checked compiled
    forward or None (compilation failed or disagreed: not tried again for that model and device).

    One entry only: the compiled forward holds the model, so a larger cache would keep old models
    alive. Owned by the object that samples, never module-global."""

    def __init__(self) -> None:
        self._last: tuple[nn.Module, torch.device, Callable[[torch.Tensor], torch.Tensor] | None] | None = None

    def forward_for(self, model: nn.Module, probe: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The compiled forward of ``model`` for batches shaped like ``probe`` (see :func:`compile_checked`)."""
        if self._last is not None and self._last[0] is model and self._last[1] == probe.device:
            return self._last[2]
        compiled = compile_checked(model, probe)
        self._last = (model, probe.device, compiled)
        return compiled

    def forget(self) -> None:
        """Drop the cached compiled model (frees the model it holds)."""
        self._last = None

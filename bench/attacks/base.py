"""The attack contract.

Subclasses implement :meth:`Attack.run`. :meth:`Attack.__call__` does everything else and
trusts nothing the attack returns:

1. checks the inputs (float images in [0, 1], shape (N, C, H, W), integer labels, a threat
   model whose norm the attack supports);
2. puts the model in eval mode (and restores its mode afterwards);
3. calls ``run`` on a model wrapper that counts forward and backward passes per example;
4. projects the result back into the threat ball around ``x`` and into [0, 1];
5. re-evaluates the model on the projected examples to decide success.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.capabilities import capability
from bench.config import Norm, ThreatModel
from bench.errors import BenchError
from bench.params import Parameterized

__all__ = ["Attack", "AttackInfo", "AttackResult", "PassCounter", "check_inputs", "project"]


@dataclass(frozen=True)
class AttackInfo:
    """Capabilities of an attack, as data."""

    norms: tuple[Norm, ...]
    needs_grad: bool = True
    stochastic: bool = True
    targeted: bool = False
    source: str = ""


@dataclass
class AttackResult:
    x_adv: torch.Tensor  # projected into the threat ball and [0, 1]
    predictions: torch.Tensor  # the model's prediction on x_adv (one forward pass)
    success: torch.Tensor  # predictions != y
    forward_passes: int  # per-example forward passes spent by the attack
    backward_passes: int


class PassCounter(nn.Module):
    """Wraps a model and counts per-example forward and backward passes through it.

    It declares nothing itself: :func:`bench.capabilities.capability` reads the wrapped model's
    declarations through ``.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forward_passes = 0
        self.backward_passes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        self.forward_passes += n
        out = self.model(x)
        if out.requires_grad:
            out.register_hook(lambda grad: self._count_backward(n))
        return out

    def _count_backward(self, n: int) -> None:
        self.backward_passes += n


def check_inputs(x: torch.Tensor, y: torch.Tensor, task: str = "multiclass") -> None:
    """Raise ``ValueError`` unless x is float (N,C,H,W) in [0,1] and y holds N integer labels
    (N class indices, or an (N, L) 0/1 matrix for a multilabel model)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("attack inputs must be a floating-point tensor")
    if x.ndim != 4:
        raise ValueError(f"attack inputs must have shape (N, C, H, W), got {tuple(x.shape)}")
    label_dims = 2 if task == "multilabel" else 1
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32) or y.ndim != label_dims:
        raise ValueError(f"labels must be a {label_dims}-D integer tensor for a {task} model")
    if len(y) != len(x):
        raise ValueError(f"got {len(x)} images but {len(y)} labels")
    if len(x) and bool(torch.isnan(x).any()):
        raise ValueError("attack inputs contain NaN")
    if len(x) and (float(x.min()) < 0 or float(x.max()) > 1):
        raise ValueError("attack inputs must lie in [0, 1]; normalization belongs inside the model")


def project(x: torch.Tensor, x_adv: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """Project ``x_adv`` onto {x' in [0,1]: ||x' - x||_norm <= eps}, per example.

    For Linf the box and the ball intersect coordinate-wise, so clipping is the exact
    projection. For L2 the perturbation is first scaled into the ball; clipping to [0,1]
    afterwards only moves coordinates towards x, so the result stays inside the ball.
    """
    delta = (x_adv.detach() - x).nan_to_num(0.0)
    if threat.norm is Norm.LINF:
        delta = delta.clamp(-threat.eps, threat.eps)
    else:
        norms = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
        factor = (threat.eps / norms).clamp(max=1.0).view(-1, *([1] * (x.ndim - 1)))
        delta = delta * factor
    return (x + delta).clamp(0.0, 1.0)


def perturbation_norm(x: torch.Tensor, x_adv: torch.Tensor, norm: Norm) -> torch.Tensor:
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(dim=1) if norm is Norm.LINF else delta.norm(p=2, dim=1)


class Attack(Parameterized):
    """Base class of attack registry entries.

    Parameters are keyword-only constructor arguments, each declared once in ``parameters``
    (default and rule, a :class:`~bench.params.Param`); ``defaults`` is derived from it. The
    constructor checks and coerces every value (one-line :class:`BenchError` otherwise) and keeps
    them in ``self.params``; a subclass adds cross-parameter rules after ``super().__init__``.
    """

    kind: ClassVar[str] = "attack"
    info: ClassVar[AttackInfo] = AttackInfo(norms=(Norm.LINF, Norm.L2))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.params.items()))
        return f"{type(self).__name__}({args})"

    def require_norm(self, norm: Norm) -> None:
        """Raise :class:`BenchError` unless this attack, and any attack it wraps (``inner``), supports ``norm``."""
        attack: Attack | None = self
        while attack is not None:
            if norm not in attack.info.norms:
                supported = ", ".join(n.value for n in attack.info.norms)
                raise BenchError(f"attack '{attack.name}' does not support the {norm.value} norm "
                                 f"(supports {supported})")
            attack = getattr(attack, "inner", None)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        """Return candidate adversarial examples for ``x`` (need not respect the threat model)."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> AttackResult:
        from bench import tasks

        task = capability(model, "task")
        check_inputs(x, y, task)
        self.require_norm(threat.norm)
        y = y.long()  # torchattacks' losses need int64 labels
        counter = PassCounter(model)
        modes = [(m, m.training) for m in model.modules()]  # restored per module (e.g. frozen BatchNorm)
        model.eval()
        counter.eval()  # attack libraries restore the wrapper's mode: it must be eval, like the model
        try:
            if threat.eps == 0 or len(x) == 0:
                raw = x
            else:
                with torch.enable_grad():
                    raw = self.run(counter, x.detach().clone(), y, threat)
            x_adv = project(x, raw, threat)
            with torch.no_grad():
                predictions = tasks.predict(counter(x_adv), task)
        finally:
            for module, mode in modes:
                module.training = mode
        return AttackResult(
            x_adv=x_adv,
            predictions=predictions,
            success=~tasks.correct(predictions, y, task),
            forward_passes=counter.forward_passes,
            backward_passes=counter.backward_passes,
        )

"""FGSM, MI-FGSM, Carlini-Wagner L2 and DeepFool, via torchattacks.

All four are cross-entropy / logit-margin attacks on single-label models (``multiclass`` and
``binary``); a ``multilabel`` model raises :class:`~bench.errors.BenchError`.

CW-L2 and DeepFool are *minimal-perturbation* attacks: they look for the smallest L2
perturbation that changes the prediction and ignore ``eps``. The attack contract
(:meth:`bench.attacks.base.Attack.__call__`) then scales each perturbation back into the
threat ball, so the accuracy reported for them is the accuracy *at eps after projection*:
an example counts as broken only if its projected perturbation still fools the model.

The helper :func:`require_single_label` is shared with :mod:`bench.attacks.autoattack`.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, ClassVar

import torch
from torch import nn

from bench.attacks.base import Attack, AttackInfo, AttackResult
from bench.capabilities import capability
from bench.config import Norm, ThreatModel
from bench.errors import AttackNotApplicable
from bench.params import Param
from bench.registry import register_attack

__all__ = ["CWL2", "FGSM", "MIFGSM", "DeepFool", "require_single_label"]


def require_single_label(model: nn.Module, attack: str) -> None:
    """Raise :class:`BenchError` for a multilabel model (these attacks need argmax labels)."""
    if capability(model, "task") == "multilabel":
        raise AttackNotApplicable(f"attack '{attack}' supports multiclass and binary models only, not multilabel ones")


class _TorchattacksAttack(Attack):
    """Shared plumbing: single-label check, quiet construction, device and mode handling."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> AttackResult:
        require_single_label(model, self.name)  # before the eps == 0 short cut, so the answer never depends on eps
        return super().__call__(model, x, y, threat)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        require_single_label(model, self.name)
        # torchattacks prints a warning when the model has no parameters to take the device from
        with contextlib.redirect_stdout(io.StringIO()):
            attack = self._build(model, threat)
        attack.set_device(x.device)
        # torchattacks sets the wrapper to eval (it already is) and restores its mode afterwards
        return attack(x, y).detach()

    def _build(self, model: nn.Module, threat: ThreatModel) -> Any:
        raise NotImplementedError


@register_attack("fgsm")
class FGSM(_TorchattacksAttack):
    """Fast gradient sign method (Goodfellow et al., 2015), Linf, via torchattacks ``FGSM``.

    One step of size ``eps`` along the sign of the cross-entropy gradient; deterministic.
    Parameters: none.
    """

    info = AttackInfo(norms=(Norm.LINF,), stochastic=False, source="torchattacks")
    parameters: ClassVar[dict[str, Param]] = {}

    def _build(self, model: nn.Module, threat: ThreatModel) -> Any:
        import torchattacks

        return torchattacks.FGSM(model, eps=threat.eps)


@register_attack("mifgsm")
class MIFGSM(_TorchattacksAttack):
    """Momentum iterative FGSM (Dong et al., 2018), Linf, via torchattacks ``MIFGSM``.

    Iterated signed steps on the cross-entropy with an L1-normalised gradient momentum,
    projected to the eps ball after each step; no random start, deterministic.

    Parameters: ``steps`` (default 10, as torchattacks), ``decay`` (momentum factor, default
    1.0, as torchattacks), ``step_size`` (default ``eps / steps``, the paper's rule;
    torchattacks' own default is a fixed 2/255, i.e. eps/4 at its default eps 8/255).
    """

    info = AttackInfo(norms=(Norm.LINF,), stochastic=False, source="torchattacks")
    parameters = {"steps": Param(10, int, ge=1), "decay": Param(1.0, float, ge=0),
                  "step_size": Param(None, float, gt=0)}

    def step_size(self, eps: float) -> float:
        given = self.params["step_size"]
        return float(given) if given is not None else eps / int(self.params["steps"])

    def _build(self, model: nn.Module, threat: ThreatModel) -> Any:
        import torchattacks

        return torchattacks.MIFGSM(model, eps=threat.eps, alpha=self.step_size(threat.eps),
                                   steps=int(self.params["steps"]), decay=float(self.params["decay"]))


@register_attack("cw-l2")
class CWL2(_TorchattacksAttack):
    """Carlini-Wagner L2 (Carlini and Wagner, 2017), via torchattacks ``CW``.

    Minimises ``||x' - x||_2^2 + c * max(Z_y - max_{i != y} Z_i, -kappa)`` over a tanh
    reparametrisation of x' with Adam, keeping the smallest adversarial found (no binary search
    over ``c``; early stop when the cost stops decreasing). This is a minimal-perturbation attack
    that ignores eps: the harness projects its result into the eps ball, so the reported
    accuracy is the accuracy at eps *after projection*. Deterministic.

    Parameters: ``c`` (default 1.0), ``kappa`` (confidence margin, default 0.0), ``steps``
    (default 50), ``lr`` (Adam learning rate, default 0.01); all torchattacks' defaults.
    """

    info = AttackInfo(norms=(Norm.L2,), stochastic=False, source="torchattacks")
    parameters = {"c": Param(1.0, float, gt=0), "kappa": Param(0.0, float, ge=0), "steps": Param(50, int, ge=1),
                  "lr": Param(0.01, float, gt=0)}

    def _build(self, model: nn.Module, threat: ThreatModel) -> Any:
        import torchattacks

        return torchattacks.CW(model, c=float(self.params["c"]), kappa=float(self.params["kappa"]),
                               steps=int(self.params["steps"]), lr=float(self.params["lr"]))


@register_attack("deepfool")
class DeepFool(_TorchattacksAttack):
    """DeepFool (Moosavi-Dezfooli et al., 2016), L2, via torchattacks ``DeepFool``.

    Repeatedly linearises the model and steps to the nearest linearised decision boundary
    (times ``1 + overshoot``) until the prediction changes; one full Jacobian per step, so it
    costs one backward pass per class per step. A minimal-perturbation attack that ignores eps:
    the harness projects its result into the eps ball, so the reported accuracy is the accuracy
    at eps *after projection*. Deterministic.

    Parameters: ``steps`` (default 50), ``overshoot`` (default 0.02); torchattacks' defaults.
    """

    info = AttackInfo(norms=(Norm.L2,), stochastic=False, source="torchattacks")
    parameters = {"steps": Param(50, int, ge=1), "overshoot": Param(0.02, float, ge=0)}

    def _build(self, model: nn.Module, threat: ThreatModel) -> Any:
        import torchattacks

        return torchattacks.DeepFool(model, steps=int(self.params["steps"]),
                                     overshoot=float(self.params["overshoot"]))

"""Projected gradient descent (Madry et al., 2018) for Linf and L2, via torchattacks."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from bench.attacks.base import Attack, AttackInfo, project
from bench.capabilities import capability
from bench.config import Norm, ThreatModel
from bench.params import Param
from bench.registry import register_attack


@register_attack("pgd")
class PGD(Attack):
    """PGD with random start and restarts (torchattacks ``PGD`` / ``PGDL2``).

    Multilabel models are attacked with the same algorithm maximising the summed binary
    cross-entropy over labels (:func:`pgd_loss_ascent`), since torchattacks' PGD is
    cross-entropy only.

    Parameters: ``steps`` (default 20), ``step_size`` (default 2.5 * eps / steps, Madry et
    al.'s rule), ``restarts`` (default 1; each restart starts from a fresh random point and an
    example counts as broken if any restart breaks it), ``random_start`` (default True).
    """

    info = AttackInfo(norms=(Norm.LINF, Norm.L2), source="torchattacks")
    parameters = {"steps": Param(20, int, ge=1), "step_size": Param(None, float, gt=0), "restarts": Param(1, int, ge=1),
                  "random_start": Param(True, bool)}

    def step_size(self, eps: float) -> float:
        given = self.params["step_size"]
        return float(given) if given is not None else 2.5 * eps / int(self.params["steps"])

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        from bench import tasks

        task = capability(model, "task")
        steps = int(self.params["steps"])
        alpha = self.step_size(threat.eps)
        random_start = bool(self.params["random_start"])
        if task == "multilabel":  # torchattacks' PGD is cross-entropy only: use the summed-BCE version
            def attack(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
                return pgd_loss_ascent(model, xb, yb, threat, alpha, steps, random_start,
                                       lambda logits, t: tasks.loss(logits, t, task, reduction="sum"))
        else:
            attack = self._torchattacks(model, threat, alpha, steps, random_start)
        best = x.clone()
        broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(int(self.params["restarts"])):
            candidate = project(x, attack(x, y), threat)
            with torch.no_grad():
                fooled = ~tasks.correct(tasks.predict(model(candidate), task), y, task)
            update = ~broken  # keep the first successful restart; otherwise the latest try
            best[update] = candidate[update]
            broken |= fooled
            if bool(broken.all()):
                break
        return best

    @staticmethod
    def _torchattacks(model: nn.Module, threat: ThreatModel, alpha: float, steps: int, random_start: bool) -> Any:
        import torchattacks

        if threat.norm is Norm.LINF:
            return torchattacks.PGD(model, eps=threat.eps, alpha=alpha, steps=steps, random_start=random_start)
        return torchattacks.PGDL2(model, eps=threat.eps, alpha=alpha, steps=steps, random_start=random_start)


def pgd_loss_ascent(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, alpha: float,
                    steps: int, random_start: bool,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    random_direction_on_zero: bool = False) -> torch.Tensor:
    """PGD maximising ``loss_fn``: signed steps (Linf) or normalised gradient steps (L2).

    ``random_direction_on_zero``: an L2 step whose gradient is exactly zero goes in a random
    unit direction instead of nowhere (SmoothAdv's official PGD_L2 does this)."""
    x_adv = x.clone()
    if random_start:
        if threat.norm is Norm.LINF:
            x_adv = x_adv + torch.empty_like(x).uniform_(-threat.eps, threat.eps)
        else:
            delta = torch.randn_like(x)
            norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp_min(1e-12)
            radius = torch.rand(len(x), 1, 1, 1, device=x.device) * threat.eps
            x_adv = x_adv + delta / norms * radius
        x_adv = project(x, x_adv, threat)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(model(x_adv), y), x_adv)
        if threat.norm is Norm.LINF:
            step = alpha * grad.sign()
        else:
            if random_direction_on_zero:
                zero = grad.flatten(1).norm(dim=1) == 0
                if bool(zero.any()):
                    grad = torch.where(zero.view(-1, *[1] * (grad.ndim - 1)), torch.randn_like(grad), grad)
            step = alpha * grad / grad.flatten(1).norm(dim=1).view(-1, *[1] * (grad.ndim - 1)).clamp_min(1e-12)
        x_adv = project(x, x_adv.detach() + step, threat)
    return x_adv.detach()

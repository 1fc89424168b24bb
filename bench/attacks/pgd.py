"""Projected gradient descent (Madry et al., 2018) for Linf and L2, via torchattacks."""

from __future__ import annotations

import torch
from torch import nn

from bench.attacks.base import Attack, AttackInfo, project
from bench.config import Norm, ThreatModel
from bench.errors import BenchError
from bench.registry import register_attack


@register_attack("pgd")
class PGD(Attack):
    """PGD with random start and restarts (torchattacks ``PGD`` / ``PGDL2``).

    Parameters: ``steps`` (default 20), ``step_size`` (default 2.5 * eps / steps, Madry et
    al.'s rule), ``restarts`` (default 1; each restart starts from a fresh random point and an
    example counts as broken if any restart breaks it), ``random_start`` (default True).
    """

    info = AttackInfo(norms=(Norm.LINF, Norm.L2), source="torchattacks")
    defaults = {"steps": 20, "step_size": None, "restarts": 1, "random_start": True}

    def __init__(self, **params):
        super().__init__(**params)
        if int(self.params["steps"]) < 1 or int(self.params["restarts"]) < 1:
            raise BenchError("pgd: steps and restarts must be >= 1")
        if self.params["step_size"] is not None and float(self.params["step_size"]) <= 0:
            raise BenchError("pgd: step_size must be > 0")

    def step_size(self, eps: float) -> float:
        given = self.params["step_size"]
        return float(given) if given is not None else 2.5 * eps / int(self.params["steps"])

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        import torchattacks

        steps = int(self.params["steps"])
        alpha = self.step_size(threat.eps)
        random_start = bool(self.params["random_start"])
        if threat.norm is Norm.LINF:
            attack = torchattacks.PGD(model, eps=threat.eps, alpha=alpha, steps=steps, random_start=random_start)
        else:
            attack = torchattacks.PGDL2(model, eps=threat.eps, alpha=alpha, steps=steps, random_start=random_start)
        best = x.clone()
        broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(int(self.params["restarts"])):
            candidate = project(x, attack(x, y), threat)
            with torch.no_grad():
                fooled = model(candidate).argmax(dim=1) != y
            update = ~broken  # keep the first successful restart; otherwise the latest try
            best[update] = candidate[update]
            broken |= fooled
            if bool(broken.all()):
                break
        return best

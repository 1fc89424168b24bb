"""Sanity checks run before any evaluation; each outcome is stored with the run.

A triggered check does not stop the run: it is recorded (``checks`` table, ``bench show``,
``--json``) so that a reader can judge the number. See docs/checks.md for remedies.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.capabilities import capability
from bench.results.checks import CheckResult


def check_train_mode(model: nn.Module, x: torch.Tensor) -> CheckResult:
    """The harness evaluates in eval mode; a model whose forward pass puts modules back in train
    mode (batch statistics, active dropout) would be evaluated in a mode nobody chose."""
    model.eval()
    with torch.no_grad():
        model(x)
    training = sorted(name or "(model)" for name, m in model.named_modules() if m.training)
    detail = (f"modules in train mode after an eval-mode forward pass: {', '.join(training[:5])}"
              if training else "all modules stay in eval mode")
    return CheckResult("train_mode", bool(training), detail)


def check_randomness(model: nn.Module, x: torch.Tensor, declared: bool, repeats: int = 4) -> CheckResult:
    """Forward the same batch several times: outputs must vary iff the model declares randomness."""
    with torch.no_grad():
        outs = [model(x) for _ in range(repeats)]
    spread = max(float((o - outs[0]).abs().max()) for o in outs[1:])
    varies = spread > 1e-5
    if varies and not declared:
        return CheckResult("randomized", True, f"outputs change between identical forward passes (max diff "
                           f"{spread:.3g}) but the model does not declare randomized=True; deterministic "
                           "evaluation would overestimate robustness")
    if declared and not varies:
        return CheckResult("randomized", True, "model declares randomized=True but repeated forward passes "
                           "are identical")
    return CheckResult("randomized", False, f"{'randomized' if declared else 'deterministic'} as declared "
                       f"(max diff {spread:.3g} over {repeats} passes)")


def check_logits(model: nn.Module, x: torch.Tensor) -> list[CheckResult]:
    """Outputs must be finite logits, not probabilities."""
    with torch.no_grad():
        out = model(x)
    finite = bool(torch.isfinite(out).all())
    probs = bool(finite and out.shape[1] > 1 and out.min() >= 0 and out.max() <= 1
                 and torch.allclose(out.sum(1), torch.ones(len(out), device=out.device), atol=1e-4))
    return [
        CheckResult("finite_output", not finite, "outputs are finite" if finite else "outputs contain NaN or inf"),
        CheckResult("softmax_output", probs, "outputs look like probabilities (in [0,1], rows sum to 1): attacks "
                    "need logits" if probs else "outputs look like logits"),
    ]


def check_zero_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> CheckResult:
    """Count examples whose task-loss input gradient is exactly zero (gradient masking or saturation)."""
    from bench import tasks

    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = tasks.loss(model(x), y, capability(model, "task"), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    zero = int((grad.flatten(1).abs().amax(dim=1) == 0).sum())
    detail = (f"{zero} of {len(x)} examples have an exactly zero input gradient (saturated softmax or masked "
              "gradients): gradient attacks on cross-entropy cannot move them; margin losses or other attacks "
              "are needed" if zero else f"no zero input gradients among {len(x)} examples")
    return CheckResult("zero_gradient", zero > 0, detail)


def check_input_range(x: torch.Tensor) -> CheckResult:
    """Inputs must be images in [0, 1]: eps and radii are only meaningful in that pixel space."""
    lo, hi = float(x.min()), float(x.max())
    bad = not (0.0 <= lo and hi <= 1.0) or bool(torch.isnan(x).any())
    return CheckResult("input_range", bad, f"inputs span [{lo:.4g}, {hi:.4g}]" +
                       ("; normalization belongs inside the model" if bad else ""))


LARGE_EPS = 0.5  # Linf: half the pixel range; every image can be pushed to a uniform mid-grey one
LARGE_EPS_MAX_ACCURACY = 0.10  # accuracy left above this at LARGE_EPS means the attack is not working


def check_large_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, randomized: bool,
                    eps: float = LARGE_EPS, steps: int = 20, max_examples: int = 32) -> CheckResult:
    """PGD (EOT-PGD for randomized models) at Linf ``eps`` = 0.5 must drive accuracy near zero.

    At that budget the attacker can reach a uniform mid-grey image from every input, so a model
    that keeps more than 10 % accuracy is almost certainly masking gradients (or the attack is
    broken for it), not robust. Runs on up to ``max_examples`` clean-correct examples, seeded,
    without touching the global random state.
    """
    from bench import tasks
    from bench.config import Norm, ThreatModel
    from bench.registry import ATTACKS

    task = capability(model, "task")
    with torch.no_grad():
        correct = tasks.correct(tasks.predict(model(x), task), y, task)
    keep = torch.nonzero(correct).flatten()[:max_examples]
    if len(keep) == 0:
        return CheckResult("large_eps", False, "no clean-correct example to attack")
    params = {"steps": steps, "restarts": 1}
    attack = (ATTACKS.get("eot")(attack="pgd", params=params, draws=8) if randomized
              else ATTACKS.get("pgd")(**params))
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        result = attack(model, x[keep], y[keep], ThreatModel(Norm.LINF, eps))
    accuracy = 1.0 - float(result.success.float().mean())
    bad = accuracy > LARGE_EPS_MAX_ACCURACY
    name = "EOT-PGD" if randomized else "PGD"
    detail = (f"{name}-{steps} at Linf {eps:g} leaves {100 * accuracy:.1f}% of {len(keep)} clean-correct examples "
              "correct" + (f" (expected <= {100 * LARGE_EPS_MAX_ACCURACY:.0f}%): gradients look masked or "
                           "obfuscated; use BPDA, EOT or Square (--escalate)" if bad else ""))
    return CheckResult("large_eps", bad, detail)


def run_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, declared_randomized: bool) -> list[CheckResult]:
    was_training = model.training
    try:
        results = [check_input_range(x), check_train_mode(model, x)]
        randomness = check_randomness(model, x, declared_randomized)
        results.append(randomness)
        results.extend(check_logits(model, x))
        results.append(check_zero_gradients(model, x, y))
        model.eval()  # randomized as declared, or undeclared randomness found: attack with EOT
        results.append(check_large_eps(model, x, y, randomized=declared_randomized or randomness.triggered))
    finally:
        model.train(was_training)
    return results

"""Certificate audit: try to falsify a run's certificates (``bench audit RUN_ID``).

A certificate makes claims that can be checked against the model. The audit cannot prove a
certificate sound; it looks for evidence that it is *not*, and stores what it found as checks of
the run (``checks`` table; ``bench show``, ``--json``):

``lipschitz_audit`` (models that declare ``lipschitz_bound``)
    An empirical *lower* bound on the L2 Lipschitz constant of the logit map
    (:func:`bench.certifiers.lipschitz_audit.lipschitz_lower_bound`: Jacobian power iteration and
    pair ascent at the run's first examples; :func:`~bench.certifiers.lipschitz_audit.lipschitz_box_search`:
    the same from 32 uniform random points of the input box, plus 32 random pairs and 32 pairs of
    opposite corners with ascent on their ratio; randomized models within one frozen draw). Every
    reported ratio was achieved, so a value above the declared bound ``L`` (beyond float rounding,
    ``L * (1 + 1e-4)``) proves the declaration false, and every Lipschitz certificate computed from
    it unsound. Triggered details start with ``unsound:``. A value below ``L`` proves nothing.

``certificate_attack`` (runs with certification stages; one row for all stages)
    Attacks confined to each certified example's ball (certified = not abstained and correct;
    the first ``max_examples`` by dataset index), projected onto the L2 ball of radius
    ``0.999 * radius`` around the example and onto the image box [0, 1]:

    * deterministic certificate (``lipschitz`` on a non-randomized model): L2 PGD on the margin
      (logit of the certified class minus the largest other logit), normalized-gradient steps of
      ``2.5 * radius / steps``, 3 restarts from random points in the ball, 50 steps. The
      certificate holds without probability, so any example whose prediction changes is a
      violation: the check is triggered and the dataset indices are listed. Every reported
      violation is verified at the end (prediction differs, distance within the certified
      radius, inside [0, 1]).
    * ``smoothing`` certificates: SmoothAdv-style attack on the soft smoothed classifier
      (maximise the cross-entropy of the average softmax over 16 Gaussian draws at the
      certificate's sigma, draws fixed during the attack, 20 normalized-gradient steps), then
      Cohen et al.'s PREDICT (n = 1000, alpha_p = 0.001) at the adversarial point. A violation is
      PREDICT returning a class other than the certified one (abstaining is not one). A
      statistical certificate may fail on each example with probability at most ``alpha``, and
      PREDICT may itself return a wrong class with probability at most ``alpha_p``, so a sound
      certificate has a violation probability of at most ``alpha + alpha_p`` per example. The
      detail gives ``k`` violations of ``n`` attacked with the exact (Clopper-Pearson) 95 %
      interval of the rate; the check is triggered only when the interval's *lower* end exceeds
      ``alpha + alpha_p``: a statistically significant excess, false alarm probability at most
      2.5 % per stage when the certificates are sound.
    * ``lipschitz`` on a randomized model certifies argmax E[clipped logits], which no finite
      attack-and-test procedure here decides: not audited by attack (said in the detail).

``certified_vs_empirical``
    See :func:`consistency`.

Everything random is seeded (``seed``) inside :func:`torch.random.fork_rng`, so auditing leaves
the caller's random state alone and is reproducible on one device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench.capabilities import capability
from bench.progress import Progress
from bench.results.checks import CheckResult
from bench.results.types import AttackRow, RunSummary, ThreatRow

if TYPE_CHECKING:
    from bench.certifiers.base import Certificate

__all__ = ["audit_model", "certificate_rows", "consistency", "l2_pgd", "smoothadv"]

LIPSCHITZ_TOL = 1e-4  # relative float-rounding allowance on the declared bound
SHRINK = 0.999  # attacks stay inside 0.999 x the certified radius
PGD_STEPS, PGD_RESTARTS = 50, 3
SMOOTHADV_DRAWS, SMOOTHADV_STEPS = 16, 20
PREDICT_N, PREDICT_ALPHA = 1000, 0.001
CONFIDENCE = 0.95  # Clopper-Pearson interval of the violation rate
EPS_RTOL = 1e-9  # eps == radius, relatively
ACCURACY_TOL = 1e-12
MAX_LISTED = 20  # example indices listed per stage


# -- attacks inside per-example L2 balls ------------------------------------------------------------


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view((-1,) + (1,) * (like.ndim - 1)).to(like.dtype)


def _project(x: torch.Tensor, delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Onto the L2 ball of ``radius`` (per example), then onto the box: ``x + delta`` in [0, 1].

    Clamping only shrinks coordinates of ``delta`` (``x`` is in the box), so the result stays in
    the ball."""
    scale = torch.clamp(radius / _flat_norm(delta).clamp_min(1e-12), max=1.0)
    delta = delta * _per_example(scale, delta)
    return (x + delta).clamp(0.0, 1.0) - x


def _normalized(grad: torch.Tensor) -> torch.Tensor:
    """Per-example unit L2 direction (a zero gradient stays zero)."""
    return grad / _per_example(_flat_norm(grad).clamp_min(1e-12), grad)


def _effective_radius(radius: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``SHRINK * radius``, capped at the box diameter (an infinite radius means the whole box)."""
    diameter = math.sqrt(x[0].numel())
    return torch.clamp(radius.to(x.device, x.dtype) * SHRINK, max=diameter)


def _margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logit of ``target`` minus the largest other logit (negative: the prediction changed)."""
    own = logits.gather(1, target[:, None]).squeeze(1)
    others = logits.masked_fill(torch.nn.functional.one_hot(target, logits.shape[1]).bool(), float("-inf"))
    return own - others.amax(dim=1)


def l2_pgd(model: nn.Module, x: torch.Tensor, target: torch.Tensor, radius: torch.Tensor, *,
           steps: int = PGD_STEPS, restarts: int = PGD_RESTARTS) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 PGD with a per-example radius, minimising the margin of class ``target``.

    Each restart starts at a random point of the ball (``SHRINK * radius``, capped at the box
    diameter) and takes ``steps`` normalized-gradient steps of ``2.5 * radius / steps``, projecting
    onto the ball and onto [0, 1] after each. Returns ``(x_adv, found)``: for the examples where
    some iterate changed the prediction, that iterate; otherwise ``x``."""
    eps = _effective_radius(radius, x)
    step = _per_example(2.5 * eps / steps, x)
    best = x.detach().clone()
    found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        direction = _normalized(torch.randn_like(x))
        delta = _project(x, direction * _per_example(eps * torch.rand(len(x), device=x.device), x), eps)
        for k in range(steps + 1):
            delta = delta.detach().requires_grad_(True)
            with torch.enable_grad():
                margin = _margin(model(x + delta), target)
                grad = torch.autograd.grad(margin.sum(), delta)[0] if k < steps else None
            new = (margin.detach() < 0) & ~found
            if bool(new.any()):
                best[new] = (x + delta).detach().clamp(0.0, 1.0)[new]  # rounding: stay in the box
                found |= new
            if grad is None or bool(found.all()):
                break
            delta = _project(x, delta.detach() - step * _normalized(grad), eps)
        if bool(found.all()):
            break
    return best, found


def smoothadv(model: nn.Module, x: torch.Tensor, target: torch.Tensor, radius: torch.Tensor, sigma: float, *,
              draws: int = SMOOTHADV_DRAWS, steps: int = SMOOTHADV_STEPS) -> torch.Tensor:
    """SmoothAdv-style attack (Salman et al. 2019) on the soft smoothed classifier.

    Maximises the cross-entropy, for class ``target``, of the average softmax over ``draws``
    Gaussian noise draws (``sigma``, drawn once and kept fixed), from ``x`` with ``steps``
    normalized-gradient steps of ``2.5 * radius / steps``, projecting onto the per-example L2 ball
    of ``SHRINK * radius`` and onto [0, 1]. Returns the adversarial images."""
    eps = _effective_radius(radius, x)
    step = _per_example(2.5 * eps / steps, x)
    from bench.certifiers.smoothing import input_noise_sigma

    # no extra noise for a model that adds the smoothing noise itself (DDS)
    noise = input_noise_sigma(model, sigma) * torch.randn((draws, *x.shape), device=x.device, dtype=x.dtype)
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            noisy = ((x + delta).unsqueeze(0) + noise).reshape(draws * len(x), *x.shape[1:])
            probs = torch.softmax(model(noisy).float(), dim=1).view(draws, len(x), -1).mean(dim=0)
            loss = -torch.log(probs.gather(1, target[:, None]).clamp_min(1e-30)).sum()
            grad = torch.autograd.grad(loss, delta)[0]
        delta = _project(x, delta.detach() + step * _normalized(grad), eps)
    return (x + delta).detach().clamp(0.0, 1.0)


# -- the checks -------------------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _indices_text(indices: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:MAX_LISTED])
    return f"[{shown}{', ...' if len(indices) > MAX_LISTED else ''}]"


def lipschitz_check(model: nn.Module, x: torch.Tensor, indices: Sequence[int], seed: int = 0,
                    box_points: int | None = None) -> CheckResult | None:
    """``lipschitz_audit`` on the examples ``x`` and, away from them, ``box_points`` random points and
    pairs of each kind in the input box (None: ``BOX_POINTS`` = 32). None when the model declares no bound."""
    from bench.certifiers.lipschitz_audit import BOX_POINTS, lipschitz_box_search, lipschitz_lower_bound

    bound = capability(model, "lipschitz_bound")
    if bound is None:
        return None
    declared = float(bound)
    points = BOX_POINTS if box_points is None else int(box_points)
    try:
        est = lipschitz_lower_bound(model, x, seed=seed)
        box = lipschitz_box_search(model, tuple(x.shape[1:]), points=points, seed=seed, device=x.device,
                                   dtype=x.dtype)
    except ValueError as exc:
        return CheckResult("lipschitz_audit", False, f"declared L = {declared:.6g}; not audited: {exc}")
    where = f" at example {indices[est.where]}" if est.where is not None else ""
    value, method = max([(est.jacobian, f"Jacobian power iteration{where}"), (est.pairs, f"pair ascent{where}"),
                         (box.jacobian, "Jacobian power iteration at a random point of the box"),
                         (box.pairs, "pair ascent from a random point of the box"),
                         (box.far, "a far-apart pair in the box")], key=lambda found: found[0])
    found = (f"empirical lower bound {value:.6g} ({method}; near {len(x)} examples: power iteration "
             f"{est.jacobian:.6g}, pair ascent {est.pairs:.6g}; away from the data, {points} random points and "
             f"{2 * points} far pairs: power iteration {box.jacobian:.6g}, pair ascent {box.pairs:.6g}, "
             f"far pairs {box.far:.6g})")
    if value > declared * (1 + LIPSCHITZ_TOL):
        return CheckResult("lipschitz_audit", True,
                           f"unsound: declared L = {declared:.6g} but the logit map reaches {found}; the bound is "
                           "false and every Lipschitz certificate computed from it is invalid")
    return CheckResult("lipschitz_audit", False, f"declared L = {declared:.6g}; {found}: no evidence against the bound "
                       "(a lower bound below L proves nothing)")


def _certified(rows: Sequence[dict[str, Any]], max_examples: int) -> list[dict[str, Any]]:
    ok = [r for r in rows if not r.get("abstained") and r.get("correct") and r.get("prediction") is not None
          and (r.get("radius") or 0.0) > 0]
    return sorted(ok, key=lambda r: int(r["example_index"]))[:max_examples]


def _attack_stage(model: nn.Module, x: torch.Tensor, position_of: dict[int, int], position: int,
                  info: dict[str, Any], rows: Sequence[dict[str, Any]], max_examples: int,
                  batch: int) -> tuple[bool, str]:
    """One certification stage: (triggered, detail)."""
    from bench.certifiers.smoothing import predict
    from bench.certifiers.stats import clopper_pearson_interval

    certifier = str(info.get("certifier") or "?")
    randomized = bool(info.get("randomized", capability(model, "randomized")))
    head = f"stage {position} {certifier}"
    if certifier == "lipschitz" and randomized:
        return False, f"{head}: not audited by attack (randomized Lipschitz certificate)"
    if certifier not in ("lipschitz", "smoothing"):
        return False, f"{head}: not audited (no attack for this certifier)"
    chosen = _certified(rows, max_examples)
    if not chosen:
        return False, f"{head}: no certified example (non-abstained, correct, radius > 0) to attack"
    missing = [int(r["example_index"]) for r in chosen if int(r["example_index"]) not in position_of]
    if missing:
        raise ValueError(f"certificate rows for examples not among the given images: {missing[:5]}")
    device = _device_of(model)
    violations: list[int] = []
    if certifier == "lipschitz":
        for start in range(0, len(chosen), batch):
            part = chosen[start:start + batch]
            xs = x[torch.tensor([position_of[int(r["example_index"])] for r in part])].to(device)
            target = torch.tensor([int(r["prediction"]) for r in part], device=device)
            radius = torch.tensor([float(r["radius"]) for r in part], dtype=torch.float64, device=device)
            adv, found = l2_pgd(model, xs, target, radius)
            with torch.no_grad():  # verify every success at the point itself
                changed = model(adv).argmax(dim=1) != target
            distance = _flat_norm((adv - xs).double())
            inside = (distance <= radius) & (adv >= 0).flatten(1).all(dim=1) & (adv <= 1).flatten(1).all(dim=1)
            violations += [int(r["example_index"]) for r, v in zip(part, (found & changed & inside).tolist()) if v]
        text = (f"{head} (deterministic, L = {float(info.get('L', float('nan'))):.6g}): L2 PGD ({PGD_STEPS} steps, "
                f"{PGD_RESTARTS} restarts) inside {SHRINK} x the certified radius on {len(chosen)} certified examples: "
                f"{len(violations)} violation(s)")
        if violations:
            text += ("; the prediction changes within the certified radius at example indices "
                     f"{_indices_text(violations)}")
        return bool(violations), text
    sigma = info.get("sigma", capability(model, "sigma"))
    if sigma is None:
        return False, f"{head}: not audited (no sigma recorded for the certificate)"
    sigma, alpha = float(sigma), float(info.get("alpha", 0.001))
    chunk = max(1, batch // SMOOTHADV_DRAWS)
    for start in range(0, len(chosen), chunk):
        part = chosen[start:start + chunk]
        xs = x[torch.tensor([position_of[int(r["example_index"])] for r in part])].to(device)
        target = torch.tensor([int(r["prediction"]) for r in part], device=device)
        radius = torch.tensor([float(r["radius"]) for r in part], dtype=torch.float64, device=device)
        adv = smoothadv(model, xs, target, radius, sigma)
        predicted = predict(model, adv, sigma, n=PREDICT_N, alpha=PREDICT_ALPHA)
        violations += [int(r["example_index"]) for r, p in zip(part, predicted)
                       if p is not None and p != int(r["prediction"])]
    k, n = len(violations), len(chosen)
    lo, hi = clopper_pearson_interval(k, n, 1 - CONFIDENCE)
    allowed = alpha + PREDICT_ALPHA
    triggered = lo > allowed
    text = (f"{head} (sigma = {sigma:.6g}, alpha = {alpha:.6g}): SmoothAdv ({SMOOTHADV_DRAWS} fixed noise draws, "
            f"{SMOOTHADV_STEPS} steps) inside {SHRINK} x the certified radius, then PREDICT (n = {PREDICT_N}, "
            f"alpha = {PREDICT_ALPHA:g}): {k} of {n} certified examples violated (rate {k / n:.4g}, "
            f"{100 * CONFIDENCE:.0f}% CI [{lo:.4g}, {hi:.4g}]); allowed: alpha + PREDICT's alpha = {allowed:.4g}")
    if violations:
        text += f"; violated at example indices {_indices_text(violations)}"
    text += ("; the lower end of the interval exceeds the allowed rate: significantly more failures than the "
             "certificate permits" if triggered else "; no significant excess")
    return triggered, text


def certificate_attack(model: nn.Module, x: torch.Tensor, certs: dict[int, list[dict[str, Any]]],
                       stages: dict[int, dict[str, Any]], indices: Sequence[int], max_examples: int = 64,
                       batch: int = 128, progress: Progress | None = None) -> CheckResult:
    """``certificate_attack`` over all certification stages (see the module docstring)."""
    position_of = {int(ex): k for k, ex in enumerate(indices)}
    missing = sorted(set(certs) - set(stages))
    if missing:
        raise ValueError(f"no certificate description for stage(s) {missing} (pass stages={{position: info}})")
    results = []
    with (progress or Progress()).task("audit: attack certificates", total=len(certs)) as task:
        for position in sorted(certs):
            results.append(_attack_stage(model, x, position_of, position, stages[position], certs[position],
                                         max_examples, batch))
            task.advance(1, stage=position)
    triggered = any(t for t, _ in results)
    detail = " | ".join(d for _, d in results) or "no certification stage"
    return CheckResult("certificate_attack", triggered, ("unsound: " if triggered else "") + detail)


def certificate_rows(certificates: Sequence[Certificate], labels: torch.Tensor | Sequence[int],
                     indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Certifier output as the rows the harness stores (``example_index``, ``prediction``,
    ``abstained``, ``radius``, ``correct``), e.g. to audit certificates made in memory."""
    labels = [int(v) for v in labels]
    indices = list(range(len(labels))) if indices is None else [int(i) for i in indices]
    return [{"example_index": ex, "prediction": c.prediction, "abstained": c.abstained, "radius": c.radius,
             "correct": (not c.abstained) and c.prediction == label}
            for ex, c, label in zip(indices, certificates, labels)]


def audit_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
                certs: dict[int, list[dict[str, Any]]] | None, *, seed: int = 0, max_examples: int = 64,
                stages: dict[int, dict[str, Any]] | None = None, indices: Sequence[int] | None = None,
                progress: Progress | None = None) -> list[CheckResult]:
    """The model-based checks: ``lipschitz_audit`` and ``certificate_attack``.

    ``x``: the examples (images in [0, 1]; moved to the model's device piecewise), ``indices``
    their dataset indices (default ``0..N-1``), which certificate rows refer to by
    ``example_index``. ``certs`` maps a stage position to its certificate rows (dicts with
    ``example_index``, ``prediction``, ``abstained``, ``radius``, ``correct``; see
    :func:`certificate_rows`) and ``stages`` maps the same position to the stage's certificate
    description (what :meth:`Certifier.prepare` returned: ``certifier``, ``sigma``, ``alpha``,
    ``L``, ``randomized``). ``y`` is not needed (correctness is in the rows); it is accepted for
    symmetry with the other checks. The Lipschitz audit uses the first ``max_examples`` examples;
    each stage's attack its first ``max_examples`` certified examples. Returns the checks that
    apply: ``lipschitz_audit`` only for models declaring ``lipschitz_bound``,
    ``certificate_attack`` only when ``certs`` is given.
    """
    del y
    progress = progress or Progress()
    indices = list(range(len(x))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(x):
        raise ValueError("indices and x differ in length")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    results: list[CheckResult] = []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if capability(model, "lipschitz_bound") is not None:
                with progress.task("audit: Lipschitz bound", total=1) as task:
                    check = lipschitz_check(model, x[:max_examples].to(device), indices[:max_examples], seed)
                    task.advance(1)
                if check is not None:
                    results.append(check)
            if certs is not None:
                results.append(certificate_attack(model, x, certs, stages or {}, indices, max_examples,
                                                  progress=progress))
    finally:
        model.train(was_training)
    return results


# -- consistency of stored numbers ------------------------------------------------------------------


def _same_eps(a: float, b: float) -> bool:
    return abs(a - b) <= EPS_RTOL * max(abs(a), abs(b))


def consistency(summary: RunSummary, randomized: bool) -> CheckResult:
    """``certified_vs_empirical``: certified accuracy at radius r must not exceed empirical L2
    robust accuracy at eps = r on the same examples -- compared only where both numbers are
    about the same classifier.

    * A ``lipschitz`` certificate of a deterministic model certifies argmax of the model's logits,
      the classifier every attack of the run evaluates: it is compared with the run's L2 robust
      accuracy at eps = r (``threat_models``, the cascade of all L2 attacks at that eps).
    * A ``smoothing`` certificate certifies the smoothed classifier g, not the base classifier the
      run's ordinary attacks (PGD, AutoAttack, ...) evaluate: those are a different classifier and
      are never compared with it. Only attack stages named ``smoothadv`` (attacks on the smoothed
      classifier) are, and only when no other attack precedes them in their threat model's cascade
        (a stage's reported accuracy is cumulative over the cascade, so a base-classifier attack
      before it would mix in the other classifier). Caveat: a stage's accuracy also counts only
      the examples the run's clean pass classified correctly; where that pass scores the base
      classifier, the number is about g only as far as f and g agree on the clean examples.
    * A ``lipschitz`` certificate of a randomized model certifies argmax E[clipped logits], which
      attacks on single draws do not evaluate: not compared.

    ``summary`` is :func:`bench.results.queries.run_summary`'s object (``certified``,
    ``certificate``, ``threat_models``, ``attacks``); ``randomized`` whether the model is (used when
    a certificate block does not record it). Matching: ``|eps - r| <= 1e-9 * max(eps, r)``;
    triggered when certified > empirical + 1e-12. Nothing comparable: not triggered, and the
    detail says so.
    """
    blocks = {int(b["position"]): b for b in summary.get("certificate") or [] if b.get("position") is not None}
    l2 = _l2_robust(summary.get("threat_models") or [])
    smoothadv = _leading_smoothadv(summary.get("attacks") or [])
    compared, problems, skipped = 0, [], set()
    for entry in summary.get("certified") or []:
        certifier, r, acc = entry.get("certifier"), float(entry.get("radius") or 0.0), entry.get("accuracy")
        if acc is None:
            continue
        block = blocks.get(int(entry.get("position") or -1))
        declared_randomized = bool(block.get("randomized", randomized) if block else randomized)
        empirical, reason = _comparable(certifier, r, declared_randomized, l2, smoothadv)
        if reason:
            skipped.add(reason)
        for label, value in empirical:
            compared += 1
            if acc > value + ACCURACY_TOL:
                problems.append(f"{certifier} (stage {entry.get('position')}) certifies {100 * acc:.2f}% at radius "
                                f"{r:.6g} but {label} is {100 * value:.2f}%")
    return _consistency_result(compared, problems, skipped)


def _l2_robust(threats: Sequence[ThreatRow]) -> list[tuple[float, float]]:
    """(eps, robust accuracy) of the run's L2 threat models (every L2 attack at that eps)."""
    return [(t["eps"], accuracy) for t in threats if t.get("norm") == "L2" and t.get("eps") is not None
            and (accuracy := t.get("robust_accuracy")) is not None]


def _leading_smoothadv(attacks: Sequence[AttackRow]) -> list[tuple[float, float]]:
    """(eps, accuracy) of the L2 ``smoothadv`` stages that no other attack precedes in their
    threat model's cascade (a cascade of only smoothadv stages stays comparable)."""
    out: list[tuple[float, float]] = []
    seen: set[tuple[str, float]] = set()
    for attack in attacks:
        key = (attack.get("norm"), attack.get("eps"))
        accuracy = attack.get("accuracy")
        if attack.get("name") == "smoothadv" and key not in seen and attack.get("norm") == "L2" \
                and accuracy is not None:
            out.append((attack["eps"], accuracy))
            continue
        seen.add(key)
    return out


def _comparable(certifier: str, radius: float, randomized: bool, l2: list[tuple[float, float]],
                smoothadv: list[tuple[float, float]]) -> tuple[list[tuple[str, float]], str | None]:
    """The empirical numbers (label, accuracy) about the classifier a ``certifier`` certificate
    certifies at ``radius``, or why none are compared (see :func:`consistency`)."""
    if certifier == "lipschitz":
        if randomized:
            return [], "randomized lipschitz certificates (argmax E[clipped logits], not attacked)"
        return [(f"L2 robust accuracy (all L2 attacks) at eps {eps:.6g}", float(accuracy))
                for eps, accuracy in l2 if _same_eps(float(eps), radius)], None
    if certifier == "smoothing":
        return [(f"smoothadv at eps {eps:.6g}", float(accuracy))
                for eps, accuracy in smoothadv if _same_eps(float(eps), radius)], None
    return [], f"certifier {certifier}"


def _consistency_result(compared: int, problems: list[str], skipped: set[str]) -> CheckResult:
    note = f" (not compared: {', '.join(sorted(skipped))})" if skipped else ""
    if problems:
        return CheckResult("certified_vs_empirical", True,
                           "unsound: " + "; ".join(problems) + ": certified accuracy above the accuracy an attack "
                           "left on the same classifier; the certificate (or the attack bookkeeping) is wrong" + note)
    if not compared:
        return CheckResult("certified_vs_empirical", False,
                           "nothing comparable: no L2 attack on the certified classifier at a certified radius "
                           "(deterministic lipschitz certificates compare with any L2 attack, smoothing certificates "
                           "only with smoothadv)" + note)
    return CheckResult("certified_vs_empirical", False,
                       f"consistent: certified accuracy at most the empirical robust accuracy in {compared} "
                       f"comparison(s)" + note)

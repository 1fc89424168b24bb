"""``bench run --escalate``: run the standard remedy of every triggered sanity check.

A triggered check says the protocol's number may be an overestimate; each has a standard
remedy (docs/checks.md). Escalation runs the remedies as extra attack stages of the stored run,
exactly like ``bench attack`` (on the examples still robust, so robust accuracy can only go
down), and records which check asked for each stage. Both results stay in the store: the
stages of the protocol and their accuracy as before, and the remedy stages after them; the run
summary's ``escalation`` block gives the robust accuracy without and with the remedies.

Remedies (per threat model of the run's protocol):

* ``randomized`` (outputs change between identical passes, or a declared randomized model does
  not vary): EOT-PGD (K=20 draws) scored with R fresh draws (the protocol's R, at least 10);
* ``zero_gradient`` and ``large_eps`` (gradients masked): BPDA-PGD through the model's declared
  surrogates (wrapped in EOT for randomized models), then Square with 5,000 queries;
* ``square_beats_whitebox`` (gradients uninformative): BPDA/EOT-PGD as above, then Square with
  10,000 queries (twice AutoAttack's budget; on a CPU this is the expensive remedy);
* ``eot_saturation <threat>`` (doubling the protocol's EOT draws and steps lowered robust
  accuracy beyond its interval, :mod:`bench.harness.saturation`): at that threat model only, the
  protocol's first EOT stage there with 4x K (draws) and 4x steps (EOT-PGD-20 with K=10 becomes
  EOT-PGD-80 with K=40; restarts and the inner attack unchanged), scored with the protocol's R.

The remaining checks (input range, train mode, softmax or non-finite outputs, eps monotonicity)
point at a broken model or pipeline; no attack fixes them and escalation leaves them alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.config import AttackSpec, ThreatModel
from bench.harness.saturation import CHECK as SATURATION, check_name, scaled_eot
from bench.progress import Progress
from bench.results.store import Store
from bench.results.stored import StoredConfig

__all__ = ["REMEDIES", "Remedy", "escalate", "remedies_for"]

PGD = {"steps": 20, "restarts": 1}
MIN_DRAWS = 10  # R used to score EOT remedy stages
SATURATION_FACTOR = 4  # the eot_saturation remedy: K and steps of the protocol's EOT stage times this


@dataclass(frozen=True)
class Remedy:
    check: str
    description: str
    square_queries: int | None  # None: no Square stage
    gradient: bool = True  # a BPDA/EOT-PGD stage
    min_draws: int = MIN_DRAWS  # the stages are scored with max(the protocol's R, min_draws) draws


REMEDIES: dict[str, Remedy] = {
    "randomized": Remedy("randomized", "EOT-PGD (K=20) scored with R fresh draws", None),
    "zero_gradient": Remedy("zero_gradient", "BPDA-PGD (EOT if randomized), then Square 5000 queries", 5000),
    "large_eps": Remedy("large_eps", "BPDA-PGD (EOT if randomized), then Square 5000 queries", 5000),
    "square_beats_whitebox": Remedy("square_beats_whitebox", "BPDA-PGD (EOT if randomized), then Square "
                                    "10000 queries", 10000),
    SATURATION: Remedy(SATURATION, f"the protocol's EOT stage with {SATURATION_FACTOR}x K and "
                       f"{SATURATION_FACTOR}x steps, scored with the protocol's R", None, min_draws=1),
}


def remedy_of(check: str) -> Remedy | None:
    """The remedy of a stored check name (``eot_saturation <threat>`` is one check per threat model)."""
    return REMEDIES.get(SATURATION if check.startswith(SATURATION + " ") else check)


def _gradient_stage(threat: ThreatModel, randomized: bool) -> AttackSpec:
    bpda = {"attack": "pgd", "params": dict(PGD)}
    if randomized:
        return AttackSpec("eot", threat, (("attack", "bpda"), ("draws", 20), ("params", bpda)))
    return AttackSpec("bpda", threat, tuple(sorted(bpda.items())))


def _saturation_stage(check: str, threat: ThreatModel, attacks: tuple[AttackSpec, ...]) -> list[AttackSpec]:
    """The ``eot_saturation`` remedy at ``threat`` when ``check`` is that threat model's check: the
    first EOT stage of ``attacks`` there (else EOT-PGD-20 with K=20) with K and steps times 4."""
    if check != check_name(threat):
        return []
    base = next((a for a in attacks if a.attack == "eot" and a.threat == threat),
                AttackSpec("eot", threat, (("attack", "pgd"), ("draws", 20), ("params", dict(PGD)))))
    return [scaled_eot(base, SATURATION_FACTOR)]


def _stages(check: str, remedy: Remedy, threat: ThreatModel, randomized: bool,
            attacks: tuple[AttackSpec, ...]) -> list[AttackSpec]:
    if remedy.check == SATURATION:
        return _saturation_stage(check, threat, attacks)
    specs = [_gradient_stage(threat, randomized)] if remedy.gradient else []
    if remedy.square_queries:
        specs.append(AttackSpec("square", threat, (("n_queries", remedy.square_queries), ("seed", 0))))
    return specs


def remedies_for(triggered: list[str], threats: list[ThreatModel], randomized: bool,
                 attacks: tuple[AttackSpec, ...] = ()) -> list[tuple[str, AttackSpec]]:
    """The remedy stages (check name, attack) for the triggered checks, without duplicates, in a
    fixed order: gradient attacks before Square, larger Square budgets last. ``attacks`` are the
    protocol's (the ``eot_saturation`` remedy scales its EOT stage)."""
    randomized = randomized or "randomized" in triggered
    stages: list[tuple[str, AttackSpec]] = []
    seen: set[str] = set()
    for check in sorted(triggered, key=lambda c: (r.square_queries or 0) if (r := remedy_of(c)) else 0):
        remedy = remedy_of(check)
        if remedy is None:
            continue
        for threat in threats:
            for spec in _stages(check, remedy, threat, randomized, attacks):
                key = spec.label + repr(spec.kwargs)
                if key not in seen:
                    seen.add(key)
                    stages.append((check, spec))
    return stages


def escalate(store: Store, run_id: int, progress: Progress | None = None, device: str = "auto") -> list[dict[str, Any]]:
    """Run the remedies of the stored run's triggered checks; returns what ran (check, attack).

    Remedy stages are scored by the one scoring policy with at least ``MIN_DRAWS`` draws for a
    model that declares randomness or whose outputs varied (PREDICT for a smoothed classifier);
    the ``eot_saturation`` remedy with exactly the protocol's R."""
    from bench.harness.extend import add_attack
    from bench.results.queries import get_run_or_fail

    progress = progress or Progress()
    run = get_run_or_fail(store, run_id)
    triggered = [c.name for c in store.checks(run_id) if c.triggered and remedy_of(c.name) is not None]
    stored = StoredConfig.from_json(run.config)
    randomized = stored.randomized or "randomized" in triggered
    ran: list[dict[str, Any]] = []
    attacks = tuple(stored.protocol.attacks)
    for check, spec in remedies_for(triggered, list(stored.threats), stored.randomized, attacks):
        remedy = remedy_of(check)
        assert remedy is not None
        progress.log(f"escalation for check '{check}': {spec.label}")
        add_attack(store, run_id, spec, progress, device, escalated_for=check, randomized=randomized or None,
                   min_draws=remedy.min_draws)
        ran.append({"check": check, **spec.to_dict()})
    if not triggered:
        progress.log("escalation: no triggered check has a remedy; nothing to run")
    return ran

"""Named, versioned evaluation protocols.

A protocol fixes the attacks with their budgets, how a randomized model's prediction is scored,
how many examples are evaluated and with which seed. Rows are compared on the leaderboard only
when their protocol name and version match. See docs/protocols.md.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Callable

from bench.config import (
    AttackSpec,
    CertifySpec,
    Protocol,
    RunConfig,
    ThreatModel,
    is_adaptive,
    parse_eps,
    parse_norm,
    stable_hash,
)
from bench.data.base import DatasetSpec
from bench.errors import BenchError

__all__ = ["PROTOCOLS", "Protocol", "is_adaptive", "resolve_protocol"]

DEFAULT_PROTOCOL = "autoattack"  # deterministic models: what RobustBench ranks by (pgd@1 overestimates)


def _pgd_v1(spec: DatasetSpec) -> Protocol:
    attacks = tuple(AttackSpec("pgd", t, (("restarts", 1), ("steps", 20))) for t in spec.threat_models)
    return Protocol("pgd", 1, attacks, description="PGD-20 (1 restart, step 2.5*eps/20, random start) at each "
                                                   "of the dataset's default threat models")


def _clean_v1(spec: DatasetSpec) -> Protocol:
    return Protocol("clean", 1, (), description="clean accuracy only")


def _autoattack_v1(spec: DatasetSpec) -> Protocol:
    attacks = tuple(AttackSpec("autoattack", t, (("seed", 0), ("version", "standard"))) for t in spec.threat_models)
    return Protocol("autoattack", 1, attacks, description="AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square; "
                                                          "official pyautoattack) at each default threat model")


def _adaptive_v1(spec: DatasetSpec, eot_steps: int = 20) -> Protocol:
    attacks: list[AttackSpec] = []
    for t in spec.threat_models:
        attacks += [
            AttackSpec("eot", t, (("attack", "pgd"), ("draws", 20), ("params", {"restarts": 1, "steps": eot_steps}))),
            AttackSpec("autoattack", t, (("seed", 0), ("version", "rand"))),
            AttackSpec("square", t, (("n_queries", 5000), ("seed", 0))),
        ]
    return Protocol("adaptive", 1, tuple(attacks), draws=10,
                    description=f"for randomized defenses: EOT-PGD-{eot_steps} (K=20 draws), AutoAttack rand "
                                "(APGD-CE/DLR with EOT 20), Square 5000 queries, as a cascade per threat model; every "
                                "adversarial example scored with R=10 fresh draws (worst-of-R headline)")


def _transfer_draw_v1(spec: DatasetSpec) -> Protocol:
    base = _pgd_v1(spec)
    return Protocol("transfer-draw", 1, base.attacks, draws=1, frozen=True,
                    description="the authors' protocol of DCS and RPF: PGD-20 against one frozen draw of the "
                                "model's randomness, scored with one new draw (not adaptive; for comparison)")


def _single_draw_v1(spec: DatasetSpec) -> Protocol:
    base = _pgd_v1(spec)
    return Protocol("single-draw", 1, base.attacks, draws=1,
                    description="PGD-20 with independent single draws for attack and scoring, no EOT "
                                "(not adaptive; for comparison)")


def _certify_v1(spec: DatasetSpec) -> Protocol:
    return Protocol("certify", 1, (), draws=1,
                    description="clean accuracy and the defense's own certificates (smoothing: n0=100, "
                                "n=100,000, alpha=0.001, sigma from the defense; lipschitz: the declared bound) "
                                "at the dataset's radius grid")


def _quick_v1(spec: DatasetSpec) -> Protocol:
    attacks: list[AttackSpec] = []
    for t in spec.threat_models:
        attacks += [
            AttackSpec("eot", t, (("attack", "pgd"), ("draws", 10), ("params", {"restarts": 1, "steps": 20}))),
            AttackSpec("square", t, (("n_queries", 1000), ("seed", 0))),
        ]
    return Protocol("quick", 1, tuple(attacks), n_examples=200, draws=10,
                    description="CPU-sized adaptive evaluation and certification, the default of the seed "
                                "defenses: on a seeded subset of 200 examples, EOT-PGD-20 (K=10 draws; plain "
                                "PGD-20 for deterministic models) then Square 1000 queries per threat model, "
                                "each adversarial example scored with R=10 fresh draws (worst-of-R), then the "
                                "defense's own certificates (smoothing: n0=100, n=2,000, alpha=0.001; "
                                "lipschitz: n=500 draws of a randomized model). Smoothed classifiers (rs, "
                                "smoothadv, dds) are attacked with SmoothAdv-PGD instead (m=32 fixed draws, "
                                "T=20) and scored with PREDICT (n=1000, alpha=0.001; abstain = wrong). "
                                "Weaker than adaptive@1 (no AutoAttack rand) and certify@1 (n=100,000)")


SCORING_2 = ("scoring 2: R independent draws per example (none shared by a batch), headline = expected "
             "single-draw accuracy with its interval, worst-of-R and majority of R beside it; attacks run on "
             "every example not wrong on every draw")


def _scoring_v2(builder: Callable[[DatasetSpec], Protocol]) -> Callable[[DatasetSpec], Protocol]:
    """Version 2 of a version-1 protocol: the same attacks and budgets, scored with scoring 2
    (``Protocol.scoring``; docs/evaluation.md). For a deterministic model both versions store the
    same rows; version 1 stays available by name for the runs stored under it."""
    def build(spec: DatasetSpec) -> Protocol:
        base = builder(spec)
        text = re.sub(r"\s*\(worst-of-R(?: headline)?\)", "", base.description)
        return replace(base, version=2, scoring=2, description=f"{text}; {SCORING_2}")
    return build


def _adaptive_v2(spec: DatasetSpec) -> Protocol:
    """adaptive@2: scoring 2, and EOT-PGD with 40 steps (K=20 draws): the first budget at which
    doubling K and the steps moved DCS's single-draw robust accuracy on digits by 0.2 points or
    less (docs/checks.md, eot_saturation); the other attacks as in version 1."""
    return _scoring_v2(lambda s: _adaptive_v1(s, eot_steps=40))(spec)


# certifier parameters of the protocols that certify (CPU-sized in quick)
CERTIFY_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "certify": {},
    "quick": {"smoothing": {"n": 2000}, "lipschitz": {"n": 500}},
}

# name -> {version -> builder}; the highest version is the default
PROTOCOLS: dict[str, dict[int, Callable[[DatasetSpec], Protocol]]] = {
    "pgd": {1: _pgd_v1},
    "clean": {1: _clean_v1, 2: _scoring_v2(_clean_v1)},
    "autoattack": {1: _autoattack_v1},
    "adaptive": {1: _adaptive_v1, 2: _adaptive_v2},
    "transfer-draw": {1: _transfer_draw_v1, 2: _scoring_v2(_transfer_draw_v1)},
    "single-draw": {1: _single_draw_v1, 2: _scoring_v2(_single_draw_v1)},
    "certify": {1: _certify_v1, 2: _scoring_v2(_certify_v1)},
    "quick": {1: _quick_v1, 2: _scoring_v2(_quick_v1)},
}
CERTIFY_PROTOCOLS = tuple(CERTIFY_DEFAULTS)  # protocols whose certifiers are the defense's declared certificates
# the protocol a run gets without --protocol: randomized defenses are evaluated adaptively
DEFAULT_RANDOMIZED_PROTOCOL = "adaptive"


def describe_protocols() -> list[dict[str, Any]]:
    """Name, version and description of every named protocol (for ``bench list protocols``)."""
    from bench.data.base import get_dataset

    spec = get_dataset("synthetic").spec  # descriptions do not depend on the dataset
    return [{"name": name, "version": version, "key": f"{name}@{version}",
             "description": builder(spec).description}
            for name, versions in sorted(PROTOCOLS.items()) for version, builder in sorted(versions.items())]


THREAT_PROTOCOL = re.compile(r"^(linf|l2)-([0-9.]+(?:/[0-9.]+)?)(-rand)?$")


def _threat_protocol(base: str, spec: DatasetSpec) -> dict[int, Callable[[DatasetSpec], Protocol]] | None:
    """The versions of ``linf-8/255`` (AutoAttack standard at that one threat model) or
    ``linf-8/255-rand`` (the adaptive protocol at that threat model, versions 1 and 2 as ``adaptive``)."""
    match = THREAT_PROTOCOL.match(base)
    if match is None:
        return None
    norm, eps, rand = match.groups()
    threat = ThreatModel(parse_norm(norm), parse_eps(eps))
    one = replace(spec, threat_models=(threat,))

    def at_threat(builder: Callable[[DatasetSpec], Protocol]) -> Callable[[DatasetSpec], Protocol]:
        def build(_spec: DatasetSpec) -> Protocol:
            protocol = builder(one)  # a version-2 description already states its scoring
            return replace(protocol, name=base,
                           description=f"{protocol.description.split(' at each')[0]} at {threat.label}")
        return build
    return {v: at_threat(b) for v, b in PROTOCOLS["adaptive" if rand else "autoattack"].items()}


def _named(name: str, spec: DatasetSpec) -> Protocol:
    base, _, version = name.partition("@")
    base = base.strip().lower()
    versions = _threat_protocol(base, spec) or PROTOCOLS.get(base)
    if versions is None:
        raise BenchError(f"unknown protocol '{name}'; known: {', '.join(sorted(PROTOCOLS))}, or "
                         "linf-EPS / l2-EPS (AutoAttack) and linf-EPS-rand / l2-EPS-rand (adaptive)")
    if version:
        try:
            builder = versions[int(version)]
        except (ValueError, KeyError):
            raise BenchError(f"protocol '{base}' has no version '{version}'; versions: "
                             f"{', '.join(map(str, sorted(versions)))}") from None
    else:
        builder = versions[max(versions)]
    return builder(spec)


def route_params(attack: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """Give each override to the attack if it takes that parameter, else (for wrappers such as
    ``eot`` and ``bpda``) to the wrapped attack, recursively, inside ``params``.

    Returns the attack's parameters and the override keys some level accepted.
    """
    from bench.registry import ATTACKS

    defaults = ATTACKS.get(attack).defaults
    own = {k: v for k, v in overrides.items() if k in defaults}
    rest = {k: v for k, v in overrides.items() if k not in defaults}
    used = set(own)
    if rest and {"attack", "params"} <= set(defaults):  # a wrapper: pass the rest to the inner attack
        inner_name = str(own.get("attack", defaults["attack"]))
        inner_given = dict(own.get("params") or {})
        inner, inner_used = route_params(inner_name, rest)
        if inner_used:
            own["params"] = {**inner_given, **inner}
            used |= inner_used
    return own, used


def _certifiers(config: RunConfig, certificates: tuple[str, ...],
                protocol_params: dict[str, dict[str, Any]] | None = None) -> tuple[CertifySpec, ...]:
    """The certifiers a run asks for (``--certify``, else the defense's declared certificates)
    with the certification options routed to those that take them (``protocol_params``: a named
    protocol's own parameters per certifier, e.g. quick's smaller n)."""
    from bench.registry import CERTIFIERS

    names = tuple(CERTIFIERS.normalize(c) for c in config.certify) or certificates
    if not names:
        raise BenchError("the defense declares no certificate; choose a certifier with --certify "
                         "(see `bench list certifiers`)")
    overrides = dict(config.certify_params)
    specs = []
    used: set[str] = set()
    for name in names:
        defaults = CERTIFIERS.get(name).defaults
        own = {**(protocol_params or {}).get(name, {}), **{k: v for k, v in overrides.items() if k in defaults}}
        used |= set(own)
        CERTIFIERS.get(name)(**own)  # validates the parameters now, before any training
        specs.append(CertifySpec(name, tuple(sorted(own.items()))))
    if set(overrides) - used:
        raise BenchError(f"no certifier of the protocol ({', '.join(names)}) takes the parameter(s) "
                         f"{', '.join(sorted(set(overrides) - used))}; see `bench list certifiers`")
    return tuple(specs)


CUSTOM_SCORING = 2  # custom protocols score with the current scoring (part of their digest)


def _custom(config: RunConfig, spec: DatasetSpec, certificates: tuple[str, ...] = ()) -> Protocol:
    certifiers = _certifiers(config, certificates) if config.certifying else ()
    if certifiers and not config.attacking:  # certification only
        digest = stable_hash([[c.to_dict() for c in certifiers], {"scoring": CUSTOM_SCORING}], 8)
        return Protocol(f"custom-{digest}", 1, (), draws=config.draws or Protocol.draws, certifiers=certifiers,
                        description="custom protocol from command-line options (certification)",
                        scoring=CUSTOM_SCORING)
    norm = parse_norm(config.norm) if config.norm else spec.threat_models[0].norm
    if config.eps:
        threats = tuple(ThreatModel(norm, e) for e in config.eps)
    else:
        threats = tuple(t for t in spec.threat_models if t.norm is norm)
        if not threats:
            raise BenchError(f"dataset '{spec.name}' has no default {norm.value} eps; give --eps")
    overrides: dict[str, Any] = dict(config.attack_params)
    if config.steps is not None:
        overrides["steps"] = config.steps
    if config.restarts is not None:
        overrides["restarts"] = config.restarts
    names = config.attacks or ("pgd",)
    routed = {name: route_params(name, overrides) for name in names}
    unused = set(overrides) - set().union(*(used for _, used in routed.values()))
    if unused:
        raise BenchError(f"no attack of the protocol ({', '.join(names)}) takes the parameter(s) "
                         f"{', '.join(sorted(unused))}; see `bench list attacks`")
    attacks = tuple(AttackSpec(a, t, tuple(sorted(routed[a][0].items()))) for t in threats for a in names)
    draws = config.draws if config.draws is not None else Protocol.draws
    parts: list[Any] = [[a.to_dict() for a in attacks], draws]
    if certifiers:
        parts.append([c.to_dict() for c in certifiers])
    parts.append({"scoring": CUSTOM_SCORING})
    digest = stable_hash(parts, 8)
    return Protocol(f"custom-{digest}", 1, attacks, draws=draws, certifiers=certifiers,
                    description="custom protocol from command-line options", scoring=CUSTOM_SCORING)


def resolve_protocol(config: RunConfig, spec: DatasetSpec, randomized: bool = False,
                     certificates: tuple[str, ...] = (), default: str | None = None,
                     smoothed: bool = False) -> Protocol:
    """The protocol ``config`` asks for: a named one, or a custom one built from its options.

    Without ``--protocol``, a defense gets its declared ``default`` protocol if any (``certify``
    for smoothing defenses), else a deterministic one ``autoattack`` (AutoAttack standard) and a
    randomized one ``adaptive``.
    The ``certify`` protocol certifies with the defense's declared ``certificates``. A
    ``smoothed`` defense (the classifier is a smoothed g) is attacked under ``quick`` with
    SmoothAdv (m=32, T=20) instead of EOT-PGD and Square.
    """
    default = default or (DEFAULT_RANDOMIZED_PROTOCOL if randomized else DEFAULT_PROTOCOL)
    if config.custom:
        protocol = _custom(config, spec, certificates)
    else:
        protocol = _named(config.protocol or default, spec)
        if smoothed and protocol.name == "quick":  # the smoothed classifier's own adaptive attack
            protocol = replace(protocol, attacks=tuple(AttackSpec("smoothadv", t, (("m", 32), ("steps", 20)))
                                                       for t in spec.threat_models))
        if protocol.name in CERTIFY_PROTOCOLS and (certificates or not protocol.attacks):
            # certify@1 needs a certificate; quick@1 certifies only defenses that declare one
            protocol = replace(protocol, certifiers=_certifiers(config, certificates, CERTIFY_DEFAULTS[protocol.name]))
    if config.exact_draws:
        protocol = replace(protocol, exact=True)
    n_examples = config.n_examples if config.n_examples is not None else (protocol.n_examples or spec.eval_subset)
    if n_examples is not None:
        protocol = replace(protocol, n_examples=n_examples)
    return protocol

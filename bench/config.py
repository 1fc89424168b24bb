"""Run configuration: frozen dataclasses, one ``validate()``, and stable hashing.

Precedence is CLI > defaults (a config file layer can slot in between without changing this
module). This module is import-light on purpose: it must not import torch, so that looking up
a finished run costs well under a second.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from fractions import Fraction
from typing import Any

from bench.errors import BenchError

__all__ = [
    "AttackSpec",
    "CertifySpec",
    "Norm",
    "Protocol",
    "RunConfig",
    "ThreatModel",
    "format_eps",
    "is_adaptive",
    "parse_eps",
    "parse_norm",
    "stable_hash",
]


class Norm(str, Enum):
    """The perturbation norms a threat model may use."""

    LINF = "Linf"
    L2 = "L2"

    def __str__(self) -> str:
        return self.value


_NORM_ALIASES = {"linf": Norm.LINF, "inf": Norm.LINF, "l_inf": Norm.LINF, "l-inf": Norm.LINF,
                 "l2": Norm.L2, "2": Norm.L2}


def parse_norm(text: str | Norm) -> Norm:
    """Parse ``"Linf"``, ``"inf"``, ``"L2"`` ... (case-insensitive)."""
    if isinstance(text, Norm):
        return text
    norm = _NORM_ALIASES.get(str(text).strip().lower())
    if norm is None:
        raise BenchError(f"unknown norm '{text}'; use Linf or L2")
    return norm


def parse_eps(text: str | float | int) -> float:
    """Parse an eps given as a number or a fraction (``"8/255"``); must be finite and >= 0."""
    if isinstance(text, bool):
        raise BenchError(f"invalid eps {text!r}: not a number")
    raw = str(text).strip()
    try:
        if isinstance(text, (int, float)):
            value = float(text)
        else:
            value = float(Fraction(raw)) if "/" in raw else float(raw)
    except (ValueError, ZeroDivisionError):
        raise BenchError(f"invalid eps '{raw}': not a number (examples: 0.1, 8/255)") from None
    except OverflowError:
        raise BenchError(f"invalid eps '{raw[:40]}': too large") from None
    if not math.isfinite(value):
        raise BenchError(f"invalid eps '{text}': must be finite")
    if value < 0:
        raise BenchError(f"invalid eps '{text}': must be >= 0")
    return value


def format_eps(eps: float) -> str:
    """A short, readable eps: a decimal when one of up to 4 digits is exact, else ``k/255``."""
    short = f"{eps:.4g}"
    if float(short) == eps:
        return short
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and 0 < eps < 1:
        return f"{round(k)}/255"
    return short


@dataclass(frozen=True, order=True)
class ThreatModel:
    """A perturbation set: all x' in [0,1]^d with ||x' - x||_norm <= eps (pixel space)."""

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", parse_norm(self.norm))
        object.__setattr__(self, "eps", parse_eps(self.eps))
        if self.norm is Norm.LINF and self.eps > 1:
            raise BenchError(f"invalid eps {self.eps}: an Linf eps above 1 exceeds the [0,1] pixel range")

    @property
    def label(self) -> str:
        return f"{self.norm.value} {format_eps(self.eps)}"

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm.value, "eps": self.eps}


@dataclass(frozen=True)
class AttackSpec:
    """One attack of a protocol: registry name, threat model and keyword parameters."""

    attack: str
    threat: ThreatModel
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def label(self) -> str:
        return f"{self.attack} {self.threat.label}"

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.attack, **self.threat.to_dict(), "params": self.kwargs}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttackSpec:
        """The inverse of :meth:`to_dict` (as stored in a run's configuration)."""
        return cls(str(data["attack"]), ThreatModel(parse_norm(data["norm"]), float(data["eps"])),
                   tuple(sorted((data.get("params") or {}).items())))


@dataclass(frozen=True)
class CertifySpec:
    """One certifier of a protocol: registry name and keyword parameters."""

    certifier: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def label(self) -> str:
        return f"certify {self.certifier}"

    def to_dict(self) -> dict[str, Any]:
        return {"certifier": self.certifier, "params": self.kwargs}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CertifySpec:
        """The inverse of :meth:`to_dict`."""
        return cls(str(data["certifier"]), tuple(sorted((data.get("params") or {}).items())))


ADAPTIVE_PROTOCOLS = ("adaptive", "quick")  # protocols that evaluate randomized models adaptively


def is_adaptive(protocol_name: str) -> bool:
    """Whether the named protocol evaluates a randomized model adaptively (EOT, SmoothAdv)."""
    return protocol_name in ADAPTIVE_PROTOCOLS or protocol_name.endswith("-rand")


@dataclass(frozen=True)
class Protocol:
    """A named, versioned evaluation suite (the builders are in :mod:`bench.harness.protocol`).

    Rows are compared on the leaderboard only when their protocol name and version match.
    """

    name: str
    version: int
    attacks: tuple[AttackSpec, ...]
    n_examples: int | None = None  # None: the whole test split
    draws: int = 10  # re-draws used to score a randomized model (deterministic models use 1)
    frozen: bool = False  # attack one frozen draw of the model's randomness (freeze_randomness)
    description: str = ""
    certifiers: tuple[CertifySpec, ...] = ()  # run after the attacks, on every example
    # how a randomized model is scored (docs/evaluation.md): 1 = the R draws of a batch may be
    # shared by its examples, attacks run on the worst-of-R-correct examples; 2 = independent
    # draws per example, attacks run on every example not wrong on every draw
    scoring: int = 1
    exact: bool = False  # score with every draw of the model's declared draw space (--exact-draws)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def adaptive(self) -> bool:
        return is_adaptive(self.name)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "version": self.version, "attacks": [a.to_dict() for a in self.attacks],
               "n_examples": self.n_examples, "draws": self.draws, "frozen": self.frozen}
        if self.certifiers:  # absent for protocols without certification (keeps their run keys)
            out["certifiers"] = [c.to_dict() for c in self.certifiers]
        if self.scoring != 1:  # absent for scoring 1 (keeps the run keys of earlier versions)
            out["scoring"] = self.scoring
        if self.exact:
            out["exact_draws"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Protocol:
        """The inverse of :meth:`to_dict` (the description is not stored)."""
        return cls(str(data["name"]), int(data["version"]),
                   tuple(AttackSpec.from_dict(a) for a in data.get("attacks", [])),
                   n_examples=data.get("n_examples"), draws=int(data.get("draws", 10)),
                   frozen=bool(data.get("frozen", False)),
                   certifiers=tuple(CertifySpec.from_dict(c) for c in data.get("certifiers", [])),
                   scoring=int(data.get("scoring", 1)), exact=bool(data.get("exact_draws", False)))


def _canonical(obj: Any) -> Any:
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float):
        return repr(obj)  # full precision, stable
    return obj


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of a canonical JSON rendering of ``obj`` (dict key order does not matter)."""
    text = json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# The largest count, size or seed a run accepts: a signed 32-bit integer, which every SQL
# backend's INTEGER column holds. A larger -n is refused rather than stored.
MAX_COUNT = 2**31 - 1


@dataclass(frozen=True)
class RunConfig:
    """Everything ``bench run`` needs, as given by the user (before resolution).

    ``protocol`` names a versioned protocol (``pgd`` by default). Giving ``attacks``/``eps``
    instead builds a custom protocol; giving both is an error.
    """

    defense: str
    dataset: str
    protocol: str | None = None
    attacks: tuple[str, ...] = ()
    norm: str | None = None
    eps: tuple[float, ...] = ()
    steps: int | None = None
    restarts: int | None = None
    draws: int | None = None
    attack_params: tuple[tuple[str, Any], ...] = field(default_factory=tuple)  # --attack-param key=value
    certify: tuple[str, ...] = ()  # --certify NAME: certifiers of a custom protocol
    certify_params: tuple[tuple[str, Any], ...] = field(default_factory=tuple)  # --sigma, --n0, ... --certify-param
    radii: tuple[float, ...] = ()  # the certified-accuracy radius grid [default: the dataset's]
    n_examples: int | None = None
    seed: int = 0
    batch_size: int = 128
    device: str = "auto"
    recipe: str = "auto"
    epochs: int | None = None
    checkpoint: str | None = None
    data_dir: str | None = None
    image_size: int | None = None
    split: str = "test"
    download: bool = False
    hparams: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    exact_draws: bool = False  # score a randomized model with every draw of its declared draw space

    @property
    def attacking(self) -> bool:
        """Whether attack options were given (a custom protocol's attacks)."""
        return bool(self.attacks or self.eps or self.norm or self.steps is not None or self.restarts is not None
                    or self.draws is not None or self.attack_params)

    @property
    def certifying(self) -> bool:
        """Whether certification options were given (a custom protocol's certifiers)."""
        return bool(self.certify or self.certify_params)

    @property
    def custom(self) -> bool:
        """Whether the options describe a custom protocol (rather than a named one)."""
        return self.attacking or self.certifying

    def validate(self) -> RunConfig:
        """Check every field and cross-field rule; raise :class:`BenchError` on the first problem."""
        from bench.registry import ATTACKS, CERTIFIERS, DATASETS, DEFENSES

        if self.defense not in DEFENSES:
            raise DEFENSES.unknown(self.defense)
        if self.dataset not in DATASETS:
            raise DATASETS.unknown(self.dataset)
        for name in self.attacks:
            if name not in ATTACKS:
                raise ATTACKS.unknown(name)
        for name in self.certify:
            if name not in CERTIFIERS:
                raise CERTIFIERS.unknown(name)
        if not all(math.isfinite(r) and r >= 0 for r in self.radii):
            raise BenchError(f"invalid --radii {', '.join(map(str, self.radii))}: radii must be finite and >= 0")
        if self.protocol is not None and self.custom:
            raise BenchError(
                "--protocol cannot be combined with --attack/--attack-param/--norm/--eps/--steps/--restarts/--draws "
                "or --certify/--sigma/--n0/--n-samples/--alpha/--sequential/--certify-param; "
                "drop --protocol to run a custom protocol"
            )
        if self.norm is not None:
            parse_norm(self.norm)
        for eps in self.eps:
            parse_eps(eps)
            if self.norm is not None:
                ThreatModel(parse_norm(self.norm), eps)
        for name, value, low in (("steps", self.steps, 1), ("restarts", self.restarts, 1), ("draws", self.draws, 1),
                                 ("n-examples", self.n_examples, 1), ("batch-size", self.batch_size, 1),
                                 ("epochs", self.epochs, 1), ("image-size", self.image_size, 1)):
            if value is not None and value < low:
                raise BenchError(f"invalid --{name} {value}: must be >= {low}")
            if value is not None and value > MAX_COUNT:
                raise BenchError(f"invalid --{name} {value}: must be <= {MAX_COUNT}")
        if self.seed < 0 or self.seed > MAX_COUNT:
            raise BenchError(f"invalid --seed {self.seed}: must be between 0 and {MAX_COUNT}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise BenchError(f"invalid --device '{self.device}'; use auto, cpu, cuda or cuda:N")
        if self.recipe not in ("auto", "paper", "cpu"):
            raise BenchError(f"invalid --recipe '{self.recipe}'; use auto, paper or cpu")
        if self.checkpoint is not None:
            if not os.path.exists(self.checkpoint):
                raise BenchError(f"checkpoint file not found: {self.checkpoint}")
            if not os.path.isfile(self.checkpoint):
                raise BenchError(f"checkpoint is not a file: {self.checkpoint}")
            if not os.access(self.checkpoint, os.R_OK):
                raise BenchError(f"checkpoint file is not readable: {self.checkpoint}")
            if self.epochs is not None:
                raise BenchError("--epochs trains a model and cannot be combined with --checkpoint")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hparams"] = dict(self.hparams)
        out["attack_params"] = dict(self.attack_params)
        out["certify_params"] = dict(self.certify_params)
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

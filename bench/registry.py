"""One generic registry for defenses, attacks, certifiers and datasets.

Usage::

    from bench.registry import register_defense
    from bench.defenses.base import Defense

    @register_defense("my-defense")
    class MyDefense(Defense):
        ...

Three kinds of entries live in a :class:`Registry`:

* objects registered with the decorator (the class itself is stored and returned unchanged);
* lazy built-in entries, ``"module:attr"`` strings imported on first lookup, so that
  ``bench list`` and ``bench --help`` never import torch;
* third-party plugins declared as entry points in the groups ``bench.defenses``,
  ``bench.attacks``, ``bench.certifiers`` and ``bench.datasets`` (also lazy).

Registering a second, different object under an existing name raises ``ValueError``;
registering something that does not subclass the registry's base class raises ``TypeError``.
A failed lookup raises :class:`bench.errors.UnknownNameError` with close matches.
"""

from __future__ import annotations

import difflib
import importlib
import threading
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, Generic, TypeVar

from bench.errors import UnknownNameError

T = TypeVar("T")

__all__ = [
    "ATTACKS",
    "CERTIFIERS",
    "DATASETS",
    "DEFENSES",
    "LazyEntry",
    "Registry",
    "register_attack",
    "register_certifier",
    "register_dataset",
    "register_defense",
]


@dataclass(frozen=True)
class LazyEntry:
    """A placeholder for an object that is imported on first lookup."""

    target: str  # "package.module:Attribute"
    summary: str = ""

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def attr(self) -> str:
        return self.target.partition(":")[2]


def _import_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    if not attr:
        return module
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _target_of(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}"


class Registry(Generic[T]):
    """A name -> object mapping with lazy entries, plugins and helpful lookup errors.

    Args:
        kind: what the registry holds, singular ("defense"); used in messages.
        base: the class every entry must subclass, or a ``"module:Class"`` string naming it
            (resolved only when needed, so the registry itself stays import-light).
        entry_point_group: the ``importlib.metadata`` group scanned for plugins.
    """

    def __init__(self, kind: str, base: type | str | None = None, entry_point_group: str | None = None):
        self.kind = kind
        self._base = base
        self.entry_point_group = entry_point_group
        self._entries: dict[str, Any] = {}
        self._plugins_scanned = entry_point_group is None
        self._lock = threading.RLock()

    # -- registration -------------------------------------------------------------------
    @staticmethod
    def normalize(name: str) -> str:
        return str(name).strip().lower()

    @property
    def base(self) -> type | None:
        if isinstance(self._base, str):
            self._base = _import_target(self._base)
        return self._base  # type: ignore[return-value]  # a str was replaced by its import above

    def _check_base(self, name: str, obj: Any) -> None:
        base = self.base
        if base is None:
            return
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise TypeError(
                f"cannot register {self.kind} '{name}': {obj!r} is not a subclass of "
                f"{base.__module__}.{base.__qualname__}"
            )

    def _is_placeholder_for(self, entry: Any, obj: Any) -> bool:
        if isinstance(entry, LazyEntry):
            return entry.target == _target_of(obj)
        if isinstance(entry, EntryPoint):
            return entry.value == _target_of(obj) or entry.value == obj.__module__
        return entry is obj

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, return a class decorator."""
        key = self.normalize(name)
        if not key:
            raise ValueError(f"a {self.kind} name must not be empty")

        def add(target: T) -> T:
            self._check_base(key, target)
            with self._lock:
                existing = self._entries.get(key)
                if existing is not None and not self._is_placeholder_for(existing, target):
                    raise ValueError(
                        f"{self.kind} '{key}' is already registered "
                        f"({self._describe(existing)}); pick another name"
                    )
                self._entries[key] = target
                self._name(key, target)
            return target

        if obj is not None:
            return add(obj)
        return add

    @staticmethod
    def _name(key: str, obj: Any) -> None:
        """The object learns its registry name (used in messages, stored rows and cache keys)."""
        if isinstance(obj, type) and not obj.__dict__.get("name"):
            try:
                obj.name = key  # type: ignore[attr-defined]  # any registered class; failure handled below
            except (AttributeError, TypeError):
                pass

    def add_lazy(self, name: str, target: str, summary: str = "") -> None:
        """Register ``"module:attr"`` to be imported on first lookup."""
        key = self.normalize(name)
        with self._lock:
            existing = self._entries.get(key)
            if existing is not None and not (isinstance(existing, LazyEntry) and existing.target == target):
                raise ValueError(f"{self.kind} '{key}' is already registered ({self._describe(existing)})")
            self._entries[key] = LazyEntry(target, summary)

    # -- plugins ------------------------------------------------------------------------
    def _scan_plugins(self) -> None:
        if self._plugins_scanned:
            return
        with self._lock:
            self._plugins_scanned = True
            for ep in entry_points(group=self.entry_point_group or ""):
                key = self.normalize(ep.name)
                existing = self._entries.get(key)
                if existing is not None and not isinstance(existing, (LazyEntry, EntryPoint)) and \
                        ep.value in (_target_of(existing), getattr(existing, "__module__", None)):
                    continue  # the plugin's module was imported first and registered itself
                if key in self._entries:
                    raise ValueError(
                        f"plugin {self.kind} '{key}' from entry point '{ep.value}' clashes with "
                        f"an existing entry ({self._describe(self._entries[key])})"
                    )
                self._entries[key] = ep

    # -- lookup -------------------------------------------------------------------------
    def names(self) -> list[str]:
        self._scan_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._scan_plugins()
        return isinstance(name, str) and self.normalize(name) in self._entries

    def __iter__(self):  # names, sorted
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def summary(self, name: str) -> str:
        """A one-line description without importing the entry when it is lazy."""
        self._scan_plugins()
        entry = self._entries.get(self.normalize(name))
        if isinstance(entry, LazyEntry):
            return entry.summary
        if isinstance(entry, EntryPoint):
            return f"plugin ({entry.value})"
        doc = (getattr(entry, "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""

    def get(self, name: str) -> T:
        """Return the object registered as ``name``, importing it if it is lazy."""
        self._scan_plugins()
        key = self.normalize(name)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise self.unknown(name)
            if isinstance(entry, (LazyEntry, EntryPoint)):
                target = entry.target if isinstance(entry, LazyEntry) else entry.value
                loaded = _import_target(target)
                # importing the module may have registered the real object already
                current = self._entries.get(key)
                if isinstance(current, (LazyEntry, EntryPoint)):
                    if isinstance(loaded, type(importlib)):  # a module that did not register
                        raise ImportError(f"{self.kind} '{key}': importing {target} did not register it")
                    self._check_base(key, loaded)
                    self._entries[key] = loaded
                    self._name(key, loaded)
                entry = self._entries[key]
            return entry

    def unknown(self, name: str) -> UnknownNameError:
        known = self.names()
        close = difflib.get_close_matches(self.normalize(name), known, n=3, cutoff=0.6)
        msg = f"unknown {self.kind} '{name}'"
        if close:
            msg += "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
        else:
            msg += f"; known {self.kind}s: " + (", ".join(known) if known else "(none)")
        return UnknownNameError(msg)

    def _describe(self, entry: Any) -> str:
        if isinstance(entry, LazyEntry):
            return entry.target
        if isinstance(entry, EntryPoint):
            return f"entry point {entry.value}"
        return _target_of(entry)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


DEFENSES: Registry[Any] = Registry("defense", "bench.defenses.base:Defense", "bench.defenses")
ATTACKS: Registry[Any] = Registry("attack", "bench.attacks.base:Attack", "bench.attacks")
CERTIFIERS: Registry[Any] = Registry("certifier", "bench.certifiers.base:Certifier", "bench.certifiers")
DATASETS: Registry[Any] = Registry("dataset", "bench.data.base:Dataset", "bench.datasets")


def register_defense(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register_defense("hycas")`` on a :class:`~bench.defenses.base.Defense`."""
    return DEFENSES.register(name)


def register_attack(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register_attack("pgd")`` on an :class:`~bench.attacks.base.Attack`."""
    return ATTACKS.register(name)


def register_certifier(name: str) -> Callable[[T], T]:
    """Class decorator for a :class:`~bench.certifiers.base.Certifier`."""
    return CERTIFIERS.register(name)


def register_dataset(name: str) -> Callable[[T], T]:
    """Class decorator for a :class:`~bench.data.base.Dataset`."""
    return DATASETS.register(name)


# Built-in entries: imported only when looked up. Keep this list explicit and greppable.
_BUILTINS: dict[Registry[Any], dict[str, tuple[str, str]]] = {
    DEFENSES: {
        "standard": ("bench.defenses.baselines:Standard", "empirical risk minimisation (no defense)"),
        "pgd-at": ("bench.defenses.baselines:PGDAT", "Madry et al. 2018 PGD adversarial training"),
        "rs": ("bench.defenses.smoothing:RandomizedSmoothing", "Cohen et al. 2019 Gaussian randomized smoothing"),
        "smoothadv": ("bench.defenses.smoothadv:SmoothAdvDefense",
                      "Salman et al. 2019 SmoothAdv: adversarially trained smoothed classifier"),
        "dcs": ("bench.defenses.dcs:DCS", "Ma et al. 2025 deformable convolution with stochasticity, GSAT training"),
        "hycas": ("bench.defenses.hycas:HyCAS", "Dhar et al. 2026 HyCAS, <= 2-Lipschitz by construction (AOL)"),
        "dds": ("bench.defenses.dds:DDS", "Carlini et al. 2023 diffusion denoised smoothing (DDPM one-shot denoiser)"),
        "dds-rcs": ("bench.defenses.dds:DDSRobust",
                    "Hedayatnia et al. 2025 DDS with a covariate-shift-robust classifier"),
        "model": ("bench.defenses.external:ExternalModel",
                  "your own model: bench run --model SPEC --checkpoint FILE, or bench.evaluate(model)"),
    },
    ATTACKS: {
        "pgd": ("bench.attacks.pgd:PGD", "projected gradient descent, Linf and L2 (torchattacks)"),
        "fgsm": ("bench.attacks.library:FGSM", "fast gradient sign method, Linf (torchattacks)"),
        "mifgsm": ("bench.attacks.library:MIFGSM", "momentum iterative FGSM, Linf (torchattacks)"),
        "cw-l2": ("bench.attacks.library:CWL2", "Carlini-Wagner L2 (torchattacks), projected to the eps ball"),
        "deepfool": ("bench.attacks.library:DeepFool", "DeepFool L2 (torchattacks), projected to the eps ball"),
        "apgd-ce": ("bench.attacks.autoattack:APGDCE", "APGD on cross-entropy (pyautoattack)"),
        "apgd-dlr": ("bench.attacks.autoattack:APGDDLR", "APGD on the DLR loss (pyautoattack)"),
        "apgd-t": ("bench.attacks.autoattack:APGDT", "targeted APGD on DLR (pyautoattack)"),
        "fab-t": ("bench.attacks.autoattack:FABT", "targeted FAB (pyautoattack)"),
        "square": ("bench.attacks.autoattack:Square", "Square, score-based black-box (pyautoattack)"),
        "autoattack": ("bench.attacks.autoattack:AutoAttackSuite", "AutoAttack standard/plus/rand (pyautoattack)"),
        "eot": ("bench.attacks.wrappers:EOT", "expectation over transformation around any gradient attack"),
        "bpda": ("bench.attacks.wrappers:BPDA",
                 "backward-pass differentiable approximation around any gradient attack"),
        "smoothadv": ("bench.attacks.smoothadv:SmoothAdv", "Salman et al. 2019 PGD on the soft smoothed classifier"),
    },
    CERTIFIERS: {
        "smoothing": ("bench.certifiers.smoothing:Smoothing", "randomized smoothing CERTIFY (Cohen et al. 2019)"),
        "lipschitz": ("bench.certifiers.lipschitz:Lipschitz", "margin / (sqrt(2) L) from a guaranteed Lipschitz bound"),
    },
    DATASETS: {
        "digits": ("bench.data.digits:Digits", "scikit-learn's 8x8 handwritten digits (embedded default)"),
        "synthetic": ("bench.data.synthetic:Synthetic", "tiny generated dataset for tests"),
        "cifar10": ("bench.data.cifar:Cifar10", "CIFAR-10 (official pickles or class folders)"),
        "cifar100": ("bench.data.cifar:Cifar100", "CIFAR-100 (official pickles or class folders)"),
        "imagenet": ("bench.data.imagenet:ImageNet", "ImageNet-1k val, seeded 5,000-image subset"),
        "medmnist": ("bench.data.medmnist:MedMNIST", "any MedMNIST v2 .npz (task inferred)"),
        "ham10000": ("bench.data.ham10000:HAM10000", "HAM10000 dermoscopy, 7 classes, lesion-grouped splits"),
        "nih-chestxray": ("bench.data.nih:NIHChestXray", "NIH ChestX-ray14, binary: No Finding vs finding"),
        "nih-chestxray14": ("bench.data.nih:NIHChestXray14", "NIH ChestX-ray14, 14 findings (multilabel)"),
    },
}

for _registry, _entries in _BUILTINS.items():
    for _name, (_target, _summary) in _entries.items():
        _registry.add_lazy(_name, _target, _summary)

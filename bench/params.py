"""Plugin parameters: one typed spec (:class:`Param`) and one check (:func:`check_params`).

Attacks, certifiers and defenses declare each parameter once, default and rule together::

    parameters = {"steps": Param(20, int, ge=1), "step_size": Param(None, float, gt=0),
                  "random_start": Param(True, bool), "version": Param("standard", str, choices=VERSIONS)}

and their ``defaults`` (``hparams`` for a defense) are derived from it. Every value a user or a
caller gives goes through :meth:`Param.check`, which guarantees:

* numbers are finite (NaN and +-Infinity are refused) and inside the declared bounds;
* an ``int`` parameter gets an ``int`` (``2.0`` becomes 2; ``1.5``, ``True`` and strings are
  refused); a ``float`` parameter gets a ``float`` (an int 1 becomes 1.0; a string that reads as
  a number, ``"0.5"`` or the fraction ``"64/256"``, is that number; ``"abc"`` is refused), so
  resolved values, and the hashes made of them, do not depend on how a number was written;
* a ``bool`` parameter accepts ``True``/``False``, the integers 1/0 and the strings
  true/false/yes/no/1/0 (any case); anything else (``"maybe"``, 2) is refused;
* ``choices`` are matched case-insensitively for strings and give the declared spelling;
* ``None`` is accepted exactly when the default is ``None`` (it means "the default rule");
* a refusal is one :class:`~bench.errors.BenchError` line naming the owner, the parameter, what
  is allowed and the value given: ``attack 'pgd': step_size must be a finite number > 0, got nan``.

Import-light on purpose (no torch): resolving a run's configuration uses it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, ClassVar

from bench.errors import BenchError

__all__ = ["Param", "Parameterized", "check_params", "declared_specs", "defaults_of", "with_defaults"]

_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")
_KINDS = (float, int, bool, str, dict, list)
_KIND_WORDS: dict[type | None, str] = {None: "any value", float: "a finite number", int: "an integer", bool: "true",
                                       str: "a string", dict: "a mapping", list: "a list"}


class _Refused(Exception):
    """Internal: the value does not fit the spec (turned into one BenchError by :meth:`Param.check`)."""


@dataclass(frozen=True)
class Param:
    """One parameter: its default and the values it accepts (see the module docstring).

    ``kind``: ``float``, ``int``, ``bool``, ``str``, ``dict`` or ``list``; ``None`` accepts any
    value unchanged (what a plugin that declares only ``defaults`` gets). ``ge``/``gt``/``le``/``lt``
    bound numbers. ``choices`` lists the allowed values. ``literals`` are strings accepted as they
    are besides values of ``kind`` (lower-case words matched in any case: ``"auto"``). ``item``
    checks each element of a ``list``.
    """

    default: Any = None
    kind: type | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] = ()
    literals: tuple[str, ...] = ()
    item: Param | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in _KINDS:
            raise TypeError(f"Param kind must be one of {', '.join(k.__name__ for k in _KINDS)} or None")

    def check(self, owner: str, name: str, value: Any) -> Any:
        """``value`` coerced to this spec, else a one-line :class:`BenchError`
        ``"{owner}: {name} must be {allowed}, got {value!r}"``."""
        try:
            return self._coerce(value)
        except _Refused:
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise BenchError(f"{owner}: {name} must be {self.allowed()}, got {shown}") from None

    def allowed(self) -> str:
        """What this spec accepts, in words (``an integer >= 1``, ``auto, true or false``)."""
        if self.choices:
            words = [_word(c) for c in self.choices]
        else:
            words = [_KIND_WORDS[self.kind] + self._bounds()]
            if self.kind is bool:
                words.append("false")
            if self.kind is list and self.item is not None:
                words = [f"a list whose items are each {self.item.allowed()}"]
        options = [*self.literals, *words]
        return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"

    def _bounds(self) -> str:
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None:
            return (f" in {'[' if self.ge is not None else '('}{low:g}, "
                    f"{high:g}{']' if self.le is not None else ')'}")
        for bound, sign in ((self.ge, ">="), (self.gt, ">"), (self.le, "<="), (self.lt, "<")):
            if bound is not None:
                return f" {sign} {bound:g}"
        return ""

    def _coerce(self, value: Any) -> Any:
        if value is None:
            if self.default is None:
                return None
            raise _Refused
        if isinstance(value, str) and value.strip().lower() in self.literals:
            return value.strip().lower()
        out = _KIND_COERCE[self.kind](self, value)
        if self.choices:
            out = _choose(out, self.choices)
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            self._in_bounds(out)
        return out

    def _in_bounds(self, number: float) -> None:
        if ((self.ge is not None and number < self.ge) or (self.gt is not None and number <= self.gt)
                or (self.le is not None and number > self.le) or (self.lt is not None and number >= self.lt)):
            raise _Refused


def _word(choice: Any) -> str:
    return str(choice).lower() if isinstance(choice, bool) else str(choice)


def _choose(value: Any, choices: tuple[Any, ...]) -> Any:
    for choice in choices:
        if isinstance(value, str) and isinstance(choice, str):
            if value.strip().lower() == choice.lower():
                return choice
        elif value == choice and type(value) is type(choice):
            return choice
    raise _Refused


def _number(value: Any) -> float:
    """A finite float from a real number or a string that reads as one (``"8/255"`` included)."""
    if isinstance(value, bool):
        raise _Refused
    if isinstance(value, numbers.Real):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            number = float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError, OverflowError):
            raise _Refused from None
    else:
        raise _Refused
    if not math.isfinite(number):
        raise _Refused
    return number


def _as_int(spec: Param, value: Any) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):  # counts are written as numbers (the command line's JSON makes 2 an int)
        raise _Refused
    number = _number(value)
    if not number.is_integer():
        raise _Refused
    return int(number)


def _as_bool(spec: Param, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):  # what the command line's JSON makes of 1 and 0
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _Refused


def _as_str(spec: Param, value: Any) -> str:
    if not isinstance(value, str):
        raise _Refused
    return value


def _as_dict(spec: Param, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _Refused
    return dict(value)


def _as_list(spec: Param, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise _Refused
    items = list(value)
    return [spec.item._coerce(v) for v in items] if spec.item is not None else items


_KIND_COERCE: dict[type | None, Any] = {
    None: lambda spec, value: value, float: lambda spec, value: _number(value), int: _as_int, bool: _as_bool,
    str: _as_str, dict: _as_dict, list: _as_list,
}


def defaults_of(specs: Mapping[str, Param]) -> dict[str, Any]:
    """The default of every parameter, by name (what ``defaults`` / ``hparams`` show)."""
    return {name: spec.default for name, spec in specs.items()}


def check_params(owner: str, specs: Mapping[str, Param], values: Mapping[str, Any],
                 noun: str = "parameter") -> dict[str, Any]:
    """Every value of ``values`` checked and coerced by its spec, in the same order.

    A name without a spec is refused (``unknown parameter(s) foo for attack 'pgd'; known: ...``,
    ``noun`` names what they are); so is any value its spec refuses. ``owner`` is how the
    messages name the plugin, e.g. ``attack 'pgd'``.
    """
    unknown = sorted(set(values) - set(specs))
    if unknown:
        known = ", ".join(sorted(specs)) or "(none)"
        raise BenchError(f"unknown {noun}(s) {', '.join(unknown)} for {owner}; known: {known}")
    return {name: specs[name].check(owner, name, value) for name, value in values.items()}


def with_defaults(owner: str, specs: Mapping[str, Param], given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` over the defaults (a value ``None`` keeps the default), all checked by
    :func:`check_params`: the parameters of an attack or a certifier."""
    return check_params(owner, specs, {**defaults_of(specs), **{k: v for k, v in given.items() if v is not None}})


def declared_specs(namespace: Mapping[str, Any], inherited: Mapping[str, Param],
                   defaults_name: str) -> dict[str, Param]:
    """The specs a plugin class body (``namespace``) declares: its own ``parameters``; else, for a
    class that lists only defaults (``defaults_name``: ``defaults`` or ``hparams``, the older way),
    each of those with the inherited spec of that name (unchecked, ``kind=None``, when none);
    else the ``inherited`` ones."""
    if "parameters" in namespace:
        return dict(namespace["parameters"])
    if defaults_name in namespace:
        return {name: replace(inherited[name], default=value) if name in inherited else Param(value)
                for name, value in namespace[defaults_name].items()}
    return dict(inherited)


class Parameterized:
    """Base of the plugins configured by keyword parameters (attacks, certifiers).

    Each parameter is declared once in ``parameters`` (default and rule); ``defaults`` is derived
    from it when the class is created (the protocol routing and the CLI read it). The constructor
    checks and coerces every value, given or default, into ``self.params``, or raises one
    one-line :class:`BenchError` naming ``kind`` and ``name`` (e.g. ``attack 'pgd'``)."""

    kind: ClassVar[str] = "plugin"
    name: ClassVar[str] = ""
    parameters: ClassVar[dict[str, Param]] = {}
    defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.parameters = declared_specs(cls.__dict__, cls.parameters, "defaults")
        cls.defaults = defaults_of(cls.parameters)

    def __init__(self, **params: Any) -> None:
        self.params = with_defaults(f"{self.kind} '{self.name}'", self.parameters, params)

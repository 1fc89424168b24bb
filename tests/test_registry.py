"""The generic registry (fresh instances per test) and the real global registries."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import types
import uuid
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import bench.registry
from bench.errors import BenchError, UnknownNameError
from bench.registry import ATTACKS, DATASETS, DEFENSES, LazyEntry, Registry


class Thing:
    """Base class of the test registry."""


class Other:
    """Not a Thing."""


@pytest.fixture
def reg() -> Registry:
    return Registry("thing", base=Thing)


@pytest.fixture
def module_name():
    """A unique module name; the module is removed from sys.modules afterwards."""
    name = f"bench_test_mod_{uuid.uuid4().hex[:12]}"
    yield name
    sys.modules.pop(name, None)


def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()


def install_holder(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: object) -> types.ModuleType:
    """An importable in-memory module holding ``attrs`` (the base class, a registry) for plugin modules."""
    holder = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(holder, key, value)
    monkeypatch.setitem(sys.modules, name, holder)
    return holder


# -- registration ----------------------------------------------------------------------------
def test_decorator_registers_and_returns_class_unchanged(reg: Registry) -> None:
    class A(Thing):
        pass

    decorated = reg.register("a-thing")(A)
    assert decorated is A
    assert reg.get("a-thing") is A
    assert "a-thing" in reg
    assert reg.names() == ["a-thing"]
    assert A.name == "a-thing"  # the class learns its registry name


def test_register_with_object_argument(reg: Registry) -> None:
    class A(Thing):
        pass

    assert reg.register("A", A) is A
    assert reg.get("a") is A  # names are case-insensitive
    assert reg.get("  A ") is A


def test_register_keeps_explicit_name_attribute(reg: Registry) -> None:
    class A(Thing):
        name = "custom"

    reg.register("a")(A)
    assert A.name == "custom"


def test_duplicate_name_with_different_object_raises(reg: Registry) -> None:
    class A(Thing):
        pass

    class B(Thing):
        pass

    reg.register("x")(A)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x")(B)
    assert reg.get("x") is A  # the first registration is kept


def test_same_object_twice_is_allowed(reg: Registry) -> None:
    class A(Thing):
        pass

    reg.register("x")(A)
    reg.register("x")(A)
    assert reg.get("x") is A


def test_non_subclass_raises_type_error(reg: Registry) -> None:
    with pytest.raises(TypeError, match="not a subclass"):
        reg.register("o")(Other)
    with pytest.raises(TypeError):
        reg.register("f")(lambda: None)  # not even a class
    assert "o" not in reg and "f" not in reg


def test_empty_name_rejected(reg: Registry) -> None:
    with pytest.raises(ValueError):
        reg.register("  ")


def test_base_given_as_string_is_resolved() -> None:
    r = Registry("thing", base=f"{__name__}:Thing")
    with pytest.raises(TypeError):
        r.register("o")(Other)

    class A(Thing):
        pass

    assert r.register("a")(A) is A


# -- lazy entries ----------------------------------------------------------------------------
def test_lazy_entry_imported_only_on_get(reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         module_name: str) -> None:
    holder = install_holder(monkeypatch, f"{module_name}_base", Thing=Thing)
    write_module(tmp_path, monkeypatch, module_name, f"""
        from {holder.__name__} import Thing

        class Lazy(Thing):
            '''A lazily imported thing.'''
    """)
    reg.add_lazy("lazy", f"{module_name}:Lazy", "summary without import")

    assert "lazy" in reg
    assert reg.names() == ["lazy"]
    assert reg.summary("lazy") == "summary without import"
    assert module_name not in sys.modules, "listing or describing a lazy entry must not import it"

    cls = reg.get("lazy")
    assert module_name in sys.modules
    assert cls is sys.modules[module_name].Lazy
    assert issubclass(cls, Thing)
    assert reg.get("lazy") is cls  # cached


def test_lazy_entry_whose_module_registers_itself(reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  module_name: str) -> None:
    holder = install_holder(monkeypatch, f"{module_name}_holder", Thing=Thing, REG=reg)
    write_module(tmp_path, monkeypatch, module_name, f"""
        from {holder.__name__} import REG, Thing

        @REG.register("self-reg")
        class SelfReg(Thing):
            pass
    """)
    reg.add_lazy("self-reg", f"{module_name}:SelfReg")
    assert isinstance(reg._entries["self-reg"], LazyEntry)

    cls = reg.get("self-reg")  # the decorator replaces the placeholder: no "already registered" error
    assert cls is sys.modules[module_name].SelfReg
    assert reg.get("self-reg") is cls


def test_lazy_entry_whose_module_registers_a_different_class_raises(
        reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module_name: str) -> None:
    holder = install_holder(monkeypatch, f"{module_name}_holder", Thing=Thing, REG=reg)
    write_module(tmp_path, monkeypatch, module_name, f"""
        from {holder.__name__} import REG, Thing

        @REG.register("clash")
        class Impostor(Thing):
            pass

        class Expected(Thing):
            pass
    """)
    reg.add_lazy("clash", f"{module_name}:Expected")
    with pytest.raises(ValueError, match="already registered"):
        reg.get("clash")


def test_lazy_entry_to_non_subclass_raises_on_get(reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  module_name: str) -> None:
    write_module(tmp_path, monkeypatch, module_name, """
        class NotAThing:
            pass
    """)
    reg.add_lazy("bad", f"{module_name}:NotAThing")
    with pytest.raises(TypeError):
        reg.get("bad")


def test_add_lazy_conflicting_target_raises(reg: Registry) -> None:
    reg.add_lazy("x", "some.module:A")
    reg.add_lazy("x", "some.module:A")  # same target again is fine
    with pytest.raises(ValueError):
        reg.add_lazy("x", "some.module:B")


# -- lookup errors ---------------------------------------------------------------------------
def test_unknown_name_suggests_close_match(reg: Registry) -> None:
    class Hycas(Thing):
        pass

    class Dcs(Thing):
        pass

    reg.register("hycas")(Hycas)
    reg.register("dcs")(Dcs)
    with pytest.raises(UnknownNameError) as info:
        reg.get("hycsa")
    err = info.value
    assert isinstance(err, BenchError) and isinstance(err, KeyError)
    assert "did you mean 'hycas'" in str(err)
    assert "\n" not in str(err)
    assert not str(err).startswith("'")  # not KeyError's quoted repr


def test_unknown_name_without_close_match_lists_known(reg: Registry) -> None:
    class A(Thing):
        pass

    reg.register("alpha")(A)
    with pytest.raises(UnknownNameError, match="alpha") as info:
        reg.get("zzzzzz")
    assert "did you mean" not in str(info.value)


# -- entry-point plugins ---------------------------------------------------------------------
def test_entry_point_plugin_is_listed_and_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   module_name: str) -> None:
    holder = install_holder(monkeypatch, f"{module_name}_base", Thing=Thing)
    write_module(tmp_path, monkeypatch, module_name, f"""
        from {holder.__name__} import Thing

        class Plugin(Thing):
            '''A third-party defense.'''
    """)
    ep = EntryPoint(name="My-Plugin", value=f"{module_name}:Plugin", group="bench.defenses")
    groups_asked: list[str] = []

    def fake_entry_points(*, group: str):
        groups_asked.append(group)
        return [ep] if group == "bench.defenses" else []

    monkeypatch.setattr(bench.registry, "entry_points", fake_entry_points)
    reg = Registry("thing", base=Thing, entry_point_group="bench.defenses")

    assert "my-plugin" in reg.names()
    assert "my-plugin" in reg
    assert groups_asked == ["bench.defenses"]
    assert module_name not in sys.modules, "listing plugins must not import them"
    cls = reg.get("my-plugin")
    assert cls is sys.modules[module_name].Plugin
    assert issubclass(cls, Thing)


# Plugin and lazy entries must learn their registry name: the runner stores defense.name in the
# runs/models rows and uses it in the model-cache key and checkpoint file name.
def test_entry_point_plugin_learns_its_registry_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     module_name: str) -> None:
    holder = install_holder(monkeypatch, f"{module_name}_base", Thing=Thing)
    write_module(tmp_path, monkeypatch, module_name, f"""
        from {holder.__name__} import Thing

        class Plugin(Thing):
            pass
    """)
    ep = EntryPoint(name="my-plugin", value=f"{module_name}:Plugin", group="bench.defenses")
    monkeypatch.setattr(bench.registry, "entry_points", lambda *, group: [ep])
    reg = Registry("thing", base=Thing, entry_point_group="bench.defenses")
    assert getattr(reg.get("my-plugin"), "name", None) == "my-plugin"


def test_lazy_entry_learns_its_registry_name(reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             module_name: str) -> None:
    holder = install_holder(monkeypatch, f"{module_name}_base", Thing=Thing)
    write_module(tmp_path, monkeypatch, module_name, f"""
        from {holder.__name__} import Thing

        class Lazy(Thing):
            pass
    """)
    reg.add_lazy("lazy-one", f"{module_name}:Lazy")
    assert getattr(reg.get("lazy-one"), "name", None) == "lazy-one"


def test_entry_point_clashing_with_builtin_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = EntryPoint(name="x", value="somewhere:X", group="bench.attacks")
    monkeypatch.setattr(bench.registry, "entry_points", lambda *, group: [ep] if group == "bench.attacks" else [])
    reg = Registry("thing", base=Thing, entry_point_group="bench.attacks")

    class X(Thing):
        pass

    reg.register("x")(X)
    with pytest.raises(ValueError, match="clashes"):
        reg.names()


# -- the real global registries --------------------------------------------------------------
def _bases():
    from bench.attacks.base import Attack
    from bench.data.base import Dataset
    from bench.defenses.base import Defense

    return {"defense": Defense, "attack": Attack, "dataset": Dataset}


GLOBAL = [("defense", DEFENSES, n) for n in DEFENSES.names()] + \
         [("attack", ATTACKS, n) for n in ATTACKS.names()] + \
         [("dataset", DATASETS, n) for n in DATASETS.names()]


def test_global_registries_are_not_empty() -> None:
    assert {"standard", "pgd-at"} <= set(DEFENSES.names())
    assert "pgd" in ATTACKS.names()
    assert {"digits", "synthetic"} <= set(DATASETS.names())


@pytest.mark.parametrize(("kind", "registry", "name"), GLOBAL, ids=[f"{k}:{n}" for k, _, n in GLOBAL])
def test_every_global_entry_loads_and_subclasses_its_base(kind: str, registry: Registry, name: str) -> None:
    obj = registry.get(name)
    assert isinstance(obj, type)
    assert issubclass(obj, _bases()[kind])
    assert obj.name == name


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_has_recipes_and_info(name: str) -> None:
    from bench.defenses.base import DefenseInfo, Recipe

    cls = DEFENSES.get(name)
    assert {"paper", "cpu"} <= set(cls.recipes) or (not cls.trainable and not cls.recipes)  # `model` is never trained
    assert all(isinstance(r, Recipe) for r in cls.recipes.values())
    assert isinstance(cls.info, DefenseInfo)
    assert cls.info.paper


@pytest.mark.parametrize("argv", [["list"], ["--help"]], ids=["list", "help"])
def test_cli_list_and_help_do_not_import_torch(argv: list[str], tmp_path: Path) -> None:
    code = (
        "from typer.testing import CliRunner; from bench.cli import app; "
        f"r = CliRunner().invoke(app, {argv!r}); import sys; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "print(r.exit_code); print(r.output)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "0", proc.stdout
    if argv == ["list"]:
        for name in ("standard", "pgd-at", "pgd", "digits", "synthetic"):
            assert name in proc.stdout

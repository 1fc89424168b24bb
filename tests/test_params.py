"""One parameter mechanism (bench.params) for attack, certifier and defense parameters: the spec's
rules, every registered plugin declaring and enforcing them, and the command line refusing bad
values with one ``error:`` line before anything is trained."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from bench.attacks.base import Attack
from bench.cli import app
from bench.errors import BenchError
from bench.params import Param, check_params, declared_specs, with_defaults
from bench.registry import ATTACKS, CERTIFIERS, DEFENSES
from helpers import assert_cli_user_error

OWNER = "attack 'demo'"
NAN, INF = float("nan"), float("inf")


def refusal(spec: Param, value: Any, name: str = "x") -> str:
    """The message of the one-line BenchError ``spec`` raises for ``value``."""
    with pytest.raises(BenchError) as info:
        spec.check(OWNER, name, value)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{OWNER}: {name} must be "), message
    return message


# -- the spec ------------------------------------------------------------------------------------
def test_integers_stay_integers_and_integral_floats_become_integers() -> None:
    spec = Param(20, int, ge=1)
    assert spec.check(OWNER, "steps", 3) == 3
    value = spec.check(OWNER, "steps", 2.0)
    assert value == 2 and type(value) is int
    for bad in (1.5, NAN, INF, -INF, "abc", "3", True, 0, None):
        refusal(spec, bad, "steps")
    assert refusal(spec, 1.5, "steps") == "attack 'demo': steps must be an integer >= 1, got 1.5"


def test_floats_are_finite_floats_and_strings_must_read_as_numbers() -> None:
    spec = Param(None, float, gt=0)
    value = spec.check(OWNER, "step_size", 1)
    assert value == 1.0 and type(value) is float
    assert spec.check(OWNER, "step_size", "8/255") == pytest.approx(8 / 255)
    assert spec.check(OWNER, "step_size", " 0.5 ") == 0.5
    assert spec.check(OWNER, "step_size", None) is None  # the default rule (default None)
    for bad in (NAN, INF, -INF, "nan", "inf", "abc", "1/0", True, 0, -1.0, [1]):
        refusal(spec, bad, "step_size")
    assert refusal(spec, NAN, "step_size") == "attack 'demo': step_size must be a finite number > 0, got nan"
    assert refusal(spec, "abc", "step_size").endswith("got 'abc'")


def test_none_is_refused_unless_the_default_is_none() -> None:
    assert "got None" in refusal(Param(0.5, float, ge=0), None)
    assert Param(None, int, ge=1).check(OWNER, "x", None) is None


def test_bools_accept_bools_and_the_usual_words_only() -> None:
    spec = Param(True, bool)
    for given, expected in ((True, True), (False, False), ("no", False), ("YES", True), ("true", True),
                            ("False", False), ("1", True), ("0", False), (1, True), (0, False)):
        assert spec.check(OWNER, "random_start", given) is expected, given
    for bad in ("maybe", "", 2, 0.0, None, NAN):
        refusal(spec, bad, "random_start")
    assert refusal(spec, "maybe", "random_start") == ("attack 'demo': random_start must be true or false, "
                                                       "got 'maybe'")


def test_bounds_choices_and_literals() -> None:
    alpha = Param(0.001, float, gt=0, lt=1)
    assert alpha.check(OWNER, "alpha", 0.5) == 0.5
    for bad in (0, 1, 1.5, -0.1):
        assert "in (0, 1)" in refusal(alpha, bad, "alpha")
    closed = Param(0.5, float, ge=0, le=1)
    assert closed.check(OWNER, "p", 0) == 0.0 and closed.check(OWNER, "p", 1) == 1.0
    assert "in [0, 1]" in refusal(closed, 1.01, "p")
    version = Param("standard", str, choices=("standard", "plus", "rand"))
    assert version.check(OWNER, "version", " Plus ") == "plus"  # the declared spelling
    assert "must be standard, plus or rand, got 'custom'" in refusal(version, "custom", "version")
    refusal(version, 3, "version")
    conv = Param(2, int, choices=(2, 3))
    assert conv.check(OWNER, "masked_conv", 3.0) == 3
    assert "must be 2 or 3" in refusal(conv, 4, "masked_conv")
    width = Param("auto", int, ge=1, literals=("auto",))
    assert width.check(OWNER, "width", "AUTO") == "auto" and width.check(OWNER, "width", 8) == 8
    assert "must be auto or an integer >= 1" in refusal(width, "wide", "width")
    policy = Param("auto", bool, literals=("auto",))
    assert "must be auto, true or false" in refusal(policy, "sometimes", "compile")


def test_lists_check_each_item_and_mappings_must_be_mappings() -> None:
    radii = Param(None, list, item=Param(0.0, float, ge=0))
    assert radii.check(OWNER, "radii", (0, 0.5)) == [0.0, 0.5]
    for bad in ([0.1, -1], [NAN], "0.1", {"a": 1}):
        refusal(radii, bad, "radii")
    inner = Param(None, dict)
    assert inner.check(OWNER, "params", {"steps": 2}) == {"steps": 2}
    assert "must be a mapping" in refusal(inner, [1], "params")


def test_messages_stay_on_one_line_and_short() -> None:
    message = refusal(Param(1.0, float), "a\nb" * 100)
    assert len(message) < 160


def test_only_known_kinds() -> None:
    with pytest.raises(TypeError):
        Param(1, tuple)


def test_check_params_refuses_unknown_names_and_keeps_the_order() -> None:
    specs = {"steps": Param(20, int, ge=1), "step_size": Param(None, float, gt=0)}
    checked = check_params(OWNER, specs, {"step_size": 1, "steps": 2.0})
    assert list(checked.items()) == [("step_size", 1.0), ("steps", 2)]
    with pytest.raises(BenchError,
                       match=r"unknown hyperparameter\(s\) stpes for attack 'demo'; known: step_size, steps"):
        check_params(OWNER, specs, {"stpes": 3}, noun="hyperparameter")


def test_with_defaults_fills_in_defaults_and_none_keeps_the_default() -> None:
    specs = {"steps": Param(20, int, ge=1), "random_start": Param(True, bool)}
    assert with_defaults(OWNER, specs, {"steps": None, "random_start": "no"}) == {"steps": 20, "random_start": False}


def test_plugins_that_list_only_defaults_keep_working() -> None:
    inherited = {"steps": Param(20, int, ge=1)}
    specs = declared_specs({"defaults": {"steps": 5, "free": "anything"}}, inherited, "defaults")
    assert specs["steps"] == Param(5, int, ge=1) and specs["free"] == Param("anything")
    assert declared_specs({}, inherited, "defaults") == inherited

    class OldStyle(Attack):
        defaults = {"k": 3}

    assert OldStyle.parameters == {"k": Param(3)} and OldStyle(k=[1, 2]).params == {"k": [1, 2]}

    class NewStyle(Attack):
        parameters = {"k": Param(3, int, ge=1)}

    assert NewStyle.defaults == {"k": 3}
    with pytest.raises(BenchError, match="k must be an integer >= 1"):
        NewStyle(k=0)


# -- every registered plugin ---------------------------------------------------------------------
def _plugins() -> list[tuple[str, str]]:
    return ([("attack", n) for n in ATTACKS.names()] + [("certifier", n) for n in CERTIFIERS.names()]
            + [("defense", n) for n in DEFENSES.names()])


def _declared(kind: str, name: str) -> tuple[dict[str, Param], dict[str, Any]]:
    if kind == "defense":
        cls: Any = DEFENSES.get(name)
        return cls.parameters, cls.hparams
    cls = (ATTACKS if kind == "attack" else CERTIFIERS).get(name)
    return cls.parameters, cls.defaults


def _make(kind: str, name: str, params: dict[str, Any]) -> Any:
    if kind == "defense":
        return DEFENSES.get(name)().resolve_hparams(params, 8, "cpu")
    return (ATTACKS if kind == "attack" else CERTIFIERS).get(name)(**params)


@pytest.mark.parametrize(("kind", "name"), _plugins(), ids=[f"{k}-{n}" for k, n in _plugins()])
def test_every_plugin_declares_a_typed_spec_for_every_default(kind: str, name: str) -> None:
    specs, defaults = _declared(kind, name)
    assert set(specs) == set(defaults)
    for param, spec in specs.items():
        assert spec.kind is not None, f"{kind} {name}: {param} has no declared kind"
        assert defaults[param] == spec.default
        assert spec.check("x", param, spec.default) == spec.default
    _make(kind, name, {})  # the defaults pass their own specs


NUMERIC = [(kind, name, param) for kind, name in _plugins() for param, spec in _declared(kind, name)[0].items()
           if spec.kind in (int, float)]


@pytest.mark.parametrize(("kind", "name", "param"), NUMERIC, ids=[f"{k}-{n}-{p}" for k, n, p in NUMERIC])
@pytest.mark.parametrize("bad", [NAN, INF, -INF, "abc"], ids=["nan", "inf", "-inf", "abc"])
def test_every_numeric_parameter_refuses_nan_infinity_and_words(kind: str, name: str, param: str, bad: Any) -> None:
    with pytest.raises(BenchError) as info:
        _make(kind, name, {param: bad})
    message = str(info.value)
    assert "\n" not in message and f"{kind} '{name}': {param} must be" in message, message


BOOLS = [(kind, name, param) for kind, name in _plugins() for param, spec in _declared(kind, name)[0].items()
         if spec.kind is bool]


@pytest.mark.parametrize(("kind", "name", "param"), BOOLS, ids=[f"{k}-{n}-{p}" for k, n, p in BOOLS])
def test_every_flag_reads_no_as_false_and_refuses_maybe(kind: str, name: str, param: str) -> None:
    with pytest.raises(BenchError, match=f"{param} must be"):
        _make(kind, name, {param: "maybe"})
    made = _make(kind, name, {param: "no"})
    assert (made if kind == "defense" else made.params)[param] is False


def test_wrapped_attack_parameters_are_checked_by_the_wrapped_attack() -> None:
    with pytest.raises(BenchError, match="attack 'pgd': step_size must be a finite number > 0, got nan"):
        ATTACKS.get("eot")(params={"step_size": NAN})
    with pytest.raises(BenchError, match="attack 'pgd': steps must be an integer >= 1, got 1.5"):
        ATTACKS.get("bpda")(attack="eot", params={"params": {"steps": 1.5}})
    with pytest.raises(BenchError, match="attack 'eot': params must be a mapping"):
        ATTACKS.get("eot")(params=[1])


def test_defense_build_refuses_what_a_direct_caller_gets_wrong() -> None:
    from bench.data.base import get_dataset

    spec = get_dataset("synthetic").spec
    for name, bad in (("rs", {"sigma": NAN}), ("hycas", {"gate_noise": INF}), ("dds", {"robust_steps": 1.5}),
                      ("dcs", {"taps": "2"}), ("smoothadv", {"eps": -1})):
        with pytest.raises(BenchError) as info:
            DEFENSES.get(name)().build(spec, 8, **bad)
        assert f"defense '{name}': {next(iter(bad))} must be" in str(info.value)


def test_resolved_hyperparameters_keep_their_types() -> None:
    """Run keys hash resolved hyperparameters: a float stays a float, an int an int."""
    rs = DEFENSES.get("rs")().resolve_hparams({"sigma": 1}, 8, "cpu")
    assert rs["sigma"] == 1.0 and type(rs["sigma"]) is float
    dds = DEFENSES.get("dds")().resolve_hparams({"robust_steps": 3.0, "robust_noise": "yes"}, 8, "cpu")
    assert type(dds["robust_steps"]) is int and dds["robust_noise"] is True and type(dds["sigma"]) is float
    smoothadv = DEFENSES.get("smoothadv")().resolve_hparams({"eps": "64/256", "steps": 3}, 8, "cpu")
    assert smoothadv["eps"] == 0.25 and smoothadv["steps"] == 3 and smoothadv["m_train"] == 2


# -- the command line ----------------------------------------------------------------------------
runner = CliRunner()
PGD_AT = ["run", "-d", "pgd-at", "--dataset", "digits", "--attack"]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.training.loop

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was trained before the parameters were checked")

    monkeypatch.setattr(bench.training.loop, "fit", refuse)


@pytest.mark.parametrize(("attack", "param", "fragment"), [
    ("pgd", "step_size=NaN", "step_size must be a finite number > 0, got nan"),
    ("pgd", "step_size=Infinity", "step_size must be a finite number > 0, got inf"),
    ("pgd", "step_size=-Infinity", "got -inf"),
    ("pgd", "steps=1.5", "steps must be an integer >= 1, got 1.5"),
    ("pgd", "steps=abc", "steps must be an integer >= 1, got 'abc'"),
    ("pgd", "step_size=abc", "step_size must be a finite number > 0, got 'abc'"),
    ("pgd", "random_start=maybe", "random_start must be true or false, got 'maybe'"),
    ("eot", "draws=abc", "attack 'eot': draws must be an integer >= 1, got 'abc'"),
    ("eot", "step_size=NaN", "attack 'pgd': step_size must be a finite number > 0, got nan"),
])
def test_cli_refuses_bad_attack_parameters_before_training(no_training: None, tmp_path, attack: str, param: str,
                                                           fragment: str) -> None:
    result = runner.invoke(app, [*PGD_AT, attack, "--attack-param", param, "--db", f"sqlite:///{tmp_path / 'r.db'}"])
    assert_cli_user_error(result, fragment)


def test_cli_refuses_bad_hyperparameters_and_certifier_parameters(no_training: None, tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    result = runner.invoke(app, ["run", "-d", "rs", "--dataset", "digits", "--hparam", "sigma=NaN", "--db", db])
    assert_cli_user_error(result, "defense 'rs': sigma must be a finite number > 0, got nan")
    result = runner.invoke(app, ["run", "-d", "rs", "--dataset", "digits", "--certify", "smoothing",
                                 "--certify-param", "n0=abc", "--db", db])
    assert_cli_user_error(result, "certifier 'smoothing': n0 must be an integer >= 1, got 'abc'")


def test_cli_reads_random_start_no_as_false(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.attacks.pgd

    seen: list[Any] = []

    def record(self: Any, model: Any, x: Any, y: Any, threat: Any) -> Any:
        if self.params["steps"] == 1:  # the run's attack (the harness's own checks use other budgets)
            seen.append(self.params["random_start"])
        return x

    monkeypatch.setattr(bench.attacks.pgd.PGD, "run", record)
    result = runner.invoke(app, ["run", "-d", "standard", "--dataset", "synthetic", "--epochs", "1", "--attack", "pgd",
                                 "--eps", "0.1", "--steps", "1", "--attack-param", "random_start=no", "-n", "8",
                                 "--db", f"sqlite:///{tmp_path / 'r.db'}"])
    assert result.exit_code == 0, result.stderr + result.stdout
    assert seen and all(value is False for value in seen)

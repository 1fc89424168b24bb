"""Configuration parsing, threat models, stable hashing and RunConfig.validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.config import Norm, RunConfig, ThreatModel, format_eps, parse_eps, parse_norm, stable_hash
from bench.errors import BenchError, UnknownNameError


# -- eps -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("0.1", 0.1), ("8/255", 8 / 255), (" 2/255 ", 2 / 255), ("0", 0.0), (0, 0.0), (1, 1.0), (3, 3.0),
    (0.25, 0.25), ("1e-3", 1e-3), ("1", 1.0),
])
def test_parse_eps_accepts(text: object, expected: float) -> None:
    value = parse_eps(text)
    assert isinstance(value, float)
    assert value == expected


@pytest.mark.parametrize("text", ["-0.1", "abc", "nan", "inf", "-inf", "1/0", "", "8/", "0.1.2",
                                  -1, float("nan"), float("inf"), True])
def test_parse_eps_rejects(text: object) -> None:
    with pytest.raises(BenchError):
        parse_eps(text)


@pytest.mark.parametrize("text", ["1" + "0" * 400 + "/3", 10**400], ids=["huge-fraction", "huge-int"])
def test_parse_eps_rejects_overflow_with_bench_error(text: object) -> None:
    with pytest.raises(BenchError):
        parse_eps(text)


def test_parse_eps_error_is_one_line_and_names_the_input() -> None:
    with pytest.raises(BenchError) as info:
        parse_eps("abc")
    assert "abc" in str(info.value)
    assert "\n" not in str(info.value)


# -- norm ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("Linf", Norm.LINF), ("linf", Norm.LINF), ("LINF", Norm.LINF), ("inf", Norm.LINF), ("l_inf", Norm.LINF),
    ("l-inf", Norm.LINF), (" Linf ", Norm.LINF), ("L2", Norm.L2), ("l2", Norm.L2), ("2", Norm.L2),
    (Norm.L2, Norm.L2), (Norm.LINF, Norm.LINF),
])
def test_parse_norm_aliases(text: object, expected: Norm) -> None:
    assert parse_norm(text) is expected


@pytest.mark.parametrize("text", ["L1", "l0", "", "infinity", "2.0"])
def test_parse_norm_rejects(text: str) -> None:
    with pytest.raises(BenchError, match="norm"):
        parse_norm(text)


# -- threat models ---------------------------------------------------------------------------
def test_threat_model_parses_its_fields() -> None:
    t = ThreatModel("linf", "8/255")
    assert t.norm is Norm.LINF
    assert t.eps == 8 / 255
    assert t.label == "Linf 8/255"
    assert t.to_dict() == {"norm": "Linf", "eps": 8 / 255}
    assert ThreatModel(Norm.LINF, 8 / 255) == t
    assert hash(ThreatModel(Norm.LINF, 8 / 255)) == hash(t)


def test_threat_model_rejects_linf_eps_above_one() -> None:
    with pytest.raises(BenchError):
        ThreatModel(Norm.LINF, 1.5)
    assert ThreatModel(Norm.LINF, 1.0).eps == 1.0
    assert ThreatModel(Norm.L2, 1.5).eps == 1.5  # an L2 radius above 1 is meaningful


@pytest.mark.parametrize(("norm", "eps"), [("L2", -0.5), ("L3", 0.1), ("Linf", "nan")])
def test_threat_model_rejects_bad_fields(norm: str, eps: object) -> None:
    with pytest.raises(BenchError):
        ThreatModel(norm, eps)


def test_threat_model_is_frozen() -> None:
    t = ThreatModel(Norm.L2, 0.5)
    with pytest.raises(AttributeError):
        t.eps = 1.0  # type: ignore[misc]


# -- format_eps ------------------------------------------------------------------------------
@pytest.mark.parametrize(("eps", "text"), [
    (0.1, "0.1"), (8 / 255, "8/255"), (0.5, "0.5"), (2 / 255, "2/255"), (0.25, "0.25"), (0.0, "0"),
    (1.0, "1"), (3.0, "3"), (16 / 255, "16/255"),
])
def test_format_eps(eps: float, text: str) -> None:
    assert format_eps(eps) == text


@pytest.mark.parametrize("text", ["0.1", "8/255", "0.5", "4/255", "0.03", "1"])
def test_format_eps_round_trips_through_parse(text: str) -> None:
    assert parse_eps(format_eps(parse_eps(text))) == parse_eps(text)


# -- stable_hash -----------------------------------------------------------------------------
def test_stable_hash_ignores_dict_key_order() -> None:
    a = {"defense": "standard", "eps": [0.1, 8 / 255], "nested": {"x": 1, "y": {"p": 2, "q": 3}}}
    b = {"nested": {"y": {"q": 3, "p": 2}, "x": 1}, "eps": [0.1, 8 / 255], "defense": "standard"}
    assert stable_hash(a) == stable_hash(b)


def test_stable_hash_changes_with_values() -> None:
    base = {"defense": "standard", "eps": 0.1, "steps": 20}
    h = stable_hash(base)
    assert stable_hash({**base, "steps": 21}) != h
    assert stable_hash({**base, "eps": 0.1 + 1e-12}) != h  # full float precision
    assert stable_hash({**base, "defense": "pgd-at"}) != h
    assert stable_hash({**base, "extra": None}) != h
    assert stable_hash([1, 2]) != stable_hash([2, 1])  # list order matters


def test_stable_hash_is_deterministic_hex_of_requested_length() -> None:
    h = stable_hash({"a": Norm.LINF})
    assert h == stable_hash({"a": "Linf"})  # enums hash as their value
    assert len(h) == 16 and int(h, 16) >= 0
    assert len(stable_hash({"a": 1}, length=8)) == 8
    assert stable_hash({"a": 1}, length=8) == stable_hash({"a": 1})[:8]


# -- RunConfig.validate ----------------------------------------------------------------------
def config(**overrides: object) -> RunConfig:
    return RunConfig(**{"defense": "standard", "dataset": "digits", **overrides})  # type: ignore[arg-type]


def test_valid_config_returns_itself() -> None:
    c = config(attacks=("pgd",), norm="Linf", eps=(0.1,), steps=5, n_examples=10)
    assert c.validate() is c
    assert config(protocol="pgd").validate().protocol == "pgd"


@pytest.mark.parametrize(("field", "value", "suggestion"), [
    ("defense", "standrd", "standard"), ("dataset", "digit", "digits"), ("attacks", ("pgdd",), "pgd"),
])
def test_validate_unknown_names(field: str, value: object, suggestion: str) -> None:
    with pytest.raises(UnknownNameError, match=f"did you mean '{suggestion}'"):
        config(**{field: value}).validate()


@pytest.mark.parametrize("custom", [{"eps": (0.1,)}, {"attacks": ("pgd",)}, {"norm": "L2"}, {"steps": 5},
                                    {"restarts": 2}])
def test_validate_rejects_protocol_with_custom_options(custom: dict) -> None:
    with pytest.raises(BenchError, match="--protocol"):
        config(protocol="pgd", **custom).validate()


@pytest.mark.parametrize(("field", "value"), [
    ("steps", 0), ("steps", -3), ("restarts", 0), ("n_examples", 0), ("batch_size", 0), ("epochs", 0),
    ("image_size", 0), ("seed", -1),
])
def test_validate_rejects_out_of_range_numbers(field: str, value: int) -> None:
    with pytest.raises(BenchError):
        config(**{field: value}).validate()


@pytest.mark.parametrize(("field", "value"), [("device", "gpu"), ("recipe", "fast"), ("norm", "L1")])
def test_validate_rejects_bad_choices(field: str, value: str) -> None:
    with pytest.raises(BenchError):
        config(**{field: value}).validate()


def test_validate_rejects_linf_eps_above_one() -> None:
    with pytest.raises(BenchError):
        config(norm="Linf", eps=(2.0,)).validate()


def test_validate_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="not found"):
        config(checkpoint=str(tmp_path / "missing.pt")).validate()
    with pytest.raises(BenchError, match="not a file"):
        config(checkpoint=str(tmp_path)).validate()
    present = tmp_path / "model.pt"
    present.write_bytes(b"x")
    assert config(checkpoint=str(present)).validate().checkpoint == str(present)
    with pytest.raises(BenchError, match="--epochs"):
        config(checkpoint=str(present), epochs=3).validate()


def test_run_config_to_dict_is_hashable_and_order_free() -> None:
    a = config(hparams=(("arch", "cnn-small"), ("width", 8)))
    d = a.to_dict()
    assert d["hparams"] == {"arch": "cnn-small", "width": 8}
    assert set(RunConfig.field_names()) == set(d)
    assert stable_hash(d) == stable_hash(config(hparams=(("width", 8), ("arch", "cnn-small"))).to_dict())

"""The certificate audit: planted unsound certificates are caught, sound ones are not flagged."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bench.certifiers.audit import audit_model, certificate_rows, consistency, l2_pgd
from bench.certifiers.lipschitz import Lipschitz
from bench.certifiers.smoothing import Smoothing
from bench.errors import BenchError
from bench.harness.audit import audit_run
from bench.models.defended import DefendedModel
from bench.results.schema import EvalKind
from bench.results.store import Store


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one intra-op thread (see conftest.one_thread)."""


def _linear_model(scale: float, declared: float | None) -> DefendedModel:
    """Flatten + a 16 -> 4 linear map with orthonormal rows times ``scale`` (spectral norm = scale)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    layer = nn.Linear(16, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_((q[:4] * scale).float())
    model = DefendedModel(nn.Sequential(nn.Flatten(), layer), (0.0,), (1.0,), (1, 4, 4), 4)
    if declared is not None:
        model.lipschitz_bound = declared
        model.lipschitz_guarantee = "planted for the test"
    return model.eval()


class HalfPlane(nn.Module):
    """Class 1 iff the first pixel exceeds 0.5: the smoothed classifier is the same half-plane rule,
    so the true robust radius of an example is |x0 - 0.5|."""

    num_classes = 2
    sigma = 0.25

    def forward(self, x):
        v = x.flatten(1)[:, :1] - 0.5
        return torch.cat([-v, v], dim=1) * 10


def _images(n: int, shape=(1, 4, 4), seed: int = 1) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def _lipschitz_certs(model, x, indices):
    certifier = Lipschitz()
    info = certifier.prepare(model)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return y, {1: certificate_rows(certifier.certify(model, x), y, indices)}, {1: info}


def _by_name(checks):
    return {c.name: c for c in checks}


def test_lipschitz_audit_catches_a_false_bound_and_accepts_a_true_one():
    x = _images(16)
    planted = _by_name(audit_model(_linear_model(3.0, declared=1.0), x, None, None))["lipschitz_audit"]
    assert planted.triggered and planted.detail.startswith("unsound:")
    assert "declared L = 1" in planted.detail and "Jacobian power iteration" in planted.detail
    honest = _by_name(audit_model(_linear_model(1.0, declared=1.0), x, None, None))["lipschitz_audit"]
    assert not honest.triggered and "declared L = 1" in honest.detail
    assert audit_model(_linear_model(1.0, declared=None), x, None, None) == []  # nothing declared, nothing to audit


def test_certificate_attack_breaks_radii_from_a_too_small_bound():
    x = _images(12)
    indices = [100 + k for k in range(12)]
    model = _linear_model(3.0, declared=1.0)  # radii 3x too large
    y, certs, stages = _lipschitz_certs(model, x, indices)
    check = _by_name(audit_model(model, x, y, certs, stages=stages, indices=indices))["certificate_attack"]
    assert check.triggered and check.detail.startswith("unsound:")
    assert "12 violation(s)" in check.detail and "example indices [100, 101" in check.detail


def test_certificate_attack_respects_sound_lipschitz_certificates():
    x = _images(12)
    model = _linear_model(1.0, declared=1.0)
    y, certs, stages = _lipschitz_certs(model, x, range(12))
    checks = _by_name(audit_model(model, x, y, certs, stages=stages))
    assert not checks["certificate_attack"].triggered
    assert "on 12 certified examples: 0 violation(s)" in checks["certificate_attack"].detail


def test_l2_pgd_stays_in_the_ball_and_the_box_and_finds_the_boundary():
    model = HalfPlane()
    x = _images(4, (1, 2, 2))
    x[:, 0, 0, 0] = torch.tensor([0.6, 0.7, 0.9, 0.95])
    target = torch.ones(4, dtype=torch.long)
    radius = torch.tensor([0.2, 0.3, 0.39, 0.5], dtype=torch.float64)  # the boundary is 0.1, 0.2, 0.4, 0.45 away
    torch.manual_seed(0)
    adv, found = l2_pgd(model, x, target, radius)
    assert found.tolist() == [True, True, False, True]
    assert ((adv - x).flatten(1).norm(dim=1).double() <= radius * 0.999 + 1e-6).all()
    assert adv.min() >= 0 and adv.max() <= 1
    assert (model(adv).argmax(1)[found] == 0).all()


def _smoothing_case(n: int = 2000):
    model = HalfPlane()
    x = _images(10, (1, 2, 2), seed=2)
    x[:, 0, 0, 0] = torch.tensor([0.75, 0.8, 0.85, 0.9, 0.95, 0.25, 0.2, 0.15, 0.1, 0.05])
    y = (x[:, 0, 0, 0] > 0.5).long()
    certifier = Smoothing(sigma=0.25, n=n)
    info = certifier.prepare(model)
    torch.manual_seed(0)
    rows = certificate_rows(certifier.certify(model, x), y)
    return model, x, y, rows, info


def test_smoothing_certificates_pass_and_inflated_radii_are_flagged():
    model, x, y, rows, info = _smoothing_case()
    assert all(r["correct"] and 0 < r["radius"] < 0.5 for r in rows)
    sound = audit_model(model, x, y, {1: rows}, stages={1: info})[0]
    assert sound.name == "certificate_attack" and not sound.triggered
    assert "0 of 10 certified examples violated" in sound.detail and "no significant excess" in sound.detail
    inflated = [{**r, "radius": 3 * r["radius"]} for r in rows]
    unsound = audit_model(model, x, y, {1: inflated}, stages={1: info})[0]
    assert unsound.triggered and unsound.detail.startswith("unsound:")
    assert "10 of 10 certified examples violated" in unsound.detail and "CI [" in unsound.detail


def test_certificate_attack_combines_stages_and_skips_randomized_lipschitz():
    model, x, y, rows, info = _smoothing_case(n=500)
    stages = {1: info, 2: {"certifier": "lipschitz", "L": 1.0, "randomized": True}}
    check = audit_model(model, x, y, {1: rows, 2: rows}, stages=stages)[0]
    assert not check.triggered
    parts = check.detail.split(" | ")
    assert parts[0].startswith("stage 1 smoothing")
    assert parts[1] == "stage 2 lipschitz: not audited by attack (randomized Lipschitz certificate)"
    unsound = audit_model(model, x, y, {1: [{**r, "radius": 3 * r["radius"]} for r in rows], 2: rows},
                          stages=stages)[0]
    assert unsound.triggered  # one unsound stage is enough


def _summary(certifier: str, accuracy: float, attacks: list[tuple[str, float, float]], randomized=None,
             radius: float = 0.5) -> dict:
    """Summaries as run_summary writes them: attacks are cumulative over their threat's cascade."""
    block = {"certifier": certifier, "position": 3, **({"randomized": randomized} if randomized is not None else {})}
    threats: dict[float, float] = {}
    for _, eps, acc in attacks:
        threats[eps] = acc
    return {
        "certified": [{"certifier": certifier, "radius": 0.0, "accuracy": 0.9, "position": 3},
                      {"certifier": certifier, "radius": radius, "accuracy": accuracy, "position": 3}],
        "certificate": [block],
        "attacks": [{"name": n, "norm": "L2", "eps": e, "accuracy": a} for n, e, a in attacks],
        "threat_models": [{"norm": "L2", "eps": e, "robust_accuracy": a} for e, a in threats.items()],
    }


def test_certified_vs_empirical_deterministic_lipschitz():
    bad = consistency(_summary("lipschitz", 0.6, [("pgd", 0.5 * (1 + 1e-12), 0.5)], randomized=False), False)
    assert bad.name == "certified_vs_empirical" and bad.triggered
    assert "certifies 60.00% at radius 0.5" in bad.detail and "50.00%" in bad.detail
    good = consistency(_summary("lipschitz", 0.5, [("pgd", 0.5, 0.5), ("square", 0.5, 0.5)]), False)
    assert not good.triggered and good.detail.startswith("consistent")
    other_eps = consistency(_summary("lipschitz", 0.6, [("pgd", 0.25, 0.1)]), False)
    assert not other_eps.triggered and other_eps.detail.startswith("nothing comparable")
    randomized = consistency(_summary("lipschitz", 0.6, [("pgd", 0.5, 0.1)], randomized=True), False)
    assert not randomized.triggered and "randomized lipschitz" in randomized.detail


def test_certified_vs_empirical_smoothing_compares_only_with_smoothadv():
    base_attack = consistency(_summary("smoothing", 0.6, [("pgd", 0.5, 0.1)]), False)
    assert not base_attack.triggered and base_attack.detail.startswith("nothing comparable")
    bad = consistency(_summary("smoothing", 0.6, [("smoothadv", 0.5, 0.4)]), False)
    assert bad.triggered and "smoothadv at eps 0.5" in bad.detail
    good = consistency(_summary("smoothing", 0.6, [("smoothadv", 0.5, 0.7)]), False)
    assert not good.triggered and "1 comparison" in good.detail
    after_pgd = consistency(_summary("smoothing", 0.6, [("pgd", 0.5, 0.3), ("smoothadv", 0.5, 0.3)]), False)
    assert not after_pgd.triggered  # cumulative over a base-classifier attack: a different classifier
    assert consistency({}, False).detail.startswith("nothing comparable")


def _hand_made_run(store: Store, indices: list[int]) -> int:
    config = {"defense": "standard", "dataset": "synthetic", "seed": 0, "image_size": 8, "hparams": {},
              "split": "test", "radii": [0.0, 0.25], "protocol": {"attacks": []}}
    return store.create_run("hand-made", defense="standard", dataset="synthetic", protocol="custom",
                            protocol_version=1, config=config, seed=0, n_examples=len(indices), indices=indices)


def test_audit_run_with_a_given_model_stores_the_checks(db_url):
    store = Store(db_url)
    model, x, y, rows, info = _smoothing_case(n=500)
    indices = [10 * k for k in range(len(x))]
    run_id = _hand_made_run(store, indices)
    with pytest.raises(BenchError, match="no stored model checkpoint"):
        audit_run(store, run_id)
    ev = store.evaluation(run_id, 1, EvalKind.CERTIFY, "smoothing", sigma=0.25,
                          params={"certificate": info})
    store.add_results(ev, [{**r, "example_index": indices[r["example_index"]], "label": int(y[k])}
                           for k, r in enumerate(rows)])
    store.finish_evaluation(ev)
    checks = _by_name(audit_run(store, run_id, model=model, data=(x, y, indices)))
    assert set(checks) == {"certificate_attack", "certified_vs_empirical"}
    assert not checks["certificate_attack"].triggered
    assert "of 10 certified examples" in checks["certificate_attack"].detail
    stored = {c.name: (c.triggered, c.detail) for c in store.checks(run_id)}
    assert stored["certificate_attack"] == (False, checks["certificate_attack"].detail)
    assert stored["certified_vs_empirical"][1].startswith("nothing comparable")


def test_audit_run_end_to_end_and_cli(db_url):
    from bench.cli import app
    from bench.config import RunConfig
    from bench.harness.runner import execute

    store = Store(db_url)
    run_id = execute(RunConfig(defense="standard", dataset="synthetic", certify=("smoothing",),
                               certify_params=(("n", 500), ("sigma", 0.25)), n_examples=16), store)
    checks = _by_name(audit_run(store, run_id, max_examples=8))
    assert {"certificate_attack", "certified_vs_empirical"} <= set(checks)
    assert "stage 1 smoothing" in checks["certificate_attack"].detail
    assert {"certificate_attack", "certified_vs_empirical"} <= {c.name for c in store.checks(run_id)}

    runner = CliRunner()
    result = runner.invoke(app, ["audit", str(run_id), "--examples", "4", "--db", db_url, "--json"])
    assert result.exit_code == 0, result.stderr + result.stdout
    names = [c["name"] for c in json.loads(result.stdout)]
    assert names == ["certificate_attack", "certified_vs_empirical"]
    missing = runner.invoke(app, ["audit", "999", "--db", db_url])
    assert missing.exit_code == 2 and "no run with id 999" in missing.stderr

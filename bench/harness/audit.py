"""``bench audit RUN_ID``: audit a stored run's certificates and store the outcome as checks.

The checks themselves are pure functions of a model and its certificates
(:mod:`bench.certifiers.audit`, where each is documented); this module loads what they need
from the store and writes their outcomes back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.capabilities import capability
from bench.certifiers.audit import audit_model, consistency
from bench.errors import BenchError
from bench.harness.resolve import ResolvedRun
from bench.harness.stored import load_model, load_run_examples
from bench.progress import Progress
from bench.results.checks import CheckResult
from bench.results.queries import get_run_or_fail, run_summary
from bench.results.schema import EvalKind
from bench.results.store import Store

__all__ = ["audit_run"]


def _unpack(data: Any) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    if isinstance(data, (tuple, list)):
        x, y, *rest = data
        indices = rest[0] if rest else range(len(x))
    else:
        x, y, indices = data.images, data.labels, data.indices
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    return x, y, [int(i) for i in indices]


def _stored_certificates(store: Store, run_id: int) -> tuple[dict[int, list[dict[str, Any]]] | None,
                                                             dict[int, dict[str, Any]]]:
    """The run's certificate rows by stage position, and what each stage's certifier described."""
    stages = [e for e in store.evaluations(run_id) if e.kind is EvalKind.CERTIFY]
    if not stages:
        return None, {}
    by_stage: dict[int, list[dict[str, Any]]] = {e.id: [] for e in stages}
    for row in store.results([e.id for e in stages]):
        by_stage[row.evaluation_id].append({"example_index": row.example_index, "prediction": row.prediction,
                                            "abstained": row.abstained, "radius": row.radius, "correct": row.correct})
    infos = {e.position: {"certifier": e.method,
                          **dict((e.params or {}).get("certificate") or {"certifier": e.method, "sigma": e.sigma})}
             for e in stages}
    return {e.position: by_stage[e.id] for e in stages}, infos


def audit_run(store: Store, run_id: int, model: nn.Module | None = None, data: Any = None,
              progress: Progress | None = None, device: str = "auto", max_examples: int = 64,
              seed: int = 0) -> list[CheckResult]:
    """Audit stored run ``run_id``: compute the checks, store each with the run, return them.

    ``model`` and ``data`` default to the run's own: its checkpoint (verified by sha256; a run
    without a stored checkpoint is a :class:`BenchError`) and its examples (its split, subset to
    its stored indices). ``data`` may be a :class:`bench.data.base.Split` or ``(x, y, indices)``
    with the run's dataset indices. A given model is used as it is (device included).
    """
    if max_examples < 1:
        raise BenchError(f"max_examples must be >= 1, got {max_examples}")
    progress = progress or Progress()
    run = get_run_or_fail(store, run_id)
    if model is None or data is None:
        resolved = ResolvedRun.from_stored(run, device)
        if model is None:
            model = load_model(store, run, resolved).to(torch.device(resolved.device))
        if data is None:
            data = load_run_examples(run, resolved, progress, "audit")
    x, y, indices = _unpack(data)
    certs, infos = _stored_certificates(store, run_id)
    checks = audit_model(model, x, y, certs, seed=seed, max_examples=max_examples, stages=infos, indices=indices,
                         progress=progress)
    checks.append(consistency(run_summary(store, run_id), bool(capability(model, "randomized"))))
    for check in checks:
        store.set_check(run_id, check.name, check.triggered, check.detail)
    return checks

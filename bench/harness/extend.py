"""``bench attack RUN_ID``: run one more attack on a stored run.

The stored run's model (its checkpoint, verified by sha256), data split and example indices are
reloaded exactly; the new attack runs only on the examples still robust under its threat model
(clean-correct and not broken by any earlier attack with the same norm and eps), so the run's
worst-case robust accuracy can only go down. The attack becomes a new evaluation of the run,
committed batch by batch; repeating the same command resumes it, then returns it as stored.
"""

from __future__ import annotations

import time
from typing import Any

from bench.config import AttackSpec
from bench.errors import BenchError, CheckpointError
from bench.harness.progress import Progress
from bench.registry import DATASETS, DEFENSES
from bench.results.schema import EvalKind, RunStatus
from bench.results.store import Store

__all__ = ["add_attack"]


def _stage_position(store: Store, run_id: int, spec: AttackSpec) -> tuple[int, bool]:
    """The position of this attack in the run: an existing identical stage, or the next free one."""
    evaluations = store.evaluations(run_id)
    for ev in evaluations:
        if (ev.kind is EvalKind.ATTACK and ev.method == spec.attack and ev.norm == spec.threat.norm.value
                and ev.eps == spec.threat.eps and (ev.params or {}) == spec.kwargs):
            return ev.position, ev.finished
    return max((ev.position for ev in evaluations), default=0) + 1, False


def _still_robust(store: Store, run_id: int, spec: AttackSpec, position: int) -> set[int]:
    """Clean-correct examples not broken by earlier attacks of the same threat model."""
    alive: set[int] | None = None
    for ev in store.evaluations(run_id):
        same_threat = ev.norm == spec.threat.norm.value and ev.eps == spec.threat.eps
        if ev.kind is EvalKind.CLEAN or (ev.kind is EvalKind.ATTACK and same_threat and ev.position < position):
            correct = store.correct_indices(ev.id)
            alive = correct if alive is None else alive & correct
    return alive or set()


def _load_model(store: Store, run: Any, config: dict[str, Any]) -> Any:
    import torch

    from bench.harness.checkpoints import load_into, read_checkpoint, sha256_file

    model_row = store.get_model(run.model_id) if run.model_id is not None else None
    if model_row is None or not model_row.checkpoint_path:
        raise BenchError(f"run {run.id} has no stored model checkpoint to attack")
    path = model_row.checkpoint_path
    try:
        sha = sha256_file(path)
    except CheckpointError:
        raise CheckpointError(f"run {run.id}: its checkpoint {path} is gone; re-run the original command") from None
    if sha != model_row.checkpoint_sha256:
        raise CheckpointError(f"run {run.id}: checkpoint {path} changed since the run (sha256 {sha[:12]} != "
                              f"{(model_row.checkpoint_sha256 or '')[:12]}); refusing to mix results")
    defense = DEFENSES.get(config["defense"])()
    dataset = DATASETS.get(config.get("dataset_entry", config["dataset"]))()
    spec = dataset.resolve_spec(config.get("data_root"))
    torch.manual_seed(int(config["seed"]))
    model = defense.build(spec, int(config["image_size"]), **config["hparams"])
    state, _ = read_checkpoint(path)
    load_into(defense, model, state, path)
    return model.eval(), dataset


def load_run_examples(run: Any, config: dict[str, Any], dataset: Any, progress: Progress, purpose: str) -> Any:
    """A stored run's examples, exactly: its split, subset to its stored indices."""
    import torch

    data = dataset.load(config.get("split", "test"), config.get("data_root"), int(config["image_size"]),
                        progress=progress)
    assert data.indices is not None
    wanted = torch.tensor(run.indices or [])
    positions = torch.nonzero(torch.isin(data.indices, wanted)).flatten()
    data = data.subset(positions)
    if len(data) != len(wanted):
        raise BenchError(f"run {run.id}: {len(wanted) - len(data)} of its examples are no longer in the dataset; "
                         f"cannot {purpose} it faithfully")
    return data


def add_attack(store: Store, run_id: int, spec: AttackSpec, progress: Progress | None = None,
               device: str = "auto", escalated_for: str | None = None, draws: int | None = None) -> int:
    """Run ``spec`` on stored run ``run_id``; returns the run id. See the module docstring.

    ``escalated_for`` records the sanity check whose remedy this stage is (``--escalate``);
    ``draws`` overrides R, the fresh draws scoring each adversarial example (by default the
    run's R for randomized models, 1 otherwise)."""
    import torch

    from bench.harness.device import resolve_device
    from bench.harness.runner import Evaluator, check_attacks

    from bench.results.queries import get_run_or_fail

    progress = progress or Progress()
    run = get_run_or_fail(store, run_id)
    if run.status is not RunStatus.FINISHED:
        raise BenchError(f"run {run_id} is {run.status.value}; finish it first by re-running its command")
    check_attacks([spec])  # name, parameters and norm, before any work
    position, finished = _stage_position(store, run_id, spec)
    if finished:
        return run_id
    started = time.perf_counter()
    config = run.config
    model, dataset = _load_model(store, run, config)
    data = load_run_examples(run, config, dataset, progress, "extend")
    torch_device = torch.device(resolve_device(device))
    model.to(torch_device)
    if draws is None:
        draws = int(config["protocol"].get("draws", 10)) if getattr(model, "randomized", False) else 1
    evaluator = Evaluator(store, run_id, model, data, torch_device, int(config["batch_size"]), int(config["seed"]),
                          draws, progress, frozen=bool(config["protocol"].get("frozen", False)))
    alive = _still_robust(store, run_id, spec, position)
    try:
        evaluator.attack(position, spec, alive)
    finally:  # interrupted sessions count too
        store.add_run_cost(run_id, time.perf_counter() - started, evaluator.forward_passes,
                           evaluator.backward_passes)
    entry = {**spec.to_dict(), "position": position, **({"escalated_for": escalated_for} if escalated_for else {})}
    extra = [e for e in config.get("extra_attacks", []) if e.get("position") != position] + [entry]
    store.update_run(run_id, config={**config, "extra_attacks": extra})
    from bench.harness.runner import record_result_checks

    record_result_checks(store, run_id)
    return run_id

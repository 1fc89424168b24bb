"""``bench run``: resolve -> (stored result?) -> prepare -> model -> checks -> clean -> attacks.

:func:`prepare` checks everything a run can refuse (attack and certifier parameters, non-finite
numbers, the dataset's files, a user checkpoint) before anything is written, so the CLI creates
the result store only after it. Every stage reads what is already stored for the run and skips
it, so an interrupted run continues where it stopped and yields the same numbers (each batch is
seeded by its position, not by what ran before). A run is marked finished only after its last
stage.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bench
from bench.config import RunConfig, stable_hash
from bench.device import device_kind
from bench.errors import BenchError
from bench.harness.protocol import Protocol
from bench.harness.resolve import TRAINING_VERSION, ResolvedRun, check_attacks, check_certifiers, resolve
from bench.progress import Progress
from bench.results.schema import RunStatus
from bench.results.store import Store
from bench.training import distributed

if TYPE_CHECKING:
    import torch

    from bench.data.base import Dataset, Split
    from bench.models.defended import DefendedModel

__all__ = ["PreparedRun", "ResolvedRun", "execute", "prepare", "resolve", "stored_or_executed"]


@dataclass(frozen=True)
class PreparedRun:
    """A resolved run whose inputs have all been checked, before anything is written (:func:`prepare`)."""

    resolved: ResolvedRun
    examples: Split  # the evaluated examples (the protocol's subset of the split)
    user_model: tuple[DefendedModel, dict[str, Any]] | None  # --checkpoint loaded into a fresh model, and its meta
    started: float  # time.perf_counter() when preparation began: the session's wall time counts from here


def prepare(config: RunConfig | ResolvedRun, progress: Progress | None = None,
            user_model: tuple[DefendedModel, dict[str, Any]] | None = None) -> PreparedRun:
    """Check everything a run can refuse, writing nothing; raise :class:`BenchError` on the first problem.

    Builds every attack and certifier (checking their parameters, norms and the model they
    certify), refuses a configuration holding a non-finite number, loads the evaluated split
    (the dataset's files) and selects the examples, and reads a user ``--checkpoint``
    (``weights_only=True``) into a freshly built model, so a file that does not fit is refused.
    ``user_model`` is a model the caller built (the Python API). A user's model (``--model``,
    the API) must map the examples to logits (:func:`bench.models.external.check_logits`).
    Training, which needs the store to record its model, comes later."""
    started = time.perf_counter()
    resolved = config if isinstance(config, ResolvedRun) else resolve(config)
    progress = progress or Progress()
    check_attacks(resolved.protocol.attacks)
    check_certifiers(resolved.protocol.certifiers, resolved)
    _require_finite(resolved)
    full = load_split(resolved, resolved.config.split, progress)
    examples = select_examples(full, resolved.protocol, resolved.config.seed)
    requested = resolved.protocol.n_examples
    if requested is not None and requested > len(full):
        progress.log(f"{resolved.spec.name}/{resolved.config.split} has {len(full)} examples, fewer than the "
                     f"{requested} asked for: evaluating all {len(full)}")
    if user_model is None and not resolved.trains:
        user_model = read_user_model(resolved)
    if resolved.protocol.exact:
        _require_draw_space(user_model[0] if user_model is not None else resolved.fresh_model())
    if user_model is not None and not resolved.defense.trainable:
        from bench.models.external import check_logits

        check_logits(user_model[0], examples.images[:4], resolved.spec.num_classes, resolved.spec.task,
                     f"model '{resolved.label}'")
    return PreparedRun(resolved, examples, user_model, started)


def stored_or_executed(resolved: ResolvedRun, url: str, progress: Progress,
                       user_model: Callable[[], tuple[DefendedModel, dict[str, Any]]] | None = None
                       ) -> tuple[Store, int, bool]:
    """The run ``resolved`` as stored (finished) in the store at ``url``, else prepared and executed
    there: ``(store, run_id, stored)``. Nothing is created on disk until :func:`prepare` has checked
    every input; a finished run is looked up without importing torch, and ``user_model`` (a
    caller's model, built on demand) is called only when the run is executed. Under torchrun every
    rank executes its share of the run; rank 0 creates the store, the other ranks open it."""
    store = Store.existing(url)  # None: no store there yet, and none is created by looking
    existing = store.find_run(resolved.key) if store is not None else None
    if store is not None and existing is not None and existing.status is RunStatus.FINISHED:
        return store, existing.id, True
    prepared = prepare(resolved, progress, user_model=user_model() if user_model is not None else None)
    announce_plan(prepared, progress)
    distributed.init(resolved.device)  # torchrun: join the process group (nothing in a world of size 1)
    with distributed.main_first():
        store = store or Store(url, create=True)
    run_id = execute(prepared, store, progress)
    distributed.shutdown()
    return store, run_id, False


def announce_plan(prepared: PreparedRun, progress: Progress) -> None:
    """Log the run's plan (stages and sizes) and number the progress of its stages ``[k/n]``; warn
    when the machine is oversubscribed (its timings and ETAs will be slow)."""
    from bench.device import oversubscribed
    from bench.harness.plan import build_plan, format_plan

    busy = oversubscribed()
    if busy:
        progress.log(f"warning: {busy}")

    stages = build_plan(prepared.resolved, len(prepared.examples))
    progress.log(f"plan ({len(stages)} stages):")
    for line in format_plan(stages):
        progress.log(line)
    progress.begin_plan([stage.key for stage in stages])


def dry_run(resolved: ResolvedRun, progress: Progress | None = None) -> dict[str, Any]:
    """What ``bench run --dry-run`` shows, computing and writing nothing of the run: the resolved
    configuration, and the plan with upper-bound seconds per stage from one measured forward pass
    of the (untrained, or loaded) model on this device. Inputs are checked as for a run."""
    import torch

    from bench.harness.plan import build_plan, estimate, format_plan, measure_pass

    prepared = prepare(resolved, progress)
    model = prepared.user_model[0] if prepared.user_model is not None else resolved.fresh_model().eval()
    device = torch.device(resolved.device)
    model.to(device)
    per_pass = measure_pass(model, resolved.spec.shape(resolved.image_size), resolved.config.batch_size, device)
    stages = build_plan(resolved, len(prepared.examples))
    seconds = estimate(stages, per_pass)
    known = [s for s in seconds if s is not None]
    return {"config": resolved.to_dict(), "key": resolved.key, "seconds_per_example_pass": per_pass,
            "plan": [{"stage": st.label, "size": st.size, "seconds_upper_bound": sec}
                     for st, sec in zip(stages, seconds)],
            "seconds_upper_bound": sum(known), "lines": format_plan(stages, seconds)}


def _require_finite(resolved: ResolvedRun) -> None:
    """NaN and infinity are not JSON: a run configuration holding one is refused, not stored."""
    from bench.results.jsonvalues import non_finite_paths

    bad = non_finite_paths(resolved.to_dict())
    if bad:
        raise BenchError(f"invalid run configuration: {', '.join(bad[:3])} must be a finite number")


def execute(config: RunConfig | ResolvedRun | PreparedRun, store: Store, progress: Progress | None = None) -> int:
    """Run (or resume, or look up) the evaluation ``config`` describes; return the run id.

    ``config`` may already be resolved or prepared (the CLI prepares before it creates the store);
    a finished run is returned as stored, without preparing anything."""
    prepared = config if isinstance(config, PreparedRun) else None
    if isinstance(config, PreparedRun):
        resolved = config.resolved
    else:
        resolved = config if isinstance(config, ResolvedRun) else resolve(config)
    existing = store.find_run(resolved.key)
    if existing is not None and existing.status is RunStatus.FINISHED:
        return existing.id
    progress = progress or Progress()
    prepared = prepared or prepare(resolved, progress)
    return _execute(prepared, store, progress, existing.id if existing is not None else None)


def _execute(prepared: PreparedRun, store: Store, progress: Progress, run_id: int | None) -> int:
    import torch

    from bench.data.base import indices_hash
    from bench.harness import provenance
    from bench.harness.stages import Evaluator, scoring_for
    from bench.models.inference import frozen_parameters

    resolved, test, started = prepared.resolved, prepared.examples, prepared.started
    assert test.indices is not None
    distributed.init(resolved.device)  # torchrun: join the process group (nothing in a world of size 1)
    idx_hash = indices_hash(test.indices.numpy())
    model, model_id, model_sha = obtain_model(resolved, resolved.dataset, store, progress, prepared.user_model)
    prov = provenance.collect(device=resolved.device, seed=resolved.config.seed, dataset=resolved.spec.name,
                              indices_hash=idx_hash, checkpoint_sha256=model_sha, data_root=resolved.data_root)
    fields = dict(model_id=model_id, defense=resolved.label, dataset=resolved.spec.name,
                  protocol=resolved.protocol.name, protocol_version=resolved.protocol.version,
                  config=resolved.to_dict(), seed=resolved.config.seed, n_examples=len(test),
                  indices_hash=idx_hash, indices=test.indices.tolist(), provenance=prov)
    with distributed.main_first():  # rank 0 creates (or reopens) the run, the other ranks find it
        if not distributed.is_main():
            found = store.find_run(resolved.key)
            assert found is not None, resolved.key
            run_id = found.id
        elif run_id is None:
            run_id, created = store.get_or_create_run(resolved.key, **fields)
            if not created:  # an identical run started meanwhile: work on it too (rows are stored once)
                progress.log(f"joining run {run_id}, started by another process")
        else:
            progress.log(f"resuming run {run_id}")
            store.update_run(run_id, status=RunStatus.RUNNING, provenance=prov, model_id=model_id)
    device = torch.device(distributed.local_device(resolved.device))
    model.to(device)
    evaluator: Evaluator | None = None
    store.start_clock(run_id, started)  # each committed batch accounts its cost: a kill loses at most one batch
    try:
        with frozen_parameters(model):  # attacks and audits need input gradients only
            _record_checks(store, run_id, model, test, device)
            model.eval()
            scoring = scoring_for(model, resolved.protocol.draws, version=resolved.protocol.scoring,
                                  exact=resolved.protocol.exact)
            evaluator = Evaluator(store, run_id, model, test, device, resolved.config.batch_size, resolved.config.seed,
                                  scoring, progress, frozen=resolved.protocol.frozen,
                                  shard=(distributed.rank(), distributed.world_size()))
            _run_stages(resolved, evaluator)
            if evaluator.shard[1] > 1:  # every rank's rows are stored (each stage ended at a barrier)
                if not distributed.is_main():
                    return run_id  # rank 0 finishes the run
                evaluator.shard = (0, 1)
                _run_stages(resolved, evaluator)  # finds every row present: computes nothing, marks the stages finished
            record_saturation_checks(store, run_id, resolved, model, test, device, progress)
            if resolved.protocol.certifiers:  # protocols that certify audit their certificates (docs/certification.md)
                from bench.harness.audit import audit_run

                audit_run(store, run_id, model=model, data=test, progress=progress, seed=resolved.config.seed)
            record_result_checks(store, run_id)
            store.finish_run(run_id)
    except BaseException as exc:
        store.fail_run(run_id, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        raise
    finally:  # the cost of every session counts, interrupted ones included
        store.stop_clock(run_id)
    return run_id


def _run_stages(resolved: ResolvedRun, evaluator: Any) -> None:
    """Clean, then each attack on the examples still robust under its threat model (a cascade per
    threat model), then every certifier on every example."""
    alive = evaluator.clean()
    groups: dict[tuple[str, float], set[int]] = {}
    for position, spec in enumerate(resolved.protocol.attacks, start=1):
        group = (spec.threat.norm.value, spec.threat.eps)
        groups[group] = evaluator.attack(position, spec, groups.get(group, alive))
    for offset, cert in enumerate(resolved.protocol.certifiers, start=len(resolved.protocol.attacks) + 1):
        evaluator.certify(offset, cert, resolved.radii)


def load_split(resolved: ResolvedRun, split: str, progress: Progress) -> Split:
    """Load a split of the run's dataset, reporting files the metadata lists but the disk lacks."""
    data = resolved.dataset.load(split, resolved.data_root, resolved.image_size, download=resolved.config.download,
                                 progress=progress)
    missing = int(data.meta.get("missing_files", 0))
    if missing:
        progress.log(f"{resolved.spec.name}/{split}: {missing} of {data.meta.get('expected_files')} listed images "
                     f"have no file and were skipped ({len(data)} used)")
    return data


def select_examples(split: Split, protocol: Protocol, seed: int) -> Split:
    """The protocol's evaluation subset: a seeded random subset of ``n_examples`` in index order,
    or the whole split when ``n_examples`` is None or not smaller than the split (``runs.n_examples``
    records how many were evaluated)."""
    import torch

    n = protocol.n_examples
    if n is None or n >= len(split):
        return split
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randperm(len(split), generator=generator)[:n].sort().values
    return split.subset(positions)


def obtain_model(resolved: ResolvedRun, dataset: Dataset, store: Store, progress: Progress,
                 user_model: tuple[DefendedModel, dict[str, Any]] | None = None) -> tuple[DefendedModel, int, str]:
    """Load the user's checkpoint (``user_model`` when :func:`prepare` already did), or the
    cached trained model, or train one and cache it.

    Returns the model (in eval mode), its ``models`` row id and its checkpoint's sha256."""

    if not resolved.trains:
        return _from_file(resolved, *(user_model or read_user_model(resolved)), store)
    return _cached_or_trained(resolved, resolved.fresh_model(), store, progress)


def read_user_model(resolved: ResolvedRun) -> tuple[DefendedModel, dict[str, Any]]:
    """The run's ``--checkpoint`` loaded into a freshly built model (eval mode), and the file's meta;
    without a checkpoint, the model its factory builds with pretrained weights (``--model`` with
    ``--download``).

    The file is read with ``weights_only=True`` before the model is built; a file that is not a
    state dict of tensors, or does not fit the defense's model, is a :class:`CheckpointError`."""

    from bench.training.checkpoints import check_meta_defense, load_into, read_checkpoint

    path = resolved.config.checkpoint
    if path is None:
        return resolved.fresh_model().eval(), {}
    state, meta = read_checkpoint(path)
    check_meta_defense(meta, resolved.defense.name, path, dataset=resolved.spec.name)
    model = resolved.fresh_model()  # the same random state as a trained model's build
    load_into(resolved.defense, model, state, path)
    return model.eval(), meta


def _model_fields(resolved: ResolvedRun) -> dict[str, Any]:
    arch = resolved.hparams.get("arch") or resolved.hparams.get("model") or resolved.label
    return dict(defense=resolved.defense.name, dataset=resolved.spec.name, arch=str(arch)[:128],
                hparams=resolved.hparams)


def _from_file(resolved: ResolvedRun, model: DefendedModel, meta: dict[str, Any],
               store: Store) -> tuple[DefendedModel, int, str]:
    """The models row of a model bench did not train: a checkpoint file (``source="file"``), a
    caller's module (``"python"``, identified by the hash of its weights) or a factory's
    pretrained weights (``"pretrained"``, likewise)."""
    from bench.models.external import state_hash

    path = resolved.config.checkpoint
    sha = resolved.checkpoint_sha256 or state_hash(getattr(model, "net", model))
    source = "file" if path else "python" if resolved.checkpoint_sha256 else "pretrained"
    key = stable_hash({"file": sha, "defense": resolved.defense.name, "dataset": resolved.spec.name,
                       "hparams": resolved.hparams, "image_size": resolved.image_size}, 32)
    with distributed.main_first():  # rank 0 creates the models row, the others find it
        model_id = store.upsert_model(key, **_model_fields(resolved), recipe=None, source=source,
                                      checkpoint_path=str(Path(path).resolve()) if path else None,
                                      checkpoint_sha256=sha, train_summary=meta.get("train_summary"))
    return model.eval(), model_id, sha


def _training_key(resolved: ResolvedRun, train: Split) -> str:
    """The cache key of a trained model: everything that determines its weights, except the world
    size: a model trained under torchrun (DDP) differs from a one-process one only in float
    rounding and per-rank BatchNorm statistics, and whichever is trained first is the cached model
    of its configuration for every world size (so a run resumed with another world size keeps its
    model). The checkpoint's meta records the ``world_size`` that trained it."""
    from bench.data.base import indices_hash

    assert resolved.recipe is not None and train.indices is not None
    return stable_hash({"defense": resolved.defense.name, "dataset": resolved.spec.name, "hparams": resolved.hparams,
                        "image_size": resolved.image_size, "recipe": resolved.recipe.to_dict(),
                        "seed": resolved.config.seed, "device_kind": device_kind(resolved.device),
                        "train_indices": indices_hash(train.indices.numpy()),
                        "train_labels": stable_hash(train.labels.tolist()), "training_version": TRAINING_VERSION}, 32)


def _cached_or_trained(resolved: ResolvedRun, model: DefendedModel, store: Store,
                       progress: Progress) -> tuple[DefendedModel, int, str]:
    from bench.training.checkpoints import checkpoint_dir, checkpoint_lock

    train = load_split(resolved, "train", progress)
    key = _training_key(resolved, train)
    path = checkpoint_dir() / f"{resolved.defense.name}-{resolved.spec.name}-{key[:16]}.pt"
    # one process trains and writes a cached model; an identical run waits, then loads that file
    with checkpoint_lock(path) if distributed.is_main() else contextlib.nullcontext():
        return _load_or_train(resolved, model, store, progress, train, key, path)


def _load_or_train(resolved: ResolvedRun, model: DefendedModel, store: Store, progress: Progress, train: Split,
                   key: str, path: Path) -> tuple[DefendedModel, int, str]:
    """The cached model at ``path`` if it is usable, else train it and write ``path`` (under
    :func:`bench.training.checkpoints.checkpoint_lock`)."""
    import torch

    from bench.training.checkpoints import load_into, read_checkpoint, save_checkpoint, sha256_file

    defense, spec, recipe = resolved.defense, resolved.spec, resolved.recipe
    assert recipe is not None
    summary: dict[str, Any] | None = None
    if path.exists():
        try:
            state, meta = read_checkpoint(path)
            load_into(defense, model, state, str(path))
            summary = meta.get("train_summary")
            progress.log(f"using cached model {path}")
        except Exception as exc:  # noqa: BLE001 - a broken cache entry is retrained, never trusted
            progress.log(f"cached model {path} is unusable ({exc}); retraining")
            model = resolved.fresh_model()
    if distributed.from_main(summary is None):  # every rank trains (DDP) when rank 0 has no usable cache
        if summary is not None:  # this rank read a file rank 0 could not: train from the same initial weights
            model = resolved.fresh_model()
        progress.log(f"training {defense.name} on {spec.name} ({resolved.recipe_name} recipe, "
                     f"{recipe.epochs_for(len(train))} epochs, {resolved.device})")
        kwargs: dict[str, Any] = {}
        if "resume" in inspect.signature(defense.fit).parameters:  # third-party fit() may predate resume
            kwargs["resume"] = path.with_name(path.stem + ".partial.pt")
        result = defense.fit(model, train, recipe, spec=spec,
                             device=torch.device(distributed.local_device(resolved.device)),
                             seed=resolved.config.seed, progress=progress, **kwargs)
        summary = result.to_dict()
        if distributed.is_main():  # one writer; the other ranks load what it wrote
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            save_checkpoint(path, state, {"train_summary": summary, "key": key, "defense": defense.name,
                                          "dataset": spec.name, "bench_version": bench.__version__,
                                          "world_size": distributed.world_size()})
        distributed.barrier()
        if not distributed.is_main():
            state, meta = read_checkpoint(path)
            load_into(defense, model, state, str(path))
            summary = meta.get("train_summary")
    elif summary is None:
        raise BenchError(f"cached model {path} is unreadable on rank {distributed.rank()} but not on rank 0")
    sha = sha256_file(path)
    with distributed.main_first():  # rank 0 creates the models row, the others find it
        model_id = store.upsert_model(key, **_model_fields(resolved), recipe=recipe.to_dict(), source="trained",
                                      checkpoint_path=str(path), checkpoint_sha256=sha, train_summary=summary)
    return model.eval(), model_id, sha


def _require_draw_space(model: DefendedModel) -> None:
    """``--exact-draws`` needs a randomized model that declares its draw space (refused before anything is stored)."""
    from bench.harness.stages import scoring_for

    scoring_for(model, 1, exact=True)


def record_result_checks(store: Store, run_id: int) -> None:
    """Checks computed from the stored results (after the attacks): stored like the others."""
    from bench.results.checks import result_checks
    from bench.results.queries import run_summary

    for check in result_checks(run_summary(store, run_id)):
        store.set_check(run_id, check.name, check.triggered, check.detail)


def record_saturation_checks(store: Store, run_id: int, resolved: ResolvedRun, model: DefendedModel, test: Split,
                             device: torch.device, progress: Progress) -> None:
    """After the attacks (rank 0 only): the EOT saturation check of a randomized model's first EOT
    stage per threat model (:mod:`bench.harness.saturation`), stored once (a resumed run skips the
    stored ones)."""
    from bench.harness.saturation import record_saturation_checks as record

    record(store, run_id, model, test, device, resolved.protocol, resolved.config.seed, resolved.config.batch_size,
           progress)


def _record_checks(store: Store, run_id: int, model: DefendedModel, test: Split, device: torch.device) -> None:
    """The model checks, stored by rank 0. Every rank computes them, so every rank's random state
    at the first stage is the one a one-process run has."""
    from bench.capabilities import capability
    from bench.harness.checks import run_checks

    x, y = test.images[:64].to(device), test.labels[:64].to(device)
    checks = run_checks(model, x, y, bool(capability(model, "randomized")))
    if distributed.is_main():
        for check in checks:
            store.set_check(run_id, check.name, check.triggered, check.detail)

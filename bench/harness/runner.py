"""``bench run``: resolve -> (stored result?) -> data -> model -> checks -> clean -> attacks.

Every stage reads what is already stored for the run and skips it, so an interrupted run
continues where it stopped and yields the same numbers (each batch is seeded by its position,
not by what ran before). A run is marked finished only after its last stage.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bench
from bench.config import AttackSpec, CertifySpec, RunConfig, stable_hash
from bench.data.base import DatasetSpec
from bench.defenses.base import Defense, Recipe
from bench.harness.device import device_kind, resolve_device
from bench.harness.progress import Progress
from bench.harness.protocol import Protocol, resolve_protocol
from bench.errors import AttackNotApplicable, BenchError
from bench.registry import ATTACKS, DATASETS, DEFENSES
from bench.results.schema import EvalKind, RunStatus
from bench.results.store import Store

if TYPE_CHECKING:
    import torch

    from bench.data.base import Dataset, Split
    from bench.models.defended import DefendedModel

__all__ = ["ResolvedRun", "execute", "resolve"]

# Bump when a change to the training code makes cached checkpoints stale.
TRAINING_VERSION = 2


@dataclass(frozen=True)
class ResolvedRun:
    """A run configuration with every default filled in; its ``key`` identifies the run."""

    config: RunConfig
    defense: Defense
    dataset: Dataset
    spec: DatasetSpec
    protocol: Protocol
    device: str
    hparams: dict[str, Any]
    image_size: int
    data_root: str | None
    recipe_name: str | None
    recipe: Recipe | None
    checkpoint_sha256: str | None
    key: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "defense": self.defense.name,
            "defense_info": _info_dict(self.defense),
            "dataset": self.spec.name,
            "dataset_entry": self.config.dataset,
            "dataset_spec": self.spec.to_dict(),
            "split": self.config.split,
            "protocol": self.protocol.to_dict(),
            "hparams": self.hparams,
            "image_size": self.image_size,
            "radii": list(self.config.radii or self.spec.radii),
            "data_root": self.data_root,
            "recipe_name": self.recipe_name,
            "recipe": self.recipe.to_dict() if self.recipe else None,
            "checkpoint": self.config.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "seed": self.config.seed,
            "batch_size": self.config.batch_size,
            "device_kind": device_kind(self.device),
            "bench_version": bench.__version__,
        }


def _info_dict(defense: Defense) -> dict[str, Any] | None:
    from dataclasses import asdict

    info = getattr(defense, "info", None)
    if info is None:
        return None
    out = asdict(info)
    for later in ("default_protocol", "smoothed"):  # added later: absent unless set, so older run keys still match
        if not out.get(later):
            out.pop(later, None)
    return out


def resolve(config: RunConfig) -> ResolvedRun:
    """Validate ``config`` and fill in defaults, without importing torch when avoidable."""
    from bench.harness.checkpoints import sha256_file

    config.validate()
    config = replace(config, defense=DEFENSES.normalize(config.defense), dataset=DATASETS.normalize(config.dataset),
                     attacks=tuple(ATTACKS.normalize(a) for a in config.attacks))
    defense: Defense = DEFENSES.get(config.defense)()
    dataset: Dataset = DATASETS.get(config.dataset)()
    root = (config.data_dir or dataset.default_root()) if dataset.reads_files else None
    data_root = str(Path(root).expanduser().resolve()) if root else None
    spec: DatasetSpec = dataset.resolve_spec(data_root)
    if config.split not in spec.splits:
        raise BenchError(f"dataset '{spec.name}' has no split '{config.split}'; splits: {', '.join(spec.splits)}")
    info = getattr(defense, "info", None)
    protocol = resolve_protocol(config, spec, randomized=bool(getattr(info, "randomized", False)),
                                certificates=tuple(getattr(info, "certificates", ())),
                                default=getattr(info, "default_protocol", None),
                                smoothed=bool(getattr(info, "smoothed", False)))
    device = resolve_device(config.device)
    image_size = config.image_size or spec.image_size
    recipe_name: str | None = None
    recipe: Recipe | None = None
    checkpoint_sha = None
    if config.checkpoint:
        checkpoint_sha = sha256_file(config.checkpoint)
    else:
        recipe_name = config.recipe if config.recipe != "auto" else ("cpu" if device_kind(device) == "cpu" else "paper")
        recipe = defense.recipe(recipe_name)
        if config.epochs is not None:  # an explicit number of epochs is not capped by the examples budget
            recipe = replace(recipe, epochs=config.epochs, max_examples=None)
    hparams = defense.resolve_hparams(dict(config.hparams), image_size, recipe_name)
    partial = ResolvedRun(config, defense, dataset, spec, protocol, device, hparams, image_size, data_root, recipe_name,
                          recipe, checkpoint_sha, key="")
    return ResolvedRun(**{**partial.__dict__, "key": stable_hash(partial.to_dict(), 32)})


def execute(config: RunConfig | ResolvedRun, store: Store, progress: Progress | None = None) -> int:
    """Run (or resume, or look up) the evaluation ``config`` describes; return the run id.

    ``config`` may already be resolved (the CLI resolves before it opens the store)."""
    resolved = config if isinstance(config, ResolvedRun) else resolve(config)
    existing = store.find_run(resolved.key)
    if existing is not None and existing.status is RunStatus.FINISHED:
        return existing.id
    progress = progress or Progress()
    check_attacks(resolved.protocol.attacks)  # before any training: a bad attack parameter is a user error
    check_certifiers(resolved.protocol.certifiers, resolved)
    return _execute(resolved, store, progress, existing.id if existing is not None else None)


def check_attacks(specs: Iterable[AttackSpec]) -> None:
    """Instantiate every attack (validating its parameters) and check its norm, wrapped attacks included."""
    for spec in specs:
        ATTACKS.get(spec.attack)(**spec.kwargs).require_norm(spec.threat.norm)


def check_certifiers(specs: Iterable[CertifySpec], resolved: ResolvedRun | None = None) -> None:
    """Instantiate every certifier (validating its parameters) and, given the run, let it inspect
    a freshly built (untrained) model: a model it cannot certify is refused before training."""
    from bench.registry import CERTIFIERS

    certifiers = [CERTIFIERS.get(spec.certifier)(**spec.kwargs) for spec in specs]
    if certifiers and resolved is not None:
        import torch

        with torch.random.fork_rng():
            probe = resolved.defense.build(resolved.spec, resolved.image_size, **resolved.hparams)
        for certifier in certifiers:
            certifier.prepare(probe)


def _execute(resolved: ResolvedRun, store: Store, progress: Progress, run_id: int | None) -> int:
    import torch

    from bench.harness import provenance

    from bench.data.base import indices_hash

    started = time.perf_counter()
    dataset = resolved.dataset
    full = load_split(resolved, resolved.config.split, progress)
    test = select_examples(full, resolved.protocol, resolved.config.seed)

    assert test.indices is not None
    idx_hash = indices_hash(test.indices.numpy())
    model, model_id, model_sha = obtain_model(resolved, dataset, store, progress)
    prov = provenance.collect(device=resolved.device, seed=resolved.config.seed, dataset=resolved.spec.name,
                              indices_hash=idx_hash, checkpoint_sha256=model_sha, data_root=resolved.data_root)
    fields = dict(model_id=model_id, defense=resolved.defense.name, dataset=resolved.spec.name,
                  protocol=resolved.protocol.name, protocol_version=resolved.protocol.version,
                  config=resolved.to_dict(), seed=resolved.config.seed, n_examples=len(test),
                  indices_hash=idx_hash, indices=test.indices.tolist(), provenance=prov)
    if run_id is None:
        run_id = store.create_run(resolved.key, **fields)
    else:
        progress.log(f"resuming run {run_id}")
        store.update_run(run_id, status=RunStatus.RUNNING, provenance=prov, model_id=model_id)
    device = torch.device(resolved.device)
    model.to(device)
    evaluator: Evaluator | None = None
    try:
        _record_checks(store, run_id, model, test, device)
        model.eval()
        draws = resolved.protocol.draws if getattr(model, "randomized", False) else 1
        if getattr(model, "smoothed_evaluation", False):
            draws = 1  # the evaluated classifier is the smoothed g: one PREDICT decision per example
        evaluator = Evaluator(store, run_id, model, test, device, resolved.config.batch_size,
                              resolved.config.seed, draws, progress, frozen=resolved.protocol.frozen)
        alive = evaluator.clean()
        groups: dict[tuple[str, float], set[int]] = {}
        for position, spec in enumerate(resolved.protocol.attacks, start=1):
            group = (spec.threat.norm.value, spec.threat.eps)
            groups[group] = evaluator.attack(position, spec, groups.get(group, alive))
        radii = tuple(resolved.to_dict()["radii"])
        for offset, cert in enumerate(resolved.protocol.certifiers, start=len(resolved.protocol.attacks) + 1):
            evaluator.certify(offset, cert, radii)
        if resolved.protocol.certifiers:  # protocols that certify audit their certificates (docs/certification.md)
            from bench.certifiers.audit import audit_run

            audit_run(store, run_id, model=model, data=test, progress=progress, seed=resolved.config.seed)
        record_result_checks(store, run_id)
        store.finish_run(run_id)
    except BaseException as exc:
        store.fail_run(run_id, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        raise
    finally:  # the cost of every session counts, interrupted ones included
        counts = (evaluator.forward_passes, evaluator.backward_passes) if evaluator is not None else (0, 0)
        store.add_run_cost(run_id, time.perf_counter() - started, *counts)
    return run_id


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
    """The protocol's evaluation subset: all examples, or a seeded random subset in index order."""
    import torch

    n = protocol.n_examples
    if n is None or n >= len(split):
        return split
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randperm(len(split), generator=generator)[:n].sort().values
    return split.subset(positions)


def obtain_model(resolved: ResolvedRun, dataset: Dataset, store: Store,
                 progress: Progress) -> tuple[DefendedModel, int, str]:
    """Load the user's checkpoint, or the cached trained model, or train one and cache it."""
    import torch

    from bench.data.base import indices_hash
    from bench.harness.checkpoints import checkpoint_dir, load_into, read_checkpoint, save_checkpoint, sha256_file

    defense, spec = resolved.defense, resolved.spec
    torch.manual_seed(resolved.config.seed)  # initial weights are part of the seeded configuration
    model = defense.build(spec, resolved.image_size, **resolved.hparams)
    common = dict(defense=defense.name, dataset=spec.name, arch=str(resolved.hparams.get("arch")),
                  hparams=resolved.hparams)
    if resolved.config.checkpoint:
        path, sha = resolved.config.checkpoint, resolved.checkpoint_sha256
        assert sha is not None
        state, meta = read_checkpoint(path)
        load_into(defense, model, state, path)
        key = stable_hash({"file": sha, "defense": defense.name, "dataset": spec.name, "hparams": resolved.hparams,
                           "image_size": resolved.image_size}, 32)
        model_id = store.upsert_model(key, **common, recipe=None, source="file",
                                      checkpoint_path=str(Path(path).resolve()), checkpoint_sha256=sha,
                                      train_summary=meta.get("train_summary"))
        return model.eval(), model_id, sha
    assert resolved.recipe is not None
    train = load_split(resolved, "train", progress)
    assert train.indices is not None
    key = stable_hash({"defense": defense.name, "dataset": spec.name, "hparams": resolved.hparams,
                       "image_size": resolved.image_size, "recipe": resolved.recipe.to_dict(),
                       "seed": resolved.config.seed, "device_kind": device_kind(resolved.device),
                       "train_indices": indices_hash(train.indices.numpy()),
                       "train_labels": stable_hash(train.labels.tolist()), "training_version": TRAINING_VERSION}, 32)
    path = checkpoint_dir() / f"{defense.name}-{spec.name}-{key[:16]}.pt"
    summary: dict[str, Any] | None = None
    if path.exists():
        try:
            state, meta = read_checkpoint(path)
            load_into(defense, model, state, str(path))
            summary = meta.get("train_summary")
            progress.log(f"using cached model {path}")
        except Exception as exc:  # noqa: BLE001 - a broken cache entry is retrained, never trusted
            progress.log(f"cached model {path} is unusable ({exc}); retraining")
            torch.manual_seed(resolved.config.seed)
            model = defense.build(spec, resolved.image_size, **resolved.hparams)
            summary = None
    if summary is None:
        progress.log(f"training {defense.name} on {spec.name} ({resolved.recipe_name} recipe, "
                     f"{resolved.recipe.epochs_for(len(train))} epochs, {resolved.device})")
        kwargs: dict[str, Any] = {}
        if "resume" in inspect.signature(defense.fit).parameters:  # third-party fit() may predate resume
            kwargs["resume"] = path.with_name(path.stem + ".partial.pt")
        result = defense.fit(model, train, resolved.recipe, spec=spec, device=torch.device(resolved.device),
                             seed=resolved.config.seed, progress=progress, **kwargs)
        summary = result.to_dict()
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_checkpoint(path, state, {"train_summary": summary, "key": key, "defense": defense.name,
                                      "dataset": spec.name, "bench_version": bench.__version__})
    sha = sha256_file(path)
    model_id = store.upsert_model(key, **common, recipe=resolved.recipe.to_dict(), source="trained",
                                  checkpoint_path=str(path), checkpoint_sha256=sha, train_summary=summary)
    return model.eval(), model_id, sha


def record_result_checks(store: Store, run_id: int) -> None:
    """Checks computed from the stored results (after the attacks): stored like the others."""
    from bench.harness.checks import result_checks
    from bench.results.queries import run_summary

    for check in result_checks(run_summary(store, run_id)):
        store.set_check(run_id, check.name, check.triggered, check.detail)


def _record_checks(store: Store, run_id: int, model: DefendedModel, test: Split, device: torch.device) -> None:
    from bench.harness.checks import run_checks

    x, y = test.images[:64].to(device), test.labels[:64].to(device)
    for check in run_checks(model, x, y, bool(getattr(model, "randomized", False))):
        store.set_check(run_id, check.name, check.triggered, check.detail)


def _batches(items: Sequence[int], size: int) -> Iterator[tuple[int, list[int]]]:
    for number, begin in enumerate(range(0, len(items), size)):
        yield number, list(items[begin:begin + size])


CERTIFY_BATCH = 16  # examples per committed batch of certificates (each may take 100,000 samples)
PREDICT_N, PREDICT_ALPHA = 1000, 0.001  # PREDICT of a smoothed classifier (Salman et al.'s empirical evaluation)


def _seed(*parts: int) -> int:
    return int(stable_hash(list(parts), 12), 16)


class Evaluator:
    """Runs the stages of one run over its examples, batch by batch, skipping stored rows."""

    def __init__(self, store: Store, run_id: int, model: DefendedModel, data: Split, device: torch.device,
                 batch_size: int, seed: int, draws: int, progress: Progress, frozen: bool = False) -> None:
        assert data.indices is not None
        self.store, self.run_id, self.model, self.device = store, run_id, model, device
        self.batch_size, self.seed, self.draws, self.progress = batch_size, seed, draws, progress
        # forward passes per example of one scoring: R draws, or PREDICT's n for a smoothed classifier
        self.score_passes = PREDICT_N if getattr(model, "smoothed_evaluation", False) else draws
        self.frozen = frozen  # attack one frozen draw (the authors' transfer-draw protocol)
        self.index = [int(i) for i in data.indices.tolist()]
        self.position_of = {ex: pos for pos, ex in enumerate(self.index)}
        self.images, self.labels = data.images, data.labels
        self.task = str(getattr(model, "task", "multiclass"))
        self.forward_passes = 0
        self.backward_passes = 0

    def _tensors(self, examples: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        pos = torch.tensor([self.position_of[e] for e in examples])
        return self.images[pos].to(self.device), self.labels[pos].to(self.device)

    def score(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Predict ``self.draws`` times (fresh randomness each time for randomized models).

        Returns the majority-vote prediction (per label for multilabel), the number of draws
        that were correct (all labels, for multilabel) and, for multilabel, the mean sigmoid
        score per label.
        """
        import torch

        from bench import tasks

        if getattr(self.model, "smoothed_evaluation", False):
            return self._predict_smoothed(x, y)
        with torch.no_grad():
            logits = torch.stack([self.model(x) for _ in range(self.draws)])
        self.forward_passes += self.draws * len(x)
        preds = torch.stack([tasks.predict(lg, self.task) for lg in logits])
        correct_draws = torch.stack([tasks.correct(p, y, self.task) for p in preds]).sum(dim=0)
        if self.task == "multilabel":
            vote = (preds.float().mean(dim=0) > 0.5).long()
            return vote, correct_draws, torch.sigmoid(logits).mean(dim=0)
        votes = torch.nn.functional.one_hot(preds, self.model.num_classes).sum(dim=0)
        return votes.argmax(dim=1), correct_draws, None

    def _predict_smoothed(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        """The smoothed classifier's decision: PREDICT with n=1000, alpha=0.001 at the model's sigma;
        an abstention (prediction -1) counts as wrong."""
        import torch

        from bench.certifiers.smoothing import predict

        classes = predict(self.model, x, float(self.model.sigma), n=PREDICT_N, alpha=PREDICT_ALPHA)
        self.forward_passes += self.score_passes * len(x)
        pred = torch.tensor([-1 if c is None else c for c in classes], device=y.device)
        return pred, (pred == y).long(), None

    def _rows(self, examples: list[int], y: torch.Tensor, pred: torch.Tensor, correct_draws: torch.Tensor,
              scores: torch.Tensor | None, norms: torch.Tensor | None = None) -> list[dict[str, Any]]:
        rows = []
        for k, ex in enumerate(examples):
            row: dict[str, Any] = {"example_index": ex, "correct": int(correct_draws[k]) == self.draws,
                                   "draws": self.draws, "correct_draws": int(correct_draws[k]),
                                   "perturbation_norm": float(norms[k]) if norms is not None else None}
            if scores is not None:
                row.update(label=None, prediction=None,
                           multilabel={"y": y[k].tolist(), "pred": pred[k].tolist(), "score": scores[k].tolist()})
            else:
                row.update(label=int(y[k]), prediction=int(pred[k]))
            rows.append(row)
        return rows

    def clean(self) -> set[int]:
        """Clean predictions for every example; returns the indices classified correctly."""
        import torch

        ev = self.store.evaluation(self.run_id, 0, EvalKind.CLEAN, "clean")
        done = self.store.done_indices(ev)
        batches = list(_batches(self.index, self.batch_size))
        with self.progress.task("clean", total=len(self.index)) as task:
            for number, examples in batches:
                todo = [e for e in examples if e not in done]
                if todo:
                    torch.manual_seed(_seed(self.seed, 0, number))
                    x, y = self._tensors(todo)
                    pred, correct_draws, scores = self.score(x, y)
                    self.store.add_results(ev, self._rows(todo, y, pred, correct_draws, scores),
                                           forward=self.score_passes * len(x))
                task.advance(len(examples))
        self.store.finish_evaluation(ev)
        return self.store.correct_indices(ev)

    def certify(self, position: int, spec: CertifySpec, radii: Sequence[float] = ()) -> None:
        """Certify every example (certified accuracy needs them all), a few examples per commit."""
        import torch

        from bench.registry import CERTIFIERS

        params = spec.kwargs
        if "radii" in CERTIFIERS.get(spec.certifier).defaults and params.get("radii") is None:
            params = {**params, "radii": list(radii)}  # the grid a sequential certificate decides
        certifier = CERTIFIERS.get(spec.certifier)(**params)
        described = certifier.prepare(self.model)
        ev = self.store.evaluation(self.run_id, position, EvalKind.CERTIFY, spec.certifier,
                                   sigma=described.get("sigma"), params={**spec.kwargs, "certificate": described})
        done = self.store.done_indices(ev)
        size = max(1, min(self.batch_size, CERTIFY_BATCH))
        with self.progress.task(spec.label, total=len(self.index)) as task:
            for number, examples in _batches(self.index, size):
                todo = [e for e in examples if e not in done]
                if todo:
                    torch.manual_seed(_seed(self.seed, position, number))
                    x, y = self._tensors(todo)
                    certificates = certifier.certify(self.model, x, y)
                    rows = []
                    for k, (ex, cert) in enumerate(zip(todo, certificates)):
                        label = int(y[k]) if self.task != "multilabel" else None
                        rows.append({"example_index": ex, "label": label, "prediction": cert.prediction,
                                     "correct": (not cert.abstained) and cert.prediction == label,
                                     "radius": cert.radius, "abstained": cert.abstained,
                                     "samples_used": cert.samples, "count_a": cert.count_a, "bound": cert.bound,
                                     "seconds": cert.seconds})
                    samples = sum(c.samples for c in certificates)
                    self.forward_passes += samples
                    self.store.add_results(ev, rows, forward=samples)
                task.advance(len(examples))
        self.store.finish_evaluation(ev)

    def attack(self, position: int, spec: AttackSpec, alive: set[int]) -> set[int]:
        """Attack the still-robust examples ``alive``; returns those that survive.

        Multilabel runs attack every example (per-label robust accuracy needs them all).
        """
        import torch

        from bench.attacks.base import perturbation_norm
        from bench.registry import ATTACKS

        attack = ATTACKS.get(spec.attack)(**spec.kwargs)
        ev = self.store.evaluation(self.run_id, position, EvalKind.ATTACK, spec.attack, norm=spec.threat.norm.value,
                                   eps=spec.threat.eps, params=spec.kwargs)
        if any(e.id == ev and e.skipped for e in self.store.evaluations(self.run_id)):
            return alive  # recorded as not applicable to this model in an earlier session
        done = self.store.done_indices(ev)
        targets = list(self.index) if self.task == "multilabel" else [e for e in self.index if e in alive]
        with self.progress.task(spec.label, total=len(targets)) as task:
            for number, examples in _batches(targets, self.batch_size):
                todo = [e for e in examples if e not in done]
                if todo:
                    torch.manual_seed(_seed(self.seed, position, number))
                    x, y = self._tensors(todo)
                    try:
                        if self.frozen:
                            with self.model.freeze_randomness():
                                result = attack(self.model, x, y, spec.threat)
                        else:
                            result = attack(self.model, x, y, spec.threat)
                    except AttackNotApplicable as exc:
                        self.progress.log(f"{spec.label}: skipped ({exc})")
                        self.store.skip_evaluation(ev, str(exc))
                        return alive
                    pred, correct_draws, scores = self.score(result.x_adv, y)
                    norms = perturbation_norm(x, result.x_adv, spec.threat.norm)
                    self.forward_passes += result.forward_passes
                    self.backward_passes += result.backward_passes
                    self.store.add_results(ev, self._rows(todo, y, pred, correct_draws, scores, norms),
                                           forward=result.forward_passes + self.score_passes * len(x),
                                           backward=result.backward_passes)
                task.advance(len(examples))
        self.store.finish_evaluation(ev)
        return alive & self.store.correct_indices(ev)

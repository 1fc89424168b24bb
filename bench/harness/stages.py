"""The stages of a run (clean, attacks, certificates) and the one scoring policy.

:class:`Evaluator` runs each stage over the run's examples batch by batch, skipping the rows
already stored, so an interrupted stage resumes exactly (every batch is seeded by its
position). :func:`scoring_for` is the one place that decides how a model's prediction on an
(adversarial) example is scored; ``bench run``, ``bench attack``, ``--escalate`` and the audit
all use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench.attacks.base import perturbation_norm
from bench.capabilities import capability
from bench.certifiers.base import Certificate
from bench.certifiers.smoothing import predict
from bench.config import AttackSpec, CertifySpec, stable_hash
from bench.errors import AttackNotApplicable, BenchError
from bench.harness.draws import draw_logits, draw_outcomes, enumerated_logits
from bench.models.defended import DefendedModel
from bench.progress import Progress, Task
from bench.registry import ATTACKS, CERTIFIERS
from bench.results.schema import EvalKind
from bench.results.store import Store
from bench.training import distributed

if TYPE_CHECKING:
    from bench.data.base import Split

__all__ = ["Evaluator", "Scoring", "scoring_for"]

# examples per committed batch of certificates: a certificate's ``window`` (how many it is handed at
# once) may be larger; a streamed one stores its decided certificates this many at a time
CERTIFY_BATCH = 16
PREDICT_N, PREDICT_ALPHA = 1000, 0.001  # PREDICT of a smoothed classifier (Salman et al.'s empirical evaluation)


@dataclass(frozen=True)
class Scoring:
    """How one (clean or adversarial) example is scored.

    * ``smoothed``: the defended classifier is a smoothed g; one PREDICT decision (n=1000,
      alpha=0.001) per example, an abstention counting as wrong; ``draws`` is 1.
    * otherwise ``draws`` = R forward passes, each with fresh randomness for a randomized model;
      a row stores how many of the R were correct, and ``correct`` (all R correct; R = 1 for
      deterministic models).
    * ``exact``: every draw of the model's declared draw space (``draw_space``, e.g. DCS's masks)
      once, so ``correct_draws / draws`` is the example's exact single-draw accuracy.
    * ``version`` (the protocol's ``scoring``): 1 as stored before issue 18 (a randomized model that
      shares its draw across a batch gives every example of the batch the same R draws; the
      attacks run on the worst-of-R-correct examples); 2: the R draws are independent across the
      examples (:func:`bench.harness.draws.draw_logits`) and the attacks run on every example
      with at least one correct draw, so which examples are attacked no longer depends on R.
    """

    draws: int = 1
    smoothed: bool = False
    version: int = 1
    exact: bool = False  # ``draws`` is the model's whole draw space, each draw taken once

    @property
    def survives_on_any_draw(self) -> bool:
        """Which examples the next attack of a cascade runs on: those with at least one correct
        draw (scoring 2), else those correct on all R draws (scoring 1)."""
        return self.version >= 2

    @property
    def passes(self) -> int:
        """Forward passes per example of one scoring."""
        return PREDICT_N if self.smoothed else self.draws


def scoring_for(model: nn.Module, draws: int, *, randomized: bool | None = None, min_draws: int = 1,
                version: int = 1, exact: bool = False) -> Scoring:
    """The one scoring policy: PREDICT for a smoothed classifier (whatever else it declares),
    ``max(draws, min_draws)`` fresh draws for a randomized model (``randomized`` overrides the
    model's declaration, e.g. for a model whose outputs vary although it does not declare it),
    or with ``exact`` every draw of its declared draw space; one pass otherwise. ``version`` is
    the protocol's scoring version (:class:`Scoring`). Raises :class:`BenchError` for ``exact``
    on a randomized model that declares no draw space."""
    if capability(model, "smoothed_evaluation"):
        return Scoring(1, smoothed=True, version=version)
    is_randomized = bool(capability(model, "randomized")) if randomized is None else randomized
    if not is_randomized:
        return Scoring(1, version=version)
    if exact:
        space = capability(model, "draw_space")
        if space is None:
            raise BenchError(f"--exact-draws: {type(model).__name__} declares no enumerable draw space "
                             "(draw_space); score it with R sampled draws instead")
        return Scoring(int(space), version=version, exact=True)
    return Scoring(max(int(draws), min_draws), version=version)


def _batches(items: Sequence[int], size: int) -> Iterator[tuple[int, list[int]]]:
    """``(number, members)`` of each batch of ``size`` consecutive ``items``: a batch's members and
    number (hence its seed) depend only on ``items`` and ``size``, never on the world size."""
    for number, begin in enumerate(range(0, len(items), size)):
        yield number, list(items[begin:begin + size])


def certify_batch(described: dict[str, Any], batch_size: int) -> int:
    """Examples handed to the certifier at once in a certification stage: the certifier's
    ``window`` (a smoothing certificate's, :func:`bench.certifiers.smoothing.certify_window`) or
    :data:`CERTIFY_BATCH`; at most the run's batch size unless the certificate is streamed (its
    memory does not grow with the examples in flight, and it stores them as they are decided)."""
    window = int(described.get("window") or CERTIFY_BATCH)
    return max(1, window if described.get("streamed") else min(batch_size, window))


def seed_of(*parts: int) -> int:
    """The torch seed of one seeded piece of work (a batch of a stage, a check's batch), from its
    parts (the run's seed, a position, a batch number, ...)."""
    return int(stable_hash(list(parts), 12), 16)


class Evaluator:
    """Runs the stages of one run over its examples, batch by batch, skipping stored rows.

    Sharded (``shard = (rank, world)`` with world > 1, one Evaluator per torchrun rank): the ranks
    share each stage's batches dynamically, each claiming the next unclaimed batch as soon as it is
    free (:func:`bench.training.distributed.claimer`), so a rank whose batches were cheap takes more.
    Each batch is formed and seeded as in a one-process run (by its number, not by who computes
    it), so the stored rows are identical whatever the world size. A sharded stage
    ends at a barrier (every rank's rows are then stored) and leaves the evaluation unfinished;
    every rank then reads the still-robust set from the store, and rank 0's final unsharded pass
    (which finds every row present) marks the evaluations finished.
    """

    def __init__(self, store: Store, run_id: int, model: DefendedModel, data: Split, device: torch.device,
                 batch_size: int, seed: int, scoring: Scoring, progress: Progress, frozen: bool = False,
                 shard: tuple[int, int] = (0, 1)) -> None:
        assert data.indices is not None
        self.store, self.run_id, self.model, self.device = store, run_id, model, device
        self.batch_size, self.seed, self.scoring, self.progress = batch_size, seed, scoring, progress
        self.draws = scoring.draws
        self.score_passes = scoring.passes  # forward passes per example of one scoring
        self.frozen = frozen  # attack one frozen draw (the authors' transfer-draw protocol)
        self.shard = shard  # (rank, world): world > 1 shares each stage's batches among the ranks
        self.index = [int(i) for i in data.indices.tolist()]
        self.position_of = {ex: pos for pos, ex in enumerate(self.index)}
        self.images, self.labels = data.images, data.labels
        self.task = str(capability(model, "task"))
        self.forward_passes = 0
        self.backward_passes = 0

    def _work(self, ev: int, batches: list[tuple[int, list[int]]], task: Task,
              own: bool = True) -> Iterator[tuple[int, list[int]]]:
        """The batches of evaluation ``ev`` this process computes, in increasing order: all of them
        unsharded; sharded, those it claims (every batch is claimed by exactly one rank). ``task``
        advances past each batch once it is computed here (unless ``own`` is False: the caller
        advances it as it goes) or claimed by another rank."""
        sharded = self.shard[1] > 1
        claim = distributed.claimer(f"bench/{self.run_id}/{ev}") if sharded else None
        passed = 0  # batches[:passed] are computed here or claimed elsewhere
        while (number := claim() if claim else passed) < len(batches):
            for _, examples in batches[passed:number]:  # claimed by other ranks meanwhile
                task.advance(len(examples))
            yield batches[number]
            if own:
                task.advance(len(batches[number][1]))
            passed = number + 1
        for _, examples in batches[passed:]:
            task.advance(len(examples))

    def _end_stage(self, ev: int) -> None:
        """Unsharded: mark the evaluation finished. Sharded: wait until every rank has stored its rows."""
        if self.shard[1] == 1:
            self.store.finish_evaluation(ev)
        else:
            distributed.barrier()

    def _skipped(self, ev: int) -> bool:
        """Whether evaluation ``ev`` is recorded as not applicable to this model."""
        return any(e.id == ev and e.skipped for e in self.store.evaluations(self.run_id))

    def _tensors(self, examples: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.tensor([self.position_of[e] for e in examples])
        return self.images[pos].to(self.device), self.labels[pos].to(self.device)

    def score(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Predict ``self.draws`` times (fresh randomness each time for randomized models).

        Returns the majority-vote prediction (per label for multilabel), the number of draws
        that were correct (all labels, for multilabel) and, for multilabel, the mean sigmoid
        score per label.
        """
        if self.scoring.smoothed:
            return self._predict_smoothed(x, y)
        with torch.no_grad():
            if self.scoring.exact:
                logits = enumerated_logits(self.model, x)
            elif self.scoring.version >= 2:
                logits = draw_logits(self.model, x, self.draws)
            else:  # scoring 1: the batch's R passes (shared by its examples when the model shares draws)
                logits = torch.stack([self.model(x) for _ in range(self.draws)])
        self.forward_passes += self.draws * len(x)
        preds, correct_draws = draw_outcomes(logits, y, self.task)
        if self.task == "multilabel":
            vote = (preds.float().mean(dim=0) > 0.5).long()
            return vote, correct_draws, torch.sigmoid(logits).mean(dim=0)
        votes = torch.nn.functional.one_hot(preds, int(capability(self.model, "num_classes"))).sum(dim=0)
        return votes.argmax(dim=1), correct_draws, None

    def _predict_smoothed(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        """The smoothed classifier's decision: PREDICT with n=1000, alpha=0.001 at the model's sigma;
        an abstention (prediction -1) counts as wrong."""
        classes = predict(self.model, x, float(capability(self.model, "sigma")), n=PREDICT_N, alpha=PREDICT_ALPHA)
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
        ev = self.store.evaluation(self.run_id, 0, EvalKind.CLEAN, "clean")
        done = self.store.done_indices(ev)
        batches = list(_batches(self.index, self.batch_size))
        with self.progress.task("clean", total=len(self.index)) as task:
            for number, examples in self._work(ev, batches, task):
                todo = [e for e in examples if e not in done]
                if todo:
                    torch.manual_seed(seed_of(self.seed, 0, number))
                    x, y = self._tensors(todo)
                    pred, correct_draws, scores = self.score(x, y)
                    self.store.add_results(ev, self._rows(todo, y, pred, correct_draws, scores),
                                           forward=self.score_passes * len(x))
        self._end_stage(ev)
        return self._survivors(ev)

    def certify(self, position: int, spec: CertifySpec, radii: Sequence[float] = ()) -> None:
        """Certify every example (certified accuracy needs them all), a few examples per commit."""
        params = spec.kwargs
        if "radii" in CERTIFIERS.get(spec.certifier).defaults and params.get("radii") is None:
            params = {**params, "radii": list(radii)}  # the grid a sequential certificate decides
        certifier = CERTIFIERS.get(spec.certifier)(**params)
        described = certifier.prepare(self.model)
        ev = self.store.evaluation(self.run_id, position, EvalKind.CERTIFY, spec.certifier,
                                   sigma=described.get("sigma"), params={**spec.kwargs, "certificate": described})
        done = self.store.done_indices(ev)
        size = certify_batch(described, self.batch_size)
        streamed = bool(described.get("streamed"))
        with self.progress.task(spec.label, total=len(self.index)) as task:
            for number, examples in self._work(ev, list(_batches(self.index, size)), task, own=False):
                todo = [e for e in examples if e not in done]
                task.advance(len(examples) - len(todo))
                if todo:
                    torch.manual_seed(seed_of(self.seed, position, number))
                    x, y = self._tensors(todo)
                    decided: list[tuple[int, Certificate]] = []
                    for j, certificate in certifier.certify_each(self.model, x, y, keys=todo, planned=len(examples)):
                        decided.append((j, certificate))
                        if streamed and len(decided) >= CERTIFY_BATCH:  # store what is decided as it comes
                            self._store_certificates(ev, todo, y, decided, task)
                            decided = []
                    self._store_certificates(ev, todo, y, decided, task)
        self._end_stage(ev)

    def _store_certificates(self, ev: int, todo: list[int], y: torch.Tensor,
                            decided: list[tuple[int, Certificate]], task: Task) -> None:
        """Store the certificates ``decided`` (position in ``todo``, certificate) in one commit;
        ``task`` advances by as many."""
        rows = []
        for k, cert in decided:
            label = int(y[k]) if self.task != "multilabel" else None
            rows.append({"example_index": todo[k], "label": label, "prediction": cert.prediction,
                         "correct": (not cert.abstained) and cert.prediction == label,
                         "radius": cert.radius, "abstained": cert.abstained,
                         "samples_used": cert.samples, "count_a": cert.count_a, "bound": cert.bound,
                         "seconds": cert.seconds})
        if rows:
            samples = sum(c.samples for _, c in decided)
            self.forward_passes += samples
            self.store.add_results(ev, rows, forward=samples)
            task.advance(len(rows))

    def attack(self, position: int, spec: AttackSpec, alive: set[int]) -> set[int]:
        """Attack the still-robust examples ``alive``; returns those that survive.

        Multilabel runs attack every example (per-label robust accuracy needs them all).
        """
        attack = ATTACKS.get(spec.attack)(**spec.kwargs)
        ev = self.store.evaluation(self.run_id, position, EvalKind.ATTACK, spec.attack, norm=spec.threat.norm.value,
                                   eps=spec.threat.eps, params=spec.kwargs)
        if self._skipped(ev):
            return alive  # recorded as not applicable to this model in an earlier session
        done = self.store.done_indices(ev)
        targets = list(self.index) if self.task == "multilabel" else [e for e in self.index if e in alive]
        with self.progress.task(spec.label, total=len(targets)) as task:
            for number, examples in self._work(ev, list(_batches(targets, self.batch_size)), task):
                todo = [e for e in examples if e not in done]
                if todo:
                    torch.manual_seed(seed_of(self.seed, position, number))
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
                        if self.shard[1] == 1:
                            return alive
                        break  # sharded: meet the other ranks at the stage's end
                    pred, correct_draws, scores = self.score(result.x_adv, y)
                    norms = perturbation_norm(x, result.x_adv, spec.threat.norm)
                    self.forward_passes += result.forward_passes
                    self.backward_passes += result.backward_passes
                    self.store.add_results(ev, self._rows(todo, y, pred, correct_draws, scores, norms),
                                           forward=result.forward_passes + self.score_passes * len(x),
                                           backward=result.backward_passes)
        self._end_stage(ev)
        if self.shard[1] > 1 and self._skipped(ev):
            return alive  # a rank found the attack not applicable
        return alive & self._survivors(ev)

    def _survivors(self, ev: int) -> set[int]:
        """The examples of evaluation ``ev`` that the next attack runs on (:attr:`Scoring.survives_on_any_draw`)."""
        return self.store.correct_indices(ev, any_draw=self.scoring.survives_on_any_draw)

"""The one training loop every defense shares."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bench.capabilities import capability
from bench.data.base import Split
from bench.training.recipe import Recipe
from bench.progress import Progress

Perturb = Callable[[nn.Module, torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> scalar
Select = Callable[[nn.Module], float]  # model (in eval mode) -> validation score, higher is better
Best = tuple[float, int, dict[str, torch.Tensor]]  # (score, epoch, weights)


@dataclass
class TrainSummary:
    epochs: int
    steps: int
    seconds: float
    final_loss: float
    final_train_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)
    selected_epoch: int | None = None  # with model selection: the epoch whose weights were kept
    selection_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _save_state(path: Path, epoch: int, steps: int, history: list[dict[str, float]], model: nn.Module,
                optimizer: torch.optim.Optimizer, scheduler: Any, shuffle: torch.Generator,
                best: Best | None = None) -> None:
    from bench.training.checkpoints import atomic_save

    atomic_save(path, {"epoch": epoch, "steps": steps, "history": history, "model": model.state_dict(),
                       "best": None if best is None else {"score": best[0], "epoch": best[1], "model": best[2]},
                       "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict() if scheduler is not None else None,
                       "shuffle": shuffle.get_state(), "torch_rng": torch.get_rng_state()})


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             shuffle: torch.Generator) -> tuple[int, int, list[dict[str, float]], Best | None]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    shuffle.set_state(state["shuffle"])
    torch.set_rng_state(state["torch_rng"])
    best = state.get("best")
    kept = None if best is None else (float(best["score"]), int(best["epoch"]), dict(best["model"]))
    return int(state["epoch"]), int(state["steps"]), list(state["history"]), kept


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay, nesterov=False)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe,
                   epochs: int | None = None) -> torch.optim.lr_scheduler.LRScheduler | None:
    epochs = epochs or recipe.epochs
    if recipe.schedule == "multistep" and recipe.milestones:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(recipe.milestones), gamma=recipe.gamma)
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return None


def fit(model: nn.Module, train: Split, recipe: Recipe, *, device: torch.device, seed: int = 0,
        progress: Progress | None = None, perturb: Perturb | None = None, loss_fn: Loss | None = None,
        balance_classes: bool = False, resume: Path | None = None, select: Select | None = None,
        select_every: int = 1) -> TrainSummary:
    """Train ``model`` in place for ``recipe.epochs_for(len(train))`` epochs of shuffled mini-batches.

    The loss defaults to the model's task loss (cross-entropy, or summed binary cross-entropy
    for multilabel models), weighted by inverse class frequency when ``balance_classes``.
    ``perturb(model, x, y)``, when given, replaces each clean batch by a perturbed one (computed
    with the model in eval mode), which is how adversarial training plugs in; it may return
    ``(x, y)`` instead, a batch of another size with its labels (SmoothAdv trains on m noisy
    copies of each image), and may have a ``set_epoch(epoch)`` method, called before every epoch
    (0-based; also after a resume). Shuffling and any randomness in ``perturb`` are seeded from ``seed``.

    Model selection: with ``select``, the model is scored after every ``select_every`` epochs
    and after the last one (``select(model)``, e.g. robust accuracy on a held-out validation
    split, never the test split), and the best-scoring weights are restored at the end. The
    scoring runs on a forked RNG, so it does not change the training's random stream.
    """
    from bench import tasks

    progress = progress or Progress()
    task = capability(model, "task")
    weight = None
    if balance_classes:
        weight = tasks.balancing_weights(train.labels, task, int(capability(model, "num_classes") or 0) or
                                         int(train.labels.max()) + 1).to(device)
    loss_fn = loss_fn or (lambda logits, y: tasks.loss(logits, y, task, weight=weight))
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    model.to(device)
    optimizer = make_optimizer(model, recipe)
    images, labels = train.images, train.labels
    n = len(labels)
    epochs = recipe.epochs_for(n)
    scheduler = make_scheduler(optimizer, recipe, epochs)
    history: list[dict[str, float]] = []
    steps = 0
    first_epoch = 0
    best: Best | None = None
    start = time.perf_counter()
    if resume is not None and resume.exists():
        first_epoch, steps, history, best = _restore(resume, model, optimizer, scheduler, shuffle)
        progress.log(f"resuming training after epoch {first_epoch} from {resume}")
    with progress.task(f"training ({n} images)", total=epochs) as bar:
        bar.advance(first_epoch)
        for epoch in range(first_epoch, epochs):
            order = torch.randperm(n, generator=shuffle)
            if hasattr(perturb, "set_epoch"):
                perturb.set_epoch(epoch)  # e.g. SmoothAdv's eps warm-up
            total_loss, correct, seen = 0.0, 0, 0
            for begin in range(0, n, recipe.batch_size):
                idx = order[begin:begin + recipe.batch_size]
                x, y = images[idx].to(device), labels[idx].to(device)
                if perturb is not None:
                    model.eval()
                    out = perturb(model, x, y)
                    x, y = (out[0].detach(), out[1]) if isinstance(out, tuple) else (out.detach(), y)
                model.train()
                optimizer.zero_grad(set_to_none=True)
                logits = model(x)
                loss = loss_fn(logits, y)
                loss.backward()
                optimizer.step()
                steps += 1
                total_loss += float(loss.detach()) * len(y)
                seen += len(y)
                correct += int(tasks.correct(tasks.predict(logits.detach(), task), y, task).sum())
            if scheduler is not None:
                scheduler.step()
            record = {"epoch": epoch + 1, "loss": total_loss / seen, "train_accuracy": correct / seen}
            if select is not None and ((epoch + 1) % select_every == 0 or epoch + 1 == epochs):
                record["val_score"] = score = _score(select, model, device, seed + 7919 * (epoch + 1))
                if best is None or score > best[0]:
                    best = (score, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
            history.append(record)
            if resume is not None:
                _save_state(resume, epoch + 1, steps, history, model, optimizer, scheduler, shuffle, best)
            bar.advance(1, loss=f"{record['loss']:.3f}", acc=f"{record['train_accuracy']:.3f}")
    model.eval()
    if best is not None:
        model.load_state_dict(best[2])
        progress.log(f"model selection: kept epoch {best[1]} of {epochs} (validation score {best[0]:.4f})")
    if resume is not None:
        resume.unlink(missing_ok=True)
    last = history[-1]
    return TrainSummary(epochs=epochs, steps=steps, seconds=time.perf_counter() - start,
                        final_loss=last["loss"], final_train_accuracy=last["train_accuracy"], history=history,
                        selected_epoch=None if best is None else best[1],
                        selection_score=None if best is None else best[0])


def _score(select: Select, model: nn.Module, device: torch.device, seed: int) -> float:
    """``select(model)`` in eval mode, on a forked and seeded RNG (training's stream is untouched)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.eval()
        score = float(select(model))
    model.train()
    return score

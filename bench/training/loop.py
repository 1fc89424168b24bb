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
from bench.progress import Progress
from bench.training import distributed
from bench.training.recipe import Recipe

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
             shuffle: torch.Generator, progress: Progress | None = None
             ) -> tuple[int, int, list[dict[str, float]], Best | None]:
    """The training state saved at ``path``, loaded into the model, optimizer, scheduler and
    generators. A state that cannot be read or does not fit (a corrupt or truncated file) is
    discarded with a log line: everything is left as it was and training starts from epoch 0
    (the next epoch's save replaces the file)."""
    import copy

    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
              None if scheduler is None else copy.deepcopy(scheduler.state_dict()),
              shuffle.get_state(), torch.get_rng_state())
    try:
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
    except Exception as exc:  # noqa: BLE001 - any unreadable state is discarded, never trusted
        model.load_state_dict(before[0])
        optimizer.load_state_dict(before[1])
        if scheduler is not None:
            scheduler.load_state_dict(before[2])
        shuffle.set_state(before[3])
        torch.set_rng_state(before[4])
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        (progress or Progress()).log(f"discarding unreadable partial training state {path} ({reason}); "
                                     "training from the start")
        return 0, 0, [], None


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

    Under torchrun (world size W > 1, process group initialised by
    :func:`bench.training.distributed.init`) the model is wrapped in DistributedDataParallel:
    every rank draws the same shuffled order, takes its part of every global batch (see
    :func:`_share`: the effective batch and the data order stay the recipe's), and the ranks'
    gradients are averaged. The history's loss and accuracy are summed over the ranks, rank 0's
    buffers (BatchNorm statistics) are broadcast after every epoch, so every rank ends with the
    same model, and only rank 0 writes the ``resume`` file. Perturbations draw a distinct random
    stream on every rank. A world of size 1 trains exactly as before.
    """
    from bench import tasks

    progress = progress or Progress()
    task = capability(model, "task")
    weight = None
    if balance_classes:
        weight = tasks.balancing_weights(train.labels, task, int(capability(model, "num_classes") or 0) or
                                         int(train.labels.max()) + 1).to(device)
    loss_fn = loss_fn or (lambda logits, y: tasks.loss(logits, y, task, weight=weight))
    torch.manual_seed(_rank_seed(seed, 0))
    shuffle = torch.Generator().manual_seed(seed)  # the same order on every rank
    model.to(device)
    net = _data_parallel(model, device)  # the model itself in a world of size 1
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
        first_epoch, steps, history, best = _restore(resume, model, optimizer, scheduler, shuffle, progress)
        if not distributed.is_main():  # every rank restored rank 0's state; draw this rank's own noise
            torch.manual_seed(_rank_seed(seed, first_epoch))
        progress.log(f"resuming training after epoch {first_epoch} from {resume}")
    per_epoch = -(-n // recipe.batch_size)  # batches per epoch: progress (and its ETA) moves within an epoch
    with progress.task(f"training ({n} images, {epochs} epochs)", total=epochs * per_epoch) as bar:
        bar.advance(first_epoch * per_epoch)
        for epoch in range(first_epoch, epochs):
            order = torch.randperm(n, generator=shuffle)
            if perturb is not None and hasattr(perturb, "set_epoch"):
                perturb.set_epoch(epoch)  # e.g. SmoothAdv's eps warm-up
            total_loss, correct, seen = 0.0, 0, 0
            for begin in range(0, n, recipe.batch_size):
                idx, share = _share(order[begin:begin + recipe.batch_size])
                x, y = images[idx].to(device), labels[idx].to(device)
                if perturb is not None:
                    model.eval()
                    out = perturb(model, x, y)
                    x, y = (out[0].detach(), out[1]) if isinstance(out, tuple) else (out.detach(), y)
                model.train()
                optimizer.zero_grad(set_to_none=True)
                logits = net(x)
                loss = loss_fn(logits, y)
                (loss if share is None else loss * share).backward()
                optimizer.step()
                steps += 1
                if share != 0.0:  # a rank without examples in this batch trained on a stand-in, weight 0
                    total_loss += float(loss.detach()) * len(y)
                    seen += len(y)
                    correct += int(tasks.correct(tasks.predict(logits.detach(), task), y, task).sum())
                bar.advance(1, epoch=f"{epoch + 1}/{epochs}")
            if scheduler is not None:
                scheduler.step()
            total_loss, correct, seen = _epoch_totals(model, total_loss, correct, seen, device)
            record = {"epoch": epoch + 1, "loss": total_loss / seen, "train_accuracy": correct / seen}
            if select is not None and ((epoch + 1) % select_every == 0 or epoch + 1 == epochs):
                record["val_score"] = score = _score(select, model, device, seed + 7919 * (epoch + 1))
                if best is None or score > best[0]:
                    best = (score, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
            history.append(record)
            if resume is not None and distributed.is_main():
                _save_state(resume, epoch + 1, steps, history, model, optimizer, scheduler, shuffle, best)
            bar.advance(0, epoch=f"{epoch + 1}/{epochs}", loss=f"{record['loss']:.3f}",
                        acc=f"{record['train_accuracy']:.3f}")
    model.eval()
    if best is not None:
        model.load_state_dict(best[2])
        progress.log(f"model selection: kept epoch {best[1]} of {epochs} (validation score {best[0]:.4f})")
    if resume is not None and distributed.is_main():
        resume.unlink(missing_ok=True)
    last = history[-1]
    return TrainSummary(epochs=epochs, steps=steps, seconds=time.perf_counter() - start,
                        final_loss=last["loss"], final_train_accuracy=last["train_accuracy"], history=history,
                        selected_epoch=None if best is None else best[1],
                        selection_score=None if best is None else best[0])


def _rank_seed(seed: int, epoch: int) -> int:
    """The seed of this rank's own randomness (perturbations): ``seed`` itself on rank 0 (and in a
    world of size 1), a distinct stream on every other rank."""
    rank = distributed.rank()
    return seed if rank == 0 else seed + 104_729 * rank + 1_299_709 * epoch


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel in a world larger than 1 (gradients averaged
    over the ranks, rank 0's weights broadcast at the start), ``model`` itself otherwise."""
    if distributed.world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)  # every trainable parameter takes part in forward


def _share(idx: torch.Tensor) -> tuple[torch.Tensor, float | None]:
    """This rank's part of the global batch ``idx`` and the weight of its (mean) loss.

    In a world of size 1: ``(idx, None)``, the batch itself, unweighted. Otherwise rank r takes the
    r-th of W near-equal contiguous parts, and its loss is weighted by ``W * len(part) / len(idx)``,
    so DDP's average of the ranks' gradients is the gradient of the global batch's mean loss: the
    effective batch and the data order stay the recipe's. A rank whose part is empty (a batch
    smaller than W) trains on the batch's first example with weight 0, so every rank still takes
    part in the gradient exchange."""
    world = distributed.world_size()
    if world == 1:
        return idx, None
    part = torch.tensor_split(idx, world)[distributed.rank()]
    if len(part) == 0:
        return idx[:1], 0.0
    return part, world * len(part) / len(idx)


def _epoch_totals(model: nn.Module, total_loss: float, correct: int, seen: int,
                  device: torch.device) -> tuple[float, int, int]:
    """The epoch's loss sum, correct and seen counts over every rank (as they are in a world of size
    1). In a larger world rank 0's buffers (BatchNorm statistics, which each rank updated on its own
    part) are also broadcast, so every rank ends the epoch with the same model."""
    if distributed.world_size() == 1:
        return total_loss, correct, seen
    import torch.distributed as dist

    totals = torch.tensor([total_loss, float(correct), float(seen)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)
    return float(totals[0]), int(totals[1]), int(totals[2])


def _score(select: Select, model: nn.Module, device: torch.device, seed: int) -> float:
    """``select(model)`` in eval mode, on a forked and seeded RNG (training's stream is untouched)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.eval()
        score = float(select(model))
    model.train()
    return score

"""The Python API: evaluate any ``nn.Module`` in one call.

    import bench, torch
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))   # [0,1] images -> logits
    summary = bench.evaluate(model, dataset="digits")
    print(summary["clean_accuracy"], summary["robust_accuracy"])

:func:`evaluate` runs the same harness as ``bench run`` (same protocols, checks, store and
resumption) on the given module, through the ``model`` defense (:mod:`bench.defenses.external`).
The model is identified by the SHA-256 of its state dict (or the ``name`` given), so evaluating
the same weights again returns the stored result without computing anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bench.config import RunConfig
from bench.errors import BenchError

if TYPE_CHECKING:
    from torch import nn

    from bench.models.defended import DefendedModel
    from bench.progress import Progress
    from bench.results.types import RunSummary

__all__ = ["evaluate"]


def evaluate(model: nn.Module, dataset: str = "digits", protocol: str | None = None, *,
             n_examples: int | None = None, db: str | None = None, name: str | None = None,
             randomized: bool = False, sigma: float | None = None, lipschitz_bound: float | None = None,
             normalize: Any = None, data_dir: str | None = None, split: str = "test", seed: int = 0,
             batch_size: int = 128, device: str = "auto", progress: Progress | None = None) -> RunSummary:
    """Evaluate ``model`` (images in [0, 1], shape (N, C, H, W), to logits) on ``dataset`` under
    ``protocol`` and return the run's summary (the ``--json`` object of ``bench run``).

    * ``protocol``: a named protocol (``autoattack``, ``pgd``, ``adaptive``, ``quick``, ...);
      by default AutoAttack standard, ``adaptive`` if ``randomized``, ``quick`` with a certificate.
    * ``randomized``: the forward pass draws fresh randomness (scored with R draws, attacked with
      EOT); ``sigma``: the model is the base classifier of a smoothed classifier at this noise
      level (predicted with PREDICT, certified by randomized smoothing); ``lipschitz_bound``: an
      L2 Lipschitz bound of the logits you vouch for (certified by the Lipschitz margin, and
      audited). These are the declarations of :mod:`bench.capabilities`.
    * ``normalize``: a preset (``cifar10``, ``imagenet``) or ``(mean, std)`` applied before the
      model, when the model expects normalized inputs.
    * ``db``: the result store URL (default ``$BENCH_DB``, else ``sqlite:///bench.db``);
      ``name``: the run's label on the leaderboard (default: the class name and a weight hash).

    A model that does not map the dataset's images to ``(N, num_classes)`` logits (a wrong shape,
    probabilities, NaN) is refused with a :class:`BenchError` before anything is stored. The
    model is set to eval mode and moved to the run's device.
    """
    import torch
    from torch import nn

    from bench.defenses.external import ExternalModel
    from bench.harness.resolve import resolve
    from bench.harness.runner import stored_or_executed
    from bench.models.external import state_hash
    from bench.progress import Progress
    from bench.results.queries import run_summary
    from bench.results.store import resolve_url

    if not isinstance(model, nn.Module):
        raise BenchError(f"bench.evaluate needs a torch.nn.Module, got {type(model).__name__}")
    digest = state_hash(model)
    hparams = {"name": name or f"{type(model).__name__}-{digest[:8]}", "randomized": randomized, "sigma": sigma,
               "lipschitz_bound": lipschitz_bound, "normalize": normalize}
    config = RunConfig(defense="model", dataset=dataset, protocol=protocol, n_examples=n_examples, seed=seed,
                       batch_size=batch_size, device=device, data_dir=data_dir, split=split,
                       hparams=tuple(sorted((k, v) for k, v in hparams.items() if v is not None)))
    resolved = resolve(config, model_hash=digest)
    defense = resolved.defense
    assert isinstance(defense, ExternalModel)

    def wrapped() -> tuple[DefendedModel, dict[str, Any]]:
        with torch.random.fork_rng():  # wrapping does not consume the caller's random numbers
            return defense.wrap(model, resolved.spec, resolved.image_size, resolved.hparams).eval(), {}

    store, run_id, _ = stored_or_executed(resolved, resolve_url(db), progress or Progress(), wrapped)
    return run_summary(store, run_id)

"""Resolution: a user's :class:`RunConfig` (or a stored run) becomes a typed :class:`ResolvedRun`.

A resolved run has every default filled in (defense, dataset spec, protocol, recipe,
hyperparameters, device) and a ``key`` (a stable hash of :meth:`ResolvedRun.to_dict`) that
identifies it in the store. :meth:`ResolvedRun.from_stored` is the way back from a stored run.
Everything a run will instantiate is validated here, before any training.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bench
from bench.config import AttackSpec, CertifySpec, RunConfig, stable_hash
from bench.data.base import DatasetSpec
from bench.defenses.base import Defense, DefenseInfo
from bench.device import device_kind, resolve_device
from bench.errors import BenchError
from bench.harness.protocol import Protocol, resolve_protocol
from bench.registry import ATTACKS, CERTIFIERS, DATASETS, DEFENSES
from bench.results.stored import StoredConfig
from bench.training.recipe import Recipe

if TYPE_CHECKING:
    from bench.data.base import Dataset
    from bench.models.defended import DefendedModel
    from bench.results.schema import RunRow

__all__ = ["TRAINING_VERSION", "ResolvedRun", "check_attacks", "check_certifiers", "resolve"]

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
    stored: StoredConfig | None = None  # set when the run was read back from a store

    @classmethod
    def from_stored(cls, run: RunRow, device: str = "auto") -> ResolvedRun:
        """The stored run ``run`` as the harness's typed objects: the one way back from the store.

        Registry entries, the dataset spec (from the stored data root), the protocol and every
        stored setting come from ``run.config`` (through :class:`StoredConfig`); ``device`` is
        where the caller wants to compute now. ``key`` is the stored run key.
        """
        stored = StoredConfig.from_json(run.config)
        defense: Defense = DEFENSES.get(stored.defense)()
        dataset: Dataset = DATASETS.get(stored.dataset_entry)()
        spec = dataset.resolve_spec(stored.data_root)
        config = RunConfig(defense=stored.defense, dataset=stored.dataset_entry, protocol=stored.protocol.key,
                           seed=stored.seed, batch_size=stored.batch_size, checkpoint=stored.checkpoint,
                           data_dir=stored.data_root, image_size=stored.image_size, split=stored.split,
                           radii=stored.radii, hparams=tuple(sorted(stored.hparams.items())))
        recipe = Recipe.from_dict(stored.recipe) if stored.recipe else None
        return cls(config, defense, dataset, spec, stored.protocol, resolve_device(device), stored.hparams,
                   stored.image_size, stored.data_root, stored.recipe_name, recipe, stored.checkpoint_sha256,
                   key=run.key, stored=stored)

    @property
    def info(self) -> DefenseInfo:
        """What this run's model declares (``Defense.declared``: the defense's ``info``, or for a
        user's model, what its hyperparameters declare)."""
        return self.defense.declared(self.hparams)

    @property
    def label(self) -> str:
        """The name the run shows on the leaderboard (the defense, or the user's model name)."""
        return self.defense.label(self.hparams)

    @property
    def trains(self) -> bool:
        """Whether the model's weights come from bench's training (else from a file, a download or
        the caller)."""
        return self.recipe is not None

    def fresh_model(self) -> DefendedModel:
        """The defense's model freshly built with the run's seeded initial weights (they are part of
        the seeded configuration: every build of a run, trained or loaded, starts from the same)."""
        import torch

        torch.manual_seed(self.config.seed)
        return self.defense.build(self.spec, self.image_size, **self.hparams)

    @property
    def radii(self) -> tuple[float, ...]:
        """The certified-accuracy radius grid: the user's, else the dataset's."""
        return tuple(self.config.radii or self.spec.radii)

    def to_dict(self) -> dict[str, Any]:
        return {
            "defense": self.defense.name,
            "defense_info": _info_dict(self.info),
            "dataset": self.spec.name,
            "dataset_entry": self.config.dataset,
            "dataset_spec": self.spec.to_dict(),
            "split": self.config.split,
            "protocol": self.protocol.to_dict(),
            "hparams": self.hparams,
            "image_size": self.image_size,
            "radii": list(self.radii),
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


def _info_dict(info: DefenseInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    out = asdict(info)
    for later in ("default_protocol", "smoothed"):  # added later: absent unless set, so older run keys still match
        if not out.get(later):
            out.pop(later, None)
    return out


def resolve(config: RunConfig, model_hash: str | None = None) -> ResolvedRun:
    """Validate ``config`` and fill in defaults, without importing torch when avoidable.

    ``model_hash`` identifies a model the caller supplies (the Python API): it stands for the
    checkpoint's sha256, and nothing is trained."""
    config.validate()
    config = replace(config, defense=DEFENSES.normalize(config.defense), dataset=DATASETS.normalize(config.dataset),
                     attacks=tuple(ATTACKS.normalize(a) for a in config.attacks))
    defense: Defense = DEFENSES.get(config.defense)()
    dataset: Dataset = DATASETS.get(config.dataset)()
    root = (config.data_dir or dataset.default_root()) if dataset.reads_files else None
    data_root = str(Path(root).expanduser().resolve()) if root else None
    if config.download:  # before the spec reads the root: datasets that can fetch their files do so now
        dataset.fetch_missing(Path(data_root) if data_root else None)
    spec: DatasetSpec = dataset.resolve_spec(data_root)
    if config.split not in spec.splits:
        raise BenchError(f"dataset '{spec.name}' has no split '{config.split}'; splits: {', '.join(spec.splits)}")
    device = resolve_device(config.device)
    image_size = config.image_size or spec.image_size
    recipe_name, recipe, checkpoint_sha = _weights(config, defense, device, model_hash)
    hparams = defense.resolve_hparams(dict(config.hparams), image_size, recipe_name)
    info = defense.declared(hparams)
    protocol = resolve_protocol(config, spec, randomized=info.randomized, certificates=tuple(info.certificates),
                                default=info.default_protocol, smoothed=info.smoothed)
    partial = ResolvedRun(config, defense, dataset, spec, protocol, device, hparams, image_size, data_root, recipe_name,
                          recipe, checkpoint_sha, key="")
    return ResolvedRun(**{**partial.__dict__, "key": stable_hash(partial.to_dict(), 32)})


def _weights(config: RunConfig, defense: Defense, device: str,
             model_hash: str | None) -> tuple[str | None, Recipe | None, str | None]:
    """Where the model's weights come from: ``(recipe name, recipe, None)`` when bench trains it,
    ``(None, None, sha256)`` for a checkpoint file or a caller's model, ``(None, None, None)``
    for pretrained weights a model's factory downloads."""
    from bench.training.checkpoints import sha256_file

    if config.checkpoint:
        return None, None, sha256_file(config.checkpoint)
    if model_hash is not None:
        return None, None, model_hash
    if not defense.trainable:  # a model bench does not train (--model)
        if dict(config.hparams).get("pretrained"):
            return None, None, None
        raise BenchError(f"'{defense.label(dict(config.hparams))}' is not trained by bench: give --checkpoint FILE "
                         "(or --download for torchvision/timm pretrained weights)")
    recipe_name = config.recipe if config.recipe != "auto" else ("cpu" if device_kind(device) == "cpu" else "paper")
    recipe = defense.recipe(recipe_name)
    if config.epochs is not None:  # an explicit number of epochs is not capped by the examples budget
        recipe = replace(recipe, epochs=config.epochs, max_examples=None)
    return recipe_name, recipe, None


def check_attacks(specs: Iterable[AttackSpec]) -> None:
    """Instantiate every attack (validating its parameters) and check its norm, wrapped attacks included."""
    for spec in specs:
        ATTACKS.get(spec.attack)(**spec.kwargs).require_norm(spec.threat.norm)


def check_certifiers(specs: Iterable[CertifySpec], resolved: ResolvedRun | None = None) -> None:
    """Instantiate every certifier (validating its parameters) and, given the run, let it inspect
    a freshly built (untrained) model: a model it cannot certify is refused before training."""
    certifiers = [CERTIFIERS.get(spec.certifier)(**spec.kwargs) for spec in specs]
    if certifiers and resolved is not None:
        import torch

        with torch.random.fork_rng():
            probe = resolved.defense.build(resolved.spec, resolved.image_size, **resolved.hparams)
        for certifier in certifiers:
            certifier.prepare(probe)

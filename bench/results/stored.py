"""The typed view of a stored run's configuration (the ``runs.config`` JSON column).

``bench run`` writes the resolved configuration once (:meth:`bench.harness.resolve.ResolvedRun.to_dict`);
everything that starts from a *stored* run (``bench attack``, ``--escalate``, ``bench audit``,
the run summary, the leaderboard) reads it back through :meth:`StoredConfig.from_json`, the only
reader of that column's keys. Older stores keep working: keys added later have defaults here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.config import AttackSpec, Protocol, ThreatModel, parse_norm

__all__ = ["ExtraAttack", "StoredConfig"]


@dataclass(frozen=True)
class ExtraAttack:
    """An attack stage added to a finished run by ``bench attack`` or ``--escalate``."""

    position: int
    spec: AttackSpec
    escalated_for: str | None = None  # the sanity check whose remedy this stage is

    def to_dict(self) -> dict[str, Any]:
        out = {**self.spec.to_dict(), "position": self.position}
        if self.escalated_for:
            out["escalated_for"] = self.escalated_for
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtraAttack:
        return cls(int(data["position"]), AttackSpec.from_dict(data), data.get("escalated_for"))


@dataclass(frozen=True)
class StoredConfig:
    """A stored run's resolved configuration, typed. ``raw`` is the stored JSON object itself."""

    defense: str
    dataset: str  # the dataset's canonical name
    dataset_entry: str  # the registry entry that loads it (differs for aliases such as medmnist variants)
    split: str
    protocol: Protocol
    hparams: dict[str, Any]
    image_size: int
    radii: tuple[float, ...]
    data_root: str | None
    seed: int
    batch_size: int
    task: str
    classes: tuple[str, ...]
    imbalanced: bool
    dataset_threats: tuple[ThreatModel, ...]
    randomized: bool  # as the defense declared it when the run was made
    smoothed: bool
    checkpoint: str | None = None
    recipe_name: str | None = None
    recipe: dict[str, Any] | None = None  # a bench.training.recipe.Recipe's to_dict()
    checkpoint_sha256: str | None = None
    extra_attacks: tuple[ExtraAttack, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, config: dict[str, Any] | None) -> StoredConfig:
        """Parse ``runs.config``; a key missing from an older store takes its historical default."""
        c = dict(config or {})
        spec = c.get("dataset_spec") or {}
        info = c.get("defense_info") or {}
        protocol = {"name": "unknown", "version": 0, **(c.get("protocol") or {})}
        return cls(
            defense=str(c.get("defense", "")),
            dataset=str(c.get("dataset", "")),
            dataset_entry=str(c.get("dataset_entry") or c.get("dataset", "")),
            split=str(c.get("split", "test")),
            protocol=Protocol.from_dict(protocol),
            hparams=dict(c.get("hparams") or {}),
            image_size=int(c.get("image_size") or 0),
            radii=tuple(float(r) for r in c.get("radii") or ()),
            data_root=c.get("data_root"),
            seed=int(c.get("seed", 0)),
            batch_size=int(c.get("batch_size", 128)),
            task=str(spec.get("task", "multiclass")),
            classes=tuple(spec.get("classes", ())),
            imbalanced=bool(spec.get("imbalanced", False)),
            dataset_threats=tuple(ThreatModel(parse_norm(t["norm"]), float(t["eps"]))
                                  for t in spec.get("threat_models", [])),
            randomized=bool(info.get("randomized", False)),
            smoothed=bool(info.get("smoothed", False)),
            checkpoint=c.get("checkpoint"),
            recipe_name=c.get("recipe_name"),
            recipe=c.get("recipe"),
            checkpoint_sha256=c.get("checkpoint_sha256"),
            extra_attacks=tuple(ExtraAttack.from_dict(e) for e in c.get("extra_attacks", [])),
            raw=c,
        )

    @property
    def threats(self) -> tuple[ThreatModel, ...]:
        """The run's threat models: those of its protocol's attacks, else the dataset's defaults."""
        own = tuple(dict.fromkeys(a.threat for a in self.protocol.attacks))
        return own or self.dataset_threats

    @property
    def escalated(self) -> dict[int, str]:
        """Stage position -> the check whose remedy it is, for the stages ``--escalate`` added."""
        return {e.position: e.escalated_for for e in self.extra_attacks if e.escalated_for}

    def with_extra_attack(self, extra: ExtraAttack) -> dict[str, Any]:
        """The stored JSON with ``extra`` recorded (replacing an entry at the same position)."""
        kept = [e.to_dict() for e in self.extra_attacks if e.position != extra.position]
        return {**self.raw, "extra_attacks": kept + [extra.to_dict()]}

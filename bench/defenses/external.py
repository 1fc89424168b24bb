"""``model``: any ``nn.Module`` the user brings (``bench run --model SPEC``, ``bench.evaluate``).

Not a defense bench trains: the weights come from ``--checkpoint`` (or torchvision's/timm's
pretrained weights with ``--download``), or from the module handed to :func:`bench.evaluate`.
Its hyperparameters say what to build and what the model declares:

* ``model``: the SPEC, ``torchvision:NAME``, ``timm:NAME`` or ``MODULE:FACTORY`` (empty for a module given
  in Python, which cannot be rebuilt from the store); ``args``: the factory's keyword arguments;
* ``normalize``: the input normalization applied before the module (a preset or ``[mean, std]``),
  when the module expects normalized images; none by default (the module takes [0, 1] images);
* ``name``: the label of the run on the leaderboard (default: the SPEC);
* ``randomized``, ``sigma`` (a smoothed classifier's noise level: the model is the base
  classifier f and is certified and predicted as g) and ``lipschitz_bound`` (a bound on the L2
  Lipschitz constant of the logits the user vouches for; the certificate audit tries to break
  it): the declarations (:mod:`bench.capabilities`) of built-in defenses, here per run.

The default protocol follows the declarations: ``quick`` with a certificate, ``adaptive`` for a
randomized model, AutoAttack standard otherwise.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bench.defenses.base import Defense, DefenseInfo
from bench.errors import BenchError, CheckpointError
from bench.models.names import NORMALIZE_PRESETS
from bench.params import Param
from bench.registry import register_defense

if TYPE_CHECKING:
    from bench.data.base import DatasetSpec
    from bench.models.defended import DefendedModel

__all__ = ["ExternalModel"]

USER_GUARANTEE = "declared by the user (not proven by bench: the certificate audit tries to break it)"


@register_defense("model")
class ExternalModel(Defense):
    """A user's model (see the module docstring); weights from a checkpoint or from Python."""

    info = DefenseInfo(paper="(your model)", year=None, kind="external",
                       summary="any nn.Module: bench run --model SPEC --checkpoint FILE, or bench.evaluate(model)")
    recipes = {}
    trainable = False
    parameters = {
        "model": Param("", str), "args": Param({}, dict), "name": Param("", str),
        "normalize": Param(None, list, literals=tuple(NORMALIZE_PRESETS)), "pretrained": Param(False, bool),
        "randomized": Param(False, bool), "sigma": Param(None, float, gt=0),
        "lipschitz_bound": Param(None, float, gt=0),
    }

    def resolve_hparams(self, given: dict[str, Any], image_size: int, recipe: str | None = None) -> dict[str, Any]:
        """Checked values; ``normalize`` (a preset, ``MEAN/STD`` or a pair) as ``[mean, std]``
        lists, ``name`` defaulting to the SPEC."""
        from bench.models.external import parse_normalize

        norm = parse_normalize(given.get("normalize"))  # a preset, MEAN/STD or a (mean, std) pair
        resolved = self.check_hparams({**given, "normalize": [list(norm[0]), list(norm[1])] if norm else None})
        resolved["name"] = resolved["name"] or resolved["model"]
        if len(resolved["name"]) > 128:
            raise BenchError(f"model name '{resolved['name'][:40]}...' is longer than 128 characters; give --name")
        if resolved["sigma"] is not None and resolved["lipschitz_bound"] is not None:
            raise BenchError("declare either sigma (a smoothed classifier) or lipschitz_bound, not both")
        return resolved

    def declared(self, hparams: dict[str, Any]) -> DefenseInfo:
        """The run's info: randomized, certificates and default protocol from the declarations."""
        certificates = ("smoothing",) if hparams.get("sigma") else ("lipschitz",) if hparams.get("lipschitz_bound") \
            else ()
        randomized = bool(hparams.get("randomized"))
        default = "quick" if certificates else "adaptive" if randomized else "autoattack"
        return replace(self.info, randomized=randomized, certificates=certificates, default_protocol=default,
                       smoothed=bool(hparams.get("sigma")))

    def label(self, hparams: dict[str, Any]) -> str:
        return str(hparams.get("name") or self.name)

    def build(self, spec: DatasetSpec, image_size: int, **hparams: Any) -> DefendedModel:
        """The SPEC's module with its random initial weights, wrapped with the normalization and
        the declarations. A Python-given model (empty SPEC) cannot be rebuilt: one clear error."""
        from bench.models.external import build_from_spec

        h = self.check_hparams(hparams, ignore_unknown=True)
        if not h["model"]:
            raise BenchError(f"model '{h['name']}' was given in Python (bench.evaluate) and cannot be rebuilt from "
                             "the store; evaluate it again with bench.evaluate")
        args = dict(h["args"])
        if h["model"].partition(":")[0] in ("torchvision", "timm"):
            args.setdefault("num_classes", spec.num_classes)
        return self.wrap(build_from_spec(h["model"], args, pretrained=h["pretrained"]), spec, image_size, h)

    def wrap(self, net: Any, spec: DatasetSpec, image_size: int, hparams: dict[str, Any]) -> DefendedModel:
        """``net`` behind the run's normalization, with the run's declarations."""
        from bench.models.defended import DefendedModel

        norm = hparams.get("normalize")
        mean, std = (norm[0], norm[1]) if norm else ([0.0] * spec.channels, [1.0] * spec.channels)
        if len(mean) != spec.channels:
            raise BenchError(f"--normalize has {len(mean)} channels; dataset '{spec.name}' has {spec.channels}")
        model = DefendedModel(net, mean, std, spec.shape(image_size), spec.num_classes, spec.task)
        model.randomized = bool(hparams.get("randomized"))
        if hparams.get("sigma"):
            model.sigma = float(hparams["sigma"])
            model.smoothed_evaluation = True
        if hparams.get("lipschitz_bound"):
            model.lipschitz_bound = float(hparams["lipschitz_bound"])
            model.lipschitz_guarantee = USER_GUARANTEE
        return model

    def load_state_dict(self, model: DefendedModel, state: dict[str, Any]) -> None:
        """The checkpoint is the user's module's state dict (without bench's normalization); a
        misfit names the first missing and unexpected keys and shape mismatches, in one line."""
        from bench.training.checkpoints import key_mismatches, mismatch_summary

        try:  # torch's own strict load (it accepts old BatchNorm files without num_batches_tracked)
            model.net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            missing, unexpected, shapes = key_mismatches(model.net.state_dict(), state)
            detail = mismatch_summary(missing, unexpected, shapes) or str(exc).splitlines()[0][:300]
            raise CheckpointError(f"the checkpoint does not fit the module of --model: {detail}") from None

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        raise CheckpointError("bench does not train --model runs: give --checkpoint (or --download for "
                              "torchvision/timm pretrained weights)")

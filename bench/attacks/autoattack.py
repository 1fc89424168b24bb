"""AutoAttack and its components (Croce and Hein, 2020), via ``pyautoattack``, the official code.

Adapters: ``apgd-ce``, ``apgd-dlr``, ``apgd-t`` (targeted DLR), ``fab-t`` (targeted FAB),
``square`` (score-based, gradient-free) and ``autoattack`` (the ensemble, versions
``standard``, ``plus`` and ``rand``). All support the Linf and L2 norms and single-label models
(``multiclass``, ``binary``); a ``multilabel`` model raises :class:`~bench.errors.BenchError`.

What the adapters do around the library:

* They attack the :class:`~bench.attacks.base.PassCounter` handed to ``run``, so every forward
  and backward pass is counted (AutoAttack's own sanity checks included: the randomness check
  alone costs 5 forward passes per example).
* pyautoattack reseeds torch's *global* generator (``torch.manual_seed(seed)``) in every
  ``perturb``; the adapters run it inside :func:`torch.random.fork_rng`, so the caller's random
  state is untouched, and with a fixed ``seed`` (default 0) results are reproducible.
* Its logging (logger ``auto-attack``), warnings and prints are silenced, and the trace function
  that its dynamic-defense check clears (``sys.settrace(None)``, which would switch off coverage
  or a debugger) is restored.
* Class counts: the DLR loss needs the 3 largest logits and the targeted DLR loss 4, so
  ``apgd-dlr`` needs at least 3 classes and ``apgd-t`` at least 4; on smaller models they raise
  :class:`~bench.errors.AttackNotApplicable` ("needs at least N classes (DLR loss)"), which the
  harness records as a skipped stage with that reason (``skipped_attacks`` in the JSON).
  ``fab-t`` has no DLR loss; with 2 classes its single target is the other class, so it
  runs. Targeted attacks use ``n_target_classes = min(9, C - 1)`` (AutoAttack's 9 would
  otherwise exceed the classes that exist). ``C`` is the model's declared ``num_classes``
  (:func:`bench.capabilities.capability`, through wrappers), else the width of its logits.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from bench.attacks.base import Attack, AttackInfo, AttackResult
from bench.attacks.library import require_single_label
from bench.capabilities import capability
from bench.config import Norm, ThreatModel
from bench.errors import AttackNotApplicable
from bench.params import Param
from bench.registry import register_attack

__all__ = ["APGDCE", "APGDDLR", "APGDT", "FABT", "AutoAttackSuite", "Square", "max_targets"]

AA_LOGGER = "auto-attack"  # the logger pyautoattack.AutoAttack writes to
MAX_TARGETS = 9  # AutoAttack's number of target classes for apgd-t and fab-t
# the fewest classes each AutoAttack component can run on (DLR: 3 largest logits; targeted DLR: 4)
MIN_CLASSES = {"apgd-ce": 2, "apgd-dlr": 3, "fab": 2, "square": 2, "apgd-t": 4, "fab-t": 2}


def _declared_classes(model: nn.Module) -> int | None:
    """The model's declared ``num_classes`` when it is a positive integer, else ``None``."""
    n = capability(model, "num_classes")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


SEED = Param(0, int, ge=0)  # pyautoattack's seed: fixed by default, so results are reproducible


def max_targets(num_classes: int) -> int:
    """Target classes for a targeted attack: AutoAttack's 9, capped at the ``C - 1`` that exist."""
    return max(1, min(MAX_TARGETS, num_classes - 1))


@contextlib.contextmanager
def _quiet_and_isolated(device: torch.device) -> Iterator[None]:
    """Silence pyautoattack (logger, warnings, stdout), keep the caller's RNG state and trace
    function."""
    logger = logging.getLogger(AA_LOGGER)
    was_disabled = logger.disabled
    tracer = sys.gettrace()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    logger.disabled = True
    try:
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = was_disabled
        if sys.gettrace() is not tracer:
            sys.settrace(tracer)


def _norm(threat: ThreatModel) -> str:
    return "Linf" if threat.norm is Norm.LINF else "L2"


class _PyAutoAttack(Attack):
    """Shared plumbing for the pyautoattack adapters."""

    info: ClassVar[AttackInfo] = AttackInfo(norms=(Norm.LINF, Norm.L2), source="pyautoattack")
    min_classes: ClassVar[int] = 2
    loss_name: ClassVar[str] = ""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> AttackResult:
        # checked before the contract's eps == 0 short cut, so a skip never depends on eps
        require_single_label(model, self.name)
        declared = _declared_classes(model)
        if declared is not None:
            self._check_classes(declared)
        return super().__call__(model, x, y, threat)

    def _check_classes(self, num_classes: int) -> None:
        if num_classes < self.min_classes:
            raise AttackNotApplicable(f"attack '{self.name}' needs at least {self.min_classes} classes "
                                      f"({self.loss_name}); the model has {num_classes}")

    def _num_classes(self, model: nn.Module, x: torch.Tensor) -> int:
        declared = _declared_classes(model)
        if declared is not None:
            return declared
        with torch.no_grad():
            return int(model(x[:1]).shape[1])

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
        require_single_label(model, self.name)
        num_classes = self._num_classes(model, x)
        self._check_classes(num_classes)
        with _quiet_and_isolated(x.device):
            x_adv = self._perturb(model, x, y, threat, num_classes)
        return x_adv.detach()

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                 num_classes: int) -> torch.Tensor:
        raise NotImplementedError

    def _targets(self, num_classes: int) -> int:
        given = self.params.get("n_target_classes")
        limit = max_targets(num_classes)
        return limit if given is None else min(int(given), max(1, num_classes - 1))


class _APGD(_PyAutoAttack):
    loss: ClassVar[str] = "ce"
    parameters = {"n_iter": Param(100, int, ge=1), "n_restarts": Param(1, int, ge=1), "eot_iter": Param(1, int, ge=1),
                  "rho": Param(0.75, float, gt=0), "seed": SEED}

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                 num_classes: int) -> torch.Tensor:
        from pyautoattack.autopgd_base import APGDAttack

        p = self.params
        attack = APGDAttack(model, n_iter=p["n_iter"], norm=_norm(threat), n_restarts=p["n_restarts"],
                            eps=threat.eps, seed=p["seed"], loss=self.loss, eot_iter=p["eot_iter"],
                            rho=p["rho"], verbose=False, device=x.device,
                            logger=logging.getLogger(AA_LOGGER))
        return attack.perturb(x, y)


@register_attack("apgd-ce")
class APGDCE(_APGD):
    """APGD on the cross-entropy loss (Croce and Hein, 2020), via pyautoattack ``APGDAttack``.

    Step-size-free PGD with momentum and adaptive step-size halving, random start inside the
    ball; an example counts as broken if any restart breaks it.

    Parameters: ``n_iter`` (default 100), ``n_restarts`` (default 1, as AutoAttack's standard
    and rand versions; plus uses 5), ``eot_iter`` (gradient samples per step for randomized
    models, default 1; AutoAttack's rand version uses 20), ``rho`` (step-size decrease
    threshold, default 0.75), ``seed`` (default 0, so results are reproducible).
    """

    loss = "ce"


@register_attack("apgd-dlr")
class APGDDLR(_APGD):
    """APGD on the DLR loss (Croce and Hein, 2020), via pyautoattack ``APGDAttack``.

    As ``apgd-ce`` but maximising the scale-invariant Difference of Logits Ratio, which needs
    the three largest logits: models with fewer than 3 classes raise :class:`BenchError`.

    Parameters: ``n_iter`` (default 100), ``n_restarts`` (default 1, as AutoAttack's rand
    version; plus uses 5), ``eot_iter`` (default 1; rand uses 20), ``rho`` (default 0.75),
    ``seed`` (default 0).
    """

    loss = "dlr"
    min_classes = 3
    loss_name = "DLR loss"


@register_attack("apgd-t")
class APGDT(_PyAutoAttack):
    """Targeted APGD on the targeted DLR loss (Croce and Hein, 2020), via pyautoattack
    ``APGDAttack_targeted``.

    Runs APGD once per target class: the 2nd, 3rd, ... most likely classes of the clean input,
    ``n_target_classes`` of them. The targeted DLR loss needs the four largest logits: models with
    fewer than 4 classes raise :class:`BenchError`.

    Parameters: ``n_iter`` (default 100), ``n_restarts`` (per target, default 1, as in every
    AutoAttack version), ``n_target_classes`` (default ``min(9, C - 1)``: AutoAttack's 9 capped
    at the classes that exist; a larger value is capped too), ``eot_iter`` (default 1), ``rho``
    (default 0.75), ``seed`` (default 0).
    """

    info = AttackInfo(norms=(Norm.LINF, Norm.L2), targeted=True, source="pyautoattack")
    parameters = {"n_iter": Param(100, int, ge=1), "n_restarts": Param(1, int, ge=1),
                  "n_target_classes": Param(None, int, ge=1), "eot_iter": Param(1, int, ge=1),
                  "rho": Param(0.75, float, gt=0), "seed": SEED}
    min_classes = 4
    loss_name = "targeted DLR loss"

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                 num_classes: int) -> torch.Tensor:
        from pyautoattack.autopgd_base import APGDAttack_targeted

        p = self.params
        attack = APGDAttack_targeted(model, n_iter=p["n_iter"], norm=_norm(threat), n_restarts=p["n_restarts"],
                                     eps=threat.eps, seed=p["seed"], eot_iter=p["eot_iter"], rho=p["rho"],
                                     n_target_classes=self._targets(num_classes), verbose=False,
                                     device=x.device, logger=logging.getLogger(AA_LOGGER))
        return attack.perturb(x, y)


@register_attack("fab-t")
class FABT(_PyAutoAttack):
    """Targeted FAB, the Fast Adaptive Boundary attack (Croce and Hein, 2020), via pyautoattack
    ``FABAttack_PT``.

    A minimal-norm attack: for each target class (the 2nd, 3rd, ... most likely, as in
    ``apgd-t``) it steps towards the projection on the linearised decision boundary, then moves
    back towards x; only adversarial examples within eps are kept. With 2 classes the single
    target is the other class.

    Parameters: ``n_iter`` (default 100), ``n_restarts`` (per target, default 1, as in every
    AutoAttack version; restarts after the first start from random points), ``n_target_classes``
    (default ``min(9, C - 1)``), ``alpha_max`` (default 0.1), ``eta`` (overshoot, default 1.05),
    ``beta`` (backward step, default 0.9), ``seed`` (default 0).
    """

    info = AttackInfo(norms=(Norm.LINF, Norm.L2), targeted=True, source="pyautoattack")
    parameters = {"n_iter": Param(100, int, ge=1), "n_restarts": Param(1, int, ge=1),
                  "n_target_classes": Param(None, int, ge=1), "alpha_max": Param(0.1, float, gt=0),
                  "eta": Param(1.05, float, gt=0), "beta": Param(0.9, float, gt=0), "seed": SEED}

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                 num_classes: int) -> torch.Tensor:
        from pyautoattack.fab_pt import FABAttack_PT

        p = self.params
        attack = FABAttack_PT(model, norm=_norm(threat), n_restarts=p["n_restarts"], n_iter=p["n_iter"],
                              eps=threat.eps, alpha_max=p["alpha_max"], eta=p["eta"], beta=p["beta"],
                              verbose=False, seed=p["seed"], targeted=True, device=x.device,
                              n_target_classes=self._targets(num_classes))
        return attack.perturb(x, y)


@register_attack("square")
class Square(_PyAutoAttack):
    """Square Attack (Andriushchenko et al., 2020), via pyautoattack ``SquareAttack``.

    Score-based black-box random search with square-shaped updates on the margin loss; uses
    forward passes only (one query per step per example still alive).

    Parameters: ``n_queries`` (default 5000, as AutoAttack), ``p_init`` (initial fraction of
    pixels changed, default 0.8), ``n_restarts`` (default 1), ``rescale_schedule`` (adapt the
    ``p`` schedule to ``n_queries``; default False, as AutoAttack, whose schedule is tuned for
    10000 queries), ``seed`` (default 0).
    """

    info = AttackInfo(norms=(Norm.LINF, Norm.L2), needs_grad=False, source="pyautoattack")
    parameters = {"n_queries": Param(5000, int, ge=1), "p_init": Param(0.8, float, gt=0),
                  "n_restarts": Param(1, int, ge=1), "rescale_schedule": Param(False, bool), "seed": SEED}

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                 num_classes: int) -> torch.Tensor:
        from pyautoattack.square import SquareAttack

        p = self.params
        attack = SquareAttack(model, norm=_norm(threat), n_queries=p["n_queries"], eps=threat.eps,
                              p_init=p["p_init"], n_restarts=p["n_restarts"], seed=p["seed"], verbose=False,
                              loss="margin", resc_schedule=p["rescale_schedule"], device=x.device)
        with torch.no_grad():  # gradient-free: no autograd graph for its thousands of queries
            return attack.perturb(x, y)


VERSIONS = ("standard", "plus", "rand")


@register_attack("autoattack")
class AutoAttackSuite(_PyAutoAttack):
    """AutoAttack (Croce and Hein, 2020), via pyautoattack ``AutoAttack.run_standard_evaluation``.

    Runs its attacks in sequence, each on the examples still robust; the result is the
    per-example worst case. Versions (AutoAttack's ``_set_version``):

    * ``standard`` (default): apgd-ce (1 restart), apgd-t (1 restart, 9 targets), fab-t
      (1 restart, 9 targets), square (5000 queries, 1 restart).
    * ``plus``: apgd-ce, apgd-dlr (5 restarts each), fab (untargeted, 5 restarts), square
      (5000 queries), apgd-t, fab-t (1 restart, 9 targets each).
    * ``rand`` (randomized defenses): apgd-ce, apgd-dlr with 1 restart and ``eot_iter`` 20; no
      randomness check. Robustness is still decided on a single stochastic forward pass.

    Target counts are capped at ``min(9, C - 1)``. Components that cannot run on the model's
    class count are left out rather than failing the suite: apgd-dlr below 3 classes, apgd-t
    below 4. So on a 2-class model ``standard`` runs apgd-ce, fab-t and square, ``plus`` runs
    apgd-ce, fab, square and fab-t, and ``rand`` runs apgd-ce only. ``attacks_run(C)`` lists them.

    Parameters: ``version`` (standard | plus | rand, default standard), ``seed`` (default 0),
    ``n_iter`` (iterations of every APGD and FAB component, default 100 as AutoAttack),
    ``n_queries`` (Square's budget, default 5000 as AutoAttack). The batch size is the whole
    input; the device is the input's.
    """

    info = AttackInfo(norms=(Norm.LINF, Norm.L2), source="pyautoattack")
    parameters = {"version": Param("standard", str, choices=VERSIONS), "seed": SEED, "n_iter": Param(100, int, ge=1),
                  "n_queries": Param(5000, int, ge=1)}

    def attacks_run(self, num_classes: int) -> list[str]:
        """The components this suite runs on a model with ``num_classes`` classes, in order."""
        planned = {
            "standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
            "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
            "rand": ["apgd-ce", "apgd-dlr"],
        }[self.params["version"]]
        return [a for a in planned if num_classes >= MIN_CLASSES[a]]

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
                 num_classes: int) -> torch.Tensor:
        from pyautoattack import AutoAttack
        from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
        from pyautoattack.fab_pt import FABAttack_PT

        p = self.params
        version, seed, n_iter, norm = p["version"], p["seed"], p["n_iter"], _norm(threat)
        aa = AutoAttack(model, device=x.device, eps=threat.eps, norm=norm, seed=seed, version=version)
        aa.verbose = False
        if n_iter != 100:
            # APGD derives its step-size checkpoints from n_iter at construction: rebuild the
            # components as AutoAttack's constructor does, then re-apply the version's settings
            logger = logging.getLogger(AA_LOGGER)
            aa.apgd = APGDAttack(model, n_restarts=5, n_iter=n_iter, verbose=False, eps=threat.eps, norm=norm,
                                 eot_iter=1, rho=.75, seed=seed, device=x.device, logger=logger)
            aa.apgd_targeted = APGDAttack_targeted(model, n_restarts=1, n_iter=n_iter, verbose=False,
                                                   eps=threat.eps, norm=norm, eot_iter=1, rho=.75, seed=seed,
                                                   device=x.device, logger=logger)
            aa.fab = FABAttack_PT(model, n_restarts=5, n_iter=n_iter, eps=threat.eps, seed=seed, norm=norm,
                                  verbose=False, device=x.device)
            aa._set_version(version)
        aa.square.n_queries = p["n_queries"]
        aa.apgd_targeted.n_target_classes = max_targets(num_classes)
        aa.fab.n_target_classes = max_targets(num_classes)
        aa.attacks_to_run = self.attacks_run(num_classes)
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv

"""Randomized smoothing: Cohen, Rosenfeld and Kolter (2019), CERTIFY and PREDICT.

The smoothed classifier is g(x) = argmax_c P[f(x + e) = c] with e ~ N(0, sigma^2 I) in pixel
space (images in [0, 1]; the model normalizes internally, so sigma is in pixel units). If the base
classifier f is itself random (HyCAS, DDS), its randomness is drawn fresh for every sample and is
part of the probability: the guarantee is about g defined with both. A model that declares
``adds_smoothing_noise`` (DDS: the noise enters through the diffusion forward process) draws the
Gaussian noise itself, at its declared ``sigma`` or above; the certifier then adds none of its own
(:func:`input_noise_sigma`) and certifies at the model's ``sigma``.

See docs/certification.md for the guarantee, the sampling details and the sequential variant.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from bench.capabilities import capability, shares_randomness
from bench.certifiers.base import ALPHA, Certificate, Certifier, CertifierInfo
from bench.certifiers.sampler import PackedSampler, auto_batch, input_noise_sigma, stream_seeds
from bench.certifiers.stats import (
    ClopperPearsonLooks,
    binomial_pvalue,
    clopper_pearson_lower,
    geometric_looks,
    smoothing_radius,
)
from bench.errors import BenchError
from bench.models.compiled import COMPILE, CompileCache
from bench.params import Param
from bench.registry import register_certifier

__all__ = ["Smoothing", "auto_batch", "certify_counts", "certify_window", "input_noise_sigma", "predict",
           "sample_counts"]

SIGMA = Param(None, float, gt=0)  # the smoothing noise level; default: the model's declared sigma


def sample_counts(model: nn.Module, x: torch.Tensor, num: int, sigma: float, batch: int | None = None,
                  amp: bool = False, compile: bool | str = "auto", cache: CompileCache | None = None) -> torch.Tensor:
    """Votes of the base classifier under ``num`` Gaussian samples per example: an (N, K) tensor.

    One round of ``num`` samples per example through :class:`~bench.certifiers.sampler.PackedSampler`
    (samples of several examples share a forward pass of ``batch`` rows; each example's noise
    comes from its own stream; a randomized model with shared randomness is sampled one row per
    example per pass; a model that adds its own smoothing noise gets the clean input). Runs under
    ``torch.inference_mode``; ``amp`` runs the forward pass in bfloat16 autocast on CUDA (the vote
    counting stays exact; see docs/certification.md for the check that it does not bias the
    votes). ``compile`` (``auto``, True, False) runs a deterministic model through
    ``torch.compile`` (:mod:`bench.models.compiled`; ``auto``: on a CPU, for calls of at least
    200,000 samples); the noise is drawn eagerly either way, from the same streams, and votes are
    counted the same way. ``cache`` keeps the compiled model across calls (the certifier owns one);
    without it a call compiles for itself.
    """
    votes: list[torch.Tensor | None] = [None] * len(x)

    def keep(example: int, counts: torch.Tensor) -> int:
        votes[example] = counts
        return 0

    if num >= 1 and len(x):
        PackedSampler(model, x, sigma, width=batch, amp=amp, compile=compile, cache=cache,
                      expected=len(x) * num).run(lambda _: num, keep)
    if any(v is None for v in votes) or not votes:
        raise BenchError("smoothing: no samples drawn")
    return torch.stack(votes)  # type: ignore[arg-type]


def certify_counts(selection: torch.Tensor, estimation: torch.Tensor, alpha: float,
                   sigma: float) -> list[tuple[int | None, float, int, float]]:
    """CERTIFY from vote counts: (prediction or None, radius, n_A, p_A lower bound) per example."""
    out: list[tuple[int | None, float, int, float]] = []
    n = int(estimation[0].sum())
    for sel, est in zip(selection, estimation):
        c_a = int(sel.argmax())
        n_a = int(est[c_a])
        p_lower = clopper_pearson_lower(n_a, n, alpha)
        if p_lower <= 0.5:
            out.append((None, 0.0, n_a, p_lower))
        else:
            out.append((c_a, smoothing_radius(p_lower, sigma), n_a, p_lower))
    return out


def predict(model: nn.Module, x: torch.Tensor, sigma: float, n: int = 1000, alpha: float = 0.001,
            batch: int | None = None) -> list[int | None]:
    """Cohen et al.'s PREDICT: the top class of ``n`` noisy samples, or ``None`` (abstain) unless a
    two-sided binomial test separates the two largest counts at level ``alpha``. A returned class
    differs from g(x) with probability at most ``alpha``."""
    counts = sample_counts(model, x, n, sigma, batch)
    out: list[int | None] = []
    for row in counts:
        top2 = torch.topk(row, min(2, len(row)))
        n_a = int(top2.values[0])
        n_b = int(top2.values[1]) if len(row) > 1 else 0
        out.append(int(top2.indices[0]) if binomial_pvalue(n_a, n_a + n_b) <= alpha else None)
    return out


WINDOW = 16  # examples a run certifies together for a randomized model; each may take 100,000 samples
# a model that shares its randomness across a pass is sampled one row per example per pass, so its
# passes are only as wide as the examples in flight: it is certified 128 at a time
SHARED_WINDOW = 128
# a deterministic model's certificates depend only on each example's own noise stream, so a run
# can hand over many examples at once (the decided ones are stored as they come): the queue from
# which the sampler refills the rows of decided examples
STREAM_WINDOW = 256


def certify_window(model: nn.Module) -> int:
    """How many examples a run hands the certifier at once (they share its forward passes):
    :data:`STREAM_WINDOW` for a deterministic model (stored as they are decided), else
    :data:`SHARED_WINDOW` for a model that shares its randomness across a pass, else
    :data:`WINDOW` (stored together: the internal draws of a randomized model depend on which
    examples share the passes, so only a whole window resumes to the same certificates)."""
    if streams(model):
        return STREAM_WINDOW
    return SHARED_WINDOW if shares_randomness(model) else WINDOW


def streams(model: nn.Module) -> bool:
    """Whether the certificates of ``model`` depend only on each example's key and the call's seed
    (a deterministic model: its votes depend only on the example's noise stream)."""
    return not bool(capability(model, "randomized"))


FIRST_ROUND = 1000  # sequential rounds: 1,000 samples, then 1.25x the previous round (overshoot of a stop: < 25 %)
GROWTH = 1.25
# futility projects the remaining votes at the one-sided upper Clopper-Pearson bound at this level
# (a stopping rule, not a guarantee: it trades samples against how often a borderline example
# stops one grid radius lower than fixed n would have certified; docs/certification.md)
FUTILITY_LEVEL = 0.05


def grid_thresholds(radii: Sequence[float], sigma: float) -> list[float]:
    """The p_A each grid radius needs, in increasing order of the radii: 1/2 for radius 0 (the
    bound must exceed it), Phi(r / sigma) for r > 0 (the bound must reach it); see :func:`_grid_level`."""
    return [0.5 if r == 0 else _phi(r / sigma) for r in sorted(float(r) for r in radii)]


def _grid_level(p: float, thresholds: list[float]) -> int:
    """How many grid radii a p_A bound certifies (radius 0 needs p > 1/2, radius r > 0 needs
    p >= Phi(r / sigma))."""
    return sum(1 for t in thresholds if (p > t if t == 0.5 else p >= t))


@register_certifier("smoothing")
class Smoothing(Certifier):
    """Randomized smoothing (Cohen et al. 2019): L2 certificates for g(x) = argmax_c P[f(x+e) = c].

    **Guarantee.** For each example, with probability at least 1 - alpha over the sampling, either
    the certifier abstains or g predicts the returned class everywhere in the L2 ball of the
    returned radius sigma * Phi^-1(p_A_lower) (Cohen et al., Theorem 1 with p_B = 1 - p_A).

    CERTIFY: ``n0`` samples select the class, ``n`` separate samples estimate p_A with a one-sided
    Clopper-Pearson bound at level ``alpha``; abstain when the bound is at most 1/2.
    ``sequential=True`` replaces the fixed ``n`` by rounds that end at looks fixed in advance,
    each with a Clopper-Pearson bound at alpha / (number of looks), and stops at the first look
    where the radius grid level is decided (at most ``n`` samples; same guarantee).

    Parameters: ``sigma`` (default: the model's declared ``sigma``), ``n0`` (100), ``n`` (100,000),
    ``alpha`` (0.001), ``batch`` (noise samples per forward pass; default sized from the input),
    ``sequential`` (False), ``radii`` (the grid the sequential rule decides; the harness passes the
    run's radius grid), ``amp`` (bfloat16 autocast on CUDA; default False), ``compile`` (``auto``:
    a deterministic model is compiled with ``torch.compile`` on a CPU for large sampling calls;
    True/False force it on or off; :mod:`bench.models.compiled`).
    """

    info = CertifierInfo(norm="L2", statistical=True, summary="Cohen et al. CERTIFY (Clopper-Pearson)")
    parameters = {"sigma": SIGMA, "n0": Param(100, int, ge=1), "n": Param(100_000, int, ge=1), "alpha": ALPHA,
                  "batch": Param(None, int, ge=1), "sequential": Param(False, bool),
                  "radii": Param(None, list, item=Param(0.0, float, ge=0)), "amp": Param(False, bool),
                  "compile": COMPILE}

    @property
    def compile_cache(self) -> CompileCache:
        """This certifier's compiled model, kept across its sampling calls."""
        if "_compile_cache" not in self.__dict__:
            self._compile_cache = CompileCache()
        return self._compile_cache

    def prepare(self, model: nn.Module) -> dict[str, Any]:
        self.require_single_label(model)
        if capability(model, "adds_smoothing_noise"):
            own, given = capability(model, "sigma"), self.params["sigma"]
            if own is None:
                raise BenchError("smoothing: the model adds its own smoothing noise but declares no sigma")
            if given is not None and not math.isclose(float(given), float(own), rel_tol=1e-9, abs_tol=0.0):
                raise BenchError(f"smoothing: this model adds its own smoothing noise at sigma {float(own):g}; "
                                 f"--sigma {float(given):g} cannot change it (build the model with that sigma)")
        sigma = self.params["sigma"] if self.params["sigma"] is not None else capability(model, "sigma")
        if sigma is None:
            raise BenchError("smoothing: the model declares no sigma (it was not trained with Gaussian noise); "
                             "give one with --sigma")
        self.sigma = SIGMA.check(f"certifier '{self.name}'", "sigma", sigma)  # the model's may be anything
        described = {"certifier": "smoothing", "sigma": self.sigma, "window": certify_window(model),
                     "streamed": streams(model), "n0": int(self.params["n0"]),
                     "n": int(self.params["n"]), "alpha": float(self.params["alpha"]),
                     "sequential": bool(self.params["sequential"]), "amp": bool(self.params["amp"])}
        if described["sequential"]:  # runs stored with the earlier confidence sequence do not resume with this
            described["sequential_bound"] = f"clopper-pearson at {len(sequential_looks(described['n']))} looks"
        return described

    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> list[Certificate]:
        out: list[Certificate | None] = [None] * len(x)
        for j, certificate in self.certify_each(model, x, y):
            out[j] = certificate
        return out  # type: ignore[return-value]

    def certify_each(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *,
                     keys: Sequence[int] | None = None, planned: int | None = None
                     ) -> Iterator[tuple[int, Certificate]]:
        """Certificates as examples are decided. Each example's noise stream is seeded by one draw
        of torch's generator and its key (default: its position), so for a deterministic model a
        certificate depends on nothing else. ``seconds`` of a certificate: the call's time so far
        per example decided so far."""
        if not hasattr(self, "sigma"):
            self.prepare(model)
        p = self.params
        started = time.perf_counter()
        n0, n = int(p["n0"]), int(p["n"])
        rounds = _SequentialRounds(self, len(x)) if p["sequential"] else _FixedRounds(self, len(x))
        seeds = stream_seeds(keys if keys is not None else range(len(x)))
        sampler = PackedSampler(model, x, self.sigma, width=int(p["batch"]) if p["batch"] else None,
                                amp=bool(p["amp"]), compile=p["compile"], cache=self.compile_cache, seeds=seeds,
                                expected=max(len(x), planned or 0) * (n0 + n))
        decided = 0
        for examples in sampler.finishing(lambda _: n0, rounds.after):
            decided += len(examples)
            seconds = (time.perf_counter() - started) / decided
            for j in examples:
                c, r, n_a, b, used = rounds.result(j)
                yield j, Certificate(prediction=c, radius=r, samples=n0 + used, count_a=n_a, bound=b,
                                     seconds=seconds)


Outcome = tuple[int | None, float, int, float, int]  # prediction, radius, n_A, p_A lower bound, samples after n0


class _FixedRounds:
    """CERTIFY's two rounds per example: ``n0`` samples select the class, ``n`` estimate p_A."""

    def __init__(self, certifier: Smoothing, size: int) -> None:
        self.n, self.alpha, self.sigma = int(certifier.params["n"]), float(certifier.params["alpha"]), certifier.sigma
        self.selection: list[torch.Tensor | None] = [None] * size
        self.estimation: list[torch.Tensor | None] = [None] * size

    def after(self, example: int, votes: torch.Tensor) -> int:
        if self.selection[example] is None:
            self.selection[example] = votes
            return self.n
        self.estimation[example] = votes
        return 0

    def result(self, example: int) -> Outcome:
        selection, estimation = self.selection[example], self.estimation[example]
        assert selection is not None and estimation is not None, "the example's rounds are not over"
        ((c, r, n_a, b),) = certify_counts(selection[None], estimation[None], self.alpha, self.sigma)
        return c, r, n_a, b, self.n


def sequential_looks(n: int) -> list[int]:
    """The estimation sample counts at which sequential certification may stop (at most ``n``):
    fixed by ``n`` alone, before any data."""
    return geometric_looks(FIRST_ROUND, GROWTH, n)


class _SequentialRounds:
    """Sequential estimation: per example, rounds ending at the looks of :func:`sequential_looks`
    (1,000 samples, then rounds 1.25x larger, ``n`` at most), until the grid level is decided.

    The bound is :class:`ClopperPearsonLooks`: at each look the one-sided Clopper-Pearson bound
    at level alpha / L (L looks), the largest so far reported. By the union bound every look's
    bound holds at once with probability >= 1 - alpha, so stopping at a look chosen from the
    data keeps the guarantee (docs/certification.md). Each example's rounds depend only on its
    own votes: when the others stop does not matter.
    """

    def __init__(self, certifier: Smoothing, size: int) -> None:
        p = certifier.params
        self.sigma, self.alpha, self.n_max = certifier.sigma, float(p["alpha"]), int(p["n"])
        self.thresholds = grid_thresholds(p["radii"] or (0.0,), self.sigma)
        self.classes: list[int | None] = [None] * size
        looks = sequential_looks(self.n_max)
        self.bounds = [ClopperPearsonLooks(looks, self.alpha) for _ in range(size)]

    def after(self, example: int, votes: torch.Tensor) -> int:
        bound = self.bounds[example]
        if self.classes[example] is None:  # the selection round
            self.classes[example] = int(votes.argmax())
        else:
            bound.update(int(votes[self.classes[example]]), int(votes.sum()))
            if not self._undecided(bound):
                return 0
        return bound.next_look()

    def _undecided(self, bound: ClopperPearsonLooks) -> bool:
        """Whether the grid level is still open and reachable. Futility: the bound at the last
        look if the remaining samples voted for c_A at the rate of a one-sided 95 % upper bound on
        the votes so far must certify more grid radii than the bound has now. (A stopping rule
        never affects validity; this one also covers "the upper bound is below the next grid
        threshold", since the projected bound is below that rate.)"""
        if bound.done:
            return False
        k, n = bound.k, bound.n
        rate = 1.0 - clopper_pearson_lower(n - k, n, FUTILITY_LEVEL)
        best_k = k + math.floor((self.n_max - n) * rate)
        reachable = clopper_pearson_lower(best_k, self.n_max, bound.level)
        return _grid_level(bound.lower(), self.thresholds) < _grid_level(reachable, self.thresholds)

    def result(self, example: int) -> Outcome:
        c_a, bound = self.classes[example], self.bounds[example]
        lower = bound.lower()
        if lower <= 0.5:
            return None, 0.0, bound.k, lower, bound.n
        return c_a, smoothing_radius(lower, self.sigma), bound.k, lower, bound.n


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))



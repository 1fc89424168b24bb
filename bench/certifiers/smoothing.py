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
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from bench.capabilities import capability, shares_randomness
from bench.certifiers.base import ALPHA, Certificate, Certifier, CertifierInfo
from bench.certifiers.stats import (
    BetaBinomialConfidenceSequence,
    binomial_pvalue,
    clopper_pearson_lower,
    cs_lower_bound,
    smoothing_radius,
)
from bench.errors import BenchError
from bench.models.compiled import COMPILE, CompileCache, wants_compile
from bench.params import Param
from bench.registry import register_certifier

__all__ = ["Smoothing", "auto_batch", "certify_counts", "input_noise_sigma", "predict", "sample_counts"]

SIGMA = Param(None, float, gt=0)  # the smoothing noise level; default: the model's declared sigma


def auto_batch(x: torch.Tensor) -> int:
    """Noise samples per forward pass. On a GPU: about 4M input values, between 400 and 10,000
    samples (large passes fill the device). On a CPU: 512 (measured for the eager and the
    compiled model, 1x8x8 and 3x32x32 inputs: 2,048 samples per pass ran 25-40 % slower, their
    activations no longer fit in the caches)."""
    if x.device.type == "cpu":
        return 512
    per_sample = max(1, x[0].numel())
    return int(min(10_000, max(400, (1 << 22) // per_sample)))


def input_noise_sigma(model: nn.Module, sigma: float) -> float:
    """The std of the Gaussian noise a sampler must add to the input: ``sigma``, or 0 for a model
    that declares ``adds_smoothing_noise`` (it draws fresh smoothing noise at every pass itself)."""
    return 0.0 if capability(model, "adds_smoothing_noise") else sigma


def sample_counts(model: nn.Module, x: torch.Tensor, num: int, sigma: float, batch: int | None = None,
                  amp: bool = False, compile: bool | str = "auto", cache: CompileCache | None = None) -> torch.Tensor:
    """Votes of the base classifier under ``num`` Gaussian samples per example: an (N, K) tensor.

    Samples of several examples share a forward pass (rows are laid out example by example), so
    small models and small ``num`` use large batches. Noise is drawn on ``x``'s device, under
    ``torch.inference_mode``; ``amp`` runs the forward pass in bfloat16 autocast on CUDA (the
    vote counting stays exact; see docs/certification.md for the check that it does not bias the
    votes). A randomized model with shared randomness is sampled one row per example per pass.
    A model that adds its own smoothing noise gets the clean input (:func:`input_noise_sigma`).
    ``compile`` (``auto``, True, False) runs a deterministic model through ``torch.compile``
    (:mod:`bench.models.compiled`; ``auto``: on a CPU, for calls of at least 200,000 samples); the
    noise is drawn eagerly either way, from the same generator, and votes are counted the same way.
    ``cache`` keeps the compiled model across calls (the certifier owns one); without it a call
    compiles for itself.
    """
    sigma = input_noise_sigma(model, sigma)
    n_examples = len(x)
    num_classes = int(capability(model, "num_classes") or 0) or None
    use_amp = amp and x.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
    counts: torch.Tensor | None = None
    with torch.inference_mode(), autocast:
        if shares_randomness(model):
            for _ in range(num):  # one sample per example per pass: fresh, independent draws
                noisy = x + sigma * torch.randn_like(x) if sigma else x
                pred = model(noisy).argmax(dim=1)
                k = num_classes or int(pred.max()) + 1
                votes = torch.nn.functional.one_hot(pred, k)
                counts = votes if counts is None else counts + votes
        else:
            total = n_examples * num
            flat = torch.zeros(0, dtype=torch.long, device=x.device)
            k = num_classes or int(model(x[:1]).shape[1])
            fast = None
            batch = batch or auto_batch(x)
            if not use_amp and wants_compile(model, x.device, total, compile):
                fast = (cache or CompileCache()).forward_for(model, _probe(x, batch, sigma))
            layout = torch.channels_last if x.device.type == "cuda" and x.ndim == 4 else torch.contiguous_format
            width = batch if fast is not None else min(batch, total)  # the compiled model has a fixed batch size
            buffer = torch.zeros((width, *x.shape[1:]), device=x.device, dtype=x.dtype).contiguous(memory_format=layout)
            for start in range(0, total, batch):
                stop = min(start + batch, total)
                noisy = buffer[:stop - start]
                if sigma:
                    noisy.normal_(0.0, sigma)  # in place: no allocation per pass
                else:
                    noisy.zero_()
                _add_examples(noisy, x, start, num)
                # the compiled model always gets the whole buffer; rows past ``stop`` are ignored
                logits = model(noisy) if fast is None else fast(buffer)[:stop - start]
                example = torch.arange(start, stop, device=x.device) // num
                part = torch.bincount(example * k + logits.argmax(dim=1), minlength=n_examples * k)
                flat = part if flat.numel() == 0 else flat + part
            counts = flat.view(n_examples, -1) if flat.numel() else None
    if counts is None:
        raise BenchError("smoothing: no samples drawn")
    return counts.long().cpu()


def _add_examples(rows: torch.Tensor, x: torch.Tensor, start: int, num: int) -> torch.Tensor:
    """Add to ``rows`` (rows ``start:start + len(rows)`` of the example-major sample layout,
    ``num`` rows per example of ``x``) each row's example, in place (no gathered copy of ``x``)."""
    position, stop = start, start + len(rows)
    while position < stop:
        end = min(stop, (position // num + 1) * num)
        rows[position - start:end - start] += x[position // num]
        position = end
    return rows


def _probe(x: torch.Tensor, batch: int, sigma: float) -> torch.Tensor:
    """A full batch of noisy copies of ``x`` for checking a compiled model, drawn from a private
    generator so the sampling draws stay the same whether or not a model gets compiled."""
    generator = torch.Generator(device=x.device).manual_seed(0)
    rows = torch.arange(batch, device=x.device) % len(x)
    noise = torch.randn((batch, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
    return x[rows] + sigma * noise


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


GROWTH = 1.25  # sequential rounds: 1,000 samples, then 1.25x the previous round (overshoot of a stop: < 25 %)
# futility projects the remaining votes at the one-sided upper Clopper-Pearson bound at this level
# (a stopping rule, not a guarantee: it trades samples against how often a borderline example
# stops one grid radius lower than fixed n would have certified; docs/certification.md)
FUTILITY_LEVEL = 0.05


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
    ``sequential=True`` replaces the fixed ``n`` by an anytime-valid confidence sequence that
    stops as soon as the radius grid level is decided (at most ``n`` samples; same guarantee).

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
        return {"certifier": "smoothing", "sigma": self.sigma, "n0": int(self.params["n0"]),
                "n": int(self.params["n"]), "alpha": float(self.params["alpha"]),
                "sequential": bool(self.params["sequential"]), "amp": bool(self.params["amp"])}

    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> list[Certificate]:
        if not hasattr(self, "sigma"):
            self.prepare(model)
        p = self.params
        started = time.perf_counter()
        batch = int(p["batch"]) if p["batch"] else None
        selection = sample_counts(model, x, int(p["n0"]), self.sigma, batch, bool(p["amp"]), p["compile"],
                                  self.compile_cache)
        if p["sequential"]:
            results = self._sequential(model, x, selection, batch)
        else:
            estimation = sample_counts(model, x, int(p["n"]), self.sigma, batch, bool(p["amp"]), p["compile"],
                                       self.compile_cache)
            results = [(c, r, n_a, b, int(p["n"])) for c, r, n_a, b in
                       certify_counts(selection, estimation, float(p["alpha"]), self.sigma)]
        seconds = (time.perf_counter() - started) / max(len(x), 1)
        return [Certificate(prediction=c, radius=r, samples=int(p["n0"]) + used, count_a=n_a, bound=b,
                            seconds=seconds) for c, r, n_a, b, used in results]

    def _sequential(self, model: nn.Module, x: torch.Tensor, selection: torch.Tensor,
                    batch: int | None) -> list[tuple[int | None, float, int, float, int]]:
        """Anytime-valid estimation: draw in growing rounds, stop once the grid level is decided.

        The failure probability alpha is split in two halves: a confidence sequence at alpha/2
        (valid at every time, so at the data-dependent stopping time), and a Clopper-Pearson
        bound at alpha/2 for the fixed time n (used only by examples that reach n). By the union
        bound the reported lower bound holds with probability >= 1 - alpha (docs/certification.md).
        """
        p = self.params
        half, n_max = float(p["alpha"]) / 2, int(p["n"])
        radii = sorted(float(r) for r in (p["radii"] or (0.0,)))
        thresholds = [0.5 if r == 0 else _phi(r / self.sigma) for r in radii]
        classes = [int(s.argmax()) for s in selection]
        sequences = [BetaBinomialConfidenceSequence(half) for _ in classes]
        active = list(range(len(x)))
        step = min(1000, n_max)
        while active:
            counts = sample_counts(model, x[active], step, self.sigma, batch, bool(p["amp"]), p["compile"],
                                   self.compile_cache)
            still = []
            for row, i in zip(counts, active):
                cs = sequences[i]
                cs.update(int(row[classes[i]]), step)
                if cs.n >= n_max:
                    continue
                # futility: the bound reachable by n if the remaining samples voted for c_A at the
                # rate of a 95 % upper confidence bound (a stopping rule never affects validity)
                rate = 1.0 - clopper_pearson_lower(cs.n - cs.k, cs.n, FUTILITY_LEVEL)
                best_k = cs.k + math.floor((n_max - cs.n) * rate)
                reachable = max(cs_lower_bound(best_k, n_max, half), clopper_pearson_lower(best_k, n_max, half))
                level = _grid_level(cs.lower(), thresholds)
                if level < min(_grid_level(cs.upper(), thresholds), _grid_level(reachable, thresholds)):
                    still.append(i)
            active = still
            if active:  # active examples have all drawn the same number; never exceed n in total
                step = min(int(step * GROWTH), n_max - sequences[active[0]].n)
        out: list[tuple[int | None, float, int, float, int]] = []
        for i, cs in enumerate(sequences):
            lower = cs.lower()
            if cs.n >= n_max:  # reached the fixed time n: the Clopper-Pearson half of alpha applies
                lower = max(lower, clopper_pearson_lower(cs.k, cs.n, half))
            if lower <= 0.5:
                out.append((None, 0.0, cs.k, lower, cs.n))
            else:
                out.append((classes[i], smoothing_radius(lower, self.sigma), cs.k, lower, cs.n))
        return out


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))



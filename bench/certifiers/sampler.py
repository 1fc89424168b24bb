"""Packed sampling for randomized smoothing: fixed-width forward passes over a queue of examples.

A certificate needs the votes of the base classifier under many noisy copies of each example, in
rounds (CERTIFY: ``n0`` samples to select the class, then ``n`` to estimate p_A; the sequential
variant: growing rounds until its decision). :class:`PackedSampler` runs the rounds of many examples
at once: every forward pass has the same width, its rows are shared out among the examples that
still owe samples, and when an example's round is done the caller decides its next round (or that
it is finished) and its rows go to the others, or to the next example of the queue.

Guarantees (docs/certification.md, "Sampling"):

* **Independent samples.** Each example's Gaussian noise comes from its own generator (seeded once
  per example), so its samples are i.i.d. N(0, sigma^2 I) whatever else shares its passes. The
  randomness of a randomized model is drawn by the model at every pass; a model that shares one
  draw across a pass (:func:`~bench.capabilities.shares_randomness`) gets at most one row per
  example per pass, so each of its samples has a draw of its own.
* **Schedule-independent votes.** For a deterministic model, an example's votes depend only on its
  own noise stream: not on the width, on which examples share its passes, on the order rounds end,
  or on the number of threads (up to float rounding in batched kernels, which can flip a vote
  only at an exact tie of two logits).
* **Nothing double counted.** A round receives exactly the samples it asked for; rows of a pass
  that no round needs are computed (the compiled model has a fixed width) but never counted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from bench.capabilities import capability, shares_randomness
from bench.models.compiled import CompileCache, wants_compile

__all__ = ["PackedSampler", "SamplerStats", "auto_batch", "input_noise_sigma"]

MASK64 = (1 << 64) - 1
# noise numbers per pass from which a CPU draws them on several threads (below, waking the threads
# costs more than it saves: 1x8x8 inputs at 512 samples a pass are 32,768 numbers, 0.2 ms)
PARALLEL_NOISE = 1 << 18
NOISE_BLOCK = 1 << 16  # numbers per call of an example's noise generator (NoiseStream)


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


def stream_seeds(keys: Iterable[int]) -> list[int]:
    """The noise-stream seed of each example named by ``keys``: one draw of torch's global generator
    mixed with the key (:func:`example_seed`), so a seeded caller gets the same streams again."""
    base = int(torch.randint(0, 1 << 62, ()).item())
    return [example_seed(base, int(key)) for key in keys]


def example_seed(base: int, key: int) -> int:
    """The seed of one example's noise stream: ``base`` and ``key`` mixed by SplitMix64's
    finalizer, so neighbouring keys give unrelated seeds."""
    z = (base + (key + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


@dataclass
class SamplerStats:
    """What a run of the sampler did: forward passes, the rows they held, the rows counted."""

    width: int
    passes: int = 0
    counted: int = 0

    @property
    def fill(self) -> float:
        """Counted rows over the rows the passes could hold (1.0: every row of every pass used)."""
        return self.counted / (self.passes * self.width) if self.passes else 0.0


class NoiseStream:
    """One example's Gaussian noise, N(0, sigma^2 I) per row: the rows come from its own
    generator in blocks shaped like ``like``, each block drawn by one call of the same size (a block
    partly used keeps its other rows for the next request). The rows an example receives are
    therefore the same sequence however its requests split it: torch's CPU ``normal_`` draws
    differently for different sizes, so drawing each segment directly would not be."""

    def __init__(self, seed: int, like: torch.Tensor, sigma: float) -> None:
        self.generator = torch.Generator(device=like.device).manual_seed(seed)
        self.like, self.sigma, self.block = like, sigma, len(like)  # ``like``: one block's shape and layout
        self.spare = like[:0]

    def take(self, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (rows shaped like the examples) with the next ``len(out)`` rows; returns it."""
        used = min(len(out), len(self.spare))
        out[:used].copy_(self.spare[:used])
        self.spare = self.spare[used:]
        while len(out) - used >= self.block:
            out[used:used + self.block].normal_(0.0, self.sigma, generator=self.generator)
            used += self.block
        if used < len(out):
            fresh = torch.empty_like(self.like).normal_(0.0, self.sigma, generator=self.generator)
            out[used:].copy_(fresh[:len(out) - used])
            self.spare = fresh[len(out) - used:]
        return out


def block_rows(x: torch.Tensor) -> int:
    """Rows per noise block: about :data:`NOISE_BLOCK` numbers (at least one row)."""
    return max(1, NOISE_BLOCK // max(1, x[0].numel()))


@dataclass
class _Lane:
    """An example admitted to the passes: its noise stream, what its current round still needs,
    and the votes of that round so far."""

    example: int
    noise: NoiseStream
    owed: int
    votes: torch.Tensor | None = None


# A round ends: ``after(example, votes of that round)`` returns the size of the example's next round
# (0: the example is finished).
RoundEnd = Callable[[int, torch.Tensor], int]


class PackedSampler:
    """Runs the sampling rounds of a queue of examples through fixed-width forward passes.

    ``x``: the examples (N, ...), on the model's device. ``sigma``: the noise level (the sampler
    adds none to a model that adds its own, :func:`input_noise_sigma`). ``width``: samples per
    pass (default :func:`auto_batch`). ``amp``: bfloat16 autocast on CUDA. ``compile``: the
    policy of :func:`~bench.models.compiled.wants_compile`, decided once from ``expected`` (the
    most samples the run can draw), so a call's decision depends on the call alone. ``seeds``: one
    per example for its noise stream (default: :func:`stream_seeds` of the examples' positions).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, sigma: float, *, width: int | None = None,
                 amp: bool = False, compile: bool | str = "auto", cache: CompileCache | None = None,
                 seeds: Sequence[int] | None = None, expected: int = 0) -> None:
        self.model, self.x = model, x
        self.sigma = input_noise_sigma(model, sigma)
        self.width = int(width or auto_batch(x))
        self.shared = shares_randomness(model)
        self.num_classes = int(capability(model, "num_classes") or 0) or None
        self.amp = amp and x.device.type == "cuda"
        self.seeds = list(seeds) if seeds is not None else stream_seeds(range(len(x)))
        if len(self.seeds) != len(x):
            raise ValueError(f"{len(self.seeds)} seeds for {len(x)} examples")
        layout = torch.channels_last if x.device.type == "cuda" and x.ndim == 4 else torch.contiguous_format
        self.buffer = torch.zeros((self.width, *x.shape[1:]), device=x.device, dtype=x.dtype) \
            .contiguous(memory_format=layout)
        self.fast = None
        if not self.amp and not self.shared and wants_compile(model, x.device, expected, compile):
            self.fast = (cache or CompileCache()).forward_for(model, _probe(x, self.width, self.sigma))
        # on a CPU the noise of a pass's examples is drawn by several threads (torch's CPU
        # generator is serial: 7 ns a number, a third of a small model's pass); a pass is spread
        # over that many examples where the queue allows
        self.lanes = max(1, min(4, torch.get_num_threads())) if x.device.type == "cpu" else 1
        self.stats = SamplerStats(self.width)
        self.block = torch.empty((block_rows(x), *x.shape[1:]), device=x.device, dtype=x.dtype) \
            .contiguous(memory_format=layout)  # the shape and layout of a noise block (not the width's)

    def run(self, first: Callable[[int], int], after: RoundEnd) -> SamplerStats:
        """Sample every example's rounds: ``first(example)`` samples, then as many as ``after``
        asks each time a round ends, until it returns 0. Examples enter in order, as passes have
        room for them."""
        for _ in self.finishing(first, after):
            pass
        return self.stats

    def finishing(self, first: Callable[[int], int], after: RoundEnd) -> Iterator[list[int]]:
        """:meth:`run`, pass by pass: yields the examples whose last round ended in each pass."""
        queue = deque(range(len(self.x)))
        active: list[_Lane] = []
        while True:
            with torch.inference_mode(), self._autocast():
                self._admit(queue, active, first)
                if not active:
                    return
                shares = self._shares(active)
                votes = self._pass(active, shares)
                ended = [lane for lane, got, row in zip(active, shares, votes)
                         if got and self._credit(lane, got, row, after)]
            for lane in ended:
                active.remove(lane)
            if ended:
                yield [lane.example for lane in ended]

    @staticmethod
    def _credit(lane: _Lane, got: int, votes: torch.Tensor, after: RoundEnd) -> bool:
        """Add a pass's ``got`` samples to ``lane``'s round; at the round's end ask ``after`` for the
        next one. Returns whether the example is finished."""
        lane.votes = votes if lane.votes is None else lane.votes + votes
        lane.owed -= got
        if lane.owed:
            return False
        lane.owed, lane.votes = max(0, int(after(lane.example, lane.votes))), None
        return lane.owed == 0

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()

    def _admit(self, queue: deque[int], active: list[_Lane], first: Callable[[int], int]) -> None:
        """Admit examples from ``queue`` while the active ones cannot fill a pass (or, on a CPU,
        are fewer than the noise threads). An example whose first round is empty is skipped."""
        while queue and self._wants_more(active):
            example = queue.popleft()
            owed = max(0, int(first(example)))
            if owed:
                noise = NoiseStream(self.seeds[example], self.block, self.sigma)
                active.append(_Lane(example, noise, owed))

    def _wants_more(self, active: list[_Lane]) -> bool:
        if self.shared:  # one row per example per pass: the width is filled by examples
            return len(active) < self.width
        return len(active) < self.lanes or sum(lane.owed for lane in active) < self.width

    def _shares(self, active: list[_Lane]) -> list[int]:
        """Rows of the next pass for each active example: one each for a model that shares its
        randomness, else the width shared out evenly (an example owing less gets what it owes, the
        others split the rest)."""
        if self.shared:
            return [1 if i < self.width else 0 for i in range(len(active))]
        shares = [0] * len(active)
        free, waiting = self.width, sorted(range(len(active)), key=lambda i: active[i].owed)
        for place, i in enumerate(waiting):
            fair = free // (len(waiting) - place)
            shares[i] = min(active[i].owed, fair)
            free -= shares[i]
        if free:  # the integer division left rows over: the largest remaining demand takes them
            for i in reversed(waiting):
                extra = min(free, active[i].owed - shares[i])
                shares[i] += extra
                free -= extra
        return shares

    def _pass(self, active: list[_Lane], shares: list[int]) -> torch.Tensor:
        """One forward pass: draw each example's rows, run the model; the votes of each active
        example in this pass, (len(active), K) on the CPU."""
        segments, start = [], 0
        for lane, share in zip(active, shares):
            segments.append((lane, start, start + share))
            start += share
        self._fill([s for s in segments if s[2] > s[1]])
        logits = self.model(self.buffer[:start]) if self.fast is None else self.fast(self.buffer)[:start]
        k = self.num_classes or int(logits.shape[1])
        owner = torch.repeat_interleave(torch.arange(len(shares), device=logits.device),
                                        torch.tensor(shares, device=logits.device))
        counts = torch.bincount(owner * k + logits.argmax(dim=1), minlength=len(shares) * k)
        self.stats.passes += 1
        self.stats.counted += start
        return counts.view(len(shares), k).long().cpu()

    def _fill(self, segments: list[tuple[_Lane, int, int]]) -> None:
        """Each segment's rows: its example plus noise from its example's own stream."""
        def draw(segment: tuple[_Lane, int, int]) -> None:
            lane, begin, end = segment
            rows = self.buffer[begin:end]
            if self.sigma:
                lane.noise.take(rows).add_(self.x[lane.example])
            else:
                rows.copy_(self.x[lane.example].expand_as(rows))

        numbers = sum(end - begin for _, begin, end in segments) * self.x[0].numel()
        if self.lanes > 1 and len(segments) > 1 and numbers >= PARALLEL_NOISE:
            list(_noise_pool(self.lanes).map(draw, segments))
        else:
            for segment in segments:
                draw(segment)


def _probe(x: torch.Tensor, batch: int, sigma: float) -> torch.Tensor:
    """A full batch of noisy copies of ``x`` for checking a compiled model, drawn from a private
    generator so the sampling draws stay the same whether or not a model gets compiled."""
    generator = torch.Generator(device=x.device).manual_seed(0)
    rows = torch.arange(batch, device=x.device) % len(x)
    noise = torch.randn((batch, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
    return x[rows] + sigma * noise


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _noise_pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``threads`` threads for drawing noise (torch releases the GIL)."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-noise")
    return _POOLS[threads]

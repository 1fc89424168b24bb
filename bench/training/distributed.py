"""The torchrun process group of a data-parallel run (``torchrun --nproc-per-node N -m bench run ...``).

torchrun starts one process per rank and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`init` joins those processes into one process group (gloo on CPU, NCCL on CUDA, one
device per local rank: ``cuda:LOCAL_RANK``). Without torchrun the world has size 1 and every
helper here is a no-op: :func:`barrier` returns at once, :func:`is_main` is true, nothing is
initialised, so a one-process run behaves exactly as it did before.

This module does not import torch at import time (the CLI's torch-free look-ups may import it);
only :func:`init`, :func:`barrier` and :func:`shutdown` do, and only in a world larger than 1.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

from bench.errors import BenchError

__all__ = ["barrier", "claimer", "from_main", "init", "is_main", "local_device", "local_rank", "main_first", "rank",
           "shutdown", "world_size"]

T = TypeVar("T")

# A barrier waits for the slowest rank; a stage's batches can take hours on one rank (certificates),
# so the process group's timeout is generous. A dead rank is noticed sooner: torchrun stops the others.
TIMEOUT = timedelta(hours=24)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise BenchError(f"invalid ${name} '{raw}': torchrun sets it to an integer") from None


def world_size() -> int:
    """The number of processes of this run (``$WORLD_SIZE``; 1 without torchrun)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank in ``0 .. world_size() - 1`` (``$RANK``; 0 without torchrun)."""
    return _env_int("RANK", 0) if world_size() > 1 else 0


def local_rank() -> int:
    """This process's rank on its machine (``$LOCAL_RANK``; 0 without torchrun)."""
    return _env_int("LOCAL_RANK", 0) if world_size() > 1 else 0


def is_main() -> bool:
    """True on rank 0, the process that prints, creates the run and saves checkpoints."""
    return rank() == 0


def local_device(device: str) -> str:
    """The device this rank computes on: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a world larger
    than 1 (one GPU per local rank); any other device (``cpu``, an explicit ``cuda:N``) is kept."""
    return f"cuda:{local_rank()}" if device == "cuda" and world_size() > 1 else device


def _initialised() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init(device: str) -> None:
    """Join this process to the torchrun process group (once; no-op in a world of size 1).

    The backend is NCCL for a CUDA device (after selecting ``cuda:LOCAL_RANK``), gloo otherwise.
    The rendezvous address comes from torchrun's environment (``MASTER_ADDR``/``MASTER_PORT``)."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise BenchError("torchrun: this PyTorch build has no torch.distributed")
    if _initialised():
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(local_device(device)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)


def barrier() -> None:
    """Wait until every rank reaches this point (no-op in a world of size 1)."""
    if world_size() == 1 or not _initialised():
        return
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def claimer(key: str) -> Callable[[], int]:
    """A function handing out 0, 1, 2, ... across every rank: each number goes to exactly one rank.

    The counter ``key`` lives in torchrun's rendezvous store (one atomic ``add`` per call), so
    ranks take the next unclaimed unit of work as soon as they are free, whatever each unit costs.
    In a world of size 1 it is a local counter. Use a fresh ``key`` for each piece of work."""
    if world_size() == 1 or not _initialised():
        count = itertools.count()
        return lambda: next(count)
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    return lambda: int(store.add(key, 1)) - 1


def shutdown() -> None:
    """Leave the process group (no-op when none was joined)."""
    if world_size() > 1 and _initialised():
        import torch.distributed as dist

        dist.destroy_process_group()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then, after a barrier, on the other ranks.

    For work whose first execution creates something the others then find (a store row, a
    cached file): rank 0 creates it, the others read it. In a world of size 1 the block just runs."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank (a decision all ranks must share, e.g. whether to train);
    ``value`` itself in a world of size 1. ``value`` must be picklable."""
    if world_size() == 1 or not _initialised():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]

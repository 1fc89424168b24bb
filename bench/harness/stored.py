"""A stored run's model and examples, reloaded exactly (for ``bench attack``, ``--escalate``,
``bench audit``). Built on :meth:`bench.harness.resolve.ResolvedRun.from_stored`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.errors import BenchError, CheckpointError
from bench.harness.resolve import ResolvedRun
from bench.progress import Progress
from bench.results.store import Store

if TYPE_CHECKING:
    from bench.data.base import Split
    from bench.models.defended import DefendedModel
    from bench.results.schema import RunRow

__all__ = ["load_model", "load_run_examples"]


def load_model(store: Store, run: RunRow, resolved: ResolvedRun) -> DefendedModel:
    """The run's model from its stored checkpoint, in eval mode on the CPU.

    The checkpoint must still hash to the sha256 recorded with the run: a changed or missing
    file is a :class:`CheckpointError` (results of two models are never mixed)."""

    from bench.training.checkpoints import load_into, read_checkpoint, sha256_file

    model_row = store.get_model(run.model_id) if run.model_id is not None else None
    if model_row is None or not model_row.checkpoint_path:
        raise BenchError(f"run {run.id} has no stored model checkpoint")
    path = model_row.checkpoint_path
    try:
        sha = sha256_file(path)
    except CheckpointError:
        raise CheckpointError(f"run {run.id}: its checkpoint {path} is gone; re-run the original command") from None
    if sha != model_row.checkpoint_sha256:
        raise CheckpointError(f"run {run.id}: checkpoint {path} changed since the run (sha256 {sha[:12]} != "
                              f"{(model_row.checkpoint_sha256 or '')[:12]}); refusing to mix results")
    model = resolved.fresh_model()
    state, _ = read_checkpoint(path)
    load_into(resolved.defense, model, state, path)
    return model.eval()


def load_run_examples(run: RunRow, resolved: ResolvedRun, progress: Progress, purpose: str) -> Split:
    """A stored run's examples, exactly: its split, subset to its stored indices."""
    import torch

    data = resolved.dataset.load(resolved.config.split, resolved.data_root, resolved.image_size, progress=progress)
    assert data.indices is not None
    wanted = torch.tensor(run.indices or [])
    positions = torch.nonzero(torch.isin(data.indices, wanted)).flatten()
    data = data.subset(positions)
    if len(data) != len(wanted):
        raise BenchError(f"run {run.id}: {len(wanted) - len(data)} of its examples are no longer in the dataset; "
                         f"cannot {purpose} it faithfully")
    return data

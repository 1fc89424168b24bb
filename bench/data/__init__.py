"""Datasets: the registry entries and their common contract (see :mod:`bench.data.base`)."""

from __future__ import annotations

from bench.data.base import Dataset, DatasetSpec, Split, get_dataset

__all__ = ["Dataset", "DatasetSpec", "Split", "get_dataset"]

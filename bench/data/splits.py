"""Leakage-free splits: grouped (no group in two splits), stratified, seeded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def grouped_stratified_split(groups: Sequence[object] | np.ndarray, strata: Sequence[object] | np.ndarray,
                             fractions: dict[str, float], seed: int) -> np.ndarray:
    """Assign every item to a split so that all items of a group share one split.

    Groups are stratified by their most common stratum (e.g. a lesion's diagnosis). Within each
    stratum the groups are shuffled with ``seed`` and each is given to the split furthest below
    its target share of that stratum's items, so every split gets about ``fractions[split]`` of
    every stratum. Returns one split name per item.
    """
    if len(groups) == 0:
        return np.asarray([], dtype=object)
    groups = np.asarray([str(g) for g in groups])
    strata = np.asarray([str(s) for s in strata])
    names = list(fractions)
    weights = np.array([fractions[n] for n in names], dtype=float)
    weights = weights / weights.sum()
    unique_groups, group_of = np.unique(groups, return_inverse=True)
    sizes = np.bincount(group_of)
    stratum_names, stratum_of = np.unique(strata, return_inverse=True)
    # the most common stratum of each group (ties: the first in sorted order)
    pairs, counts = np.unique(group_of * len(stratum_names) + stratum_of, return_counts=True)
    pair_group, pair_stratum = pairs // len(stratum_names), pairs % len(stratum_names)
    order = np.lexsort((pair_stratum, -counts, pair_group))
    first = order[np.r_[True, pair_group[order][1:] != pair_group[order][:-1]]]
    group_stratum = np.empty(len(unique_groups), dtype=object)
    group_stratum[pair_group[first]] = stratum_names[pair_stratum[first]]
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(unique_groups), dtype=object)
    for stratum in sorted(set(group_stratum)):
        members = np.flatnonzero(group_stratum == stratum)
        members = members[rng.permutation(len(members))].tolist()
        targets = (weights * sizes[members].sum()).tolist()
        filled = [0.0] * len(names)
        member_sizes = sizes[members].tolist()
        for g, size in zip(members, member_sizes):
            gaps = [t - f for t, f in zip(targets, filled)]
            k = gaps.index(max(gaps))  # the split furthest below its target (first on ties)
            assignment[g] = names[k]
            filled[k] += size
    return np.asarray(assignment[group_of], dtype=object)


def holdout(split: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Split a training :class:`~bench.data.base.Split` into (train, validation) for model selection.

    Stratified by label (multilabel: by the label set) and grouped by ``meta["groups"]`` when the
    dataset provides it (HAM10000 lesions, NIH patients), so no lesion or patient is on both sides.
    About ``fraction`` of the items go to validation; both parts keep their positions in the split.
    """
    import torch

    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    n = len(split)
    groups = split.meta.get("groups")
    if not isinstance(groups, list) or len(groups) != n:
        groups = list(range(n))
    labels = split.labels
    strata = [str(row) for row in labels.tolist()] if labels.ndim > 1 else labels.tolist()
    names = grouped_stratified_split(groups, strata, {"train": 1 - fraction, "val": fraction}, seed)
    train = torch.from_numpy(np.flatnonzero(names == "train"))
    val = torch.from_numpy(np.flatnonzero(names == "val"))
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"cannot hold out a validation split from {n} training items")
    return split.subset(train), split.subset(val)

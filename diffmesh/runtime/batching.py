"""Batching helpers shared by stages that run several callers' work in one model call.

Pure Python. A stage that batches still reports each caller's own StageUsage: the time of a
shared call is split by how much of the batch each caller's work was (`apportion`), and work
that cannot share a call is kept apart by a compatibility key (`group_indices`).
"""
from __future__ import annotations

import math
from typing import Hashable, Sequence


def apportion(total: float, sizes: Sequence[int]) -> list[float]:
    """`total` (e.g. compute milliseconds of one batched call) split in proportion to `sizes`
    (e.g. each caller's image count). The shares add up to `total` up to float rounding: the
    last share takes the remainder, so no rounding error accumulates across callers.

    ValueError for an empty `sizes`, a negative size, all sizes zero, or a negative or
    non-finite total: a share of nothing, or of a measurement that went wrong, is a bug upstream.
    """
    if not sizes:
        raise ValueError("apportion needs at least one size")
    if any(size < 0 for size in sizes):
        raise ValueError(f"sizes must be >= 0, got {list(sizes)}")
    if not math.isfinite(total) or total < 0:
        raise ValueError(f"total must be finite and >= 0, got {total}")
    whole = sum(sizes)
    if whole == 0:
        raise ValueError("sizes must not all be zero")
    shares = [total * size / whole for size in sizes[:-1]]
    shares.append(max(total - math.fsum(shares), 0.0))
    return shares


def group_indices(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices of `keys` grouped by equal key: groups in order of first appearance, indices
    ascending within each (so results can be written back in the callers' order)."""
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.values())

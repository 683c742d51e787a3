"""Batching helpers: per-caller shares of a shared call's time, and compatibility groups."""
from __future__ import annotations

import math

import pytest

from diffmesh.runtime.batching import apportion, group_indices


def test_shares_are_proportional_to_image_counts():
    assert apportion(90.0, [1, 2]) == pytest.approx([30.0, 60.0])
    assert apportion(10.0, [4]) == [10.0]
    assert apportion(12.0, [1, 1, 1, 1]) == pytest.approx([3.0] * 4)
    assert apportion(0.0, [3, 5]) == [0.0, 0.0]


@pytest.mark.parametrize("total,sizes", [
    (100.0, [1, 2, 4]),
    (0.1, [3, 3, 3]),
    (7.3, [1, 16, 2, 9, 5]),
    (1e9 / 3, [2, 7]),
])
def test_shares_add_up_to_the_total(total, sizes):
    shares = apportion(total, sizes)
    assert len(shares) == len(sizes) and all(share >= 0 for share in shares)
    assert math.fsum(shares) == pytest.approx(total, rel=1e-15, abs=1e-15)
    for share, size in zip(shares, sizes):
        assert share == pytest.approx(total * size / sum(sizes), rel=1e-12)


def test_a_job_with_no_images_gets_nothing():
    assert apportion(8.0, [0, 2, 2]) == pytest.approx([0.0, 4.0, 4.0])
    assert apportion(8.0, [2, 0]) == [8.0, 0.0]


@pytest.mark.parametrize("total,sizes", [
    (1.0, []),
    (1.0, [0, 0]),
    (1.0, [2, -1]),
    (-1.0, [1]),
    (math.nan, [1]),
    (math.inf, [1]),
])
def test_nonsense_is_refused(total, sizes):
    with pytest.raises(ValueError):
        apportion(total, sizes)


def test_groups_keep_first_appearance_order_and_ascending_indices():
    keys = [("64x64", 77, True), ("64x48", 77, True), ("64x64", 77, True), ("64x64", 154, True),
            ("64x48", 77, True)]
    assert group_indices(keys) == [[0, 2], [1, 4], [3]]
    assert group_indices([]) == []
    assert group_indices(["a", "a", "a"]) == [[0, 1, 2]]

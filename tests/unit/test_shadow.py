"""Shadow comparisons: bit-for-bit equal, close (within batch rounding) or diverged."""
from __future__ import annotations

import numpy as np

from services.orchestrator.shadow import DEFAULT_TOLERANCE, outcome, relative_difference

LATENTS = np.linspace(-40.0, 40.0, 64).reshape(1, 4, 4, 4)


def test_identical_outputs_are_equal():
    assert outcome([LATENTS], [LATENTS.copy()], DEFAULT_TOLERANCE) == ("equal", 0.0)


def test_batch_rounding_is_close_and_a_real_difference_diverges():
    rounding = LATENTS + 1e-2  # measured batch rounding of the tiny UNet: 1e-2 on latents of 20-80
    verdict, difference = outcome([LATENTS], [rounding], DEFAULT_TOLERANCE)
    assert verdict == "close" and abs(difference - 1e-2) < 1e-9
    other_scheduler = LATENTS * 0.9
    assert outcome([LATENTS], [other_scheduler], DEFAULT_TOLERANCE)[0] == "diverged"
    assert outcome([LATENTS], [rounding], 0.0)[0] == "diverged"  # tolerance 0: bit for bit only


def test_one_pixel_level_on_an_image_is_close():
    image = np.full((8, 8, 3), 200.0)
    nudged = image.copy()
    nudged[0, 0, 0] += 1
    assert outcome([image], [nudged], DEFAULT_TOLERANCE)[0] == "close"
    nudged[0, 0, 0] += 4
    assert outcome([image], [nudged], DEFAULT_TOLERANCE)[0] == "diverged"


def test_the_worst_output_decides_and_shapes_must_match():
    zeros = np.zeros((2, 2))
    assert relative_difference([LATENTS, zeros], [LATENTS, zeros + 1e-9]) == float("inf")
    assert relative_difference([LATENTS], [LATENTS[..., :2]]) == float("inf")
    assert outcome([LATENTS], [LATENTS, LATENTS], DEFAULT_TOLERANCE)[0] == "diverged"

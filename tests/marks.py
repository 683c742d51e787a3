"""Comparing returned images with references, given that every returned image of 256x256 or more
carries an invisible watermark (the safety stage's last pixel step).

The reference gets the same mark (`as_returned`): the payload is in the reply's marking, and
dwtDctSvd is deterministic, so identical pixels mark identically. dwtDctSvd works on 8x8 pixel
blocks (a 4x4 block of the Haar LL band) and quantises each block's largest singular value in
steps of 36: two images that differ by 1/255 somewhere in a block usually mark within 1/255 of
each other there, but a block whose value sits at a step boundary lands on the other side, a
full step apart. The checks here therefore hold the tolerance pixel by pixel and allow only a
small share of such blocks (5 %; measured: 2.7 % of the face blocks when the six faces of t1.jpg
are detailed one at a time vs batched, whose pixels differ by at most 1/255 before the mark); a
real difference in the generation moves most blocks.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from services.safety.watermark import Watermarker

BLOCK = 8


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def as_returned(reference: np.ndarray, marking) -> np.ndarray:
    """The reference as the mesh would return it: watermarked with the reply's payload."""
    if not marking.watermarked:
        return reference
    marker = Watermarker(marking.watermark_method, marking.watermark_bits)
    return marker.embed(np.ascontiguousarray(reference), bytes.fromhex(marking.watermark_payload)).image


def block_any(mask: np.ndarray) -> np.ndarray:
    """Per pixel: whether its 8x8 block holds any True of `mask`."""
    height, width = mask.shape
    padded = np.zeros((-(-height // BLOCK) * BLOCK, -(-width // BLOCK) * BLOCK), bool)
    padded[:height, :width] = mask
    blocks = padded.reshape(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // BLOCK, BLOCK).any(axis=(1, 3))
    return np.repeat(np.repeat(blocks, BLOCK, 0), BLOCK, 1)[:height, :width]


def assert_close_by_blocks(got: np.ndarray, expected: np.ndarray, where: np.ndarray | None = None,
                           tolerance: int = 1, max_step_blocks: float = 0.05) -> float:
    """got within `tolerance` of expected (two marked images), except in at most `max_step_blocks`
    of the 8x8 blocks (watermark step flips, see the module docstring). Returns that share."""
    over = (np.abs(got.astype(int) - expected.astype(int)) > tolerance).any(axis=2)
    if where is not None:
        over &= where
    region = block_any(np.ones(got.shape[:2], bool) if where is None else where)
    flipped = block_any(over)
    share = flipped[::BLOCK, ::BLOCK].sum() / max(region[::BLOCK, ::BLOCK].sum(), 1)
    assert share <= max_step_blocks, f"{share:.1%} of the 8x8 blocks differ by more than {tolerance}"
    return float(share)


def assert_close_as_returned(got: np.ndarray, reference: np.ndarray, marking, where: np.ndarray | None = None,
                             tolerance: int = 1, max_step_blocks: float = 0.05) -> float:
    """got (a returned image) within `tolerance` of the reference marked as the reply was; an
    unmarked reply (under 256x256) must match everywhere."""
    expected = as_returned(reference, marking)
    if not marking.watermarked:
        over = np.abs(got.astype(int) - expected.astype(int)) > tolerance
        assert not (over.any(axis=2) & (True if where is None else where)).any(), "difference without a watermark"
        return 0.0
    return assert_close_by_blocks(got, expected, where, tolerance, max_step_blocks)

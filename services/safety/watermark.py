"""Invisible watermark: a payload tied to the request, embedded in the pixels with the
invisible-watermark library (imwatermark), and checked against a bit threshold.

Methods (both from imwatermark):
- "dwtDctSvd" (default): the payload goes into the SVD of 4x4 DCT blocks of the Haar-DWT
  approximation of the U (chroma) channel, repeated over the whole image. On CPU, 512x512: embed
  ~0.12 s, decode ~0.07 s. Survives JPEG q80; survives a resize only when the image is scaled back
  to its original size before decoding (at the smaller size the blocks no longer line up and
  decoding is chance), so `verify` takes the original size, which the C2PA manifest records.
- "rivaGan": a learned encoder/decoder (ONNX files shipped in the wheel), 32 bits exactly; on CPU
  (2 cores), 512x512: embed ~2.2-2.8 s, decode ~2.5-3 s. Survives resizes better (scaling back to
  the original size still adds a bit or two, so `verify` scales back for both methods).

Payload (`payload_for`): the first `bits` bits of SHA-256 over the request id's UTF-8 bytes. Anyone
holding a request id can recompute it; it carries no prompt or caller data, and a payload read from
an image can be matched to a request id only by recomputing, not reversed.

Detection (`verify`): an unmarked image decodes to some bit string d; against a payload p that is
uniformly random and independent of the image (SHA-256 output), the number of agreeing bits is
Binomial(bits, 1/2) whatever d is. The false-positive probability of a threshold t is therefore the
binomial tail P(X >= t) = sum_{k>=t} C(bits, k) / 2^bits; for the default 29 of 32 that is
5489 / 2^32 = 1.28e-6 per (image, payload) check. The default threshold for other payload sizes is
the smallest t whose tail is <= DEFAULT_FALSE_POSITIVE_TARGET (all bits where none reaches it:
8 bits gives 1/256, 16 bits 1.5e-5). The tail holds over random payloads; a particular payload can
fare worse on images whose decoded bits are biased (a payload of all zeros against flat images).

Images with either side under 256 pixels are returned unmarked with a reason (the library raises on
images under 256x256 pixels in area, and blocks that few carry too little redundancy to survive).
Images dominated by flat, saturated black or white (binary silhouettes, flat logos) do not take
the mark: chroma shifts on pure black/white pixels clip when converted back to RGB.
imwatermark works on BGR (cv2) arrays; this module takes and returns RGB.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from math import comb

import cv2
import numpy as np
from imwatermark import WatermarkDecoder, WatermarkEncoder

METHODS = ("dwtDctSvd", "rivaGan")
RIVAGAN_BITS = 32                         # the only payload size the rivaGan models carry
MIN_SIDE = 256
SMALL_IMAGE_REASON = "image smaller than 256x256: no invisible watermark"
DEFAULT_FALSE_POSITIVE_TARGET = 2e-6      # gives 29 of 32


class ImageTooSmall(ValueError):
    """The image (after any scaling back) has a side under MIN_SIDE: it carries no watermark."""


@dataclass(frozen=True)
class MarkResult:
    image: np.ndarray      # RGB uint8: the marked image, or the input unchanged when not marked
    marked: bool
    reason: str = ""       # why not marked ("" when marked)


@dataclass(frozen=True)
class WatermarkCheck:
    present: bool          # matching_bits >= threshold
    matching_bits: int
    bits: int
    threshold: int

    @property
    def false_positive_probability(self) -> float:
        """Chance that an unmarked image reaches this check's threshold (binomial tail)."""
        return false_positive_probability(self.threshold, self.bits)


def payload_for(request_id: str, bits: int = 32) -> bytes:
    """The first `bits` bits (a multiple of 8) of SHA-256(request_id as UTF-8)."""
    _check_bits(bits)
    return hashlib.sha256(request_id.encode("utf-8")).digest()[: bits // 8]


def false_positive_probability(threshold: int, bits: int) -> float:
    """P(X >= threshold) for X ~ Binomial(bits, 1/2): an unmarked image against a random payload."""
    if threshold <= 0:
        return 1.0
    return sum(comb(bits, k) for k in range(threshold, bits + 1)) / 2 ** bits


def default_threshold(bits: int, target: float = DEFAULT_FALSE_POSITIVE_TARGET) -> int:
    """The smallest bit count whose false-positive probability is <= target (all bits if none is)."""
    for threshold in range(bits + 1):
        if false_positive_probability(threshold, bits) <= target:
            return threshold
    return bits


class Watermarker:
    """Embeds and checks one method's watermark; cheap to call from many requests (no state per
    call; rivaGan's ONNX sessions are loaded once per process by the library)."""

    def __init__(self, method: str = "dwtDctSvd", bits: int = 32, threshold: int | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"watermark method {method!r}: expected one of {', '.join(METHODS)}")
        _check_bits(bits)
        if method == "rivaGan" and bits != RIVAGAN_BITS:
            raise ValueError(f"rivaGan carries exactly {RIVAGAN_BITS} bits, not {bits}")
        self.threshold = default_threshold(bits) if threshold is None else threshold
        if not 0 < self.threshold <= bits:
            raise ValueError(f"watermark threshold {self.threshold}: expected 1..{bits}")
        self.method = method
        self.bits = bits
        if method == "rivaGan":
            WatermarkEncoder.loadModel()   # a no-op once loaded: the sessions are class attributes

    def payload_for(self, request_id: str) -> bytes:
        return payload_for(request_id, self.bits)

    def embed(self, image: np.ndarray, payload: bytes) -> MarkResult:
        """`image` (H x W x 3 RGB uint8) carrying `payload`; unmarked with a reason when too small."""
        _check_image(image)
        if len(payload) * 8 != self.bits:
            raise ValueError(f"watermark payload of {len(payload) * 8} bits: this watermarker carries {self.bits}")
        if min(image.shape[:2]) < MIN_SIDE:
            return MarkResult(image, marked=False, reason=SMALL_IMAGE_REASON)
        encoder = WatermarkEncoder()
        encoder.set_watermark("bytes", payload)
        bgr = encoder.encode(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), self.method)
        return MarkResult(np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), marked=True)

    def decode(self, image: np.ndarray, expected_size: tuple[int, int] | None = None) -> np.ndarray:
        """The `bits` bits read from `image` (RGB uint8), as a uint8 array of 0/1.

        expected_size: the original (width, height); an image of another size is scaled back to it
        first (the blocks the bits live in only line up again at the original size). ImageTooSmall
        when the image to decode has a side under 256."""
        _check_image(image)
        height, width = image.shape[:2]
        if expected_size is not None and tuple(expected_size) != (width, height):
            target_width, target_height = expected_size
            # Enlarging: cubic keeps the block structure sharpest; shrinking: area averaging avoids aliasing.
            interpolation = cv2.INTER_CUBIC if target_width * target_height > width * height else cv2.INTER_AREA
            image = cv2.resize(image, (int(target_width), int(target_height)), interpolation=interpolation)
        if min(image.shape[:2]) < MIN_SIDE:
            raise ImageTooSmall(SMALL_IMAGE_REASON)
        decoder = WatermarkDecoder("bits", self.bits)
        bits = decoder.decode(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), self.method)
        return np.asarray(bits, dtype=np.uint8).reshape(self.bits)

    def verify(self, image: np.ndarray, payload: bytes, expected_size: tuple[int, int] | None = None) -> WatermarkCheck:
        """Whether `image` carries `payload`: at least `threshold` of the bits agree. An image too
        small to carry a mark is reported absent with no matching bits."""
        if len(payload) * 8 != self.bits:
            raise ValueError(f"watermark payload of {len(payload) * 8} bits: this watermarker reads {self.bits}")
        try:
            decoded = self.decode(image, expected_size)
        except ImageTooSmall:
            return WatermarkCheck(False, 0, self.bits, self.threshold)
        expected = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
        matching = int(np.count_nonzero(decoded == expected))
        return WatermarkCheck(matching >= self.threshold, matching, self.bits, self.threshold)


def _check_bits(bits: int) -> None:
    if bits < 8 or bits % 8:
        raise ValueError(f"watermark bits {bits}: expected a positive multiple of 8 (the payload is whole bytes)")


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB uint8 image, got {image.dtype} {image.shape}")

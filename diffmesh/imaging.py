"""Image files <-> uint8 RGB arrays (PIL), shared by the vae stage, the orchestrator and the CLI."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from diffmesh.proto.v1 import common_pb2
from diffmesh.errors import InvalidArgument

FORMATS = {
    common_pb2.PNG: ("PNG", "image/png"),
    common_pb2.JPEG: ("JPEG", "image/jpeg"),
    common_pb2.WEBP: ("WEBP", "image/webp"),
}
DEFAULT_QUALITY = 95
# Decompression-bomb guard: more pixels than the largest accepted size is refused before decoding.
MAX_DECODE_PIXELS = 64 * 1024 * 1024


def encode_image(pixels: np.ndarray, fmt: int = common_pb2.PNG, quality: int = 0,
                 png_compress_level: int = 4) -> common_pb2.EncodedImage:
    """pixels: uint8 [H, W, 3]."""
    name, mime = FORMATS.get(fmt or common_pb2.PNG, FORMATS[common_pb2.PNG])
    buffer = io.BytesIO()
    image = Image.fromarray(pixels, mode="RGB") if pixels.ndim == 3 else Image.fromarray(pixels)
    if name == "PNG":
        image.save(buffer, format=name, compress_level=png_compress_level)
    else:
        image.save(buffer, format=name, quality=quality or DEFAULT_QUALITY)
    height, width = pixels.shape[:2]
    return common_pb2.EncodedImage(data=buffer.getvalue(), mime_type=mime, width=width, height=height)


def decode_image(data: bytes, field: str) -> np.ndarray:
    """An encoded image file -> uint8 [H, W, 3] RGB; anything undecodable is InvalidArgument."""
    if not data:
        raise InvalidArgument(field, "0 bytes", "empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_DECODE_PIXELS:
                raise InvalidArgument(field, f"{image.width}x{image.height}", "image has too many pixels")
            image.load()
    except InvalidArgument:
        raise
    except Exception as exc:  # PIL raises many types for corrupt input
        raise InvalidArgument(field, f"{len(data)} bytes", f"not a decodable image ({type(exc).__name__})")
    return np.asarray(image.convert("RGB"))

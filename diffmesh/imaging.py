"""Image files <-> uint8 RGB arrays (PIL), shared by the vae stage, the orchestrator and the CLI.

Decoding is bounded by memory, not only by pixels: a 10 kB PNG can declare 8000x8000 pixels
(1-bit, paletted) and inflate to half a gigabyte once decoded and converted. `decode_image` reads
the header only (PIL's open does not decode), computes what decoding would allocate
(`decode_cost`) and refuses the file before any pixel is decoded when that exceeds the budget.
Metadata is bounded too: PNG text chunks (tEXt / zTXt / iTXt, the only metadata PIL parses while
opening a PNG) are capped per chunk and in total; EXIF / XMP are never parsed; truncated files
are refused (PIL's LOAD_TRUNCATED_IMAGES stays off).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, PngImagePlugin

from diffmesh.proto.v1 import common_pb2
from diffmesh.errors import InvalidArgument

FORMATS = {
    common_pb2.PNG: ("PNG", "image/png"),
    common_pb2.JPEG: ("JPEG", "image/jpeg"),
    common_pb2.WEBP: ("WEBP", "image/webp"),
}
DEFAULT_QUALITY = 95
# The file formats accepted as input (the contract's): PIL's many other decoders (TIFF, PSD,
# ICO, ...) are attack surface nobody asked for.
DECODE_FORMATS = tuple(name for name, _ in FORMATS.values())
# Default budget for one decode (the orchestrator and the vae configure theirs:
# diffmesh.limits.ImageMemoryLimits.max_image_decode_mb, the same default).
DEFAULT_DECODE_BUDGET = 160 * 1024 * 1024

# PIL's storage per pixel of a decoded image: one byte for 1-bit, grey and paletted images
# (PIL keeps 1-bit images one byte per pixel), two for 16-bit grey, four for everything else
# (RGB is stored as RGBX; LA and PA use four bytes too).
_STORAGE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_MAX_STORAGE_BYTES = 4
_RGB_STORAGE_BYTES = 4   # the RGB conversion, in PIL's storage
# The uint8 [H, W, 3] array: PIL's tobytes packs it in chunks and joins them, so the chunks and
# the joined copy (3 bytes each) coexist with the RGB image for a moment.
_ARRAY_BYTES = 2 * 3
# Buffers a decoder holds besides PIL's image, per pixel (measured by
# tests/unit/test_image_bombs.py): libwebp's animation decoder keeps its RGBA canvas and the
# previous frame, and returns the frame as one more RGBA copy before PIL copies it in; a
# progressive JPEG keeps every DCT coefficient (2 bytes per pixel and component) until it ends.
_WEBP_BYTES = 12
_PROGRESSIVE_JPEG_BYTES_PER_BAND = 2
# Codec state and row buffers, whatever the size (zlib window, libjpeg tables, ...).
_FIXED_BYTES = 4 * 1024 * 1024

# Text chunks are the only metadata PIL reads while opening a PNG; none of it is used here.
# PIL's defaults (1 MiB per chunk, 64 MiB in total) let a small file of compressed chunks cost
# 64 MiB before the header check; these keep it under 1 MiB.
PngImagePlugin.MAX_TEXT_CHUNK = 64 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 1024 * 1024
ImageFile.LOAD_TRUNCATED_IMAGES = False


def storage_bytes(mode: str) -> int:
    return _STORAGE_BYTES.get(mode, _MAX_STORAGE_BYTES)


def decode_cost(width: int, height: int, mode: str = "RGB", file_format: str = "",
                progressive: bool = False) -> int:
    """Peak bytes that decoding a `mode` image of width x height to a uint8 RGB array allocates
    (an upper bound, measured by tests/unit/test_image_bombs.py): first the decoded image (PIL's
    storage for its mode) with its RGB conversion (none when it is already RGB), then the RGB
    image with the packed array; plus what the format's decoder buffers meanwhile, plus a few
    MiB of codec state. A PNG or baseline JPEG pixel costs 10 bytes, a progressive JPEG one up
    to 18, a WebP one 22."""
    conversion = 0 if mode == "RGB" else _RGB_STORAGE_BYTES
    per_pixel = max(storage_bytes(mode) + conversion, _RGB_STORAGE_BYTES + _ARRAY_BYTES)
    if file_format == "WEBP":
        per_pixel += _WEBP_BYTES
    elif file_format == "JPEG" and progressive:
        per_pixel += _PROGRESSIVE_JPEG_BYTES_PER_BAND * len(mode)  # "L" 1, "RGB" 3, "CMYK" 4 bands
    return width * height * per_pixel + _FIXED_BYTES


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


def decode_image(data: bytes, field: str, max_bytes: int = DEFAULT_DECODE_BUDGET) -> np.ndarray:
    """An encoded PNG, JPEG or WebP file -> uint8 [H, W, 3] RGB. Anything undecodable, and any
    image whose decode_cost exceeds max_bytes (judged from its header, before decoding), is
    InvalidArgument. Peak memory of a call: decode_cost(...) <= max_bytes, plus the file."""
    if not data:
        raise InvalidArgument(field, "0 bytes", "empty image")
    image = None
    try:
        with warnings.catch_warnings():
            # PIL's own pixel-count guard (MAX_IMAGE_PIXELS) as an error, not a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
            cost = decode_cost(image.width, image.height, image.mode, image.format or "",
                               progressive=bool(image.info.get("progressive")))
            if cost > max_bytes:
                raise InvalidArgument(
                    field, f"{image.width}x{image.height} {image.format} {image.mode}",
                    f"decoding needs {cost // 2**20} MiB, more than the {max_bytes // 2**20} MiB allowed per image")
            image.load()
            if image.mode != "RGB":
                # The decoded source (and its decoder's buffers) goes as soon as it is converted.
                converted = image.convert("RGB")
                image.close()
                image = converted
            return np.asarray(image)  # a copy: closing the image below frees PIL's storage
    except InvalidArgument:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidArgument(field, f"{len(data)} bytes", f"image has too many pixels ({exc})")
    except Exception as exc:  # PIL raises many types for corrupt input
        raise InvalidArgument(field, f"{len(data)} bytes",
                              f"not a decodable PNG, JPEG or WebP image ({type(exc).__name__})")
    finally:
        if image is not None:
            image.close()

"""Image decoding is bounded by memory: files that inflate (a few kB declaring 8000x8000 pixels, 1-bit
and paletted; huge PNG / JPEG / WebP headers; compressed or oversized PNG text chunks, deeply
nested XMP) are refused from their header, before decoding, and the peak memory of a decode that
is accepted stays under diffmesh.imaging.decode_cost, the bound the refusal is judged by.

Memory is measured in a fresh subprocess per file: the peak resident set (VmHWM, reset through
/proc/self/clear_refs; ru_maxrss where that is not allowed) minus the resident set before the call.
PIL allocates with malloc, which tracemalloc does not see, so RSS is the honest measure."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmesh.errors import InvalidArgument
from diffmesh.imaging import DEFAULT_DECODE_BUDGET, decode_cost, decode_image

MIB = 1024 * 1024
REFUSED_GROWTH = 16 * MIB  # what refusing a bomb may cost: the header, PIL's objects, nothing decoded

_MEASURE = r"""
import gc, json, resource, sys
from diffmesh.errors import InvalidArgument
from diffmesh.imaging import decode_image

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024

def peak_rss():
    return status("VmHWM:") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

path, budget = sys.argv[1], int(sys.argv[2])
data = open(path, "rb").read()
decode_image(open(sys.argv[3], "rb").read(), "warm-up")  # imports and first-use allocations
gc.collect()
before = status("VmRSS:")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    hwm = True
except OSError:
    hwm = False
    before = max(before, peak_rss())
try:
    shape, error = list(decode_image(data, "init_image", budget).shape), None
except InvalidArgument as exc:
    shape, error = None, str(exc)
print(json.dumps({"growth": peak_rss() - before, "shape": shape, "error": error}))
"""


def measure(tmp_path: Path, data: bytes, budget: int = DEFAULT_DECODE_BUDGET) -> dict:
    """Decodes `data` in a fresh interpreter: {"growth": peak RSS growth, "shape" | "error"}."""
    path, warm = tmp_path / "image.bin", tmp_path / "warm.png"
    path.write_bytes(data)
    warm.write_bytes(encode(Image.new("RGB", (8, 8)), "PNG"))
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(budget), str(warm)],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


# --- bombs, written byte by byte where PIL would have to allocate them to write them ------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes, before_idat: list[bytes] = ()) -> bytes:
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + b"".join(before_idat) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def paletted_1bit_png(side: int) -> bytes:
    """side x side pixels, 1 bit each from a 2-colour palette: all zero rows, which zlib folds away."""
    rows = (b"\x00" + bytes((side + 7) // 8)) * side  # filter byte + packed bits, per row
    palette = png_chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff")
    return png(side, side, 1, 3, zlib.compress(rows, 9), [palette])


def small_png_with(chunks: list[bytes]) -> bytes:
    """A valid 8x8 RGB PNG carrying `chunks` before its pixels."""
    rows = (b"\x00" + bytes(8 * 3)) * 8
    return png(8, 8, 8, 2, zlib.compress(rows), chunks)


def huge_png_header(side: int) -> bytes:
    """An RGB PNG whose header says side x side, with one row of pixel data."""
    return png(side, side, 8, 2, zlib.compress(b"\x00" + bytes(side * 3)))


def huge_jpeg_header(side: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (16, 16), (200, 10, 10)), "JPEG"))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def huge_webp_header(side: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (16, 16), (10, 200, 10)), "WEBP", quality=80))
    assert data[12:16] == b"VP8 ", "expected a simple lossy WebP"
    start = data.index(b"\x9d\x01\x2a")  # VP8 key frame start code, then 14-bit width and height
    data[start + 3:start + 7] = struct.pack("<HH", side, side)
    return bytes(data)


def ztxt_chunks(count: int, inflated: int) -> list[bytes]:
    """Compressed text chunks of `inflated` bytes each, a few hundred bytes in the file."""
    return [png_chunk(b"zTXt", b"Comment%d\x00\x00" % i + zlib.compress(b"a" * inflated, 9)) for i in range(count)]


def nested_xmp_chunk(depth: int) -> bytes:
    xml = b"<x:xmpmeta>" + b"<rdf:li>" * depth + b"</rdf:li>" * depth + b"</x:xmpmeta>"
    return png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x01\x00\x00\x00" + zlib.compress(xml, 9))


BOMBS = {
    # 7.9 kB that PIL decodes to 64 MB, converts to 256 MB of RGBX and 192 MB of array.
    "8000x8000 1-bit paletted PNG": (paletted_1bit_png(8000), "8000x8000"),
    "8000x8000 PNG header": (huge_png_header(8000), "8000x8000"),
    "100000x100000 PNG header": (huge_png_header(100_000), "too many pixels"),
    "8000x8000 JPEG header": (huge_jpeg_header(8000), "8000x8000"),
    "65000x65000 JPEG header": (huge_jpeg_header(65_000), "too many pixels"),
    "8000x8000 WebP header": (huge_webp_header(8000), "8000x8000"),
    "16383x16383 WebP header": (huge_webp_header(16_383), "too many pixels"),
    # Under PIL's own limits (1 MiB per chunk, 64 MiB in all) these would cost ~54 MB at open.
    "60 zTXt chunks of 900 kB": (small_png_with(ztxt_chunks(60, 900_000)), "not a decodable"),
    "zTXt chunk of 50 MB": (small_png_with(ztxt_chunks(1, 50_000_000)), "not a decodable"),
    "2 MB of tEXt chunks": (small_png_with([png_chunk(b"tEXt", b"Comment%d\x00" % i + b"b" * 60_000)
                                            for i in range(35)]), "not a decodable"),
    "XMP nested 300,000 deep": (small_png_with([nested_xmp_chunk(300_000)]), "not a decodable"),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_bomb_is_refused_before_it_is_decoded(tmp_path, name):
    data, reason = BOMBS[name]
    assert len(data) < 3 * MIB  # small files, all of them
    result = measure(tmp_path, data)
    assert result["error"] is not None and result["error"].startswith("init_image:"), result
    assert reason in result["error"], result
    assert result["growth"] < REFUSED_GROWTH, f"refusing {name} grew RSS by {result['growth'] / MIB:.0f} MiB"


def test_the_paletted_bomb_would_cost_far_more_than_the_budget():
    """The point of the check: the 1-bit 8000x8000 PNG passes a pixel cap (64 M pixels) but costs
    eight bytes per pixel and more to decode (PIL keeps 1-bit pixels a byte each, then RGBX)."""
    with Image.open(io.BytesIO(BOMBS["8000x8000 1-bit paletted PNG"][0])) as image:
        assert image.mode == "P" and image.size == (8000, 8000)
        assert decode_cost(*image.size, image.mode, image.format) > 600 * MIB > DEFAULT_DECODE_BUDGET


def _noise(side: int) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    pixels[:, : side // 2] = 90  # half flat: quick to compress
    return Image.fromarray(pixels)


SIDE = 1536
ACCEPTED = {
    "RGB PNG": lambda: encode(_noise(SIDE), "PNG", compress_level=1),
    "1-bit PNG": lambda: encode(_noise(SIDE).convert("1"), "PNG"),
    "paletted PNG": lambda: encode(_noise(SIDE).convert("P"), "PNG", compress_level=1),
    "RGBA PNG": lambda: encode(_noise(SIDE).convert("RGBA"), "PNG", compress_level=1),
    "progressive JPEG": lambda: encode(_noise(SIDE), "JPEG", quality=95, progressive=True, subsampling=0),
    "CMYK JPEG": lambda: encode(_noise(SIDE).convert("CMYK"), "JPEG"),
    "RGBA WebP": lambda: encode(_noise(SIDE).convert("RGBA"), "WEBP", lossless=True),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_an_accepted_decode_stays_under_its_stated_bound(tmp_path, name):
    data = ACCEPTED[name]()
    with Image.open(io.BytesIO(data)) as image:
        bound = decode_cost(image.width, image.height, image.mode, image.format,
                            progressive=bool(image.info.get("progressive")))
    result = measure(tmp_path, data)
    assert result["shape"] == [SIDE, SIDE, 3], result
    # The bound is an upper bound, and not a loose one: at least the RGB image and its array.
    assert SIDE * SIDE * 7 < result["growth"] <= bound, \
        f"{name}: grew {result['growth'] / MIB:.1f} MiB, bound {bound / MIB:.1f} MiB"


def test_the_budget_is_the_refusal_line():
    data = encode(Image.new("RGB", (640, 480)), "PNG")
    cost = decode_cost(640, 480)
    assert decode_image(data, "init_image", max_bytes=cost).shape == (480, 640, 3)
    with pytest.raises(InvalidArgument) as info:
        decode_image(data, "init_image", max_bytes=cost - 1)
    assert info.value.field == "init_image" and "640x480" in str(info.value)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_only_the_contracts_formats_are_decoded(fmt):
    with pytest.raises(InvalidArgument, match="not a decodable PNG, JPEG or WebP"):
        decode_image(encode(Image.new("RGB", (8, 8)), fmt), "init_image")


def test_a_truncated_file_is_refused_not_half_decoded():
    data = encode(_noise(64), "PNG")
    with pytest.raises(InvalidArgument, match="not a decodable"):
        decode_image(data[: len(data) // 2], "init_image")
